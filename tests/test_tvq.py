"""Texture VQ (TVQ&RAP): the structure map and its alignment by hand, the texture codebook against
a per-vector loop, the decoder's two inputs, the predictor's loss terms and where their gradients
go, exact resume of both stage scripts, the chain scripts on the result, one-line config errors."""
import pytest
import torch
import torch.nn.functional as F

import data
from conftest import SMALL_TOK, assert_images_close, tokenizer_args
from model import GroupedVQ, TextureGenerator, TextureGeneratorConfig, Tokenizer, TokenizerConfig
from losses import generator_losses
from chain import load_sr_chain, super_resolve

C, C_L, K = 8, 4, 32   # texture channels, structure channels, texture codes


def small_tokenizer():
    args = tokenizer_args(quantizer='tvq', patch=8, latent_dim=C, groups=1, codebook_size=K, enc_width=32,
                          enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, tvq_struct_dim=C_L,
                          tvq_struct_pool=4, tvq_down=8, tvq_down_width=16, tvq_down_depth=1, tvq_down_heads=2)
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**args))
    with torch.no_grad():
        tok.quantizer.codebook.normal_(std=0.3)  # distinct codes on the scale of the encoder outputs
    return tok.eval()


def test_structure_map_and_alignment_loss_by_hand():
    """F_L is the mean of the last C_L encoder channels over each 4 x 4 block of tokens; the
    alignment loss is the mean squared difference to E_down(x resized by 1/8), which it does not train."""
    tok = small_tokenizer()
    x = torch.rand(2, 3, 64, 96)
    _, _, _, _, f_l = tok.encode_tvq(x)
    z = tok.encoder(x).detach()                                       # (2, C + C_L, 8, 12)
    f_lv = f_l.detach()
    assert f_l.shape == (2, C_L, 2, 3)
    for b in range(2):
        for c in range(C_L):
            for i in range(2):
                for j in range(3):
                    want = float(z[b, C + c, 4 * i:4 * i + 4, 4 * j:4 * j + 4].sum()) / 16
                    assert abs(float(f_lv[b, c, i, j]) - want) < 1e-5
    x_down = F.interpolate(x, size=(8, 12), mode='bicubic', align_corners=False, antialias=True).clamp(0, 1)
    f_down = tok.struct_encoder(x_down).detach()                      # (2, C_L, 2, 3): the grid of F_L
    total, n = 0.0, 0
    for a, b in zip(f_l.detach().flatten().tolist(), f_down.flatten().tolist()):
        total, n = total + (a - b) ** 2, n + 1
    align, down, x_down_hat = tok.structure_losses(x, f_l)
    assert n == 2 * C_L * 6 and abs(align.item() - total / n) < 1e-6
    assert abs(down.item() - ((x_down_hat - x_down) ** 2).mean().item()) < 1e-7
    tok.zero_grad()
    align.backward()
    assert all(p.grad is None for p in tok.struct_encoder.parameters())   # sg[F_down]
    assert tok.encoder.to_latent.weight.grad[C:].abs().sum() > 0          # the structure channels move
    assert tok.encoder.to_latent.weight.grad[:C].abs().sum() == 0         # the texture channels do not


def test_texture_codebook_lookup_matches_a_per_vector_loop():
    tok = small_tokenizer()
    x = torch.rand(2, 3, 64, 64)
    zq, idx, _, _, _ = tok.encode_tvq(x)
    f_h = tok.encoder(x)[:, :C].detach()                              # (2, C, 8, 8)
    book = tok.quantizer.codebook[0].detach()                         # (K, C)
    assert isinstance(tok.quantizer, GroupedVQ) and tok.quantizer.G == 1 and idx.shape == (2, 1, 8, 8)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                v = f_h[b, :, i, j]
                dists = [float(((v - e) ** 2).sum()) for e in book]
                assert int(idx[b, 0, i, j]) == min(range(K), key=dists.__getitem__)
                torch.testing.assert_close(zq[b, :, i, j].detach(), book[idx[b, 0, i, j]], rtol=0, atol=1e-6)
    assert len(idx.unique()) > 3                                      # a real test: several codes in use


def test_texture_codebook_data_init_from_texture_vectors():
    """The grouped VQ's remedy 1 on the texture map: after the first training call every code is one
    of that batch's F_H vectors (plus 1% noise)."""
    tok = small_tokenizer().train()
    x = torch.rand(2, 3, 64, 64)
    tok.encode_tvq(x)
    f_h = tok.encoder(x)[:, :C].detach().permute(0, 2, 3, 1).reshape(-1, C)
    d = torch.cdist(tok.quantizer.codebook[0].detach(), f_h).min(1).values
    assert bool(tok.quantizer.initialized) and float(d.max()) < 0.1 * float(f_h.std())


