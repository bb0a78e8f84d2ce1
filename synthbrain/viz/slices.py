"""Orthogonal slices of a volume as a PNG: axial, coronal and sagittal planes (the viewer's order) through one point,
with orientation labels (L/R, A/P, S/I), the plane positions in mm and a title.

Neurological convention: on coronal and axial planes the subject's left is on the left of the
image (as in NiiVue's default view); ``radiological=True`` flips them. The volume must be in RAS+
voxel order with an axis-aligned affine (every SynthBrain volume is: ``read_volume`` reorients).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from synthbrain.errors import InvalidVolumeError
from synthbrain.io import Volume


def _check_axis_aligned(volume: Volume) -> None:
    m = volume.affine[:3, :3]
    if np.any(np.abs(m - np.diag(np.diag(m))) > 1e-6) or np.any(np.diag(m) <= 0):
        raise InvalidVolumeError(f"{volume.source or 'volume'}: slices need an axis-aligned RAS+ affine")


def centre_mm(volume: Volume) -> np.ndarray:
    """World mm (RAS) of the volume's centre voxel."""
    ijk = (np.array(volume.shape) - 1) / 2.0
    return volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]


def planes(volume: Volume, point_mm: Sequence[float] | None = None) -> dict[str, tuple[np.ndarray, tuple, float]]:
    """The three planes through ``point_mm`` (default: the centre), each as
    (image (rows, cols) with row 0 at the bottom, extent (left, right, bottom, top) in mm, plane
    position in mm), in the viewer's order. Axial: columns L->R, rows P->A; coronal: L->R, I->S;
    sagittal: P->A, I->S."""
    _check_axis_aligned(volume)
    p = np.asarray(centre_mm(volume) if point_mm is None else point_mm, np.float64)
    ijk = np.linalg.solve(volume.affine[:3, :3], p - volume.affine[:3, 3])
    ijk = np.clip(np.rint(ijk), 0, np.array(volume.shape) - 1).astype(int)
    at = volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]
    sp = np.diag(volume.affine)[:3]
    lo = volume.affine[:3, 3] - sp / 2
    hi = lo + sp * np.array(volume.shape)
    d = volume.data
    return {  # the viewer's order (NiiVue's multiplanar row): axial, coronal, sagittal
        "axial": (d[:, :, ijk[2]].T, (lo[0], hi[0], lo[1], hi[1]), float(at[2])),
        "coronal": (d[:, ijk[1], :].T, (lo[0], hi[0], lo[2], hi[2]), float(at[1])),
        "sagittal": (d[ijk[0], :, :].T, (lo[1], hi[1], lo[2], hi[2]), float(at[0])),
    }


# (left, right, bottom, top) labels of each plane in neurological convention
PLANE_LABELS = {"sagittal": ("P", "A", "I", "S"), "coronal": ("L", "R", "I", "S"), "axial": ("L", "R", "P", "A")}
_AXIS = {"sagittal": "x", "coronal": "y", "axial": "z"}


