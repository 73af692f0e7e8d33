"""sr.py: tiling and streamed blending against a whole-canvas reference and the untiled result,
padding, odd sizes, batching; a forward pass without host synchronisation; output names;
checkpoint errors."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from common import to_uint8
from chain import load_sr_chain, sr_function, super_resolve
from chain import _ramp, _starts, fix_colors, gaussian_blur, tile_warning, tiled_sr
from sr import output_names, runs

ROOT = Path(__file__).resolve().parents[1]

nearest = lambda x: F.interpolate(x, scale_factor=4, mode='nearest')
bicubic = lambda x: F.interpolate(x, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)


def tile_dependent(x):
    """A non-local x4 operator: bicubic plus a shift by each tile's own mean, so tiling changes the
    result and only the blending can make neighbouring tiles agree."""
    return (bicubic(x) + (x.mean((1, 2, 3), keepdim=True) - 0.5)).clamp(0, 1)


def canvas_reference(lr, fn, tile, overlap, scale=4):
    """Blend every tile into a whole-image float canvas (colour * weight and weight sums), then
    normalise and crop: the straightforward way, on lr reflect-padded to a multiple of 4."""
    H0, W0 = lr.shape[-2:]
    lr = F.pad(lr, (0, -W0 % 4, 0, -H0 % 4), mode='reflect')
    _, _, H, W = lr.shape
    out = torch.zeros(1, 3, H * scale, W * scale)
    wsum = torch.zeros(1, 1, H * scale, W * scale)
    th, tw = min(tile, H), min(tile, W)
    for y in _starts(H, tile, tile - overlap):
        for x in _starts(W, tile, tile - overlap):
            wy = _ramp(th * scale, overlap * scale, y == 0, y + th == H)
            wx = _ramp(tw * scale, overlap * scale, x == 0, x + tw == W)
            w = wy[:, None] * wx[None, :]
            sr = fn(lr[..., y:y + th, x:x + tw].contiguous())  # as a batch of tiles, so the same mean order
            out[..., y * scale:(y + th) * scale, x * scale:(x + tw) * scale] += sr * w
            wsum[..., y * scale:(y + th) * scale, x * scale:(x + tw) * scale] += w
    return to_uint8(out / wsum)[:, :H0 * scale, :W0 * scale]


@pytest.mark.parametrize('H, W', [(70, 45), (64, 64), (33, 100), (7, 5)])
def test_tiling_is_exact_for_a_pointwise_operator(H, W):
    """Every output pixel of a pointwise x4 op depends on one LR pixel, so any tiling must give the
    untiled result exactly: this checks tile placement, blend-weight normalisation and cropping."""
    lr = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    ref = to_uint8(nearest(lr))
    for batch_size in (1, 3):
        out = tiled_sr(lr, nearest, scale=4, tile=24, overlap=8, multiple=4, batch_size=batch_size)
        assert out.shape == ref.shape == (1, 4 * H, 4 * W, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, ref)  # nearest copies values, no sum: exact for any tiling


@pytest.mark.parametrize('H, W, tile, overlap', [(96, 80, 32, 8), (64, 200, 48, 16), (38, 41, 16, 0),
                                                 (130, 22, 24, 12)])
def test_streamed_bands_equal_blending_into_a_whole_canvas(H, W, tile, overlap):
    """The band-by-band accumulation adds the same terms in the same order as a whole-image float
    canvas, so for an operator whose tiles disagree the uint8 results are identical."""
    g = torch.Generator().manual_seed(H + W)
    lr = F.interpolate(torch.rand(1, 3, H // 4, W // 4, generator=g), size=(H, W), mode='bilinear')
    out = tiled_sr(lr, tile_dependent, scale=4, tile=tile, overlap=overlap, multiple=4)
    ref = canvas_reference(lr, tile_dependent, tile, overlap)
    np.testing.assert_array_equal(out, ref)
    assert np.abs(out.astype(int) - to_uint8(tile_dependent(lr)).astype(int)).mean() > 0.5  # tiles matter here


def test_tiling_is_close_for_a_local_operator_and_seamless():
    """Bicubic reads 2 LR pixels across a tile edge; blending over 8 LR pixels must hide that."""
    g = torch.Generator().manual_seed(1)
    lr = F.interpolate(torch.rand(1, 3, 20, 20, generator=g), size=(80, 72), mode='bilinear')
    ref = to_uint8(bicubic(lr)).astype(int)
    out = tiled_sr(lr, bicubic, scale=4, tile=32, overlap=8, multiple=4).astype(int)
    err = np.abs(out - ref)
    assert err.mean() < 0.3 and err.max() <= 13


def test_padding_to_the_patch_multiple_is_cropped_back_and_batches_go_through_together():
    lr = torch.rand(3, 3, 13, 18)
    calls = []
    out = tiled_sr(lr, lambda x: calls.append(x.shape) or nearest(x), scale=4, tile=0, overlap=0, multiple=8)
    np.testing.assert_array_equal(out, to_uint8(nearest(lr)))
    assert calls == [(3, 3, 16, 24)]  # one call for the batch, padded to the patch multiple


def test_ramp_weights_are_flat_at_the_border_and_positive_inside():
    w = _ramp(16, 4, lo_edge=True, hi_edge=False)
    assert torch.all(w[:12] == 1) and torch.all(w[12:] > 0) and torch.all(w[12:] < 1)
    w = _ramp(16, 4, lo_edge=False, hi_edge=False)
    # where the rising ramp of one tile meets the falling ramp of its neighbour the weights sum to 1
    assert w[0] > 0 and w[-1] > 0 and torch.allclose(w[:4] + w[-4:], torch.full((4,), 1.0))


def test_bad_tile_settings_are_refused_and_tiny_tiles_warned():
    with pytest.raises(ValueError, match='tile=30'):
        tiled_sr(torch.rand(1, 3, 64, 64), nearest, tile=30, overlap=8, multiple=4)
    assert tile_warning(64, 16) is None and tile_warning(0, 0) is None and tile_warning(32, 16) is None
    # 20 - 16 = 4 LR pixels per step: each pixel in (20 / 4)^2 = 25 tiles
    assert '25 times' in tile_warning(20, 16) and '\n' not in tile_warning(20, 16)
    assert tile_warning(24, 0) and tile_warning(64, 40)


def test_runs_group_consecutive_equal_sizes_up_to_the_batch_size():
    items = [(1, 'a'), (1, 'b'), (1, 'c'), (2, 'd'), (None, 'e'), (None, 'f'), (1, 'g')]
    got = [[name for _, name in r] for r in runs(items, 2, key=lambda it: it[0])]
    assert got == [['a', 'b'], ['c'], ['d'], ['e'], ['f'], ['g']]

# ----------------------------------------------------------------------------- no host sync


def _refuse_host_read(self, *args, **kwargs):
    raise RuntimeError("host synchronisation: Tensor.tolist / Tensor.numpy")


class NoHostSync(TorchDispatchMode):
    """Raises on every operator that makes the host wait for a device's values: reading a scalar
    (.item(), bool(), int(), float(), `if tensor:` all end in aten._local_scalar_dense), comparing
    whole tensors into a Python bool, and ops whose output shape depends on the data (nonzero,
    masked indexing, unique, ...), and .tolist() / .numpy(). On a CPU nothing waits, but the same
    code on a GPU would."""
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
               torch.ops.aten.nonzero.default, torch.ops.aten.nonzero_static.default,
               torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
               torch.ops.aten.unique_dim.default, torch.ops.aten.unique_consecutive.default,
               torch.ops.aten.bincount.default, torch.ops.aten.repeat_interleave.Tensor}

    def __enter__(self):  # .tolist() / .numpy() read the data without a dispatched operator
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy
        torch.Tensor.tolist = torch.Tensor.numpy = _refuse_host_read
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                          torch.ops.aten.index_put_.default) and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1])
        if func in self.SYNCING or masked:
            raise RuntimeError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_sync():
    """NoHostSync: `with no_host_sync(): ...` refuses every host synchronisation inside the block."""
    return NoHostSync


@pytest.mark.parametrize('sync', [lambda x: x.sum().item(), lambda x: bool(x.max() > 0),
                                  lambda x: 1 if x.sum() > 0 else 0, lambda x: x[x > 0.5],
                                  lambda x: torch.nonzero(x), lambda x: x.unique(), lambda x: x.tolist(),
                                  lambda x: torch.equal(x, x), lambda x: int(x.argmax())])
def test_the_host_sync_check_catches_each_kind_of_sync(no_host_sync, sync):
    with pytest.raises(RuntimeError, match='host synchronisation'), no_host_sync():
        sync(torch.rand(4, 4))


def test_super_resolve_makes_no_host_sync(tiny_gen, no_host_sync):
    """The whole chain (prior, generator, top-1 indices, decoder) on a batch, under the check: it
    must finish, and give what it gives outside the check."""
    tok, gen, prior = load_sr_chain(tiny_gen, 'cpu')
    lr = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    with no_host_sync():
        sr, idx = super_resolve(lr, tok, gen, prior, return_indices=True)
        fn_sr = sr_function(tok, gen, prior, 'cpu', cuda_graphs=True)(lr)  # cuda_graphs: no effect on a CPU
    assert sr.shape == (2, 3, 96, 160) and idx.shape[0] == 2
    ref = super_resolve(lr, tok, gen, prior)
    assert torch.equal(sr, ref) and torch.equal(fn_sr, ref)  # one process, same batch and ops: bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_super_resolve_on_cuda_without_sync_with_flash_attention_and_cuda_graphs(tiny_gen):
    """On a GPU: no synchronising CUDA call in the forward (torch's sync debug mode), bf16
    attention through the flash kernel (forced: SDPA raises if it cannot use it), and the CUDA-graph
    replay equal to the eager chain."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tok, gen, prior = load_sr_chain(tiny_gen, 'cuda')
    lr = torch.rand(4, 3, 32, 32, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        super_resolve(lr, tok, gen, prior)  # warm-up: cuDNN / cuBLAS set-up may synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            eager = super_resolve(lr, tok, gen, prior)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        graphed = sr_function(tok, gen, prior, 'cuda', cuda_graphs=True)
        for _ in range(3):  # warm-up, capture, replay
            out = graphed(lr).clone()
    # bf16: compiled kernels round differently, which may flip a near-tie token here and there
    assert out.shape == eager.shape and (out - eager).abs().mean() < 5e-3

# ----------------------------------------------------------------------------- the script


def test_sr_script_on_a_folder_with_bad_and_odd_images(tiny_gen, run_script, tmp_path):
    """Any size, grey / RGBA / 16-bit inputs, an unreadable file reported while the others are
    still written; tiled and untiled runs of the real chain agree in shape and stay close."""
    src = tmp_path / 'in'
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(src / 'rgb.png')
    Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8)).save(src / 'grey.png')
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(src / 'rgba.png')
    Image.fromarray(rng.integers(0, 65536, (12, 14), dtype=np.uint16)).save(src / 'deep.png')
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / 'cut.jpg')
    (src / 'cut.jpg').write_bytes((src / 'cut.jpg').read_bytes()[:300])  # truncated JPEG
    p = run_script('sr.py', [f'--input={src}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path / "a"}',
                             '--tile=0'], check=False)
    assert p.returncode == 1 and 'cut.jpg' in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert 'done: 4 written' in p.stdout and ' s -> ' in p.stdout  # time per image printed
    for name, (h, w) in dict(rgb=(37, 45), grey=(20, 18), rgba=(16, 16), deep=(12, 14)).items():
        with Image.open(tmp_path / 'a' / f'{name}_x4.png') as im:
            assert im.size == (4 * w, 4 * h) and im.mode == 'RGB', name
    # an image within one tile is not tiled: the same PNG as tile=0; cuda_graphs is a no-op on a CPU.
    # Bit for bit although another process: both sr.py runs have the same settings, thread count
    # (torch's default) and shapes (this image alone, one pass)
    run_script('sr.py', [f'--input={src / "rgb.png"}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path / "c"}',
                         '--tile=64', '--cuda_graphs=True'])
    a = np.asarray(Image.open(tmp_path / 'a' / 'rgb_x4.png'), dtype=np.float64)
    np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / 'c' / 'rgb_x4.png')))
    p = run_script('sr.py', [f'--input={src / "rgb.png"}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path / "b"}',
                             '--tile=16', '--overlap=4'])
    assert 'warning: tile=16, overlap=4' in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    b = np.asarray(Image.open(tmp_path / 'b' / 'rgb_x4.png'), dtype=np.float64)
    # global attention and the prior see less context in a tile, so tokens may change near tile
    # borders; on this barely trained chain the images must still agree closely on average
    assert a.shape == b.shape and np.abs(a - b).mean() / 255 < 0.02


