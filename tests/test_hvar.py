"""H-VAR's next-scale generator (docs/method.md#next-scale-generator): the KV cache against one
masked forward, the block-causal mask, the teacher-forcing inputs against the tokenizer's own
quantization, DPO against a hand computation, multi-scale tiling, and the scripts (generator.py
smoke run and exact resume, sr.py --scales, eval.py on the chain, one-line config errors)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import metrics
from conftest import LPIPS_TOL, SMALL_TOK, assert_images_close, psnr_tol_db, tokenizer_args
from model import (CLASS_BILINEAR, CLASS_DEGRADED, CLASS_FREE, NextScaleConfig, NextScaleGenerator, Tokenizer, TokenizerConfig,
                   hvar_condition, nearest_code, resize_image, rope_2d, rope_angles)
from losses import (calibrate_codebook_head, dpo_loss, flat_tokens, hvar_inputs, hvar_losses, msrq_tokens,
                    prefix_targets, sequence_logp)
from chain import fix_colors, hvar_super_resolve, load_sr_chain, scale_decodes
from chain import hvar_padding, tiled_sr
from common import to_uint8

STEPS, SCALES = (1, 2, 3, 4, 6, 8), (0.25, 0.5, 1.0)   # grid 8: x1 = steps 1-3 (side 2), x2 = 4 (4), x4 = 5-6


def tiny_chain(hierarchical=True, seed=0, head='linear'):
    """A random msrq tokenizer (patch 8, 64 px native, K 32) and a generator with weights large
    enough that every logit depends visibly on its inputs."""
    torch.manual_seed(seed)
    tok = Tokenizer(TokenizerConfig(**tokenizer_args(
        quantizer='msrq', groups=1, latent_dim=8, codebook_size=32, rq_steps=STEPS, rq_scales=SCALES, rq_phi=2,
        patch=8, enc_width=32, enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)))
    with torch.no_grad():
        tok.quantizer.codebook.normal_()
    gen = NextScaleGenerator(NextScaleConfig(
        patch=8, scale=4, latent_dim=8, codebook_size=32, rq_steps=STEPS, rq_scales=SCALES,
        hierarchical=hierarchical, scale_starts=True, head=head, width=32, depth=2, n_head=2, mlp_ratio=2.0,
        rope_base=100.0))
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 0.2)
    if head == 'codebook':
        gen.codes.tie_codebook(tok.quantizer.codebook)
    return tok.eval().requires_grad_(False), gen.eval()


def sizes():
    return [r * r for r in STEPS]


@pytest.mark.parametrize('hierarchical, cfg, head', [(True, 0.0, 'linear'), (False, 0.0, 'linear'),
                                                     (True, 1.5, 'linear'), (True, 0.0, 'codebook')])
def test_kv_cache_equals_one_masked_forward(hierarchical, cfg, head):
    """Step-by-step sampling with the KV cache gives the logits of one teacher-forced masked forward
    over the sequence it sampled (guided: (1 + cfg) l(c) - cfg l(null) of two such forwards), and
    sampling without the cache gives the same tokens and logits."""
    tok, gen = tiny_chain(hierarchical, head=head)
    lr, cls = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    _, conds = hvar_condition(tok, gen, lr)
    idxs, logits = gen.generate(tok.quantizer, conds, cls, cfg=cfg)
    idxs_nc, logits_nc = gen.generate(tok.quantizer, conds, cls, cfg=cfg, kv_cache=False)
    assert [i.shape[-1] for i in idxs] == list(STEPS)
    assert all(torch.equal(a, b) for a, b in zip(idxs, idxs_nc))
    with torch.no_grad():
        full = gen(conds, gen.step_inputs(tok.quantizer, conds, idxs), cls)            # (2, N, K)
        if cfg > 0:
            null = [torch.zeros_like(c) for c in conds]
            full = (1 + cfg) * full - cfg * gen(null, gen.step_inputs(tok.quantizer, null, idxs),
                                                torch.full_like(cls, CLASS_FREE))
    cached = torch.cat(logits, 1)
    assert cached.shape == full.shape == (2, sum(sizes()), 32)
    assert float((cached - full).abs().max()) < 1e-4 * float(full.abs().max())     # fp32 summation order only
    assert float((torch.cat(logits_nc, 1) - full).abs().max()) < 1e-4 * float(full.abs().max())
    assert torch.equal(flat_tokens(idxs), cached.argmax(-1))                        # top-1 of its own logits


def test_codebook_head_scores_codes_by_distance():
    """head='codebook': logits_k = -t ||r - e_k||^2 up to a per-token constant, r the head's output
    and e the tokenizer's codes; t starts at 1 / median nearest-code squared distance."""
    tok, gen = tiny_chain(head='codebook')
    e = tok.quantizer.codebook[0]
    assert torch.equal(gen.codes.codebook[0], e)
    d = torch.cdist(e, e).pow(2).fill_diagonal_(float('inf')).min(1).values
    tiny_chain_t = NextScaleGenerator(gen.config)
    tiny_chain_t.codes.tie_codebook(e)
    assert abs(tiny_chain_t.codes.log_t.item() + math.log(float(d.median()))) < 1e-5
    h, skip = torch.randn(2, 5, 32), torch.randn(2, 5, 8)
    with torch.no_grad():
        logits, r = gen.logits(h, skip), skip + e.pow(2).mean().sqrt() * gen.head(gen.norm(h))
    dist = -gen.codes.log_t.exp() * torch.cdist(r, e[None].expand(2, -1, -1)).pow(2)      # (2, 5, K)
    diff = logits - dist
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-3)
    assert torch.equal(logits.argmax(-1), dist.argmax(-1))
    # untrained (zero linear layer), the model predicts the LR's own residuals: the codes nearest to
    # area(cond) - in_i, i.e. for step 1 the nearest code of the pooled condition
    fresh = NextScaleGenerator(gen.config)
    fresh.codes.tie_codebook(e)
    cond, cls = torch.randn(1, 8, 8, 8), torch.zeros(1, dtype=torch.long)
    idxs, _ = fresh.generate(tok.quantizer, [cond[..., :2, :2], cond[..., :4, :4], cond], cls)
    assert int(idxs[0]) == int(nearest_code(cond[..., :2, :2].mean((2, 3)), e))   # step 1 starts from scale 1's


