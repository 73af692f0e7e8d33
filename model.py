"""
All model code of the project, in the order a reader meets it. The method, with its equations and
papers, is in docs/method.md; comments here point to its sections.

    1. Transformer blocks      RMSNorm, SwiGLU, 2D RoPE, attention (takes a mask and a KV cache), Block (SFT)
    2. ViT autoencoder         ViTEncoder, ViTDecoder: patchify -> blocks -> latents and back
    3. Quantizers              GroupedVQ (HiTokSR) and its code counts, OneProcess (DDP), MultiScaleRQ (H-VAR)
    4. Tokenizer               TokenizerConfig (checked by configurator.ModelConfig), Tokenizer: encoder + quantizer +
                               decoder (stage 1); texture VQ (TVQ&RAP): texture + structure maps, structure autoencoder
    5. Generators              CodebookHead (head='codebook' of 5 and 5b: frozen codes, distance logits, temperature);
                               GeneratorConfig, Generator: LR image -> token logits (stage 2), linear or codebook head
                               (lr_anchor); TextureGenerator: also the structure map
       5b.                     NextScaleConfig, NextScaleGenerator (H-VAR): block-causal, KV cache, sampling, condition
    6. Helpers                 group masking, top-K sampling

The losses of every stage (and the GAN discriminator) and the codebooks' usage statistics are in
losses.py; loading a trained chain and running it (load_sr_chain, super_resolve) in chain.py; a
tokenizer's FLOPs for MFU in common.py. Of the project this file imports only configurator's ModelConfig
(the configs' field checks).

The prior network (EfficientNet-Lite0 + LoRA) lives in prior.py: it is not a submodule of any model
here, so a generator without a prior builds none, and checkpoints hold only the LoRA tensors.

Shape suffixes follow VAR: `z_BChw` is (B, C, h, w); h, w is the token grid (H/p, W/p).
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from configurator import ModelConfig

# -----------------------------------------------------------------------------
# 1. Transformer blocks: RMSNorm, SwiGLU, 2D RoPE everywhere (docs/method.md#transformer-blocks)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in float32 so bf16 activations do not lose the mean square
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # value
        self.w2 = nn.Linear(hidden, dim, bias=False)  # out (residual projection)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_2d(h, w, head_dim, base=10000.0, device=None):
    """Angles of 2D RoPE for an (h, w) grid flattened row-major (t = r*w + c).
    Head dims are rotated as interleaved pairs (2j, 2j+1), i.e. complex numbers x_2j + i x_2j+1.
    Pairs j < head_dim/4 (dims [0, head_dim/2)) rotate with the row index, the rest with the column
    index, each axis with frequencies base^(-j / (head_dim/4)).
    Returns cos, sin: (h*w, head_dim/2) float32."""
    t = torch.arange(h * w, device=device)
    return rope_angles((t // w).double(), (t % w).double(), head_dim, base)


def rope_angles(row, col, head_dim, base=10000.0):
    """cos, sin (T, head_dim/2) of 2D RoPE at any positions row, col (T,) (float64; not only
    integers: the next-scale generator places a coarse step's cells at their centres on the full
    grid). rope_2d is this at the integer grid positions."""
    if head_dim % 4 != 0:
        raise ValueError(f"rope_angles: head_dim={head_dim} must be divisible by 4 (2 axes x pairs)")
    n_freq = head_dim // 4
    inv_freq = base ** (-torch.arange(n_freq, dtype=torch.float64, device=row.device) / n_freq)
    ang = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=1)  # (T, hd/2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs of x (..., T, hs) by the angles of cos/sin (T, hs/2).
    (x0 + i x1) * e^{i a}: computed in float32, returned in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # (..., T, hs/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"Attention: dim={dim} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)  # residual projection

    def forward(self, x, rope=None, n_prefix=0, attn_mask=None, kv_cache=None):
        """x: (B, T, dim) with T = n_prefix + h*w. The first n_prefix tokens (e.g. CLS tokens of the
        generator) carry no position and are not rotated. rope = (cos, sin) from rope_2d or None.
        attn_mask: optional bool/float mask broadcastable to (B, nh, T, T_keys) (True = attend).
        kv_cache: a dict, for step-by-step inference: the keys / values of earlier calls (rotated,
        in cache['k'], cache['v']) are prepended to this call's, which are then appended to it; x
        then attends to every cached token and to itself."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs)
        if rope is not None:
            cos, sin = rope
            if cos.shape[0] != T - n_prefix:
                raise ValueError(f"Attention: rope covers {cos.shape[0]} positions but the sequence "
                                 f"has {T - n_prefix} spatial tokens (T={T}, n_prefix={n_prefix})")
            q, k = (torch.cat([t[:, :, :n_prefix], apply_rope(t[:, :, n_prefix:], cos, sin)], dim=2) for t in (q, k))
        if kv_cache is not None:
            if 'k' in kv_cache:
                k, v = torch.cat([kv_cache['k'], k], dim=2), torch.cat([kv_cache['v'], v], dim=2)
            kv_cache['k'], kv_cache['v'] = k, v                            # (B, nh, T_keys, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block. mod = (gamma, beta), each broadcastable to (B, T, dim), turns
    both norms into SFT modulation norm(x) * (1 + gamma) + beta (docs/method.md#sft-conditioning)."""
    def __init__(self, dim, n_head, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, n_head)
        self.norm2 = RMSNorm(dim)
        # hidden: 2/3 of the GELU-MLP width, so a SwiGLU (3 matrices) has the params of a 4x MLP (2 matrices)
        self.mlp = SwiGLU(dim, int(2 * mlp_ratio * dim / 3))

    def _norm(self, norm, x, mod):
        return norm(x) if mod is None else norm(x) * (1 + mod[0]) + mod[1]  # mod = (gamma, beta)

    def forward(self, x, rope=None, mod=None, n_prefix=0, attn_mask=None, kv_cache=None):
        x = x + self.attn(self._norm(self.norm1, x, mod), rope, n_prefix, attn_mask, kv_cache)
        x = x + self.mlp(self._norm(self.norm2, x, mod))
        return x


def init_transformer_weights(module, depth):
    """nanoGPT init: Linear N(0, 0.02), zero bias; residual projections scaled by 1/sqrt(2*depth)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(('attn.proj', 'mlp.w2')) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

# -----------------------------------------------------------------------------
# 2. ViT autoencoder: patchify by p, ViT blocks, linear to C and back (docs/method.md#vit-autoencoder)

class ViTEncoder(nn.Module):
    def __init__(self, patch, width, depth, n_head, latent_dim, mlp_ratio=4.0, rope_base=10000.0):
        super().__init__()
        self.patch, self.n_head, self.rope_base = patch, n_head, rope_base
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.blocks = nn.ModuleList([Block(width, n_head, mlp_ratio) for _ in range(depth)])
        self.norm = RMSNorm(width)
        self.to_latent = nn.Linear(width, latent_dim)
        init_transformer_weights(self, depth)

    def forward(self, x):
        """x: (B, 3, H, W) in [0, 1] -> z: (B, C, H/p, W/p)."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % self.patch or x.shape[3] % self.patch:
            raise ValueError(f"ViTEncoder: expected images (B, 3, H, W) with H, W multiples of "
                             f"patch={self.patch}, got shape {tuple(x.shape)}")
        h, w = x.shape[2] // self.patch, x.shape[3] // self.patch
        t = rearrange(self.patchify(x * 2 - 1), 'b c h w -> b (h w) c')  # (B, h*w, width), input in [-1,1]
        rope = rope_2d(h, w, t.shape[-1] // self.n_head, self.rope_base, x.device)
        for blk in self.blocks:
            t = blk(t, rope)
        return rearrange(self.to_latent(self.norm(t)), 'b (h w) c -> b c h w', h=h)  # (B, C, h, w)


def unpatchify(t_BTd, h, w, p):
    """(B, h*w, c*p*p) per-token pixels, channel-major inside a patch -> (B, c, h*p, w*p)."""
    return rearrange(t_BTd, 'b (h w) (c p q) -> b c (h p) (w q)', h=h, w=w, p=p, q=p)


def overlap_window(p, device=None):
    """Separable tent of side 2p, (2p, 2p): 1 - |i + 0.5 - p| / p per axis. Shifted by p, two tents
    sum to exactly 1, so stride-p overlap-add of 2p x 2p patches blends neighbours linearly."""
    w = 1 - ((torch.arange(2 * p, device=device) + 0.5 - p).abs() / p)
    return w[:, None] * w[None, :]


def overlap_add(t_BTd, h, w, p):
    """(B, h*w, 3*(2p)^2) per-token patches of side 2p, each centred on its own p x p cell ->
    (B, 3, h*p, w*p): every pixel is the tent-weighted mean of the 2-4 tokens whose patches cover it,
    so the weights, and with them the image, change continuously across patch borders. At the
    image border fewer tokens cover a pixel, hence the division by the summed weights."""
    B = t_BTd.shape[0]
    win = overlap_window(p, t_BTd.device).to(t_BTd.dtype).flatten()             # (4p^2,)
    cols = rearrange(t_BTd.view(B, h * w, 3, 4 * p * p) * win, 'b t c k -> b (c k) t')  # (B, 3*4p^2, h*w)
    fold = lambda c: F.fold(c, (h * p, w * p), kernel_size=2 * p, stride=p, padding=p // 2)
    norm = fold(win[None, :, None].expand(1, -1, h * w))                         # (1, 1, H, W)
    return fold(cols) / norm


def res_block(ch):
    """The residual unit of ConvUpsampler, x + block(x): two 3x3 convolutions with SiLU, no
    normalisation (a crop decodes like the same region of a larger image, as sr.py's tiles need)."""
    return nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))


class ConvUpsampler(nn.Module):
    """head='conv' of ViTDecoder (docs/method.md#conv-decoder-head): the h x w token features grow to
    the image in log2(p) steps of x2, each a nearest-neighbour (or bilinear, up='bilinear') resize + 3x3 conv (no transposed
    convolution: its uneven kernel overlap paints a checkerboard), with n_blocks residual blocks on
    every level, as the VQGAN / LlamaGen decoders. No output pixel belongs to one token: every
    conv straddles the cells, so the token grid has no edge to show. Channels: ch at full
    resolution, doubled per coarser level up to `width`. The convs add detail to each token's
    colour, bicubically upsampled (to_rgb; bilinearly with up='bilinear'): conv_out starts at zero, so a
    fresh head paints a smooth image of the tokens' colours and the colours train as fast as a linear head's."""
    def __init__(self, width, patch, ch, n_blocks, up='nearest'):
        super().__init__()
        if up not in ('nearest', 'bilinear'):
            raise ValueError(f"ConvUpsampler: up must be 'nearest' or 'bilinear', got {up!r}")
        self.up, self.rgb_up = up, 'bicubic' if up == 'nearest' else 'bilinear'
        n_up = patch.bit_length() - 1
        if patch != 1 << n_up:
            raise ValueError(f"ConvUpsampler: the x2 steps need a power-of-two patch, got {patch}")
        chs = [min(ch << (n_up - i), width) for i in range(n_up + 1)]   # token grid .. full resolution
        self.chs, self.guide = chs, None                   # guide: ViTDecoder.add_lr_guide (stage 3's option)
        self.conv_in = nn.Conv2d(width, chs[0], 3, padding=1)
        self.levels = nn.ModuleList([nn.ModuleList([res_block(c) for _ in range(n_blocks)]) for c in chs])
        self.ups = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chs, chs[1:])])
        self.conv_out = nn.Conv2d(chs[-1], 3, 3, padding=1)
        self.to_rgb = nn.Linear(width, 3)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        for blk in (b for level in self.levels for b in level):
            nn.init.zeros_(blk[-1].weight)   # each residual block starts as the identity
            nn.init.zeros_(blk[-1].bias)

    def forward(self, t_BTd, h, w, guide=None):
        """(B, h*w, width) token features -> (B, 3, h*p, w*p); guide (B, 3, h*p, w*p) in [0, 1], the
        upsampled LR, is used (and needed) when the head has the LR guide."""
        t = rearrange(t_BTd, 'b (h w) c -> b c h w', h=h, w=w)
        x = self.conv_in(t)                                                      # (B, ch_0, h, w)
        for i, blocks in enumerate(self.levels):
            if self.guide is not None:                                           # (B, ch_i, 2^i h, 2^i w)
                x = x + self.guide[i](F.interpolate(guide.to(x.dtype) * 2 - 1, size=x.shape[-2:], mode='area'))
            for blk in blocks:
                x = x + blk(x)
            if i < len(self.ups):                                                # (B, ch_i+1, 2^i+1 h, ...)
                x = self.ups[i](F.interpolate(x, scale_factor=2.0, mode=self.up))
        rgb = self.to_rgb(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)             # (B, 3, h, w)
        return F.interpolate(rgb, size=x.shape[-2:], mode=self.rgb_up, align_corners=False) + self.conv_out(F.silu(x))


