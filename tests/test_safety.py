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
            'finetune_decoder.py': lambda: ['config/tiny.py',
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

# ----------------------------------------------------------------------------- checkpoints that run code


class RunsCode:
    """A pickle payload: unpickling it calls open(path, 'w'), i.e. creates a file (any code could run)."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_load_checkpoint_refuses_a_pickle_that_would_run_code_and_runs_none_of_it(tmp_path):
    marker, path = tmp_path / 'ran', tmp_path / 'evil.pt'
    torch.save(dict(kind='generator', payload=RunsCode(marker)), path)
    with pytest.raises(ValueError) as e:
        common.load_checkpoint(str(path), '--gen_ckpt', kind='generator')
    msg = str(e.value)
    assert f"refusing to load --gen_ckpt '{path}'" in msg and 'could run code' in msg and '\n' not in msg
    assert '(io.open)' in msg and not marker.exists()  # the callable the pickle names


def test_the_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    """Global RNG states (torch, numpy with a cached Gaussian, Python) are stored as tensors and plain
    values: restored from a weights_only load, every stream continues as if never saved."""
    import random
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.standard_normal()  # numpy now holds a cached second Gaussian (has_gauss = 1)
    common.save_state(str(tmp_path / 'ckpt.pt'), {}, 'tokenizer', step=1)
    want = (torch.rand(5), np.random.standard_normal(3), [random.random() for _ in range(3)])
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    common.set_rng_state(common.load_checkpoint(str(tmp_path / 'ckpt.pt'), kind='tokenizer')['rng'])
    got = (torch.rand(5), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


@pytest.mark.parametrize('loader', ['sr.py --gen_ckpt', 'sr.py --decoder_ckpt', 'eval.py --gen_ckpt',
                                    'generator.py --tok_ckpt', 'tokenizer.py --init_from',
                                    'tokenizer.py resume', 'finetune_decoder.py --gen_ckpt'])
def test_every_checkpoint_loader_refuses_a_code_running_pickle_in_one_line(loader, tiny_val, tiny_gen, run_script,
                                                                           tmp_path):
    marker, evil = tmp_path / 'ran', tmp_path / 'evil.pt'
    torch.save(dict(kind='tokenizer', model_args={}, payload=RunsCode(marker)), evil)
    img = tmp_path / 'x.png'
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img)
    out = tmp_path / 'out'
    args = {'sr.py --gen_ckpt': ['sr.py', f'--input={img}', f'--gen_ckpt={evil}', f'--out_dir={out}'],
            'sr.py --decoder_ckpt': ['sr.py', f'--input={img}', f'--gen_ckpt={tiny_gen}', f'--decoder_ckpt={evil}',
                                     f'--out_dir={out}'],
            'eval.py --gen_ckpt': ['eval.py', '--sr=chain', f'--gen_ckpt={evil}', f'--val_dir={tiny_val}',
                                   f'--out_json={out}/x.json'],
            'generator.py --tok_ckpt': ['generator.py', *GEN_TINY, f'--tok_ckpt={evil}', f'--out_dir={out}'],
            'tokenizer.py --init_from': ['tokenizer.py', *TOK_TINY, f'--init_from={evil}', f'--out_dir={out}'],
            'tokenizer.py resume': ['tokenizer.py', *TOK_TINY, '--init_from=resume', f'--out_dir={out}'],
            'finetune_decoder.py --gen_ckpt': ['finetune_decoder.py', 'config/tiny.py',
                                               f'--gen_ckpt={evil}', f'--out_dir={out}']}[loader]
    if loader == 'tokenizer.py resume':
        out.mkdir()
        evil.rename(out / 'ckpt.pt')
    p = run_script(args[0], args[1:] + ['--max_iters=1'] * args[0].endswith(('tokenizer.py', 'generator.py',
                                                                              'decoder.py')), check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert 'refusing to load' in p.stderr and 'could run code' in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert str(out / 'ckpt.pt' if loader == 'tokenizer.py resume' else evil) in p.stderr
    assert not marker.exists()

# ----------------------------------------------------------------------------- divergence never reaches a checkpoint


def test_check_before_save_refuses_non_finite_weights_and_a_collapsed_evaluation():
    model, lines = torch.nn.Linear(3, 3), []
    state = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    common.check_before_save(5, lines.append, state, dict(psnr_y=22.0), dict(psnr_y=25.0), 5.0)   # within 5 dB
    common.check_before_save(5, lines.append, state, dict(r_psnr_y=30.0), None, 5.0)             # first save
    common.check_before_save(5, lines.append, state, dict(psnr_y=10.0), dict(psnr_y=25.0), 0.0)  # guard off
    assert lines == []
    with pytest.raises(SystemExit, match=r"psnr_y 19\.90 against 25\.00 of the saved checkpoint, more than "
                                         r"collapse_db=5\.0 lower\); the checkpoint in out_dir was not replaced"):
        common.check_before_save(7, lines.append, state, dict(psnr_y=19.9), dict(psnr_y=25.0), 5.0)
    with pytest.raises(SystemExit, match='x4_psnr_y nan'):  # a NaN evaluation is a collapse too
        common.check_before_save(7, lines.append, state, dict(x4_psnr_y=float('nan')), dict(x4_psnr_y=20.0), 5.0)
    with torch.no_grad():
        model.bias[1] = float('inf')
    with pytest.raises(SystemExit, match='the weights of model are not finite'):
        common.check_before_save(8, lines.append, state, dict(psnr_y=25.0), dict(psnr_y=25.0), 5.0)
    assert lines[0].startswith('not saved at step 7: its evaluation collapsed') and len(lines) == 3


def test_a_resumed_run_whose_evaluation_collapses_keeps_the_checkpoint(tiny_val, run_script, tmp_path):
    """The saved checkpoint's evaluation is raised to 99 dB: any real evaluation after resuming is then
    a collapse, as after a far too high learning rate on a trained model. The run ends with one line,
    and ckpt.pt is byte for byte the one before."""
    out = tmp_path / 'tok'
    run_script('tokenizer.py', TOK_TINY + ['--max_iters=1', f'--val_dir={tiny_val}', f'--out_dir={out}'])
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    ckpt['metrics']['r_psnr_y'] = 99.0
    torch.save(ckpt, out / 'ckpt.pt')
    before = (out / 'ckpt.pt').read_bytes()
    p = run_script('tokenizer.py', TOK_TINY + ['--max_iters=2', '--init_from=resume', f'--val_dir={tiny_val}',
                                               f'--out_dir={out}'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert 'against 99.00 of the saved checkpoint' in p.stderr and 'was not replaced' in p.stderr
    assert (out / 'ckpt.pt').read_bytes() == before and 'not saved at step 2' in (out / 'log.txt').read_text()

# ----------------------------------------------------------------------------- chain identity, moved projects


def test_a_chain_checks_identity_by_weights_and_survives_a_move(tiny_val, tiny_gen, run_script, tmp_path):
    """A chain trained in a/ and moved to b/ (a/ gone) still runs and resumes stage 3: the paths inside
    its checkpoints are relative first. A stage-3 decoder is refused with another tokenizer of the same
    architecture (tiny_gen's), and a generator whose tokenizer file now holds other weights too."""
    a, b, img = tmp_path / 'a', tmp_path / 'b', tmp_path / 'x.png'
    Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8)).save(img)
    run_script('tokenizer.py', TOK_TINY + ['--max_iters=1', '--seed=7', f'--val_dir={tiny_val}', f'--out_dir={a}/tok'])
    run_script('generator.py', GEN_TINY + ['--max_iters=1', f'--val_dir={tiny_val}', f'--tok_ckpt={a}/tok/ckpt.pt',
                                           f'--out_dir={a}/gen'])
    dec_args = ['config/tiny.py', '--crop_size=32', '--batch_size=2', '--max_minutes=0',
                '--threads=1', f'--val_dir={tiny_val}']
    run_script('finetune_decoder.py', dec_args + ['--max_iters=1', f'--gen_ckpt={a}/gen/ckpt.pt', f'--out_dir={a}/dec'])
    assert torch.load(a / 'gen' / 'ckpt.pt', weights_only=True)['tok_ckpt']['rel'] == '../tok/ckpt.pt'
    a.rename(b)
    p = run_script('sr.py', [f'--input={img}', f'--gen_ckpt={b}/gen/ckpt.pt', f'--decoder_ckpt={b}/dec/ckpt.pt',
                             f'--out_dir={tmp_path}/o'])
    assert 'done: 1 written' in p.stdout
    p = run_script('finetune_decoder.py', dec_args + ['--max_iters=2', '--init_from=resume',
                                                      f'--gen_ckpt={b}/gen/ckpt.pt', f'--out_dir={b}/dec'])
    assert 'resumed from' in p.stdout and torch.load(b / 'dec' / 'ckpt.pt', weights_only=True)['step'] == 2

    p = run_script('sr.py', [f'--input={img}', f'--gen_ckpt={tiny_gen}', f'--decoder_ckpt={b}/dec/ckpt.pt',
                             f'--out_dir={tmp_path}/o2'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert f"{b}/dec/ckpt.pt is a decoder fine-tuned for another tokenizer" in p.stderr
    assert not (tmp_path / 'o2').exists()
    tok = torch.load(b / 'tok' / 'ckpt.pt', weights_only=True)
    weights = tok['ema'] if tok.get('ema') else tok['model']  # what the chain loads
    next(w for w in weights.values() if w.is_floating_point()).add_(0.01)  # the same file, other weights
    torch.save(tok, b / 'tok' / 'ckpt.pt')
    p = run_script('sr.py', [f'--input={img}', f'--gen_ckpt={b}/gen/ckpt.pt', f'--out_dir={tmp_path}/o3'],
                   check=False)
    assert p.returncode != 0 and 'which now holds other weights' in p.stderr and 'Traceback' not in p.stderr

# ----------------------------------------------------------------------------- sr.py's out_dir


def test_sr_out_dir_keeps_one_run_of_outputs(tiny_gen, run_script, tmp_path):
    """Two runs with other settings into one folder: the second is refused and changes nothing; the
    same settings again are fine; --overwrite=True removes the first run's files. A live lock refuses
    a run; a killed run's temp files are removed."""
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ('a', 'b', 'c'):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f'{name}.png')
    run = lambda *extra, check=True: run_script('sr.py', [f'--input={src}', f'--gen_ckpt={tiny_gen}',
                                                          f'--out_dir={out}', *extra], check=check)
    run()
    files = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert sorted(files) == ['a_x4.png', 'b_x4.png', 'c_x4.png', 'sr.json']
    (src / 'c.png').unlink()
    p = run('--color_fix=0', check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    assert 'holds outputs of a run with other settings (differing: color_fix)' in p.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == files
    run()  # the same settings: its files are simply written again
    dead = dead_pid()
    (out / f'.a_x4.png.tmp{dead}').write_bytes(b'half a PNG')
    (out / 'lock').write_text(f'{os.getpid()}\n')  # a live process (this test) holds the folder
    p = run(check=False)
    assert p.returncode != 0 and f'in use by another run (PID {os.getpid()}' in p.stderr
    (out / 'lock').unlink()
    p = run('--color_fix=0', '--overwrite=True')
    assert sorted(os.listdir(out)) == ['a_x4.png', 'b_x4.png', 'sr.json']  # c_x4.png of the first run is gone
    assert (out / 'a_x4.png').read_bytes() != files['a_x4.png']
    (out / 'sr.json').unlink()
    p = run('--color_fix=0', check=False)  # files no record accounts for are not replaced silently
    assert p.returncode != 0 and 'files this run would replace (a_x4.png b_x4.png)' in p.stderr


def test_sr_notes_hidden_files_guards_tile0_and_prints_progress(tiny_gen, run_script, tmp_path, monkeypatch, capsys):
    import chain
    import sr
    src = tmp_path / 'in'
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src / '.hidden.png')
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src / 'shown.png')
    p = run_script('sr.py', [f'--input={src}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path}/o'])
    assert "skipping 1 hidden file(s)" in p.stderr and '.hidden.png' in p.stderr and 'done: 1 written' in p.stdout
    assert '[1/1]' in p.stdout and 's left' in p.stdout
    Image.fromarray(np.zeros((1030, 1030, 3), dtype=np.uint8)).save(src / 'large.png')
    p = run_script('sr.py', [f'--input={src}', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path}/o2', '--tile=0'],
                   check=False)
    assert p.returncode == 1 and 'large.png: (1030, 1030) is too large for tile=0' in p.stderr, p.stderr
    assert 'done: 1 written' in p.stdout and 'Traceback' not in p.stderr
    # the progress line on a large image: one report per band of tiles, the last one with 0 s left
    calls = []
    out = chain.tiled_sr(torch.rand(1, 3, 40, 40), lambda x: x.repeat_interleave(4, -1).repeat_interleave(4, -2),
                      4, tile=16, overlap=4, on_band=lambda done, total: calls.append((done, total)))
    assert out.shape == (1, 160, 160, 3) and calls == [(1, 3), (2, 3), (3, 3)]
    times = iter([11.0, 12.0, 25.0])  # seconds since the image started, at each band: a line every 10 s
    monkeypatch.setattr(sr.time, 'time', lambda: next(times))
    capsys.readouterr()
    report = sr.progress_printer('big.png', 0.0)
    for done in (1, 2, 3):
        report(done, 4)
    assert capsys.readouterr().out.splitlines() == ['  big.png: 1/4 rows of tiles, about 33 s left',
                                                    '  big.png: 3/4 rows of tiles, about 8 s left']


