"""
Orthonormal 2D Haar wavelet transform on (B, C, H, W) tensors, hand-written
(docs/method.md#frequency-targets): the tokenizer trained with k of G active groups is supervised by
lowpass(x, G - k).

Convention. For each 2x2 block of the input

        a b        a = x[2i, 2j]     b = x[2i, 2j+1]
        c d        c = x[2i+1, 2j]   d = x[2i+1, 2j+1]

    ll = (a + b + c + d) / 2      low in x (width),  low in y (height): local mean * 2
    lh = (a + b - c - d) / 2      low in x,          high in y: top row minus bottom row
                                  (responds to horizontal edges)
    hl = (a - b + c - d) / 2      high in x,         low in y: left column minus right column
                                  (responds to vertical edges)
    hh = (a - b - c + d) / 2      high in x,         high in y: diagonal detail

i.e. the first letter is the filter along the width, the second along the height. The four
rows of this 4x4 matrix are orthonormal, so the transform preserves energy (Parseval) and the
inverse is the transpose. Everything is slicing and adds: autograd, any device and dtype work.
"""
import torch
import torch.nn.functional as F


def _check_4d(x, what):
    if not torch.is_tensor(x) or x.ndim != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"wavelets.{what}: expected a (B, C, H, W) tensor, got {shape}")


def dwt2(x):
    """One level of the Haar DWT. x (B, C, H, W), H and W even -> ll, lh, hl, hh each (B, C, H/2, W/2)."""
    _check_4d(x, 'dwt2')
    H, W = x.shape[-2:]
    if H % 2 or W % 2:
        raise ValueError(f"wavelets.dwt2: H and W must be even, got shape {tuple(x.shape)} "
                         f"(pad or crop first; lowpass() pads for you)")
    a = x[..., 0::2, 0::2]  # (B, C, h, w) top-left of each block
    b = x[..., 0::2, 1::2]  # top-right
    c = x[..., 1::2, 0::2]  # bottom-left
    d = x[..., 1::2, 1::2]  # bottom-right
    ll = (a + b + c + d) / 2
    lh = (a + b - c - d) / 2
    hl = (a - b + c - d) / 2
    hh = (a - b - c + d) / 2
    return ll, lh, hl, hh


def idwt2(ll, lh, hl, hh):
    """Inverse of dwt2: four (B, C, h, w) bands -> (B, C, 2h, 2w)."""
    for name, t in (('ll', ll), ('lh', lh), ('hl', hl), ('hh', hh)):
        _check_4d(t, f'idwt2 ({name})')
    if not (ll.shape == lh.shape == hl.shape == hh.shape):
        raise ValueError(f"wavelets.idwt2: all bands must have one shape, got ll {tuple(ll.shape)}, "
                         f"lh {tuple(lh.shape)}, hl {tuple(hl.shape)}, hh {tuple(hh.shape)}")
    # the transform matrix is symmetric and orthonormal, so the inverse applies the same sums
    a = (ll + lh + hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll - lh - hl + hh) / 2
    B, C, h, w = ll.shape
    top = torch.stack([a, b], dim=-1).reshape(B, C, h, 2 * w)     # a b a b ... on even rows
    bottom = torch.stack([c, d], dim=-1).reshape(B, C, h, 2 * w)  # c d c d ... on odd rows
    return torch.stack([top, bottom], dim=-2).reshape(B, C, 2 * h, 2 * w)


def _check_levels(levels, what):
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ValueError(f"wavelets.{what}: level must be an int >= 0, got {levels!r}")


def dwt2_multi(x, levels):
    """Multi-level DWT: returns (ll, details), ll (B, C, H/2^L, W/2^L) and details a list of
    (lh, hl, hh) tuples, finest (level 1, size H/2) first. levels = 0 gives (x, [])."""
    _check_4d(x, 'dwt2_multi')
    _check_levels(levels, 'dwt2_multi')
    f = 2 ** levels
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"wavelets.dwt2_multi: {levels} levels need H and W divisible by {f}, "
                         f"got shape {tuple(x.shape)}")
    ll, details = x, []
    for _ in range(levels):
        ll, lh, hl, hh = dwt2(ll)
        details.append((lh, hl, hh))
    return ll, details


def idwt2_multi(ll, details):
    """Inverse of dwt2_multi (details finest first, so they are applied coarsest first)."""
    x = ll
    for lh, hl, hh in reversed(details):
        x = idwt2(x, lh, hl, hh)
    return x


def lowpass(x, level):
    """Full-size image rebuilt from the level-`level` approximation with every detail band zeroed
    (docs/method.md#frequency-targets). For Haar this equals replacing each 2^l x 2^l block by its mean.

    level 0 returns x itself. Sizes that are not multiples of 2^level are accepted: the image is
    replicate-padded at the bottom/right up to the next multiple, transformed, and cropped back, so
    the last partial block row/column averages its real pixels with copies of the edge pixels.
    """
    _check_4d(x, 'lowpass')
    _check_levels(level, 'lowpass')
    if level == 0:
        return x
    f = 2 ** level
    H, W = x.shape[-2:]
    ph, pw = (-H) % f, (-W) % f
    xp = F.pad(x, (0, pw, 0, ph), mode='replicate') if (ph or pw) else x  # (B, C, H+ph, W+pw)
    ll, details = dwt2_multi(xp, level)
    zeros = [tuple(torch.zeros_like(band) for band in bands) for bands in details]
    return idwt2_multi(ll, zeros)[..., :H, :W]