class ViTDecoder(nn.Module):
    """Output is unbounded (no sigmoid): it lands in ~[0, 1] because the targets are in [0, 1];
    clamp to [0, 1] only for evaluation / saving images. From tokens to pixels
    (docs/method.md#vit-autoencoder): head='conv' is ConvUpsampler (conv_ch channels at full
    resolution, conv_blocks per level, resizes conv_up); head='linear' un-patchifies a per-token linear map, where
    overlap=True makes each token paint a 2p x 2p patch, tent-blended with its neighbours (overlap_add)."""
    def __init__(self, patch, width, depth, n_head, latent_dim, mlp_ratio=4.0, rope_base=10000.0,
                 overlap=False, head='linear', conv_ch=32, conv_blocks=1, conv_up='nearest'):
        super().__init__()
        if overlap and patch % 2:
            raise ValueError(f"ViTDecoder: overlapping output patches need an even patch, got {patch}")
        if head == 'conv' and overlap:
            raise ValueError("ViTDecoder: head='conv' has no per-token patches to overlap")
        self.patch, self.n_head, self.rope_base, self.overlap = patch, n_head, rope_base, overlap
        self.from_latent = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList([Block(width, n_head, mlp_ratio) for _ in range(depth)])
        self.norm = RMSNorm(width)
        self.upsampler = ConvUpsampler(width, patch, conv_ch, conv_blocks, conv_up) if head == 'conv' else None
        if head == 'linear':
            self.to_pixels = nn.Linear(width, 3 * (2 * patch if overlap else patch) ** 2)
        init_transformer_weights(self, depth)

    @property
    def last_layer(self):
        """The weight nearest the output, where adaptive_gan_weight compares gradients."""
        return self.to_pixels.weight if self.upsampler is None else self.upsampler.conv_out.weight

    @property
    def lr_guided(self):
        """Whether this decoder has the LR guide (add_lr_guide) and so needs the LR to decode."""
        return self.upsampler is not None and self.upsampler.guide is not None

    def add_lr_guide(self):
        """Stage 3's LR guide (docs/method.md#lr-guided-decoder): one 3x3 conv per level of the conv
        head from the upsampled LR, area-resized to that level, into the level's features; zero at
        first, so the decoder decodes exactly as before until the convs train."""
        if self.upsampler is None:
            raise ValueError("ViTDecoder: the LR guide needs the conv head (dec_head='conv')")
        self.upsampler.guide = nn.ModuleList([nn.Conv2d(3, c, 3, padding=1) for c in self.upsampler.chs])
        for conv in self.upsampler.guide:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        return self

    def forward(self, z, lr=None):
        """z: (B, C, h, w) -> x: (B, 3, h*p, w*p). lr (B, 3, h', w'): the LR image, bicubically
        upsampled to the output's size as the guide of an LR-guided decoder (ignored by others)."""
        if z.dim() != 4 or z.shape[1] != self.from_latent.in_features:
            raise ValueError(f"ViTDecoder: expected latents (B, {self.from_latent.in_features}, h, w), "
                             f"got shape {tuple(z.shape)}")
        B, C, h, w = z.shape
        guide = None
        if self.lr_guided:
            if lr is None:
                raise ValueError("ViTDecoder: this decoder has the LR guide: decode with the LR image (lr=...)")
            guide = F.interpolate(lr.float(), size=(h * self.patch, w * self.patch), mode='bicubic',
                                  align_corners=False).clamp(0, 1)                # (B, 3, h*p, w*p)
        t = self.from_latent(z.flatten(2).transpose(1, 2))  # (B, h*w, width)
        rope = rope_2d(h, w, t.shape[-1] // self.n_head, self.rope_base, z.device)
        for blk in self.blocks:
            t = blk(t, rope)
        t = self.norm(t)
        if self.upsampler is not None:
            return self.upsampler(t, h, w, guide)
        px = self.to_pixels(t)  # (B, h*w, 3*p*p), or 3*(2p)^2 with overlap
        return overlap_add(px, h, w, self.patch) if self.overlap else unpatchify(px, h, w, self.patch)

# -----------------------------------------------------------------------------
# 3. Quantizers (docs/method.md#grouped-vq)

def code_counts(idx_BGhw, codebook_size):
    """How often each code was chosen: (B, G, h, w) long -> (G, K) float."""
    G = idx_BGhw.shape[1]
    idx_GN = idx_BGhw.transpose(0, 1).reshape(G, -1)
    counts = torch.zeros(G, codebook_size, device=idx_BGhw.device)
    return counts.scatter_add_(1, idx_GN, torch.ones_like(idx_GN, dtype=counts.dtype))


def stats_from_counts(counts_GK):
    """Per group: utilisation = fraction of the K codes used at least once; perplexity =
    exp(entropy of the code frequencies) (K for uniform use, 1 for a collapsed codebook)."""
    p = counts_GK / counts_GK.sum(1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return {'util': (counts_GK > 0).float().mean(1), 'perplexity': entropy.exp()}  # each (G,)


def nearest_code(z_Nd, e_Kd):
    """Index of the nearest code of each vector: (N, d), (K, d) -> (N,) long, the argmin over k of
    ||z - e_k||^2 = ||z||^2 - 2 z.e_k + ||e_k||^2, without the ||z||^2 that all k share: one fused
    ||e||^2 - 2 z e^T (addmm) in float32 (autocast off: bf16 would mis-rank close codes)."""
    with torch.no_grad(), torch.autocast(z_Nd.device.type, enabled=False):
        e = e_Kd.float()
        return torch.addmm(e.pow(2).sum(1)[None], z_Nd.float(), e.t(), alpha=-2).argmin(1)


class OneProcess:
    """What a quantizer's codebook updates need of data-parallel training, for one process: nothing
    to share (the default of model.GroupedVQ.ranks). Under torchrun, tokenizer.py sets
    `quantizer.ranks = Ranks()`: the same three operations over all ranks
    (docs/method.md#grouped-vq, the paragraph on torchrun)."""
    gather = sum = staticmethod(lambda x, dim=0: x)   # every rank's x concatenated / summed
    from_rank0_ = staticmethod(lambda x: x)           # overwrite x with rank 0's, in place


class GroupedVQ(nn.Module):
    """G independent codebooks e^g (K, C/G); group g owns channels [g*C/G, (g+1)*C/G).

    Collapse remedies (both one flag), applied in training mode at the start of forward, before
    the lookup, using the current batch's encoder vectors z^g as the pool of replacements:
    - data_init: on the first training call every code becomes a random encoder vector of its group
      (VQGAN-LC / k-means++-lite); buffer `initialized` records it (saved in checkpoints).
    - restart_dead: buffer `hits` (G, K) counts how often each code was chosen; every
      `restart_every` training calls, codes with hits < dead_threshold over that window are
      replaced by random encoder vectors (+ 1% noise so duplicates can split), and hits reset
      (Jukebox / SoundStream style). The replacement is written with torch.where, so there is no
      host sync and RNG use is the same every call: deterministic given torch's global RNG.
    Optimizer moments of a replaced code are left as they are.
    Under DDP (torchrun) every rank keeps the same codebooks: hits are summed over the ranks, the
    pool of replacements holds every rank's vectors (rank order: one process's pool of the whole
    batch) and rank 0's draws are broadcast, so a restart is that of one process with all batches."""
    def __init__(self, latent_dim, groups, codebook_size, beta=0.25, data_init=True,
                 restart_dead=True, restart_every=100, dead_threshold=1.0):
        super().__init__()
        if latent_dim % groups:
            raise ValueError(f"GroupedVQ: groups={groups} must divide latent_dim={latent_dim}")
        self.C, self.G, self.K, self.d = latent_dim, groups, codebook_size, latent_dim // groups
        self.beta, self.data_init, self.restart_dead = beta, data_init, restart_dead
        self.restart_every, self.dead_threshold = restart_every, dead_threshold
        # taming init U(-1/K, 1/K); overwritten by data_init on the first training batch
        self.codebook = nn.Parameter(torch.empty(groups, codebook_size, self.d).uniform_(
            -1.0 / codebook_size, 1.0 / codebook_size))  # (G, K, d)
        self.codebook._no_weight_decay = True  # read by param_groups
        self.register_buffer('initialized', torch.tensor(False))
        self.register_buffer('hits', torch.zeros(groups, codebook_size))
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))
        self.ranks = OneProcess  # common.Ranks() under DDP: hits, pools and draws shared by all ranks

    @torch.no_grad()
    def _replace_codes(self, z_GNd, init=True, restart=True):
        """Remedies 1 (init) and 2 (restart) from the pool z_GNd; either can be switched off per call."""
        G, N, _ = z_GNd.shape
        pick = torch.randint(N, (G, self.K), device=z_GNd.device)
        new_GKd = torch.gather(z_GNd, 1, pick[..., None].expand(-1, -1, self.d))
        new_GKd = new_GKd + 0.01 * z_GNd.std() * torch.randn_like(new_GKd)
        replace_GK = torch.zeros(G, self.K, dtype=torch.bool, device=z_GNd.device)
        if self.data_init and init:
            replace_GK |= ~self.initialized
            self.initialized.fill_(True)
        if self.restart_dead and restart:
            due = (self.calls > 0) & (self.calls % self.restart_every == 0)
            replace_GK |= due & (self.hits < self.dead_threshold)
            self.hits.mul_((~due).float())  # start a new counting window
        new_GKd = new_GKd.to(self.codebook.dtype)
        self.codebook.copy_(torch.where(replace_GK[..., None], new_GKd, self.codebook))
        self.ranks.from_rank0_(self.codebook.data)  # DDP: the draws above differ by rank; rank 0's count
        return replace_GK.sum(1)  # (G,)

    def forward(self, z_BChw):
        """z: (B, C, h, w) -> zq_ste (B, C, h, w), idx (B, G, h, w) long, commit_loss scalar, stats.
        commit_loss = sum_g [ mean||sg[z^g] - e^g_q||^2 + beta * mean||z^g - sg[e^g_q]||^2 ], the
        means over that group's B*h*w*d elements (docs/method.md#grouped-vq)."""
        B, C, h, w = z_BChw.shape
        if C != self.C:
            raise ValueError(f"GroupedVQ: expected {self.C} latent channels, got {C}")
        z_GNd = rearrange(z_BChw.float(), 'b (g d) h w -> g (b h w) d', g=self.G)  # group g's channels, N = B*h*w
        n_replaced = torch.zeros(self.G, dtype=torch.long, device=z_BChw.device)
        if self.training and (self.data_init or self.restart_dead):
            n_replaced = self._replace_codes(self.ranks.gather(z_GNd.detach(), dim=1))
        idx_GN = torch.stack([nearest_code(z_GNd[g], self.codebook[g]) for g in range(self.G)])
        zhat_GNd = self.codebook[torch.arange(self.G, device=idx_GN.device)[:, None], idx_GN].float()
        commit = ((zhat_GNd - z_GNd.detach()).pow(2).mean((1, 2))  # moves codes to the encoder
                  + self.beta * (z_GNd - zhat_GNd.detach()).pow(2).mean((1, 2))).sum()  # commits encoder
        zhat_BChw = rearrange(zhat_GNd, 'g (b h w) d -> b (g d) h w', b=B, h=h, w=w).to(z_BChw.dtype)
        zq_BChw = z_BChw + (zhat_BChw - z_BChw).detach()  # straight-through estimator
        idx_BGhw = idx_GN.view(self.G, B, h, w).transpose(0, 1).contiguous()
        counts = code_counts(idx_BGhw, self.K)
        if self.training:
            self.hits.add_(self.ranks.sum(counts))
            self.calls.add_(1)
        stats = stats_from_counts(counts)
        stats['n_replaced'] = n_replaced
        return zq_BChw, idx_BGhw, commit, stats

    def lookup(self, idx_BGhw):
        """idx (B, G, h, w) long -> zhat (B, C, h, w)."""
        if idx_BGhw.dim() != 4 or idx_BGhw.shape[1] != self.G:
            raise ValueError(f"GroupedVQ.lookup: expected indices (B, {self.G}, h, w), "
                             f"got {tuple(idx_BGhw.shape)}")
        g = torch.arange(self.G, device=idx_BGhw.device)[None, :, None, None]
        return rearrange(self.codebook[g, idx_BGhw], 'b g h w d -> b (g d) h w')  # from (B, G, h, w, d)

    def codes_from_onehot(self, w_BGhwK):
        """Soft/one-hot weights (B, G, h, w, K) -> sum_k w_k e^g_k: (B, C, h, w). With the
        straight-through one-hot (ste_onehot) this equals lookup(argmax) in the forward pass."""
        zhat = torch.einsum('bghwk,gkd->bgdhw', w_BGhwK.to(self.codebook.dtype), self.codebook)
        return rearrange(zhat, 'b g d h w -> b (g d) h w')


