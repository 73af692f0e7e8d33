"""
The few pieces of training plumbing every stage script shares: device and dtype selection, the
learning-rate schedule, exact-resume RNG state, atomic checkpoints, a log file, PNG sample grids
and the final summary block. Kept deliberately small; everything model-specific lives in model.py.
"""
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def pick_device(device='auto'):
    if device != 'auto':
        return device
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def autocast_ctx(device, dtype='auto'):
    """bf16 autocast where the hardware supports it (dtype='auto'), else full fp32.
    On CPU bf16 autocast is slower than fp32 on most machines, so 'auto' keeps fp32 there."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {dtype!r}")
    if dtype == 'float32':
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(device_type=device.split(':')[0], dtype=getattr(torch, dtype))


def maybe_compile(module, enabled, device):
    """torch.compile only where it pays off: on CPU it mostly costs start-up minutes."""
    if enabled and device.startswith('cuda'):
        return torch.compile(module)
    return module


def lr_at(step, progress, base_lr, warmup_iters, min_lr_ratio=0.1):
    """Linear warm-up over `warmup_iters` steps, then cosine decay to min_lr_ratio*base_lr.
    `progress` in [0,1] is the fraction of the run done: steps/lr_decay_iters, or elapsed
    time/max_minutes when a wall-clock budget drives the run."""
    if step < warmup_iters:
        return base_lr * (step + 1) / warmup_iters
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * coeff)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def rng_state():
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a kill never leaves a torn ckpt."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, what='checkpoint'):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: '{path}' (train the earlier stage first, "
                                f"or point the *_ckpt setting at an existing ckpt.pt)")
    return torch.load(path, map_location='cpu', weights_only=False)


@torch.no_grad()
def batched(fn, *xs, device='cpu', bs=4):
    """Run fn on slices of bs rows of the tensors xs (moved to device); fn returns a tuple/list of
    tensors, which are concatenated over the slices: a whole validation set without OOM."""
    return [torch.cat(o) for o in zip(*[fn(*(x[i:i + bs].to(device) for x in xs))
                                         for i in range(0, len(xs[0]), bs)])]


def unwrap(model):
    """The module without torch.compile's wrapper, so saved keys never get an `_orig_mod.` prefix."""
    return getattr(model, '_orig_mod', model)


class Logger:
    """Prints and appends to out_dir/log.txt; the first lines record the command and the config."""

    def __init__(self, out_dir, config, resume=False):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, 'log.txt')
        self.f = open(self.path, 'a' if resume else 'w')
        self('command: ' + ' '.join([os.path.basename(sys.executable)] + sys.argv))
        self('config: ' + json.dumps(config, sort_keys=True, default=str))

    def __call__(self, msg):
        print(msg, flush=True)
        self.f.write(msg + '\n')
        self.f.flush()


def save_grid(rows, path, labels=None):
    """rows: list of (N,3,H,W) tensors in [0,1] (any H,W, resized by nearest to the first row's
    size so pixels stay visible); writes one PNG with the images of row r on line r."""
    H, W = rows[0].shape[-2:]
    rows = [F.interpolate(r.float().clamp(0, 1), size=(H, W), mode='nearest') for r in rows]
    pad = 2
    N = max(r.shape[0] for r in rows)
    canvas = torch.ones(3, len(rows) * (H + pad) + pad, N * (W + pad) + pad)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[:, y:y + H, x:x + W] = r[j].cpu()
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)
    if labels:  # the row legend goes next to the picture, readable without an image viewer
        with open(os.path.splitext(path)[0] + '.txt', 'w') as f:
            f.write('rows, top to bottom: ' + ', '.join(labels) + '\n')


def summary(title, values):
    """The grep-able block every stage ends with: `key: value` lines between two rulers."""
    lines = [f"---- {title} summary ----"]
    for k, v in values.items():
        lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    lines.append('-' * len(lines[0]))
    return '\n'.join(lines)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def minutes(self):
        return (time.time() - self.t0) / 60


# Dense bf16 tensor-core peak by GPU name, from the vendors' datasheets (no sparsity). MFU is only
# reported for GPUs listed here, never against an assumed A100.
PEAK_BF16_FLOPS = [('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
                   ('L40S', 362e12), ('A10G', 70e12), ('L4', 121e12)]


def peak_flops(device):
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name()
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)
