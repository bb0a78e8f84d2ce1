"""Decoding a latent with MONAI's ``AutoencoderKL`` decoder in bounded memory, exactly.

A 1 mm decode of the UK Biobank autoencoder peaks near 13 GB: at full resolution every block
materialises its normalised input, its activation, its upsampled input and its output, 128 channels
of 160 x 224 x 160 floats (2.9 GB) each. Tiling the latent (MONAI's sliding-window inference, diffusers'
tiled VAE) bounds that but changes the result, because every GroupNorm then normalises each tile by
its own statistics: on random weights of this architecture a tiled decode differed from the whole one
by 40-80 % of the signal (mean absolute difference, 50 % overlap, Gaussian blending).

Here the decoder's own modules and weights run block by block, each convolution over slabs of rows
along the first axis with a one-row halo, and each GroupNorm with statistics gathered over the whole
tensor first (float64 sums) and applied slab by slab, fused with the SiLU and the convolution that
follow it; a nearest-neighbour upsampling is fused into its convolution the same way. A residual
block writes its shortcut first and adds its second convolution to it in place (an identity shortcut
reuses its input's memory), and an upsampling too large to keep (the last, at 1 mm) is not stored at
all: the residual block after it computes its rows twice. The result equals ``decoder(z)`` up to float
rounding (measured: 1e-5 on values up to 4). On the bundle's architecture at a 10 x 14 x 10 latent the
memory the decode adds fell from 1.20 GB (whole) to 0.58 GB, for 30 % more time (benchmarks/ukb_ldm.py).
A block this does not know (attention, for one) makes :func:`sliced_decode` refuse before any work, so
the caller decodes whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class NotSliceable(Exception):
    """The decoder has a block :func:`sliced_decode` cannot run in slabs (the caller decodes whole)."""


def _conv3(module) -> nn.Conv3d:
    """The Conv3d of a MONAI ``Convolution`` (conv_only) with kernel 3, stride 1, padding 1 (or kernel 1)."""
    conv = getattr(module, "conv", module)
    if not isinstance(conv, nn.Conv3d) or conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1:
        raise NotSliceable(f"unsupported convolution {module}")
    if not ((conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1))
            or (conv.kernel_size == (1, 1, 1) and conv.padding == (0, 0, 0))) or conv.padding_mode != "zeros":
        raise NotSliceable(f"unsupported convolution {conv}")
    return conv


class _Stored:
    """A tensor that exists: its rows are slices."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t.shape)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.t[:, :, lo:hi]


class _Upsampled:
    """``conv(upsample_x2(y))`` never stored whole: its rows are computed when asked for (at 1 mm the
    decoder's last upsampling would be 128 channels of 160 x 224 x 160 floats, 2.9 GB)."""

    def __init__(self, conv: nn.Conv3d, y: torch.Tensor) -> None:
        self.conv, self.y = conv, _Stored(y)

    @property
    def shape(self) -> tuple[int, ...]:
        b, _, *s = self.y.shape
        return (b, self.conv.out_channels, *(2 * v for v in s))

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return _conv_rows(self.conv, self.y, lo, hi, upsample=True)


def _norm_affine(norm: nn.GroupNorm, src, rows: int, each: Callable | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift (1, C, 1, 1, 1) equal to ``norm`` over the whole of ``src``: group
    means and variances from float64 sums over slabs, so nothing of its size is allocated.
    ``each(a, b, part)`` sees every slab on the way (a shortcut computed in the same pass)."""
    b_, c, n_rows = src.shape[:3]
    g = norm.num_groups
    s1 = s2 = None
    step = max(1, rows // 4)  # float64 copies of a slab are the largest temporaries: keep them small
    for a in range(0, n_rows, rows):
        b = min(a + rows, n_rows)
        part = src.rows(a, b)
        if each is not None:
            each(a, b, part)
        for r in range(0, b - a, step):
            sub = part[:, :, r:r + step].double().reshape(b_, g, -1)
            if s1 is None:
                s1, s2 = torch.zeros_like(sub[..., 0]), torch.zeros_like(sub[..., 0])
            s1 += sub.sum(-1)
            s2 += (sub * sub).sum(-1)
    n = math.prod(src.shape[2:]) * (c // g)
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    inv = torch.rsqrt(var + norm.eps)                                     # (B, G)
    scale = inv.repeat_interleave(c // g, dim=1)                          # (B, C)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double() + norm.bias.double()
    dtype = part.dtype
    return (scale.to(dtype)[:, :, None, None, None], shift.to(dtype)[:, :, None, None, None])


def _conv_rows(conv: nn.Conv3d, src, a: int, b: int, pre: Callable | None = None,
               upsample: bool = False) -> torch.Tensor:
    """Rows a..b (along dim 2) of ``conv(pre(src))``, or with ``upsample`` of ``conv(upsample_x2(src))``."""
    k = conv.kernel_size[0] // 2                       # halo: 1 for kernel 3, 0 for kernel 1
    f = 2 if upsample else 1
    n_out = src.shape[2] * f
    lo, hi = max(a - k, 0), min(b + k, n_out)          # rows of the (upsampled) input these need
    x = src.rows(lo // f, (hi + f - 1) // f)
    if pre is not None:
        x = pre(x)
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")[:, :, lo - (lo // f) * f:][:, :, :hi - lo]
    # zero rows beyond the volume, as the convolution's own padding would add
    x = F.pad(x, (0, 0, 0, 0, k - (a - lo), k - (hi - b)))
    return F.conv3d(x, conv.weight, conv.bias, padding=(0, k, k))


def _slab_conv(conv: nn.Conv3d, src, rows: int, pre: Callable | None = None, upsample: bool = False,
               into: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(pre(src))`` over output slabs of ``rows`` rows; ``into``: added to that tensor in place
    (a residual) and returned."""
    n_out = src.shape[2] * (2 if upsample else 1)
    out = into
    for a in range(0, n_out, rows):
        b = min(a + rows, n_out)
        y = _conv_rows(conv, src, a, b, pre, upsample)
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], n_out, *y.shape[3:]))
        if into is not None:
            out[:, :, a:b] += y
        else:
            out[:, :, a:b] = y
    return out