def orthogonal_png(volume: Volume, *, point_mm: Sequence[float] | None = None, title: str = "",
                   window: tuple[float, float] | None = None, radiological: bool = False,
                   width_px: int = 1200, footer: str = "", annotate: bool = True) -> bytes:
    """A PNG of the three orthogonal planes of ``volume`` through ``point_mm`` (mm, RAS).

    ``window`` is the (min, max) grey range (default: 0 to the 99.5th percentile of the volume);
    ``footer`` is small print under the planes (e.g. that the image is synthetic); without
    ``annotate`` the planes are drawn bare (a thumbnail).
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, safe in a server thread

    pl = planes(volume, point_mm)
    if window is None:
        hi = float(np.percentile(volume.data, 99.5)) or 1.0
        window = (min(0.0, float(volume.data.min())), hi)
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, width_px / dpi * 0.42), dpi=dpi, facecolor="black")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [pl[n][1][1] - pl[n][1][0] for n in pl]})
    for ax, (name, (img, extent, pos)) in zip(axes, pl.items()):
        left, right, bottom, top = PLANE_LABELS[name]
        ax.imshow(img, cmap="gray", origin="lower", extent=extent, vmin=window[0], vmax=window[1],
                  interpolation="nearest")
        if radiological and name != "sagittal":
            ax.invert_xaxis()
            left, right = right, left
        ax.set_axis_off()
        if not annotate:
            continue
        style = dict(color="#ffd54a", fontsize=14, fontweight="bold", transform=ax.transAxes)
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.set_title(f"{name}  {_AXIS[name]} = {pos:+.0f} mm", color="white", fontsize=11)
    if title:
        fig.suptitle(title, color="white", fontsize=13)
    if footer:
        fig.text(0.5, 0.01, footer, ha="center", va="bottom", color="#bbbbbb", fontsize=9)
    top = 0.85 if title else 0.92 if annotate else 0.99
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.06 if annotate else 0.01, top=top, wspace=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    return buf.getvalue()


def rows_png(rows: Sequence[tuple[str, Volume]], *, point_mm: Sequence[float] | None = None, title: str = "",
             footer: str = "", difference: Volume | None = None, difference_label: str = "difference",
             width_px: int = 1200) -> bytes:
    """A PNG with one row of three orthogonal planes per (label, volume) in ``rows``, all through the
    same ``point_mm`` and grey window, and optionally a last row with a signed ``difference`` map
    (blue = lower, red = higher; background, where every row is 0, in black) and its colour bar in
    intensity units. For a reconstruction: rows original and reconstruction, difference =
    reconstruction - original.
    """
    import matplotlib
    from matplotlib.figure import Figure

    hi = max(float(np.percentile(v.data, 99.5)) for _, v in rows) or 1.0
    panels = [(label, planes(v, point_mm), "gray", (0.0, hi)) for label, v in rows]
    if difference is not None:
        lim = float(np.percentile(np.abs(difference.data), 99.9)) or 1e-3
        # background: 0 in the first row (the original) and next to 0 in the others
        background = (rows[0][1].data == 0) & np.all([np.abs(v.data) < 0.02 for _, v in rows[1:]], axis=0)
        masked = Volume(np.where(background, np.nan, difference.data).astype(np.float32), difference.affine)
        panels.append((difference_label, planes(masked, point_mm), "diff", (-lim, lim)))
    dpi, n = 100, len(panels)
    first = panels[0][1]
    widths = [first[k][1][1] - first[k][1][0] for k in first]
    heights = max(first[k][1][3] - first[k][1][2] for k in first)
    row_h = width_px / dpi * heights / sum(widths)
    top_in, bottom_in = (0.55 if title else 0.3), (0.3 if footer else 0.05)
    fig_h = row_h * n + top_in + bottom_in
    fig = Figure(figsize=(width_px / dpi, fig_h), dpi=dpi, facecolor="black")
    axes = fig.subplots(n, 3, squeeze=False, gridspec_kw={"width_ratios": widths})
    diff_cmap = matplotlib.colormaps["RdBu_r"].copy()
    diff_cmap.set_bad("black")
    for r, (_, pl, cmap, (lo, top)) in enumerate(panels):
        for c, (img, extent, _) in enumerate(pl.values()):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=diff_cmap if cmap == "diff" else cmap, origin="lower", extent=extent,
                           vmin=lo, vmax=top, interpolation="nearest")
            ax.set_axis_off()
        if cmap == "diff":
            diff_image = im
    if title:
        fig.suptitle(title, color="white", fontsize=12, y=1 - 0.12 / fig_h)
    if footer:
        fig.text(0.5, 0.05 / fig_h, footer, ha="center", va="bottom", color="#bbbbbb", fontsize=8)
    fig.subplots_adjust(left=0.005, right=0.91 if difference is not None else 0.995, top=1 - top_in / fig_h,
                        bottom=bottom_in / fig_h, wspace=0.02, hspace=0.04)
    # labels by the grid cells, not the axes: planes of different heights would put them at different heights
    for c, (name, (_, _, pos)) in enumerate(panels[0][1].items()):
        cell = axes[0, c].get_subplotspec().get_position(fig)
        fig.text((cell.x0 + cell.x1) / 2, cell.y1 + 0.05 / fig_h, f"{name}  {_AXIS[name]} = {pos:+.0f} mm",
                 ha="center", va="bottom", color="white", fontsize=10)
    for r, (label, *_) in enumerate(panels):
        cell = axes[r, 0].get_subplotspec().get_position(fig)
        fig.text(cell.x0 + 0.005, cell.y1 - 0.02 / fig_h, label, ha="left", va="top", color="#ffd54a", fontsize=10)
    if difference is not None:
        pos = axes[-1, 2].get_position()
        bar = fig.colorbar(diff_image, cax=fig.add_axes((0.925, pos.y0 + 0.1 * pos.height, 0.012, 0.8 * pos.height)))
        bar.ax.tick_params(colors="white", labelsize=8)
        bar.set_label("intensity (0..1)", color="white", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    return buf.getvalue()
