"""
The Real-ESRGAN second-order degradation (docs/method.md#degradation), batched in torch on any
device: random blur kernels (generalized / plateau Gaussian, sinc), resizes, Gaussian / Poisson
noise, JPEG, twice, then the final sinc + JPEG in random order; plus the "bicubic only" mode and USM
sharpening. `degrade(hr, cfg, gen) -> (hr, lr)` is the entry point; data.PairSampler calls it.

Follows Real-ESRGAN x4plus (BasicSR's degradations.py, realesrgan_dataset.py, realesrnet_model.py).
Deliberate differences, all for batching on one device: kernels, second-blur coin, final sinc,
noise type/level/gray coin, JPEG quality and the final-step order are drawn per sample; the three
resize scales and interpolation modes are drawn per batch (a batch must share one size, as in the
reference); Gaussian gray noise is drawn per sample (the reference shares one gray field across the
batch); JPEG uses integer qualities and is either jpeg_torch, a batched torch version of libjpeg's
baseline codec on the images' device (the reference's DiffJPEG is one too, but with float-scaled
tables, zero padding, nearest-neighbour chroma and no intermediate rounding), or real libjpeg
through PIL on the CPU (jpeg_impl='pil'; the fixed validation pairs always use it); there is no
training-pair queue. usm_gt defaults to off (x4plus sharpens its GT) so targets stay the photos
that validation scores against.
"""
import io
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# degradation settings


@dataclass
class DegradeConfig:
    mode: str = 'realesrgan'      # 'realesrgan' (docs/method.md#degradation) | 'bicubic' (clean, antialiased) | 'none' (lr=None)
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
    jpeg_impl: str = 'torch'      # 'torch' (jpeg_torch: batched, on the device) | 'pil' (libjpeg, CPU)
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
        if self.jpeg_impl not in JPEG:
            raise ValueError(f"DegradeConfig.jpeg_impl must be 'torch' or 'pil', got {self.jpeg_impl!r}")
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


def quantize_8bit(x):
    """Round [0, 1] values to the 256 levels of an 8-bit image (what saving as PNG does)."""
    return (x * 255.0).round().clamp(0, 255) / 255.0


def bicubic_downsample(hr, scale=4, round8=True):
    """Clean LR: antialiased bicubic (PIL/MATLAB-like) downsample; clamped and 8-bit rounded."""
    lr = F.interpolate(hr, size=(hr.shape[-2] // scale, hr.shape[-1] // scale), mode='bicubic',
                       antialias=True, align_corners=False).clamp(0, 1)
    return quantize_8bit(lr) if round8 else lr


def bicubic_upsample(lr, scale=4):
    """The bicubic baseline: (B, 3, h, w) -> (B, 3, scale*h, scale*w), clamped to [0, 1]."""
    if lr.ndim != 4:
        raise ValueError(f"degradation.bicubic_upsample: expected (B, 3, h, w), got {tuple(lr.shape)}")
    return F.interpolate(lr, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)


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
    img = quantize_8bit(img)
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


# -----------------------------------------------------------------------------
# JPEG (docs/method.md#jpeg): real libjpeg through PIL on the CPU, or the same baseline codec
# batched in torch on the images' device

# the IJG base quantisation tables (ITU-T T.81 Annex K), natural order: row = vertical frequency
_Q_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]])
_Q_CHROMA = torch.tensor([
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99]] + [[99] * 8] * 4)


def jpeg_qualities(quality):
    """Per-sample qualities (floats, as drawn) -> the integer qualities both codecs use."""
    return np.rint(np.asarray(quality, dtype=np.float64)).astype(np.int64)


