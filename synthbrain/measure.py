"""Brain and ventricular volume (mL) of a T1 volume in MNI space, from the image alone.

This is what checks whether a generated brain has the volumes that were asked for, so it runs on any
volume, real or synthetic, without label maps:

1. the volume is put on the nearest SynthBrain grid (<= 1.5 mm voxels -> ``full``, else ``demo``);
   its head mask is its foreground inside the dilated MNI152 brain mask, and intensities are divided
   by the 99.5th percentile of the head;
2. the template's regions (deep grey matter, deep white matter, the ventricles' search region) are
   scaled about the brain's centre by the head's size (cube root of its volume over the template's);
3. a slow multiplicative bias field is removed: a degree-2 polynomial fitted to the log intensity of
   white-matter voxels (as SPM and FAST model bias with smooth bases);
4. reference intensities: grey and white matter are the medians of the large deep regions; pure CSF
   is extrapolated from them with the template's contrast as a power law (at 2 mm almost no voxel is
   pure CSF, so it cannot be read off the image);
5. each voxel's CSF fraction follows a two-compartment partial-volume model between the CSF and GM
   intensities; brain volume = head mask minus CSF, ventricular volume = CSF inside the ventricle
   region.

Inputs must be brain-extracted and rigidly aligned to MNI152 2009 space (all SynthBrain data is).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import DEMO, FULL, Grid
from synthbrain.io import Volume


@dataclass(frozen=True)
class Measurement:
    brain_volume: float          # mL, grey + white matter
    ventricular_volume: float    # mL, lateral + third ventricles
    intracranial_volume: float   # mL, the head mask (brain + CSF)
    csf_mean: float              # reference intensities of the normalised, bias-corrected image: CSF
    gm_mean: float               # (extrapolated), deep grey matter (median), deep white matter (median)
    wm_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


def grid_for(volume: Volume) -> Grid:
    """The grid a volume is measured on: full for <= 1.5 mm voxels, demo otherwise."""
    return FULL if max(volume.spacing) <= 1.5 else DEMO


def _csf_intensity(gm: float, wm: float, tmpl) -> float:
    """Pure-CSF intensity, extrapolated from the GM and WM intensities with the template's contrast
    as a power law (I = c * I_template ** gamma): at 2 mm almost no voxel is pure CSF, so it cannot be
    read off the image the way the large deep GM and WM regions can."""
    t_csf, t_gm, t_wm = tmpl.tissue_intensity
    gamma = np.log(wm / gm) / np.log(t_wm / t_gm)
    return float(wm * (t_csf / t_wm) ** gamma)


def _bias_correct(data: np.ndarray, head: np.ndarray, gm: float, wm: float, iterations: int = 2) -> np.ndarray:
    """Remove a slow multiplicative bias field: fit a degree-2 polynomial in (x, y, z) to the log
    intensity of white-matter voxels (brighter than halfway between GM and WM), as SPM and FAST model
    bias with smooth bases, and divide it out (normalised to 1 on average over the head)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in data.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    basis = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    out = data
    for _ in range(iterations):
        wm_mask = head & (out > (gm + wm) / 2) & (out < wm * 1.3)
        idx = np.nonzero(wm_mask)
        if idx[0].size < 100:
            break
        a = np.stack([np.ones(idx[0].size, np.float32)] + [np.broadcast_to(b, data.shape)[idx] for b in basis], 1)
        coef, *_ = np.linalg.lstsq(a, np.log(np.maximum(data[idx], 1e-6)), rcond=None)
        log_field = sum(c * b for c, b in zip(coef[1:], basis))
        log_field = log_field - log_field[head].mean()
        out = data / np.exp(log_field)
    return out


@dataclass(frozen=True, eq=False)
class Segmentation:
    """The maps a measurement is made of, on ``grid`` (for display: surfaces show what was measured)."""

    grid: Grid
    image: np.ndarray            # the volume on the grid, normalised and bias-corrected
    head: np.ndarray             # bool: the head mask (brain + CSF)
    csf: np.ndarray              # CSF fraction per voxel (0 outside the head)
    ventricle_region: np.ndarray  # bool: where CSF counts as ventricle
    measurement: Measurement

    @property
    def brain(self) -> np.ndarray:
        """Brain (GM + WM) fraction per voxel."""
        return np.where(self.head, 1.0 - self.csf, 0.0).astype(np.float32)

    @property
    def ventricles(self) -> np.ndarray:
        """Ventricular CSF fraction per voxel."""
        return np.where(self.ventricle_region, self.csf, 0.0).astype(np.float32)


def measure_volume(volume: Volume, grid: Grid | None = None) -> Measurement:
    """Measure brain and ventricular volume (mL) of a brain-extracted T1 ``volume`` in MNI space."""
    return segment(volume, grid).measurement


def segment(volume: Volume, grid: Grid | None = None) -> Segmentation:
    """The head mask, CSF fraction and ventricle region of ``volume`` behind :func:`measure_volume`."""
    from synthbrain.data.preprocess import brain_mask, resample_to_grid, robust_scale
    from synthbrain.data.template import load_template

    grid = grid or grid_for(volume)
    tmpl = load_template(grid)
    data = resample_to_grid(volume.data, volume.affine, grid)
    head = brain_mask(data, grid, source=volume.source)
    if head.sum() * grid.voxel_volume_ml < 200:
        raise InvalidVolumeError(f"{volume.source or 'volume'}: less than 200 mL of brain found; "
                                 "is it a brain-extracted T1 in MNI space?")
    data = data / robust_scale(data, head, source=volume.source)
    icv = float(head.sum()) * grid.voxel_volume_ml

    # template regions follow the head's size: scale them about the brain centre
    scale = (icv / tmpl.intracranial_volume_ml) ** (1.0 / 3.0)
    centre = grid.world_to_voxel(tmpl.centroid_mm[None])[0][:, None, None, None]
    coords = centre + (np.indices(grid.shape, dtype=np.float32) - centre) / scale

    def region(mask: np.ndarray) -> np.ndarray:
        return head & (ndi.map_coordinates(mask.astype(np.float32), coords, order=1) > 0.5)

    deep_wm, deep_gm = region(tmpl.deep_wm), region(tmpl.deep_gm)
    if deep_wm.sum() < 50 or deep_gm.sum() < 50:
        raise InvalidVolumeError(f"{volume.source or 'volume'}: deep white / grey matter not found; "
                                 "is it a brain-extracted T1 in MNI space?")
    data = _bias_correct(data, head, float(np.median(data[deep_gm])), float(np.median(data[deep_wm])))
    wm_m, gm_m = float(np.median(data[deep_wm])), float(np.median(data[deep_gm]))
    if not wm_m > gm_m * 1.02:
        raise InvalidVolumeError(f"{volume.source or 'volume'}: no grey / white-matter contrast; is it a T1?")
    csf_m = _csf_intensity(gm_m, wm_m, tmpl)
    csf_frac = (np.clip((gm_m - data) / (gm_m - csf_m), 0.0, 1.0) * head).astype(np.float32)
    brain = icv - float(csf_frac.sum(dtype=np.float64)) * grid.voxel_volume_ml
    vent_region = region(tmpl.ventricle_region)
    vent = float(csf_frac[vent_region].sum(dtype=np.float64)) * grid.voxel_volume_ml
    m = Measurement(brain_volume=brain, ventricular_volume=vent, intracranial_volume=icv,
                    csf_mean=float(csf_m), gm_mean=float(gm_m), wm_mean=float(wm_m))
    return Segmentation(grid=grid, image=data.astype(np.float32), head=head, csf=csf_frac,
                        ventricle_region=vent_region, measurement=m)