def step_partition(steps, scales):
    """Hierarchical tokenization's split of the steps over the target scales (docs/method.md#hierarchical-tokenization):
    scale n owns the steps whose sides lie in (s_{n-1} R, s_n R], R = steps[-1], s_0 = 0, and the
    last of them must be s_n R exactly (its map is that scale's token grid).
    E.g. steps (1,2,3,4,5,6,8,10,13,16), scales (0.25,0.5,1) -> [[0,1,2,3], [4,5,6], [7,8,9]]."""
    steps, scales = tuple(steps), tuple(scales)
    if not steps or any(not isinstance(r, int) or r < 1 for r in steps):
        raise ValueError(f"rq_steps={steps}: expected positive integer sides")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"rq_steps={steps}: sides must be strictly increasing")
    if not scales or any(b <= a for a, b in zip(scales, scales[1:])) or scales[0] <= 0 or scales[-1] != 1:
        raise ValueError(f"rq_scales={scales}: expected increasing scales in (0, 1] ending with 1")
    R, parts, lo = steps[-1], [], 0.0
    for s in scales:
        part = [i for i, r in enumerate(steps) if lo * R < r <= s * R]
        if not part or steps[part[-1]] != s * R:
            raise ValueError(f"rq_steps={steps}, rq_scales={scales}: scale {s} needs steps with sides in "
                             f"({lo * R:g}, {s * R:g}], the last equal to {s * R:g}")
        parts.append(part)
        lo = s
    return parts


class Phi(nn.Module):
    """VAR's refinement of an upsampled code map: phi(h) = (1 - r) h + r conv3x3(h)."""
    def __init__(self, dim, ratio=0.5):
        super().__init__()
        self.conv, self.ratio = nn.Conv2d(dim, dim, 3, padding=1), ratio

    def forward(self, h):
        return (1 - self.ratio) * h + self.ratio * self.conv(h)


