"""Nothing is lost: one run per out_dir (a lock holding its PID), no silent replacement of a
checkpoint, an append-only log, stale temp files removed, failed writes that keep the old file and
say why, and the training curves. Stage scripts run as subprocesses on tiny settings."""
import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import GEN_TINY, TOK_TINY

ROOT = Path(__file__).resolve().parents[1]
QUIET = ['--eval_interval=1000000', '--log_interval=1000000']


def dead_pid():
    """The PID of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid

# ----------------------------------------------------------------------------- out_dir ownership


def test_second_run_on_a_locked_out_dir_exits_at_once_and_sigterm_releases_the_lock(tiny_val, run_script,
                                                                                    tmp_path):
    out = tmp_path / 'run'
    args = TOK_TINY + QUIET + [f'--val_dir={tiny_val}', f'--out_dir={out}']
    with open(tmp_path / 'a.out', 'w') as fo, open(tmp_path / 'a.err', 'w') as fe:
        a = subprocess.Popen([sys.executable, 'tokenizer.py', *args, '--max_iters=100000000'], cwd=ROOT,
                             stdout=fo, stderr=fe, text=True)
    try:
        for _ in range(600):  # until the first run holds the lock (it then trains for a long time)
            if (out / 'lock').is_file() and (out / 'lock').read_text().strip() == str(a.pid):
                break
            assert a.poll() is None, (tmp_path / 'a.err').read_text()
            time.sleep(0.1)
        else:
            pytest.fail('the first run never took the lock')
        log_before = (out / 'log.txt').read_text()
        b = run_script('tokenizer.py', args + ['--max_iters=2'], check=False)
        assert b.returncode != 0 and 'Traceback' not in b.stderr, b.stderr
        assert f"out_dir '{out}' is in use by another run (PID {a.pid}" in b.stderr, b.stderr
        assert 'step ' not in b.stdout and 'training from scratch' not in b.stdout  # refused before any work
        assert (out / 'lock').read_text().strip() == str(a.pid)  # the first run's lock and log are untouched
        log = (out / 'log.txt').read_text()
        assert log.startswith(log_before) and log.count('run started') == 1 and '--max_iters=2' not in log
    finally:
        a.send_signal(signal.SIGTERM)
        rc = a.wait(timeout=120)
    assert rc == 128 + signal.SIGTERM and 'stopped by SIGTERM' in (tmp_path / 'a.err').read_text()
    assert not (out / 'lock').exists()
    assert not [f for f in os.listdir(out) if '.tmp' in f]


def test_a_new_run_takes_over_what_a_killed_run_left(tiny_val, run_script, tmp_path):
    """kill -9 leaves a lock whose process is gone, half-written temp files, a checkpoint and a log:
    a run refused for its settings touches none of them; a scratch run with --overwrite=True takes
    the lock over, removes the dead writers' temp files (not a live one's), replaces the checkpoint
    and appends to the log."""
    out, dead = tmp_path / 'run', dead_pid()
    out.mkdir()
    (out / 'lock').write_text(f'{dead}\n')
    for name in (f'.ckpt.pt.tmp{dead}', f'.samples_000000.png.tmp{dead}'):
        (out / name).write_bytes(b'half a file')
    alive = out / f'.summary.json.tmp{os.getpid()}'  # a writer that still runs (this test): kept
    alive.write_bytes(b'being written')
    (out / 'ckpt.pt').write_bytes(b'the checkpoint of the killed run')
    (out / 'log.txt').write_text('the log of the killed run\n')
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    args = TOK_TINY + QUIET + ['--max_iters=1', f'--val_dir={tiny_val}', f'--out_dir={out}', '--overwrite=True']
    p = run_script('tokenizer.py', args + ['--batch_size=0'], check=False)
    assert p.returncode != 0 and 'batch_size=0' in p.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # the log was not even opened

    p = run_script('tokenizer.py', args)
    log = (out / 'log.txt').read_text()
    assert log.startswith('the log of the killed run\n') and log.count('run started') == 1
    assert f"took over the lock {out / 'lock'} of PID {dead}, which no longer runs" in log
    assert f"removed 2 temp file(s) of killed runs: .ckpt.pt.tmp{dead} .samples_000000.png.tmp{dead}" in log
    assert f"overwrite=True: {out / 'ckpt.pt'} of an earlier run is replaced" in log and 'overwrite' in p.stdout
    assert torch.load(out / 'ckpt.pt', weights_only=False)['step'] == 1
    assert sorted(os.listdir(out)) == sorted([alive.name, 'ckpt.pt', 'curves.png', 'log.txt', 'samples_000000.png',
                                              'samples_000000.txt', 'samples_000001.png', 'samples_000001.txt',
                                              'summary.json'])  # the lock is gone at exit, so are the temp files
    assert alive.read_bytes() == b'being written'


@pytest.mark.parametrize('script', ['tokenizer.py', 'generator.py', 'finetune_decoder.py'])
def test_a_scratch_run_never_replaces_an_earlier_checkpoint(script, request, run_script, tmp_path):
    """The refusal comes before anything reads the old files, so any bytes stand for a checkpoint."""
    args = {'tokenizer.py': lambda: TOK_TINY,
            'generator.py': lambda: GEN_TINY + [f"--tok_ckpt={request.getfixturevalue('tiny_tok')}"],
            'finetune_decoder.py': lambda: ['config/finetune_decoder_tiny.py',
                                            f"--gen_ckpt={request.getfixturevalue('tiny_gen')}"]}[script]()
    (tmp_path / 'ckpt.pt').write_bytes(b'the checkpoint of a long run')
    (tmp_path / 'log.txt').write_text('the log of a long run\n')
    p = run_script(script, args + ['--max_iters=2', f'--out_dir={tmp_path}'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert f"{tmp_path / 'ckpt.pt'} holds an earlier run" in p.stderr and '--overwrite=True' in p.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == b'the checkpoint of a long run'
    assert (tmp_path / 'log.txt').read_text() == 'the log of a long run\n'
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'log.txt']  # no lock, nothing else


def test_an_out_dir_that_cannot_be_made_is_one_line(run_script, tmp_path):
    (tmp_path / 'file').write_text('x')
    p = run_script('tokenizer.py', TOK_TINY + [f'--out_dir={tmp_path / "file" / "x"}'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert f"cannot create or write in out_dir '{tmp_path / 'file' / 'x'}': Not a directory" in p.stderr

# ----------------------------------------------------------------------------- failed writes


@pytest.mark.parametrize('code, words', [(errno.ENOSPC, 'no space left on the device'),
                                         (errno.EACCES, 'permission denied'),
                                         (errno.EROFS, 'read-only file system')])
def test_a_write_that_fails_for_space_or_permission_keeps_the_old_file(code, words, tmp_path):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(b'old checkpoint' * 1000)

    def write(tmp):  # writes half of the new file, then the device refuses
        with open(tmp, 'wb') as f:
            f.write(b'new' * 500)
            raise OSError(code, os.strerror(code))
    with pytest.raises(SystemExit) as e:
        common.atomic_write(str(path), write)
    assert str(e.value) == (f"error: cannot write '{path}': {words} (nothing was replaced; "
                            f"the temp file is removed)")
    assert path.read_bytes() == b'old checkpoint' * 1000 and os.listdir(tmp_path) == ['ckpt.pt']


def test_other_write_errors_are_raised_and_leave_no_temp_file(tmp_path):
    path = tmp_path / 'a.json'
    path.write_text('{}')

    def write(tmp):
        Path(tmp).write_text('{"half')
        raise ValueError('not serialisable')
    with pytest.raises(ValueError, match='not serialisable'):
        common.atomic_write(str(path), write)
    assert path.read_text() == '{}' and os.listdir(tmp_path) == ['a.json']


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """torch.save writing into a file on a disk with 4 kB left, as save_state does it: the error
    names the path and the cause (torch's own writer would report 'unexpected pos ...')."""
    path = tmp_path / 'ckpt.pt'
    model = torch.nn.Linear(64, 64)
    common.save_state(str(path), dict(model=model), 'tokenizer', step=1)
    before = path.read_bytes()

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() + memoryview(b).nbytes > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)
    monkeypatch.setattr(common, 'open', lambda file, mode: FullDisk(file, 'w'), raising=False)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(SystemExit, match=f"cannot write '{path}': no space left on the device"):
        common.save_state(str(path), dict(model=model), 'tokenizer', step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['ckpt.pt']
    monkeypatch.undo()
    assert common.load_checkpoint(str(path), kind='tokenizer')['step'] == 1

# ----------------------------------------------------------------------------- training curves


def test_curves_draw_one_panel_per_number_against_steps(tmp_path):
    history = dict(train=[dict(step=s, loss=1.0 / s, rate=1e-3) for s in range(1, 41)],
                   eval=[dict(step=s, psnr_y=20.0 + s, bad=float('nan')) for s in (0, 20, 40)])
    common.save_curves(history, str(tmp_path / 'curves.png'))
    img = np.asarray(Image.open(tmp_path / 'curves.png').convert('RGB')).astype(int)
    assert img.shape == (150, 4 * 260, 3)  # three panels (train loss, train rate, eval psnr_y): one row
    for panel, falls in ((0, True), (2, False)):  # the loss falls, the metric rises, left to right
        blue_or_red = (abs(img[..., 0] - img[..., 2]) > 100) & (img[..., 1] < 120)
        ys, xs = np.nonzero(blue_or_red[:, panel * 260:(panel + 1) * 260])
        first, last = ys[xs == xs.min()].mean(), ys[xs == xs.max()].mean()
        assert (first < last) == falls, (panel, first, last)  # image rows grow downwards
    common.save_curves(dict(train=[], eval=[]), str(tmp_path / 'none.png'))
    assert not (tmp_path / 'none.png').exists()
