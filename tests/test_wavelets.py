"""wavelets.py against a naive per-block loop, plus the transform's algebraic properties."""
import pytest
import torch

from wavelets import dwt2, dwt2_multi, idwt2, idwt2_multi, lowpass


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


def naive_dwt2(x):
    """Per-block Python loop straight from the documented formulas."""
    B, C, H, W = x.shape
    out = [torch.zeros(B, C, H // 2, W // 2, dtype=x.dtype) for _ in range(4)]
    for bi in range(B):
        for ci in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    a, b = x[bi, ci, 2 * i, 2 * j].item(), x[bi, ci, 2 * i, 2 * j + 1].item()
                    c, d = x[bi, ci, 2 * i + 1, 2 * j].item(), x[bi, ci, 2 * i + 1, 2 * j + 1].item()
                    out[0][bi, ci, i, j] = (a + b + c + d) / 2
                    out[1][bi, ci, i, j] = (a + b - c - d) / 2  # lh: top minus bottom
                    out[2][bi, ci, i, j] = (a - b + c - d) / 2  # hl: left minus right
                    out[3][bi, ci, i, j] = (a - b - c + d) / 2  # hh: diagonal
    return out


def naive_block_means(x, f):
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for i in range(0, H, f):
        for j in range(0, W, f):
            out[:, :, i:i + f, j:j + f] = x[:, :, i:i + f, j:j + f].mean(dim=(2, 3), keepdim=True)
    return out


def test_dwt2_matches_naive_loop():
    x = _rand(2, 3, 6, 8)
    for got, want, name in zip(dwt2(x), naive_dwt2(x), ('ll', 'lh', 'hl', 'hh')):
        assert got.shape == (2, 3, 3, 4)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14, msg=name)


def test_sign_convention_on_edges():
    top_bright = torch.tensor([[1., 1.], [0., 0.]]).view(1, 1, 2, 2)  # a horizontal edge
    left_bright = torch.tensor([[1., 0.], [1., 0.]]).view(1, 1, 2, 2)  # a vertical edge
    ll, lh, hl, hh = dwt2(top_bright)
    assert (ll.item(), lh.item(), hl.item(), hh.item()) == (1., 1., 0., 0.)
    ll, lh, hl, hh = dwt2(left_bright)
    assert (ll.item(), lh.item(), hl.item(), hh.item()) == (1., 0., 1., 0.)


def test_perfect_reconstruction_single_and_multi():
    x = _rand(2, 3, 16, 24)
    torch.testing.assert_close(idwt2(*dwt2(x)), x, rtol=0, atol=1e-12)
    for levels in (0, 1, 2, 3):
        ll, details = dwt2_multi(x, levels)
        assert ll.shape == (2, 3, 16 >> levels, 24 >> levels)
        assert [d[0].shape[-1] for d in details] == [24 >> (k + 1) for k in range(levels)]  # finest first
        torch.testing.assert_close(idwt2_multi(ll, details), x, rtol=0, atol=1e-12)


def test_parseval_energy_preserved():
    x = _rand(1, 2, 16, 16, seed=1)
    ll, details = dwt2_multi(x, 3)
    energy = ll.pow(2).sum() + sum(b.pow(2).sum() for bands in details for b in bands)
    torch.testing.assert_close(energy, x.pow(2).sum(), rtol=1e-12, atol=0)


def test_lowpass_equals_block_means():
    x = _rand(2, 3, 16, 16, seed=2)
    for level in (1, 2, 3, 4):
        torch.testing.assert_close(lowpass(x, level), naive_block_means(x, 2 ** level), rtol=0, atol=1e-12)


def test_lowpass_level0_is_identity():
    x = _rand(1, 3, 5, 7)
    assert lowpass(x, 0) is x


def test_odd_sizes():
    with pytest.raises(ValueError, match=r'\(1, 3, 5, 8\)'):
        dwt2(_rand(1, 3, 5, 8))
    with pytest.raises(ValueError, match='divisible by 4'):
        dwt2_multi(_rand(1, 3, 8, 6), 2)
    # lowpass pads with edge copies to a multiple of 2^level, then crops back
    x = _rand(1, 2, 7, 10, seed=3)
    y = lowpass(x, 2)
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (0, 2, 0, 1), mode='replicate')  # (1, 2, 8, 12)
    torch.testing.assert_close(y, naive_block_means(xp, 4)[..., :7, :10], rtol=0, atol=1e-12)
    # interior full blocks are plain means of real pixels
    torch.testing.assert_close(y[..., :4, :4], x[..., :4, :4].mean(dim=(2, 3), keepdim=True).expand(1, 2, 4, 4))


def test_bad_inputs():
    with pytest.raises(ValueError, match='B, C, H, W'):
        dwt2(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match='level'):
        lowpass(torch.zeros(1, 1, 4, 4), -1)


def test_autograd_and_dtypes():
    x = _rand(1, 3, 8, 8, dtype=torch.float32).requires_grad_()
    y = lowpass(x, 2)
    y.sum().backward()
    # d/dx of sum(block means) is 1 for every pixel
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    for dt in (torch.float16, torch.bfloat16):
        xs = _rand(1, 1, 4, 4).to(dt)
        assert dwt2(xs)[0].dtype == dt
        assert lowpass(xs, 1).dtype == dt
    assert torch.autograd.gradcheck(lambda t: idwt2(*dwt2(t)), (_rand(1, 1, 4, 4).requires_grad_(),))
