"""
Data for 4x super-resolution: loading photos, preparing the image folders, the Real-ESRGAN
second-order degradation that makes (HR, LR) training pairs on the fly, and the fixed validation
pairs. Library and script:

    python data.py                                   # prepares assets/images/{train,val} + assets/val_pairs
    python data.py --train_src=DIR --val_src=DIR     # any folders of photos instead of the Debian ones

The degradation follows SPEC.md "Data and degradation" (Real-ESRGAN x4plus: BasicSR's
degradations.py, realesrgan_dataset.py, realesrnet_model.py). Deliberate differences, all for
batching on one device: kernels, second-blur coin, final sinc, noise type/level/gray coin, JPEG
quality and the final-step order are drawn per sample; the three resize scales and interpolation
modes are drawn per batch (a batch must share one size, as in the reference); Gaussian gray noise
is drawn per sample (the reference shares one gray field across the batch); JPEG is real libjpeg
through PIL on CPU with 4:2:0 chroma and integer quality (the reference's DiffJPEG is a float
re-implementation of the same codec); there is no training-pair queue. usm_gt defaults to off
(x4plus sharpens its GT) so targets stay the photos that validation scores against.
"""
import io
import fnmatch
import glob
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

_IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.gif')


class ImageLoadError(ValueError):
    pass

# -----------------------------------------------------------------------------
# image files


