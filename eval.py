"""
Image-quality metrics in the BasicSR convention the papers report (docs/method.md#metrics), the
LPIPS distance (usable as a training loss; its network with the real ImageNet AlexNet weights comes
from lpips_weights.py), the bicubic baseline, and a CLI that scores the validation pairs:

    python eval.py --sr=bicubic --lr_kind=degraded      # bicubic upsampling of the degraded LR
    python eval.py --sr=bicubic --lr_kind=bicubic       # ... of the clean bicubic-downsampled LR
    python eval.py --sr=out/my_model/val_png            # a folder of PNGs named like the val pairs
    python eval.py --sr=chain --gen_ckpt=out/generator/ckpt.pt   # a trained chain (HiTokSR or H-VAR)
    python eval.py --sr=chain --gen_ckpt=out/generator_hvar/ckpt.pt --compare_ckpt=out/generator/ckpt.pt
                                                        # H-VAR's x1 / x2 / x4 rows, HiTokSR's x4 beside

Conventions (all inputs are (B, 3, H, W) RGB floats in [0, 1]):
- psnr/ssim first round to 8-bit levels, (x * 255).round(), exactly as a saved PNG would be, so a
  tensor and the PNG written from it score identically (BasicSR's calculate_psnr/ssim take uint8
  images). Pass quantize=False to skip that. Then float64 on the 0-255 scale, BasicSR crop_border
  (pixels removed on every side), Y channel of BT.601 by default.
- PSNR of identical images is +inf (as BasicSR); means over images then are inf too.
- SSIM: 11x11 Gaussian window (sigma 1.5), 'valid' filtering, C1 = (0.01*255)^2,
  C2 = (0.03*255)^2; with y_channel=False the mean over R, G, B (BasicSR calculate_ssim).
- LPIPS: lpips package, AlexNet, v0.1, inputs scaled to [-1, 1]; computed on the full image
  (no crop_border), as pyiqa/BasicSR do.
"""
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import device_problems, write_json
from degradation import quantize_8bit  # round [0,1] images to the 256 levels a PNG stores
from lpips_weights import load_lpips  # the metric's network, re-exported: ev.load_lpips(device)

_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # SSIM stabilisers on the 0-255 scale


# ----------------------------------------------------------------------------- full-reference metrics

def _check_pair(sr, hr, what, crop_border=0):
    if not (torch.is_tensor(sr) and torch.is_tensor(hr)):
        raise ValueError(f"eval.{what}: sr and hr must be tensors")
    if sr.ndim != 4 or sr.shape[1] != 3 or sr.shape != hr.shape:
        raise ValueError(f"eval.{what}: expected sr and hr of one shape (B, 3, H, W), "
                         f"got {tuple(sr.shape)} and {tuple(hr.shape)}")
    H, W = sr.shape[-2:]
    if crop_border < 0 or 2 * crop_border >= min(H, W):
        raise ValueError(f"eval.{what}: crop_border={crop_border} leaves nothing of a {H}x{W} image")