class MultiScaleRQ(GroupedVQ):
    """Multi-scale residual quantizer (docs/method.md#multi-scale-rq), after VAR: one codebook
    e (K, C) shared by L steps of sides rho_1 < ... < rho_L = R (R = the token grid side). Step i:
        r_i = area(rest, rho_i);  k_i = nearest code of each vector of r_i        (B, rho_i, rho_i)
        h_i = phi_i(bicubic(e[k_i], grid));  f_hat += h_i;  rest -= h_i
    The sides are given for a grid of side R and scale with any other grid (rounded, >= 1).
    n_phi shared convs serve the L steps (step i uses the conv whose tick in [0, 1] is nearest to
    i / (L - 1), as VAR's PhiPartiallyShared); n_phi = 0 makes every phi the identity.
    Codebook remedies of GroupedVQ (it is a GroupedVQ with G = 1): data init from the encoder
    vectors area-pooled to every step's side, dead-code restarts from the residuals of all steps."""
    def __init__(self, latent_dim, codebook_size, steps, scales, n_phi=4, phi_ratio=0.5, beta=0.25,
                 data_init=True, restart_dead=True, restart_every=100, dead_threshold=1.0):
        super().__init__(latent_dim, 1, codebook_size, beta, data_init, restart_dead, restart_every,
                         dead_threshold)
        self.steps, self.scales = tuple(steps), tuple(scales)
        self.partition = step_partition(self.steps, self.scales)
        self.phis = nn.ModuleList(Phi(latent_dim, phi_ratio) for _ in range(n_phi))
        L = len(self.steps)
        ticks = torch.linspace(1 / (3 * n_phi), 1 - 1 / (3 * n_phi), n_phi) if n_phi else None
        self.phi_of_step = [int((ticks - i / max(L - 1, 1)).abs().argmin()) if n_phi else -1
                            for i in range(L)]

    def step_shapes(self, h, w):
        """[(h_i, w_i)] of the L steps on a token grid of h x w."""
        R = self.steps[-1]
        return [(max(1, round(r * h / R)), max(1, round(r * w / R))) for r in self.steps]

    def contribution(self, i, tokens, size):
        """phi_i(bicubic(e[idx], size)): step i's tokens idx (B, h_i, w_i), or their codes as a float
        map (B, C, h_i, w_i) (a straight-through mix, losses.hvar_losses), as a (B, C, *size) feature map."""
        q = (tokens.float() if tokens.is_floating_point() else
             F.embedding(tokens, self.codebook[0]).permute(0, 3, 1, 2).float())   # (B, C, h_i, w_i)
        if tuple(q.shape[-2:]) != tuple(size):
            q = F.interpolate(q, size=size, mode='bicubic', align_corners=False)
        return self.phis[self.phi_of_step[i]](q) if self.phis else q

    def quantize_steps(self, z_BChw, f_hat, steps, shapes, pool=None):
        """Quantize the residual z - f_hat with the given steps (greedy, in order).
        z: (B, C, h, w) encoder features; f_hat: contributions of earlier tokens on this grid (or 0).
        -> [idx (B, h_i, w_i)], f_hat (with gradients to the codes and phi), commit: the mean over
        these steps of ||f_hat_i - sg[z]||^2 + beta ||z - sg[f_hat_i]||^2 (VAR's loss on every
        partial sum). pool, a list, collects each step's residual vectors for dead-code restarts."""
        z = z_BChw.float()
        rest = z.detach() - (f_hat.detach() if torch.is_tensor(f_hat) else f_hat)
        idxs, commit = [], 0.0
        for i in steps:
            r = F.adaptive_avg_pool2d(rest, shapes[i])                        # area: (B, C, h_i, w_i)
            r_Nd = r.permute(0, 2, 3, 1).reshape(-1, self.C)
            idx = nearest_code(r_Nd, self.codebook[0]).view(r.shape[0], *shapes[i])
            h = self.contribution(i, idx, z.shape[-2:])
            f_hat, rest = f_hat + h, rest - h.detach()
            commit = commit + (f_hat - z.detach()).pow(2).mean() + self.beta * (z - f_hat.detach()).pow(2).mean()
            idxs.append(idx)
            if pool is not None:
                pool.append(r_Nd)
        return idxs, f_hat, commit / len(steps)

    def before_quantize(self, z_BChw, shapes):
        """Training only: data init of the codebook from the encoder vectors at every step's side."""
        if self.training and self.data_init:
            z = z_BChw.detach().float()
            pool = torch.cat([self.ranks.gather(F.adaptive_avg_pool2d(z, s).permute(0, 2, 3, 1)  # DDP: all ranks'
                                               .reshape(-1, self.C)) for s in shapes])
            self._replace_codes(pool[None], init=True, restart=False)

    def after_quantize(self, idxs, pool):
        """Training only: count code hits of all steps; restart dead codes from the residuals.
        The replaced codes take effect at the next call (this call's lookups are done)."""
        counts = sum(code_counts(i[:, None], self.K) for i in idxs)          # (1, K)
        if self.training:
            self.hits.add_(self.ranks.sum(counts))
            self.calls.add_(1)
            if self.restart_dead:
                pool = torch.cat([self.ranks.gather(r_Nd) for r_Nd in pool])  # DDP: all ranks', by step
                self._replace_codes(pool[None], init=False, restart=True)
        return counts

    def forward(self, z_BChw):
        """Plain multi-scale RQ of z (B, C, h, w): -> zq_ste (B, C, h, w), [idx (B, h_i, w_i)] * L,
        commit, stats (utilisation / perplexity of the shared codebook over all steps)."""
        B, C, h, w = z_BChw.shape
        if C != self.C:
            raise ValueError(f"MultiScaleRQ: expected {self.C} latent channels, got {C}")
        shapes = self.step_shapes(h, w)
        self.before_quantize(z_BChw, shapes)
        pool = [] if self.training else None
        idxs, f_hat, commit = self.quantize_steps(z_BChw, 0.0, range(len(self.steps)), shapes, pool)
        stats = stats_from_counts(self.after_quantize(idxs, pool))
        zq = z_BChw + (f_hat.to(z_BChw.dtype) - z_BChw).detach()           # straight-through estimator
        return zq, idxs, commit, stats

    def decode_steps(self, idxs, size):
        """Sum of the contributions of steps 0..len(idxs)-1 on a (h, w) grid: (B, C, h, w) (idxs: each
        step's tokens or code maps, as contribution)."""
        return sum(self.contribution(i, idx, size) for i, idx in enumerate(idxs))



# -----------------------------------------------------------------------------
# 4. Tokenizer (stage 1)

@dataclass
class TokenizerConfig(ModelConfig):
    """Stage 1 (docs/method.md#grouped-vq). Defaults: tokenizer.py's settings of the same names."""
    patch: int                # HR pixels per token side (p)
    latent_dim: int           # C
    groups: int               # G codebooks (1 = vanilla VQ)
    codebook_size: int        # K codes per group
    enc_width: int
    enc_depth: int
    enc_heads: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    dec_overlap: bool         # each token paints a 2p x 2p patch, tent-blended with its neighbours
    dec_head: str             # 'linear' (per-token pixels) | 'conv' (x2 resize + conv steps to full resolution)
    dec_conv_ch: int          # head='conv': channels at full resolution, doubled per coarser level
    dec_conv_blocks: int      # head='conv': residual blocks per level
    dec_conv_up: str          # head='conv': the x2 resizes, 'nearest' (colours bicubic) | 'bilinear' (colours too)
    mlp_ratio: float          # SwiGLU hidden = 2/3 * mlp_ratio * width
    rope_base: float
    beta: float               # commitment weight inside L_commit
    vq_data_init: bool        # codebook remedy 1: codes start as encoder outputs of the first batch
    vq_restart_dead: bool     # codebook remedy 2: re-seed codes unused for a window of calls
    vq_restart_every: int     # training calls per dead-code window
    vq_dead_threshold: float  # dead = chosen fewer times than this in the window
    quantizer: str            # 'grouped' (HiTokSR) | 'msrq' (multi-scale residual, H-VAR) | 'tvq' (texture VQ)
    rq_steps: tuple           # msrq: step sides on the training grid, increasing, last = grid side
    rq_scales: tuple          # msrq: target scales of the hierarchical tokenization, last = 1
    rq_phi: int               # msrq: shared phi convs (0: phi is the identity)
    rq_phi_ratio: float       # msrq: r in phi(h) = (1 - r) h + r conv3x3(h)
    tvq_struct_dim: int       # tvq: C_L, channels of the continuous structure map F_L
    tvq_struct_pool: int      # tvq: F_L side = token grid side / this (4 with patch 8: H/32)
    tvq_down: int             # tvq: the structure autoencoder sees x downsampled by this factor
    tvq_down_width: int       # tvq: width, blocks, heads of the structure autoencoder's ViTs
    tvq_down_depth: int
    tvq_down_heads: int

    def __post_init__(self):
        self.check_types()
        self.check_choice('quantizer', 'grouped', 'msrq', 'tvq')
        if self.quantizer == 'tvq':
            if self.groups != 1:
                self.bad('groups', "must be 1 with quantizer='tvq' (one texture codebook of latent_dim dims)")
            self.check_positive('tvq_struct_dim', 'tvq_struct_pool', 'tvq_down', 'tvq_down_width', 'tvq_down_heads')
            self.check_positive('tvq_down_depth', minimum=0)
            if (self.patch * self.tvq_struct_pool) % self.tvq_down:
                self.bad('tvq_down', f"must divide patch x tvq_struct_pool = {self.patch * self.tvq_struct_pool} "
                                     f"(the structure autoencoder's patch on the downsampled image)")
            self.check_heads('tvq_down_width', 'tvq_down_heads')
        if self.quantizer == 'msrq':
            if self.groups != 1:
                self.bad('groups', "must be 1 with quantizer='msrq' (one shared codebook of latent_dim dims)")
            self.check_with(step_partition, self.rq_steps, self.rq_scales)
            self.check_positive('rq_phi', minimum=0)
            if not 0 <= self.rq_phi_ratio <= 1:
                self.bad('rq_phi_ratio', "must be in [0, 1]")
        self.check_positive('patch', 'latent_dim', 'groups', 'enc_width', 'enc_heads', 'dec_width', 'dec_heads',
                            'vq_restart_every')
        self.check_positive('enc_depth', 'dec_depth', minimum=0)
        self.check_positive('codebook_size', minimum=2)
        if self.latent_dim % self.groups:
            self.bad('groups', f"must divide latent_dim={self.latent_dim}")
        self.check_heads('enc_width', 'enc_heads', 'dec_width', 'dec_heads')
        if self.dec_overlap and self.patch % 2:
            self.bad('dec_overlap', f"needs an even patch, got patch={self.patch}")
        self.check_choice('dec_head', 'linear', 'conv')
        if self.dec_head == 'conv':
            self.check_positive('dec_conv_ch', 'dec_conv_blocks')
            self.check_choice('dec_conv_up', 'nearest', 'bilinear')
            if self.patch & (self.patch - 1):
                self.bad('patch', "must be a power of two with dec_head='conv' (x2 upsampling steps)")
            if self.dec_overlap:
                self.bad('dec_head', "'conv' needs dec_overlap=False (no per-token patches to overlap)")
        self.check_positive('beta', minimum=0)


# checkpoints written before multi-scale RQ / texture VQ existed hold grouped-VQ tokenizers (the
# texture-VQ values are unused by them)
TokenizerConfig.ADDED_FIELDS = dict(quantizer='grouped', rq_steps=(), rq_scales=(1.0,), rq_phi=0, rq_phi_ratio=0.5,
                                    tvq_struct_dim=64, tvq_struct_pool=4, tvq_down=8, tvq_down_width=128,
                                    tvq_down_depth=2, tvq_down_heads=4, dec_head='linear', dec_conv_ch=32,
                                    dec_conv_blocks=1, dec_conv_up='nearest')
TokenizerConfig.REMOVED_FIELDS = dict(dec_refine=0, dec_refine_ch=None)  # the conv refinement, now dec_head='conv'


def resize_image(x, s):
    """x (B, 3, H, W) resized by the factor s (antialiased bicubic, clamped to [0, 1])."""
    if s == 1:
        return x
    size = (round(s * x.shape[-2]), round(s * x.shape[-1]))
    return F.interpolate(x, size=size, mode='bicubic', align_corners=False, antialias=True).clamp(0, 1)