def test_decoder_needs_both_maps():
    tok = small_tokenizer()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        zq, idx, _, _, f_l = tok.encode_tvq(x)
        full = tok.decode(zq, f_l)
        assert torch.equal(full, tok(x)[0])
        torch.testing.assert_close(tok.decode_indices(idx, f_l=f_l), full, rtol=0, atol=1e-5)  # zq = z + (e - z)
        assert float((tok.decode(zq, torch.zeros_like(f_l)) - full).abs().max()) > 1e-3
        assert float((tok.decode(torch.zeros_like(zq), f_l) - full).abs().max()) > 1e-3
    with pytest.raises(ValueError, match='structure map'):
        tok.decode(zq)
    with pytest.raises(ValueError, match='multiples of patch x tvq_struct_pool = 32'):
        tok.encode_tvq(torch.rand(1, 3, 48, 64))


def texture_generator():
    cfg = TextureGeneratorConfig(patch=8, scale=4, groups=1, codebook_size=K, width=32, depth=1, n_head=2,
                                 mlp_ratio=4.0, rope_base=10000.0, stem_dim=8, use_sft=False, sft_hidden=8,
                                 cls_tokens='none', feat_dim=0, pooled_dims=(), head='linear', latent_dim=0,
                                 struct_dim=C_L, struct_pool=4)
    torch.manual_seed(1)
    return TextureGenerator(cfg)


WEIGHTS = dict(ce_weight=0.0, repa_weight=0.0, l1_weight=0.0, lpips_weight=0.0, gan_weight=0.0, struct_weight=0.0)


@pytest.mark.parametrize('term', ['struct', 'ce', 'l1'])
def test_predictor_terms_by_hand_and_their_gradients(term):
    """MSE(F_L) trains the structure head and the trunk, not the texture head; CE the texture head
    and the trunk, not the structure head; L1 through the straight-through one-hot and the frozen
    decoder reaches both heads (the image is decoded with the predicted F_L) and nothing of the tokenizer."""
    tok = small_tokenizer().requires_grad_(False)
    g = texture_generator()
    hr = torch.rand(2, 3, 64, 64)
    lr = F.interpolate(hr, scale_factor=0.25, mode='bilinear', antialias=True)
    with torch.no_grad():
        _, q_hr, _, _, f_l_hr = tok.encode_tvq(hr)
    s = dict(WEIGHTS, **{f'{term}_weight': 1.0})
    loss, parts, logits, sr = generator_losses(tok, g, None, hr, lr, q_hr, f_l_hr, **s)
    logits_ref, f_l = g(lr)
    assert logits.shape == (2, 1, 8, 8, K) and f_l.shape == (2, C_L, 2, 2)
    # the terms by hand: MSE over every structure value, CE as -log softmax at the target, L1 on pixels
    mse = sum((a - b) ** 2 for a, b in zip(f_l.flatten().tolist(), f_l_hr.flatten().tolist())) / f_l.numel()
    assert abs(parts['struct'].item() - mse) < 1e-6
    lg, t = logits_ref.detach().reshape(-1, K), q_hr.flatten()
    ce = float(sum(torch.logsumexp(lg[n], 0) - lg[n, t[n]] for n in range(len(t))) / len(t))
    assert term != 'ce' or abs(parts['ce'].item() - ce) < 1e-5
    if term == 'l1':
        want = tok.decode_indices(logits_ref.argmax(-1), f_l=f_l).detach()
        torch.testing.assert_close(sr.detach(), want, rtol=0, atol=1e-6)
        assert abs(parts['l1'].item() - float((want - hr).abs().mean())) < 1e-6
    assert abs(loss.item() - parts[term].item()) < 1e-6
    loss.backward()
    grad = lambda m: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)
    assert grad(g.patchify) > 0 and grad(g.blocks) > 0
    assert (grad(g.struct_head) > 0) == (term in ('struct', 'l1'))
    assert (grad(g.head) > 0) == (term in ('ce', 'l1'))
    assert all(p.grad is None for p in tok.parameters())

# ----------------------------------------------------------------------------- the scripts

TOK_TVQ = ['config/tiny.py', 'config/tvq.py', '--crop_size=64', '--batch_size=2', *SMALL_TOK, '--codebook_size=16',
           '--tvq_down_width=16', '--tvq_down_heads=2', '--max_minutes=0', '--threads=1', '--eval_interval=1000',
           '--log_interval=1', '--warmup_iters=2', '--vq_restart_every=2']
GEN_TVQ = ['config/tiny.py', 'config/tvq.py', '--crop_size=64', '--batch_size=2', '--width=32', '--depth=1',
           '--n_head=2', '--stem_dim=16', '--max_minutes=0', '--threads=1', '--eval_interval=1000',
           '--log_interval=1', '--warmup_iters=2', '--gan_start=1', '--learning_rate=1e-3']


@pytest.fixture(scope='module')
def tvq_tok(run_script, tiny_val, tmp_path_factory):
    out = tmp_path_factory.mktemp('tvq_tok')
    run_script('tokenizer.py', TOK_TVQ + ['--max_iters=2', f'--val_dir={tiny_val}', f'--out_dir={out}'])
    return out / 'ckpt.pt'