def rgb_to_y(x):
    """BT.601 luma: (B, 3, H, W) RGB in [0,1] -> (B, 1, H, W) Y on the 0-255 scale, in [16, 235]
    (BasicSR rgb2ycbcr y_only; MATLAB's rgb2ycbcr). Keeps dtype and gradient."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def _prepare(sr, hr, crop_border, y_channel, quantize):
    """-> (sr, hr) float64 on the 0-255 scale, cropped, Y or RGB: (B, 1|3, H', W')."""
    out = []
    for x in (sr, hr):
        x = x.to(torch.float64)
        if quantize:
            x = quantize_8bit(x)
        if crop_border:
            x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        out.append(rgb_to_y(x) if y_channel else x * 255)
    return out


def psnr(sr, hr, crop_border=0, y_channel=True, quantize=True):
    """(B,) float64 PSNR in dB, peak 255; MSE over all pixels (and R,G,B when y_channel=False)."""
    _check_pair(sr, hr, 'psnr', crop_border)
    a, b = _prepare(sr, hr, crop_border, y_channel, quantize)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10 * torch.log10(255.0 ** 2 / mse)  # mse 0 -> inf, as BasicSR


def _gaussian_window(size=11, sigma=1.5, dtype=torch.float64, device='cpu'):
    # same numbers as cv2.getGaussianKernel(11, 1.5) used by BasicSR
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)  # (11, 11)


def ssim(sr, hr, crop_border=0, y_channel=True, quantize=True):
    """(B,) float64 SSIM (Wang et al. 2004) as BasicSR calculate_ssim: mean of the SSIM map over
    the 'valid' positions of the 11x11 window, averaged over channels for RGB."""
    _check_pair(sr, hr, 'ssim', crop_border)
    a, b = _prepare(sr, hr, crop_border, y_channel, quantize)  # (B, C, H', W')
    C = a.shape[1]
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"eval.ssim: needs at least 11x11 pixels after crop_border={crop_border}, "
                         f"got {tuple(sr.shape[-2:])}")
    w = _gaussian_window(device=a.device).expand(C, 1, 11, 11)
    filt = lambda t: F.conv2d(t, w, groups=C)  # valid filtering
    mu1, mu2 = filt(a), filt(b)
    s11 = filt(a * a) - mu1 ** 2
    s22 = filt(b * b) - mu2 ** 2
    s12 = filt(a * b) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + _C1) * (2 * s12 + _C2)) / ((mu1 ** 2 + mu2 ** 2 + _C1) * (s11 + s22 + _C2))
    return ssim_map.mean(dim=(1, 2, 3))


def grid_score(x, patch=8):
    """(B,) how visible a patch grid of period `patch` is: the mean absolute difference of
    neighbouring Y values (0-255) across the grid lines (between pixel kp-1 and kp, rows and
    columns) divided by the same mean between neighbours inside the patches. Natural photos give
    ~1.0; a tokenizer whose patches do not join up gives > 1.1. x (B, 3, H, W) in [0, 1], the grid
    anchored at the top-left pixel (as a decoder's patches are)."""
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) <= patch:
        raise ValueError(f"eval.grid_score: expected (B, 3, H, W) images larger than patch={patch}, "
                         f"got {tuple(x.shape)}")
    y = rgb_to_y(quantize_8bit(x.double()))[:, 0]                                  # (B, H, W)
    dx, dy = (y[:, :, 1:] - y[:, :, :-1]).abs(), (y[:, 1:] - y[:, :-1]).abs()    # (B,H,W-1), (B,H-1,W)
    on_x = (torch.arange(1, y.shape[2]) % patch == 0)                            # (W-1,) crosses a line
    on_y = (torch.arange(1, y.shape[1]) % patch == 0)                            # (H-1,)
    across = torch.cat([dx[:, :, on_x].flatten(1), dy[:, on_y].flatten(1)], 1).mean(1)
    inside = torch.cat([dx[:, :, ~on_x].flatten(1), dy[:, ~on_y].flatten(1)], 1).mean(1)
    return across / inside.clamp_min(1e-12)


