"""Stage-1 model code checked against independent references (naive loops, complex arithmetic,
hand computations). CPU, small tensors."""
import math
import os
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import count_params, flops_per_image, param_groups
from conftest import tokenizer_args
from model import (Attention, Block, GroupedVQ, RMSNorm, SwiGLU, Tokenizer, TokenizerConfig, ViTDecoder,
                   ViTEncoder, apply_rope, mask_groups, rope_2d)
from losses import (PatchDiscriminator, adaptive_gan_weight, g_loss_hinge, g_loss_vanilla, hinge_d_loss,
                    sample_active_groups, usage_stats, vanilla_d_loss)

TINY = tokenizer_args(patch=4, latent_dim=8, groups=4, codebook_size=16, enc_width=32, enc_depth=1,
                      enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)

# ----------------------------------------------------------------------------- grouped VQ

def naive_quantize(z, codebook):
    """Per-vector Python loop: z (B, C, h, w), codebook (G, K, d) -> idx (B, G, h, w), zhat."""
    B, C, h, w = z.shape
    G, K, d = codebook.shape
    idx = torch.zeros(B, G, h, w, dtype=torch.long)
    zhat = torch.zeros_like(z)
    for b in range(B):
        for g in range(G):
            for i in range(h):
                for j in range(w):
                    v = z[b, g * d:(g + 1) * d, i, j].double()
                    dists = [((v - codebook[g, k].double()) ** 2).sum().item() for k in range(K)]
                    q = min(range(K), key=lambda k: dists[k])
                    idx[b, g, i, j] = q
                    zhat[b, g * d:(g + 1) * d, i, j] = codebook[g, q]
    return idx, zhat


def plain_vq(C=16, G=4, K=10, beta=0.25):
    return GroupedVQ(C, G, K, beta=beta, data_init=False, restart_dead=False)


def test_vq_matches_naive_loop():
    torch.manual_seed(0)
    vq = plain_vq()
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 16, 3, 5)
    zq, idx, commit, stats = vq(z)
    ref_idx, ref_zhat = naive_quantize(z, vq.codebook.detach())
    assert idx.shape == (2, 4, 3, 5) and idx.dtype == torch.long
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(zq, ref_zhat)
    torch.testing.assert_close(vq.lookup(idx), ref_zhat)
    onehot = F.one_hot(idx, 10).float()  # (B, G, h, w, K)
    torch.testing.assert_close(vq.codes_from_onehot(onehot), ref_zhat)
    # commit = sum_g (1 + beta) * mean over group elements of (z - zhat)^2 (both terms equal in value)
    ref = sum((1.25 * (z[:, g * 4:(g + 1) * 4] - ref_zhat[:, g * 4:(g + 1) * 4]) ** 2).mean() for g in range(4))
    torch.testing.assert_close(commit, ref)
    # stats against counting by hand
    for g in range(4):
        used = set(idx[:, g].flatten().tolist())
        assert stats['util'][g].item() == pytest.approx(len(used) / 10)
        p = torch.bincount(idx[:, g].flatten(), minlength=10).double() / idx[:, g].numel()
        ent = -sum(pi * math.log(pi) for pi in p.tolist() if pi > 0)
        assert stats['perplexity'][g].item() == pytest.approx(math.exp(ent), rel=1e-5)
    assert usage_stats(idx, 10)['util'].shape == (4,)


def test_vq_groups_use_only_their_codebook():
    torch.manual_seed(1)
    vq = plain_vq()
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 16, 4, 4)
    zq0, idx0, _, _ = vq(z)
    with torch.no_grad():
        vq.codebook[2] = torch.randn(10, 4) * 3
    zq1, idx1, _, _ = vq(z)
    changed = (idx0 != idx1).flatten(2).any(-1).any(0)  # (G,)
    assert changed.tolist() == [False, False, True, False]
    assert torch.equal(zq0[:, :8], zq1[:, :8]) and torch.equal(zq0[:, 12:], zq1[:, 12:])
    assert not torch.equal(zq0[:, 8:12], zq1[:, 8:12])