def test_tokenizer_exact_resume(check_exact_resume, tmp_path, tiny_val):
    """1 + resume + 1 steps bit-identical to 2 straight ones (dead-code restarts in both)."""
    log, ckpt = check_exact_resume('tokenizer.py', TOK_TVQ + [f'--val_dir={tiny_val}', '--vq_restart_every=1'],
                                   tmp_path, 1,
                                   ('model',))
    for key in ('texture VQ: 16 codes x 32 dims', 'align ', 'down ', 'val_align:', 'down_psnr:', 'code_usage_g0:'):
        assert key in log, key
    assert ckpt['model_args']['quantizer'] == 'tvq' and 'struct_encoder.patchify.weight' in ckpt['model']


def test_generator_exact_resume_and_the_chain(check_exact_resume, run_script, tvq_tok, tiny_val, tmp_path):
    """1 + resume + 1 steps (GAN on in the resumed step) bit-identical to 2 straight ones; then sr.py
    writes the chain's top-1 output (up to float noise) and eval.py scores it as the run's final
    evaluation."""
    args = GEN_TVQ + [f'--val_dir={tiny_val}', f'--tok_ckpt={tvq_tok}']
    log, a = check_exact_resume('generator.py', args, tmp_path, 1, ('generator', 'disc'))
    for key in ('structure map 16 x 2x2', 'struct ', 'struct_mse:', 'token_acc_g0:', 'lpips_vs_bicubic:'):
        assert key in log, key
    assert 'g 0.0000 d 0.0000' not in log.split('step 2 |')[1].split('\n')[0]  # GAN on in step 2
    ckpt = tmp_path / 'straight' / 'ckpt.pt'
    tok, g, prior = load_sr_chain(ckpt, 'cpu')
    assert isinstance(g, TextureGenerator) and prior is None
    pairs = data.load_val_pairs(str(tiny_val))
    ref = (super_resolve(pairs['lr'], tok, g) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={ckpt}', f'--out_dir={tmp_path / "whole"}', '--tile=0',
                         '--color_fix=0'])
    # one pass over the whole image: the chain's output, but sr.py is another process (torch's default
    # thread count, one image at a time), so not bit for bit: 1 grey level on a few pixels (conftest)
    for i, name in enumerate(pairs['names']):
        img = (data.load_image(str(tmp_path / 'whole' / f'{name}_x4.png')) * 255).round().byte().permute(1, 2, 0)
        assert_images_close(img.numpy(), ref[i], what=f'sr.py {name}_x4.png vs the chain in this process')
    p = run_script('eval.py', ['--sr=chain', f'--gen_ckpt={ckpt}', f'--val_dir={tiny_val}', '--color_fix=0',
                               f'--out_json={tmp_path / "eval.json"}'])
    assert 'stage 2: generator + stage-1 decoder' in p.stdout
    # eval.py's process (default threads) against the run's own (1 thread), printed to 4 decimals
    lpips = float(p.stdout.split('lpips: ')[1].split()[0])
    assert abs(lpips - a['metrics']['lpips']) < 1e-3, (lpips, a['metrics']['lpips'])


@pytest.mark.parametrize('arg, words', [
    ('--crop_size=48', 'must be a multiple of patch x tvq_struct_pool = 32'),
    ('--method=hitoksr', "unknown config key 'method'"),  # the tokenizer decides the method
])
def test_generator_config_errors_are_one_line(run_script, tvq_tok, tiny_val, tmp_path, arg, words):
    p = run_script('generator.py', GEN_TVQ + [f'--tok_ckpt={tvq_tok}', f'--val_dir={tiny_val}', f'--out_dir={tmp_path}',
                                              '--max_iters=1', arg], check=False)
    assert p.returncode != 0 and words in p.stderr and 'config error' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and 'step ' not in p.stdout


def test_tokenizer_config_errors_are_one_line(run_script, tiny_val, tmp_path):
    p = run_script('tokenizer.py', TOK_TVQ + [f'--val_dir={tiny_val}', f'--out_dir={tmp_path}', '--max_iters=1',
                                              '--crop_size=48'], check=False)
    assert p.returncode != 0 and 'multiple of patch x tvq_struct_pool = 32' in p.stderr, p.stderr
    assert 'config error' in p.stderr and 'Traceback' not in p.stderr and 'step ' not in p.stdout
    for bad, words in (dict(groups=2), 'groups'), (dict(tvq_down=3), 'tvq_down'), (dict(tvq_down_heads=3), 'heads'):
        with pytest.raises(ValueError, match=words):
            TokenizerConfig(**tokenizer_args(**{'quantizer': 'tvq', 'groups': 1, **bad}))


def test_checkpoints_from_before_texture_vq_still_load():
    """model_args saved before the tvq_* fields existed rebuild the same grouped tokenizer."""
    args = tokenizer_args(patch=8, latent_dim=8, groups=4, codebook_size=16, enc_width=32, enc_depth=1, enc_heads=2,
                          dec_width=32, dec_depth=1, dec_heads=2)
    old = {k: v for k, v in args.items() if not k.startswith('tvq_')}
    assert len(old) == len(args) - 6
    torch.manual_seed(0)
    a = Tokenizer(TokenizerConfig(**args))
    b = Tokenizer(TokenizerConfig.from_dict(old))
    b.load_state_dict(a.state_dict())                                 # strict: the same modules
    assert not hasattr(b, 'struct_encoder') and b.encoder.to_latent.out_features == 8
