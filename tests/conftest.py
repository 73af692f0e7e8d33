"""Shared fixtures: a tiny trained checkpoint chain made by the stage scripts themselves (2 steps
each, 1 thread), on two of the real validation pairs, built once per test session (once per worker
process under pytest-xdist, which test.sh uses)."""
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from configurator import config_from_settings, script_settings
from model import GeneratorConfig, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get('PYTEST_XDIST_WORKER'):  # 2 workers on 2 cores: one torch thread each, no oversubscription
    import torch
    torch.set_num_threads(1)
SMALL_TOK = ['--enc_width=32', '--enc_depth=1', '--enc_heads=2', '--dec_width=32', '--dec_depth=1', '--dec_heads=2']
TOK_TINY = ['config/tiny.py', '--crop_size=32', '--patch=8', '--batch_size=2', *SMALL_TOK,
            '--codebook_size=16', '--max_minutes=0', '--threads=1']
GEN_TINY = ['config/tiny.py', '--crop_size=32', '--patch=8', '--batch_size=2', '--width=32',
            '--depth=1', '--n_head=2', '--stem_dim=16', '--sft_hidden=16', '--lora_rank=2', '--max_minutes=0',
            '--threads=1']


def tokenizer_args(**fields):
    """model_args of a TokenizerConfig: tokenizer.py's own defaults (read by the same path the
    script takes) with `fields` on top."""
    return asdict(config_from_settings(TokenizerConfig, script_settings('tokenizer.py'), **fields))


def generator_args(**fields):
    """model_args of a GeneratorConfig: generator.py's defaults with `fields` on top (fields must
    include what the script derives: scale, groups, codebook_size, latent_dim, feat_dim, pooled_dims)."""
    return asdict(config_from_settings(GeneratorConfig, script_settings('generator.py'), **fields))


# Bit equality holds only within one process, one thread count and one set of shapes (batch
# size, tile layout): matmuls and reductions sum in another order when any of them changes. A stage
# run (--threads=1) and sr.py / eval.py (torch's default thread count, their own batches) make the
# same image up to float noise, which shows where a value sits at a rounding boundary: 1 grey level
# on a few pixels (one pixel in one image on a 2-core AMD EPYC). Hence these tolerances for images
# and metrics made in another process, thread count or batch than the one that checks them:
IMG_MAX_DIFF, IMG_MAX_FRAC = 1, 1e-3  # grey levels, fraction of the pixels that may differ at all
# LPIPS of such an image: random 1-level changes on 0.1% of the pixels moved it by at most 8e-5 on
# the 2-step chains (12 draws); a real change, the stage-3 decoder after 2 steps in place of stage
# 2's, moves it by 1e-4 to 3e-4 (a 0.1% change chosen adversarially could move it by 2e-3)
LPIPS_TOL = 1e-4


def psnr_tol_db(psnr_db, max_frac=IMG_MAX_FRAC):
    """The most a PSNR-Y (dB) may move when its images change as assert_images_close allows: 1 grey
    level on max_frac of the pixels moves the MSE by at most max_frac (2 * 255 + 1) level^2 (255
    bounds the error; the slack over Y's range also covers the share the border crop raises). The
    2-step chains sit near 5.6 dB, where this is 1.2e-4 dB: a fixed 0.01 dB would pass any chain
    (one trained 2 steps longer moves PSNR-Y by 6e-4 dB)."""
    mse = 255 ** 2 / 10 ** (psnr_db / 10)
    return -10 * math.log10(1 - max_frac * (2 * 255 + 1) / mse)