def test_vq_straight_through_and_commit_gradients():
    torch.manual_seed(2)
    vq = plain_vq(beta=0.25)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    zq, idx, commit, _ = vq(z)
    up = torch.randn_like(zq)
    (zq * up).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, up)  # STE: identity gradient
    assert vq.codebook.grad is None  # the decoder path does not train the codebook
    z.grad = None
    commit.backward()
    zhat = vq.lookup(idx).detach()
    n_group = 2 * 4 * 3 * 3
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - zhat).detach() / n_group)  # beta term only
    # codebook grad: code k of group g gets sum over its assigned vectors of 2 (e - z) / n_group
    ref = torch.zeros_like(vq.codebook)
    for b in range(2):
        for g in range(4):
            for i in range(3):
                for j in range(3):
                    k = idx[b, g, i, j]
                    ref[g, k] += 2 * (vq.codebook[g, k] - z[b, g * 4:(g + 1) * 4, i, j]).detach() / n_group
    torch.testing.assert_close(vq.codebook.grad, ref)


def test_tokenizer_gradient_reaches_encoder_input():
    torch.manual_seed(3)
    tok = Tokenizer(TokenizerConfig(**TINY))
    x = torch.rand(1, 3, 8, 12, requires_grad=True)
    xrec, _, _, _ = tok(x)
    xrec.square().mean().backward()
    assert x.grad.abs().sum() > 0 and tok.encoder.patchify.weight.grad.abs().sum() > 0


def nearest_dist(codes_Kd, data_Nd):
    return torch.cdist(codes_Kd.double(), data_Nd.double()).min(1).values  # (K,)


def group_vectors(z, g, d):
    return z[:, g * d:(g + 1) * d].permute(0, 2, 3, 1).reshape(-1, d)


def test_vq_data_init():
    torch.manual_seed(4)
    vq = GroupedVQ(8, 2, 16, data_init=True, restart_dead=False).train()
    z = torch.randn(2, 8, 4, 4) * 5 + 3  # far from the U(-1/K, 1/K) init
    _, _, _, stats = vq(z)
    assert bool(vq.initialized) and stats['n_replaced'].tolist() == [16, 16]
    for g in range(2):
        # every code is (up to 1% noise) one of this group's encoder vectors
        assert nearest_dist(vq.codebook[g].detach(), group_vectors(z, g, 4)).max() < 0.5
    before = vq.codebook.detach().clone()
    vq(torch.randn(2, 8, 4, 4))
    assert torch.equal(vq.codebook, before)  # init happens once


def test_vq_dead_code_restart():
    torch.manual_seed(5)
    vq = GroupedVQ(8, 2, 8, data_init=False, restart_dead=True, restart_every=3).train()
    z = torch.randn(4, 8, 4, 4)
    with torch.no_grad():
        vq.codebook.normal_(std=0.5)
        vq.codebook[:, 4:] = 100.0  # codes 4..7 of both groups are never the nearest: dead
    live = vq.codebook[:, :4].detach().clone()
    for _ in range(3):  # calls 0, 1, 2 fill the window
        _, idx, _, stats = vq(z)
        assert (idx < 4).all() and stats['n_replaced'].sum() == 0
    _, idx, _, stats = vq(z)  # call 3: restart is due
    assert stats['n_replaced'].tolist() == [4, 4]
    assert torch.equal(vq.codebook[:, :4], live)
    for g in range(2):
        assert nearest_dist(vq.codebook[g, 4:].detach(), group_vectors(z, g, 4)).max() < 0.2
    assert (idx >= 4).any()  # revived codes are used in the very same call
    torch.testing.assert_close(vq.hits.sum(1), torch.full((2,), float(4 * 16)))  # window was reset
    # deterministic given the global RNG
    torch.manual_seed(5)
    vq2 = GroupedVQ(8, 2, 8, data_init=False, restart_dead=True, restart_every=3).train()
    torch.randn(4, 8, 4, 4)
    with torch.no_grad():
        vq2.codebook.normal_(std=0.5)
        vq2.codebook[:, 4:] = 100.0
    for _ in range(4):
        vq2(z)
    assert torch.equal(vq.codebook, vq2.codebook)


def test_vq_eval_mode_changes_nothing():
    vq = GroupedVQ(8, 2, 8, restart_every=1).eval()
    before = vq.codebook.detach().clone()
    vq(torch.randn(2, 8, 2, 2))
    assert torch.equal(vq.codebook, before) and not bool(vq.initialized) and vq.calls.item() == 0

# ----------------------------------------------------------------------------- RoPE / blocks

