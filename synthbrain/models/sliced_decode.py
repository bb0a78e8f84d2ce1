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
follow it; a nearest-neighbour upsampling is fused into its convolution the same way. Only block
outputs exist at full size (at most the input, the middle and the output of one residual block), and
the result equals ``decoder(z)`` up to float rounding. A block this does not know (attention, for
one) makes :func:`sliced_decode` refuse, so the caller decodes whole.
"""

from __future__ import annotations

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


def _norm_affine(norm: nn.GroupNorm, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift (1, C, 1, 1, 1) equal to ``norm`` over the whole of ``x``: group means
    and variances from float64 sums over slabs, so nothing of x's size is allocated."""
    b, c = x.shape[:2]
    g = norm.num_groups
    s1 = torch.zeros(b, g, dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s1)
    step = max(1, rows // 4)  # float64 copies of a slab are the largest temporaries: keep them small
    for a in range(0, x.shape[2], step):
        part = x[:, :, a:a + step].double().reshape(b, g, -1)
        s1 += part.sum(-1)
        s2 += (part * part).sum(-1)
    n = x[0, 0].numel() * (c // g)
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    inv = torch.rsqrt(var + norm.eps)                                     # (B, G)
    scale = inv.repeat_interleave(c // g, dim=1)                          # (B, C)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double() + norm.bias.double()
    return (scale.to(x.dtype)[:, :, None, None, None], shift.to(x.dtype)[:, :, None, None, None])


def _slab_conv(conv: nn.Conv3d, x: torch.Tensor, rows: int, pre: Callable | None = None, upsample: bool = False,
               add: Callable | None = None) -> torch.Tensor:
    """``conv(pre(x))`` (``upsample``: of x upsampled x2, nearest) computed over output slabs of ``rows``
    rows along dim 2, plus ``add(a, b)`` for output rows a..b (a residual)."""
    k = conv.kernel_size[0] // 2                       # halo: 1 for kernel 3, 0 for kernel 1
    f = 2 if upsample else 1
    n_in = x.shape[2]
    n_out = n_in * f
    spatial = tuple(s * f for s in x.shape[3:])
    out = None
    for a in range(0, n_out, rows):
        b = min(a + rows, n_out)
        lo, hi = max(a - k, 0), min(b + k, n_out)      # rows of the (upsampled) input this slab needs
        src = x[:, :, lo // f:(hi + f - 1) // f]
        if pre is not None:
            src = pre(src)
        if upsample:
            src = F.interpolate(src, scale_factor=2.0, mode="nearest")[:, :, lo - (lo // f) * f:][:, :, :hi - lo]
        # zero rows beyond the volume, as the convolution's own padding would add
        src = F.pad(src, (0, 0, 0, 0, k - (a - lo), k - (hi - b)))
        y = F.conv3d(src, conv.weight, conv.bias, padding=(0, k, k))
        if add is not None:
            y = y + add(a, b)
        if out is None:
            out = y.new_empty((x.shape[0], y.shape[1], n_out, *spatial))
        out[:, :, a:b] = y
    return out


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, rows: int, silu: bool = True) -> Callable:
    scale, shift = _norm_affine(norm, x, rows)

    def pre(part: torch.Tensor) -> torch.Tensor:
        h = part * scale + shift
        return F.silu(h) if silu else h

    return pre


def _resblock(block, x: torch.Tensor, rows: int) -> torch.Tensor:
    h = _slab_conv(_conv3(block.conv1), x, rows, pre=_norm_silu(block.norm1, x, rows))
    shortcut = block.nin_shortcut
    if isinstance(shortcut, nn.Identity):
        def skip(a, b):
            return x[:, :, a:b]
    else:
        sc = _conv3(shortcut)

        def skip(a, b):
            return F.conv3d(x[:, :, a:b], sc.weight, sc.bias)
    return _slab_conv(_conv3(block.conv2), h, rows, pre=_norm_silu(block.norm2, h, rows), add=skip)


def _check_upsample(block) -> nn.Conv3d:
    children = dict(block.named_children())
    up = children.get("upsample_non_trainable")
    if set(children) != {"upsample_non_trainable", "postconv"} or up.mode != "nearest" or up.size is not None \
            or float(up.scale_factor if not isinstance(up.scale_factor, tuple) else up.scale_factor[0]) != 2.0:
        raise NotSliceable(f"unsupported upsampling {block}")
    return _conv3(block.postconv)


@torch.no_grad()
def sliced_decode(autoencoder, z: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """``autoencoder.decode(z)`` of a MONAI ``AutoencoderKL`` in bounded memory (see the module
    docstring): latent (B, C, x, y, z) -> volume (B, 1, X, Y, Z). ``rows``: slab height along the first
    axis. Raises :class:`NotSliceable` before any work for a decoder with a block it cannot slice."""
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
            plan.append(("up", _check_upsample(blk), None))
        else:
            raise NotSliceable(f"decoder block {type(blk).__name__} cannot be run in slabs")
        i += 1

    x = autoencoder.post_quant_conv(z)          # 1x1 on the small latent
    for kind, a, b in plan:
        if kind == "conv":
            x = _slab_conv(a, x, rows)
        elif kind == "res":
            x = _resblock(a, x, rows)
        elif kind == "up":
            x = _slab_conv(a, x, rows, upsample=True)
        else:
            x = _slab_conv(b, x, rows, pre=_norm_silu(a, x, rows, silu=False))
    return x