def test_time_left_is_the_earlier_of_the_budget_and_max_iters_at_this_runs_pace():
    # 10 steps in 2 minutes since a resume at step 10, minute 1: 0.2 min per step
    assert common.time_left(20, 100, 3.0, 0.0, 10, 1.0) == 'left 16.0 min'    # 80 steps more, no budget
    assert common.time_left(20, 100, 3.0, 5.0, 10, 1.0) == 'left 2.0 min'     # the budget comes first
    assert common.time_left(20, 30, 3.0, 50.0, 10, 1.0) == 'left 2.0 min'     # max_iters comes first
    assert common.time_left(20, 100, 6.0, 5.0, 10, 1.0) == 'left 0.0 min'     # past the budget: never negative
    assert common.time_left(10, 100, 1.0, 0.0, 10, 1.0) == 'left ? min'       # no step yet, no budget
    assert common.time_left(10, 100, 1.0, 4.0, 10, 1.0) == 'left 3.0 min'


def test_the_stage_log_line_says_the_time_left(tiny_val, run_script, tmp_path):
    out = run_script('tokenizer.py', TOK_TINY + ['--max_iters=2', '--max_minutes=30', '--log_interval=1',
                                                 '--eval_interval=1000', f'--val_dir={tiny_val}',
                                                 f'--out_dir={tmp_path}']).stdout
    for step, left in ((1, None), (2, 0.0)):  # the budget is 30 min, but max_iters=2 ends the run after step 2
        line = out.split(f'step {step} |')[1].split('\n')[0]
        shown = float(line.split('min, left ')[1].split(' min')[0])
        assert 0 <= shown < 30 and left in (None, shown), line