def list_images(folder):
    """Sorted image files directly in `folder` (hidden files, e.g. our temp files, are skipped)."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder '{folder}' does not exist (expected a folder of PNG/JPEG files)")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(_IMG_EXTS) and not f.startswith('.'))


def _read_rgb(path):
    """-> float32 (H, W, 3) in [0, 1]. Alpha is composited on white (what a viewer shows for a
    transparent PNG; opaque photos are unchanged). 16-bit grey keeps its precision."""
    try:
        img = Image.open(path)
        img.load()  # decodes now: a truncated file raises here instead of giving grey rows
        img = ImageOps.exif_transpose(img)  # camera photos store their rotation in EXIF
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), IsADirectoryError, ...
        raise ImageLoadError(f"cannot load image '{path}': expected a readable PNG/JPEG/... file "
                             f"({type(e).__name__}: {e})") from None
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


def _save_png(img, path):
    """Atomic PNG write of a (3, H, W) float tensor or an (H, W, 3) uint8 array: a hidden temp
    name in the same folder, then os.replace."""
    if torch.is_tensor(img):
        img = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    d, name = os.path.split(path)
    tmp = os.path.join(d, f'.{name}.tmp{os.getpid()}')
    Image.fromarray(img).save(tmp, format='PNG')
    os.replace(tmp, path)


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
        _save_png(np.asarray(img), dst)
        out['written'].append(dst)
    if not out['written'] and not out['existing']:
        raise ValueError(f"prepare_images: none of the {len(src_paths)} sources for '{dst_dir}' "
                         f"could be read (see the warnings above)")
    return out

# -----------------------------------------------------------------------------
# degradation settings


@dataclass
class DegradeConfig:
    mode: str = 'realesrgan'      # 'realesrgan' (SPEC.md) | 'bicubic' (clean, antialiased) | 'none' (lr=None)
    scale: int = 4                # HR side / LR side
    # stage switches (tests and ablations); the final resize to H/scale always happens
    blur: bool = True             # kernel 1 and kernel 2
    resize: bool = True           # the random resizes of orders 1 and 2
    noise: bool = True            # Gaussian / Poisson noise of orders 1 and 2
    jpeg: bool = True             # the three JPEG steps
    sinc: bool = True             # the final sinc filter
    # blur kernels: sizes, types, probabilities (kernel 1 / kernel 2 share list and probs)
    kernel_sizes: tuple = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_list: tuple = ('iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso')
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    rotation_range: tuple = (-math.pi, math.pi)
    sinc_prob: float = 0.1        # kernel 1 is a sinc (omega_c ~ U[pi/3,pi] if size < 13 else U[pi/5,pi])
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)   # generalized Gaussian shape
    betap_range: tuple = (1.0, 2.0)   # plateau shape
    sinc_prob2: float = 0.1
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    # order 1: resize (p up/down/keep), noise, JPEG
    resize_prob: tuple = (0.2, 0.7, 0.1)
    resize_range: tuple = (0.15, 1.5)     # down U[lo,1], up U[1,hi]
    resize_modes: tuple = ('area', 'bilinear', 'bicubic')
    gaussian_noise_prob: float = 0.5      # else Poisson
    noise_range: tuple = (1.0, 30.0)      # Gaussian sigma, in 8-bit levels
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30, 95)
    # order 2
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30, 95)
    # final step: p of [resize + sinc] then JPEG, else JPEG then [resize + sinc]
    resize_first_prob: float = 0.5
    # ground truth unsharp mask (BasicSR USMSharp); LR is then made from the sharpened GT
    usm_gt: bool = False
    usm_radius: int = 51
    usm_weight: float = 0.5
    usm_threshold: float = 10.0   # in 8-bit levels

    def __post_init__(self):
        if self.mode not in ('realesrgan', 'bicubic', 'none'):
            raise ValueError(f"DegradeConfig.mode must be 'realesrgan', 'bicubic' or 'none', got {self.mode!r}")
        if len(self.kernel_list) != len(self.kernel_prob) or any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError("DegradeConfig: kernel_list and kernel_prob must have equal length, kernel_sizes odd")
        for k in ('resize_prob', 'resize_prob2'):
            if len(getattr(self, k)) != 3:
                raise ValueError(f"DegradeConfig.{k} must be 3 probabilities (up, down, keep)")

    @classmethod
    def from_dict(cls, d):
        valid = [f.name for f in fields(cls)]
        bad = [k for k in d if k not in valid]
        if bad:
            raise ValueError(f"DegradeConfig: unknown key(s) {bad}. Valid keys: {', '.join(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

# -----------------------------------------------------------------------------
# kernels (BasicSR degradations.py), built in float64 numpy, each normalised to sum 1


def mesh_grid(ks):
    ax = np.arange(-(ks // 2), ks // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)  # (ks, ks, 2), (x, y) offsets from the centre


def bivariate_kernel(ks, sig_x, sig_y, theta, kind='gaussian', beta=1.0):
    """Gaussian exp(-q/2), generalized exp(-q^beta/2), plateau 1/(q^beta+1), with
    q = d^T Sigma^-1 d, Sigma = R diag(sig_x^2, sig_y^2) R^T (R = rotation by theta)."""
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inv = np.linalg.inv(R @ np.diag([sig_x ** 2, sig_y ** 2]) @ R.T)
    d = mesh_grid(ks)
    q = np.sum((d @ inv) * d, axis=-1)
    k = {'gaussian': lambda: np.exp(-0.5 * q), 'generalized': lambda: np.exp(-0.5 * q ** beta),
         'plateau': lambda: 1.0 / (q ** beta + 1.0)}[kind]()
    return k / k.sum()


def circular_lowpass_kernel(cutoff, ks, pad_to=0):
    """2D sinc: the ideal circular low-pass with cutoff omega_c (rad/pixel), J1-based."""
    d = mesh_grid(ks)
    r = np.sqrt((d ** 2).sum(-1))
    with np.errstate(divide='ignore', invalid='ignore'):
        k = cutoff * torch.special.bessel_j1(torch.from_numpy(cutoff * r)).numpy() / (2 * np.pi * r)
    k[ks // 2, ks // 2] = cutoff ** 2 / (4 * np.pi)  # the r -> 0 limit
    k = k / k.sum()
    return _pad_kernel(k, pad_to) if pad_to > ks else k


def _pad_kernel(k, size):
    p = (size - k.shape[0]) // 2
    return np.pad(k, ((p, p), (p, p)))


def _beta(rng, lo, hi):
    # BasicSR: half the time below 1, half above (with betap_range (1,2) the lower half is exactly 1)
    return rng.uniform(lo, 1) if rng.random() < 0.5 else rng.uniform(1, hi)


def random_kernel(rng, cfg, order):
    """One blur kernel as realesrgan_dataset.py draws it, zero-padded to max(kernel_sizes)."""
    s = '' if order == 1 else '2'
    sigma, bg, bp = getattr(cfg, 'blur_sigma' + s), getattr(cfg, 'betag_range' + s), getattr(cfg, 'betap_range' + s)
    ks = int(rng.choice(cfg.kernel_sizes))
    if rng.random() < getattr(cfg, 'sinc_prob' + s):
        k = circular_lowpass_kernel(rng.uniform(np.pi / 3 if ks < 13 else np.pi / 5, np.pi), ks)
    else:
        p = np.asarray(cfg.kernel_prob, dtype=np.float64)
        kind = cfg.kernel_list[rng.choice(len(p), p=p / p.sum())]
        sx = rng.uniform(*sigma)
        sy, theta = (rng.uniform(*sigma), rng.uniform(*cfg.rotation_range)) if kind.endswith('aniso') else (sx, 0.0)
        if kind.startswith('generalized'):
            k = bivariate_kernel(ks, sx, sy, theta, 'generalized', _beta(rng, *bg))
        elif kind.startswith('plateau'):
            k = bivariate_kernel(ks, sx, sy, theta, 'plateau', _beta(rng, *bp))
        else:
            k = bivariate_kernel(ks, sx, sy, theta)
    return _pad_kernel(k, max(cfg.kernel_sizes))


def _pulse(size):
    k = np.zeros((size, size))
    k[size // 2, size // 2] = 1.0
    return k


def filter2d(x, k):
    """Per-sample 2D filter: x (B, C, H, W), k (B, k, k) or (k, k); one grouped conv (groups=B*C)
    with reflect padding (replicate when the image is smaller than the kernel radius)."""
    B, C, H, W = x.shape
    k = k.to(x).expand(B, *k.shape[-2:]) if k.dim() == 2 else k.to(x)
    ks = k.shape[-1]
    p = ks // 2
    x = F.pad(x, (p, p, p, p), mode='reflect' if p < min(H, W) else 'replicate')
    w = k.repeat_interleave(C, dim=0).unsqueeze(1)  # (B*C, 1, ks, ks)
    return F.conv2d(x.reshape(1, B * C, H + 2 * p, W + 2 * p), w, groups=B * C).view(B, C, H, W)


def usm_sharp(img, radius=51, weight=0.5, threshold=10.0):
    """Unsharp mask of BasicSR's USMSharp: sharpen where |img - blur| > threshold/255, soft mask."""
    radius += 1 - radius % 2
    sigma = 0.3 * ((radius - 1) * 0.5 - 1) + 0.8  # OpenCV's getGaussianKernel default for sigma=0
    g = np.exp(-(np.arange(radius) - radius // 2) ** 2 / (2 * sigma ** 2))
    k = torch.from_numpy(np.outer(g, g) / g.sum() ** 2)
    residual = img - filter2d(img, k)
    soft = filter2d((residual.abs() * 255 > threshold).to(img), k)
    return soft * (img + weight * residual).clamp(0, 1) + (1 - soft) * img

# -----------------------------------------------------------------------------
# degradation


def _round8(x):
    return (x * 255.0).round().clamp(0, 255) / 255.0


def bicubic_downsample(hr, scale=4, round8=True):
    """Clean LR: antialiased bicubic (PIL/MATLAB-like) downsample; clamped and 8-bit rounded."""
    lr = F.interpolate(hr, size=(hr.shape[-2] // scale, hr.shape[-1] // scale), mode='bicubic',
                       antialias=True, align_corners=False).clamp(0, 1)
    return _round8(lr) if round8 else lr


def _draw_resize(rng, prob, rng_range, modes):
    kind = rng.choice(3, p=np.asarray(prob) / np.sum(prob))  # up, down, keep
    scale = rng.uniform(1, rng_range[1]) if kind == 0 else rng.uniform(rng_range[0], 1) if kind == 1 else 1.0
    return float(scale), str(rng.choice(modes))


def _draw_noise(rng, B, gauss_p, sigma, pscale, gray_p):
    return dict(gauss=rng.random(B) < gauss_p, sigma=rng.uniform(*sigma, B), pscale=rng.uniform(*pscale, B),
                gray=rng.random(B) < gray_p, seed=int(rng.integers(2 ** 62)))


def sample_params(B, cfg, gen):
    """Every random choice of one degrade() call, drawn up front from one seed taken from `gen`
    (a CPU torch.Generator), in an order that does not depend on the stage switches: switching a
    stage off leaves every other stage's draws unchanged."""
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    kmax = max(cfg.kernel_sizes)
    p = dict(k1=[], k2=[], sinc=[])
    for _ in range(B):
        p['k1'].append(random_kernel(rng, cfg, 1))
        k2 = random_kernel(rng, cfg, 2)
        p['k2'].append(k2 if rng.random() < cfg.second_blur_prob else _pulse(kmax))  # per sample
        use, ks, wc = rng.random() < cfg.final_sinc_prob, int(rng.choice(cfg.kernel_sizes)), rng.uniform(np.pi / 3, np.pi)
        p['sinc'].append(circular_lowpass_kernel(wc, ks, pad_to=kmax) if use else _pulse(kmax))
    p = {k: torch.from_numpy(np.stack(v)).float() for k, v in p.items()}  # (B, kmax, kmax) each
    p['resize1'] = _draw_resize(rng, cfg.resize_prob, cfg.resize_range, cfg.resize_modes)  # per batch
    p['noise1'] = _draw_noise(rng, B, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range,
                              cfg.gray_noise_prob)
    p['q1'] = rng.uniform(*cfg.jpeg_range, B)
    p['resize2'] = _draw_resize(rng, cfg.resize_prob2, cfg.resize_range2, cfg.resize_modes)
    p['noise2'] = _draw_noise(rng, B, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2,
                              cfg.gray_noise_prob2)
    p['q2'] = rng.uniform(*cfg.jpeg_range2, B)
    p['resize_first'] = rng.random(B) < cfg.resize_first_prob
    p['mode3'] = str(rng.choice(cfg.resize_modes))
    return p


def _poisson(img, gen):
    """Shot noise as BasicSR's generate_poisson_noise_pt: the photon count per level is the number
    of distinct 8-bit values in the sample rounded up to a power of two."""
    b = img.shape[0]
    img = _round8(img)
    lv = (img * 255).round().long().flatten(1) + 256 * torch.arange(b, device=img.device)[:, None]
    n_unique = (torch.bincount(lv.flatten(), minlength=256 * b).view(b, 256) > 0).sum(1)
    vals = (2.0 ** torch.ceil(torch.log2(n_unique.float()))).view(b, 1, 1, 1)
    return torch.poisson(img * vals, generator=gen) / vals - img


def add_noise(x, p):
    """Per sample: Gaussian (sigma/255) or Poisson (times scale), colour or grey (same on R,G,B)."""
    B, _, H, W = x.shape
    gen = torch.Generator(device=x.device).manual_seed(p['seed'])
    gray = torch.from_numpy(p['gray']).to(x.device).view(B, 1, 1, 1)
    noise = torch.zeros_like(x)
    ig = torch.from_numpy(np.flatnonzero(p['gauss'])).to(x.device)
    ip = torch.from_numpy(np.flatnonzero(~p['gauss'])).to(x.device)
    if len(ig):
        s = torch.from_numpy(p['sigma'][p['gauss']] / 255.0).to(x).view(-1, 1, 1, 1)
        n_rgb = torch.randn((len(ig), 3, H, W), generator=gen, device=x.device) * s
        n_grey = torch.randn((len(ig), 1, H, W), generator=gen, device=x.device) * s
        noise[ig] = torch.where(gray[ig], n_grey.expand_as(n_rgb), n_rgb)
    if len(ip):
        xs = x[ip]
        s = torch.from_numpy(p['pscale'][~p['gauss']]).to(x).view(-1, 1, 1, 1)
        n = _poisson(xs, gen)
        if p['gray'][~p['gauss']].any():  # luma as torchvision's rgb_to_grayscale
            y = (0.2989 * xs[:, 0] + 0.587 * xs[:, 1] + 0.114 * xs[:, 2]).unsqueeze(1)
            n = torch.where(gray[ip], _poisson(y, gen).expand_as(n), n)
        noise[ip] = n * s
    return (x + noise).clamp(0, 1)


def jpeg(x, quality):
    """Real JPEG round trip per sample (PIL/libjpeg on CPU, 4:2:0, integer quality)."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a, q in zip(arr, quality):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format='JPEG', quality=int(round(float(q))))
        out.append(np.asarray(Image.open(buf).convert('RGB')))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0


def _check_batch(hr, scale):
    if not torch.is_tensor(hr) or hr.dim() != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(f"degrade: expected a float tensor (B, 3, H, W) in [0, 1], got "
                         f"{type(hr).__name__} {tuple(getattr(hr, 'shape', ()))}")
    if hr.shape[-2] % scale or hr.shape[-1] % scale:
        raise ValueError(f"degrade: HR size {tuple(hr.shape[-2:])} must be a multiple of scale={scale}")


@torch.no_grad()
def degrade(hr, cfg=None, gen=None):
    """(B, 3, H, W) HR in [0, 1] -> (hr_out, lr): hr_out is the GT (unsharp-masked if cfg.usm_gt),
    lr (B, 3, H/s, W/s) on 8-bit levels (None for mode 'none'). Same `gen` state and device ->
    bit-identical output (the noise fields come from a generator on hr's device, seeded from `gen`)."""
    cfg = cfg or DegradeConfig()
    gen = torch.default_generator if gen is None else gen
    _check_batch(hr, cfg.scale)
    B, _, H, W = hr.shape
    h, w = H // cfg.scale, W // cfg.scale
    if cfg.usm_gt:
        hr = usm_sharp(hr, cfg.usm_radius, cfg.usm_weight, cfg.usm_threshold)
    if cfg.mode != 'realesrgan':
        return hr, (bicubic_downsample(hr, cfg.scale) if cfg.mode == 'bicubic' else None)
    p = sample_params(B, cfg, gen)
    x = hr
    # ---- order 1: blur, resize, noise, JPEG
    if cfg.blur:
        x = filter2d(x, p['k1'])
    if cfg.resize:
        s, mode = p['resize1']
        x = F.interpolate(x, scale_factor=s, mode=mode)
    if cfg.noise:
        x = add_noise(x, p['noise1'])
    if cfg.jpeg:
        x = jpeg(x.clamp(0, 1), p['q1'])  # clamp first: out-of-range values give JPEG ringing
    # ---- order 2: blur (p second_blur_prob, pulse kernel otherwise), resize relative to H/s, noise
    if cfg.blur:
        x = filter2d(x, p['k2'])
    if cfg.resize:
        s, mode = p['resize2']
        x = F.interpolate(x, size=(max(1, int(h * s)), max(1, int(w * s))), mode=mode)
    if cfg.noise:
        x = add_noise(x, p['noise2'])
    # ---- final: [resize to H/s + sinc] then JPEG, or JPEG then [resize + sinc], per sample
    lr = torch.empty(B, 3, h, w, device=hr.device, dtype=hr.dtype)
    for first in (True, False):
        idx = np.flatnonzero(p['resize_first'] == first)
        if len(idx) == 0:
            continue
        xs = x[torch.from_numpy(idx).to(x.device)]
        if cfg.jpeg and not first:
            xs = jpeg(xs.clamp(0, 1), p['q2'][idx])
        xs = F.interpolate(xs, size=(h, w), mode=p['mode3'])
        if cfg.sinc:
            xs = filter2d(xs, p['sinc'][idx])
        if cfg.jpeg and first:
            xs = jpeg(xs.clamp(0, 1), p['q2'][idx])
        lr[torch.from_numpy(idx).to(x.device)] = xs
    return hr, _round8(lr)

# -----------------------------------------------------------------------------
# training pairs


class PairSampler:
    """Random HR crops (+ horizontal flip, as x4plus: use_hflip True, use_rot False) from every
    image of a folder, degraded on `device`. One CPU torch.Generator drives crops, flips and the
    degradation, so state_dict()/load_state_dict() resume the exact batch sequence."""

    def __init__(self, image_dir, crop, batch_size, seed=0, device='cpu', deg_cfg=None):
        self.cfg = deg_cfg or DegradeConfig()
        if crop % self.cfg.scale:
            raise ValueError(f"PairSampler: crop={crop} must be a multiple of scale={self.cfg.scale}")
        self.crop, self.batch_size, self.device = crop, batch_size, device
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
        crops = []
        for i in torch.randint(len(self.images), (self.batch_size,), generator=g).tolist():
            img = self.images[i]
            top = int(torch.randint(img.shape[1] - c + 1, (1,), generator=g))
            left = int(torch.randint(img.shape[2] - c + 1, (1,), generator=g))
            x = img[:, top:top + c, left:left + c]
            crops.append(x.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else x)
        hr = torch.stack(crops).to(self.device).float() / 255.0  # (B, 3, crop, crop)
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
    out_dir/{hr,lr,lr_bicubic}/NAME.png + manifest.json. HR is the photo itself (usm_gt ignored).
    Skipped when the manifest (seed, crop, scale, degradation) matches and all files exist.
    Returns True when it (re)built the pairs."""
    cfg = DegradeConfig(**{**asdict(deg_cfg or DegradeConfig()), 'scale': scale, 'usm_gt': False})
    paths = list_images(src_dir)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    manifest = dict(seed=seed, crop=crop, scale=scale, deg_cfg=json.loads(json.dumps(asdict(cfg))))
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
        hr = _round8(img[None, :, top:top + crop, left:left + crop])  # (1, 3, crop, crop)
        _, lr = degrade(hr, cfg, gen)
        for k, t in (('hr', hr), ('lr', lr), ('lr_bicubic', bicubic_downsample(hr, scale))):
            _save_png(t[0], os.path.join(out_dir, k, name + '.png'))
        done.append(name)
    if not done:
        raise ValueError(f"build_val_pairs: no usable image of at least {crop}x{crop} in '{src_dir}'")
    tmp = mpath + f'.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump({**manifest, 'names': done}, f, indent=1)
    os.replace(tmp, mpath)  # written last: a killed build is rebuilt next time
    return True


def load_val_pairs(val_dir):
    """-> dict(names=[...], hr=(N,3,H,W), lr=(N,3,H/s,W/s), lr_bicubic=(N,3,H/s,W/s)), floats in [0, 1]."""
    if not os.path.isdir(os.path.join(val_dir, 'hr')):
        raise ValueError(f"validation pairs not found in '{val_dir}' (expected {val_dir}/hr, lr, lr_bicubic): "
                         f"run `python data.py` first")
    out = dict(names=[os.path.splitext(os.path.basename(p))[0] for p in list_images(os.path.join(val_dir, 'hr'))])
    if not out['names']:
        raise ValueError(f"'{val_dir}/hr' holds no PNG: run `python data.py` to rebuild the validation pairs")
    for k in ('hr', 'lr', 'lr_bicubic'):
        files = [os.path.join(val_dir, k, n + '.png') for n in out['names']]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise ValueError(f"validation pairs incomplete: {missing[0]} is missing; run `python data.py`")
        out[k] = torch.stack([load_image(f) for f in files])
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
    # sources: comma-separated folders, files or globs (defaults: SPEC.md "Assets", Debian wallpapers)
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