def test_sr_script_batches_equal_sizes_like_single_images(tiny_gen, run_script, tmp_path):
    """A folder of equal-size crops of a photo goes through 4 at a time (plus the rest) and gives
    the PNGs of one-at-a-time runs; an image of another size starts a new batch."""
    src = tmp_path / 'in'
    src.mkdir()
    photo = np.asarray(Image.open(sorted((ROOT / 'assets' / 'val_pairs' / 'lr').glob('*.png'))[0]).convert('RGB'))
    for i in range(5):
        Image.fromarray(photo[i * 4:i * 4 + 24, i * 6:i * 6 + 32]).save(src / f'crop{i}.png')
    Image.fromarray(photo[:16, :16]).save(src / 'small.png')
    outs = {}
    for bs in (1, 4):
        p = run_script('sr.py', [f'--input={src}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path / str(bs)}',
                                 f'--batch_size={bs}'])
        assert 'done: 6 written' in p.stdout and p.stdout.count('(batch of 4)') == (4 if bs == 4 else 0), p.stdout
        outs[bs] = [np.asarray(Image.open(tmp_path / str(bs) / f'{n}_x4.png'), dtype=np.int16)
                    for n in [f'crop{i}' for i in range(5)] + ['small']]
    for one, batched in zip(outs[1], outs[4]):  # a batch of 4 sums in another order than 1: not bit for bit
        assert one.shape == batched.shape and np.abs(one - batched).mean() < 0.5


