"""Native-space copies of the MNI152 template: what a scanner would hand ``synthbrain prepare``.

A copy is the template (optionally with a synthetic skull and scalp round the brain) moved by a known
rigid motion, sampled on a scanner grid of its own (spacing, field of view, RAS or LPS voxel order),
times a smooth bias field, in arbitrary units. The tests and ``benchmarks/prepare_speed.py`` use them,
because the true motion is known: a registration can be scored in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from synthbrain.io import Volume


def head_with_shell(t1: Volume) -> np.ndarray:
    """``t1`` (brain-extracted, zero outside) with what a whole-head T1 has round the brain: a dark
    CSF / bone band 4-9 mm out (10 % of the brain's robust maximum) and a bright scalp 9-15 mm out (90 %)."""
    brain = t1.data > 0
    d = ndi.distance_transform_edt(~brain, sampling=t1.spacing)
    hi = np.percentile(t1.data[brain], 99.5)
    shell = np.where((d > 4) & (d <= 9), 0.1 * hi, 0.0) + np.where((d > 9) & (d <= 15), 0.9 * hi, 0.0)
    return (t1.data + shell).astype(np.float32)


def motion(rot_deg: Sequence[float], shift_mm: Sequence[float], centre_mm: Sequence[float]) -> np.ndarray:
    """World (RAS mm) rigid motion, 4 x 4: rotation by x, y, z Euler angles (degrees) about
    ``centre_mm``, then a shift (mm)."""
    from scipy.spatial.transform import Rotation

    c = np.asarray(centre_mm, float)
    r = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix()
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(shift_mm, float)
    return m


def native_copy(t1: Volume, data: np.ndarray, world_motion: np.ndarray, *, spacing: float = 2.0,
                shape: Sequence[int] | None = None, lps: bool = False, bias: float = 0.0,
                units: float = 3.7) -> Volume:
    """``data`` (on ``t1``'s array) moved by ``world_motion`` onto a scanner grid of ``spacing`` mm
    centred on the moved image's centre (default field of view 196 x 232 x 188 mm; LPS voxel order
    with ``lps``), anti-aliased, times ``exp(bias * smooth polynomial)``, times ``units``."""
    shape = tuple(shape) if shape is not None else tuple(int(round(n / spacing)) for n in (196, 232, 188))
    a = np.diag([spacing, spacing, spacing, 1.0])
    if lps:
        a[0, 0] = a[1, 1] = -spacing
    centre = t1.affine[:3, :3] @ ((np.array(t1.shape) - 1) / 2.0) + t1.affine[:3, 3]
    moved_centre = world_motion[:3, :3] @ centre + world_motion[:3, 3]
    a[:3, 3] = moved_centre - a[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    sigma = np.maximum(0.0, (spacing / np.array(t1.spacing) - 1.0) / 2.0)
    src = ndi.gaussian_filter(data, sigma) if np.any(sigma > 0.05) else data
    mapping = np.linalg.inv(t1.affine) @ np.linalg.inv(world_motion) @ a  # scanner voxel -> t1 voxel
    out = ndi.affine_transform(src, mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape, order=1)
    if bias:
        g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
        out = out * np.exp(bias * (g[0] + 0.5 * g[2] - 0.3 * g[1] ** 2))
    return Volume((units * out).astype(np.float32), a)