@pytest.mark.parametrize('hierarchical', [True, False])
def test_untrained_codebook_head_predicts_the_lrs_own_tokens(hierarchical):
    """head='codebook' untrained (zero linear layer; the codes tied as generator.py ties them): greedy
    sampling gives the LR's own tokens at every step, Algorithm 1's of the upsampled LR (each step starts
    from the LR's encoding at its target scale) or, for plain targets, the plain RQ's; teacher forcing on
    those tokens ranks them first too. Same process and shapes: equal tokens (a near-tie could differ
    by float summation order; none does here). Older checkpoints (no scale_starts) keep the full-size start."""
    tok, gen = tiny_chain(hierarchical, head='codebook')
    fresh = NextScaleGenerator(gen.config)
    fresh.codes.tie_codebook(tok.quantizer.codebook)
    lr, cls = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    up, conds = hvar_condition(tok, fresh, lr)
    assert [c.shape[-1] for c in conds] == ([2, 4, 8] if hierarchical else [8])
    want = tok.encode_hierarchical(up) if hierarchical else tok.encode(up)[1]
    idxs, _ = fresh.generate(tok.quantizer, conds, cls)
    for i, (a, b) in enumerate(zip(idxs, want)):
        assert torch.equal(a, b), (i, float((a == b).float().mean()))
    with torch.no_grad():
        forced = fresh(conds, fresh.step_inputs(tok.quantizer, conds, want), cls)
    assert torch.equal(forced.argmax(-1), flat_tokens(want))
    old = {k: v for k, v in fresh.model_args.items() if k != 'scale_starts'}
    assert NextScaleGenerator(NextScaleConfig.from_dict(old)).cond_scales == (1,)


def test_temperature_calibration_minimises_cross_entropy():
    """The codebook head's data init of t: the cross-entropy on the batch is no higher than before
    nor at the neighbouring grid values, and the ranking of the codes (argmax) does not change."""
    tok, gen = tiny_chain(head='codebook')
    x, cls = torch.rand(2, 3, 64, 64), torch.zeros(2, dtype=torch.long)
    lr = F.interpolate(x, scale_factor=0.25, mode='area')
    _, conds = hvar_condition(tok, gen, lr)
    z = msrq_tokens(tok, x, True)
    ins, t = gen.step_inputs(tok.quantizer, conds, z), flat_tokens(z)
    with torch.no_grad():
        top = gen(conds, ins, cls).argmax(-1)
    before, after = calibrate_codebook_head(gen, tok, None, x, lr)  # on the same batch
    ce = lambda: float(F.cross_entropy(gen(conds, ins, cls).flatten(0, 1), t.flatten()))
    with torch.no_grad():
        assert after <= before and abs(ce() - after) < 1e-4 and torch.equal(gen(conds, ins, cls).argmax(-1), top)
        best = float(gen.codes.log_t)
        for step in (-0.1, 0.1):
            gen.codes.log_t.fill_(best + step)
            assert ce() >= after - 1e-6


def test_mask_is_block_causal():
    """Changing the tokens of step i+1 changes no logit of steps <= i+1 (their inputs never see
    them) and changes step i+2's; the mask itself is 'key block <= query block'."""
    tok, gen = tiny_chain()
    cond, cls = [torch.randn(1, 8, 8, 8)], torch.zeros(1, dtype=torch.long)
    idxs = [torch.randint(32, (1, r, r)) for r in STEPS]
    ends = np.cumsum(sizes())
    for i in (0, 2, 3):                                   # within x1, at the x1 -> x2 grid change, within x4
        other = [x.clone() for x in idxs]
        other[i + 1] = (other[i + 1] + 1) % 32
        with torch.no_grad():
            a = gen(cond, gen.step_inputs(tok.quantizer, cond, idxs), cls)
            b = gen(cond, gen.step_inputs(tok.quantizer, cond, other), cls)
        assert torch.equal(a[:, :ends[i + 1]], b[:, :ends[i + 1]]), i
        assert not torch.allclose(a[:, ends[i + 1]:ends[i + 2]], b[:, ends[i + 1]:ends[i + 2]]), i
    block = torch.repeat_interleave(torch.arange(len(STEPS) + 1), torch.tensor([64] + sizes()))
    naive = torch.tensor([[int(block[k]) <= int(block[q]) for k in range(len(block))] for q in range(len(block))])
    assert torch.equal(gen.mask, naive)


