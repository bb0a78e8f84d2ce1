"""Volumes encoded for a browser viewer: small gzip NIfTI files, and content ids to tell them apart.

A viewer needs intensities to about 1e-4, not float32: a volume is stored as int16 with the NIfTI
``scl_slope`` that maps it back (NiiVue, like every NIfTI reader, applies the slope), so the
browser's readout shows the real values while the payload is 2-4 times smaller than float32.
Downloads keep float32 (``synthbrain.io.to_nifti_bytes``); this is for display only.

A 1 mm volume (160 x 224 x 160, 5.7 M voxels; ``LARGE_VOXELS`` or more per frame) that is not negative
anywhere is stored as uint8 instead (slope max / 255: three significant digits, what a grey scale on a
screen shows), which halves what the browser downloads and unpacks; signed data (a difference map)
keep int16, so that values near zero stay exact for the overlay's threshold.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from synthbrain.errors import InvalidVolumeError
from synthbrain.io import Volume

INT16_MAX = 32767
UINT8_MAX = 255
LARGE_VOXELS = 4_000_000  # voxels per frame from which a non-negative volume is sent as uint8 (the 1 mm grid)


def content_id(volume: Volume) -> str:
    """A short hash of a volume's voxels and affine: equal volumes get equal ids (cache keys)."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
    h.update(np.asarray(volume.affine, dtype=np.float64).tobytes())
    h.update(str(volume.shape).encode())
    return h.hexdigest()[:16]


def display_nifti_bytes(volume: Volume, description: str = "SynthBrain display copy") -> bytes:
    """``volume`` as a gzip NIfTI-1 (int16 + scl_slope; RAS+ affine as sform and qform, code 4).

    The slope is max|data| / 32767, so values keep 4-5 significant digits; an all-zero volume gets
    slope 1. Signed data (a difference map) stay signed. A non-negative volume of ``LARGE_VOXELS`` or
    more is uint8 (slope max / 255) instead.
    """
    return _display_nifti(np.asarray(volume.data, dtype=np.float32), volume.affine, description,
                        volume.source or "volume")


def display_series_nifti_bytes(volumes: Sequence[Volume], description: str = "SynthBrain display series") -> bytes:
    """Volumes on one grid as one 4D gzip NIfTI-1 (X, Y, Z, T), frame ``t`` = ``volumes[t]``, with one
    scl_slope for all frames (as :func:`display_nifti_bytes`), so a viewer can step through them
    (NiiVue's 4D frames) without loading a file per frame."""
    if not volumes:
        raise InvalidVolumeError("a display series needs at least one volume")
    first = volumes[0]
    for v in volumes[1:]:
        if v.shape != first.shape or not np.allclose(v.affine, first.affine):
            raise InvalidVolumeError(f"{v.source or 'volume'}: every frame of a series must lie on one grid; "
                                     f"got {v.shape} against {first.shape}")
    data = np.stack([np.asarray(v.data, dtype=np.float32) for v in volumes], axis=-1)  # (X, Y, Z, T)
    return _display_nifti(data, first.affine, description, first.source or "series")


def _display_nifti(data: np.ndarray, affine: np.ndarray, description: str, name: str) -> bytes:
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InvalidVolumeError(f"{name}: {bad} voxels are NaN or infinite; cannot display")
    peak = float(np.abs(data).max()) if data.size else 0.0
    eight_bit = data.size and int(np.prod(data.shape[:3])) >= LARGE_VOXELS and float(data.min()) >= 0.0
    top, dtype = (UINT8_MAX, np.uint8) if eight_bit else (INT16_MAX, np.int16)
    slope = peak / top if peak > 0 else 1.0
    q = np.clip(np.rint(data / slope), -top if dtype is np.int16 else 0, top).astype(dtype)
    img = nib.Nifti1Image(q, affine)
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=4)
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units(xyz="mm")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    # gzip level 1: three times faster than 6 and only a few percent larger on these images
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def display_bytes(volume: Volume, provenance: str) -> bytes:
    """The viewer's copy of a volume (:func:`display_nifti_bytes`), its header saying what kind it is
    (``synthetic``, ``derived`` or ``real``, see :mod:`synthbrain.export`)."""
    from synthbrain.export import kind

    return display_nifti_bytes(volume, f"SynthBrain {kind(provenance).name.upper()} T1w (display)")


def display_series_bytes(volumes: Sequence[Volume], provenance: str) -> bytes:
    """The viewer's copy of a series (:func:`display_series_nifti_bytes`: one 4D file, a frame per
    volume), its header saying what kind it is, as :func:`display_bytes`."""
    from synthbrain.export import kind

    return display_series_nifti_bytes(volumes, f"SynthBrain {kind(provenance).name.upper()} T1w series (display)")


def difference_window(difference: np.ndarray, reference: np.ndarray, share: float = 0.05,
                      step: float = 0.005) -> tuple[float, float]:
    """A display window for a signed difference map (e.g. reconstruction - original, intensities in
    [0, 1]): (threshold, top). Only the ``share`` of brain voxels (``reference > 0``) with the largest
    |difference| lie above ``threshold``, so the overlay marks where the two differ most instead of
    colouring the whole brain; the colour ramp saturates at ``top``, the 99.5th percentile. Both are
    rounded up to ``step`` (a slider's step)."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    d = np.abs(np.asarray(difference, dtype=np.float32))
    brain = np.asarray(reference) > 0
    values = d[brain] if brain.any() else d.ravel()
    threshold, top = (float(np.quantile(values, q)) for q in (1.0 - share, 0.995))

    def up(x: float) -> float:
        return round(float(np.ceil(x / step - 1e-9) * step), 6)

    threshold = max(up(threshold), step)
    return threshold, max(up(top), 2 * threshold)
