"""The two grids every volume lives on: MNI152 2009 (nonlinear symmetric) space, RAS+.

``full`` is the 1 mm grid of the UK Biobank / MONAI brain LDM (160 x 224 x 160); ``demo`` covers the
same field of view at 2 mm (80 x 112 x 80), small enough to train and sample on a CPU. The field of
view spans x -80.5..79.5, y -129.5..94.5, z -76.5..83.5 mm (voxel edges), which holds the whole
MNI152 brain mask (x -72..72, y -107..73, z -72..82) with a margin. Full-grid voxel centres fall on
whole millimetres, like the MNI152 template's, so a 1 mm template is resampled without blurring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from synthbrain.errors import ConfigError

SPACE = "MNI152NLin2009aSym"
MAX_GRID_AXIS = 512                 # voxels along one axis (0.5 mm over a 256 mm head)
MAX_GRID_VOXELS = 64 * 1024**2      # as many voxels as an upload may hold (synthbrain.io.UPLOAD_MAX_VOXELS)
MAX_SPACING_MM = 10.0


@dataclass(frozen=True)
class Grid:
    """A named voxel grid in MNI space. ``origin`` is the world position (mm, RAS) of voxel (0, 0, 0)."""

    name: str
    shape: tuple[int, int, int]
    spacing: float
    origin: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or not all(isinstance(s, int) for s in self.shape) or min(self.shape) < 8:
            raise ConfigError(f"grid {self.name!r}: shape must be 3 whole numbers >= 8, got {self.shape}")
        if max(self.shape) > MAX_GRID_AXIS or math.prod(self.shape) > MAX_GRID_VOXELS:
            raise ConfigError(f"grid {self.name!r}: shape {tuple(self.shape)} is too large (at most {MAX_GRID_AXIS} "
                              f"voxels per axis and {MAX_GRID_VOXELS:,} in all)")
        if not (math.isfinite(self.spacing) and 0 < self.spacing <= MAX_SPACING_MM):
            raise ConfigError(f"grid {self.name!r}: spacing must be in (0, {MAX_SPACING_MM:g}] mm, got {self.spacing}")
        if len(self.origin) != 3 or not all(math.isfinite(o) and abs(o) < 1e4 for o in self.origin):
            raise ConfigError(f"grid {self.name!r}: origin must be 3 finite mm values, got {self.origin}")

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> world mm (RAS+), 4 x 4."""
        a = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    @property
    def voxel_volume_ml(self) -> float:
        return self.spacing**3 / 1000.0

    @property
    def res_label(self) -> str:
        """BIDS ``res-`` entity value: the spacing in whole mm (``1`` or ``2``)."""
        return f"{self.spacing:g}"

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) continuous voxel indices."""
        return (np.asarray(xyz, dtype=float) - np.asarray(self.origin)) / self.spacing

    def axis_mm(self, axis: int) -> np.ndarray:
        """World coordinates (mm) of the voxel centres along ``axis`` (0 = x, 1 = y, 2 = z)."""
        return self.origin[axis] + self.spacing * np.arange(self.shape[axis])

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) world mm."""
        return np.asarray(ijk, dtype=float) * self.spacing + np.asarray(self.origin)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "spacing": self.spacing,
                "origin": list(self.origin), "space": SPACE}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        try:
            return cls(name=str(d["name"]), shape=tuple(d["shape"]), spacing=float(d["spacing"]),
                       origin=tuple(float(v) for v in d["origin"]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"grid entry is malformed ({e})") from None


FULL = Grid("full", (160, 224, 160), 1.0, (-80.0, -129.0, -76.0))
# Same field of view at 2 mm: a demo voxel centre sits between two full voxel centres.
DEMO = Grid("demo", (80, 112, 80), 2.0, (-79.5, -128.5, -75.5))
# For tests and quick experiments only: 5 mm, 32 x 48 x 32 (divisible by 8), the same centre.
TINY = Grid("tiny", (32, 48, 32), 5.0, (-77.5, -136.5, -73.5))
GRIDS = {g.name: g for g in (DEMO, FULL, TINY)}


def get_grid(name: str | Grid) -> Grid:
    """Look a grid up by name (``demo``, ``full`` or ``tiny``)."""
    if isinstance(name, Grid):
        return name
    try:
        return GRIDS[name]
    except KeyError:
        raise ConfigError(f"unknown grid {name!r}; choose one of {sorted(GRIDS)}") from None
