"""data.py: image loading edge cases, the degradation stage by stage, exact resume, val pairs."""
import glob
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import degradation
from data import ImageLoadError
from degradation import DegradeConfig

STAGES = ('blur', 'resize', 'noise', 'jpeg', 'sinc')


def smooth_images(B, H, W, seed=0):
    """Photo-like test images: bicubic-upsampled noise (smooth, with edges), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H // 8, W // 8, generator=g)
    return F.interpolate(x, size=(H, W), mode='bicubic', align_corners=False).clamp(0, 1)


def run(hr, seed=0, **cfg):
    return degradation.degrade(hr, DegradeConfig(**cfg), torch.Generator().manual_seed(seed))[1]


def write_png(path, H, W, seed=0):
    arr = (smooth_images(1, H, W, seed)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)

# ---------------------------------------------------------------- degradation


def test_same_seed_same_output_different_seed_differs():
    hr = smooth_images(3, 64, 64)
    a, b, c = run(hr, 0), run(hr, 0), run(hr, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sizes_range_and_8bit_levels():
    hr = smooth_images(3, 64, 96)
    for seed in range(4):
        lr = run(hr, seed)
        assert lr.shape == (3, 3, 16, 24)
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.equal(lr * 255, (lr * 255).round())


@pytest.mark.parametrize('stage', STAGES)
def test_each_stage_changes_the_image_only_when_enabled(stage):
    hr = smooth_images(2, 64, 64)
    # make every stage certain to act: always resize down, always a final sinc
    force = dict(resize_prob=(0, 1, 0), resize_prob2=(0, 1, 0), final_sinc_prob=1.0)
    on = {s: True for s in STAGES}
    off = {s: False for s in STAGES}
    assert not torch.equal(run(hr, **force, **on), run(hr, **force, **{**on, stage: False}))
    assert not torch.equal(run(hr, **force, **{**off, stage: True}), run(hr, **force, **off))
    # disabled means skipped: the stage's own parameters then have no effect on the output
    other = dict(blur=dict(blur_sigma=(2.9, 3.0), blur_sigma2=(1.4, 1.5)), resize=dict(resize_range=(0.5, 0.6)),
                 noise=dict(noise_range=(50, 60), poisson_scale_range=(5, 6)), jpeg=dict(jpeg_range=(5, 6)),
                 sinc=dict(final_sinc_prob=0.0))[stage]
    a = run(hr, **{**force, **on, stage: False})
    b = run(hr, **{**force, **on, stage: False, **other})
    assert torch.equal(a, b)


def test_all_stages_off_is_a_plain_resize():
    hr = smooth_images(2, 64, 64)
    lr = run(hr, **{s: False for s in STAGES})
    refs = [degradation.quantize_8bit(F.interpolate(hr, size=(16, 16), mode=m)) for m in ('area', 'bilinear', 'bicubic')]
    assert any(torch.equal(lr, r) for r in refs)


def test_noise_levels_match_gaussian_and_poisson_statistics():
    x = torch.full((4, 3, 128, 128), 0.5)
    p = dict(gauss=np.array([True, True, False, False]), sigma=np.array([20., 20., 0., 0.]),
             pscale=np.array([0., 0., 0.1, 0.1]), gray=np.array([False, True, False, True]), seed=0)
    n = degradation.add_noise(x, p) - x
    assert abs(n[0].std().item() - 20 / 255) < 0.03 * 20 / 255  # sigma in 8-bit levels
    # a flat image has 1 distinct level -> 1 photon per unit: Var = 0.5 (Poisson), times scale^2
    assert abs(n[2].std().item() - 0.1 * math.sqrt(0.5)) < 0.03 * 0.1 * math.sqrt(0.5)
    for i in (1, 3):  # grey noise: the same on R, G, B
        assert torch.equal(n[i, 0], n[i, 1]) and torch.equal(n[i, 1], n[i, 2]) and n[i].std() > 0
    assert not torch.equal(n[0, 0], n[0, 1])


def test_bicubic_mode_is_antialiased_bicubic():
    hr = smooth_images(2, 64, 64)
    lr = run(hr, mode='bicubic')
    ref = F.interpolate(hr, scale_factor=0.25, mode='bicubic', antialias=True).clamp(0, 1)
    assert torch.equal(lr, (ref * 255).round() / 255)
    assert torch.equal(degradation.bicubic_downsample(hr, 4), lr)


def test_bad_degrade_input():
    with pytest.raises(ValueError, match='multiple of scale'):
        run(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        run(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match='Valid keys'):
        DegradeConfig.from_dict({'blurr': True})
    assert DegradeConfig.from_dict({'jpeg_range': [40, 50]}).jpeg_range == (40, 50)


def test_usm_sharpens_edges_and_leaves_flat_areas():
    flat = torch.full((1, 3, 64, 64), 0.5)
    assert torch.allclose(degradation.usm_sharp(flat), flat)
    step = torch.zeros(1, 3, 64, 64)
    step[..., 32:] = 0.8
    s = degradation.usm_sharp(step)
    assert s[..., 33].mean() > 0.8 and s[..., 31].mean() == 0  # overshoot on the bright side, clamped dark side
    hr_out, _ = degradation.degrade(smooth_images(1, 64, 64), DegradeConfig(usm_gt=True), torch.Generator())
    assert not torch.equal(hr_out, smooth_images(1, 64, 64))

# ---------------------------------------------------------------- JPEG: torch against libjpeg

VAL_HR = os.path.join(os.path.dirname(__file__), '..', 'assets', 'val_pairs', 'hr')


def val_photos():
    """The 256x256 HR crops of the validation photos, (N, 3, 256, 256)."""
    files = sorted(glob.glob(os.path.join(VAL_HR, '*.png')))
    if not files:
        pytest.skip('validation pairs missing: run `python data.py`')
    return torch.stack([data.load_image(f) for f in files])


def psnr(a, b):
    """(B,) PSNR in dB of images in [0, 1]."""
    return 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12))


@pytest.mark.parametrize('quality', [30, 50, 70, 95])
def test_torch_jpeg_matches_libjpeg_on_photos(quality):
    hr = val_photos()
    q = np.full(len(hr), quality)
    ours, ref = degradation.jpeg_torch(hr, q), degradation.jpeg_pil(hr, q)
    assert ours.shape == hr.shape and torch.equal(ours * 255, (ours * 255).round())
    assert psnr(ours, ref).mean() > 35  # measured 48.2 / 49.2 / 49.8 / 50.7 dB at 30 / 50 / 70 / 95
    # and it compresses as much: the same distance to the original (within 0.1 dB)
    assert abs(psnr(ours, hr).mean() - psnr(ref, hr).mean()) < 0.1


def test_jpeg_tables_are_libjpegs():
    """The tables libjpeg writes into the file (PIL reads them back in natural order)."""
    a = (smooth_images(1, 16, 16)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    for q in (1, 10, 30, 49, 50, 51, 75, 95, 100):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format='JPEG', quality=q)
        tables = Image.open(buf).quantization
        luma, chroma = degradation.jpeg_tables(torch.tensor([q]))
        assert luma[0].flatten().tolist() == list(tables[0]) and chroma[0].flatten().tolist() == list(tables[1]), q


def test_code_blocks_against_a_per_block_dct_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (2, 1, 16, 24), generator=g).double()
    table = degradation.jpeg_tables(torch.tensor([40, 80]))[0]
    got = degradation._code_blocks(x, table)
    c = [math.sqrt(0.5)] + [1.0] * 7
    cos = [[math.cos((2 * i + 1) * u * math.pi / 16) for i in range(8)] for u in range(8)]  # [u][x]
    for b in range(2):
        for by in range(0, 16, 8):
            for bx in range(0, 24, 8):
                f = x[b, 0, by:by + 8, bx:bx + 8].tolist()
                fq = [[0.0] * 8 for _ in range(8)]
                for v in range(8):  # F(v, u) = 1/4 c_v c_u sum f(y, x) cos_v(y) cos_u(x), quantised
                    for u in range(8):
                        s = sum(f[i][j] * cos[v][i] * cos[u][j] for i in range(8) for j in range(8))
                        qv = float(table[b, v, u])
                        fq[v][u] = round(0.25 * c[v] * c[u] * s / qv) * qv
                want = [[sum(0.25 * c[v] * c[u] * fq[v][u] * cos[v][i] * cos[u][j]
                              for v in range(8) for u in range(8)) for j in range(8)] for i in range(8)]
                torch.testing.assert_close(got[b, 0, by:by + 8, bx:bx + 8], torch.tensor(want, dtype=x.dtype),
                                           rtol=0, atol=1e-9)


def test_torch_jpeg_per_sample_quality_and_odd_sizes():
    hr = smooth_images(5, 48, 48)
    q = np.array([30.2, 44.5, 50.0, 81.7, 95.0])
    for H, W in ((48, 48), (37, 29), (8, 3), (1, 1)):
        x = hr[..., :H, :W]
        batch = degradation.jpeg_torch(x, q)
        assert batch.shape == x.shape and 0 <= batch.min() and batch.max() <= 1
        # each sample with its own quality == that sample alone, bit for bit. Kept exact across batch
        # sizes on purpose: every stage rounds to integer levels, so float noise could only show as a
        # whole 8x8 block flipped at a .5 tie, which no pixel tolerance would describe; and with one
        # thread (test.sh's workers) the per-sample matmuls were measured to give the same sums in any batch
        for i in range(5):
            assert torch.equal(batch[i:i + 1], degradation.jpeg_torch(x[i:i + 1], q[i:i + 1]))
    # an odd size is the padded image, cropped: libjpeg's edge replication (exact, as above)
    x = hr[..., :37, :29]
    padded = F.pad(x, (0, 3, 0, 11), mode='replicate')
    assert torch.equal(degradation.jpeg_torch(x, q), degradation.jpeg_torch(padded, q)[..., :37, :29])
    assert psnr(degradation.jpeg_torch(x, q), degradation.jpeg_pil(x, q)).mean() > 35


def test_degraded_pairs_same_statistics_with_either_jpeg():
    """Same seeds, either codec: the mean PSNR of degraded LR vs clean bicubic LR over the 11
    validation photos x 4 seeds agrees within 0.1 dB (measured: 26.995 torch, 26.971 libjpeg;
    the standard error of either mean over its 44 pairs is 0.77 dB)."""
    hr = val_photos()
    bic = degradation.bicubic_downsample(hr, 4)
    mean = {impl: torch.cat([psnr(run(hr, seed, jpeg_impl=impl), bic) for seed in range(4)]).mean().item()
            for impl in ('torch', 'pil')}
    assert abs(mean['torch'] - mean['pil']) < 0.1, mean
    with pytest.raises(ValueError, match="'torch' or 'pil'"):
        DegradeConfig(jpeg_impl='turbo')

# ---------------------------------------------------------------- kernels


def test_kernels_sum_to_one():
    rng = np.random.default_rng(0)
    cfg = DegradeConfig()
    ks = [degradation.random_kernel(rng, cfg, o) for o in (1, 2) for _ in range(30)]
    ks += [degradation.bivariate_kernel(15, 2.0, 0.7, 0.3, kind, beta) for kind, beta in
           (('gaussian', 1), ('generalized', 0.6), ('generalized', 3.5), ('plateau', 1.5))]
    ks += [degradation.circular_lowpass_kernel(w, s, pad_to=21) for w, s in ((math.pi / 3, 7), (math.pi, 21))]
    for k in ks:
        assert abs(k.sum() - 1) < 1e-12
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1


def test_isotropic_gaussian_matches_formula():
    ks, sigma = 11, 1.7
    ref = np.zeros((ks, ks))
    for i in range(ks):
        for j in range(ks):
            ref[i, j] = math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * sigma ** 2))
    ref /= ref.sum()
    np.testing.assert_allclose(degradation.bivariate_kernel(ks, sigma, sigma, 0.0), ref, rtol=0, atol=1e-15)
    # rotating an isotropic kernel changes nothing; beta = 1 generalized is the Gaussian
    np.testing.assert_allclose(degradation.bivariate_kernel(ks, sigma, sigma, 0.9), ref, atol=1e-15)
    np.testing.assert_allclose(degradation.bivariate_kernel(ks, sigma, sigma, 0, 'generalized', 1.0), ref, atol=1e-15)


def test_anisotropic_kernel_orientation():
    k = degradation.bivariate_kernel(21, 4.0, 0.5, 0.0)  # long along x (columns)
    assert k[10, 14] > k[14, 10]
    k90 = degradation.bivariate_kernel(21, 4.0, 0.5, math.pi / 2)
    np.testing.assert_allclose(k90, k.T, atol=1e-12)


def test_sinc_kernel_is_radial_and_sums_to_one():
    k = degradation.circular_lowpass_kernel(math.pi / 4, 13)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1], atol=1e-15)
    assert k[6, 6] == k.max()


def test_filter2d_matches_per_sample_conv():
    x = torch.rand(3, 3, 20, 24, dtype=torch.float64)
    k = torch.rand(3, 5, 5, dtype=torch.float64)
    got = degradation.filter2d(x, k)
    for b in range(3):
        xp = F.pad(x[b:b + 1], (2, 2, 2, 2), mode='reflect')
        want = torch.cat([F.conv2d(xp[:, c:c + 1], k[b].view(1, 1, 5, 5)) for c in range(3)], 1)
        torch.testing.assert_close(got[b:b + 1], want, rtol=0, atol=1e-12)

# ---------------------------------------------------------------- image files


@pytest.mark.parametrize('mode', ['L', 'LA', 'RGBA', 'P', 'I;16', 'CMYK', 'RGB'])
def test_load_image_modes(tmp_path, mode):
    rgb = Image.fromarray((np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(12, 10, 3))
    if mode == 'I;16':
        img = Image.fromarray((np.arange(120).reshape(12, 10) * 500).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    path = str(tmp_path / ('x.tif' if mode == 'CMYK' else 'x.png'))
    img.save(path)
    x = data.load_image(path)
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    if mode in ('L', 'LA', 'I;16'):
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    if mode == 'I;16':
        assert abs(x[0, 11, 9].item() - 119 * 500 / 65535) < 1e-6
    if mode == 'RGB':
        assert torch.equal(x, torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255)


def test_alpha_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[:2, :, 3] = 255  # top half opaque black, bottom half transparent
    Image.fromarray(arr, 'RGBA').save(tmp_path / 'a.png')
    x = data.load_image(str(tmp_path / 'a.png'))
    assert (x[:, :2] == 0).all() and (x[:, 2:] == 1).all()


def test_bad_files_raise_naming_the_file(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / 'ok.jpg', quality=90)
    blob = (tmp_path / 'ok.jpg').read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(blob[:len(blob) // 2])
    (tmp_path / 'notes.png').write_text('not an image')
    for name in ('cut.jpg', 'notes.png', 'missing.png'):
        with pytest.raises(ImageLoadError, match=name) as e:
            data.load_image(str(tmp_path / name))
        assert isinstance(e.value, ValueError)


def test_prepare_images(tmp_path):
    src, dst = tmp_path / 'src', tmp_path / 'dst'
    src.mkdir()
    write_png(src / 'a.png', 40, 64)
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(src / 'b.jpg')
    (src / 'bad.jpg').write_text('junk')
    with pytest.warns(UserWarning, match='bad.jpg'):
        r = data.prepare_images(str(src), str(dst), downscale=2)
    assert len(r['written']) == 2 and r['bad'] == [str(src / 'bad.jpg')]
    assert sorted(os.listdir(dst)) == ['a.png', 'b.png']  # no temp files left behind
    assert Image.open(dst / 'a.png').size == (32, 20) and Image.open(dst / 'b.png').mode == 'RGB'
    mtime = os.path.getmtime(dst / 'a.png')
    with pytest.warns(UserWarning):
        r = data.prepare_images(str(src), str(dst), downscale=2)  # idempotent
    assert r['written'] == [] and len(r['existing']) == 2 and os.path.getmtime(dst / 'a.png') == mtime
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no source images'):
        data.prepare_images(str(tmp_path / 'empty'), str(dst))


def test_clashing_names_use_parent_folder():
    paths = ['/w/Kite/contents/images/2560x1600.jpg', '/w/Path/contents/images/2560x1600.jpg', '/x/a.jpg']
    assert data._unique_names(paths) == ['Kite', 'Path', 'a']

# ---------------------------------------------------------------- sampler and val pairs


def test_pair_sampler_shapes_and_skips(tmp_path):
    write_png(tmp_path / 'big.png', 80, 96)
    write_png(tmp_path / 'small.png', 40, 96)
    (tmp_path / 'junk.png').write_text('x')
    with pytest.warns(UserWarning) as w:
        s = data.PairSampler(str(tmp_path), crop=64, batch_size=3, seed=0)
    msgs = ' '.join(str(m.message) for m in w)
    assert 'small.png' in msgs and 'junk.png' in msgs and s.names == ['big.png']
    hr, lr = s.next()
    assert hr.shape == (3, 3, 64, 64) and lr.shape == (3, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='no usable image'):
            data.PairSampler(str(tmp_path), crop=128, batch_size=2)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        data.PairSampler(str(tmp_path / 'empty'), crop=64, batch_size=2)


def test_pair_sampler_resume_is_exact(tmp_path):
    write_png(tmp_path / 'a.png', 72, 80, seed=1)
    write_png(tmp_path / 'b.png', 96, 64, seed=2)
    make = lambda: data.PairSampler(str(tmp_path), crop=32, batch_size=2, seed=7, hue_prob=0.5)
    A = make()
    batches = [A.next() for _ in range(5)]
    B = make()
    for _ in range(2):
        B.next()
    state = B.state_dict()
    C = make()
    C.load_state_dict(state)
    for want in batches[2:]:
        got = C.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(batches[0][0], batches[1][0])


def jfif_ycbcr(rgb):
    """JFIF YCbCr written out (Cb, Cr centred on 0): rgb (..., 3) -> y, cb, cr."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 * r - 0.418688 * g - 0.081312 * b)