def test_rope_positions_on_the_full_grid():
    """The condition sits at the integer cells of the 8x8 grid (rope_2d's angles); step 1's single
    cell at the grid centre (3.5, 3.5); step 2's four cells at 1.5 and 5.5."""
    _, gen = tiny_chain()
    cos, sin = rope_2d(8, 8, 16, 100.0)
    assert torch.equal(gen.rope_cos[:64], cos) and torch.equal(gen.rope_sin[:64], sin)
    c, s = rope_angles(torch.tensor([3.5, 1.5, 1.5, 5.5, 5.5], dtype=torch.float64),
                       torch.tensor([3.5, 1.5, 5.5, 1.5, 5.5], dtype=torch.float64), 16, 100.0)
    assert torch.allclose(gen.rope_cos[64:69], c) and torch.allclose(gen.rope_sin[64:69], s)


@pytest.mark.parametrize('hierarchical', [True, False])
def test_step_inputs_reproduce_the_tokenizers_choices(hierarchical):
    """Teacher forcing sees what the tokenizer saw: the tokenizer chose step i's tokens as the nearest
    codes of area(z_n - F_i), with z_n the encoder features at step i's scale (full size for plain
    tokens) and F_i the contributions of steps < i; the generator's input is area(F_i). So the
    nearest codes of area(z_n) - input_i are the tokens themselves."""
    tok, gen = tiny_chain(hierarchical)
    x = torch.rand(2, 3, 64, 64)
    idxs = msrq_tokens(tok, x, hierarchical)
    ins = gen.step_inputs(tok.quantizer, [torch.randn(2, 8, 8, 8)], idxs)
    scale_of = {i: n for n, part in enumerate(tok.quantizer.partition) for i in part}
    agree, total = 0, 0
    for i in range(1, len(STEPS)):
        z = tok.encoder(resize_image(x, SCALES[scale_of[i]] if hierarchical else 1.0))
        r = F.adaptive_avg_pool2d(z, (STEPS[i], STEPS[i])) - ins[i]
        near = nearest_code(r.permute(0, 2, 3, 1).reshape(-1, 8), tok.quantizer.codebook[0])
        agree += int((near == idxs[i].flatten()).sum())
        total += near.numel()
    assert agree == total, (agree, total)   # (accumulating on the wrong grid agrees on ~96% only)


@pytest.mark.parametrize('hierarchical', [True, False])
def test_self_correction_targets(hierarchical):
    """prefix_targets: with HR's own tokens as the prefix it gives them back (Algorithm 1 is its greedy
    rule); with another prefix, step i's target is the nearest code of area(z_n) - input_i, the input
    the generator gets from that prefix (step_inputs); hvar_losses with own_B trains those samples on
    the generator's own top-1 prefix and these targets, the others as before."""
    tok, gen = tiny_chain(hierarchical)
    hr, lr, cls = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 16, 16), torch.tensor([0, 0])
    z_hr = msrq_tokens(tok, hr, hierarchical)
    same = prefix_targets(tok, hr, z_hr, hierarchical)
    assert all(torch.equal(a, b) for a, b in zip(same, z_hr))
    _, conds = hvar_condition(tok, gen, lr)
    own, _ = gen.generate(tok.quantizer, conds, cls)                                  # the generator's top-1
    assert sum(int((a != b).sum()) for a, b in zip(own, z_hr)) > 50                   # a different prefix
    got = prefix_targets(tok, hr, own, hierarchical)
    ins = gen.step_inputs(tok.quantizer, conds, own)
    scale_of = {i: n for n, part in enumerate(tok.quantizer.partition) for i in part}
    for i in range(len(STEPS)):
        z = tok.encoder(resize_image(hr, SCALES[scale_of[i]] if hierarchical else 1.0))
        r = F.adaptive_avg_pool2d(z, (STEPS[i], STEPS[i])) - (ins[i] if i else 0)
        want = nearest_code(r.permute(0, 2, 3, 1).reshape(-1, 8), tok.quantizer.codebook[0]).view(2, STEPS[i], STEPS[i])
        assert torch.equal(got[i], want), i
    assert not all(torch.equal(a, b) for a, b in zip(got, z_hr))
    # the loss: sample 0 on its own prefix and these targets, sample 1 teacher-forced on HR's tokens
    s = dict(dpo=False, dpo_beta=0.2, ce_weight=1.0, dpo_weight=1.0)
    _, parts, _ = hvar_losses(tok, gen, hr, lr, cls, **s, own_B=torch.tensor([True, False]))
    mix = lambda a, b: [torch.cat([x[:1], y[1:]]) for x, y in zip(a, b)]
    with torch.no_grad():
        logits = gen(conds, gen.step_inputs(tok.quantizer, conds, mix(own, z_hr)), cls)
    want_ce = F.cross_entropy(logits.flatten(0, 1), flat_tokens(mix(got, z_hr)).flatten())
    assert abs(parts['ce'].item() - want_ce.item()) < 1e-5
    _, parts0, _ = hvar_losses(tok, gen, hr, lr, cls, **s, own_B=torch.tensor([False, False]))
    _, parts1, _ = hvar_losses(tok, gen, hr, lr, cls, **s)
    assert parts0['ce'].item() == parts1['ce'].item() != parts['ce'].item()


