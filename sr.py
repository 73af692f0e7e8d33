"""
Super-resolve real images 4x with a trained checkpoint chain: the stage-2 generator (its checkpoint
records the stage-1 tokenizer it was trained on) and, optionally, a stage-3 fine-tuned decoder.

    python sr.py --input=photo.jpg                         # -> out/sr/photo_x4.png
    python sr.py --input=my_folder/ --out_dir=out/sr_big --tile=96
    python sr.py --input=photo.jpg --decoder_ckpt=out/finetune_decoder/ckpt.pt
    python sr.py --input=my_folder/ --device=cuda --batch_size=16 --cuda_graphs=True
    python sr.py --input=my_folder/ --gen_ckpt=out/generator_hvar/ckpt.pt --scales=1,2,4
                                                           # H-VAR: x1 (denoised), x2, x4 of one pass

Any size: the LR image is padded (reflect) to a multiple of the generator's LR patch and, when
larger than `tile`, cut into overlapping tiles whose outputs are blended with linear ramps over the
overlap, so there are no seams. The tiles are streamed into the output, one row band at a time, so
memory is the uint8 output image plus one band of tiles, whatever the image size (tiled_sr).
An H-VAR generator works at its tokenizer's native size only: every tile is that size (tile is
set to it; smaller images are padded), and its one pass yields all of --scales.
Images that fit one tile and have the same size as the files before them in the folder go through
the models together, `batch_size` at a time; a tiled image sends `batch_size` tiles per pass.
Grayscale, palette, RGBA (composited on white) and 16-bit inputs are converted to RGB by
data.load_image; an unreadable file is reported and skipped, the others are still processed (exit
code 1 if any failed).
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from common import to_uint8

MIN_TILE = 32  # LR pixels: smaller tiles give the generator and the prior little context


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


def output_names(paths, factor=4):
    """NAME_x4.png per input path (NAME_x<factor>.png); inputs whose names differ only in the
    extension (photo.jpg and photo.png in one folder) keep it, photo_jpg_x4.png and
    photo_png_x4.png, so none overwrites another. eval.py --sr=DIR reads NAME_x4.png."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clash = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{os.path.splitext(p)[1][1:]}_x{factor}.png" if s in clash else f"{s}_x{factor}.png"
            for s, p in zip(stems, paths)]


def pad_to_multiple(lr, multiple, min_size=0):
    """Pad (B, 3, H, W) at the bottom and right to multiples of `multiple`, and to at least
    min_size (reflect; replicate for images too small to reflect)."""
    H, W = lr.shape[-2:]
    ph, pw = max((-H) % multiple, min_size - H), max((-W) % multiple, min_size - W)
    if ph or pw:
        lr = F.pad(lr, (0, pw, 0, ph), mode='reflect' if ph < H and pw < W else 'replicate')
    return lr