def rope_reference(x, h, w, base=10000.0):
    """Complex-number reference: pair j of position (r, c) is multiplied by e^{i * pos * theta_j},
    pos = r for the first half of the pairs, c for the second half."""
    T, hs = x.shape[-2:]
    nf = hs // 4
    out = torch.empty_like(x, dtype=torch.float64)
    for t in range(T):
        r, c = divmod(t, w)
        for j in range(hs // 2):
            pos, jj = (r, j) if j < nf else (c, j - nf)
            theta = base ** (-jj / nf)
            z = torch.complex(x[..., t, 2 * j].double(), x[..., t, 2 * j + 1].double())
            z = z * complex(math.cos(pos * theta), math.sin(pos * theta))
            out[..., t, 2 * j], out[..., t, 2 * j + 1] = z.real, z.imag
    return out


def test_rope_matches_complex_reference():
    torch.manual_seed(6)
    h, w, hs = 3, 5, 8
    x = torch.randn(2, 2, h * w, hs)
    cos, sin = rope_2d(h, w, hs)
    assert cos.shape == (h * w, hs // 2)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), rope_reference(x, h, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        rope_2d(2, 2, 6)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(7)
    h, w, hs = 9, 11, 16
    cos, sin = rope_2d(h, w, hs, base=100.0)
    q, k = torch.randn(hs), torch.randn(hs)
    qr = apply_rope(q.expand(h * w, hs), cos, sin)  # the same vector at every position
    kr = apply_rope(k.expand(h * w, hs), cos, sin)
    t = lambda r, c: r * w + c
    s = lambda a, b: (qr[t(*a)] * kr[t(*b)]).sum()
    for (a, b, off) in [((0, 0), (2, 3), (4, 5)), ((1, 7), (3, 2), (5, 1)), ((6, 6), (0, 0), (2, 4))]:
        a2, b2 = (a[0] + off[0], a[1] + off[1]), (b[0] + off[0], b[1] + off[1])
        torch.testing.assert_close(s(a, b), s(a2, b2), atol=1e-4, rtol=1e-4)
    # and the score does change with the offset in either axis
    assert not torch.allclose(s((0, 0), (0, 1)), s((0, 0), (0, 2)))
    assert not torch.allclose(s((0, 0), (1, 0)), s((0, 0), (2, 0)))


@torch.no_grad()
def test_attention_matches_manual_with_unrotated_prefix():
    torch.manual_seed(8)
    B, P, h, w, dim, nh = 2, 2, 3, 4, 32, 2
    attn = Attention(dim, nh)
    x = torch.randn(B, P + h * w, dim)
    cos, sin = rope_2d(h, w, dim // nh)
    out = attn(x, (cos, sin), n_prefix=P)
    # manual reference: rotate only the spatial part, softmax attention
    q, k, v = attn.qkv(x).split(dim, -1)
    heads = lambda t: t.view(B, -1, nh, dim // nh).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    rot = lambda t: torch.cat([t[:, :, :P], rope_reference(t[:, :, P:], h, w).float()], 2)
    q, k = rot(q), rot(k)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // nh), -1)
    ref = attn.proj((att @ v).transpose(1, 2).reshape(B, -1, dim))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="n_prefix"):
        attn(x, (cos, sin), n_prefix=0)


def test_block_modulation():
    torch.manual_seed(9)
    blk = Block(32, 2)
    x = torch.randn(2, 6, 32)
    rope = rope_2d(2, 3, 16)
    zeros = torch.zeros(2, 6, 32)
    torch.testing.assert_close(blk(x, rope, mod=(zeros, zeros)), blk(x, rope))
    # gamma = -1, beta = 0 silences both branches (no biases): the block is the identity
    torch.testing.assert_close(blk(x, rope, mod=(-torch.ones(2, 6, 32), zeros)), x)
    # RMSNorm / SwiGLU against formulas
    n = RMSNorm(32)
    torch.testing.assert_close(n(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    m = SwiGLU(32, 48)
    torch.testing.assert_close(m(x), m.w2(F.silu(m.w1(x)) * m.w3(x)))

# ----------------------------------------------------------------------------- group masking

def test_sample_active_groups_distribution():
    gen = torch.Generator().manual_seed(10)
    n, G, p_full = 200_000, 4, 0.9
    k = sample_active_groups(n, G, p_full, generator=gen)
    assert k.dtype == torch.long and k.min() >= 1 and k.max() <= G
    obs = torch.bincount(k, minlength=G + 1)[1:].double()
    exp = torch.tensor([(1 - p_full) / (G - 1)] * (G - 1) + [p_full], dtype=torch.float64) * n
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001
    assert torch.equal(sample_active_groups(50, 1, 0.5, generator=gen), torch.ones(50, dtype=torch.long))
    assert (sample_active_groups(1000, 4, 0.0, generator=gen) < 4).all()
    assert (sample_active_groups(1000, 4, 1.0, generator=gen) == 4).all()


def test_mask_groups_zeroes_exactly_the_later_groups():
    torch.manual_seed(11)
    zq = torch.randn(4, 16, 2, 3)
    k = torch.tensor([1, 2, 3, 4])
    out = mask_groups(zq, k, 4)
    for b in range(4):
        cut = k[b].item() * 4
        assert torch.equal(out[b, :cut], zq[b, :cut]) and (out[b, cut:] == 0).all()
    torch.testing.assert_close(mask_groups(zq, 2, 4), torch.cat([zq[:, :8], torch.zeros_like(zq[:, 8:])], 1))

# ----------------------------------------------------------------------------- encoder / decoder / tokenizer

def test_encoder_decoder_non_square_shapes():
    enc = ViTEncoder(4, 32, 1, 2, 8)
    dec = ViTDecoder(4, 32, 1, 2, 8)
    x = torch.rand(2, 3, 12, 20)
    z = enc(x)
    assert z.shape == (2, 8, 3, 5)
    assert dec(z).shape == (2, 3, 12, 20)
    assert dec(torch.randn(1, 8, 5, 2)).shape == (1, 3, 20, 8)
    with pytest.raises(ValueError, match="patch=4"):
        enc(torch.rand(1, 3, 13, 20))
    with pytest.raises(ValueError, match="ViTDecoder"):
        dec(torch.randn(1, 7, 2, 2))


def test_linear_head_pixels_belong_to_one_token():
    """With no transformer block (no attention to mix tokens) and no overlap, a pixel of the linear
    head depends on its own token only: the token grid the conv head (below) removes."""
    dec = ViTDecoder(4, 32, 0, 2, 8)
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    dec(z)[0, :, 0, 4].sum().backward()  # the first pixel column of token (0, 1)
    assert z.grad[0, :, 0, 0].abs().sum() == 0 and z.grad[0, :, 0, 1].abs().sum() > 0


def test_lr_guide_starts_as_the_plain_head_and_adds_the_lr_locally():
    """Stage 3's LR guide (ViTDecoder.add_lr_guide): zero at first, so the decoder decodes bit for bit
    as before; it then needs the LR; once its convs are non-zero an output pixel depends on the LR
    near it only (no transformer block here: the tokens' path does not see the LR); the linear head
    has no levels to guide."""
    torch.manual_seed(0)
    dec = ViTDecoder(4, 32, 0, 2, 8, head='conv', conv_ch=8, conv_up='bilinear')
    with torch.no_grad():
        for conv in [blk[-1] for level in dec.upsampler.levels for blk in level] + [dec.upsampler.conv_out]:
            conv.weight.normal_(0, 0.1)          # as after training: the convs reach the output
    z, lr = torch.randn(2, 8, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)  # 128 px out: x4 of the LR
    before = dec(z)
    assert not dec.lr_guided and dec.add_lr_guide() is dec and dec.lr_guided
    assert torch.equal(dec(z, lr), before)
    with pytest.raises(ValueError, match='LR guide'):
        dec(z)
    with torch.no_grad():
        for conv in dec.upsampler.guide:
            conv.weight.normal_(0, 0.1)
    dec(z, lr)[0, :, 66, 66].sum().backward()    # the output pixel in the middle of LR pixel (16, 16)
    g = lr.grad[0].abs().sum(0)                  # (32, 32)
    assert g[16, 16] > 0 and g[:4].sum() == 0 and g[-4:].sum() == 0 and g[:, :4].sum() == 0
    assert lr.grad[1].abs().sum() == 0           # nor on another image's LR
    with pytest.raises(ValueError, match="dec_head='conv'"):
        ViTDecoder(4, 32, 0, 2, 8).add_lr_guide()


def test_conv_head_couples_tokens_and_shifts_with_them():
    """head='conv' (ConvUpsampler): any image size of whole tokens; with no transformer block, a pixel
    just across a token border depends on the neighbouring token (the linear head's does not, test
    above); token features shifted by one cell give the image shifted by p pixels away from the
    zero-padded border (nearest x2 + convs: equivariant to shifts by 2^steps = p pixels)."""
    torch.manual_seed(0)
    p = 4
    dec = ViTDecoder(p, 32, 0, 2, 8, head='conv', conv_ch=8)
    assert dec(torch.randn(2, 8, 3, 5)).shape == (2, 3, 12, 20)
    assert dec.last_layer is dec.upsampler.conv_out.weight
    with torch.no_grad():
        for conv in [blk[-1] for level in dec.upsampler.levels for blk in level] + [dec.upsampler.conv_out]:
            conv.weight.normal_(0, 0.1)          # zero at init: identity blocks, only the colour path
    z = torch.randn(1, 8, 3, 5, requires_grad=True)
    dec(z)[0, :, 0, 4].sum().backward()          # the first pixel column of token (0, 1)
    assert z.grad[0, :, 0, 0].abs().sum() > 0    # token (0, 0), across the border
    fresh = ViTDecoder(p, 32, 0, 2, 8, head='conv', conv_ch=8).upsampler
    t = torch.randn(1, 3 * 5, 32)                # a fresh head paints the tokens' colours, bicubically
    rgb = (t @ fresh.to_rgb.weight.T + fresh.to_rgb.bias).view(1, 3, 5, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(fresh(t, 3, 5), F.interpolate(rgb, scale_factor=p, mode='bicubic'))
    bil = ViTDecoder(p, 32, 0, 2, 8, head='conv', conv_ch=8, conv_up='bilinear').upsampler  # ... or bilinearly
    bil.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(bil(t, 3, 5), F.interpolate(rgb, scale_factor=p, mode='bilinear'))
    up, t = dec.upsampler, torch.randn(1, 16 * 16, 32)
    with torch.no_grad():
        x = up(t, 16, 16)                                                     # (1, 3, 64, 64)
        shifted = up(t.view(1, 16, 16, 32).roll(1, dims=2).reshape(1, 256, 32), 16, 16)
    m = 6 * p  # the receptive field is under 6 tokens: the border's zero padding does not reach here
    torch.testing.assert_close(shifted[..., m:-m, m + p:-m + p], x[..., m:-m, m:-m])
    with pytest.raises(ValueError, match="power-of-two"):
        ViTDecoder(6, 32, 0, 2, 8, head='conv')
    with pytest.raises(ValueError, match="head='conv'"):
        ViTDecoder(4, 32, 0, 2, 8, head='conv', overlap=True)
    with pytest.raises(ValueError, match="dec_head"):
        TokenizerConfig(**dict(TINY, dec_head='conv', dec_overlap=True))
    with pytest.raises(ValueError, match="patch"):
        TokenizerConfig(**dict(TINY, patch=6, latent_dim=8, dec_head='conv'))
    with pytest.raises(ValueError, match="dec_head"):
        TokenizerConfig(**dict(TINY, dec_head='deconv'))
    with pytest.raises(ValueError, match="dec_conv_up"):
        TokenizerConfig(**dict(TINY, dec_head='conv', dec_overlap=False, dec_conv_up='bicubic'))


def test_flops_per_image_counts_the_conv_head():
    """The conv head's FLOPs against the sizes its convolutions really run at (forward hooks)."""
    cfg = TokenizerConfig(**dict(TINY, dec_head='conv', dec_overlap=False, dec_conv_ch=4, dec_conv_blocks=2))
    plain = TokenizerConfig(**dict(TINY, dec_head='linear', dec_overlap=False))
    tok, ref_tok = Tokenizer(cfg), Tokenizer(plain)
    ran = []
    for m in tok.decoder.upsampler.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: ran.append(m.weight.numel() * o.shape[-2] * o.shape[-1]))
    tok(torch.rand(1, 3, 16, 24))
    T = (16 // 4) * (24 // 4)
    linear = ref_tok.decoder.to_pixels.weight.numel() - tok.decoder.upsampler.to_rgb.weight.numel()
    ref = flops_per_image(asdict(plain), 16, 24) - 6 * linear * T + 6 * sum(ran)
    assert len(ran) == 1 + 3 * 2 * 2 + 2 + 1  # conv_in, 3 levels x 2 blocks x 2 convs, 2 ups, conv_out
    assert flops_per_image(asdict(cfg), 16, 24) == pytest.approx(ref)


def naive_overlap_add(t, h, w, p):
    """Loops: token (i, j) adds its 2p x 2p patch times the tent window at rows i*p - p/2 ..., into
    a padded canvas, with the window's weights summed alongside; divide, crop the padding."""
    t = t.double()
    win = [1 - abs(k + 0.5 - p) / p for k in range(2 * p)]
    H, W = h * p + p, w * p + p  # p/2 of padding per side
    acc, wsum = torch.zeros(3, H, W, dtype=torch.float64), torch.zeros(H, W, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            patch = t[i * w + j].view(3, 2 * p, 2 * p)
            for a in range(2 * p):
                for b in range(2 * p):
                    acc[:, i * p + a, j * p + b] += win[a] * win[b] * patch[:, a, b]
                    wsum[i * p + a, j * p + b] += win[a] * win[b]
    out = acc / wsum
    return out[:, p // 2:p // 2 + h * p, p // 2:p // 2 + w * p]


def test_overlap_add_against_loops_and_partition_of_unity():
    from model import overlap_add, overlap_window
    p, h, w = 4, 3, 5
    win = overlap_window(p)
    assert torch.allclose(win[:p, :p] + win[p:, :p] + win[:p, p:] + win[p:, p:], torch.ones(p, p))
    t = torch.randn(1, h * w, 3 * 4 * p * p, dtype=torch.float64)
    torch.testing.assert_close(overlap_add(t, h, w, p)[0], naive_overlap_add(t[0], h, w, p))
    flat = torch.full((2, h * w, 3 * 4 * p * p), 0.3)  # every token paints 0.3: the image is 0.3
    torch.testing.assert_close(overlap_add(flat, h, w, p), torch.full((2, 3, h * p, w * p), 0.3))
    dec = ViTDecoder(p, 32, 1, 2, 8, overlap=True)
    assert dec(torch.randn(2, 8, h, w)).shape == (2, 3, h * p, w * p)
    with pytest.raises(ValueError, match="even patch"):
        ViTDecoder(3, 32, 1, 2, 8, overlap=True)


def test_removed_decoder_options_load_only_when_off():
    """Checkpoints from before the conv head hold dec_refine / dec_refine_ch (the refinement it
    replaced): they load where the refinement was off, and are refused naming the key otherwise."""
    old = {k: v for k, v in TINY.items() if not k.startswith('dec_conv') and k != 'dec_head'}
    assert TokenizerConfig.from_dict(dict(old, dec_refine=0, dec_refine_ch=32)).dec_head == 'linear'
    with pytest.raises(ValueError, match="dec_refine=2"):
        TokenizerConfig.from_dict(dict(old, dec_refine=2, dec_refine_ch=32))


def test_decoder_unpatchify_layout():
    # one token of a 2x3 grid -> its own p x p block of pixels, channel-major inside the patch
    dec = ViTDecoder(2, 16, 0, 1, 4)
    with torch.no_grad():
        dec.to_pixels.weight.zero_()
        dec.to_pixels.bias.copy_(torch.arange(12.0))
    out = dec(torch.zeros(1, 4, 2, 3))
    torch.testing.assert_close(out[0, :, 0:2, 2:4], torch.arange(12.0).view(3, 2, 2))


def test_tokenizer_round_trip_and_prefix_decode():
    torch.manual_seed(12)
    tok = Tokenizer(TokenizerConfig(**TINY)).train()
    x = torch.rand(2, 3, 8, 16)
    xrec, idx, commit, stats = tok(x, k=torch.tensor([1, 4]))  # first call also data-inits codes
    assert xrec.shape == x.shape and idx.shape == (2, 4, 2, 4) and commit.dim() == 0
    assert set(stats) >= {'util', 'perplexity'}
    tok.eval()
    tok2 = Tokenizer(TokenizerConfig(**tok.model_args))
    tok2.load_state_dict(tok.state_dict())
    tok2.eval()
    with torch.no_grad():
        xr1, i1, _, _ = tok(x, k=2)
        xr2, i2, _, _ = tok2(x, k=2)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(xr1, xr2)
        torch.testing.assert_close(tok.decode_indices(i1, k=2), xr1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok.decode_indices(i1), tok.decode(tok.encode(x)[0]), atol=1e-5, rtol=1e-5)
    assert TokenizerConfig.from_dict(tok.model_args) == tok.config


@pytest.mark.parametrize("key,value,match", [
    ('groups', 3, 'groups'), ('codebook_size', 1, 'codebook_size'), ('enc_heads', 5, 'enc_heads'),
    ('dec_heads', 4, 'dec_heads'), ('patch', 0, 'patch'), ('beta', -1.0, 'beta'),
    ('vq_restart_every', 0, 'vq_restart_every')])
def test_config_validation(key, value, match):
    args = dict(TINY, **{key: value})
    if key == 'dec_heads':
        args['dec_width'] = 24  # 24 / 4 heads = head size 6, not divisible by 4 as 2D RoPE needs
    with pytest.raises(ValueError, match=match):
        TokenizerConfig(**args)


def test_config_from_dict_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        TokenizerConfig.from_dict(dict(TINY, bogus=1))

# ----------------------------------------------------------------------------- discriminator / losses

def test_discriminator_shape():
    for norm in ('group', 'batch'):
        d = PatchDiscriminator(ndf=8, n_layers=3, norm=norm)
        size = 64
        for _ in range(3):
            size = (size + 2 - 4) // 2 + 1  # stride-2 convs
        size = size - 1 - 1  # two stride-1 4x4 convs with padding 1
        assert d(torch.rand(2, 3, 64, 64)).shape == (2, 1, size, size) == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm='layer')


def test_gan_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.3])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0.5 + 0 + 2) / 3 + (0 + 1.3) / 2))
    sp = lambda v: math.log1p(math.exp(v))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 2), rel=1e-6)
    assert g_loss_hinge(fake).item() == pytest.approx(0.85)
    assert g_loss_vanilla(fake).item() == pytest.approx((sp(2.0) + sp(-0.3)) / 2, rel=1e-6)