def test_input_classes_and_the_bilinear_lr():
    """hvar_inputs: class 1 carries HR's antialiased bilinear downsample (by hand: the x1/4 tent of
    radius 4 px around each output pixel's centre, cut at the border and renormalised, as PIL does),
    class 0 its own LR, class 2 (free_frac, guidance_drop) either of them; the fractions are the
    settings' (B = 4000: 3 binomial sigmas)."""
    torch.manual_seed(0)
    B = 4000
    hr, lr = torch.rand(B, 3, 8, 8), torch.rand(B, 3, 2, 2)
    out, cls, drop, own = hvar_inputs(hr, lr, bilinear_frac=0.25, free_frac=0.1, guidance_drop=0.05, self_correct=0.3)
    x = torch.arange(8) + 0.5                                          # HR pixel centres
    M = (1 - (x[None] - torch.tensor([[2.0], [6.0]])).abs() / 4).clamp_min(0)   # (2, 8): output centres 2, 6
    M = M / M.sum(1, keepdim=True)
    by_hand = M @ hr @ M.T                                             # (B, 3, 2, 2)
    is_bil = (out - by_hand).abs().amax((1, 2, 3)) < 1e-5
    is_own = (out == lr).flatten(1).all(1)
    assert is_bil[cls == CLASS_BILINEAR].all() and is_own[cls == CLASS_DEGRADED].all()
    assert (is_bil ^ is_own).all()                                     # class 2: either kind, as drawn
    assert abs(is_bil.float().mean() - 0.25) < 3 * math.sqrt(0.25 * 0.75 / B)
    for frac, sel in ((0.05, drop), (0.3, own)):
        assert abs(sel.float().mean() - frac) < 3 * math.sqrt(frac * (1 - frac) / B)
    assert (cls[drop] == CLASS_FREE).all()
    p_free = 1 - 0.9 * 0.95                                           # free_frac or guidance_drop
    for c, p in ((CLASS_FREE, p_free), (CLASS_BILINEAR, 0.25 * (1 - p_free)), (CLASS_DEGRADED, 0.75 * (1 - p_free))):
        assert abs((cls == c).float().mean() - p) < 3 * math.sqrt(p * (1 - p) / B)
    assert hvar_inputs(hr[:4], lr[:4], 0.1, 0.1, 0.0)[3] is None      # no self-correction: no draw


def test_dpo_against_hand_computation_and_its_gradient():
    """Toy sequences of 2 tokens over K=3: log p by hand, L = -log sigmoid(beta (lp_HR - lp_LR));
    a gradient step on the logits raises log p(z_HR) and lowers log p(z_LR)."""
    o_hr = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]], requires_grad=True)    # (1, 2, 3)
    o_lr = torch.tensor([[[1.0, 1.0, 1.0], [3.0, -2.0, 0.5]]], requires_grad=True)
    z_hr, z_lr = torch.tensor([[1, 2]]), torch.tensor([[0, 0]])
    lsm = lambda o, k: o[k] - math.log(sum(math.exp(v) for v in o))
    hand_hr = lsm([2.0, 0.5, -1.0], 1) + lsm([0.0, 1.0, 0.0], 2)
    hand_lr = lsm([1.0, 1.0, 1.0], 0) + lsm([3.0, -2.0, 0.5], 0)
    lp_hr, lp_lr = sequence_logp(o_hr, z_hr), sequence_logp(o_lr, z_lr)
    assert abs(lp_hr.item() - hand_hr) < 1e-5 and abs(lp_lr.item() - hand_lr) < 1e-5
    loss = dpo_loss(lp_hr, lp_lr, 0.2)
    hand = -math.log(1 / (1 + math.exp(-0.2 * (hand_hr - hand_lr))))
    assert abs(loss.item() - hand) < 1e-5
    loss.backward()
    with torch.no_grad():
        new_hr, new_lr = sequence_logp(o_hr - 0.5 * o_hr.grad, z_hr), sequence_logp(o_lr - 0.5 * o_lr.grad, z_lr)
    assert new_hr.item() > lp_hr.item() and new_lr.item() < lp_lr.item()
    assert dpo_loss(new_hr, new_lr, 0.2).item() < loss.item()