def _norm_silu(norm: nn.GroupNorm, src, rows: int, silu: bool = True, each: Callable | None = None) -> Callable:
    scale, shift = _norm_affine(norm, src, rows, each)

    def pre(part: torch.Tensor) -> torch.Tensor:
        h = part * scale + shift
        return F.silu(h) if silu else h

    return pre


def _resblock(block, src, rows: int) -> _Stored:
    """``block(x)``: the shortcut is written first (in the pass that gathers norm1's statistics) and the
    second convolution is added to it in place; an identity shortcut of a stored input reuses its memory
    (the input is not needed once the first convolution is done)."""
    shortcut = block.nin_shortcut
    identity = isinstance(shortcut, nn.Identity)
    sc = None if identity else _conv3(shortcut)
    out = [src.t] if identity and isinstance(src, _Stored) else []

    def each(a, b, part):
        if out and out[0] is getattr(src, "t", None):
            return
        y = part.clone() if identity else F.conv3d(part, sc.weight, sc.bias)
        if not out:
            out.append(y.new_empty((y.shape[0], y.shape[1], src.shape[2], *y.shape[3:])))
        out[0][:, :, a:b] = y

    pre1 = _norm_silu(block.norm1, src, rows, each=each)
    h = _Stored(_slab_conv(_conv3(block.conv1), src, rows, pre=pre1))
    return _Stored(_slab_conv(_conv3(block.conv2), h, rows, pre=_norm_silu(block.norm2, h, rows), into=out[0]))


def _check_upsample(block) -> nn.Conv3d:
    children = dict(block.named_children())
    up = children.get("upsample_non_trainable")
    if set(children) != {"upsample_non_trainable", "postconv"} or up.mode != "nearest" or up.size is not None \
            or float(up.scale_factor if not isinstance(up.scale_factor, tuple) else up.scale_factor[0]) != 2.0:
        raise NotSliceable(f"unsupported upsampling {block}")
    return _conv3(block.postconv)


@torch.no_grad()
def sliced_decode(autoencoder, z: torch.Tensor, rows: int = 8, lazy_bytes: int = 1 << 30) -> torch.Tensor:
    """``autoencoder.decode(z)`` of a MONAI ``AutoencoderKL`` in bounded memory (see the module
    docstring): latent (B, C, x, y, z) -> volume (B, 1, X, Y, Z). ``rows``: slab height along the first
    axis. An upsampling whose output would take more than ``lazy_bytes`` and that feeds a residual block
    is never stored: the block computes its rows twice instead (once for the statistics and the
    shortcut, once for its first convolution). Raises :class:`NotSliceable` before any work for a
    decoder with a block it cannot slice."""
    from monai.networks.blocks import Convolution, Upsample
    from monai.networks.nets.autoencoderkl import AEKLResBlock

    plan = []
    blocks = list(autoencoder.decoder.blocks)
    i = 0
    while i < len(blocks):
        blk = blocks[i]
        if isinstance(blk, nn.GroupNorm) and i + 1 < len(blocks) and isinstance(blocks[i + 1], Convolution):
            plan.append(("norm+conv", blk, _conv3(blocks[i + 1])))  # the decoder's last norm feeds its last conv
            i += 2
            continue
        if isinstance(blk, Convolution):
            plan.append(("conv", _conv3(blk), None))
        elif isinstance(blk, AEKLResBlock):
            for m in (blk.conv1, blk.conv2):
                _conv3(m)
            plan.append(("res", blk, None))
        elif isinstance(blk, Upsample):
            feeds_res = i + 1 < len(blocks) and isinstance(blocks[i + 1], AEKLResBlock)
            plan.append(("up", _check_upsample(blk), feeds_res))
        else:
            raise NotSliceable(f"decoder block {type(blk).__name__} cannot be run in slabs")
        i += 1

    x = _Stored(autoencoder.post_quant_conv(z))          # 1x1 on the small latent
    for kind, a, b in plan:
        if kind == "conv":
            x = _Stored(_slab_conv(a, x, rows))
        elif kind == "res":
            x = _resblock(a, x, rows)
        elif kind == "up":
            lazy = _Upsampled(a, x.t)
            big = math.prod(lazy.shape) * x.t.element_size() > lazy_bytes
            x = lazy if b and big else _Stored(_slab_conv(a, x, rows, upsample=True))
        else:
            x = _Stored(_slab_conv(b, x, rows, pre=_norm_silu(a, x, rows, silu=False)))
    return x.t
