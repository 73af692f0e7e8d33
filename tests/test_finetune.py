"""Stage 3: top-K sampling against its definition (support and frequencies), K=1 = argmax,
gradient routing (only the decoder trains), and finetune_decoder.py: smoke run, exact resume,
the frozen mode, config errors, and the saved decoder used by load_sr_chain."""
import hashlib
import json

import pytest
import torch

import data
import metrics
from common import resolve_record
from conftest import LPIPS_TOL, generator_args, psnr_tol_db, tokenizer_args
from model import Generator, GeneratorConfig, Tokenizer, TokenizerConfig, sample_topk
from chain import chain_rows, fix_colors, load_sr_chain, super_resolve

# ----------------------------------------------------------------------------- top-K sampling


def test_topk_support_and_frequencies_follow_renormalised_probabilities():
    K, k, n = 12, 5, 200_000
    logits = torch.randn(K, generator=torch.Generator().manual_seed(0)) * 2
    p = logits.softmax(-1)
    top = p.argsort(descending=True)[:k]
    want = torch.zeros(K)
    want[top] = p[top] / p[top].sum()  # renormalised over the top k, written out by hand
    idx = sample_topk(logits.expand(n, 4, K), k, torch.Generator().manual_seed(1))
    assert idx.shape == (n, 4)
    freq = torch.bincount(idx.flatten(), minlength=K).double() / idx.numel()
    assert set(idx.unique().tolist()) == set(top.tolist())  # never outside the top k, all of them used
    se = (want * (1 - want) / idx.numel()).sqrt().double()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)