def test_hue_matrix_rotates_chroma_and_keeps_luma():
    rgb = torch.rand(500, 3, dtype=torch.float64)
    y0, cb0, cr0 = jfif_ycbcr(rgb)
    for angle in (0.0, 0.7, -2.5, math.pi):
        y, cb, cr = jfif_ycbcr(rgb @ data.hue_matrix(angle).double().t())
        c, s = math.cos(angle), math.sin(angle)
        torch.testing.assert_close(y, y0, rtol=0, atol=1e-6)
        torch.testing.assert_close(cb, c * cb0 - s * cr0, rtol=0, atol=1e-6)
        torch.testing.assert_close(cr, s * cb0 + c * cr0, rtol=0, atol=1e-6)


def test_pair_sampler_hue_augmentation(tmp_path):
    colour = (128, 102, 77)  # stays inside [0, 255] under every hue rotation
    Image.new('RGB', (48, 40), colour).save(tmp_path / 'flat.png')
    flat = torch.tensor(colour, dtype=torch.float64) / 255
    y0, cb0, cr0 = jfif_ycbcr(flat)
    none = DegradeConfig(mode='none')
    hr, _ = data.PairSampler(str(tmp_path), crop=32, batch_size=64, seed=0, deg_cfg=none, hue_prob=0.5).next()
    px = hr[:, :, 0, 0].double()                                           # (B, 3): crops are flat
    y, cb, cr = jfif_ycbcr(px)
    torch.testing.assert_close(y, y0.expand(64), rtol=0, atol=1e-5)        # luma kept
    torch.testing.assert_close(cb.hypot(cr), torch.hypot(cb0, cr0).expand(64), rtol=0, atol=1e-5)
    changed = (px - flat).abs().amax(1) > 1e-3
    assert 16 < int(changed.sum()) < 48                                    # about half rotated
    assert torch.equal(hr, hr[:, :, :1, :1].expand_as(hr))                 # one colour per crop
    # off: the sampler draws exactly the batches of a sampler without the setting
    a = data.PairSampler(str(tmp_path), crop=32, batch_size=4, seed=1, deg_cfg=none).next()[0]
    b = data.PairSampler(str(tmp_path), crop=32, batch_size=4, seed=1, deg_cfg=none, hue_prob=0.0).next()[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match='hue_prob=1.5'):
        data.PairSampler(str(tmp_path), crop=32, batch_size=4, hue_prob=1.5)


