"""
A checkpoint chain as functions: build stage 2's models for a tokenizer (stage2_models), load a
trained chain (load_sr_chain), run it on LR images (super_resolve, hvar_super_resolve, sr_function;
coarse_to_fine, the preview), tile any size through it (tiled_sr), correct its colours (fix_colors)
and score it on the validation pairs (score, chain_rows, onepass_chain_rows, hvar_chain_rows).
sr.py, eval.py, bench.py, ablate.py and the stage scripts import them; docs/method.md#inference.
"""
import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from common import batched, load_checkpoint, resolve_record, to_uint8, weights_id
from configurator import config_from_settings
from degradation import RGB_TO_YCC, YCC_TO_RGB, bicubic_upsample
from metrics import METRICS, evaluate
from model import (CLASS_DEGRADED, Generator, GeneratorConfig, NextScaleConfig, NextScaleGenerator,
                   TextureGenerator, TextureGeneratorConfig, Tokenizer, TokenizerConfig, hvar_condition, lr_anchor,
                   resize_image)

MIN_TILE = 32  # LR pixels: smaller tiles give the generator and the prior little context
METHODS = dict(grouped='hitoksr', msrq='hvar', tvq='tvq')  # a tokenizer's quantizer -> the method its tokens call for


# -----------------------------------------------------------------------------
# building and loading a chain, inference (docs/method.md#inference)

def stage2_models(tcfg, s):
    """What stage 2 trains on a tokenizer of config tcfg, from generator.py's settings s (a dict; bench.py
    builds the same): the prior and the config of the generator of the method its tokens call for
    (METHODS: Generator, TextureGenerator or NextScaleGenerator). H-VAR has no prior, and
    use_prior=False switches off in s everything that needs one (SFT, CLS tokens, REPA, LoRA: the
    one-flag ablation). The prior's LoRA matrices are drawn from torch's global RNG.
    -> (prior_args or None, prior or None, config of the generator); s is updated in place."""
    from prior import build_sr_prior  # local: model.py works without the prior's packages
    method = METHODS[tcfg.quantizer]
    if not s['use_prior'] or method == 'hvar':
        s.update(use_prior=False, use_sft=False, cls_tokens='none', repa_weight=0.0, lora_rank=0)
    prior_args = (dict(name=s['prior_name'], feat_tap=s['prior_feat_tap'], lora_rank=s['lora_rank'],
                       lora_alpha=s['lora_alpha']) if s['use_prior'] else None)
    prior = build_sr_prior(prior_args)
    shared = dict(patch=tcfg.patch, scale=4, latent_dim=tcfg.latent_dim, codebook_size=tcfg.codebook_size)
    if method == 'hvar':
        gcfg = config_from_settings(NextScaleConfig, s, **shared, rq_steps=tcfg.rq_steps, rq_scales=tcfg.rq_scales,
                                    hierarchical=s['hvar_tokens'] == 'hierarchical', scale_starts=True)
    else:  # HiTokSR's generator; texture VQ's adds the tokenizer's structure-map shape
        derived = dict(shared, groups=tcfg.groups, feat_dim=prior.feat_dim if prior else 0,
                       pooled_dims=tuple(prior.pooled_dims) if prior else ())
        if method == 'tvq':
            derived.update(struct_dim=tcfg.tvq_struct_dim, struct_pool=tcfg.tvq_struct_pool)
        gcfg = config_from_settings(TextureGeneratorConfig if method == 'tvq' else GeneratorConfig, s, **derived)
    return prior_args, prior, gcfg


def load_tokenizer(path, device='cpu', what='--tok_ckpt'):
    """A stage-1 checkpoint -> Tokenizer (its EMA weights when kept) in eval mode, frozen, on device."""
    t = load_checkpoint(path, what, kind='tokenizer')
    tokenizer = Tokenizer(TokenizerConfig.from_dict(t['model_args']))
    tokenizer.load_state_dict(t.get('ema') or t['model'])
    return tokenizer.to(device).eval().requires_grad_(False)