def test_an_animated_image_warns_that_only_its_first_frame_is_used(tmp_path):
    import data
    frames = [Image.new('RGB', (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / 'anim.gif', save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="anim.gif' holds 2 frames: only the first is used"):
        x = data.load_image(str(tmp_path / 'anim.gif'))
    assert x[0].mean() > 0.9 and x[1].mean() < 0.1  # red: frame 1

# ----------------------------------------------------------------------------- logs, locks, leftovers, one-line errors


def test_the_log_never_follows_a_link_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    outside = tmp_path / 'elsewhere.txt'
    outside.write_text('not a log\n')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.txt').symlink_to(outside)
    with pytest.raises(SystemExit, match='it is a symbolic link'):
        common.Logger(str(tmp_path / 'run'), {})
    assert outside.read_text() == 'not a log\n'
    log = common.Logger(str(tmp_path / 'ok'), {})

    class Full:
        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    log.f = Full()
    with pytest.raises(SystemExit, match="cannot write the log .*: no space left on the device"):
        log('step 1')


def test_a_full_disk_at_lock_time_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / 'run'

    def full_open(path, mode='r', *a, **k):
        f = io.open(path, mode, *a, **k)
        f.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(common, 'open', full_open, raising=False)
    with pytest.raises(SystemExit, match='No space left on device'):
        common.lock_out_dir(str(out))
    assert not out.exists()  # no temp lock file, and the folder this call made is removed


def test_a_run_that_fails_before_writing_leaves_no_empty_out_dir(run_script, tmp_path):
    p = run_script('tokenizer.py', TOK_TINY + ['--init_from=resume', f'--out_dir={tmp_path}/new'], check=False)
    assert p.returncode != 0 and 'the checkpoint to resume not found' in p.stderr and 'Traceback' not in p.stderr
    assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('script, args, words', [
    ('eval.py', ['--device=cpux'], "device='cpux' must be auto, cpu, cuda, cuda:N or mps"),
    ('eval.py', ['--crop_border=200'], 'crop_border=200 must be >= 0'),
    ('eval.py', ['--name=../../x'], "name='../../x' must be a plain file name"),
    ('sr.py', ['--input=assets/val_pairs/lr', '--device=cuda' if not torch.cuda.is_available() else '--device=cuda:99'],
     "device='cuda"),
    ('sr.py', ['--input=assets/val_pairs/lr', '--dtype=float64'], "dtype='float64' must be auto, float32, bfloat16 or float16"),
    ('tokenizer.py', ['--threads=-1'], 'threads=-1 must be >= 0'),
    ('tokenizer.py', ['--patch=0'], 'patch=0 must be >= 1'),
    ('tokenizer.py', ['--grad_weight=-0.5'], 'grad_weight=-0.5 must be >= 0'),          # every *_weight
    ('finetune_decoder.py', ['--jpeg_impl=turbo'], "jpeg_impl='turbo' must be 'torch' or 'pil'"),
])
def test_bad_settings_are_one_line(script, args, words, run_script, tmp_path):
    p = run_script(script, args + ([f'--out_dir={tmp_path}/o'] if script != 'eval.py' else []), check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and words in p.stderr, p.stderr
    assert not (tmp_path / 'o').exists() and not (ROOT / 'x.json').exists()


def test_eval_names_bad_sr_folders_in_one_line(tiny_val, run_script, tmp_path):
    hr = sorted((tiny_val / 'hr').glob('*.png'))
    cases = {'empty': {}, 'zero_byte': {hr[0].stem + '.png': b''},
             'mis_sized': {p.stem + '.png': None for p in hr}}
    for case, files in cases.items():
        d = tmp_path / case
        d.mkdir()
        for name, content in files.items():
            if content is None:  # a 20x20 image where a 256x256 one belongs
                Image.new('RGB', (20, 20)).save(d / name)
            else:
                (d / name).write_bytes(content)
        p = run_script('eval.py', [f'--sr={d}', f'--val_dir={tiny_val}', f'--out_json={tmp_path}/x.json'], check=False)
        assert p.returncode != 0 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        want = {'empty': 'holds no PNG files', 'zero_byte': 'cannot load image', 'mis_sized': 'size (3, 20, 20)'}
        assert want[case] in p.stderr and (case == 'empty' or str(d) in p.stderr), p.stderr
