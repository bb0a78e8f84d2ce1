"""Pictures of what the models work on, for teaching: the VQ-VAE's latent grid of a scan (its code
indices and latent channels) and the steps of the prior's sampler (latent and decoded brain).

Latent grids are (C, x, y, z) in the same RAS+ voxel order as the volumes they come from, 8 times
coarser per axis; slices are axial (x left to right, y posterior to anterior, neurological).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from synthbrain.io import Volume
from synthbrain.viz.slices import planes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    return buf.getvalue()


def _slice_positions(depth: int, n: int) -> list[int]:
    """``n`` axial positions spread over the middle of ``depth`` (the first and last are mostly empty)."""
    n = max(1, min(n, depth))
    return sorted({int(round(p)) for p in np.linspace(depth * 0.2, depth * 0.8 - 1, n)})


def latent_png(latent: np.ndarray, indices: np.ndarray | None, *, n_slices: int = 5, max_channels: int = 4,
               width_px: int = 900) -> bytes:
    """A grid of axial slices of a scan's latent: the first row shows the codebook index of each
    latent voxel (one colour per code), the next rows the latent's channels (diverging colours,
    symmetric about 0, one scale per channel). ``latent`` (C, x, y, z), ``indices`` (x, y, z), or
    None for a continuous (KL) latent, which has no codes: then only the channels are drawn."""
    from matplotlib.figure import Figure

    latent = np.asarray(latent, np.float32)
    codes = indices is not None
    if latent.ndim != 4 or (codes and np.shape(indices) != latent.shape[1:]):
        raise ValueError(f"expected latent (C, x, y, z) and indices (x, y, z), got {latent.shape} and "
                         f"{np.shape(indices) if codes else None}")
    zs = _slice_positions(latent.shape[3], n_slices)
    channels = min(latent.shape[0], max_channels)
    top = 1 if codes else 0
    rows = top + channels
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, width_px / dpi * rows / len(zs) * 1.25), dpi=dpi, facecolor="white")
    axes = np.atleast_2d(fig.subplots(rows, len(zs), squeeze=False))
    if codes:
        # codes are labels, not quantities: a fixed random colour per code, so neighbouring codes differ
        indices = np.asarray(indices)
        colours = np.random.default_rng(0).uniform(0.15, 1.0, (int(indices.max()) + 1, 3))
    lims = [float(np.abs(latent[c]).max()) or 1.0 for c in range(channels)]
    for col, z in enumerate(zs):
        if codes:
            axes[0, col].imshow(colours[indices[:, :, z].T], origin="lower", interpolation="nearest")
        axes[0, col].set_title(f"slice z = {z + 1} of {latent.shape[3]}", fontsize=9)
        for c in range(channels):
            axes[top + c, col].imshow(latent[c, :, :, z].T, origin="lower", cmap="RdBu_r", vmin=-lims[c],
                                    vmax=lims[c], interpolation="nearest")
    for r in range(rows):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel("code index" if r < top else f"channel {r - top + 1}", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.93, bottom=0.02, wspace=0.05, hspace=0.12)
    return _png(fig)


def denoising_png(latents: Sequence[np.ndarray], volumes: Sequence[Volume], labels: Sequence[str], *,
                  plane: str = "axial", channel: int = 0, width_px: int = 1100) -> bytes:
    """The sampler's steps side by side: top row, one channel of the latent (middle axial slice);
    bottom row, the volume decoded from it (``plane`` through the centre). ``latents[i]`` is
    (C, x, y, z); ``volumes[i]`` is its decoding on the bundle's grid."""
    from matplotlib.figure import Figure

    if not (len(latents) == len(volumes) == len(labels)) or not latents:
        raise ValueError(f"need as many latents, volumes and labels (>= 1), got {len(latents)}, {len(volumes)}, "
                         f"{len(labels)}")
    n = len(latents)
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, width_px / dpi / n * 2.6), dpi=dpi, facecolor="black")
    axes = fig.subplots(2, n, squeeze=False)
    lim = max(float(np.abs(np.asarray(z)[channel]).max()) for z in latents) or 1.0
    for i, (z, v, label) in enumerate(zip(latents, volumes, labels)):
        z = np.asarray(z, np.float32)
        axes[0, i].imshow(z[channel, :, :, z.shape[3] // 2].T, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                          interpolation="nearest")
        img, extent, _ = planes(v)[plane]
        axes[1, i].imshow(img, origin="lower", extent=extent, cmap="gray", vmin=0.0, vmax=0.9)
        axes[0, i].set_title(label, color="white", fontsize=10)
        for ax in axes[:, i]:
            ax.set_axis_off()
    fig.text(0.005, 0.73, "latent", color="#ffd54a", rotation=90, va="center", fontsize=10)
    fig.text(0.005, 0.27, "decoded", color="#ffd54a", rotation=90, va="center", fontsize=10)
    fig.subplots_adjust(left=0.025, right=0.995, top=0.9, bottom=0.01, wspace=0.04, hspace=0.04)
    return _png(fig)
