"""Brain and ventricle surfaces of a volume, for a 3D view: isosurfaces (pyvista flying edges),
decimated to a triangle budget, written as MZ3 (the compact mesh format NiiVue reads).

The surfaces follow the definitions ``synthbrain.measure`` uses, so what a user sees in 3D is what
was measured: the ventricles are the measured lateral + third ventricles (connected pieces of
voxels darker than the ventricle level, inside the template's ventricles scaled to the head, never
the interhemispheric fissure), and the brain is each voxel's tissue fraction (a two-compartment
partial-volume model between the CSF and grey-matter intensities) in the measured brain, with the
ventricles it encloses (so the brain surface is the outer surface only). Surfaces are the 0.5 level
of these maps, so the volume a closed surface encloses is close to the measured volume.

Vertices are in world mm (RAS+, MNI), the space of the volume's affine, so the meshes line up with
the volume in any viewer.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import Grid
from synthbrain.io import Volume

MAX_TRIANGLES = 200_000           # total over all surfaces of one view
BRAIN_RGBA = (226, 198, 180, 255)
VENTRICLE_RGBA = (40, 110, 230, 255)
_MZ3_MAGIC = 23117                # "MZ"
_MZ3_FACES, _MZ3_VERTS = 1, 2


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangle mesh: ``vertices`` (N, 3) float32 in world mm (RAS+), ``faces`` (M, 3) int32."""

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    rgba: tuple[int, int, int, int] = BRAIN_RGBA

    @property
    def n_triangles(self) -> int:
        return int(self.faces.shape[0])

    @property
    def enclosed_volume_ml(self) -> float:
        """Volume enclosed by the (closed) surface in mL: the divergence theorem over its triangles."""
        if self.n_triangles == 0:
            return 0.0
        v = self.vertices.astype(np.float64)
        a, b, c = v[self.faces[:, 0]], v[self.faces[:, 1]], v[self.faces[:, 2]]
        return float(abs(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0 / 1000.0)


@dataclass(frozen=True, eq=False)
class TissueFractions:
    """Per-voxel maps on ``grid``: ``brain`` (tissue fraction + ventricles, the brain's outer volume)
    and ``ventricles`` (1 in the measured ventricles), both (X, Y, Z) float32 in [0, 1]."""

    grid: Grid
    brain: np.ndarray
    ventricles: np.ndarray


@dataclass(frozen=True, eq=False)
class Surfaces:
    """The meshes of one volume and, when the ventricles could not be found, why not."""

    meshes: tuple[Mesh, ...]
    note: str | None = None

    @property
    def n_triangles(self) -> int:
        return sum(m.n_triangles for m in self.meshes)


def tissue_fractions(volume: Volume, grid: Grid | None = None) -> TissueFractions:
    """Brain and ventricle fractions of a brain-extracted T1 in MNI space (see the module docstring),
    from the same segmentation the measurement uses, so the surfaces show what was measured.

    Raises ``InvalidVolumeError`` (from the measurement) when the volume has no usable grey / white
    matter contrast, e.g. an untrained model's output.
    """
    from synthbrain.measure import segment

    seg = segment(volume, grid)
    # the brain's outer volume: tissue plus the ventricles it encloses (sulcal CSF stays outside)
    return TissueFractions(seg.grid, np.minimum(seg.brain + seg.ventricles, 1.0), seg.ventricles)


def isosurface(field: np.ndarray, affine: np.ndarray, level: float, *, name: str,
               rgba: tuple[int, int, int, int] = BRAIN_RGBA, max_triangles: int = 60_000,
               smooth_sigma: float = 0.6) -> Mesh:
    """The ``level`` isosurface of ``field`` (X, Y, Z) with vertices mapped by ``affine`` to mm,
    decimated (quadric) to at most ``max_triangles``. ``smooth_sigma`` (voxels) smooths the field
    first, so a 2 mm grid does not give a staircase. An empty field gives an empty mesh."""
    import pyvista as pv

    if max_triangles < 1:
        raise ValueError(f"max_triangles must be >= 1, got {max_triangles}")
    f = ndi.gaussian_filter(np.asarray(field, np.float32), smooth_sigma) if smooth_sigma > 0 else field
    # one voxel of zero padding closes surfaces that touch the edge of the grid
    f = np.pad(f, 1)
    img = pv.ImageData(dimensions=f.shape, spacing=(1.0, 1.0, 1.0), origin=(-1.0, -1.0, -1.0))
    img.point_data["f"] = f.ravel(order="F")
    surf = img.contour([level], scalars="f", method="flying_edges")
    if surf.n_cells == 0:
        return Mesh(name, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), rgba)
    surf = surf.triangulate()
    if surf.n_cells > max_triangles:
        # quadric decimation may stop slightly above its target: aim a little lower, check after
        surf = surf.decimate(1.0 - 0.97 * max_triangles / surf.n_cells)
    faces = surf.faces.reshape(-1, 4)[:, 1:].astype(np.int32)
    ijk = np.asarray(surf.points, np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return Mesh(name, xyz.astype(np.float32), faces, rgba)


def brain_surfaces(volume: Volume, grid: Grid | None = None, max_triangles: int = 100_000) -> Surfaces:
    """Brain and ventricle surfaces of ``volume`` (at most ``max_triangles`` in all, <= 200k).

    When the tissues cannot be told apart (no grey / white contrast, as in an untrained model's
    output) the brain surface is the volume's foreground instead, and ``note`` says why there are
    no ventricles. The default budget leaves demo-grid surfaces (~65k triangles) undecimated, as
    decimation costs more than drawing them; 1 mm surfaces (~300k) are decimated.
    """
    if not 1000 <= max_triangles <= MAX_TRIANGLES:
        raise ValueError(f"max_triangles must be in 1000..{MAX_TRIANGLES}, got {max_triangles}")
    brain_budget = int(max_triangles * 0.75)
    try:
        fr = tissue_fractions(volume, grid)
    except InvalidVolumeError as e:
        return foreground_surface(volume, "brain", brain_budget, note=f"ventricles not segmented: {e}",
                                  empty=f"no surfaces: {e}")
    affine = fr.grid.affine
    brain = isosurface(fr.brain, affine, 0.5, name="brain", max_triangles=brain_budget)
    vent = isosurface(fr.ventricles, affine, 0.5, name="ventricles", rgba=VENTRICLE_RGBA,
                      max_triangles=max_triangles - brain_budget, smooth_sigma=0.5)
    return Surfaces(tuple(m for m in (brain, vent) if m.n_triangles))


def foreground_surface(volume: Volume, name: str, max_triangles: int = 100_000, note: str | None = None,
                       empty: str = "no surfaces: the volume is empty") -> Surfaces:
    """One surface around the volume's foreground (a fifth of its 99.5th-percentile intensity): the
    outline of a volume whose tissues are not segmented, such as a whole head (skull and scalp
    included, which a brain segmentation would count as brain) or an untrained model's output."""
    data = np.asarray(volume.data, np.float32)
    top = float(np.percentile(data, 99.5)) if data.size else 0.0
    if not top > 0:
        return Surfaces((), note=empty)
    return Surfaces((isosurface(data / top, volume.affine, 0.2, name=name, max_triangles=max_triangles),), note=note)


def to_mz3(mesh: Mesh) -> bytes:
    """``mesh`` as a gzip-compressed MZ3 file (NiiVue's and Surfice's binary mesh format): header
    magic 23117, attributes (faces | vertices), face and vertex counts, then int32 faces and float32
    vertices, little endian."""
    header = struct.pack("<HHIII", _MZ3_MAGIC, _MZ3_FACES | _MZ3_VERTS, mesh.n_triangles, len(mesh.vertices), 0)
    body = np.ascontiguousarray(mesh.faces, "<i4").tobytes() + np.ascontiguousarray(mesh.vertices, "<f4").tobytes()
    return gzip.compress(header + body, compresslevel=1, mtime=0)


def read_mz3(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (N, 3) float32, faces (M, 3) int32) of an MZ3 file written by ``to_mz3``."""
    raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    magic, attr, nface, nvert, nskip = struct.unpack("<HHIII", raw[:16])
    if magic != _MZ3_MAGIC or attr & 3 != 3:
        raise ValueError("not an MZ3 file with faces and vertices")
    off = 16 + nskip
    faces = np.frombuffer(raw, "<i4", nface * 3, off).reshape(-1, 3)
    verts = np.frombuffer(raw, "<f4", nvert * 3, off + nface * 12).reshape(-1, 3)
    return verts.astype(np.float32), faces.astype(np.int32)