def load_sr_chain(gen_ckpt, device='cpu', decoder_ckpt=None):
    """Stage-2 checkpoint -> (tokenizer, generator, prior) in eval mode, frozen, on device; the
    generator is a Generator (HiTokSR) or a NextScaleGenerator (H-VAR, no prior), as trained.
    The tokenizer is rebuilt from the path saved in the generator checkpoint (tok_ckpt: relative to
    the generator's folder first, then absolute) and must hold the very weights the generator was
    trained on (tok_id, common.weights_id); its decoder is replaced by decoder_ckpt's 'decoder' state
    dict when given (stage 3), which must have been fine-tuned for those weights too. A texture-VQ chain
    (method 'tvq') gives a TextureGenerator. prior is None for a
    generator trained with use_prior=False. A missing, unreadable or wrong kind of file raises
    FileNotFoundError / ValueError naming it."""
    from prior import LoRAWeights, build_sr_prior  # local: model.py works without the prior's packages
    g = load_checkpoint(gen_ckpt, '--gen_ckpt', kind='generator')
    tok_path = resolve_record(g['tok_ckpt'], gen_ckpt)  # beside the generator first: a moved project works
    t = load_checkpoint(tok_path, f"the tokenizer of {gen_ckpt}", kind='tokenizer')
    if TokenizerConfig.from_dict(t['model_args']) != TokenizerConfig.from_dict(g['tok_model_args']):  # old keys filled
        raise ValueError(f"{gen_ckpt} was trained on the tokenizer {tok_path} at step {g.get('tok_step')}, "
                         f"which now holds a tokenizer with other settings (step {t.get('step')})")
    tokenizer = Tokenizer(TokenizerConfig.from_dict(t['model_args']))
    tokenizer.load_state_dict(t.get('ema') or t['model'])  # the EMA weights when stage 1 kept them
    tok_id = weights_id(tokenizer.state_dict())
    if tok_id != g.get('tok_id'):  # the same file name can hold another run's weights
        raise ValueError(f"{gen_ckpt} was trained on the tokenizer {tok_path} at step {g.get('tok_step')} "
                         f"(weights {g.get('tok_id')}), which now holds other weights ({tok_id}, step {t.get('step')})")
    if decoder_ckpt is not None:
        d = load_checkpoint(decoder_ckpt, '--decoder_ckpt', kind='decoder')
        if d.get('tok_id') != tok_id:
            raise ValueError(f"{decoder_ckpt} is a decoder fine-tuned for another tokenizer (weights "
                             f"{d.get('tok_id')}) than the one of {gen_ckpt} ({tok_path}, weights {tok_id})")
        if any(k.startswith('upsampler.guide.') for k in d['decoder']):  # stage 3 with lr_guide
            tokenizer.decoder.add_lr_guide()
        tokenizer.decoder.load_state_dict(d['decoder'])
    if g.get('method', 'hitoksr') == 'hvar':
        generator = NextScaleGenerator(NextScaleConfig.from_dict(g['model_args']))
    elif g.get('method') == 'tvq':
        generator = TextureGenerator(TextureGeneratorConfig.from_dict(g['model_args']))
    else:
        generator = Generator(GeneratorConfig.from_dict(g['model_args']))
    generator.load_state_dict(g['generator'])
    prior = build_sr_prior(g['prior_args'])
    if prior is not None:
        LoRAWeights(prior).load_state_dict(g['prior_lora'])
    mods = [m for m in (tokenizer, generator, prior) if m is not None]
    for m in mods:
        m.to(device).eval().requires_grad_(False)
    if prior is not None:  # a conv net: NHWC is what cuDNN's fast (bf16 tensor-core) kernels want
        prior.to(memory_format=torch.channels_last)
    return tokenizer, generator, prior


@torch.no_grad()
def predict_tokens(lr, tokenizer, generator, prior=None):
    """lr (B, 3, h, w) in [0, 1] -> the generator's top-1 indices (B, G, h', w') (docs/method.md#inference:
    always top-1) and, for a texture-VQ chain, its structure map f_l (B, C_L, h'/pool, w'/pool), else None."""
    from prior import upsample_for_prior
    c = generator.config
    feat, pooled = None, None
    if prior is not None:
        feat, pooled = prior(upsample_for_prior(lr, c.scale).contiguous(memory_format=torch.channels_last))
    anchor = lr_anchor(tokenizer, lr, c.scale) if c.head == 'codebook' else None  # (B, C, h', w')
    out = generator(lr, feat, pooled, anchor)
    logits, f_l = out if isinstance(out, tuple) else (out, None)  # a TextureGenerator adds F_L
    return logits.argmax(-1), f_l


@torch.no_grad()
def super_resolve(lr, tokenizer, generator, prior=None, return_indices=False):
    """lr (B, 3, h, w) in [0, 1] -> sr (B, 3, scale*h, scale*w) clamped to [0, 1]: top-1 indices
    of every group (predict_tokens), decoded by the tokenizer; a texture-VQ chain decodes them with
    the generator's structure map. With return_indices also the indices (B, G, h', w').
    Nothing here reads a tensor's value on the host (no .item(), no branch on data, no
    data-dependent shapes: tests/test_sr.py checks it), so on a GPU the whole chain is queued
    without waiting and can be captured as one CUDA graph (sr_function). The prior runs in
    channels-last (NHWC); its output, and so the result, equals the NCHW one bit for bit when
    load_sr_chain has made its weights channels-last too."""
    idx, f_l = predict_tokens(lr, tokenizer, generator, prior)
    sr = tokenizer.decode_indices(idx, f_l=f_l, lr=lr).float().clamp(0, 1)   # lr: an LR-guided decoder's guide
    return (sr, idx) if return_indices else sr