def test_topk_with_k1_is_argmax_and_draws_nothing():
    logits = torch.randn(3, 4, 5, 6, 50)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(sample_topk(logits, 1, g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_topk_is_reproducible_per_generator_state():
    logits = torch.randn(2, 4, 3, 3, 16)
    a = sample_topk(logits, 5, torch.Generator().manual_seed(3))
    b = sample_topk(logits, 5, torch.Generator().manual_seed(3))
    c = sample_topk(logits, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)

# ----------------------------------------------------------------------------- gradient routing


def test_only_the_decoder_gets_gradients():
    """The stage-3 step as finetune_decoder.py runs it: frozen generator -> top-K draw ->
    codebook lookup -> decoder -> L1 + LPIPS; only decoder parameters receive gradients."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**tokenizer_args(patch=8, latent_dim=8, groups=4, codebook_size=16, enc_width=32,
                                                     enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)))
    gen = Generator(GeneratorConfig(**generator_args(patch=8, scale=4, groups=4, codebook_size=16, latent_dim=8, width=32, depth=1,
                                                     n_head=2, stem_dim=8, use_sft=False, cls_tokens='none',
                                                     feat_dim=0, pooled_dims=())))
    with torch.no_grad():  # as after a few steps: the conv head's zero-initialised convs (conv_out, each
        for p in tok.decoder.parameters():  # residual block's last) pass no gradient upstream at step 0
            p.add_(0.01 * torch.randn_like(p))
    for m in (tok, gen):
        m.eval().requires_grad_(False)
    tok.decoder.requires_grad_(True)
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        idx = sample_topk(gen(lr), 5, torch.Generator().manual_seed(0))
    sr = tok.decode(tok.quantizer.lookup(idx))
    ((sr - hr).abs().mean() + metrics.lpips_dist(metrics.load_lpips('cpu'), sr, hr).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.decoder.parameters())
    assert tok.quantizer.codebook.grad is None
    assert all(p.grad is None for p in (*gen.parameters(), *tok.encoder.parameters()))

# ----------------------------------------------------------------------------- the script

TINY = ['config/tiny.py', '--crop_size=32', '--batch_size=2', '--max_minutes=0',
        '--eval_interval=1000', '--log_interval=1', '--gan_start=2', '--warmup_iters=2', '--decay_iters=6',
        '--learning_rate=1e-3', '--top_k=3', '--threads=1']


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def tiny(tiny_val, tiny_gen):
    return TINY + [f'--val_dir={tiny_val}', f'--gen_ckpt={tiny_gen}']


def test_bad_config_is_one_clear_message(tiny, run_script, tmp_path):
    for arg, words in (('--mode=top3', "mode='top3'"), ('--top_k=0', 'top_k=0'), ('--guide_lr_mult=0', 'guide_lr_mult=0'),
                       (f'--gen_ckpt={tmp_path}/none.pt', 'python generator.py'), ('--crop_size=36', 'patch=8')):
        p = run_script('finetune_decoder.py', tiny + [arg, f'--out_dir={tmp_path}'], check=False)
        assert p.returncode != 0 and words in p.stderr and 'config error' in p.stderr, p.stderr
        assert 'Traceback' not in p.stderr and 'step ' not in p.stdout


def test_smoke_exact_resume_frozen_mode_and_chain(tiny, tiny_val, tiny_gen, run_script, check_exact_resume,
                                                   tmp_path):
    gen = torch.load(tiny_gen, weights_only=False)
    tok_file = type(tiny_gen)(resolve_record(gen['tok_ckpt'], tiny_gen))
    hashes = (sha(tiny_gen), sha(tok_file))
    straight, frozen = tmp_path / 'straight', tmp_path / 'frozen'
    out, a = check_exact_resume('finetune_decoder.py', tiny, tmp_path, 2, ('decoder', 'disc'))
    for key in ('psnr_y:', 'lpips:', 'stage2_lpips:', 'bicubic_lpips:', 'mode: topk', 'top_k: 3'):
        assert key in out, key
    assert 'g 0.0000 d 0.0000' not in out.split('step 3 |')[1].split('\n')[0]  # GAN on from step 2
    assert 'not-top1 0.000' not in out.split('step 1 |')[1].split('\n')[0]     # top-3 draws differ from top-1
    for f in ('ckpt.pt', 'log.txt', 'curves.png', 'summary.json', 'samples_000000.png', 'samples_000004.png'):
        assert (straight / f).is_file(), f
    # the earlier stages' files are untouched, and only the decoder moved
    assert (sha(tiny_gen), sha(tok_file)) == hashes
    tok0 = torch.load(tok_file, weights_only=False)['model']
    assert any(not torch.equal(v, tok0[f'decoder.{k}']) for k, v in a['decoder'].items())
    # the saved decoder is what load_sr_chain / sr.py / eval.py use, with top-1 tokens
    tok, g, prior = load_sr_chain(tiny_gen, 'cpu', decoder_ckpt=straight / 'ckpt.pt')
    for k, v in tok.state_dict().items():
        assert torch.equal(v, a['decoder'][k[len('decoder.'):]] if k.startswith('decoder.') else tok0[k]), k
    pairs = data.load_val_pairs(str(tiny_val))
    m = metrics.evaluate(super_resolve(pairs['lr'], tok, g, prior), pairs['hr'], crop_border=4, lpips_net=False)
    # the run (1 thread) and this process (1 thread under test.sh, torch's default under -n 0): psnr_tol_db
    assert abs(m['psnr_y'] - a['metrics']['psnr_y']) < psnr_tol_db(m['psnr_y']), (m['psnr_y'], a['metrics']['psnr_y'])
    # eval.py on the chain: bicubic, tokenizer reconstruction, stage 2, stage 3 (+ colour correction) in one
    # table; eval.py runs torch's default thread count, the runs 1 thread: chain images agree up to float
    # noise, hence psnr_tol_db and LPIPS_TOL (conftest); bicubic resampling is the same bits in any process
    js = tmp_path / 'chain.json'
    out = run_script('eval.py', ['--sr=chain', f'--gen_ckpt={tiny_gen}', f'--decoder_ckpt={straight / "ckpt.pt"}',
                                 f'--val_dir={tiny_val}', f'--out_json={js}']).stdout
    rows = json.loads(js.read_text())['rows']
    assert [r['name'][:7] for r in rows] == ['bicubic', 'stage 1', 'stage 2', 'stage 3', 'stage 3']
    assert '| stage 3' in out
    # the last row: sr.py's colour correction (default 2 LR pixels) of the stage-3 images
    fixed = fix_colors(super_resolve(pairs['lr'], tok, g, prior), pairs['lr'], 2 * 4)
    assert rows[4]['name'].endswith('+ colour correction (2 LR px)')
    assert rows[4]['psnr_y'] == pytest.approx(metrics.evaluate(fixed, pairs['hr'], 4, lpips_net=False)['psnr_y'],
                                              abs=psnr_tol_db(rows[4]['psnr_y']))
    summ = json.loads((straight / 'summary.json').read_text())
    for r, key, tol_db, tol_lpips in ((rows[0], 'bicubic', 1e-9, 1e-6),
                                      (rows[2], 'stage2', psnr_tol_db(rows[2]['psnr_y']), LPIPS_TOL)):
        assert r['psnr_y'] == pytest.approx(summ[f'{key}_psnr_y'], abs=tol_db)
        assert r['lpips'] == pytest.approx(summ[f'{key}_lpips'], abs=tol_lpips)
    assert rows[3]['psnr_y'] == pytest.approx(summ['psnr_y'], abs=psnr_tol_db(summ['psnr_y']))
    assert rows[3]['lpips'] == pytest.approx(summ['lpips'], abs=LPIPS_TOL)
    # frozen: no training, the stage-1 decoder evaluated as is = the stage-2 numbers
    out = run_script('finetune_decoder.py', tiny + [f'--out_dir={frozen}', '--mode=frozen']).stdout
    assert 'step 1 |' not in out and 'steps: 0' in out
    c = torch.load(frozen / 'ckpt.pt', weights_only=False)
    assert all(torch.equal(v, tok0[f'decoder.{k}']) for k, v in c['decoder'].items())
    summ = json.loads((frozen / 'summary.json').read_text())  # one process, one chain on one batch: exact
    assert summ['steps'] == 0 and summ['psnr_y'] == pytest.approx(summ['stage2_psnr_y'], abs=1e-9)
    assert summ['lpips'] == pytest.approx(summ['stage2_lpips'], abs=1e-9)


def test_lr_guide_trains_resumes_exactly_and_decodes_with_each_images_lr(tiny, tiny_val, tiny_gen, check_exact_resume,
                                                                          tmp_path):
    """--lr_guide=True: the guide's zero-initialised convs train, an interrupted run resumes to the
    same bits, and the saved decoder, loaded by load_sr_chain, decodes with each image's LR: it gives
    the run's own evaluation (super_resolve, eval.py's chain_rows) and the same tokens decode to
    another image with another LR."""
    out, a = check_exact_resume('finetune_decoder.py', tiny + ['--lr_guide=True', '--lpips_batch=1'], tmp_path, 1,
                                ('decoder',))  # LPIPS on 1 of the 2 crops
    assert '(with the LR guide)' in out
    guide = [v for k, v in a['decoder'].items() if k.startswith('upsampler.guide.') and k.endswith('weight')]
    assert guide and all(v.abs().sum() > 0 for v in guide)
    ckpt = tmp_path / 'straight' / 'ckpt.pt'
    tok, g, prior = load_sr_chain(tiny_gen, 'cpu', decoder_ckpt=ckpt)
    assert tok.decoder.lr_guided
    pairs = data.load_val_pairs(str(tiny_val))
    sr, idx = super_resolve(pairs['lr'], tok, g, prior, return_indices=True)
    m = metrics.evaluate(sr, pairs['hr'], crop_border=4, lpips_net=False)
    assert abs(m['psnr_y'] - a['metrics']['psnr_y']) < psnr_tol_db(m['psnr_y']), (m['psnr_y'], a['metrics']['psnr_y'])
    rows = chain_rows(pairs, tiny_gen, ckpt, False)
    assert rows[3]['name'].startswith('stage 3') and abs(rows[3]['psnr_y'] - m['psnr_y']) < psnr_tol_db(m['psnr_y'])
    assert not torch.equal(tok.decode_indices(idx, lr=pairs['lr'].flip(-1)).float().clamp(0, 1), sr)