def test_gaussian_blur_against_a_direct_2d_convolution():
    x = torch.rand(2, 3, 20, 17, dtype=torch.float64)
    sigma = 1.3
    r = 4                                                        # ceil(3 sigma)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k2 = np.outer(g, g) / g.sum() ** 2
    pad = np.pad(x.numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode='reflect')
    ref = np.zeros_like(x.numpy())
    for i in range(20):
        for j in range(17):
            ref[:, :, i, j] = (pad[:, :, i:i + 2 * r + 1, j:j + 2 * r + 1] * k2).sum((-2, -1))
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), ref, rtol=0, atol=1e-12)


def jfif(x):
    """(B, 3, H, W) RGB -> Y, Cb, Cr (centred), the JFIF formulas written out."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    return (0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 * r - 0.418688 * g - 0.081312 * b)


def test_colour_correction_takes_the_coarse_chroma_from_the_lr():
    torch.manual_seed(0)
    lr = 0.3 + 0.4 * torch.rand(2, 3, 16, 16)                     # mid-range: nothing clamps below
    up = F.interpolate(lr, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    # an output with the LR's colours is left as it is
    torch.testing.assert_close(fix_colors(up, lr, 8.0), up, rtol=0, atol=1e-5)
    # a tint (a constant chroma offset) and fine chroma detail: the tint goes, the detail and the luma stay
    y, cb, cr = jfif(up)
    detail = 0.01 * torch.randn(2, 1, 64, 64)
    shift = lambda dcb, dcr: torch.stack([1.402 * dcr, -0.344136 * dcb - 0.714136 * dcr, 1.772 * dcb], 1)[:, :, 0]
    tinted = up + shift(0.05 + detail, -0.04 + 0 * detail)        # RGB change of (dCb, dCr), luma kept
    out = fix_colors(tinted, lr, 8.0)
    y2, cb2, cr2 = jfif(out)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-5)
    torch.testing.assert_close(cb2 - cb, (detail - gaussian_blur(detail, 8.0))[:, 0], rtol=0, atol=1e-5)  # no tint
    torch.testing.assert_close(cr2, cr, rtol=0, atol=1e-5)


def test_output_names_never_collide():
    names = output_names(['in/photo.jpg', 'in/photo.png', 'in/cat.png', 'other/dog.JPG'])
    assert names == ['photo_jpg_x4.png', 'photo_png_x4.png', 'cat_x4.png', 'dog_x4.png']


def test_wrong_kind_truncated_and_relative_checkpoints_get_one_clear_line(tiny_tok, tiny_gen, run_script, tmp_path):
    """A tokenizer checkpoint given as --gen_ckpt, a generator checkpoint as --tok_ckpt, a truncated
    file: one line naming the file and what was expected, no traceback. The generator checkpoint
    records its tokenizer relative to its own folder (and absolute), so sr.py works from any working
    directory."""
    img = tmp_path / 'x.png'
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img)
    p = run_script('sr.py', [f'--input={img}', f'--gen_ckpt={tiny_tok}', f'--out_dir={tmp_path}/o'], check=False)
    assert p.returncode != 0 and 'is a stage-1 tokenizer checkpoint' in p.stderr, p.stderr
    assert 'expects a stage-2 generator checkpoint' in p.stderr and 'Traceback' not in p.stderr
    p = run_script('generator.py', ['config/tiny.py', f'--tok_ckpt={tiny_gen}', '--max_iters=1',
                                    f'--out_dir={tmp_path}/g'], check=False)
    assert p.returncode != 0 and 'is a stage-2 generator checkpoint' in p.stderr, p.stderr
    assert 'expects a stage-1 tokenizer checkpoint' in p.stderr and 'Traceback' not in p.stderr
    cut = tmp_path / 'cut.pt'
    cut.write_bytes(tiny_gen.read_bytes()[:1000])
    p = run_script('sr.py', [f'--input={img}', f'--gen_ckpt={cut}', f'--out_dir={tmp_path}/o'], check=False)
    assert p.returncode != 0 and str(cut) in p.stderr and 'truncated' in p.stderr and 'Traceback' not in p.stderr
    record = torch.load(tiny_gen, weights_only=True)['tok_ckpt']
    assert not os.path.isabs(record['rel']) and os.path.isabs(record['abs'])
    q = subprocess.run([sys.executable, str(ROOT / 'sr.py'), f'--input={img}', f'--gen_ckpt={tiny_gen}',
                        f'--out_dir={tmp_path}/o'], cwd='/', capture_output=True, text=True, timeout=300)
    assert q.returncode == 0 and (tmp_path / 'o' / 'x_x4.png').is_file(), q.stderr


def test_bench_runs_the_streamed_tiling_on_a_large_input(run_script):
    """bench.py --mode=sr_large: sr.py's tiling of a resized validation photo, with bicubic as the SR
    function (the tiling alone): 100 LR pixels in tiles of 64 with overlap 16 start at 0 and 36
    per axis, so 4 tiles, and a 400 x 400 output."""
    p = run_script('bench.py', ['--mode=sr_large', '--side=100', '--sr_fn=bicubic', '--threads=1'])
    assert '-> 400x400, 4 tiles of 64 (overlap 16)' in p.stdout, p.stdout
    for key in ('sr_large_tiles_s:', 'sr_large_png_s:', 'process_peak_rss_mb:'):
        assert key in p.stdout, key