def assert_images_close(a, b, max_diff=IMG_MAX_DIFF, max_frac=IMG_MAX_FRAC, what=''):
    """uint8 images a, b (..., H, W, 3) of the same content made by different processes, thread
    counts or batch shapes: no value differs by more than max_diff grey levels, and at most max_frac
    of the pixels differ at all (so the rest, almost all, are bit-identical). A wrong image, a
    shifted tile or a flipped token fails this."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape and a.shape[-1] == 3, \
        f"{what}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}, want uint8 (..., H, W, 3) of one shape"
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    worst, frac = int(d.max()), float((d > 0).any(-1).mean())
    assert worst <= max_diff and frac <= max_frac, \
        (f"{what}: {frac:.4%} of {d[..., 0].size} pixels differ (allowed {max_frac:.4%}), by up to {worst} grey "
         f"levels (allowed {max_diff})")


def _run(script, args, check=True, nproc=1):
    """`python script args`, or with nproc > 1 `torchrun --standalone --nproc_per_node=nproc script args`.
    A failure or a timeout raises with the last 20000 characters of stdout and of stderr: the whole
    traceback, not its first lines."""
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                                 if nproc > 1 else [])
    try:
        p = subprocess.run(launch + [script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired as e:  # say where it stood: the output so far
        out, err = (s.decode(errors='replace') if isinstance(s, bytes) else s or '' for s in (e.stdout, e.stderr))
        raise AssertionError(f"{script} {' '.join(map(str, args))} ran over 300 s:\n{out[-20000:]}\n{err[-20000:]}")
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{p.stdout[-20000:]}\n{p.stderr[-20000:]}")
    return p


@pytest.fixture(scope='session')
def run_script():
    """run_script('x.py', [args], check=True, nproc=1) -> CompletedProcess (stdout/stderr as text)."""
    return _run


@pytest.fixture(scope='session')
def tiny_val(tmp_path_factory):
    """Two of the fixed validation pairs (hr, lr, lr_bicubic) in a folder of their own, with a
    manifest that lists those two."""
    tmp = tmp_path_factory.mktemp('val')
    src = ROOT / 'assets' / 'val_pairs'
    if not (src / 'manifest.json').is_file():
        pytest.skip('validation pairs missing: run `python data.py`')
    manifest = json.loads((src / 'manifest.json').read_text())
    manifest['names'] = manifest['names'][:2]
    for kind in ('hr', 'lr', 'lr_bicubic'):
        (tmp / kind).mkdir()
        for n in manifest['names']:
            shutil.copy(src / kind / f'{n}.png', tmp / kind / f'{n}.png')
    (tmp / 'manifest.json').write_text(json.dumps(manifest))
    return tmp


@pytest.fixture(scope='session')
def tiny_tok(tiny_val, tmp_path_factory):
    """ckpt.pt of a 2-step tokenizer.py run (patch 8, G 4, K 16)."""
    out = tmp_path_factory.mktemp('tok')
    _run('tokenizer.py', TOK_TINY + ['--max_iters=2', f'--val_dir={tiny_val}', f'--out_dir={out}'])
    return out / 'ckpt.pt'


@pytest.fixture(scope='session')
def tiny_gen(tiny_val, tiny_tok, tmp_path_factory):
    """ckpt.pt of a 2-step generator.py run on tiny_tok, with the prior (SFT, CLS, LoRA)."""
    out = tmp_path_factory.mktemp('gen')
    _run('generator.py', GEN_TINY + ['--max_iters=2', '--eval_interval=1000', f'--val_dir={tiny_val}',
                                     f'--tok_ckpt={tiny_tok}', f'--out_dir={out}'])
    return out / 'ckpt.pt'


@pytest.fixture(scope='session')
def check_exact_resume():
    """check_exact_resume(script, args, out, n, parts, nproc=1) runs `script` 2n steps straight
    (out/'straight') and n + resume + n steps (out/'split'), asserts the resumed run restarts at step
    n+1 and that every tensor of the checkpoint parts is bit-identical; -> (stdout of the straight
    run, its ckpt). nproc > 1: each run under torchrun with that many processes (DDP). Bit equality
    is guaranteed here, not only likely: both are the same script with the same settings (thread
    count included) on the same shapes, so every float sum runs in the same order."""
    import torch

    def check(script, args, out, n, parts, nproc=1):
        straight, split = out / 'straight', out / 'split'
        log = _run(script, args + [f'--out_dir={straight}', f'--max_iters={2 * n}'], nproc=nproc).stdout
        _run(script, args + [f'--out_dir={split}', f'--max_iters={n}'], nproc=nproc)
        resumed = _run(script, args + [f'--out_dir={split}', f'--max_iters={2 * n}', '--init_from=resume'],
                       nproc=nproc).stdout
        assert 'resumed from' in resumed and f'step {n + 1} |' in resumed and 'step 1 |' not in resumed
        a = torch.load(straight / 'ckpt.pt', weights_only=False)
        b = torch.load(split / 'ckpt.pt', weights_only=False)
        assert a['step'] == b['step'] == 2 * n
        # the curves' numbers survive the resume: the same losses and rates, one more evaluation (at n)
        assert a['history']['train'] == b['history']['train'] and len(a['history']['train']) == 2 * n
        assert [h['step'] for h in b['history']['eval']] == [0, n, 2 * n]
        assert not (straight / 'lock').exists() and not (split / 'lock').exists()  # released at exit
        for part in parts:
            assert a[part].keys() == b[part].keys() and a[part], part
            for key, value in a[part].items():
                assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
        return log, a
    return check


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Every test starts from the same random state whatever ran before it in its worker process
    (pytest-xdist hands tests to workers in a different order each time): torch, numpy and random
    are seeded from the test's own name."""
    import random
    import zlib

    import numpy as np
    import torch
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get('VQSR_TEST_SEED', 0))
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
