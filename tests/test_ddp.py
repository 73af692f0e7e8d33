"""Data-parallel training (torchrun DDP, gloo on CPU): two ranks with batch b against one process
with the same 2b images (weights, discriminator and codebooks after data init and dead-code
restarts), grad_accum against one big batch, identical codebooks on both ranks, and the stage
scripts under `torchrun --nproc_per_node=2`: only rank 0 writes, each rank draws its own data,
and a resumed run (tokenizer, H-VAR generator) equals the uninterrupted one bit for bit."""
import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import Ranks, TrainStep, ddp_wrap, no_sync, resolve_record
from conftest import GEN_TINY, SMALL_TOK, TOK_TINY, tokenizer_args
from model import Tokenizer, TokenizerConfig
from losses import PatchDiscriminator, discriminator_step, hinge_d_loss, sample_active_groups

B, STEPS = 2, 5  # images per rank and step; steps (data init, then a restart every 2 quantizer calls)
QUANTIZERS = {
    'grouped': dict(groups=4, latent_dim=16),
    'msrq': dict(quantizer='msrq', groups=1, latent_dim=8, rq_steps=(1, 2, 4), rq_scales=(1.0,), rq_phi=2),
}


def train(rank, world, quantizer, accum=1, restarts=True):
    """STEPS AdamW steps of a tiny tokenizer (L1 + commitment + GAN on group-masked decodes) and its
    PatchGAN discriminator, as a stage script takes them. Every step draws one global batch of
    2B images (and its masks) from a fixed stream; rank r of `world` trains on its share, in `accum`
    micro-batches. -> (state dicts of model and discriminator, codes replaced per quantizer call,
    the model's initial state dict)."""
    torch.manual_seed(0)
    args = tokenizer_args(patch=8, codebook_size=16, enc_width=32, enc_depth=1, enc_heads=2, dec_width=32,
                          dec_depth=1, dec_heads=2, vq_restart_every=2, vq_dead_threshold=2.0,
                          vq_data_init=restarts, vq_restart_dead=restarts, **QUANTIZERS[quantizer])
    model, disc = Tokenizer(TokenizerConfig(**args)), PatchDiscriminator(ndf=8, n_layers=2)
    if world > 1:
        model.quantizer.ranks = Ranks()  # as tokenizer.py does under torchrun
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    step, train_disc = ddp_wrap(TrainStep(model)), ddp_wrap(disc)
    disc.requires_grad_(False)
    torch.manual_seed(1 + rank)  # the global RNG (restart draws) differs by rank; rank 0 = one process
    data = torch.Generator().manual_seed(2)
    replaced = []
    for _ in range(STEPS):
        x = torch.rand(2 * B, 3, 32, 32, generator=data)                       # the global batch
        k = sample_active_groups(2 * B, model.config.groups, 0.5, generator=data)
        mine = slice(rank * 2 * B // world, (rank + 1) * 2 * B // world)
        opt.zero_grad(set_to_none=True)
        recs = []
        for m, (xm, km) in enumerate(zip(x[mine].chunk(accum), k[mine].chunk(accum))):
            codes = model.quantizer.codebook.detach().clone()
            with no_sync(step, m == accum - 1):
                xrec, _, commit, _ = step(model, xm, km)
                loss = (xrec - xm).abs().mean() + commit - 0.1 * disc(xrec).mean()
                (loss / accum).backward()
            recs.append(xrec)
            replaced.append(int((model.quantizer.codebook != codes).any(-1).sum()))  # in this forward
        opt.step()
        discriminator_step(train_disc, d_opt, hinge_d_loss, x[mine], torch.cat(recs), contextlib.nullcontext())
    return model.state_dict(), disc.state_dict(), replaced, init


def _worker(rank, world, port, out, jobs):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.save([train(rank, world, **job) for job in jobs], f'{out}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def spawn(jobs, tmp_path, world=2):
    """Run train(**job) for every job in `world` gloo processes -> [[result of each job] per rank]."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, str(tmp_path), jobs), nprocs=world)
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(world)]


def assert_close_states(got, want, atol):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=f"{key} differs")


JOBS = [dict(quantizer='grouped'), dict(quantizer='msrq'), dict(quantizer='grouped', accum=2, restarts=False)]


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    return spawn(JOBS, tmp_path_factory.mktemp('ddp'))


@pytest.mark.parametrize('job', range(len(JOBS)))
def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(two_ranks, job):
    """Rank 0's weights after STEPS steps equal those of one process that sees both ranks' images:
    gradients averaged over the ranks, hits summed, the restart pool gathered in rank order.
    Float sums run in another order (a batch of B vs 2B), and AdamW's first steps move each weight
    by about lr = 1e-3 whatever its gradient's size: 1e-5 is 1% of one step."""
    model, disc, replaced, init = train(0, 1, **JOBS[job])
    ddp_model, ddp_disc, ddp_replaced, _ = two_ranks[0][job]
    assert_close_states(ddp_model, model, atol=1e-5)
    assert_close_states(ddp_disc, disc, atol=1e-5)
    # the same codes replaced at data init and at the restarts after it. Counts, kept exact across the
    # batch shapes: a token flipped at a near-tie that changed a count would restart another code, and the
    # weights would then differ far beyond 1e-5 anyway (the comparison above assumes no flip)
    if JOBS[job].get('restarts', True):
        assert ddp_replaced == replaced and replaced[0] > 0 and sum(replaced[1:]) > 0, replaced
    moved = [k for k in init if init[k].is_floating_point() and (model[k] - init[k]).abs().max() > 1e-3]
    assert 'quantizer.codebook' in moved and len(moved) > len(init) // 2  # the comparison is not of idle weights


@pytest.mark.parametrize('job', range(len(JOBS)))
def test_codebooks_identical_on_every_rank_after_restarts(two_ranks, job):
    """The ranks draw different images and different global random numbers; after data init and
    dead-code restarts (jobs 0, 1; job 2: gradients only, 2 micro-batches) both hold the same
    codebook, hits and weights, bit for bit."""
    r0, r1 = (two_ranks[r][job][0] for r in range(2))  # both apply the same all-reduced values: same bits
    assert torch.equal(r0['quantizer.codebook'], r1['quantizer.codebook'])
    assert torch.equal(r0['quantizer.hits'], r1['quantizer.hits']) and int(r0['quantizer.calls']) > 0
    assert_close_states(r1, r0, atol=0)


# ----------------------------------------------------------------------------- the scripts under torchrun

def check_rank0_wrote(out, runs=1):
    """`runs` finished torchrun runs in out (a resumed run appends to the log): rank 0 alone wrote
    the log; the checkpoint holds both ranks' data and RNG states, which differ, with rank 0's at
    the top level. -> the checkpoint."""
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['world_size'] == 2 and len(ckpt['ranks']) == 2
    assert not torch.equal(ckpt['ranks'][0]['sampler']['gen'], ckpt['ranks'][1]['sampler']['gen'])
    assert not torch.equal(ckpt['ranks'][0]['rng']['torch'], ckpt['ranks'][1]['rng']['torch'])
    assert torch.equal(ckpt['ranks'][0]['sampler']['gen'], ckpt['sampler']['gen'])
    log = (out / 'log.txt').read_text()
    assert log.count('run started') == runs and log.count('summary ----') == runs and 'DDP over 2 processes' in log
    assert not (out / 'lock').exists()
    return ckpt


def check_ranks_resumed(out):
    """Straight and resumed runs end with the same data and RNG state on each rank."""
    a, b = check_rank0_wrote(out / 'straight'), check_rank0_wrote(out / 'split', runs=2)
    for ra, rb in zip(a['ranks'], b['ranks']):  # sampler, mask_gen / topk_gen, rng
        assert torch.equal(ra['sampler']['gen'], rb['sampler']['gen'])
        assert torch.equal(ra['rng']['torch'], rb['rng']['torch'])
        assert all(torch.equal(ra[k], rb[k]) for k in ra if k not in ('sampler', 'rng')), list(ra)


def test_tokenizer_exact_resume_under_torchrun(check_exact_resume, run_script, tiny_val, tmp_path):
    """2 ranks x batch 1 x grad_accum 2, GAN from step 2, a dead-code restart every 2 calls:
    2 + resume + 2 steps equal 4 straight steps bit for bit; resuming with one process is refused."""
    args = TOK_TINY + [f'--val_dir={tiny_val}', '--batch_size=1', '--grad_accum=2', '--gan_start=2',
                       '--vq_restart_every=2', '--eval_interval=1000', '--log_interval=1', '--warmup_iters=2']
    out, _ = check_exact_resume('tokenizer.py', args, tmp_path, 2, ('model', 'disc'), nproc=2)
    assert out.count('---- tokenizer summary ----') == 1
    check_ranks_resumed(tmp_path)
    p = run_script('tokenizer.py', args + [f'--out_dir={tmp_path / "split"}', '--max_iters=6',
                                           '--init_from=resume'], check=False)
    assert p.returncode != 0 and 'config error' in p.stderr
    assert 'saved by 2 process(es), this run has 1' in p.stderr


def test_generator_under_torchrun(run_script, tiny_val, tiny_tok, tmp_path):
    """HiTokSR generator with the prior's LoRA and the GAN from step 2, 2 ranks x batch 1: one run
    (its resume works as the others' do)."""
    run_script('generator.py', GEN_TINY + [f'--val_dir={tiny_val}', f'--tok_ckpt={tiny_tok}', '--batch_size=1',
                                           '--gan_start=1', '--max_iters=2', '--eval_interval=1000',
                                           '--learning_rate=1e-3', f'--out_dir={tmp_path}'], nproc=2)
    ckpt = check_rank0_wrote(tmp_path)
    assert any(v.abs().sum() > 0 for k, v in ckpt['prior_lora'].items() if k.endswith('lora_B'))  # LoRA trained


def test_hvar_tokenizer_and_generator_exact_resume_under_torchrun(check_exact_resume, run_script, tiny_val,
                                                                  tmp_path):
    """A multi-scale RQ tokenizer trained by 2 ranks, then H-VAR on it: 2 ranks draw their own input
    classes from torch's global RNG, which each rank resumes from its own saved state."""
    tok = tmp_path / 'hrq'
    run_script('tokenizer.py', ['config/tiny.py', 'config/hvar.py', '--crop_size=64', '--patch=8', '--batch_size=1',
                                *SMALL_TOK, '--codebook_size=16', '--rq_steps=(1,2,3,4,6,8)', '--max_minutes=0',
                                '--threads=1', '--eval_interval=1000', '--max_iters=2', '--vq_restart_every=1',
                                f'--val_dir={tiny_val}', f'--out_dir={tok}'], nproc=2)
    args = ['config/tiny.py', 'config/hvar.py', '--crop_size=64', '--batch_size=2', '--width=32', '--depth=1',
            '--n_head=2', '--max_minutes=0', '--threads=1', '--log_interval=1', '--warmup_iters=2',
            '--eval_interval=1000', '--bilinear_frac=0.25', '--free_frac=0.25', '--guidance_drop=0.25',
            f'--tok_ckpt={tok / "ckpt.pt"}', f'--val_dir={tiny_val}']
    check_exact_resume('generator.py', args, tmp_path / 'hvar', 2, ('generator',), nproc=2)
    check_ranks_resumed(tmp_path / 'hvar')


def test_finetune_decoder_under_torchrun(run_script, tiny_val, tiny_gen, tmp_path):
    """Decoder fine-tuning, 2 ranks x batch 1 x grad_accum 2 with top-3 draws and the GAN: one run."""
    run_script('finetune_decoder.py', ['config/tiny.py', '--crop_size=32', '--batch_size=1',
                                       '--grad_accum=2', '--top_k=3', '--max_minutes=0', '--threads=1',
                                       '--max_iters=2', '--eval_interval=1000', '--gan_start=1',
                                       f'--val_dir={tiny_val}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path}'],
               nproc=2)
    ckpt = check_rank0_wrote(tmp_path)
    assert not torch.equal(ckpt['ranks'][0]['topk_gen'], ckpt['ranks'][1]['topk_gen'])
    tok = torch.load(resolve_record(torch.load(tiny_gen, weights_only=True)['tok_ckpt'], tiny_gen), weights_only=True)['model']
    assert any(not torch.equal(v, tok[f'decoder.{k}']) for k, v in ckpt['decoder'].items())  # it trained