def preview_frames(tokenizer, generator):
    """What coarse_to_fine gives for this chain: [(label, factor)] per frame, coarse to fine."""
    if isinstance(generator, NextScaleGenerator):
        return [(f'x{f}', f) for f in output_scales(generator)]
    if tokenizer.config.quantizer == 'tvq':
        return [('structure map alone', generator.config.scale), ('structure + texture', generator.config.scale)]
    G = tokenizer.config.groups
    return [(f"{k} group{'s' if k > 1 else ''} of {G}", generator.config.scale) for k in range(1, G + 1)]


@torch.no_grad()
def coarse_to_fine(lr, tokenizer, generator, prior=None, **sample):
    """The coarse-to-fine sequence a token chain gives for free, all from one pass
    (docs/method.md#coarse-to-fine-preview): lr (B, 3, h, w) -> [frame (B, 3, f h, f w) in [0, 1]]
    as preview_frames lists them. HiTokSR: the top-1 tokens decoded with the first k = 1..G groups
    (the others zeroed, as in group masking); H-VAR: x1, x2, x4 of hvar_super_resolve (the sampling
    settings `sample`); texture VQ: the predicted structure map alone, as the tokenizer's structure
    autoencoder renders it (D_down(F_L), 1 / tvq_down of the output's size, enlarged nearest), then
    the full decode. The last frame is the chain's output (super_resolve)."""
    if isinstance(generator, NextScaleGenerator):
        return hvar_super_resolve(lr, tokenizer, generator, **sample)
    idx, f_l = predict_tokens(lr, tokenizer, generator, prior)
    full = tokenizer.decode_indices(idx, f_l=f_l, lr=lr).float().clamp(0, 1)
    if f_l is not None:
        down = tokenizer.struct_decoder(f_l).float().clamp(0, 1)          # (B, 3, H/down, W/down)
        r = tokenizer.config.tvq_down
        return [down.repeat_interleave(r, -2).repeat_interleave(r, -1), full]
    G = tokenizer.config.groups
    return [tokenizer.decode_indices(idx, k=k, lr=lr).float().clamp(0, 1) for k in range(1, G)] + [full]


def gaussian_blur(x, sigma):
    """Separable Gaussian low-pass of x (B, C, H, W), kernel radius ceil(3 sigma), reflect padding
    (replicate where the image is too small to reflect)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).to(x.device, x.dtype)
    C = x.shape[1]
    mode = 'reflect' if min(x.shape[-2:]) > r else 'replicate'
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def fix_colors(sr, lr, sigma):
    """Colour correction from the LR (docs/method.md#colour-correction): sr (B, 3, H, W) keeps its
    luma and the fine detail of its chroma, the chroma's low frequencies (Gaussian, sigma in sr's
    pixels) come from lr (B, 3, h, w) upsampled bicubically to sr's size. JFIF YCbCr; [0, 1]."""
    to_ycc = lambda x: torch.einsum('ij,bjhw->bihw', RGB_TO_YCC.to(x.device), x.float())
    up = F.interpolate(lr.float(), size=sr.shape[-2:], mode='bicubic', align_corners=False).clamp(0, 1)
    ycc, chroma_lr = to_ycc(sr), to_ycc(up)[:, 1:]
    chroma = ycc[:, 1:] - gaussian_blur(ycc[:, 1:], sigma) + gaussian_blur(chroma_lr, sigma)
    ycc = torch.cat([ycc[:, :1], chroma], 1)
    return torch.einsum('ij,bjhw->bihw', YCC_TO_RGB.to(sr.device), ycc).clamp(0, 1)


def hvar_cell(generator):
    """LR pixels per token side at an H-VAR generator's coarsest output scale (8 for patch 8, x4 and
    scales (0.25, 0.5, 1)): the step of every tile offset and overlap of hvar_super_resolve, so that
    each tile's token maps land on whole cells of every scale's grid."""
    c = generator.config
    per_token = [c.patch / (c.scale * s) for s in c.rq_scales]           # LR pixels per token side, per scale
    off_lattice = lambda v: abs(v - round(v)) > 1e-6
    if off_lattice(per_token[0]) or any(off_lattice(per_token[0] / p) for p in per_token):
        raise ValueError(f"hvar_cell: rq_scales={c.rq_scales} with patch {c.patch} at x{c.scale} do not put "
                         f"the scales' token grids on one lattice of LR pixels")
    return round(per_token[0])