def test_val_pairs_deterministic_and_idempotent(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(2):
        write_png(src / f'p{i}.png', 80, 72, seed=i)
    write_png(src / 'tiny.png', 20, 20)
    with pytest.warns(UserWarning, match='tiny.png'):
        assert data.build_val_pairs(str(src), str(tmp_path / 'v1'), crop=64, seed=3)
    with pytest.warns(UserWarning, match='tiny.png'):
        data.build_val_pairs(str(src), str(tmp_path / 'v2'), crop=64, seed=3)
    a, b = data.load_val_pairs(str(tmp_path / 'v1')), data.load_val_pairs(str(tmp_path / 'v2'))
    assert a['names'] == ['p0', 'p1']
    assert a['hr'].shape == (2, 3, 64, 64) and a['lr'].shape == a['lr_bicubic'].shape == (2, 3, 16, 16)
    for k in ('hr', 'lr', 'lr_bicubic'):
        assert torch.equal(a[k], b[k])
    # built one image at a time, compared as a batch: resampling sums each output pixel's taps in one
    # order whatever the batch, then rounds to 8 bits, so bit for bit
    assert torch.equal(a['lr_bicubic'], degradation.bicubic_downsample(a['hr'], 4))
    assert torch.equal(a['hr'][0], data.load_image(str(src / 'p0.png'))[:, 8:72, 4:68])  # centre crop
    assert not glob.glob(str(tmp_path / 'v1' / '**' / '.*'), recursive=True)  # no temp files
    assert not data.build_val_pairs(str(src), str(tmp_path / 'v1'), crop=64, seed=3)  # up to date
    with pytest.warns(UserWarning):
        assert data.build_val_pairs(str(src), str(tmp_path / 'v1'), crop=64, seed=4)  # seed changed: rebuilt
    assert json.load(open(tmp_path / 'v1' / 'manifest.json'))['seed'] == 4
    assert not torch.equal(data.load_val_pairs(str(tmp_path / 'v1'))['lr'], a['lr'])
    with pytest.raises(ValueError, match='python data.py'):
        data.load_val_pairs(str(tmp_path / 'nowhere'))


def test_unfinished_or_incomplete_val_pairs_are_refused(tmp_path, run_script):
    src, v = tmp_path / 'src', tmp_path / 'v'
    src.mkdir()
    for i in range(3):
        write_png(src / f'p{i}.png', 64, 64, seed=i)
    data.build_val_pairs(str(src), str(v), crop=64, seed=0)
    files = sorted(str(p.relative_to(v)) for p in v.rglob('*'))
    (v / 'lr' / 'p1.png').rename(tmp_path / 'p1.png')  # a pair without its LR
    with pytest.raises(ValueError) as e:
        data.load_val_pairs(str(v))
    assert f"validation pairs in '{v}' are incomplete: 1 of the 9 files its manifest lists are missing " \
           f"(lr/p1.png)" in str(e.value) and 'python data.py' in str(e.value)
    p = run_script('eval.py', ['--sr=bicubic', f'--val_dir={v}', f'--out_json={tmp_path / "e.json"}'], check=False)
    assert p.returncode != 0 and 'lr/p1.png' in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert not (tmp_path / 'e.json').exists()
    (tmp_path / 'p1.png').rename(v / 'lr' / 'p1.png')
    (v / 'manifest.json').rename(tmp_path / 'manifest.json')  # a build killed before its manifest
    with pytest.raises(ValueError, match=f"validation pairs in '{v}' have no manifest.json"):
        data.load_val_pairs(str(v))
    (tmp_path / 'manifest.json').rename(v / 'manifest.json')
    assert sorted(str(p.relative_to(v)) for p in v.rglob('*')) == files  # refusing changed nothing
    assert data.load_val_pairs(str(v))['names'] == ['p0', 'p1', 'p2']


@pytest.mark.skipif(not os.path.exists('/usr/share/backgrounds/mate/nature/Aqua.jpg'), reason='Debian photos absent')
def test_real_photo_degrades():
    x = data.load_image('/usr/share/backgrounds/mate/nature/Aqua.jpg')
    hr = x[None, :, :128, :128]
    hr_out, lr = degradation.degrade(hr, DegradeConfig(), torch.Generator().manual_seed(0))
    assert lr.shape == (1, 3, 32, 32) and torch.equal(hr_out, hr)
    bic = degradation.bicubic_downsample(hr, 4)
    assert (lr - bic).abs().mean() > 1 / 255  # the degradation is visible