def test_adaptive_gan_weight():
    W = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([3.0, 4.0])
    y = (W * x).sum()
    nll, g = 2 * y, -0.5 * y  # grads 2x and -0.5x: ratio 4 (up to the 1e-4 epsilon)
    w = adaptive_gan_weight(nll, g, W)
    assert w.item() == pytest.approx(2 * 5 / (0.5 * 5 + 1e-4)) and not w.requires_grad
    assert adaptive_gan_weight(1e9 * y, 1e-9 * y, W).item() == 1e4  # clamped

# ----------------------------------------------------------------------------- helpers

def test_param_groups_and_counts():
    tok = Tokenizer(TokenizerConfig(**TINY))
    decay, no_decay = param_groups(tok, 0.1)
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert id(tok.quantizer.codebook) in ids(no_decay['params'])
    assert id(tok.encoder.norm.weight) in ids(no_decay['params'])
    assert id(tok.decoder.upsampler.conv_out.bias) in ids(no_decay['params'])
    assert id(tok.decoder.upsampler.conv_in.weight) in ids(decay['params'])
    assert id(tok.encoder.blocks[0].attn.qkv.weight) in ids(decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(tok.parameters()))
    assert count_params(tok) == sum(p.numel() for p in tok.parameters())


def test_flops_per_image_matches_module_weights():
    cfg = TokenizerConfig(**dict(TINY, enc_depth=2, dec_width=48, dec_heads=3, dec_head='linear'))
    tok = Tokenizer(cfg)
    n = sum(p.numel() for m in (tok.encoder, tok.decoder) for p in m.parameters() if p.dim() >= 2)
    T = (16 // 4) * (24 // 4)
    ref = 6 * n * T + 12 * (2 * 32 + 1 * 48) * T ** 2
    assert flops_per_image(tok.model_args, 16, 24) == pytest.approx(ref)


def test_config_type_check():
    with pytest.raises(ValueError, match="patch"):
        TokenizerConfig(**dict(TINY, patch='4'))
    with pytest.raises(ValueError, match="groups"):
        TokenizerConfig(**dict(TINY, groups=True))
    TokenizerConfig(**dict(TINY, beta=1))  # an int is a fine float
