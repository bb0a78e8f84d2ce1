"""Preprocessing: bring any T1 volume in MNI space onto a SynthBrain grid.

1. resample to the grid's spacing and crop/pad to its shape *by world coordinates* (the grid's
   affine decides where every voxel is, so the MNI origin lands where it should, whatever the
   input's array size), with Gaussian anti-aliasing when the grid is coarser than the input;
2. mask the brain (the input's own non-zero voxels inside the dilated MNI152 brain mask);
3. robust intensity normalisation: divide by the 99.5th percentile of the brain voxels and clip to
   [0, 1]. The scale is returned so it can be logged in the sidecar.

Inputs are expected to be brain-extracted and (at least rigidly) aligned to MNI152 2009 space; the
mask step is a safety net, not a skull stripper.

A bundle trained on whole-head images (an imported model-zoo LDM: its config's ``intensity`` says
``whole_head``, min-max to [0, 1]) is given its own convention instead (:func:`preprocess` with that
``intensity``): step 1, then the whole field of view min-max normalised to [0, 1], with no brain mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import Grid, get_grid
from synthbrain.io import Volume

PERCENTILE = 99.5
BACKGROUND_FRACTION = 0.02  # voxels below this fraction of the robust maximum are background


@dataclass(frozen=True)
class PreprocessInfo:
    """What preprocessing did, for sidecars and logs."""

    grid: str
    intensity_scale: float  # input units per normalised unit (99.5th percentile of brain voxels; min-max: max - min)
    brain_voxels: int       # voxels kept (min-max over the whole head: every voxel of the grid)
    normalisation: str = f"divide by the {PERCENTILE}th percentile of brain voxels, clip to [0, 1]"

    def to_dict(self) -> dict:
        return {"grid": self.grid, "intensity_scale": self.intensity_scale, "brain_voxels": self.brain_voxels,
                "normalisation": self.normalisation}


MIN_MAX = "min-max over the whole field of view to [0, 1], no brain mask (a whole-head model's convention)"


# why a whole-head model's volumes are not measured (measure.py expects a brain-extracted T1)
WHOLE_HEAD_UNMEASURED = ("this model makes whole heads (skull and scalp), and measuring brain and ventricular volume "
                         "needs a brain-extracted volume")


def is_whole_head(intensity: dict | None) -> bool:
    """Whether a bundle's ``intensity`` convention (config.json) is whole head, min-max."""
    return bool((intensity or {}).get("whole_head"))


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid: Grid | str, *, order: int = 1,
                     antialias: bool = True) -> np.ndarray:
    """Resample ``data`` (voxel -> world ``affine``) onto ``grid``; outside the input is 0.

    Returns a float32 array of ``grid.shape``. With ``antialias`` the input is first smoothed with a
    Gaussian whose sigma (in input voxels) is ``(grid spacing / input spacing - 1) / 2`` per axis,
    as scikit-image does for downscaling.
    """
    grid = get_grid(grid)
    data = np.asarray(data, dtype=np.float32)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if antialias:
        sigma = np.maximum(0.0, (grid.spacing / spacing - 1.0) / 2.0)
        if np.any(sigma > 0.05):
            data = ndi.gaussian_filter(data, sigma=sigma, mode="constant")
    # grid voxel -> world -> input voxel, one affine for scipy
    mapping = np.linalg.inv(affine) @ grid.affine
    out = ndi.affine_transform(data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=grid.shape,
                               order=order, mode="constant", cval=0.0, prefilter=order > 1)
    return out.astype(np.float32, copy=False)


def robust_scale(data: np.ndarray, mask: np.ndarray, *, source: str | None = None) -> float:
    """The 99.5th percentile of ``data`` inside ``mask`` (the normalisation divisor); errors name
    ``source`` (the file the data came from)."""
    vals = data[mask]
    if vals.size == 0:
        raise InvalidVolumeError(f"{source or 'volume'}: no brain voxels to normalise "
                                 "(the image is empty inside the MNI brain mask)")
    scale = float(np.percentile(vals, PERCENTILE))
    if not scale > 0:
        raise InvalidVolumeError(f"{source or 'volume'}: brain voxels are all <= 0: cannot normalise intensities")
    return scale


def brain_mask(data: np.ndarray, grid: Grid | str, *, source: str | None = None) -> np.ndarray:
    """Foreground of ``data`` (already on ``grid``) inside the dilated MNI152 brain mask; errors name
    ``source`` (the file the data came from)."""
    from synthbrain.data.template import load_template

    tmpl = load_template(grid)
    region = tmpl.search_mask
    inside = data[region]
    if inside.size == 0 or not np.any(inside > 0):
        raise InvalidVolumeError(f"{source or 'volume'}: the image is empty inside the MNI brain region: "
                                 "is it aligned to MNI space?")
    threshold = BACKGROUND_FRACTION * float(np.percentile(inside[inside > 0], PERCENTILE))
    return region & (data > threshold)


def preprocess(volume: Volume, grid: Grid | str, intensity: dict | None = None) -> tuple[Volume, PreprocessInfo]:
    """Resample ``volume`` (MNI space, any orientation/spacing) onto ``grid`` and normalise to [0, 1].

    ``intensity``: the bundle's convention (config.json ``intensity``); a whole-head one is min-max over
    the whole field of view, with no mask. Returns the preprocessed volume (zero outside the brain mask,
    unless whole head) and what was done.
    """
    grid = get_grid(grid)
    data = resample_to_grid(volume.data, volume.affine, grid)
    if is_whole_head(intensity):
        lo, hi = float(data.min()), float(data.max())
        if not hi > lo:
            raise InvalidVolumeError(f"{volume.source or 'volume'}: constant on the {grid.name} grid ({lo:g}): "
                                     f"nothing to normalise")
        out = np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        info = PreprocessInfo(grid=grid.name, intensity_scale=hi - lo, brain_voxels=int(out.size),
                              normalisation=MIN_MAX)
        return Volume(out, grid.affine, source=volume.source), info
    mask = brain_mask(data, grid, source=volume.source)
    scale = robust_scale(data, mask, source=volume.source)
    out = np.where(mask, np.clip(data / scale, 0.0, 1.0), 0.0).astype(np.float32)
    info = PreprocessInfo(grid=grid.name, intensity_scale=scale, brain_voxels=int(mask.sum()))
    return Volume(out, grid.affine, source=volume.source), info
