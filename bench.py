"""
Small benchmarks, one function per mode, one grep-able number each:

    python bench.py --mode=degrade --batch_size=16 --device=cuda
"""
import os
import time

import torch
import torch.nn.functional as F

import data
from common import pick_device

# -----------------------------------------------------------------------------
mode = 'degrade'            # degrade (more modes join the dispatch table below)
device = 'auto'             # auto | cpu | cuda | mps
threads = 0                 # torch CPU threads; 0 = torch's default
seed = 0
warmup_iters = 2            # untimed iterations (first-call allocation, kernel caches)
iters = 10                  # timed iterations
# degrade mode
batch_size = 8              # HR crops per degrade() call
crop = 256                  # HR crop side (LR side = crop / 4)
image_dir = 'assets/images/train'  # prepared by `python data.py`
deg_mode = 'realesrgan'     # realesrgan | bicubic
from configurator import configure
config = configure(globals())
# -----------------------------------------------------------------------------


def hr_batch(gen):
    """(batch_size, 3, crop, crop) HR crops of the training photos, or smooth random images."""
    try:
        sampler = data.PairSampler(image_dir, crop, batch_size, seed=seed, deg_cfg=data.DegradeConfig(mode='none'))
        return sampler.next()[0]
    except ValueError as e:
        print(f"note: {e}\nnote: timing on random smooth images instead")
        x = torch.rand(batch_size, 3, crop // 8, crop // 8, generator=gen)
        return F.interpolate(x, size=(crop, crop), mode='bicubic', align_corners=False).clamp(0, 1)


def bench_degrade(dev):
    gen = torch.Generator().manual_seed(seed)
    hr = hr_batch(gen).to(dev)
    cfg = data.DegradeConfig(mode=deg_mode)

    def step():
        _, lr = data.degrade(hr, cfg, gen)
        if dev.startswith('cuda'):
            torch.cuda.synchronize()
        return lr

    for _ in range(warmup_iters):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = time.perf_counter() - t0
    pairs = iters * batch_size
    print(f"degrade: {pairs} pairs of {crop}x{crop} -> {crop // 4}x{crop // 4} ({deg_mode}) on {dev}, "
          f"batch {batch_size}")
    print(f"degrade_pairs_per_s: {pairs / dt:.1f}")
    print(f"degrade_ms_per_pair: {1000 * dt / pairs:.2f}")


MODES = {'degrade': bench_degrade}

if __name__ == '__main__':
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; valid modes: {', '.join(MODES)}")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, device: {dev}")
    MODES[mode](dev)
