"""
Super-resolve real images 4x with a trained checkpoint chain: the stage-2 generator (its checkpoint
records the stage-1 tokenizer it was trained on) and, optionally, a stage-3 fine-tuned decoder.
The chain itself (loading, inference, tiling, scoring) is chain.py; this file is the command.

    python sr.py --input=photo.jpg                         # -> out/sr/photo_x4.png
    python sr.py --input=my_folder/ --out_dir=out/sr_big --tile=96
    python sr.py --input=photo.jpg --decoder_ckpt=out/finetune_decoder/ckpt.pt
    python sr.py --input=my_folder/ --device=cuda --batch_size=16 --cuda_graphs=True
    python sr.py --input=my_folder/ --gen_ckpt=out/generator_hvar/ckpt.pt --scales=1,2,4
                                                           # H-VAR: x1 (denoised), x2, x4 of one pass
    python sr.py --input=photo.jpg --preview=True          # also photo_preview.png, photo_preview_anim.png

Any size: the LR image is padded (reflect) to a multiple of the generator's LR patch and, when
larger than `tile`, cut into overlapping tiles whose outputs are blended with linear ramps over the
overlap, so there are no seams. The tiles are streamed into the output, one row band at a time, so
memory is the uint8 output image plus one band of tiles, whatever the image size (tiled_sr).
An H-VAR generator works at its tokenizer's native size: inside each tile it generates native-size
tiles and stitches their latent maps before one decode (chain.hvar_super_resolve; smaller images are
padded up to the native size), and its one pass yields all of --scales.
Images that fit one tile and have the same size as the files before them in the folder go through
the models together, `batch_size` at a time; a tiled image sends `batch_size` tiles per pass.
Grayscale, palette, RGBA (composited on white) and 16-bit inputs are converted to RGB by
data.load_image; an unreadable file is reported and skipped, the others are still processed (exit
code 1 if any failed).
--preview=True also writes, per input, the coarse-to-fine frames the chain gives for free
(chain.coarse_to_fine: HiTokSR's first k = 1..G groups, H-VAR's x1 / x2 / x4, texture VQ's structure
map alone then the full decode; docs/method.md#coarse-to-fine-preview) at the output's size (coarser
frames enlarged, nearest): NAME_preview.png, the frames left to right, and NAME_preview_anim.png, an
animated PNG (APNG, exact colours) that loops through them. Every frame gets the output's colour
correction; the last one is the output. The preview runs the chain eagerly (compile is not used)
and holds one output-sized image per frame.
"""
import contextlib
import json
import os
import sys
import time

import torch

import data
from chain import (coarse_to_fine, fix_colors, hvar_padding, load_sr_chain, output_scales, preview_frames,
                   sr_function, tile_warning, tiled_sr)
from common import weights_id
from model import NextScaleGenerator


def output_names(paths, factor=4, tail=None):
    """NAME_x4.png per input path (NAME_x<factor>.png, or NAME_<tail>.png); inputs whose names differ
    only in the extension (photo.jpg and photo.png in one folder) keep it, photo_jpg_x4.png and
    photo_png_x4.png, so none overwrites another. eval.py --sr=DIR reads NAME_x4.png."""
    tail = tail or f'x{factor}'
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    clash = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{os.path.splitext(p)[1][1:]}_{tail}.png" if s in clash else f"{s}_{tail}.png"
            for s, p in zip(stems, paths)]


def loaded(paths, failed):
    """(path, index, lr (3, h, w)) per readable image; an unreadable one is reported and added to
    `failed`, and the rest go on."""
    for i, path in enumerate(paths):
        try:
            yield path, i, data.load_image(path)
        except data.ImageLoadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed.append(path)


MAX_WHOLE_PIXELS = 1024 * 1024  # LR pixels sr.py takes in one pass with tile=0; larger images must be tiled


def image_pixels(paths):
    """Sum of the images' pixel counts, read from their headers (for the time-left estimate)."""
    from PIL import Image
    total = 0
    for path in paths:
        try:
            with Image.open(path) as img:
                total += img.size[0] * img.size[1]
        except Exception:  # unreadable: reported when it is loaded
            pass
    return max(total, 1)


def progress_printer(path, t0, every=10.0):
    """on_band for tiled_sr: a line every `every` seconds on a large image, with the time left."""
    last = [t0]

    def report(done, total):
        now = time.time()
        if now - last[0] >= every and done < total:
            last[0] = now
            print(f"  {path}: {done}/{total} rows of tiles, about {(now - t0) / done * (total - done):.0f} s left",
                  flush=True)
    return report