def test_losses_ce_plus_dpo_and_ablation():
    """hvar_losses: CE is the mean token NLL of z_HR; with DPO the second sequence is z_LR, the
    tokens of the bilinearly upsampled LR; without, dpo is 0 and the loss is CE alone."""
    tok, gen = tiny_chain()
    gen.train()
    hr, lr, cls = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    s = dict(dpo=True, dpo_beta=0.2, ce_weight=1.0, dpo_weight=1.0)
    loss, parts, acc = hvar_losses(tok, gen, hr, lr, cls, **s)
    up, conds = hvar_condition(tok, gen, lr)
    _, dropped = hvar_condition(tok, gen, lr, torch.tensor([False, True]))     # guidance dropout: zero conditions
    assert torch.equal(dropped[-1][0], conds[-1][0]) and not dropped[-1][1].any() and conds[-1][1].any()
    z_hr, z_lr = msrq_tokens(tok, hr, True), msrq_tokens(tok, up, True)
    with torch.no_grad():
        l_hr = gen(conds, gen.step_inputs(tok.quantizer, conds, z_hr), cls)
        l_lr = gen(conds, gen.step_inputs(tok.quantizer, conds, z_lr), cls)
    lp_hr, lp_lr = sequence_logp(l_hr, flat_tokens(z_hr)), sequence_logp(l_lr, flat_tokens(z_lr))
    assert abs(parts['ce'].item() + lp_hr.mean().item() / sum(sizes())) < 1e-4
    # DPO counts the degraded sample (class 0) only; the null-class one (2) has no preference
    assert abs(parts['dpo'].item() - dpo_loss(lp_hr[:1], lp_lr[:1], 0.2).item()) < 1e-4
    assert abs(loss.item() - (parts['ce'] + parts['dpo']).item()) < 1e-5 and acc.shape == (len(STEPS),)
    loss2, parts2, _ = hvar_losses(tok, gen, hr, lr, cls, **dict(s, dpo=False))
    assert parts2['dpo'].item() == 0 and abs(loss2.item() - parts['ce'].item()) < 1e-5
    # per-token log-likelihoods: the sums divided by the sequence length
    _, parts3, _ = hvar_losses(tok, gen, hr, lr, cls, **s, dpo_reduce='mean')
    n = sum(sizes())
    assert abs(parts3['dpo'].item() - dpo_loss(lp_hr[:1] / n, lp_lr[:1] / n, 0.2).item()) < 1e-5
    # against a frozen copy of itself every log-ratio is 0: -log sigmoid(0) = log 2, and no gradient to the copy
    ref = copy.deepcopy(gen).requires_grad_(False)
    loss4, parts4, _ = hvar_losses(tok, gen, hr, lr, cls, **s, reference=ref)
    assert abs(parts4['dpo'].item() - math.log(2)) < 1e-5 and abs(parts4['logp_gap'].item()) < 1e-4
    loss4.backward()
    assert all(p.grad is None for p in ref.parameters()) and any(p.grad is not None for p in gen.parameters())


def test_code_regression_by_hand():
    """reg_weight (codebook head): untrained, the regressed residual is the skip (the LR's residual of each
    step), so the term is the mean of ||skip - e_z||^2 / (C s^2) over HR's tokens z, made here from
    generator.skips and the tokenizer's codebook; the loss adds reg_weight times it, with DPO or without."""
    tok, gen = tiny_chain(head='codebook')
    fresh = NextScaleGenerator(gen.config)
    fresh.codes.tie_codebook(tok.quantizer.codebook)
    hr, lr, cls = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 16, 16), torch.tensor([0, 0])
    _, conds = hvar_condition(tok, fresh, lr)
    z_hr = msrq_tokens(tok, hr, True)
    skip = fresh.skips(conds, fresh.step_inputs(tok.quantizer, conds, z_hr))        # (2, 130, 8)
    e = tok.quantizer.codebook[0][flat_tokens(z_hr)]                                 # (2, 130, 8)
    want = ((skip - e) ** 2).sum(-1).mean() / (8 * tok.quantizer.codebook.pow(2).mean())
    for dpo in (False, True):
        s = dict(dpo=dpo, dpo_beta=0.2, ce_weight=1.0, dpo_weight=1.0)
        loss0, parts0, _ = hvar_losses(tok, fresh, hr, lr, cls, **s)
        loss, parts, _ = hvar_losses(tok, fresh, hr, lr, cls, **s, reg_weight=0.5)
        assert abs(parts['reg'].item() - want.item()) < 1e-4 * want.item(), (parts['reg'].item(), want.item())
        assert abs(loss.item() - loss0.item() - 0.5 * want.item()) < 1e-4 and parts0['reg'].item() == 0


