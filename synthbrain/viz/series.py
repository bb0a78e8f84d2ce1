"""A series of volumes (a brain through age, the steps of a sampler) as pictures of one plane: an
animated GIF, or a strip of slices side by side.

Every frame shows the same plane through the same point (mm, RAS), in neurological convention (the
subject's left on the left), with one grey window for the whole series, so that what changes from
frame to frame is the brain, not the display. Volumes must be in RAS+ voxel order with an
axis-aligned affine (every SynthBrain volume is).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from synthbrain.io import Volume
from synthbrain.viz.slices import PLANE_LABELS, planes

PLANES = ("axial", "coronal", "sagittal")
# (left, right, bottom, top) of each plane as drawn (neurological), as in synthbrain.viz.slices
_TEXT = (255, 214, 74)
BAND_PX = 22  # the caption band above each GIF frame


def _check_plane(plane: str) -> None:
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")


def series_window(volumes: Sequence[Volume]) -> tuple[float, float]:
    """One grey window for a whole series: 0 (or the minimum) to the 99.5th percentile of all voxels."""
    data = np.concatenate([np.asarray(v.data, np.float32).ravel()[::7] for v in volumes])
    hi = float(np.percentile(data, 99.5)) if data.size else 1.0
    return min(0.0, float(data.min(initial=0.0))), hi if hi > 0 else 1.0


def plane_image(volume: Volume, plane: str, point_mm: Sequence[float] | None = None,
                window: tuple[float, float] = (0.0, 1.0), px_per_mm: float = 2.0) -> np.ndarray:
    """The ``plane`` through ``point_mm`` (default: the centre) as a (H, W) uint8 image, top row =
    superior (sagittal, coronal) or anterior (axial), resampled to ``px_per_mm`` pixels per mm."""
    from PIL import Image

    _check_plane(plane)
    img, extent, _ = planes(volume, point_mm)[plane]
    lo, hi = window
    grey = np.clip((np.asarray(img, np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    grey = (np.flipud(grey) * 255.0 + 0.5).astype(np.uint8)  # planes() puts row 0 at the bottom
    size = (max(1, round((extent[1] - extent[0]) * px_per_mm)), max(1, round((extent[3] - extent[2]) * px_per_mm)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _annotated(grey: np.ndarray, plane: str, caption: str, counter: str) -> np.ndarray:
    """(H + band, W, 3) RGB: ``grey`` under a caption band, with orientation letters and a counter."""
    from PIL import Image, ImageDraw

    h, w = grey.shape
    canvas = Image.new("RGB", (w, h + BAND_PX), (0, 0, 0))
    canvas.paste(Image.fromarray(grey).convert("RGB"), (0, BAND_PX))
    draw = ImageDraw.Draw(canvas)
    small, big = _font(12), _font(14)
    draw.text((4, 3), caption, fill=(255, 255, 255), font=big)
    # the counter keeps every frame distinct, so a GIF writer never merges two equal frames
    draw.text((w - 4, 3), counter, fill=(190, 190, 190), font=small, anchor="ra")
    left, right, bottom, top = PLANE_LABELS[plane]
    draw.text((3, BAND_PX + h / 2), left, fill=_TEXT, font=big, anchor="lm")
    draw.text((w - 3, BAND_PX + h / 2), right, fill=_TEXT, font=big, anchor="rm")
    draw.text((w / 2, BAND_PX + 2), top, fill=_TEXT, font=big, anchor="ma")
    draw.text((w / 2, BAND_PX + h - 2), bottom, fill=_TEXT, font=big, anchor="md")
    return np.asarray(canvas)


def series_frames(volumes: Sequence[Volume], plane: str = "axial", *, point_mm: Sequence[float] | None = None,
                  labels: Sequence[str] | None = None, window: tuple[float, float] | None = None,
                  px_per_mm: float = 2.0) -> list[np.ndarray]:
    """One annotated RGB frame (H, W, 3) uint8 per volume: ``plane`` through ``point_mm``, captioned
    with ``labels[i]`` and 'i/n', in one grey ``window`` (default: :func:`series_window`)."""
    _check_plane(plane)
    if not volumes:
        raise ValueError("a series needs at least one volume")
    if labels is not None and len(labels) != len(volumes):
        raise ValueError(f"got {len(labels)} labels for {len(volumes)} volumes")
    window = window or series_window(volumes)
    n = len(volumes)
    return [_annotated(plane_image(v, plane, point_mm, window, px_per_mm), plane,
                       labels[i] if labels is not None else "", f"{i + 1}/{n}")
            for i, v in enumerate(volumes)]


def series_gif(volumes: Sequence[Volume], plane: str = "axial", *, point_mm: Sequence[float] | None = None,
               labels: Sequence[str] | None = None, window: tuple[float, float] | None = None,
               px_per_mm: float = 2.0, seconds_per_frame: float = 0.6) -> bytes:
    """An animated GIF (looping) of ``plane`` through the series, one frame per volume."""
    import imageio.v3 as iio

    if seconds_per_frame <= 0:
        raise ValueError(f"seconds_per_frame must be > 0, got {seconds_per_frame}")
    frames = series_frames(volumes, plane, point_mm=point_mm, labels=labels, window=window, px_per_mm=px_per_mm)
    return iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=int(seconds_per_frame * 1000),
                       loop=0)


def strip_png(volumes: Sequence[Volume], plane: str = "axial", *, point_mm: Sequence[float] | None = None,
              labels: Sequence[str] | None = None, window: tuple[float, float] | None = None,
              px_per_mm: float = 1.5) -> bytes:
    """The annotated frames of :func:`series_frames` side by side in one PNG."""
    return grid_png(volumes, (plane,), point_mm=point_mm, labels=labels, window=window, px_per_mm=px_per_mm)


def grid_png(volumes: Sequence[Volume], planes_: Sequence[str] = ("axial", "coronal"), *,
             point_mm: Sequence[float] | None = None, labels: Sequence[str] | None = None,
             window: tuple[float, float] | None = None, px_per_mm: float = 1.5, title: str = "") -> bytes:
    """One row per plane in ``planes_``, one column per volume (annotated frames, one grey window),
    under an optional ``title`` band."""
    from PIL import Image, ImageDraw

    window = window or series_window(volumes)
    rows = []
    for plane in planes_:
        frames = series_frames(volumes, plane, point_mm=point_mm, labels=labels, window=window, px_per_mm=px_per_mm)
        gap = np.zeros((frames[0].shape[0], 4, 3), np.uint8)
        rows.append(np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    image = Image.fromarray(np.concatenate(rows, axis=0)[:-4])
    if title:
        canvas = Image.new("RGB", (image.width, image.height + 2 * BAND_PX), (0, 0, 0))
        canvas.paste(image, (0, 2 * BAND_PX))
        ImageDraw.Draw(canvas).text((6, 8), title, fill=(255, 255, 255), font=_font(18))
        image = canvas
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
