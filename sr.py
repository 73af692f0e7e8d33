"""
Super-resolve real images 4x with a trained checkpoint chain: the stage-2 generator (its checkpoint
records the stage-1 tokenizer it was trained on) and, optionally, a stage-3 fine-tuned decoder.

    python sr.py --input=photo.jpg                         # -> out/sr/photo_x4.png
    python sr.py --input=my_folder/ --out_dir=out/sr_big --tile=96
    python sr.py --input=photo.jpg --decoder_ckpt=out/finetune_decoder/ckpt.pt

Any size: the LR image is padded (reflect) to a multiple of the generator's LR patch and, when
larger than `tile`, cut into overlapping tiles whose outputs are blended with linear ramps over the
overlap, so there are no seams. Grayscale, palette, RGBA (composited on white) and 16-bit inputs
are converted to RGB by data.load_image; an unreadable file is reported and skipped, the others
are still processed (exit code 1 if any failed).
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

import data


def _starts(n, tile, step):
    """Tile origins covering [0, n): regular steps, the last tile flush with the end."""
    if n <= tile:
        return [0]
    s = list(range(0, n - tile, step))
    return s + [n - tile]


def _ramp(n, overlap, lo_edge, hi_edge):
    """1-D blend weights of one tile: linear ramps over `overlap` on the sides that meet another
    tile, flat 1 on sides at the image border (so the border is never down-weighted)."""
    w = torch.ones(n)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap  # (0, 1), never exactly 0
        if not lo_edge:
            w[:overlap] = r
        if not hi_edge:
            w[n - overlap:] = torch.minimum(w[n - overlap:], r.flip(0))
    return w


def output_names(paths):
    """NAME_x4.png per input path; inputs whose names differ only in the extension (photo.jpg and
    photo.png in one folder) keep it, photo_jpg_x4.png and photo_png_x4.png, so none overwrites
    another. eval.py --sr=DIR reads NAME_x4.png."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clash = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{os.path.splitext(p)[1][1:]}_x4.png" if s in clash else f"{s}_x4.png"
            for s, p in zip(stems, paths)]


@torch.no_grad()
def tiled_sr(lr, fn, scale=4, tile=64, overlap=16, multiple=1):
    """Apply an x`scale` SR function `fn` ((1,3,h,w) -> (1,3,h*s,w*s)) to lr (1,3,H,W) in
    overlapping LR tiles of side `tile`, blending the outputs; tile=0 runs the whole image.
    The image is reflect-padded to a multiple of `multiple` LR pixels and the output cropped back."""
    _, _, H, W = lr.shape
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:  # reflect needs pad < size; replicate covers tiny images
        mode = 'reflect' if ph < H and pw < W else 'replicate'
        lr = F.pad(lr, (0, pw, 0, ph), mode=mode)
    Hp, Wp = lr.shape[-2:]
    if tile <= 0 or (Hp <= tile and Wp <= tile):
        return fn(lr)[..., :H * scale, :W * scale]
    if tile % multiple or overlap % multiple or not 0 <= overlap < tile:
        raise ValueError(f"sr.py: tile={tile} and overlap={overlap} must be multiples of the LR "
                         f"patch {multiple}, with 0 <= overlap < tile")
    out = torch.zeros(1, 3, Hp * scale, Wp * scale, device=lr.device)
    wsum = torch.zeros(1, 1, Hp * scale, Wp * scale, device=lr.device)
    ys, xs = _starts(Hp, tile, tile - overlap), _starts(Wp, tile, tile - overlap)
    for y in ys:
        for x in xs:
            th, tw = min(tile, Hp), min(tile, Wp)
            sr = fn(lr[..., y:y + th, x:x + tw])                                # (1,3,th*s,tw*s)
            wy = _ramp(th * scale, overlap * scale, y == 0, y + th == Hp)
            wx = _ramp(tw * scale, overlap * scale, x == 0, x + tw == Wp)
            w = (wy[:, None] * wx[None, :]).to(lr.device)[None, None]        # (1,1,th*s,tw*s)
            Y, X = y * scale, x * scale
            out[..., Y:Y + th * scale, X:X + tw * scale] += sr * w
            wsum[..., Y:Y + th * scale, X:X + tw * scale] += w
    return (out / wsum)[..., :H * scale, :W * scale]


if __name__ == '__main__':
    from configurator import configure, fail
    from common import pick_device, save_png
    from model import load_sr_chain, super_resolve
    # -----------------------------------------------------------------------------
    input = ''                              # an image file or a folder of images
    out_dir = 'out/sr'                      # <name>_x4.png per input
    gen_ckpt = 'out/generator/ckpt.pt'      # stage 2 (records its stage-1 tokenizer)
    decoder_ckpt = ''                       # stage-3 fine-tuned decoder; '' = the tokenizer's own
    tile = 64                               # LR tile side in pixels (0 = whole image at once)
    overlap = 16                            # LR pixels shared by neighbouring tiles
    device = 'auto'
    config = configure(globals())
    # -----------------------------------------------------------------------------
    if not input:
        fail("sr.py: set --input=FILE_OR_FOLDER")
    if tile < 0 or overlap < 0 or (tile > 0 and overlap >= tile):
        fail(f"sr.py: tile={tile}, overlap={overlap}: need tile >= 0 (0 = whole image) and 0 <= overlap < tile")
    if not os.path.exists(input):
        fail(f"sr.py: input '{input}' does not exist")
    paths = data.list_images(input) if os.path.isdir(input) else [input]
    if not paths:
        fail(f"sr.py: no images in folder '{input}'")
    device = pick_device(device)
    try:
        tokenizer, generator, prior = load_sr_chain(gen_ckpt, device, decoder_ckpt or None)
    except (FileNotFoundError, ValueError) as e:
        fail(f"sr.py: {e}")
    multiple = generator.config.patch // generator.config.scale     # LR pixels per token side
    if tile % multiple or overlap % multiple:
        fail(f"sr.py: tile={tile} and overlap={overlap} must be multiples of the generator's LR patch {multiple}")
    fn = lambda x: super_resolve(x, tokenizer, generator, prior)
    os.makedirs(out_dir, exist_ok=True)
    failed = []
    for path, name in zip(paths, output_names(paths)):
        try:
            lr = data.load_image(path)[None].to(device)                     # (1,3,h,w)
        except data.ImageLoadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed.append(path)
            continue
        t0 = time.time()
        sr = tiled_sr(lr, fn, generator.config.scale, tile, overlap, multiple)
        dst = os.path.join(out_dir, name)
        save_png(sr[0], dst)                                            # atomic write
        print(f"{path}: {tuple(lr.shape[-2:])} -> {tuple(sr.shape[-2:])} in {time.time() - t0:.2f} s -> {dst}")
    print(f"done: {len(paths) - len(failed)} written to {out_dir}, {len(failed)} failed")
    sys.exit(1 if failed else 0)