def test_pixel_terms_decode_the_predicted_tokens():
    """l1_weight / lpips_weight: the terms score the decoder's image of the teacher-forced top-1 tokens
    of every step, made here by hand as sr.py decodes tokens (each step's codes looked up, phi of their
    bicubic upsampling summed on the full grid, the decoder); the loss adds the weighted terms, and
    their gradient reaches the generator through the frozen decoder (straight through the one-hot)."""
    tok, gen = tiny_chain(head='codebook')
    gen.train()
    hr, lr, cls = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    _, conds = hvar_condition(tok, gen, lr)
    z_hr = msrq_tokens(tok, hr, True)
    with torch.no_grad():
        top1 = gen(conds, gen.step_inputs(tok.quantizer, conds, z_hr), cls).argmax(-1)     # (2, 130)
        idxs = [t.unflatten(1, (n, n)) for t, n in zip(top1.split(sizes(), 1), STEPS)]
        sr = sum(tok.quantizer.phis[tok.quantizer.phi_of_step[i]](F.interpolate(
            tok.quantizer.codebook[0][idx].permute(0, 3, 1, 2), size=(8, 8), mode='bicubic', align_corners=False))
            if idx.shape[-1] != 8 else tok.quantizer.phis[tok.quantizer.phi_of_step[i]](
                tok.quantizer.codebook[0][idx].permute(0, 3, 1, 2)) for i, idx in enumerate(idxs))
        sr = tok.decoder(sr)
    dist = lambda x, y: (x - y).pow(2).mean(dim=(1, 2, 3))                    # a stand-in perceptual distance
    s = dict(dpo=False, dpo_beta=0.2, ce_weight=1.0, dpo_weight=0.0)
    loss0, parts0, _ = hvar_losses(tok, gen, hr, lr, cls, **s)
    loss, parts, _ = hvar_losses(tok, gen, hr, lr, cls, **s, l1_weight=0.5, lpips_weight=2.0, lpips_fn=dist)
    want_l1, want_lp = (sr - hr).abs().mean().item(), dist(sr, hr).mean().item()
    assert abs(parts['l1'].item() - want_l1) < 1e-5 and abs(parts['lpips'].item() - want_lp) < 1e-5
    assert abs(loss.item() - loss0.item() - 0.5 * want_l1 - 2.0 * want_lp) < 1e-5
    assert parts0['l1'].item() == parts0['lpips'].item() == 0
    gen.zero_grad()
    (parts['l1'] + parts['lpips']).backward()                               # the pixel terms alone
    assert sum(float(p.grad.abs().sum()) for p in gen.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in tok.parameters())


def test_multiscale_tiling_equals_one_scale_at_a_time():
    """tiled_sr with scales (1, 2, 4) and a multi-output fn blends each output exactly as a separate
    single-scale run would; min_size pads a small image up to it."""
    f = lambda x: [x.clone(), F.interpolate(x, scale_factor=2, mode='bilinear'), F.interpolate(x, scale_factor=4)]
    lr = torch.rand(1, 3, 40, 52)
    outs = tiled_sr(lr, f, (1, 2, 4), tile=16, overlap=4, min_size=16)
    for k, s in enumerate((1, 2, 4)):
        one = tiled_sr(lr, lambda x: f(x)[k], s, tile=16, overlap=4)  # same process, tiles, ops: same bits
        assert outs[k].shape == (1, 40 * s, 52 * s, 3) and np.array_equal(outs[k], one), s
    seen = []
    small = tiled_sr(torch.rand(1, 3, 10, 12), lambda x: seen.append(x.shape) or f(x), (1, 2, 4), tile=16,
                     overlap=4, min_size=16)
    assert seen == [(1, 3, 16, 16)] and [o.shape[1:3] for o in small] == [(10, 12), (20, 24), (40, 48)]


def test_super_resolve_gives_each_scale_from_one_sequence():
    """x1, x2, x4 decode the prefixes of one token sequence: decode n uses the steps of scales 1..n."""
    tok, gen = tiny_chain()
    lr = torch.rand(2, 3, 16, 16)
    outs, idxs = hvar_super_resolve(lr, tok, gen, return_indices=True)
    assert [o.shape[-1] for o in outs] == [16, 32, 64]
    for n, o in enumerate(outs):
        assert torch.equal(o, tok.decode_steps(idxs, n + 1).float().clamp(0, 1))
    for bad in (torch.rand(1, 3, 16, 12), torch.rand(1, 3, 20, 16)):   # below the native 16, not whole cells of 8
        with pytest.raises(ValueError, match='at least 16x16 .* multiples of 8'):
            hvar_super_resolve(bad, tok, gen)


def tile_latents(tok, gen, tile):
    """One native tile (1, 3, 16, 16) alone -> its latent map at each scale [(C, g, g)], g = 2, 4, 8."""
    _, idxs = hvar_super_resolve(tile, tok, gen, return_indices=True)
    q = tok.quantizer
    return [q.decode_steps(idxs[:q.partition[n][-1] + 1], (g, g))[0] for n, g in enumerate((2, 4, 8))]