class Tokenizer(nn.Module):
    """Encoder + quantizer + decoder. With quantizer='tvq' (texture VQ, docs/method.md#texture-vq)
    the encoder emits C + C_L channels: the first C are the texture map F_H, quantized by a
    GroupedVQ with G = 1; the last C_L, area-pooled by tvq_struct_pool, the continuous structure
    map F_L. The decoder reads [F_H^vq, F_L bilinearly upsampled to the token grid] (C + C_L
    channels), and a small structure autoencoder (struct_encoder / struct_decoder) on x downsampled
    by tvq_down gives F_down, the target F_L is aligned to."""
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.tvq = c.quantizer == 'tvq'
        c_l = c.tvq_struct_dim if self.tvq else 0   # structure channels beside the quantized ones
        self.encoder = ViTEncoder(c.patch, c.enc_width, c.enc_depth, c.enc_heads, c.latent_dim + c_l,
                                  c.mlp_ratio, c.rope_base)
        vq = (c.beta, c.vq_data_init, c.vq_restart_dead, c.vq_restart_every, c.vq_dead_threshold)
        if c.quantizer == 'msrq':
            self.quantizer = MultiScaleRQ(c.latent_dim, c.codebook_size, c.rq_steps, c.rq_scales,
                                          c.rq_phi, c.rq_phi_ratio, *vq)
        else:
            self.quantizer = GroupedVQ(c.latent_dim, c.groups, c.codebook_size, *vq)
        self.decoder = ViTDecoder(c.patch, c.dec_width, c.dec_depth, c.dec_heads, c.latent_dim + c_l,
                                  c.mlp_ratio, c.rope_base, c.dec_overlap, c.dec_head, c.dec_conv_ch,
                                  c.dec_conv_blocks, c.dec_conv_up)
        if self.tvq:  # E_down, D_down: patch p * pool / down on x / down puts F_down on the grid of F_L
            p_down = c.patch * c.tvq_struct_pool // c.tvq_down
            self.struct_encoder = ViTEncoder(p_down, c.tvq_down_width, c.tvq_down_depth, c.tvq_down_heads,
                                             c.tvq_struct_dim, c.mlp_ratio, c.rope_base)
            self.struct_decoder = ViTDecoder(p_down, c.tvq_down_width, c.tvq_down_depth, c.tvq_down_heads,
                                             c.tvq_struct_dim, c.mlp_ratio, c.rope_base)

    model_args = property(lambda self: asdict(self.config))  # Tokenizer(TokenizerConfig(**model_args)) rebuilds it

    @property
    def last_layer(self):
        return self.decoder.last_layer  # where adaptive_gan_weight compares gradients

    def encode(self, x):
        """x (B, 3, H, W) -> zq_ste (B, C, h, w), idx (B, G, h, w), commit_loss, stats.
        tvq: those of the texture map F_H; encode_tvq also gives the structure map."""
        if self.tvq:
            return self.encode_tvq(x)[:4]
        return self.quantizer(self.encoder(x))

    def decode(self, zq_BChw, f_l=None, lr=None):
        """Latents -> image. tvq: zq is F_H^vq and f_l (B, C_L, h/pool, w/pool) the structure map,
        x_hat = D(F_H^vq, F_L) (TVQ&RAP Eq. 3). lr: the LR image, for a stage-3 LR-guided decoder."""
        if self.tvq:
            if f_l is None:
                raise ValueError("Tokenizer.decode: a texture-VQ tokenizer decodes its texture codes together "
                                 "with the structure map f_l (B, C_L, h/pool, w/pool)")
            up = F.interpolate(f_l.to(zq_BChw.dtype), size=zq_BChw.shape[-2:], mode='bilinear', align_corners=False)
            zq_BChw = torch.cat([zq_BChw, up], dim=1)                        # (B, C + C_L, h, w)
        return self.decoder(zq_BChw, lr)

    def decode_indices(self, idx_BGhw, k=None, f_l=None, lr=None):
        """Decode from indices; k (int or (B,)) active groups decodes a prefix (coarse image);
        tvq: f_l is the structure map that goes with the texture indices; lr as decode."""
        if isinstance(self.quantizer, MultiScaleRQ):
            return self.decode_steps(idx_BGhw)
        z = self.quantizer.lookup(idx_BGhw)
        if k is not None:
            z = mask_groups(z, k, self.config.groups)
        return self.decode(z, f_l, lr)

    def forward(self, x, k=None):
        """-> xrec (B, 3, H, W), idx (B, G, h, w) (msrq: a list of L step maps), commit_loss, stats.
        Quantize before masking so the commitment loss covers all groups (docs/method.md#group-masking)."""
        if self.tvq:
            zq, idx, commit, stats, f_l = self.encode_tvq(x)
            return self.decode(zq, f_l), idx, commit, stats
        zq, idx, commit, stats = self.encode(x)
        if k is not None:
            zq = mask_groups(zq, k, self.config.groups)
        return self.decoder(zq), idx, commit, stats

    # texture VQ only (docs/method.md#texture-vq)

    def encode_tvq(self, x):
        """[F_H, F_L] = E(x) (TVQ&RAP Eq. 1), F_H quantized with the one texture codebook:
        x (B, 3, H, W), H and W multiples of patch * tvq_struct_pool -> zq_ste (B, C, h, w),
        idx (B, 1, h, w), commit_loss, stats, f_l (B, C_L, h/pool, w/pool), continuous."""
        c = self.config
        if not self.tvq:
            raise ValueError("Tokenizer.encode_tvq needs quantizer='tvq'")
        side = c.patch * c.tvq_struct_pool
        if x.shape[-2] % side or x.shape[-1] % side:
            raise ValueError(f"Tokenizer.encode_tvq: image sides {tuple(x.shape[-2:])} must be multiples of "
                             f"patch x tvq_struct_pool = {side} (the structure map's cell)")
        z = self.encoder(x)                                                 # (B, C + C_L, h, w)
        f_h, f_l = z[:, :c.latent_dim], F.avg_pool2d(z[:, c.latent_dim:], c.tvq_struct_pool)
        zq, idx, commit, stats = self.quantizer(f_h)
        return zq, idx, commit, stats, f_l

    def structure_losses(self, x, f_l):
        """The structure branch (TVQ&RAP Eq. 2 and Sec. 3.1): x_down = x resized by 1 / tvq_down,
        F_down = E_down(x_down), x_down_hat = D_down(F_down). -> align = mean (F_L - sg[F_down])^2
        (the structure map pulled toward the small autoencoder's code, which itself learns only from
        its reconstruction), down_mse = mean (x_down_hat - x_down)^2 (Eq. 8), x_down_hat."""
        x_down = resize_image(x, 1 / self.config.tvq_down)                  # (B, 3, H/down, W/down)
        f_down = self.struct_encoder(x_down)                                # (B, C_L, H/(p pool), W/(p pool))
        x_down_hat = self.struct_decoder(f_down)
        align = (f_l.float() - f_down.detach().float()).pow(2).mean()
        return align, (x_down_hat.float() - x_down).pow(2).mean(), x_down_hat

    # multi-scale RQ only (docs/method.md#hierarchical-tokenization)

    def hierarchical(self, x, upto=None, decode=True, drop_B=None):
        """Algorithm 1 of H-VAR. For each target scale s_n (n < upto): encode x resized to s_n,
        subtract the contributions of every token already chosen (upsampled to this grid),
        quantize the rest with the steps of scale n, append the tokens; decode the sum on this grid.
        x (B, 3, H, W), H and W multiples of patch / s_1. drop_B (B,) bool: these samples' decoder
        inputs are the encoder features, unquantized (quantization dropout while fine-tuning).
        -> [decode (B, 3, s_n H, s_n W)] (empty if not decode), [idx (B, h_i, w_i)], commit, stats."""
        q, p = self.quantizer, self.config.patch
        if not isinstance(q, MultiScaleRQ):
            raise ValueError("Tokenizer.hierarchical needs quantizer='msrq'")
        H, W = x.shape[-2:]
        for s in q.scales:
            if (s * H) % p or (s * W) % p:
                raise ValueError(f"Tokenizer.hierarchical: {H}x{W} at scale {s} is not a multiple of patch {p}")
        shapes = q.step_shapes(H // p, W // p)
        pool = [] if self.training else None
        decs, idxs, commit = [], [], 0.0
        for n, s in enumerate(q.scales[:upto]):
            z = self.encoder(resize_image(x, s))                            # (B, C, s h, s w)
            if n == 0:
                q.before_quantize(z, shapes[:len(q.partition[0])])
            f_hat = q.decode_steps(idxs, z.shape[-2:]) if idxs else 0.0     # earlier tokens, this grid
            new, f_hat, c = q.quantize_steps(z, f_hat, q.partition[n], shapes, pool)
            idxs, commit = idxs + new, commit + c / len(q.scales[:upto])
            if decode:
                zq = z + (f_hat.to(z.dtype) - z).detach()                   # straight-through estimator
                if drop_B is not None:
                    zq = torch.where(drop_B[:, None, None, None], z, zq)
                decs.append(self.decoder(zq))
        stats = stats_from_counts(q.after_quantize(idxs, pool))
        return decs, idxs, commit, stats

    @torch.no_grad()
    def encode_hierarchical(self, x, upto=None):
        """Hierarchical tokens of x: [idx (B, h_i, w_i)] for the steps of scales 1..upto."""
        return self.hierarchical(x, upto, decode=False)[1]

    def decode_steps(self, idxs, upto=None):
        """Decode the steps of scales 1..upto (default: all) on the grid of scale upto: the image at
        s_upto x full size. idxs may be plain or hierarchical tokens (at least those steps)."""
        q = self.quantizer
        last = q.partition[(upto or len(q.scales)) - 1][-1]                 # its map is that scale's grid
        return self.decoder(q.decode_steps(idxs[:last + 1], idxs[last].shape[-2:]))

# -----------------------------------------------------------------------------
# 5. Generators (stage 2)
#
# The stage script owns the prior (not a submodule, see the top of this file) and saves its LoRA weights
# next to the generator's (prior.LoRAWeights); Generator only consumes what the prior yields: feat
# (B, feat_dim, hf, wf) for SFT and pooled [(B, d_s)] for the CLS tokens.

class CodebookHead(nn.Module):
    """head='codebook' of Generator (G groups) and NextScaleGenerator (G = 1), our option
    (docs/method.md#codebook-head). The generator's Linear(width -> C), zero at init, predicts a
    correction h to its start a (Generator: lr_anchor; H-VAR: the LR's residual of the step, skips):
    r = a + s h, s the RMS of a code entry (the correction in the codes' units), and group g scores its
    codes by distance, logits_k = -t_g ||r^g - e^g_k||^2 + const = t_g (2 r^g.e^g_k - ||e^g_k||^2),
    t_g = exp(log_t[g]) learned, e (G, K, C/G) a frozen copy of the tokenizer's codes (tie_codebook).
    So the untrained generator predicts the tokens of a and learns the correction."""
    def __init__(self, groups, codebook_size, latent_dim):
        super().__init__()
        self.register_buffer('codebook', torch.zeros(groups, codebook_size, latent_dim // groups))  # e
        self.register_buffer('code_scale', torch.ones(()))                                          # s
        self.log_t = nn.Parameter(torch.zeros(groups))

    def residual(self, h, a):
        """h, a (..., C): the Linear's correction and the start -> r = a + s h (..., C), the point the
        codes are scored against (top-1 = its nearest code in each group)."""
        return a.float() + self.code_scale * h.float()

    def forward(self, h, a):
        """h, a (..., C): the Linear's correction and the start -> logits (..., G, K)."""
        G, K, d = self.codebook.shape
        r = self.residual(h, a).unflatten(-1, (G, d))                                 # (..., G, d)
        e = self.codebook.float()                                                      # (G, K, d)
        with torch.autocast(r.device.type, enabled=False):  # distances in fp32: bf16 would reorder near codes
            logits = 2 * torch.einsum('...gd,gkd->...gk', r, e) - e.pow(2).sum(-1)
        return logits * self.log_t.exp()[:, None]                                      # (..., G, K)

    @torch.no_grad()
    def tie_codebook(self, codebook):
        """Copy the tokenizer's codes (G, K, C/G), or (K, C) of one codebook; start each group's
        inverse temperature at 1 / (median squared distance of a code to its nearest other code), so
        neighbouring codes differ by about one logit (the log in float64: the same on every device)."""
        e = codebook.float().view(self.codebook.shape)
        self.codebook.copy_(e)
        self.code_scale.fill_(float(e.pow(2).mean().sqrt()))
        d = torch.cdist(e, e).pow(2) + torch.diag(torch.full((e.shape[1],), float('inf'), device=e.device))
        self.log_t.copy_(-d.min(-1).values.median(-1).values.clamp_min(1e-12).double().log())

    @torch.no_grad()
    def calibrate_temperature(self, logits, target):
        """The temperatures' data init, before training (losses.calibrate_codebook_head): the logits
        (B, G, ..., K) of one batch are t_g times a fixed score, so set each log_t[g] to best_log_t, the
        grid value log_t[g] + 0.1 k (k = -100..20) that minimises the cross-entropy of the tokens
        (B, G, ...). -> (CE before, CE after), the means over the groups."""
        score = logits.float().movedim(1, -2) / self.log_t.exp()[:, None]                # (B, ..., G, K)
        out = []
        for g, log_t in enumerate(self.log_t.tolist()):
            score_NK, target_N = score[..., g, :].flatten(0, -2), target[:, g].flatten()
            ce = lambda lt: float(F.cross_entropy(score_NK * math.exp(lt), target_N))
            best_log_t = min([log_t + 0.1 * k for k in range(-100, 21)], key=ce)
            out.append((ce(log_t), ce(best_log_t)))
            self.log_t[g] = best_log_t
        return tuple(sum(c) / len(out) for c in zip(*out))  # (CE before, CE after)


@dataclass
class GeneratorConfig(ModelConfig):
    """Stage 2 (docs/method.md#generator). Defaults: generator.py's settings of the same names;
    groups, codebook_size and scale come from the tokenizer, feat_dim and pooled_dims from the prior."""
    patch: int                # HR pixels per token side; must equal the tokenizer's
    scale: int                # HR side / LR side; the patchifier has stride patch / scale on LR
    groups: int               # G output heads (the tokenizer's groups)
    codebook_size: int        # K logits per head (the tokenizer's K)
    width: int
    depth: int
    n_head: int
    mlp_ratio: float          # SwiGLU hidden = 2/3 * mlp_ratio * width
    rope_base: float
    stem_dim: int             # channels of the 3x3 conv before the stride-(patch/scale) patchifier
    use_sft: bool             # SFT: gamma, beta per block from the prior's spatial features
    sft_hidden: int           # channels of the SFT condition features (shared 1x1 projection)
    cls_tokens: str           # 'none' | 'single' (last stage's pooled vector) | 'multi' (one per stage)
    feat_dim: int             # prior spatial feature channels (0: no prior)
    pooled_dims: tuple        # prior pooled vector size per stage (empty: no prior)
    head: str                 # 'linear' (width -> G*K) | 'codebook' (a latent correction, distances to the codes)
    latent_dim: int           # C, the tokenizer's latent channels (head='codebook'; 0 in older checkpoints)

    def __post_init__(self):
        if isinstance(self.pooled_dims, list):
            self.pooled_dims = tuple(self.pooled_dims)  # a list from JSON / a config file is fine
        self.check_types()
        self.check_positive('patch', 'scale', 'groups', 'width', 'depth', 'n_head', 'stem_dim', 'sft_hidden')
        self.check_positive('codebook_size', minimum=2)
        if self.patch % self.scale:
            self.bad('patch', f"must be a multiple of scale={self.scale} (one LR cell of patch/scale pixels per token)")
        self.check_heads('width', 'n_head')
        self.check_choice('cls_tokens', 'none', 'single', 'multi')
        if self.feat_dim < 0 or not all(isinstance(d, int) and d >= 1 for d in self.pooled_dims):
            self.bad('pooled_dims' if self.feat_dim >= 0 else 'feat_dim', "sizes must be positive ints")
        if self.use_sft and self.feat_dim < 1:
            self.bad('use_sft', "needs the prior's feat_dim >= 1 (no prior: use_sft=False)")
        if self.cls_tokens != 'none' and not self.pooled_dims:
            self.bad('cls_tokens', "needs the prior's pooled_dims (no prior: cls_tokens='none')")
        self.check_choice('head', 'linear', 'codebook')
        if self.head == 'codebook' and (self.latent_dim < self.groups or self.latent_dim % self.groups):
            self.bad('latent_dim', f"must be a positive multiple of groups={self.groups} (the tokenizer's C)")

    n_cls = property(lambda self: {'none': 0, 'single': 1, 'multi': len(self.pooled_dims)}[self.cls_tokens])


class Generator(nn.Module):
    """LR image -> G x K logits per HR token position, one forward pass (docs/method.md#generator).

    SFT (SFTGAN-style): the prior map is projected once by a shared 1x1 conv to sft_hidden channels
    at its own resolution (projection and bilinear resize are both linear, so projecting first is
    the same map, computed on fewer pixels), resized to the token grid, SiLU; then per block two
    heads Linear -> SiLU -> Linear give gamma and beta (B, h*w, width). The heads' last layers are
    zero, so at init every block is exactly the unmodulated block. CLS tokens carry no SFT.
    CLS tokens: RMSNorm + Linear per stage vector (stages differ in size and scale), prepended,
    unrotated (n_prefix), dropped before the final norm.
    Output head: 'linear' gives the G x K logits of each token directly; 'codebook' (CodebookHead)
    starts from lr_anchor, so the untrained model predicts the tokens of the upsampled LR."""
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # first: it draws no weights, and log_t stays the first parameter (clip_grad_norm_'s order)
        self.codes = CodebookHead(c.groups, c.codebook_size, c.latent_dim) if c.head == 'codebook' else None
        s = c.patch // c.scale  # LR pixels per token side
        self.patchify = nn.Sequential(nn.Conv2d(3, c.stem_dim, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(c.stem_dim, c.width, s, stride=s))
        self.blocks = nn.ModuleList([Block(c.width, c.n_head, c.mlp_ratio) for _ in range(c.depth)])
        self.norm = RMSNorm(c.width)
        # the G heads of K logits, fused; head='codebook': the correction (C), zeroed below
        self.head = nn.Linear(c.width, c.latent_dim if self.codes is not None else c.groups * c.codebook_size)
        mlp = lambda: nn.Sequential(nn.Linear(c.sft_hidden, c.sft_hidden), nn.SiLU(),
                                    nn.Linear(c.sft_hidden, c.width))
        if c.use_sft:
            self.sft_in = nn.Conv2d(c.feat_dim, c.sft_hidden, 1)
            self.sft_gamma = nn.ModuleList([mlp() for _ in range(c.depth)])
            self.sft_beta = nn.ModuleList([mlp() for _ in range(c.depth)])
        dims = {'none': (), 'single': c.pooled_dims[-1:], 'multi': c.pooled_dims}[c.cls_tokens]
        self.cls_proj = nn.ModuleList([nn.Sequential(RMSNorm(d), nn.Linear(d, c.width)) for d in dims])
        init_transformer_weights(self, c.depth)
        if c.use_sft:  # after the generic init, which would overwrite them
            for m in (*self.sft_gamma, *self.sft_beta):
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)
        if self.codes is not None:
            nn.init.zeros_(self.head.weight)

    model_args = property(lambda self: asdict(self.config))  # the config's fields: rebuilds the model

    def forward(self, lr, prior_feat=None, prior_pooled=None, anchor=None):
        """lr (B, 3, H/s, W/s) in [0, 1]; prior_feat (B, feat_dim, hf, wf) when use_sft; prior_pooled
        [(B, pooled_dims[i])] per stage when cls_tokens != 'none'; anchor (B, C, h, w) when
        head='codebook' (lr_anchor) -> logits (B, G, h, w, K)."""
        c = self.config
        x, h, w = self.hidden(lr, prior_feat, prior_pooled)
        out = self.head(x)                                           # (B, h*w, G*K), or the correction (B, h*w, C)
        if self.codes is not None:
            if anchor is None or tuple(anchor.shape[1:]) != (c.latent_dim, h, w):
                raise ValueError(f"Generator: head='codebook' needs anchor (B, {c.latent_dim}, {h}, {w}), the "
                                 f"tokenizer's latent of the upsampled LR (model.lr_anchor), got "
                                 f"{None if anchor is None else tuple(anchor.shape)}")
            out = self.codes(out, anchor.float().flatten(2).transpose(1, 2))              # (B, h*w, G, K)
        return out.view(-1, h, w, c.groups, c.codebook_size).permute(0, 3, 1, 2, 4)   # (B, G, h, w, K)

    def hidden(self, lr, prior_feat=None, prior_pooled=None):
        """The trunk of forward: -> the normed image tokens (B, h*w, width), h, w."""
        c = self.config
        s = c.patch // c.scale
        if lr.dim() != 4 or lr.shape[1] != 3 or lr.shape[2] % s or lr.shape[3] % s:
            raise ValueError(f"Generator: expected LR images (B, 3, H, W) with H, W multiples of "
                             f"patch/scale={s}, got shape {tuple(lr.shape)}")
        if c.use_sft and prior_feat is None:
            raise ValueError("Generator: use_sft=True needs prior_feat (B, feat_dim, hf, wf)")
        if c.cls_tokens != 'none' and (prior_pooled is None or len(prior_pooled) != len(c.pooled_dims)):
            raise ValueError(f"Generator: cls_tokens={c.cls_tokens!r} needs prior_pooled, a list of "
                             f"{len(c.pooled_dims)} pooled vectors")
        B = lr.shape[0]
        x_BWhw = self.patchify(lr * 2 - 1)  # (B, width, h, w), input in [-1, 1] like the encoder
        h, w = x_BWhw.shape[-2:]
        x = x_BWhw.flatten(2).transpose(1, 2)  # (B, h*w, width)
        if c.use_sft:
            cond = F.interpolate(self.sft_in(prior_feat.to(x.dtype)), size=(h, w), mode='bilinear',
                                 align_corners=False)
            cond = F.silu(cond.flatten(2).transpose(1, 2))  # (B, h*w, sft_hidden)
        n_prefix = c.n_cls
        if n_prefix:
            vecs = prior_pooled[-1:] if c.cls_tokens == 'single' else prior_pooled
            cls = torch.stack([proj(v.to(x.dtype)) for proj, v in zip(self.cls_proj, vecs)], 1)
            x = torch.cat([cls, x], dim=1)  # (B, n_cls + h*w, width)
        rope = rope_2d(h, w, c.width // c.n_head, c.rope_base, lr.device)
        for i, blk in enumerate(self.blocks):
            mod = None
            if c.use_sft:
                pad = x.new_zeros(B, n_prefix, c.width)  # CLS tokens: gamma = beta = 0
                mod = (torch.cat([pad, self.sft_gamma[i](cond)], 1),
                       torch.cat([pad, self.sft_beta[i](cond)], 1))
            x = blk(x, rope, mod, n_prefix)
        return self.norm(x[:, n_prefix:]), h, w  # CLS tokens dropped after the last block


GeneratorConfig.ADDED_FIELDS = dict(head='linear', latent_dim=0)  # checkpoints from before the codebook head


@dataclass
class TextureGeneratorConfig(GeneratorConfig):
    """Stage 2 on a texture-VQ tokenizer (docs/method.md#texture-predictor): a GeneratorConfig
    (groups = 1, the texture codebook's K) plus the tokenizer's structure-map shape."""
    struct_dim: int           # C_L of the tokenizer's structure map (tvq_struct_dim)
    struct_pool: int          # token-grid cells per structure cell side (tvq_struct_pool)

    def __post_init__(self):
        super().__post_init__()
        self.check_positive('struct_dim', 'struct_pool')
        if self.head != 'linear':
            self.bad('head', "the texture predictor has the linear head only")


class TextureGenerator(Generator):
    """The Generator with a second head: the same tokens, area-pooled by struct_pool, regress the
    continuous structure map F_L (RMS-normed tokens -> Linear to C_L), next to the texture logits."""
    def __init__(self, config):
        super().__init__(config)
        self.struct_head = nn.Linear(config.width, config.struct_dim)
        nn.init.normal_(self.struct_head.weight, std=0.02)
        nn.init.zeros_(self.struct_head.bias)

    def forward(self, lr, prior_feat=None, prior_pooled=None, anchor=None):
        """-> logits (B, 1, h, w, K) of the texture indices, f_l (B, C_L, h/pool, w/pool) (anchor unused);
        lr sides must be multiples of pool * patch / scale (8 LR pixels with patch 8, pool 4)."""
        c = self.config
        side = c.struct_pool * c.patch // c.scale
        if lr.dim() == 4 and (lr.shape[-2] % side or lr.shape[-1] % side):
            raise ValueError(f"TextureGenerator: LR sides {tuple(lr.shape[-2:])} must be multiples of "
                             f"struct_pool x patch / scale = {side}")
        x, h, w = self.hidden(lr, prior_feat, prior_pooled)
        B = x.shape[0]
        logits = self.head(x).view(B, h, w, c.groups, c.codebook_size).permute(0, 3, 1, 2, 4)
        cells = F.avg_pool2d(x.transpose(1, 2).reshape(B, c.width, h, w), c.struct_pool)  # (B, width, h/r, w/r)
        f_l = self.struct_head(cells.flatten(2).transpose(1, 2))                          # (B, h*w/r^2, C_L)
        return logits, f_l.transpose(1, 2).reshape(B, c.struct_dim, *cells.shape[-2:])


@torch.no_grad()
def lr_anchor(tokenizer, lr, scale=4):
    """What a Generator with head='codebook' starts from: the frozen encoder's latent (B, C, h, w)
    of lr (B, 3, h', w') upsampled bicubically by scale (h = scale h' / patch)."""
    up = F.interpolate(lr.float(), scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)
    return tokenizer.encoder(up.to(lr.dtype)).float()


# -----------------------------------------------------------------------------
# 5b. Next-scale generator (H-VAR, docs/method.md#next-scale-generator)
#
# Predicts the L steps of a multi-scale RQ tokenization one step at a time, conditioned on the
# frozen tokenizer encoder's features of the LR image upsampled to the target size. It works at the
# tokenizer's native size (token grid R = rq_steps[-1]), as VAR does; chain.hvar_super_resolve tiles larger images.

CLASS_DEGRADED, CLASS_BILINEAR, CLASS_FREE = 0, 1, 2  # H-VAR's 3 classes (the LR given to all three)


@dataclass
class NextScaleConfig(ModelConfig):
    """Stage 2 of H-VAR. patch, latent_dim, codebook_size, rq_steps and rq_scales come from the
    tokenizer; the rest are generator.py's settings of the same names."""
    patch: int                # HR pixels per token side (the tokenizer's)
    scale: int                # HR side / LR side
    latent_dim: int           # C: channels of the codes and of the condition (encoder) features
    codebook_size: int        # K logits per token (the shared codebook)
    rq_steps: tuple           # step sides on the native grid, R = rq_steps[-1] (the tokenizer's)
    rq_scales: tuple          # target scales s_n (the tokenizer's)
    hierarchical: bool        # targets from Algorithm 1 (True) or from the plain full-size RQ (False)
    scale_starts: bool        # codebook head, hierarchical: start from the LR's encoding at each step's scale
    head: str                 # 'linear' (VAR: width -> K) | 'codebook' (width -> C, logits from distances to the codes)
    width: int
    depth: int
    n_head: int
    mlp_ratio: float
    rope_base: float

    def __post_init__(self):
        self.rq_steps, self.rq_scales = tuple(self.rq_steps), tuple(self.rq_scales)  # lists from JSON
        self.check_types()
        self.check_positive('patch', 'scale', 'latent_dim', 'width', 'depth', 'n_head')
        self.check_positive('codebook_size', minimum=2)
        self.check_with(step_partition, self.rq_steps, self.rq_scales)
        self.check_heads('width', 'n_head')
        if (self.rq_steps[-1] * self.patch) % self.scale:
            self.bad('scale', f"must divide the native HR side {self.rq_steps[-1] * self.patch}")
        self.check_choice('head', 'linear', 'codebook')

    @property
    def hr_size(self):
        return self.rq_steps[-1] * self.patch      # the native HR side (training crops, sr.py tiles)


NextScaleConfig.ADDED_FIELDS = dict(head='linear', scale_starts=False)  # older checkpoints: their behaviour


class NextScaleGenerator(nn.Module):
    """Sequence [condition (R*R tokens) | step 1 (rho_1^2) | ... | step L (rho_L^2)], block-causal:
    the condition sees itself, step i sees the condition, itself and the steps before it.
    Token embedding: a linear map of the C-dim input + a learned step embedding (0 = condition)
    + the class embedding (CLASS_*) on every token.
    2D RoPE places every token on the full R x R grid: the condition at its cells, a step's cells
    at their centres ((a + 1/2) R / rho_i - 1/2), so all scales share one coordinate frame.
    Step inputs (VAR's teacher forcing, step_inputs): step 1 gets the condition area-pooled to
    rho_1; step i the sum of the code contributions of steps < i, area-pooled to rho_i. That sum is
    made on the grid of step i's target scale for hierarchical tokens (as Algorithm 1 made them)
    and on the full grid for plain ones.
    Output head: 'linear' is VAR's classifier (width -> K). 'codebook' (CodebookHead with G = 1)
    regresses the residual the tokenizer quantizes at step i, r_i = skip_i + s Linear(h), and scores
    the codes by their distance to it; skip_i = area(z_n, rho_i) - in_i (in_1 as 0), z_n the LR's
    encoding at step i's target scale (full size for plain tokens), is that residual of the LR's own
    tokens: the untrained model predicts them (docs/method.md#codebook-head)."""
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # first: it draws no weights, and log_t stays the first parameter (clip_grad_norm_'s order)
        self.codes = CodebookHead(1, c.codebook_size, c.latent_dim) if c.head == 'codebook' else None
        R, L = c.rq_steps[-1], len(c.rq_steps)
        self.cond_proj = nn.Linear(c.latent_dim, c.width)
        self.in_proj = nn.Linear(c.latent_dim, c.width)
        self.step_emb = nn.Embedding(L + 1, c.width)
        self.class_emb = nn.Embedding(3, c.width)
        self.blocks = nn.ModuleList([Block(c.width, c.n_head, c.mlp_ratio) for _ in range(c.depth)])
        self.norm = RMSNorm(c.width)
        self.head = nn.Linear(c.width, c.latent_dim if self.codes is not None else c.codebook_size)
        init_transformer_weights(self, c.depth)
        for e in (self.step_emb, self.class_emb):
            nn.init.normal_(e.weight, std=0.02)
        if self.codes is not None:
            nn.init.zeros_(self.head.weight)
        self.shapes = [(r, r) for r in c.rq_steps]
        parts = step_partition(c.rq_steps, c.rq_scales)
        n_of = {i: n for n, p in enumerate(parts) for i in p}                # step -> its target scale
        self.step_grid = [(c.rq_steps[parts[n_of[i]][-1]],) * 2 if c.hierarchical else (R, R) for i in range(L)]
        per_scale = c.head == 'codebook' and c.hierarchical and c.scale_starts   # the condition's scales
        self.cond_scales = c.rq_scales if per_scale else (1,)
        self.start_of = [n_of[i] if per_scale else 0 for i in range(L)]
        self.sizes = [R * R] + [r * r for r in c.rq_steps]          # tokens per block
        self.n_cond = R * R
        # positions on the full grid and the block-causal mask, for the longest sequence
        rows, cols = [], []
        for r in (R,) + tuple(c.rq_steps):
            centre = (torch.arange(r, dtype=torch.float64) + 0.5) * R / r - 0.5   # (r,)
            rows.append(centre.repeat_interleave(r))
            cols.append(centre.repeat(r))
        cos, sin = rope_angles(torch.cat(rows), torch.cat(cols), c.width // c.n_head, c.rope_base)
        block = torch.arange(L + 1).repeat_interleave(torch.tensor(self.sizes))  # (T,) block of each token
        self.register_buffer('rope_cos', cos, persistent=False)         # (T, hs/2)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.register_buffer('mask', block[:, None] >= block[None, :], persistent=False)  # (T, T)

    model_args = property(lambda self: asdict(self.config))  # the config's fields: rebuilds the model

    def skips(self, conds, inputs, first=0):
        """head='codebook': skip_i = area(z_n, rho_i) - in_i (in_1 as 0), z_n = conds[start_of[i]], for
        the steps of inputs (the first of them step `first`), step-major: (B, N, C). None for 'linear'."""
        if self.codes is None:
            return None
        out = [F.adaptive_avg_pool2d(conds[self.start_of[i]].float(), self.shapes[i]) - (t if i > 0 else 0)
               for i, t in enumerate(inputs, first)]
        return torch.cat([o.flatten(2).transpose(1, 2) for o in out], dim=1)

    def logits(self, h_BTd, skip_BTC=None, residual=False):
        """(B, T, width) and, for head='codebook', the skips (B, T, C) -> (B, T, K); residual=True (codebook
        head): (logits, the regressed residual r (B, T, C))."""
        h = self.head(self.norm(h_BTd))
        if self.codes is None:
            return h
        logits = self.codes(h, skip_BTC)[..., 0, :]
        return (logits, self.codes.residual(h, skip_BTC)) if residual else logits

    def embed_cond(self, cond_BChw, cls_B):
        R = self.config.rq_steps[-1]
        if cond_BChw.dim() != 4 or tuple(cond_BChw.shape[1:]) != (self.config.latent_dim, R, R):
            raise ValueError(f"NextScaleGenerator: expected condition features (B, {self.config.latent_dim}, "
                             f"{R}, {R}), got {tuple(cond_BChw.shape)}")
        x = self.cond_proj(cond_BChw.flatten(2).transpose(1, 2))              # (B, R*R, width)
        return x + self.step_emb.weight[0] + self.class_emb(cls_B)[:, None]

    def embed_step(self, i, in_BChw, cls_B):
        x = self.in_proj(in_BChw.flatten(2).transpose(1, 2))                  # (B, rho_i^2, width)
        return x + self.step_emb.weight[i + 1] + self.class_emb(cls_B)[:, None]

    def forward(self, conds, inputs, cls_B, residual=False):
        """Teacher-forced pass, one masked forward. conds from hvar_condition (the last (B, C, R, R):
        the condition tokens); inputs [(B, C, rho_i, rho_i)] of steps 1..n (n <= L), from step_inputs;
        cls_B (B,) long. -> logits (B, N, K) of those steps, N = sum_{i<=n} rho_i^2 (step-major);
        residual=True (codebook head): (logits, r (B, N, C))."""
        x = torch.cat([self.embed_cond(conds[-1], cls_B)] +
                      [self.embed_step(i, t, cls_B) for i, t in enumerate(inputs)], dim=1)
        T = x.shape[1]
        rope, mask = (self.rope_cos[:T], self.rope_sin[:T]), self.mask[:T, :T]
        for blk in self.blocks:
            x = blk(x, rope, attn_mask=mask)
        return self.logits(x[:, self.n_cond:], self.skips(conds, inputs), residual)

    def next_input(self, quantizer, idxs, i, acc):
        """Input of step i >= 1 from the tokens idxs of steps < i: the running sum acc = [f, grid]
        of their contributions on step i's grid (recomputed where the grid changes), area-pooled
        to rho_i. One function for teacher forcing and sampling, so both see the same inputs."""
        grid = self.step_grid[i]
        if acc[1] != grid:
            acc[0], acc[1] = quantizer.decode_steps(idxs[:i], grid), grid
        else:
            acc[0] = acc[0] + quantizer.contribution(i - 1, idxs[i - 1], grid)
        return F.adaptive_avg_pool2d(acc[0], self.shapes[i])

    def step_inputs(self, quantizer, conds, idxs):
        """Teacher-forcing inputs [(B, C, rho_i, rho_i)] of all L steps from the tokens idxs
        [(B, rho_i, rho_i)] (the last step's tokens are not needed)."""
        ins, acc = [F.adaptive_avg_pool2d(conds[-1].float(), self.shapes[0])], [None, None]
        for i in range(1, len(self.shapes)):
            ins.append(self.next_input(quantizer, idxs, i, acc))
        return ins

    @torch.no_grad()
    def generate(self, quantizer, conds, cls_B, top_k=1, temperature=1.0, cfg=0.0, kv_cache=True, rng=None):
        """Next-scale sampling. With kv_cache each step runs only its own tokens against the cached
        keys / values of the condition and the earlier steps; without, step i reruns the masked
        forward over the whole prefix. Per step: top_k=1 is argmax, k > 1 samples among the k most
        probable (sample_topk), 0 from the whole distribution, logits divided by temperature.
        cfg > 0: classifier-free guidance, (1 + cfg) l(c) - cfg l(0), l(0) with zero conds, class-free.
        -> [idx (B, rho_i, rho_i)] * L, [logits (B, rho_i^2, K)] * L (after guidance, before temperature)."""
        B, conds = len(cls_B), [c.float() for c in conds]
        if cfg > 0:
            conds = [torch.cat([c, torch.zeros_like(c)]) for c in conds]
            cls_B = torch.cat([cls_B, torch.full_like(cls_B, CLASS_FREE)])
        caches = [dict() for _ in self.blocks] if kv_cache else None
        if kv_cache:
            x = self.embed_cond(conds[-1], cls_B)
            rope = (self.rope_cos[:self.n_cond], self.rope_sin[:self.n_cond])
            for blk, cache in zip(self.blocks, caches):
                x = blk(x, rope, kv_cache=cache)                      # the condition sees only itself
        ins, acc, idxs, idxs2, out_logits = [F.adaptive_avg_pool2d(conds[-1], self.shapes[0])], [None, None], [], [], []
        for i, shape in enumerate(self.shapes):
            if kv_cache:
                lo = sum(self.sizes[:i + 1])
                rope = (self.rope_cos[lo:lo + self.sizes[i + 1]], self.rope_sin[lo:lo + self.sizes[i + 1]])
                x = self.embed_step(i, ins[i], cls_B)
                for blk, cache in zip(self.blocks, caches):
                    x = blk(x, rope, kv_cache=cache)                  # sees the cache and itself
                logits = self.logits(x, self.skips(conds, ins[i:i + 1], i)).float()  # (B or 2B, rho_i^2, K)
            else:
                logits = self(conds, ins, cls_B)[:, -self.sizes[i + 1]:].float()
            if cfg > 0:
                logits = (1 + cfg) * logits[:B] - cfg * logits[B:]
            k = logits.shape[-1] if top_k == 0 else top_k
            idx = sample_topk(logits / temperature if k > 1 else logits, k, rng).view(B, *shape)
            idxs.append(idx)
            out_logits.append(logits)
            idxs2.append(torch.cat([idx, idx]) if cfg > 0 else idx)   # both halves continue alike
            if i + 1 < len(self.shapes):
                ins.append(self.next_input(quantizer, idxs2, i + 1, acc))
        return idxs, out_logits


@torch.no_grad()
def hvar_condition(tokenizer, generator, lr, drop_B=None):
    """lr (B, 3, h, w) -> up, the LR bilinearly upsampled to the target size (B, 3, s h, s w), and
    conds: the frozen encoder's features of up resized to each of generator.cond_scales, [(B, C,
    s_n R, s_n R)], the last at full size (the condition tokens); zero where drop_B (B,) is True."""
    up = F.interpolate(lr, scale_factor=generator.config.scale, mode='bilinear', align_corners=False).clamp(0, 1)
    keep = 1.0 if drop_B is None else (~drop_B).float()[:, None, None, None]
    return up, [tokenizer.encoder(resize_image(up, s)).float() * keep for s in generator.cond_scales]


# -----------------------------------------------------------------------------
# 6. Helpers: group masking, top-K sampling

def mask_groups(zq_BChw, k, G):
    """Group masking (docs/method.md#group-masking): keep groups 1..k (channels [0, k*C/G)) and zero
    the rest. k: int or (B,) long."""
    B, C = zq_BChw.shape[:2]
    if C % G:
        raise ValueError(f"mask_groups: G={G} must divide C={C}")
    k = torch.as_tensor(k, device=zq_BChw.device).expand(B)
    group_of_ch = torch.arange(C, device=zq_BChw.device) // (C // G)  # (C,)
    keep = (group_of_ch[None] < k[:, None]).to(zq_BChw.dtype)  # (B, C)
    return zq_BChw * keep[:, :, None, None]


def sample_topk(logits, k, generator=None):
    """Stage 3 and H-VAR sampling (docs/method.md#decoder-fine-tuning): logits (..., K) -> indices (...,) drawn among
    the k most probable entries in proportion to their renormalised probabilities p_i / sum_{j in top-k} p_j, which is
    exactly softmax over the top-k logits. k = 1 is argmax (no randomness drawn)."""
    if k == 1:
        return logits.argmax(-1)
    top, cand = logits.float().topk(k, dim=-1)                          # (..., k) each
    p = top.softmax(-1).reshape(-1, k)
    choice = torch.multinomial(p, 1, generator=generator).view(top.shape[:-1])
    return cand.gather(-1, choice[..., None])[..., 0]