def color_error(sr, hr, crop_border=0):
    """(B,) mean absolute difference of the chroma channels Cb and Cr (BT.601, 0-255 scale, as
    BasicSR rgb2ycbcr) of the 8-bit images: a colour shift that PSNR-Y and LPIPS barely see."""
    _check_pair(sr, hr, 'color_error', crop_border)
    a, b = _prepare(sr, hr, crop_border, False, True)                            # RGB on 0-255
    M = torch.tensor([[-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=a.dtype) / 255
    chroma = lambda t: torch.einsum('cr,brhw->bchw', M, t)                       # (B, 2, H', W')
    return (chroma(a) - chroma(b)).abs().mean(dim=(1, 2, 3))


def bicubic_upsample(lr, scale=4):
    """The bicubic baseline: (B, 3, h, w) -> (B, 3, scale*h, scale*w), clamped to [0, 1]."""
    if lr.ndim != 4:
        raise ValueError(f"eval.bicubic_upsample: expected (B, 3, h, w), got {tuple(lr.shape)}")
    return F.interpolate(lr, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------- LPIPS

def lpips_dist(net, sr, hr):
    """(B,) LPIPS distance; sr, hr (B, 3, H, W) in [0, 1]; gradients flow to both inputs."""
    _check_pair(sr, hr, 'lpips_dist')
    dt = next(net.parameters()).dtype
    return net(2 * sr.to(dt) - 1, 2 * hr.to(dt) - 1).view(-1)  # v0.1 expects [-1, 1]


# ----------------------------------------------------------------------------- evaluation + tables

_METRICS = ('psnr_y', 'ssim_y', 'lpips', 'grid', 'color_err')  # what evaluate() reports, in table order


@torch.no_grad()
def evaluate(sr, hr, crop_border=4, lpips_net=None, batch_size=8, patch=8):
    """Score sr against hr: {'psnr_y', 'ssim_y', 'lpips', 'grid', 'color_err': means (float),
    'per_image': lists}. grid is the grid score of sr at period `patch` (the tokenizer's), an
    absolute property of the image; color_err the mean |Cb, Cr| difference to hr.
    lpips_net=None loads the default net (cached); lpips_net=False skips LPIPS (value None).
    Everything is computed on the 8-bit-rounded images, so PNG files score the same."""
    _check_pair(sr, hr, 'evaluate', crop_border)
    # round in float64, like psnr/ssim do, so an image sitting on a .5 level rounds the same way
    sr, hr = quantize_8bit(sr.double()), quantize_8bit(hr.double())
    per = dict(psnr_y=psnr(sr, hr, crop_border).tolist(), ssim_y=ssim(sr, hr, crop_border).tolist())
    if lpips_net is False:
        per['lpips'] = None
    else:
        net = lpips_net if lpips_net is not None else load_lpips(sr.device)
        dev = next(net.parameters()).device
        per['lpips'] = torch.cat([lpips_dist(net, sr[i:i + batch_size].to(dev), hr[i:i + batch_size].to(dev)).cpu()
                                  for i in range(0, len(sr), batch_size)]).tolist()  # full image, no crop
    per['grid'] = grid_score(sr, patch).tolist()  # the whole image: a crop would move the grid
    per['color_err'] = color_error(sr, hr, crop_border).tolist()
    out = {k: (float(np.mean(v)) if v is not None else None) for k, v in per.items()}
    out['per_image'] = per
    return out


def score(name, sr, pairs, lpips_net, crop_border=4, patch=8):
    """One table row: a method's outputs sr (N, 3, H, W) scored against pairs['hr']."""
    m = evaluate(sr, pairs['hr'], crop_border=crop_border, lpips_net=lpips_net, patch=patch)
    return dict(name=name, n=len(sr), **{k: m[k] for k in _METRICS},
                per_image=dict(names=list(pairs['names']), **m['per_image']))


def per_image_rows(row):
    """A row's per-image values as rows (one per image), then its mean row."""
    p = row['per_image']
    rows = [dict(name=n, **{k: p[k][i] if p.get(k) is not None else None for k in _METRICS})
            for i, n in enumerate(p['names'])]
    return rows + [dict(row, name=f"**mean ({row['name']})**")]


def _fmt(v, digits):
    return '-' if v is None else f'{v:.{digits}f}'


def print_table(rows):
    """Markdown table of rows with keys name and _METRICS."""
    print('| name | PSNR-Y (dB) | SSIM-Y | LPIPS | grid score | colour error |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['name']} | {_fmt(r['psnr_y'], 2)} | {_fmt(r['ssim_y'], 4)} | {_fmt(r.get('lpips'), 4)} "
              f"| {_fmt(r.get('grid'), 3)} | {_fmt(r.get('color_err'), 2)} |")


def print_summary(row):
    """The grep-able block: one `key: value` per line."""
    print(f"psnr_y: {_fmt(row['psnr_y'], 2)}\nssim_y: {_fmt(row['ssim_y'], 4)}\nlpips: {_fmt(row.get('lpips'), 4)}\n"
          f"grid: {_fmt(row.get('grid'), 3)}\ncolor_err: {_fmt(row.get('color_err'), 2)}")


def load_sr_dir(sr_dir, names, shape):
    """PNGs of sr_dir named like the val pairs, NAME.png or sr.py's NAME_x4.png -> (N, 3, H, W);
    a missing or mis-sized file is named."""
    from data import load_image
    imgs = []
    for n in names:
        path = Path(sr_dir) / (n if Path(n).suffix else f'{n}.png')
        if not path.is_file() and (Path(sr_dir) / f'{n}_x4.png').is_file():
            path = Path(sr_dir) / f'{n}_x4.png'  # the folder sr.py writes
        if not path.is_file():
            raise FileNotFoundError(f"--sr={sr_dir}: missing {path} (expected one PNG per val pair, NAME.png "
                                    f"or NAME_x4.png: {', '.join(map(str, names))})")
        img = load_image(str(path))  # (3, H, W)
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"{path}: size {tuple(img.shape)}, expected {tuple(shape)} like the HR image")
        imgs.append(img)
    return torch.stack(imgs)


@torch.no_grad()
def hvar_chain_rows(pairs, tok, gen, lpips_net, crop_border=4, device='cpu', kinds=('base', 'decode', 'sr'),
                    outs=None):
    """Rows for an H-VAR chain: per output factor f of its one pass (x1 = denoising, x2, x4), of the
    kinds asked for: 'base' (x1: the degraded LR itself; else bicubic from it), 'decode' (the
    tokenizer's decode of HR's own tokens at that scale) and 'sr' (the generator's top-1 output,
    hvar_sr, or outs[f] when given), each scored against HR resized by f / 4 with crop_border * f / 4
    pixels. Every row also holds its f and kind."""
    from model import resize_image
    from sr import hvar_sr, output_scales, scale_decodes
    if 'sr' in kinds and outs is None:
        outs = hvar_sr(pairs['lr'], tok, gen, device)
    if 'decode' in kinds:
        recs = scale_decodes(tok, pairs['hr'], 'hierarchical' if gen.config.hierarchical else 'plain', device)[0]
    rows = []
    for n, f in enumerate(output_scales(gen)):
        target = dict(hr=resize_image(pairs['hr'], f / 4), names=pairs['names'])
        border = max(1, round(crop_border * f / 4))
        for k in kinds:
            if k == 'base':
                images, name = ((pairs['lr'], 'degraded LR itself') if f == 1 else
                                (bicubic_upsample(pairs['lr'], f), 'bicubic (degraded LR)'))
            else:
                images, name = ((recs[n][1], "tokenizer decode of HR's tokens") if k == 'decode' else
                                (outs[f], 'H-VAR generator (top-1)'))
            rows.append(dict(score(f"x{f}: {name}", images, target, lpips_net, border, tok.config.patch), f=f, kind=k))
    return rows


@torch.no_grad()
def chain_rows(pairs, gen_ckpt, decoder_ckpt, lpips_net, crop_border=4, device='cpu', compare_ckpt='',
               color_fix=0.0):
    """Rows for a checkpoint chain on the degraded validation pairs: bicubic, the tokenizer's
    reconstruction of HR (an upper bound for any SR through this decoder), stage 2 (generator +
    stage-1 decoder) and, with decoder_ckpt, stage 3 (the fine-tuned decoder). Top-1 tokens.
    An H-VAR chain gives its rows per output scale (hvar_chain_rows); compare_ckpt adds the x4
    row of another chain (e.g. HiTokSR's stage 2 next to H-VAR). color_fix > 0 adds the last stage
    again after sr.fix_colors with that sigma in LR pixels (HiTokSR and texture-VQ chains)."""
    from model import NextScaleGenerator
    from sr import fix_colors, load_sr_chain, super_resolve
    tok, gen, prior = load_sr_chain(gen_ckpt, device)
    if isinstance(gen, NextScaleGenerator):
        if decoder_ckpt:
            raise ValueError(f"--decoder_ckpt: {gen_ckpt} is an H-VAR chain, which has no stage 3")
        rows = hvar_chain_rows(pairs, tok, gen, lpips_net, crop_border, device)
        if compare_ckpt:
            other = chain_rows(pairs, compare_ckpt, '', lpips_net, crop_border, device)[-1]
            rows.insert(len(rows) - 1, dict(other, name=f"x4: {compare_ckpt} ({other['name']})"))  # H-VAR's x4 stays last
        return rows
    batches = lambda xs, bs=4: (xs[i:i + bs].to(device) for i in range(0, len(xs), bs))
    images = lambda outs: torch.cat([o.float().clamp(0, 1).cpu() for o in outs])
    outs = [super_resolve(y, tok, gen, prior, True) for y in batches(pairs['lr'])]  # top-1 (b, G, h, w)
    idx = [q for _, q in outs]
    p = tok.config.patch  # the grid score looks for this tokenizer's patch grid
    sr = images(sr for sr, _ in outs)
    rows = [score('bicubic (degraded LR)', bicubic_upsample(pairs['lr']), pairs, lpips_net, crop_border, p),
            score('stage 1: tokenizer reconstruction of HR', images(tok(x)[0] for x in batches(pairs['hr'])),
                  pairs, lpips_net, crop_border, p),
            score('stage 2: generator + stage-1 decoder', sr, pairs, lpips_net, crop_border, p)]
    if decoder_ckpt and tok.config.quantizer == 'tvq':
        raise ValueError(f"--decoder_ckpt: {gen_ckpt} is a texture-VQ chain, which has no stage 3")
    if decoder_ckpt:
        tok3, _, _ = load_sr_chain(gen_ckpt, device, decoder_ckpt)
        sr = images(tok3.decode_indices(q) for q in idx)
        rows.append(score('stage 3: generator + fine-tuned decoder', sr, pairs, lpips_net, crop_border, p))
    if color_fix > 0:
        rows.append(score(f"{rows[-1]['name']} + colour correction ({color_fix:g} LR px)",
                          fix_colors(sr, pairs['lr'], color_fix * gen.config.scale), pairs, lpips_net, crop_border, p))
    return rows


def scale_rows(tok, pairs, tokenization, lpips_net, crop_border=4, device='cpu', label=''):
    """Table rows of a multi-scale RQ tokenizer's reconstructions of pairs['hr'] at every scale."""
    from sr import scale_decodes
    rows = []
    for s, dec, target in scale_decodes(tok, pairs['hr'], tokenization, device)[0]:
        border = max(1, round(crop_border * s))
        rows.append(score(f"{label}{tokenization} tokens, decode at {s:g}x ({dec.shape[-1]} px)", dec,
                          dict(hr=target, names=pairs['names']), lpips_net, border, tok.config.patch))
    return rows


if __name__ == '__main__':
    from configurator import configure, fail
    sr = 'bicubic'                 # 'bicubic' (baseline from the LR inputs), 'chain' (checkpoints) or a folder of SR PNGs
    lr_kind = 'degraded'           # which LR the bicubic baseline upsamples: degraded | bicubic
    gen_ckpt = 'out/generator/ckpt.pt'  # sr='chain': the stage-2 checkpoint (it records its tokenizer)
    decoder_ckpt = ''              # sr='chain': a stage-3 checkpoint adds its row ('' = none)
    compare_ckpt = ''              # sr='chain' on an H-VAR chain: another chain's x4 row next to it (e.g. HiTokSR's)
    color_fix = 2.0                # sr='chain': the last stage again with sr.py's colour correction (0 = no such row)
    tok_ckpt = 'out/tokenizer_hrq/ckpt.pt'  # sr='scales': a multi-scale RQ tokenizer checkpoint
    tokenization = 'hierarchical'  # sr='scales': 'hierarchical' (Algorithm 1) | 'plain' | 'both'
    val_dir = 'assets/val_pairs'   # made by `python data.py`
    crop_border = 4                # = scale, BasicSR convention
    patch = 8                      # period of the patch grid the grid score looks for (a tokenizer's patch)
    device = 'cpu'                 # cpu | cuda | mps | auto
    name = ''                      # row name; '' -> bicubic_<lr_kind>, chain or the folder's name
    out_json = ''                  # '' -> out/eval/<name>.json
    config = configure(globals())
    if lr_kind not in ('degraded', 'bicubic'):
        fail(f"eval.py: lr_kind={lr_kind!r} must be degraded or bicubic")
    for key, path in (('gen_ckpt', gen_ckpt), ('decoder_ckpt', decoder_ckpt), ('compare_ckpt', compare_ckpt)):
        if sr == 'chain' and path and not os.path.isfile(path):
            fail(f"eval.py: {key}='{path}' not found (train that stage first or pass --{key}=PATH)")
    if sr == 'scales' and tokenization not in ('hierarchical', 'plain', 'both'):
        fail(f"eval.py: tokenization={tokenization!r} must be hierarchical, plain or both")
    if sr not in ('bicubic', 'chain', 'scales') and not os.path.isdir(sr):
        fail(f"eval.py: sr={sr!r} must be 'bicubic', 'chain', 'scales' or a folder of SR PNGs")
    if os.path.isdir(sr) and not any(f.lower().endswith('.png') for f in os.listdir(sr)):
        fail(f"eval.py: --sr={sr} holds no PNG files (expected one per validation pair, NAME.png or NAME_x4.png)")
    if name and not re.fullmatch(r'[\w][\w.+-]*', name):
        fail(f"eval.py: name={name!r} must be a plain file name (letters, digits, _ . + -), it names "
             f"out/eval/<name>.json")
    problems = device_problems(device)
    if problems:
        fail('eval.py: ' + '; '.join(problems))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'

    import data
    try:
        pairs = data.load_val_pairs(val_dir)
    except ValueError as err:
        fail(f"eval.py: {err}")
    if not 0 <= 2 * crop_border < min(pairs['hr'].shape[-2:]):
        fail(f"eval.py: crop_border={crop_border} must be >= 0 and leave some of the "
             f"{tuple(pairs['hr'].shape[-2:])} HR images")
    lpips_net = load_lpips(device)
    if sr == 'chain':
        name = name or 'chain'
        try:
            rows = chain_rows(pairs, gen_ckpt, decoder_ckpt, lpips_net, crop_border, device, compare_ckpt, color_fix)
        except (FileNotFoundError, ValueError) as err:
            fail(f"eval.py: {err}")
        print_table(rows)
        print()
        print_summary(rows[-1])
    elif sr == 'scales':  # a multi-scale RQ tokenizer's reconstructions at every scale (HR crops)
        from sr import load_tokenizer
        name = name or 'scales'
        try:
            tok = load_tokenizer(tok_ckpt, device)
        except (FileNotFoundError, ValueError) as err:
            fail(f"eval.py: {err}")
        if tok.config.quantizer != 'msrq':
            fail(f"eval.py: {tok_ckpt} holds a grouped-VQ tokenizer; sr=scales needs quantizer='msrq'")
        kinds = ('plain', 'hierarchical') if tokenization == 'both' else (tokenization,)
        rows = [r for t in kinds for r in scale_rows(tok, pairs, t, lpips_net, crop_border, device)]
        print_table(rows)
    else:
        if sr == 'bicubic':
            name = name or f'bicubic_{lr_kind}'
            sr_imgs = bicubic_upsample(pairs['lr' if lr_kind == 'degraded' else 'lr_bicubic'])
            if sr_imgs.shape != pairs['hr'].shape:
                fail(f"eval.py: {val_dir}: 4x the LR size {tuple(sr_imgs.shape)} != HR {tuple(pairs['hr'].shape)}")
        else:
            name = name or Path(sr).resolve().name
            try:
                sr_imgs = load_sr_dir(sr, pairs['names'], pairs['hr'].shape[1:])
            except (FileNotFoundError, ValueError) as err:  # missing, unreadable or mis-sized files
                fail(f"eval.py: {err}")
        rows = [score(name, sr_imgs, pairs, lpips_net, crop_border, patch)]
        print_table(per_image_rows(rows[0]))
        print()
        print_summary(rows[0])
    out_json = out_json or os.path.join('out', 'eval', f'{name}.json')
    write_json(dict(command=' '.join([os.path.basename(sys.executable)] + sys.argv), config=config,
                    rows=rows), out_json)
    print(f"wrote {out_json}")
