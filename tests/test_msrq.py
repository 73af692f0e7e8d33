"""Multi-scale residual quantization and the hierarchical tokenization (H-VAR, Algorithm 1):
against naive per-step, per-vector loops; the step partitions of the paper and the tiny config;
shared tokens across scales; exact reconstruction; any grid side; script-level resume and errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_TOK, tokenizer_args
from model import MultiScaleRQ, Tokenizer, TokenizerConfig, step_partition

TINY_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PAPER_STEPS = (4, 6, 8, 10, 14, 16, 20, 24, 28, 32)
SCALES = (0.25, 0.5, 1.0)


def naive_area(x_Chw, h, w):
    """Area downsampling by explicit windows: output (i, j) is the mean of rows
    [floor(i H / h), ceil((i + 1) H / h)) and the same for columns (adaptive pooling's windows)."""
    C, H, W = x_Chw.shape
    out = torch.empty(C, h, w, dtype=x_Chw.dtype)
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * H) // h, -(-((i + 1) * H) // h)
            c0, c1 = (j * W) // w, -(-((j + 1) * W) // w)
            out[:, i, j] = x_Chw[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out


def naive_rq(f_Chw, codebook_KC, steps, phi):
    """Greedy residual quantization, one vector and one code at a time -> ([idx (h_i, w_i)], f_hat)."""
    C, H, W = f_Chw.shape
    rest, f_hat, idxs = f_Chw.clone(), torch.zeros_like(f_Chw), []
    for i, side in enumerate(steps):
        h, w = max(1, round(side * H / steps[-1])), max(1, round(side * W / steps[-1]))
        r = naive_area(rest, h, w)
        idx = torch.empty(h, w, dtype=torch.long)
        for a in range(h):
            for b in range(w):
                dists = [float(((r[:, a, b] - e) ** 2).sum().detach()) for e in codebook_KC]
                idx[a, b] = min(range(len(dists)), key=dists.__getitem__)
        q = codebook_KC[idx].permute(2, 0, 1)[None]                          # (1, C, h, w)
        if (h, w) != (H, W):
            q = F.interpolate(q, size=(H, W), mode='bicubic', align_corners=False)
        contrib = phi(i, q)[0]
        f_hat, rest = f_hat + contrib, rest - contrib
        idxs.append(idx)
    return idxs, f_hat


@pytest.mark.parametrize('n_phi, shape', [(0, (6, 6)), (2, (6, 6)), (2, (5, 7))])
def test_residual_quantizer_matches_naive_loop(n_phi, shape):
    torch.manual_seed(0)
    steps = (1, 2, 3, 6)
    q = MultiScaleRQ(4, 16, steps, (1.0,), n_phi=n_phi, phi_ratio=0.5).eval()
    with torch.no_grad():
        q.codebook.normal_()
    f = torch.randn(2, 4, *shape)
    zq, idxs, _, _ = q(f)
    for b in range(2):
        ref_idx, ref_hat = naive_rq(f[b], q.codebook[0].detach(),
                                    steps, lambda i, h: q.phis[q.phi_of_step[i]](h) if n_phi else h)
        for got, want in zip(idxs, ref_idx):
            assert torch.equal(got[b], want)
        torch.testing.assert_close(zq[b].detach(), ref_hat.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(q.decode_steps([i[b:b + 1] for i in idxs], shape)[0].detach(), ref_hat.detach(),
                                   rtol=0, atol=1e-5)


def test_exact_reconstruction_when_the_codebook_holds_every_residual():
    """With identity phi and a codebook made of the residuals themselves (built step by step), every
    nearest code equals its residual and the contributions sum back to the features exactly."""
    torch.manual_seed(1)
    steps, H, W = (1, 2, 4), 4, 4
    f = torch.randn(1, 3, H, W, dtype=torch.float64)
    rest, codes = f[0].clone(), []
    for side in steps:
        r = naive_area(rest, side, side)
        codes.append(r.reshape(3, -1).t())
        up = F.interpolate(r[None], size=(H, W), mode='bicubic', align_corners=False)[0] if side < H else r
        rest = rest - up
    codebook = torch.cat(codes)
    q = MultiScaleRQ(3, len(codebook), steps, (1.0,), n_phi=0).eval().double()
    with torch.no_grad():
        q.codebook.copy_(codebook[None])
    zq, idxs, _, _ = q(f)                      # the quantizer works in float32: exact to its rounding
    torch.testing.assert_close(zq, f, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.decode_steps(idxs, (H, W)), f.float(), rtol=0, atol=1e-6)
    assert (q.decode_steps(idxs[:1], (H, W)) - f).abs().max().item() > 1e-3  # one step alone is not


def test_step_partition_paper_and_tiny():
    # the paper: steps 1-3 -> 128 px, 1-6 -> 256 px, 1-10 -> 512 px
    assert step_partition(PAPER_STEPS, SCALES) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    # the tiny config: 4 / 3 / 3
    assert step_partition(TINY_STEPS, SCALES) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert step_partition((1, 2, 4), (1.0,)) == [[0, 1, 2]]


@pytest.mark.parametrize('steps, scales, words', [
    ((1, 3, 2, 16), SCALES, 'strictly increasing'),
    ((1, 2, 4, 8, 12), SCALES, 'scale 0.25 needs'),     # 12 / 4 = 3 is not a side
    ((1, 2, 16), SCALES, 'scale 0.25 needs'),           # no step in (0, 4]
    ((1, 2, 4, 8, 16), (0.5, 0.25, 1.0), 'rq_scales'),
    ((1, 2, 4, 8, 16), (0.25, 0.5), 'rq_scales'),        # must end with 1
])
def test_bad_step_lists(steps, scales, words):
    with pytest.raises(ValueError, match=words):
        step_partition(steps, scales)


def small_tokenizer(**fields):
    args = tokenizer_args(patch=8, latent_dim=8, groups=1, codebook_size=32, enc_width=32, enc_depth=1,
                          enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, quantizer='msrq',
                          rq_steps=TINY_STEPS, rq_scales=SCALES, **fields)
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(**args)).eval()


def test_hierarchical_tokens_are_shared_across_scales():
    """Tokens of scale n are a prefix of those of scale n+1, and decode_steps(upto=n) decodes the
    image at s_n x size from that prefix alone."""
    tok = small_tokenizer()
    x = torch.rand(2, 3, 128, 128)
    full = tok.encode_hierarchical(x)
    assert [tuple(i.shape[-2:]) for i in full] == [(s, s) for s in TINY_STEPS]
    for n, n_steps in ((1, 4), (2, 7)):
        prefix = tok.encode_hierarchical(x, upto=n)
        assert len(prefix) == n_steps and all(torch.equal(a, b) for a, b in zip(prefix, full))
        img = tok.decode_steps(prefix, n)
        assert img.shape == (2, 3, 128 * SCALES[n - 1], 128 * SCALES[n - 1])
        assert torch.equal(img, tok.decode_steps(full, n))  # later tokens play no part
    # the first scale's tokens are the plain RQ of the encoder features of x at 1/4 size
    z = tok.encoder(F.interpolate(x, size=(32, 32), mode='bicubic', align_corners=False, antialias=True).clamp(0, 1))
    shapes = tok.quantizer.step_shapes(16, 16)
    idx, _, _ = tok.quantizer.quantize_steps(z, 0.0, range(4), shapes)
    assert all(torch.equal(a, b) for a, b in zip(idx, full[:4]))


@pytest.mark.parametrize('H, W', [(96, 160), (64, 64), (40, 24)])
def test_any_grid_side(H, W):
    tok = small_tokenizer()
    xrec, idxs, _, _ = tok(torch.rand(1, 3, H, W))
    h, w = H // 8, W // 8
    assert xrec.shape == (1, 3, H, W)
    assert [tuple(i.shape[-2:]) for i in idxs] == [(max(1, round(s * h / 16)), max(1, round(s * w / 16)))
                                                   for s in TINY_STEPS]
    assert tuple(idxs[-1].shape[-2:]) == (h, w)


def test_training_data_init_and_dead_code_restart():
    """Call 1 initialises the codes from the encoder vectors pooled to every step's side and counts
    the hits of all steps; with restart_every=1 exactly the codes no step chose are then re-seeded."""
    f = torch.randn(2, 4, 4, 4)
    make = lambda **kw: MultiScaleRQ(4, 64, (1, 2, 4), (1.0,), n_phi=1, **kw).train()
    torch.manual_seed(0)
    plain = make(restart_dead=False)
    torch.manual_seed(0)
    restart = make(restart_every=1)                     # the same initial weights
    torch.manual_seed(1)
    plain(f)
    pooled = torch.cat([F.adaptive_avg_pool2d(f, s).permute(0, 2, 3, 1).reshape(-1, 4) for s in (1, 2, 4)])
    d = torch.cdist(plain.codebook[0].detach(), pooled).min(1).values
    assert float(d.max()) < 0.1 * float(pooled.std())  # every code sits on one of those vectors
    assert float(plain.hits.sum()) == 2 * (1 + 4 + 16)  # every vector of every step counted once
    torch.manual_seed(1)
    restart(f)                                          # the same data init, then the restart
    changed = (restart.codebook[0] != plain.codebook[0]).any(1)
    assert torch.equal(changed, plain.hits[0] == 0) and 0 < int(changed.sum()) < 64


def test_config_rejects_bad_msrq_settings():
    with pytest.raises(ValueError, match='groups'):
        TokenizerConfig(**tokenizer_args(quantizer='msrq', groups=4, rq_steps=TINY_STEPS, rq_scales=SCALES))
    with pytest.raises(ValueError, match='quantizer'):
        TokenizerConfig(**tokenizer_args(quantizer='rq'))


# 128 px crops and the 10 steps of a 16 x 16 grid (config/hvar.py's tiny size is 64 px, 6 steps)
MSRQ = ['config/tiny.py', 'config/hvar.py', '--crop_size=128', '--rq_steps=(1,2,3,4,5,6,8,10,13,16)', '--patch=8',
        '--batch_size=2', *SMALL_TOK,
        '--codebook_size=16', '--max_minutes=0', '--threads=1', '--eval_interval=1000', '--log_interval=1',
        '--warmup_iters=2', '--vq_restart_every=2']


def test_plain_and_hierarchical_exact_resume(check_exact_resume, tmp_path, tiny_val):
    """Plain multi-scale RQ, then its hierarchical fine-tuning (init_from=PATH): each 2 + resume + 2
    steps bit-identical to 4 straight steps; the fine-tuning reports every scale."""
    args = MSRQ + [f'--val_dir={tiny_val}']
    log, _ = check_exact_resume('tokenizer.py', args, tmp_path / 'plain', 2, ('model',))
    assert 'r_psnr_y:' in log and 'x0.25_psnr_y:' in log and 'code_usage_all:' in log
    ft = args + ['--hierarchical=True', f'--init_from={tmp_path / "plain" / "straight" / "ckpt.pt"}',
                 '--l1_weight=0', '--l2_weight=1', '--lpips_weight=5', '--freeze_encoder=True']
    log, ckpt = check_exact_resume('tokenizer.py', ft, tmp_path / 'hier', 2, ('model',))
    assert 'fine-tuning' in log and 'x0.5_lpips:' in log
    init = torch.load(tmp_path / 'plain' / 'straight' / 'ckpt.pt', weights_only=False)['model']
    enc = [k for k in init if k.startswith('encoder.')]
    assert enc and all(torch.equal(init[k], ckpt['model'][k]) for k in enc)          # frozen
    assert not torch.equal(init['quantizer.codebook'], ckpt['model']['quantizer.codebook'])


@pytest.mark.parametrize('arg, words', [
    ('--rq_steps=(1,2,4,8,12)', 'last side must be the grid side'),   # grid 128/8 = 16
    ('--rq_steps=(2,1,4,8,16)', 'strictly increasing'),
    ('--rq_scales=(0.25,0.75,1.0)', 'scale 0.75 needs'),              # 0.75 x 16 = 12 is no step side
    ('--rq_scales=(0.125,0.5,1.0) --perceptual=alex', 'too small for LPIPS'),   # 16 px at 1/8 (VGG16: enough)
])
def test_bad_step_list_fails_before_training(run_script, arg, words):
    p = run_script('tokenizer.py', MSRQ + arg.split() + ['--max_iters=1', '--hierarchical=True'], check=False)
    assert p.returncode != 0 and words in p.stderr and 'config error' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and 'step ' not in p.stdout