@torch.no_grad()
def hvar_super_resolve(lr, tokenizer, generator, cls=CLASS_DEGRADED, top_k=1, temperature=1.0, cfg=0.0,
                       kv_cache=True, rng=None, return_indices=False, overlap=None):
    """H-VAR: lr (B, 3, H, W) -> [one image per target scale s_n: (B, 3, 4 s_n H, 4 s_n W)], i.e. x1
    (denoised), x2 and x4 for scales (0.25, 0.5, 1), all from the tokens of one pass (decode n uses
    the steps of scales 1..n); cls: the class (model.CLASS_*: 0 degraded, 1 bilinear-only, 2
    class-free); sampling settings as NextScaleGenerator.generate.
    The generator works at its tokenizer's native LR size n (hr_size / scale). At that size it is one
    token sequence per image (return_indices: also the tokens [idx (B, rho_i, rho_i)]). A larger
    image, with sides multiples of hvar_cell(generator), is cut into n x n tiles overlapping by
    `overlap` LR pixels (default n / 2, a multiple of the cell), all generated in one batch; at each
    scale the tiles' latent maps (the sum of their steps' contributions on that scale's grid) are
    blended with linear ramps over the overlap and the blend is decoded once
    (docs/method.md#tiles-in-latent-space): the decoder sees one continuous map and paints no tile edges."""
    c, cell = generator.config, hvar_cell(generator)
    side = c.hr_size // c.scale
    overlap = (side // 2 // cell * cell) if overlap is None else overlap
    H, W = lr.shape[-2:]
    if lr.dim() != 4 or H < side or W < side or H % cell or W % cell:
        raise ValueError(f"hvar_super_resolve: the generator works on LR images of at least {side}x{side} "
                         f"(its tokenizer's native {c.hr_size} px / {c.scale}) with sides multiples of {cell}, "
                         f"got {tuple(lr.shape)}; sr.py pads and tiles other sizes")
    if overlap % cell or not 0 <= overlap < side:
        raise ValueError(f"hvar_super_resolve: overlap={overlap} must be a multiple of {cell} in [0, {side})")
    B, ys, xs = len(lr), _starts(H, side, side - overlap), _starts(W, side, side - overlap)
    if return_indices and len(ys) * len(xs) > 1:
        raise ValueError(f"hvar_super_resolve: return_indices needs {side}x{side} images (one tile each)")
    tiles = torch.stack([lr[b, :, y:y + side, x:x + side] for b in range(B) for y in ys for x in xs])
    cls_B = torch.full((len(tiles),), cls, dtype=torch.long, device=lr.device)
    _, conds = hvar_condition(tokenizer, generator, tiles)
    idxs, _ = generator.generate(tokenizer.quantizer, conds, cls_B, top_k, temperature, cfg, kv_cache, rng)
    q, outs = tokenizer.quantizer, []
    for n in range(len(c.rq_scales)):
        last = q.partition[n][-1]                                            # scale n's last step
        g = idxs[last].shape[-1]                                             # its grid side per tile
        z = q.decode_steps(idxs[:last + 1], (g, g)).unflatten(0, (B, len(ys), len(xs)))  # (B, ny, nx, C, g, g)
        k = g / side                                                         # cells per LR pixel
        o = round(overlap * k)                                               # overlap in cells
        acc = z.new_zeros(B, z.shape[3] + 1, round(H * k), round(W * k))      # latent * weight, weight
        for i, y in enumerate(ys):
            wy = _ramp(g, o, y == 0, y + side == H, lr.device)
            for j, x in enumerate(xs):
                w = wy[:, None] * _ramp(g, o, x == 0, x + side == W, lr.device)[None, :]   # (g, g)
                Y, X = round(y * k), round(x * k)
                acc[:, :-1, Y:Y + g, X:X + g] += z[:, i, j] * w
                acc[:, -1:, Y:Y + g, X:X + g] += w
        outs.append(tokenizer.decoder(acc[:, :-1] / acc[:, -1:]).float().clamp(0, 1))
    return (outs, idxs) if return_indices else outs


def output_scales(generator):
    """The SR factors a generator's one pass yields: (4,) for HiTokSR, (1, 2, 4) for H-VAR's
    scales (0.25, 0.5, 1) at x4."""
    c = generator.config
    if isinstance(generator, NextScaleGenerator):
        return tuple(round(s * c.scale) for s in c.rq_scales)
    return (c.scale,)


def sr_function(tokenizer, generator, prior=None, device='cpu', compile=False, cuda_graphs=False, **sample):
    """super_resolve as one callable lr (B, 3, h, w) -> sr (B, 3, s*h, s*w), for sr.py and bench.py.
    compile=True wraps it in torch.compile (any device; on a CPU it costs minutes of start-up).
    cuda_graphs=True compiles with mode='reduce-overhead': on CUDA, each input shape is captured
    once as a CUDA graph and then replayed with one launch, which removes the per-kernel launch
    cost that dominates small images (sr.py's tiles all have one shape). It needs the sync-free
    forward above; elsewhere than on CUDA it is ignored. A graph's output is overwritten by the
    next call: use (or copy) it before calling again, as chain.tiled_sr does.
    An H-VAR generator (NextScaleGenerator) gives lr -> [sr at each of output_scales(generator)]
    (hvar_super_resolve, with the sampling settings `sample`); its step-by-step loop with a growing
    KV cache is not captured as a CUDA graph (cuda_graphs is ignored for it)."""
    if isinstance(generator, NextScaleGenerator):
        fn = lambda lr: hvar_super_resolve(lr, tokenizer, generator, **sample)
        return torch.compile(fn) if compile else fn
    fn = lambda lr: super_resolve(lr, tokenizer, generator, prior)
    cuda_graphs = cuda_graphs and str(device).startswith('cuda')
    if not (compile or cuda_graphs):
        return fn
    compiled = torch.compile(fn, mode='reduce-overhead' if cuda_graphs else 'default')

    def run(lr):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's output is consumed
        return compiled(lr)
    return run



def _starts(n, tile, step):
    """Tile origins covering [0, n): regular steps, the last tile flush with the end."""
    if n <= tile:
        return [0]
    s = list(range(0, n - tile, step))
    return s + [n - tile]


def _ramp(n, overlap, lo_edge, hi_edge, device=None):
    """1-D blend weights of one tile: linear ramps over `overlap` on the sides that meet another
    tile, flat 1 on sides at the image border (so the border is never down-weighted). Made on
    `device`: a copy from the host would make a GPU wait."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=torch.float32, device=device) + 0.5) / overlap  # (0, 1), never 0
        if not lo_edge:
            w[:overlap] = r
        if not hi_edge:
            w[n - overlap:] = torch.minimum(w[n - overlap:], r.flip(0))
    return w


def tile_warning(tile, overlap):
    """One line when the tiles are tiny (below MIN_TILE LR pixels) or overlap more than half their
    side (every LR pixel then goes through the models more than 4 times), else None."""
    if tile <= 0 or (tile >= MIN_TILE and 2 * overlap <= tile):
        return None
    return (f"sr.py: warning: tile={tile}, overlap={overlap} computes every LR pixel "
            f"{(tile / (tile - overlap)) ** 2:.0f} times on average; tiles below {MIN_TILE} LR pixels "
            f"or overlapping more than half their side are slow and see little context (default: --tile=64 --overlap=16)")


def pad_to_multiple(lr, multiple, min_size=0):
    """Pad (B, 3, H, W) at the bottom and right to multiples of `multiple`, and to at least
    min_size (reflect; replicate for images too small to reflect)."""
    H, W = lr.shape[-2:]
    ph, pw = max((-H) % multiple, min_size - H), max((-W) % multiple, min_size - W)
    if ph or pw:
        lr = F.pad(lr, (0, pw, 0, ph), mode='reflect' if ph < H and pw < W else 'replicate')
    return lr


@torch.no_grad()
def tiled_sr(lr, fn, scale=4, tile=64, overlap=16, multiple=1, batch_size=1, min_size=0, on_band=None):
    """Apply an x`scale` SR function `fn` ((n, 3, h, w) -> (n, 3, h*s, w*s), values in [0, 1]) to
    lr (B, 3, H, W) -> uint8 images (B, H*s, W*s, 3) on the host (common.to_uint8's rounding).
    scale may be a tuple of factors (s_1, ..., s_n) for a multi-scale fn that returns a list of n
    outputs (H-VAR's x1, x2, x4 from one pass): then a list of n uint8 arrays comes back.
    tile=0, or an image within one tile, is one call of fn for the whole batch. A larger image is
    cut into overlapping LR tiles of side `tile`, `batch_size` tiles per call, whose outputs are
    blended with linear ramps over the overlap. The tiles are streamed: one row band of tiles at a
    time is added into a float accumulator (colour and weight sums) on lr's device, and the rows no
    later band reaches are normalised and written into the uint8 output at once; the band's other
    rows carry over. Memory: the output (3 bytes per pixel), one band (16 bytes per pixel of a
    band, tile*s rows) and one call's tiles. Blending in this order gives the float sums of blending
    into a whole-image canvas, bit for bit. The image is reflect-padded to a multiple of `multiple`
    LR pixels and to at least min_size on each side (the smallest input fn takes: H-VAR's native size)
    and the output cropped back. on_band(done, total), when given, is
    called after each row band of tiles (sr.py's progress line for large images)."""
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,)
    f = fn if isinstance(scale, (tuple, list)) else (lambda x: [fn(x)])
    B, _, H, W = lr.shape
    lr = pad_to_multiple(lr, multiple, min_size)
    Hp, Wp = lr.shape[-2:]
    if tile <= 0 or (Hp <= tile and Wp <= tile):
        outs = [to_uint8(o[..., :H * s, :W * s]) for o, s in zip(f(lr), scales)]
        return outs if isinstance(scale, (tuple, list)) else outs[0]
    if tile % multiple or overlap % multiple or not 0 <= overlap < tile:
        raise ValueError(f"sr.py: tile={tile} and overlap={overlap} must be multiples of the LR "
                         f"patch {multiple}, with 0 <= overlap < tile")
    outs = [np.empty((B, H * s, W * s, 3), dtype=np.uint8) for s in scales]
    th, tw = min(tile, Hp), min(tile, Wp)
    ys, xs = _starts(Hp, tile, tile - overlap), _starts(Wp, tile, tile - overlap)
    wxs = [[_ramp(tw * s, overlap * s, x == 0, x + tw == Wp, lr.device) for x in xs] for s in scales]
    for b in range(B):
        carry = [lr.new_zeros(4, 0, Wp * s) for s in scales]  # sums of the rows the previous band shares with this one
        for i, y in enumerate(ys):
            bands = []
            for k, s in enumerate(scales):
                band = lr.new_zeros(4, th * s, Wp * s)  # rows [y*s, (y + th)*s): colour * weight, weight
                band[:, :carry[k].shape[1]] = carry[k]
                bands.append(band)
            wys = [_ramp(th * s, overlap * s, y == 0, y + th == Hp, lr.device) for s in scales]
            for j in range(0, len(xs), batch_size):
                srs = f(torch.stack([lr[b, :, y:y + th, x:x + tw] for x in xs[j:j + batch_size]]))
                for k, (s, sr) in enumerate(zip(scales, srs)):
                    for x, wx, sr_3hw in zip(xs[j:j + batch_size], wxs[k][j:j + batch_size], sr):
                        w = wys[k][:, None] * wx[None, :]                            # (th*s, tw*s)
                        bands[k][:3, :, x * s:(x + tw) * s] += sr_3hw * w
                        bands[k][3, :, x * s:(x + tw) * s] += w
            for k, s in enumerate(scales):
                Y, Y_next = y * s, (ys[i + 1] if i + 1 < len(ys) else Hp) * s  # first rows of this / next band
                rows = min(Y_next, H * s) - Y  # finished rows that are not padding
                if rows > 0:
                    outs[k][b, Y:Y + rows] = to_uint8(bands[k][:3, :rows, :W * s] / bands[k][3:, :rows, :W * s])
                carry[k] = bands[k][:, Y_next - Y:]
            if on_band is not None:
                on_band(b * len(ys) + i + 1, B * len(ys))
    return outs if isinstance(scale, (tuple, list)) else outs[0]


def hvar_padding(gen):
    """tiled_sr's multiple and min_size for an H-VAR generator: LR sides in whole cells of its
    coarsest scale (hvar_cell), at least its native size."""
    return dict(multiple=hvar_cell(gen), min_size=gen.config.hr_size // gen.config.scale)


@torch.no_grad()
def hvar_sr(lr, tok, gen, device='cpu', batch_size=4, tile=64, overlap=16):
    """An H-VAR generator's top-1 outputs of lr (N, 3, h, w) at every factor f of its one pass, as
    sr.py makes them (its default tile and overlap; hvar_super_resolve stitches the native tiles
    inside each) -> {f: (N, 3, f h, f w) in [0, 1]}; batch_size images per pass."""
    factors, fn = output_scales(gen), lambda y: hvar_super_resolve(y, tok, gen)
    parts = [tiled_sr(lr[i:i + batch_size].to(device), fn, factors, tile, overlap, batch_size=batch_size,
                      **hvar_padding(gen)) for i in range(0, len(lr), batch_size)]
    return {f: torch.from_numpy(np.concatenate(o)).permute(0, 3, 1, 2).float() / 255 for f, o in zip(factors, zip(*parts))}


@torch.no_grad()
def scale_decodes(tok, hr, tokenization='hierarchical', device='cpu', ctx=None, batch_size=4):
    """A multi-scale RQ tokenizer's decodes of hr at each target scale s_n: the tokens come from
    Algorithm 1 ('hierarchical') or from the plain full-size quantization ('plain'); decode n uses
    the steps of scales 1..n on the grid of scale n (docs/method.md#hierarchical-tokenization).
    -> [(s_n, decodes (N, 3, s_n H, s_n W) in [0, 1], targets: hr resized by s_n)], [idx (N, h_i, w_i)]."""
    scales = tok.quantizer.scales
    decs, idxs = [[] for _ in scales], []
    for i in range(0, len(hr), batch_size):
        x = hr[i:i + batch_size].to(device)
        with ctx or nullcontext():
            idx = tok.encode_hierarchical(x) if tokenization == 'hierarchical' else tok(x)[1]
            for n in range(len(scales)):
                decs[n].append(tok.decode_steps(idx, n + 1).float().clamp(0, 1).cpu())
        idxs.append([ix.cpu() for ix in idx])
    idxs = [torch.cat(step) for step in zip(*idxs)]
    return [(s, torch.cat(d), resize_image(hr, s)) for s, d in zip(scales, decs)], idxs


@torch.no_grad()
def preview(lr, tok, gen, prior=None, color_fix=0.0, device='cpu', batch_size=4):
    """coarse_to_fine on lr (N, 3, h, w), run as chain_rows and hvar_sr run the chain (whole images,
    batch_size at a time; H-VAR in sr.py's default tiles), every frame colour-corrected when
    color_fix > 0 (fix_colors, sigma in LR pixels, as sr.py) -> [(label, uint8 (N, f h, f w, 3))]."""
    frames = preview_frames(tok, gen)
    factors = tuple(f for _, f in frames)

    def fn(y):
        outs = coarse_to_fine(y, tok, gen, prior)
        return [fix_colors(o, y, color_fix * f) for o, f in zip(outs, factors)] if color_fix > 0 else outs
    hvar = isinstance(gen, NextScaleGenerator)
    tiles = dict(tile=64, overlap=16, batch_size=batch_size, **hvar_padding(gen)) if hvar else dict(tile=0)
    parts = [tiled_sr(lr[i:i + batch_size].to(device), fn, factors, **tiles) for i in range(0, len(lr), batch_size)]
    outs = [np.concatenate(p) for p in zip(*parts)]
    return [(label, o) for (label, _), o in zip(frames, outs)]


# -----------------------------------------------------------------------------
# a chain scored on the validation pairs (eval.py's tables, the stage scripts' references)

def score(name, sr, pairs, lpips_net, crop_border=4, patch=8, keep_images=False):
    """One table row: a method's outputs sr (N, 3, H, W) scored against pairs['hr']; keep_images
    adds them to the row ('images', for eval.py's report; not for the JSON)."""
    m = evaluate(sr, pairs['hr'], crop_border=crop_border, lpips_net=lpips_net, patch=patch)
    row = dict(name=name, n=len(sr), **{k: m[k] for k in METRICS}, per_image=dict(names=list(pairs['names']),
                                                                                **m['per_image']))
    return dict(row, images=sr) if keep_images else row


@torch.no_grad()
def hvar_chain_rows(pairs, tok, gen, lpips_net, crop_border=4, device='cpu',
                    kinds=('base', 'decode', 'sr_vs_decode', 'sr'), outs=None, keep_images=False):
    """Rows for an H-VAR chain: per output factor f of its one pass (x1 = denoising, x2, x4), of the
    kinds asked for: 'base' (x1: the degraded LR itself; else bicubic from it), 'decode' (the
    tokenizer's decode of HR's own tokens at that scale), 'sr' (the generator's top-1 output,
    hvar_sr, or outs[f] when given), each scored against HR resized by f / 4 with crop_border * f / 4
    pixels, and 'sr_vs_decode' (the same output scored against that decode: how far the generator
    is from the best its tokenizer can give). Every row also holds its f and kind (and with
    keep_images its images, as score)."""
    if {'sr', 'sr_vs_decode'} & set(kinds) and outs is None:
        outs = hvar_sr(pairs['lr'], tok, gen, device)
    if {'decode', 'sr_vs_decode'} & set(kinds):
        recs = scale_decodes(tok, pairs['hr'], 'hierarchical' if gen.config.hierarchical else 'plain', device)[0]
    rows = []
    for n, f in enumerate(output_scales(gen)):
        target = dict(hr=resize_image(pairs['hr'], f / 4), names=pairs['names'])
        border = max(1, round(crop_border * f / 4))
        for k in kinds:
            if k == 'base':
                images, name = ((pairs['lr'], 'degraded LR itself') if f == 1 else
                                (bicubic_upsample(pairs['lr'], f), 'bicubic (degraded LR)'))
            elif k == 'decode':
                images, name = recs[n][1], "tokenizer decode of HR's tokens"
            else:
                images, name = outs[f], 'H-VAR generator (top-1)'
            ref = target
            if k == 'sr_vs_decode':
                name, ref = f"{name} against the decode of HR's tokens", dict(hr=recs[n][1], names=pairs['names'])
            rows.append(dict(score(f"x{f}: {name}", images, ref, lpips_net, border, tok.config.patch, keep_images),
                             f=f, kind=k))
    return rows


@torch.no_grad()
def onepass_chain_rows(pairs, tok, gen, prior, lpips_net, crop_border=4, device='cpu', kinds=('base', 'decode', 'sr'),
                       outs=None, keep_images=False):
    """Rows for a one-pass chain (HiTokSR, texture VQ), of the kinds asked for: 'base' (bicubic from
    the degraded LR), 'decode' (the tokenizer's reconstruction of HR: an upper bound for any SR
    through this decoder) and 'sr' (the generator's top-1 tokens through the same decoder, or outs
    when given). Every row also holds its kind (and with keep_images its images, as score)."""
    images = lambda fn, xs: batched(lambda x: (fn(x).float().clamp(0, 1).cpu(),), xs, device=device)[0]
    made = dict(base=lambda: ('bicubic (degraded LR)', bicubic_upsample(pairs['lr'])),
                decode=lambda: ('stage 1: tokenizer reconstruction of HR', images(lambda x: tok(x)[0], pairs['hr'])),
                sr=lambda: ('stage 2: generator + stage-1 decoder', images(lambda y: super_resolve(y, tok, gen, prior),
                                                                          pairs['lr']) if outs is None else outs))
    rows = []
    for k in kinds:
        name, imgs = made[k]()
        rows.append(dict(score(name, imgs, pairs, lpips_net, crop_border, tok.config.patch, keep_images), kind=k))
    return rows


@torch.no_grad()
def chain_rows(pairs, gen_ckpt, decoder_ckpt, lpips_net, crop_border=4, device='cpu', compare_ckpt='',
               color_fix=0.0, keep_images=False):
    """Rows for a checkpoint chain on the degraded validation pairs: bicubic, the tokenizer's
    reconstruction of HR (an upper bound for any SR through this decoder), stage 2 (generator +
    stage-1 decoder) and, with decoder_ckpt, stage 3 (the fine-tuned decoder). Top-1 tokens.
    An H-VAR chain gives its rows per output scale (hvar_chain_rows); compare_ckpt adds the x4
    row of another chain (e.g. HiTokSR's stage 2 next to H-VAR). color_fix > 0 adds the last stage
    again after fix_colors with that sigma in LR pixels (H-VAR: its x4; a compared chain's row too), so
    that the last row scores what sr.py writes. keep_images: every row also holds its images (score)."""
    tok, gen, prior = load_sr_chain(gen_ckpt, device)
    if isinstance(gen, NextScaleGenerator):
        if decoder_ckpt:
            raise ValueError(f"--decoder_ckpt: {gen_ckpt} is an H-VAR chain, which has no stage 3")
        outs = hvar_sr(pairs['lr'], tok, gen, device)
        rows = hvar_chain_rows(pairs, tok, gen, lpips_net, crop_border, device, outs=outs, keep_images=keep_images)
        f = max(outs)
        if color_fix > 0:  # sr.py's output at x4
            rows.append(dict(score(f"{rows[-1]['name']} + colour correction ({color_fix:g} LR px)",
                                   fix_colors(outs[f], pairs['lr'], color_fix * f), pairs, lpips_net, crop_border,
                                   tok.config.patch, keep_images), f=f, kind='sr_color_fix'))
        if compare_ckpt:  # H-VAR's x4 stays last
            other = chain_rows(pairs, compare_ckpt, '', lpips_net, crop_border, device, color_fix=color_fix,
                               keep_images=keep_images)[-1]
            rows.insert(len(rows) - 1, dict(other, name=f"x{f}: {compare_ckpt} ({other['name']})", f=f, kind='compare'))
        return rows
    if decoder_ckpt and tok.config.quantizer == 'tvq':
        raise ValueError(f"--decoder_ckpt: {gen_ckpt} is a texture-VQ chain, which has no stage 3")
    sr, idx = batched(lambda y: [t.cpu() for t in super_resolve(y, tok, gen, prior, True)], pairs['lr'], device=device)
    rows = onepass_chain_rows(pairs, tok, gen, prior, lpips_net, crop_border, device, outs=sr, keep_images=keep_images)
    row = lambda name, imgs: score(name, imgs, pairs, lpips_net, crop_border, tok.config.patch, keep_images)
    if decoder_ckpt:  # the same top-1 tokens (b, G, h, w) through the fine-tuned decoder
        tok3, _, _ = load_sr_chain(gen_ckpt, device, decoder_ckpt)
        sr, = batched(lambda q, y: (tok3.decode_indices(q, lr=y).float().clamp(0, 1).cpu(),), idx, pairs['lr'],
                      device=device)
        rows.append(row('stage 3: generator + fine-tuned decoder', sr))
    if color_fix > 0:
        rows.append(row(f"{rows[-1]['name']} + colour correction ({color_fix:g} LR px)",
                        fix_colors(sr, pairs['lr'], color_fix * gen.config.scale)))
    return rows