@torch.no_grad()
def tiled_sr(lr, fn, scale=4, tile=64, overlap=16, multiple=1, batch_size=1, fixed_tile=False):
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
    LR pixels (fixed_tile: to at least `tile` on each side, so fn always gets tile x tile inputs,
    as a fixed-size generator needs) and the output cropped back."""
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,)
    f = fn if isinstance(scale, (tuple, list)) else (lambda x: [fn(x)])
    B, _, H, W = lr.shape
    lr = pad_to_multiple(lr, multiple)
    if fixed_tile:
        lr = pad_to_multiple(lr, multiple, min_size=tile)
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
    return outs if isinstance(scale, (tuple, list)) else outs[0]


def loaded(paths, failed):
    """(path, index, lr (3, h, w)) per readable image; an unreadable one is reported and added to
    `failed`, and the rest go on."""
    for i, path in enumerate(paths):
        try:
            yield path, i, data.load_image(path)
        except data.ImageLoadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed.append(path)


def runs(items, batch_size, key):
    """Consecutive items with equal key(item), at most batch_size per list; key None: alone."""
    run = []
    for item in items:
        k = key(item)
        if run and (len(run) == batch_size or k is None or k != key(run[0])):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


if __name__ == '__main__':
    from configurator import configure, fail
    from common import autocast_ctx, pick_device, save_png
    from model import load_sr_chain, sr_function
    # -----------------------------------------------------------------------------
    input = ''                              # an image file or a folder of images
    out_dir = 'out/sr'                      # <name>_x4.png per input
    gen_ckpt = 'out/generator/ckpt.pt'      # stage 2 (records its stage-1 tokenizer)
    decoder_ckpt = ''                       # stage-3 fine-tuned decoder; '' = the tokenizer's own
    tile = 64                               # LR tile side in pixels (0 = whole image at once)
    overlap = 16                            # LR pixels shared by neighbouring tiles
    batch_size = 1                          # images of one size (or tiles of one image) per forward pass; 16 on a GPU
    device = 'auto'
    dtype = 'auto'                          # auto (bf16 autocast on capable GPUs, else fp32) | float32 | bfloat16
    compile = False                         # torch.compile the chain (start-up minutes on a CPU)
    cuda_graphs = False                     # CUDA graphs per input shape (compile mode 'reduce-overhead'); CUDA only
    scales = (4,)                           # SR factors to write, NAME_x<s>.png; H-VAR: any of 1, 2, 4 (one pass)
    # H-VAR sampling (docs/method.md#next-scale-generator)
    top_k = 1                               # per step: 1 = argmax, k > 1 = among the k most probable, 0 = all
    temperature = 1.0
    cfg = 0.0                               # classifier-free guidance weight (0 = off)
    input_class = 0                         # 0 degraded LR, 1 bilinear-only LR (light correction), 2 null
    kv_cache = True
    seed = 0                                # of the sampling (top_k != 1)
    config = configure(globals())
    # -----------------------------------------------------------------------------
    if not input:
        fail("sr.py: set --input=FILE_OR_FOLDER")
    if tile < 0 or overlap < 0 or (tile > 0 and overlap >= tile):
        fail(f"sr.py: tile={tile}, overlap={overlap}: need tile >= 0 (0 = whole image) and 0 <= overlap < tile")
    if batch_size < 1:
        fail(f"sr.py: batch_size={batch_size} must be >= 1")
    if not os.path.exists(input):
        fail(f"sr.py: input '{input}' does not exist")
    paths = data.list_images(input) if os.path.isdir(input) else [input]
    if not paths:
        fail(f"sr.py: no images in folder '{input}'")
    device = pick_device(device)
    try:
        dtype, ctx = autocast_ctx(device, dtype)
        tokenizer, generator, prior = load_sr_chain(gen_ckpt, device, decoder_ckpt or None)
    except (FileNotFoundError, ValueError) as e:
        fail(f"sr.py: {e}")
    from model import NextScaleGenerator, output_scales
    scales = (scales,) if isinstance(scales, int) else tuple(scales)
    hvar = isinstance(generator, NextScaleGenerator)
    if not scales or any(s not in output_scales(generator) for s in scales):
        fail(f"sr.py: scales={scales}: this generator ({gen_ckpt}) yields the factors "
             f"{output_scales(generator)} in one pass")
    multiple = generator.config.patch // generator.config.scale     # LR pixels per token side
    multiple *= getattr(generator.config, 'struct_pool', 1)           # texture VQ: per structure cell
    if hvar:  # fixed size: the tokenizer's native grid
        native = generator.config.hr_size // generator.config.scale
        overlap = round(overlap * native / tile) if tile > 0 else native // 4   # the same share of the tile
        if tile != native:
            print(f"sr.py: tile={native} (the H-VAR generator's native LR size), overlap={overlap}", file=sys.stderr)
        tile, multiple = native, 1
    if tile % multiple or overlap % multiple:
        fail(f"sr.py: tile={tile} and overlap={overlap} must be multiples of the generator's LR patch {multiple}")
    if tile_warning(tile, overlap):
        print(tile_warning(tile, overlap), file=sys.stderr)
    if cuda_graphs and not device.startswith('cuda'):
        print(f"sr.py: cuda_graphs=True has no effect on {device}", file=sys.stderr)
    sample = dict(cls=input_class, top_k=top_k, temperature=temperature, cfg=cfg, kv_cache=kv_cache,
                  rng=torch.Generator(device).manual_seed(seed)) if hvar else {}
    chain = sr_function(tokenizer, generator, prior, device, compile, cuda_graphs, **sample)
    all_scales = output_scales(generator)

    def fn(lr):
        with ctx:
            out = chain(lr)
        out = out if hvar else [out]
        return [out[all_scales.index(s)] for s in scales]

    os.makedirs(out_dir, exist_ok=True)
    failed = []
    names = {s: output_names(paths, s) for s in scales}
    one_pass = lambda item: tuple(item[2].shape) if tile <= 0 or max(item[2].shape[1:]) <= tile else None
    for run in runs(loaded(paths, failed), batch_size, key=one_pass):  # equal sizes that fit one tile
        t0 = time.time()
        lr = torch.stack([item[2] for item in run]).to(device)         # (n, 3, h, w)
        srs = tiled_sr(lr, fn, scales, tile, overlap, multiple, batch_size, fixed_tile=hvar)  # [(n, H, W, 3) uint8]
        dt = (time.time() - t0) / len(run)
        for s, sr in zip(scales, srs):
            for (path, i, _), img in zip(run, sr):
                dst = os.path.join(out_dir, names[s][i])
                save_png(img, dst)                                          # atomic write
                batch = f" (batch of {len(run)})" if len(run) > 1 else ""
                print(f"{path}: {tuple(lr.shape[-2:])} -> {img.shape[:2]} in {dt:.2f} s{batch} -> {dst}")
    print(f"done: {len(paths) - len(failed)} written to {out_dir}, {len(failed)} failed")
    sys.exit(1 if failed else 0)
