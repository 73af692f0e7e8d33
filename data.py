"""
Data for 4x super-resolution: loading photos, preparing the image folders, the training sampler
that makes (HR, LR) pairs on the fly with the Real-ESRGAN degradation of degradation.py, and the
fixed validation pairs. Library and script:

    python data.py                                   # prepares assets/images/{train,val} + assets/val_pairs
    python data.py --train_src=DIR --val_src=DIR     # any folders of photos instead of the Debian ones
"""
import fnmatch
import glob
import json
import math
import os
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageOps

from common import save_png, write_json
from degradation import RGB_TO_YCC, YCC_TO_RGB, DegradeConfig, bicubic_downsample, degrade, quantize_8bit

IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.gif')


class ImageLoadError(ValueError):
    pass

# -----------------------------------------------------------------------------
# image files


def list_images(folder):
    """Sorted image files directly in `folder` (hidden files, e.g. our temp files, are skipped)."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder '{folder}' does not exist (expected a folder of PNG/JPEG files)")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMG_EXTS) and not f.startswith('.'))


def _read_rgb(path):
    """-> float32 (H, W, 3) in [0, 1]. Alpha is composited on white (what a viewer shows for a
    transparent PNG; opaque photos are unchanged). 16-bit grey keeps its precision."""
    try:
        with Image.open(path) as src:
            src.load()  # decodes now: a truncated file raises here instead of giving grey rows
            frames = getattr(src, 'n_frames', 1)
            img = ImageOps.exif_transpose(src)  # camera photos store their rotation in EXIF
            img = img.copy() if img is src else img  # usable after the file is closed
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), IsADirectoryError, ...
        raise ImageLoadError(f"cannot load image '{path}': expected a readable PNG/JPEG/... file "
                             f"({type(e).__name__}: {e})") from None
    if frames > 1:  # an animated GIF / PNG / WebP, a multi-page TIFF
        warnings.warn(f"'{path}' holds {frames} frames: only the first is used")
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):  # 16-bit grey (PNG 16-bit opens as I or I;16)
        g = np.asarray(img, dtype=np.float32) / (255.0 if img.mode == 'F' else 65535.0)
        return np.repeat(np.clip(g, 0, 1)[..., None], 3, axis=2)
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert('RGB'), dtype=np.float32) / 255.0  # L, P, CMYK, YCbCr, 1, RGB


def load_image(path):
    """-> (3, H, W) float32 RGB in [0, 1]; raises ImageLoadError(ValueError) naming the file."""
    return torch.from_numpy(_read_rgb(path)).permute(2, 0, 1).contiguous()


def _unique_names(paths):
    """Output names: the file stem, or for clashing stems (the plasma wallpapers are all
    NAME/contents/images/2560x1600.jpg) the nearest parent folder that tells them apart."""
    parts = [os.path.normpath(os.path.splitext(p)[0]).split(os.sep)[::-1] for p in paths]  # stem, parents
    names = []
    for p in parts:
        others = [q for q in parts if q is not p and q[0] == p[0]]  # files with the same stem
        depth = 0
        while others and depth + 1 < len(p) and any(len(q) > depth and q[depth] == p[depth] for q in others):
            depth += 1  # walk up until this folder name differs from every clashing file's
        names.append(p[depth])
    return names


def prepare_images(src_paths, dst_dir, downscale=2):
    """Downscale each photo by `downscale` (PIL LANCZOS, antialiased: averages away the JPEG
    blocking of the sources) and write dst_dir/NAME.png. Existing outputs are kept (idempotent);
    unreadable sources are skipped with a warning. src_paths: a folder or a list of files.
    Returns dict(written=[...], existing=[...], bad=[...]) of output/source paths."""
    if isinstance(src_paths, str):
        src_paths = list_images(src_paths) if os.path.isdir(src_paths) else [src_paths]
    src_paths = list(src_paths)
    if not src_paths:
        raise ValueError(f"prepare_images: no source images given for '{dst_dir}' "
                         f"(expected a folder or a list of PNG/JPEG files)")
    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"prepare_images: downscale must be a positive integer, got {downscale!r}")
    os.makedirs(dst_dir, exist_ok=True)
    out = dict(written=[], existing=[], bad=[])
    for src, name in zip(src_paths, _unique_names(src_paths)):
        dst = os.path.join(dst_dir, name + '.png')
        if os.path.exists(dst):
            out['existing'].append(dst)
            continue
        try:
            arr = _read_rgb(src)
        except ImageLoadError as e:
            warnings.warn(f"skipping: {e}")
            out['bad'].append(src)
            continue
        img = Image.fromarray((arr * 255).round().astype(np.uint8))
        img = img.resize((img.size[0] // downscale, img.size[1] // downscale), Image.Resampling.LANCZOS)
        save_png(np.asarray(img), dst)
        out['written'].append(dst)
    if not out['written'] and not out['existing']:
        raise ValueError(f"prepare_images: none of the {len(src_paths)} sources for '{dst_dir}' "
                         f"could be read (see the warnings above)")
    return out

# -----------------------------------------------------------------------------
# training pairs


def hue_matrix(angle):
    """(3, 3) RGB -> RGB map that rotates the chroma (Cb, Cr) of JFIF YCbCr by `angle` radians and
    keeps the luma: a new hue at the same brightness and saturation (before clamping to [0, 1])."""
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return YCC_TO_RGB @ rot @ RGB_TO_YCC


class PairSampler:
    """Random HR crops (+ horizontal flip, as x4plus: use_hflip True, use_rot False) from every
    image of a folder, degraded on `device`. With hue_prob > 0 a crop gets a random hue with that
    probability (hue_matrix, angle ~ U(-pi, pi)): a few dozen photos hold few of the colours a
    codebook must learn (docs/results.md "Image quality"). One CPU torch.Generator drives crops, flips, hues
    and the degradation, so state_dict()/load_state_dict() resume the exact batch sequence."""

    def __init__(self, image_dir, crop, batch_size, seed=0, device='cpu', deg_cfg=None, hue_prob=0.0):
        self.cfg = deg_cfg or DegradeConfig()
        if crop % self.cfg.scale:
            raise ValueError(f"PairSampler: crop={crop} must be a multiple of scale={self.cfg.scale}")
        if not 0 <= hue_prob <= 1:
            raise ValueError(f"PairSampler: hue_prob={hue_prob} must be in [0, 1]")
        self.crop, self.batch_size, self.device, self.hue_prob = crop, batch_size, device, hue_prob
        self.images, self.names = [], []  # uint8 (3, H, W) each, loaded once
        for path in list_images(image_dir):
            try:
                img = load_image(path)
            except ImageLoadError as e:
                warnings.warn(f"PairSampler: skipping '{path}': {e}")
                continue
            if min(img.shape[-2:]) < crop:
                warnings.warn(f"PairSampler: skipping '{path}': {tuple(img.shape[-2:])} is smaller than crop={crop}")
                continue
            self.images.append((img * 255).round().to(torch.uint8))
            self.names.append(os.path.basename(path))
        if not self.images:
            raise ValueError(f"PairSampler: no usable image of at least {crop}x{crop} in '{image_dir}' "
                             f"(run `python data.py`, or point the setting at a folder of photos)")
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        c, g = self.crop, self.gen
        crops, hues = [], []
        for i in torch.randint(len(self.images), (self.batch_size,), generator=g).tolist():
            img = self.images[i]
            top = int(torch.randint(img.shape[1] - c + 1, (1,), generator=g))
            left = int(torch.randint(img.shape[2] - c + 1, (1,), generator=g))
            x = img[:, top:top + c, left:left + c]
            crops.append(x.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else x)
            if self.hue_prob > 0:  # no draws when off: the batches of hue_prob=0 stay those of before
                u = torch.rand(2, generator=g).tolist()
                hues.append(hue_matrix(math.pi * (2 * u[1] - 1)) if u[0] < self.hue_prob else torch.eye(3))
        hr = torch.stack(crops).to(self.device).float() / 255.0  # (B, 3, crop, crop)
        if hues:
            hr = torch.einsum('bij,bjhw->bihw', torch.stack(hues).to(hr.device), hr).clamp(0, 1)
        return degrade(hr, self.cfg, g)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self):
        return dict(gen=self.gen.get_state(), names=list(self.names))

    def load_state_dict(self, sd):
        if sd.get('names') != self.names:
            warnings.warn("PairSampler: the image folder changed since the state was saved; "
                          "batches will not repeat the original run")
        self.gen.set_state(sd['gen'])

# -----------------------------------------------------------------------------
# fixed validation pairs


def build_val_pairs(src_dir, out_dir, crop=256, scale=4, seed=0, deg_cfg=None):
    """Centre crop of every image in src_dir, degraded once (one image at a time, fixed seed):
    out_dir/{hr,lr,lr_bicubic}/NAME.png + manifest.json. HR is the photo itself (usm_gt ignored);
    JPEG is always real libjpeg (jpeg_impl ignored), so the fixed pairs never depend on the codec
    chosen for training. Skipped when the manifest (seed, crop, scale, degradation) matches and all
    files exist. Returns True when it (re)built the pairs."""
    cfg = DegradeConfig(**{**asdict(deg_cfg or DegradeConfig()), 'scale': scale, 'usm_gt': False,
                           'jpeg_impl': 'pil'})
    paths = list_images(src_dir)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    deg = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != 'jpeg_impl'}  # always 'pil'
    manifest = dict(seed=seed, crop=crop, scale=scale, deg_cfg=deg)
    mpath = os.path.join(out_dir, 'manifest.json')
    if os.path.exists(mpath):
        with open(mpath) as f:
            old = json.load(f)
        have = all(os.path.exists(os.path.join(out_dir, k, n + '.png'))
                   for k in ('hr', 'lr', 'lr_bicubic') for n in old.get('names', []))
        if have and {k: v for k, v in old.items() if k != 'names'} == manifest and old.get('names'):
            return False
    gen = torch.Generator().manual_seed(seed)
    for k in ('hr', 'lr', 'lr_bicubic'):
        os.makedirs(os.path.join(out_dir, k), exist_ok=True)
    done = []
    for path, name in zip(paths, names):
        try:
            img = load_image(path)
        except ImageLoadError as e:
            warnings.warn(f"build_val_pairs: skipping '{path}': {e}")
            continue
        H, W = img.shape[-2:]
        if min(H, W) < crop:
            warnings.warn(f"build_val_pairs: skipping '{path}': {(H, W)} is smaller than crop={crop}")
            continue
        top, left = (H - crop) // 2, (W - crop) // 2
        hr = quantize_8bit(img[None, :, top:top + crop, left:left + crop])  # (1, 3, crop, crop)
        _, lr = degrade(hr, cfg, gen)
        for k, t in (('hr', hr), ('lr', lr), ('lr_bicubic', bicubic_downsample(hr, scale))):
            save_png(t[0], os.path.join(out_dir, k, name + '.png'))
        done.append(name)
    if not done:
        raise ValueError(f"build_val_pairs: no usable image of at least {crop}x{crop} in '{src_dir}'")
    write_json({**manifest, 'names': done}, mpath)  # written last: a killed build is rebuilt next time
    return True


def load_val_pairs(val_dir):
    """-> dict(names=[...], hr=(N,3,H,W), lr=(N,3,H/s,W/s), lr_bicubic=(N,3,H/s,W/s)), floats in [0, 1].
    The pairs are the ones manifest.json lists. build_val_pairs writes it last, so a folder without it
    is an unfinished build: refused, as is a manifest whose files are not all there."""
    rebuild = "run `python data.py` to (re)build the validation pairs"
    if not os.path.isdir(val_dir):
        raise ValueError(f"validation pairs not found: '{val_dir}' is not a folder; {rebuild}")
    mpath = os.path.join(val_dir, 'manifest.json')
    try:
        with open(mpath) as f:
            names = json.load(f)['names']
    except FileNotFoundError:
        raise ValueError(f"validation pairs in '{val_dir}' have no manifest.json (an unfinished build, or a "
                         f"folder not made by data.py); {rebuild}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the manifest '{mpath}' ({type(e).__name__}: {e}); {rebuild}") from None
    if not names:
        raise ValueError(f"the manifest '{mpath}' lists no validation pairs; {rebuild}")
    files = {k: [os.path.join(val_dir, k, n + '.png') for n in names] for k in ('hr', 'lr', 'lr_bicubic')}
    missing = [os.path.relpath(f, val_dir) for k in files for f in files[k] if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"validation pairs in '{val_dir}' are incomplete: {len(missing)} of the "
                         f"{3 * len(names)} files its manifest lists are missing "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); {rebuild}")
    out = dict(names=list(names))
    for k, fs in files.items():
        imgs = [load_image(f) for f in fs]
        sizes = {f: tuple(x.shape[-2:]) for f, x in zip(fs, imgs)}
        odd = [f for f in fs if sizes[f] != sizes[fs[0]]]
        if odd:
            raise ValueError(f"validation pairs in '{val_dir}': {odd[0]} is {sizes[odd[0]]}, but {fs[0]} is "
                             f"{sizes[fs[0]]} (all {k} images must have one size); {rebuild}")
        out[k] = torch.stack(imgs)
    if tuple(out['hr'].shape[-2:]) != tuple(4 * s for s in out['lr'].shape[-2:]):
        raise ValueError(f"validation pairs in '{val_dir}': HR {tuple(out['hr'].shape[-2:])} is not 4x the LR "
                         f"{tuple(out['lr'].shape[-2:])}; {rebuild}")
    return out

# -----------------------------------------------------------------------------


def _resolve(spec, skip=''):
    """'a,b,c' of folders, files or globs -> (sorted image files, entries that matched nothing)."""
    files, missing = [], []
    for entry in [e.strip() for e in spec.split(',') if e.strip()]:
        found = list_images(entry) if os.path.isdir(entry) else sorted(glob.glob(entry))
        (files.extend(found) if found else missing.append(entry))
    skips = [s.strip() for s in skip.split(',') if s.strip()]
    return [f for f in files if not any(fnmatch.fnmatch(os.path.basename(f), s) for s in skips)], missing


if __name__ == '__main__':
    from configurator import configure
    # sources: comma-separated folders, files or globs (defaults: photos of Debian wallpaper packages)
    train_src = '/usr/share/backgrounds/*.jpg,/usr/share/backgrounds/mate/nature/*.jpg'
    train_skip = 'umang_*'        # file-name globs left out of training (umang_* is a gradient, not a photo)
    val_src = ','.join(f'/usr/share/wallpapers/{n}/contents/images/2560x1600.jpg' for n in (
        'BytheWater', 'ColdRipple', 'ColorfulCups', 'DarkestHour', 'EveningGlow', 'FallenLeaf', 'Grey',
        'Kite', 'OneStandsOut', 'Path', 'summer_1am'))
    train_dir = 'assets/images/train'  # outputs
    val_dir = 'assets/images/val'
    val_pairs_dir = 'assets/val_pairs'
    downscale = 2                 # source photos are JPEGs: halving averages their artefacts away
    val_crop = 256                # HR side of a validation pair (LR side = val_crop / 4)
    seed = 0                      # the validation degradation seed
    configure(globals())

    t0 = time.time()
    for split, src, skip, dst in (('train', train_src, train_skip, train_dir), ('val', val_src, '', val_dir)):
        files, missing = _resolve(src, skip)
        if missing:
            print(f"{split}: no images at {', '.join(missing)}")
        if not files:
            have = len(list_images(dst)) if os.path.isdir(dst) else 0
            if have:
                print(f"{split}: keeping the {have} images already in {dst}")
                continue
            print("The default photos come from Debian packages. As root run:\n"
                  "  apt-get install -y lomiri-wallpapers-16.04 mate-backgrounds plasma-workspace-wallpapers\n"
                  "or pass any folders of photos: python data.py --train_src=DIR --val_src=DIR")
            raise SystemExit(1)
        r = prepare_images(files, dst, downscale)
        print(f"{split}: {len(r['written']) + len(r['existing'])} images in {dst} "
              f"(written {len(r['written'])}, already there {len(r['existing'])}, unreadable {len(r['bad'])})")
    built = build_val_pairs(val_dir, val_pairs_dir, crop=val_crop, scale=4, seed=seed)
    n = len(load_val_pairs(val_pairs_dir)['names'])
    print(f"val pairs: {n} in {val_pairs_dir} ({'built' if built else 'up to date'})")
    print(f"prepare_seconds: {time.time() - t0:.1f}")
