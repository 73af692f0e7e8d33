"""Shared fixtures: a tiny trained checkpoint chain made by the stage scripts themselves (2 steps
each, 1 thread), on two of the real validation pairs, built once per test session (once per worker
process under pytest-xdist, which test.sh uses)."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from configurator import script_settings
from model import GeneratorConfig, TokenizerConfig, config_from_settings

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get('PYTEST_XDIST_WORKER'):  # 2 workers on 2 cores: one torch thread each, no oversubscription
    import torch
    torch.set_num_threads(1)
SMALL_TOK = ['--enc_width=32', '--enc_depth=1', '--enc_heads=2', '--dec_width=32', '--dec_depth=1', '--dec_heads=2']
TOK_TINY = ['config/tokenizer_tiny.py', '--crop_size=32', '--patch=8', '--batch_size=2', *SMALL_TOK,
            '--codebook_size=16', '--max_minutes=0', '--threads=1']
GEN_TINY = ['config/generator_tiny.py', '--crop_size=32', '--patch=8', '--batch_size=2', '--width=32',
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


def _run(script, args, check=True, nproc=1):
    """`python script args`, or with nproc > 1 `torchrun --standalone --nproc_per_node=nproc script args`."""
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                                 if nproc > 1 else [])
    try:
        p = subprocess.run(launch + [script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired as e:  # say where it stood: the output so far
        out, err = (s.decode(errors='replace') if isinstance(s, bytes) else s or '' for s in (e.stdout, e.stderr))
        raise AssertionError(f"{script} {' '.join(map(str, args))} ran over 300 s:\n{out[-3000:]}\n{err[-3000:]}")
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
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
    run, its ckpt). nproc > 1: each run under torchrun with that many processes (DDP)."""
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