def test_tiles_are_stitched_in_latent_space():
    """A larger image: each native tile's tokens are those of the tile alone, and one decode sees
    their latent maps side by side (overlap 0) or, where two tiles overlap by 8 LR pixels, blended
    with linear weights (hand-written here) over the 1 / 2 / 4 shared cells of x1 / x2 / x4."""
    tok, gen = tiny_chain(head='codebook')
    lr = torch.rand(2, 3, 32, 32)
    outs = hvar_super_resolve(lr, tok, gen, overlap=0)
    for b in range(2):
        z = [[tile_latents(tok, gen, lr[b:b + 1, :, y:y + 16, x:x + 16]) for x in (0, 16)] for y in (0, 16)]
        for n in range(3):
            whole = torch.cat([torch.cat([z[r][c][n] for c in (0, 1)], -1) for r in (0, 1)], -2)  # (C, 2g, 2g)
            want = tok.decoder(whole[None]).float().clamp(0, 1)
            assert outs[n].shape == (2, 3, 32 * 2 ** n, 32 * 2 ** n)
            assert torch.allclose(outs[n][b:b + 1], want, atol=1e-5), (b, n)
    # 16 x 24: tiles at x = 0 and 8, sharing LR columns 8-15
    lr = torch.rand(1, 3, 16, 24)
    outs = hvar_super_resolve(lr, tok, gen, overlap=8)
    a, c = tile_latents(tok, gen, lr[..., :16]), tile_latents(tok, gen, lr[..., 8:])
    ramps = {1: [0.5], 2: [0.25, 0.75], 4: [0.125, 0.375, 0.625, 0.875]}  # the right tile's weight per shared cell
    for n, g in enumerate((2, 4, 8)):
        o = g // 2
        w = torch.tensor(ramps[o])
        shared = a[n][..., g - o:] * (1 - w) + c[n][..., :o] * w
        whole = torch.cat([a[n][..., :g - o], shared, c[n][..., o:]], -1)   # (C, g, 3g / 2)
        want = tok.decoder(whole[None]).float().clamp(0, 1)
        assert outs[n].shape == want.shape and torch.allclose(outs[n], want, atol=1e-5), n
    # any size through sr.py's tiling: padded to whole cells of 8 LR px and at least 16, cropped back
    for h, w in ((37, 50), (9, 12)):
        lr = torch.rand(1, 3, h, w)
        outs = tiled_sr(lr, lambda y: hvar_super_resolve(y, tok, gen), (1, 2, 4), tile=64, overlap=16,
                        **hvar_padding(gen))
        padded = F.pad(lr, (0, max(-w % 8, 16 - w), 0, max(-h % 8, 16 - h)), mode='reflect')
        for o, r, f in zip(outs, hvar_super_resolve(padded, tok, gen), (1, 2, 4)):
            assert o.shape == (1, f * h, f * w, 3) and np.array_equal(o, to_uint8(r[..., :f * h, :f * w])), (h, w, f)


# ----------------------------------------------------------------------------- the scripts

MSRQ = ['config/tiny.py', 'config/hvar.py', '--patch=8', '--batch_size=2', *SMALL_TOK,
        '--codebook_size=16', '--max_minutes=0', '--threads=1', '--eval_interval=1000', '--max_iters=2']
HVAR = ['config/tiny.py', 'config/hvar.py', '--batch_size=2', '--width=32', '--depth=1',
        '--n_head=2', '--max_minutes=0', '--threads=1', '--log_interval=1', '--warmup_iters=2',
        '--bilinear_frac=0.25', '--free_frac=0.25', '--guidance_drop=0.25', '--dpo=True',
        '--self_correct=0.5']   # with config/hvar.py's reg_weight


@pytest.fixture(scope='module')
def hrq_tok(run_script, tiny_val, tmp_path_factory):
    out = tmp_path_factory.mktemp('hrq')
    run_script('tokenizer.py', MSRQ + [f'--val_dir={tiny_val}', f'--out_dir={out}'])
    return out / 'ckpt.pt'