def claim_sr_dir(out_dir, settings, outputs, overwrite):
    """Lock out_dir for this run (common.lock_out_dir: one run at a time, temp files of killed runs
    removed) and keep its outputs of one kind: out_dir/sr.json records the settings of the run that
    wrote them (the chain's weight ids, tile, scales, colour correction, ...). A run with other
    settings, or one that would replace files no sr.json accounts for, is refused unless overwrite,
    which first removes the earlier run's files. -> the names of the files of this kind already there."""
    from common import lock_out_dir, write_json
    from configurator import fail
    lock_out_dir(out_dir)
    manifest = os.path.join(out_dir, 'sr.json')
    try:
        with open(manifest) as f:
            before = json.load(f)
        if not isinstance(before, dict) or not isinstance(before.get('files'), list) or 'settings' not in before:
            raise ValueError
    except FileNotFoundError:
        before = None
    except ValueError:  # also JSONDecodeError
        fail(f"sr.py: '{manifest}' is not a record of an sr.py run: choose another --out_dir or delete it")
    if before is not None and before['settings'] == settings:
        return list(before['files'])
    unknown = before is None and [n for n in outputs if os.path.exists(os.path.join(out_dir, n))]
    if (before is not None or unknown) and not overwrite:
        what = (f"outputs of a run with other settings (differing: {', '.join(k for k in settings if before['settings'].get(k) != settings[k])})"
                if before is not None else f"files this run would replace ({' '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''})")
        fail(f"sr.py: out_dir '{out_dir}' holds {what}: choose another --out_dir, or pass --overwrite=True to "
             f"replace them")
    for n in (before or {}).get('files', []):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, os.path.basename(n)))
    write_json(dict(settings=settings, files=[]), manifest)
    return []


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
    from common import autocast_ctx, device_problems, dtype_problems, pick_device, save_png, write_json
    from report import enlarge, save_animation, strip
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
    input_class = 0                         # 0 degraded LR, 1 bilinear-only LR (light correction), 2 class-free
    kv_cache = True
    seed = 0                                # of the sampling (top_k != 1)
    color_fix = 2.0                         # > 0: the LR's low-frequency chroma, Gaussian sigma in LR px (fix_colors)
    preview = False                         # True: also the coarse-to-fine frames, NAME_preview(_anim).png
    overwrite = False                       # True: replace the outputs of a run with other settings in out_dir
    config = configure(globals())
    # -----------------------------------------------------------------------------
    if not input:
        fail("sr.py: set --input=FILE_OR_FOLDER")
    if tile < 0 or overlap < 0 or (tile > 0 and overlap >= tile):
        fail(f"sr.py: tile={tile}, overlap={overlap}: need tile >= 0 (0 = whole image) and 0 <= overlap < tile")
    if batch_size < 1:
        fail(f"sr.py: batch_size={batch_size} must be >= 1")
    if color_fix < 0:
        fail(f"sr.py: color_fix={color_fix} must be >= 0 (0 = off; a Gaussian sigma in LR pixels)")
    if not os.path.exists(input):
        fail(f"sr.py: input '{input}' does not exist")
    paths = data.list_images(input) if os.path.isdir(input) else [input]
    if os.path.isdir(input):
        hidden = sorted(f for f in os.listdir(input) if f.startswith('.') and f.lower().endswith(data.IMG_EXTS))
        if hidden:
            print(f"sr.py: skipping {len(hidden)} hidden file(s) in '{input}': {' '.join(hidden[:5])}"
                  f"{' ...' if len(hidden) > 5 else ''} (pass a file by name to process it)", file=sys.stderr)
    if not paths:
        fail(f"sr.py: no images in folder '{input}' (expected PNG/JPEG/... files: {' '.join(data.IMG_EXTS)})")
    problems = device_problems(device) + dtype_problems(dtype)
    if problems:
        fail('sr.py: ' + '; '.join(problems))
    device = pick_device(device)
    try:
        dtype, ctx = autocast_ctx(device, dtype)
        tokenizer, generator, prior = load_sr_chain(gen_ckpt, device, decoder_ckpt or None)
    except (FileNotFoundError, ValueError) as e:
        fail(f"sr.py: {e}")
    scales = (scales,) if isinstance(scales, int) else tuple(scales)
    hvar = isinstance(generator, NextScaleGenerator)
    if not scales or any(s not in output_scales(generator) for s in scales):
        fail(f"sr.py: scales={scales}: this generator ({gen_ckpt}) yields the factors "
             f"{output_scales(generator)} in one pass")
    if hvar:  # windows of whole coarsest-scale cells, each at least the native size (hvar_padding)
        pad = hvar_padding(generator)
        multiple, native = pad['multiple'], pad['min_size']
        if 0 < tile < native:
            fail(f"sr.py: tile={tile} is below the H-VAR generator's native LR size {native} (0 = whole image)")
    else:
        multiple = generator.config.patch // generator.config.scale     # LR pixels per token side
        multiple *= getattr(generator.config, 'struct_pool', 1)           # texture VQ: per structure cell
    if tile % multiple or overlap % multiple:
        fail(f"sr.py: tile={tile} and overlap={overlap} must be multiples of the generator's LR patch {multiple}"
             f"{' (H-VAR: a token side at its coarsest scale)' if hvar else ''}")
    if tile_warning(tile, overlap):
        print(tile_warning(tile, overlap), file=sys.stderr)
    if cuda_graphs and not device.startswith('cuda'):
        print(f"sr.py: cuda_graphs=True has no effect on {device}", file=sys.stderr)
    sample = dict(cls=input_class, top_k=top_k, temperature=temperature, cfg=cfg, kv_cache=kv_cache,
                  rng=torch.Generator(device).manual_seed(seed)) if hvar else {}
    all_scales = output_scales(generator)
    if preview:  # every frame of coarse_to_fine goes through the tiling; the outputs are among them
        labels, factors = zip(*preview_frames(tokenizer, generator))
        chain = lambda lr: coarse_to_fine(lr, tokenizer, generator, prior, **sample)
        keep = list(range(len(factors)))
        pick = [factors.index(s) for s in scales] if hvar else [len(factors) - 1]
        print(f"sr.py: preview frames, coarse to fine: {', '.join(labels)}")
        if compile or cuda_graphs:
            print("sr.py: --preview runs the chain eagerly: compile and cuda_graphs are not used", file=sys.stderr)
    else:
        chain = sr_function(tokenizer, generator, prior, device, compile, cuda_graphs, **sample)
        factors, keep, pick = scales, [all_scales.index(s) for s in scales], list(range(len(scales)))

    def fn(lr):
        with ctx:
            out = chain(lr)
        out = [out[k] for k in keep] if isinstance(out, (list, tuple)) else [out]
        return [fix_colors(o, lr, color_fix * f) for o, f in zip(out, factors)] if color_fix > 0 else out

    names = {s: output_names(paths, s) for s in scales}
    extra = dict(strip=output_names(paths, tail='preview'), anim=output_names(paths, tail='preview_anim')) \
        if preview else {}
    # out_dir: locked for this run; outputs of a run with other settings are never mixed with these
    settings = dict(generator=weights_id(generator.state_dict()), decoder=decoder_ckpt and weights_id(
        tokenizer.decoder.state_dict()), scales=list(scales), tile=tile, overlap=overlap, dtype=dtype,
        color_fix=color_fix, **({k: config[k] for k in ('top_k', 'temperature', 'cfg', 'input_class', 'seed')}
                                if hvar else {}))
    written = claim_sr_dir(out_dir, settings, [n for ns in list(names.values()) + list(extra.values()) for n in ns],
                           overwrite)
    failed, t_start, done_px = [], time.time(), 0
    total_px = None  # LR pixels of all inputs, known once the first image is read (sizes come from the headers)
    one_pass = lambda item: tuple(item[2].shape) if tile <= 0 or max(item[2].shape[1:]) <= tile else None
    for run in runs(loaded(paths, failed), batch_size, key=one_pass):  # equal sizes that fit one tile
        t0 = time.time()
        lr = torch.stack([item[2] for item in run]).to(device)         # (n, 3, h, w)
        if tile <= 0 and lr.shape[-1] * lr.shape[-2] > MAX_WHOLE_PIXELS:
            for path, _, _ in run:
                print(f"skipped: {path}: {tuple(lr.shape[-2:])} is too large for tile=0 (the whole image in one pass "
                      f"needs memory for {lr.shape[-1] * lr.shape[-2] * 16:,} tokens' activations and more; at most "
                      f"{MAX_WHOLE_PIXELS:,} LR pixels): use tiles, e.g. --tile=64", file=sys.stderr)
                failed.append(path)
            continue
        total_px = total_px or image_pixels(paths)
        report = progress_printer(run[0][0], t0) if len(run) == 1 else None
        srs = tiled_sr(lr, fn, factors, tile, overlap, multiple, batch_size, min_size=native if hvar else 0,
                       on_band=report)                                   # [(n, f H, f W, 3) uint8] per factor
        dt = (time.time() - t0) / len(run)
        outs = [srs[k] for k in pick]
        for s, sr in zip(scales, outs):
            for (path, i, _), img in zip(run, sr):
                save_png(img, os.path.join(out_dir, names[s][i]))           # atomic write
                written.append(names[s][i])
                write_json(dict(settings=settings, files=sorted(set(written))), os.path.join(out_dir, 'sr.json'))
        if preview:
            for j, (path, i, _) in enumerate(run):
                frames = [enlarge(f[j], *srs[-1].shape[1:3]) for f in srs]   # the last frame has the largest factor
                save_png(strip(frames), os.path.join(out_dir, extra['strip'][i]))
                save_animation(frames, os.path.join(out_dir, extra['anim'][i]))
                written += [extra['strip'][i], extra['anim'][i]]
                write_json(dict(settings=settings, files=sorted(set(written))), os.path.join(out_dir, 'sr.json'))
        done_px += lr.shape[0] * lr.shape[-1] * lr.shape[-2]
        left = (time.time() - t_start) / done_px * max(total_px - done_px, 0)
        for path, i, _ in run:
            batch = f" (batch of {len(run)})" if len(run) > 1 else ""
            print(f"[{i + 1}/{len(paths)}] {path}: {tuple(lr.shape[-2:])} -> {tuple(outs[-1].shape[1:3])} in {dt:.2f} s"
                  f"{batch} -> {os.path.join(out_dir, names[scales[-1]][i])}, about {left:.0f} s left")
    print(f"done: {len(paths) - len(failed)} written to {out_dir}, {len(failed)} failed")
    sys.exit(1 if failed else 0)