def jpeg_tables(quality):
    """libjpeg's jpeg_set_quality, in its integer arithmetic: quality (B,) long -> luma and chroma
    tables (B, 8, 8), base * s / 100 rounded, s = 5000 / q below 50 else 200 - 2q, clamped to
    [1, 255] (baseline JPEG)."""
    q = quality.clamp(1, 100).view(-1, 1, 1)
    s = torch.where(q < 50, 5000 // q, 200 - 2 * q)
    return [((t.to(q.device) * s + 50) // 100).clamp(1, 255) for t in (_Q_LUMA, _Q_CHROMA)]


def dct_matrix(device=None, dtype=torch.float32):
    """(8, 8) orthonormal DCT-II, row u = c_u cos((2x + 1) u pi / 16): D X D^T is JPEG's 2D FDCT."""
    x = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * x[None] + 1) * x[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(device, dtype)


# JFIF colour conversion of libjpeg (jccolor.c, jdcolor.c) on 0..255 samples; Cb, Cr centred on 0
RGB_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YCC_TO_RGB = torch.linalg.inv(RGB_TO_YCC)  # its inverse (sr.fix_colors, data.hue_matrix)
_CBCR_TO_RGB = torch.tensor([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]])


def _code_blocks(plane, table):
    """DCT, quantisation, rounding, dequantisation and IDCT of every 8x8 block, as two batched
    matmuls with the 64x64 Kronecker form of the DCT (vec(D X D^T) = (D kron D) vec(X), row-major):
    plane (B, C, H, W) level-shifted samples (H, W multiples of 8), table (B, 8, 8) -> (B, C, H, W)."""
    B, C, H, W = plane.shape
    k = torch.kron(*[dct_matrix(plane.device, plane.dtype)] * 2)          # (64, 64)
    t = table.reshape(B, 64, 1).to(plane.dtype)                             # (B, 64, 1)
    blk = plane.view(B, C, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(B, -1, 64)  # (B, N, 64)
    coef = torch.bmm(blk, (k / t).mT).round_()       # quantised coefficients round(F / Q); (B, N, 64)
    blk = torch.bmm(coef, k * t)                      # dequantised (F' = round(F / Q) Q), inverse DCT
    return blk.view(B, C, H // 8, W // 8, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)


def jpeg_torch(x, quality):
    """Baseline JPEG round trip of a batch on x's device, following libjpeg (what PIL runs):
    RGB -> YCbCr (JFIF), 4:2:0 (2x2 means), 8x8 DCT, quantisation by the IJG tables scaled by each
    sample's integer quality, rounding, dequantisation, IDCT, chroma upsampled by libjpeg's
    "fancy" triangle filter (= bilinear), YCbCr -> RGB; rounded and clamped wherever libjpeg keeps
    8-bit samples. Sides that are not multiples of 16 are padded by edge replication (as libjpeg
    fills its MCUs) and cropped back. x (B, 3, H, W) in [0, 1] -> (B, 3, H, W) on 8-bit levels.
    Computed in float32 (the matmuls must not run in TF32 or bf16: the coefficients would cross
    rounding boundaries); in-place ops on the intermediates, whose allocation costs a CPU more than
    the ops themselves."""
    B, _, H, W = x.shape
    q = torch.from_numpy(jpeg_qualities(quality)).to(x.device)
    t_luma, t_chroma = jpeg_tables(q)                                     # (B, 8, 8) each
    rgb = x.float().clamp(0, 1).mul_(255).round_()                        # 8-bit samples
    if H % 16 or W % 16:
        rgb = F.pad(rgb, (0, -W % 16, 0, -H % 16), mode='replicate')      # (B, 3, H16, W16)
    m = RGB_TO_YCC.to(rgb)
    ycc = (m @ rgb.flatten(2)).view(rgb.shape).round_()                  # (B, 3, H16, W16)
    y = _code_blocks(ycc[:, :1].sub_(128), t_luma).round_().clamp_(-128, 127)  # Y - 128; Cb, Cr are centred
    c = F.avg_pool2d(ycc[:, 1:], 2).round_()                              # (B, 2, H16/2, W16/2)
    c = _code_blocks(c, t_chroma).round_().clamp_(-128, 127)
    c = F.interpolate(c, scale_factor=2, mode='bilinear', align_corners=False).round_()
    rgb = (_CBCR_TO_RGB.to(c) @ c.flatten(2)).view(B, 3, *c.shape[-2:]).add_(y).add_(128)
    return rgb.round_().clamp_(0, 255).div_(255)[..., :H, :W].to(x.dtype)


def jpeg_pil(x, quality):
    """Real JPEG round trip per sample (PIL/libjpeg on the CPU, 4:2:0, integer quality)."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a, q in zip(arr, jpeg_qualities(quality)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format='JPEG', quality=int(q))
        out.append(np.asarray(Image.open(buf).convert('RGB')))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0


JPEG = {'torch': jpeg_torch, 'pil': jpeg_pil}


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
    jpeg = JPEG[cfg.jpeg_impl]
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
    return hr, quantize_8bit(lr)