def test_generator_smoke_exact_resume_sr_and_eval(run_script, check_exact_resume, hrq_tok, tiny_val, tiny_gen,
                                                  tmp_path):
    args = HVAR + [f'--tok_ckpt={hrq_tok}', f'--val_dir={tiny_val}']
    out, a = check_exact_resume('generator.py', args, tmp_path, 2, ('generator',))
    for key in ('x1_psnr_y:', 'x2_lpips:', 'x4_lpips:', 'x1_bicubic_lpips:', 'token_acc_s3:', 'val_logp_gap:'):
        assert key in out, key
    assert all(k in out.split('step 1 |')[1].split('\n')[0] for k in ('dpo ', 'reg ', 'acc_s1'))
    assert a['method'] == 'hvar' and 'disc' not in a and 'prior_lora' not in a
    for f in ('log.txt', 'curves.png', 'summary.json', 'samples_000004.png'):
        assert (tmp_path / 'straight' / f).is_file(), f
    # sr.py --scales on a folder: NAME_x1 / x2 / x4, the chain's own pass on these 64 px LR images
    # (one tile of sr.py's default 64; native 16 px tiles stitched inside it, as the run's evaluation);
    # sr.py is another process (torch's default thread count), so equal up to float noise: 1 grey
    # level on a few pixels (conftest)
    ckpt, sr_out = tmp_path / 'straight' / 'ckpt.pt', tmp_path / 'sr'
    p = run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={ckpt}', f'--out_dir={sr_out}', '--scales=1,2,4',
                             '--color_fix=0'])
    pairs = data.load_val_pairs(str(tiny_val))
    tok, gen, _ = load_sr_chain(ckpt)
    ref = [to_uint8(o) for o in hvar_super_resolve(pairs['lr'], tok, gen)]
    for k, s in enumerate((1, 2, 4)):
        for i, name in enumerate(pairs['names']):
            img = (data.load_image(str(sr_out / f'{name}_x{s}.png')) * 255).round().byte().permute(1, 2, 0)
            assert img.shape == (64 * s, 64 * s, 3), (name, s)
            assert_images_close(img.numpy(), ref[k][i], what=f'sr.py {name}_x{s}.png vs the chain in this process')
    assert 'done: 2 written' in p.stdout
    # windows of 32 LR px (two per side), each stitched from native tiles inside, blended in pixels
    p = run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={ckpt}', f'--out_dir={tmp_path / "sr32"}',
                             '--scales=4', '--color_fix=0', '--tile=32', '--overlap=8'])
    ref = tiled_sr(pairs['lr'], lambda y: hvar_super_resolve(y, tok, gen), (1, 2, 4), tile=32, overlap=8,
                   multiple=8, min_size=16)[2]
    for i, name in enumerate(pairs['names']):
        img = (data.load_image(str(tmp_path / 'sr32' / f'{name}_x4.png')) * 255).round().byte().permute(1, 2, 0)
        assert_images_close(img.numpy(), ref[i], what=f'sr.py --tile=32 {name}_x4.png vs the chain in this process')
    p = run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={ckpt}', f'--out_dir={tmp_path / "sr8"}',
                             '--tile=8', '--overlap=0'], check=False)
    assert p.returncode != 0 and 'tile=8 is below the H-VAR generator' in p.stderr, p.stderr
    # eval.py scores the same chain per scale; x4 equals the run's final evaluation (another process:
    # LPIPS_TOL); the last row is sr.py's output, x4 with its default colour correction (2 LR px)
    js = tmp_path / 'eval.json'
    p = run_script('eval.py', ['--sr=chain', f'--gen_ckpt={ckpt}', f'--val_dir={tiny_val}', f'--compare_ckpt={tiny_gen}',
                               f'--out_json={js}', '--report=none'])
    rows = json.loads(js.read_text())['rows']
    assert [r['name'] for r in rows[-3:]] == [
        'x4: H-VAR generator (top-1)',
        f'x4: {tiny_gen} (stage 2: generator + stage-1 decoder + colour correction (2 LR px))',  # HiTokSR's beside
        'x4: H-VAR generator (top-1) + colour correction (2 LR px)']
    assert 'x1: degraded LR itself' in p.stdout and 'x2: H-VAR generator (top-1)' in p.stdout
    assert abs(rows[-3]['lpips'] - a['metrics']['x4_lpips']) < LPIPS_TOL, (rows[-3]['lpips'], a['metrics']['x4_lpips'])
    x4 = torch.from_numpy(to_uint8(hvar_super_resolve(pairs['lr'], tok, gen)[2])).permute(0, 3, 1, 2).float() / 255
    fixed = fix_colors(x4, pairs['lr'], 2 * 4)  # on the 8-bit images, as sr.py writes them
    psnr = metrics.evaluate(fixed, pairs['hr'], crop_border=4, lpips_net=False)['psnr_y']
    assert rows[-1]['psnr_y'] == pytest.approx(psnr, abs=psnr_tol_db(psnr))
    assert abs(rows[-1]['psnr_y'] - rows[-3]['psnr_y']) > 1e-3  # the correction changed the images
    # each scale's output also scored against the tokenizer's decode of HR's own tokens at that scale
    decodes = scale_decodes(tok, pairs['hr'], 'hierarchical' if gen.config.hierarchical else 'plain')[0]
    by_name = {r['name']: r for r in rows}
    for (s, dec, _), out in zip(decodes, hvar_super_resolve(pairs['lr'], tok, gen)):
        f = round(4 * s)
        r = by_name[f"x{f}: H-VAR generator (top-1) against the decode of HR's tokens"]
        psnr = metrics.evaluate(out, dec, crop_border=max(1, f), lpips_net=False)['psnr_y']
        assert r['psnr_y'] == pytest.approx(psnr, abs=psnr_tol_db(psnr)), f
        assert abs(r['psnr_y'] - by_name[f'x{f}: H-VAR generator (top-1)']['psnr_y']) > 1e-3, f  # not HR's score


@pytest.mark.parametrize('arg, words', [
    ('--crop_size=128', 'native size'),
    ('--bilinear_frac=0.5', 'bilinear_frac=0.5 must be in [0, 0.25]'),
    ('--method=hitoksr', "unknown config key 'method'"),  # the tokenizer decides the method
    ('--reg_weight=1 --head=linear', "0 unless head='codebook'"),
    ('--self_correct=1.5', 'self_correct=1.5 must be in [0, 1]'),
    ('--ce_weight=0 --reg_weight=0 --dpo=False', 'nothing would train the H-VAR generator'),
])
def test_config_errors_are_one_line(run_script, hrq_tok, tiny_val, tmp_path, arg, words):
    p = run_script('generator.py', HVAR + [f'--tok_ckpt={hrq_tok}', f'--val_dir={tiny_val}', f'--out_dir={tmp_path}',
                                           '--max_iters=1', *arg.split()], check=False)
    assert p.returncode != 0 and words in p.stderr and 'config error' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and 'step ' not in p.stdout


def test_sr_scales_refused_for_a_one_scale_chain(run_script, tiny_gen, tiny_val, tmp_path):
    p = run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path}',
                             '--scales=1,2,4'], check=False)
    assert p.returncode != 0 and 'yields the factors (4,)' in p.stderr and 'Traceback' not in p.stderr
