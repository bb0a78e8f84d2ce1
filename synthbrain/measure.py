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
   intensities;
6. ventricles (lateral + third): connected pieces (6-connected, > 0.1 mL) of the voxels darker than
   the ventricle level, ``VENTRICLE_LEVEL`` of the way from the CSF to the white-matter intensity
   (the CSF's: the extrapolated pure CSF, or the darkest 5 % of the template's ventricles where a soft
   image lifts them above it),
   in the ventricle region, kept when they lie largely in the template's lateral and third
   ventricles (:func:`ventricle_prior`), never in the interhemispheric fissure
   (:func:`~synthbrain.data.template.fissure_mask`: the midline above the corpus callosum, the
   template's and the brain's own); ventricular volume = their voxels' volume. A blurred wall (a
   2 mm grid, a soft reconstruction or sample) crosses half its contrast where the wall is, so the
   count holds where a summed CSF fraction would lose the ventricles' blurred-out edges (the walls are
   white matter mostly, with the caudate and thalamus: hence a level a little under a half);
7. brain: the largest connected body of mostly-tissue voxels after an opening, inside the template
   brain (scaled) + 2 mm, grown back through tissue; brain volume = its tissue fraction summed, so
   dura and sinus left round the brain by an extraction are not brain (they are ``non-brain`` in
   :attr:`Segmentation.labels`).

:func:`measurement_labels` gives the label map of what was counted (for an overlay).

Inputs must be brain-extracted and rigidly aligned to MNI152 2009 space (all SynthBrain data is).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from synthbrain.data.template import fissure_mask
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


# label values of :attr:`Segmentation.labels` (each voxel by the compartment most of it belongs to)
LABELS: dict[int, str] = {0: "outside", 1: "brain", 2: "ventricles", 3: "other CSF", 4: "non-brain"}

_FACE = ndi.generate_binary_structure(3, 1)  # 6-connected: a diagonal touch of two voxels is no bridge
VENTRICLE_CORE = 0.5    # CSF fraction of a voxel that is mostly CSF (the label map's "other CSF")
VENTRICLE_LEVEL = 0.4   # ventricle boundary: this far from the CSF intensity to the white matter's
# the ventricles' own CSF intensity: this percentile of the voxels in the template's ventricles (scaled),
# where it is brighter than the extrapolated pure CSF (a soft image that lifts its darkest values)
VENTRICLE_CORE_PERCENTILE = 5.0
BRAIN_CORE = 0.5        # tissue fraction of a voxel that is mostly brain
MIN_SEED_OVERLAP = 0.2  # share of a dark piece that must lie in the template's ventricles
MIN_PIECE_ML = 0.1      # smaller dark pieces are not counted as ventricle
BRAIN_MARGIN_MM = 2.0   # how far beyond the template brain mask (scaled) brain may reach


@dataclass(frozen=True, eq=False)
class Segmentation:
    """The maps a measurement is made of, on ``grid`` (for display: surfaces and overlays show what
    was measured). Arrays are (X, Y, Z) on the grid (RAS+, MNI space)."""

    grid: Grid
    image: np.ndarray            # the volume on the grid, normalised and bias-corrected
    head: np.ndarray             # bool: the head mask (brain + CSF + whatever else was left round it)
    csf: np.ndarray              # CSF fraction per voxel (0 outside the head)
    ventricle_region: np.ndarray  # bool: where the template allows ventricles (the prior, scaled)
    ventricle_mask: np.ndarray   # bool: the ventricles found (their voxels are the ventricular volume)
    brain_mask: np.ndarray       # bool: the brain found (its tissue fraction is the brain volume)
    measurement: Measurement

    @property
    def brain(self) -> np.ndarray:
        """Brain (GM + WM) fraction per voxel: 0 in dura, sinus and other tissue off the brain."""
        return np.where(self.brain_mask, 1.0 - self.csf, 0.0).astype(np.float32)

    @property
    def ventricles(self) -> np.ndarray:
        """1 in the ventricles found, 0 elsewhere (their voxels are the ventricular volume)."""
        return self.ventricle_mask.astype(np.float32)

    @property
    def labels(self) -> np.ndarray:
        """uint8 label map (values in :data:`LABELS`): each head voxel by the compartment most of it
        belongs to: ventricles, other CSF (sulcal, cisternal, the fissure: not counted as ventricle),
        brain, or non-brain (tissue in the head mask that is not the brain: dura, sinus)."""
        out = np.zeros(self.grid.shape, np.uint8)
        fluid = self.csf >= VENTRICLE_CORE
        out[self.head] = 4
        out[self.brain_mask & ~fluid] = 1
        out[self.head & fluid] = 3
        out[self.ventricle_mask] = 2
        return out


def measure_volume(volume: Volume, grid: Grid | None = None) -> Measurement:
    """Measure brain and ventricular volume (mL) of a brain-extracted T1 ``volume`` in MNI space."""
    return segment(volume, grid).measurement


def measurement_labels(volume: Volume, grid: Grid | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(label map, affine) of what :func:`measure_volume` counts in ``volume``: a uint8 (X, Y, Z) map
    with the values of :data:`LABELS` on the measurement grid and that grid's affine (RAS mm), e.g.
    for an overlay. Raises ``InvalidVolumeError`` as the measurement does."""
    seg = segment(volume, grid)
    return seg.labels, seg.grid.affine


@lru_cache(maxsize=3)
def ventricle_prior(grid: Grid) -> np.ndarray:
    """bool (X, Y, Z): the lateral and third ventricles of the MNI152 template on ``grid``
    (:attr:`Template.ventricles` > 0.5)."""
    from synthbrain.data.template import load_template

    return load_template(grid).ventricles > 0.5


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndi.label(mask, structure=_FACE)


def _ventricle_mask(dark: np.ndarray, region: np.ndarray, seed: np.ndarray, min_voxels: float) -> np.ndarray:
    """The ventricles: connected pieces of the voxels darker than the ventricle level (``dark``)
    inside the ventricle region that lie largely in the template's ventricles (``seed``, scaled to the
    head), so that sulcal and cisternal CSF and the interhemispheric fissure, which the region also
    reaches, are left out. Pieces of fewer than ``min_voxels`` are noise, not a ventricle."""
    core = region & dark
    lab, n = _components(core)
    if n == 0:
        return core
    idx = np.arange(1, n + 1)
    size = ndi.sum(core, lab, idx)
    in_seed = ndi.sum(seed, lab, idx)
    keep = (in_seed >= np.maximum(MIN_SEED_OVERLAP * size, 1.0)) & (size >= min_voxels)
    mask = np.isin(lab, idx[keep])
    # a ventricle merged with a large cistern through partial volume holds much of the seed but is
    # mostly not ventricle: keep only its part in and next to the template's ventricles
    merged = idx[~keep & (in_seed >= 0.1 * max(float(seed.sum()), 1.0))]
    if merged.size:
        mask |= np.isin(lab, merged) & ndi.binary_dilation(seed, _FACE, iterations=2)
    return mask


def _brain_mask(csf: np.ndarray, head: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The brain: the largest connected body of mostly-tissue voxels inside ``allowed`` (the
    template brain, scaled, with a margin) after an opening that cuts thin bridges, grown back by
    two voxels through tissue (the thin gyri the opening trimmed). Dura and venous sinuses that a
    brain extraction leaves lie outside, or hang on by partial-volume bridges: they are not brain."""
    tissue = head & allowed & (csf < 1.0 - BRAIN_CORE)
    body = ndi.binary_opening(tissue, _FACE)
    lab, n = _components(body)
    if n == 0:
        return tissue
    largest = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    grown = ndi.binary_dilation(lab == largest, _FACE, iterations=2, mask=tissue)
    # the partial-volume rim at the brain's surface counts by its tissue fraction
    return grown | (ndi.binary_dilation(grown, _FACE) & head & allowed)


def segment(volume: Volume, grid: Grid | None = None) -> Segmentation:
    """The head mask, CSF fraction, ventricles and brain of ``volume`` behind :func:`measure_volume`."""
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

    def scaled(mask: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(mask.astype(np.float32), coords, order=1) > 0.5

    def region(mask: np.ndarray) -> np.ndarray:
        return head & scaled(mask)

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
    vent_region = region(tmpl.ventricle_region)
    # the fissure as the template shows it (scaled) and, where this brain's own callosum is seen, as
    # that shows it (enlarged ventricles lift it); a column with no white matter seen (a thin callosum
    # blurred away) keeps the template's, so the third ventricle below it stays
    own_wm = head & (data > (gm_m + wm_m) / 2)
    x_mm = grid.axis_mm(0)
    fissure = scaled(fissure_mask(tmpl.wm > 0.5, x_mm)) | (fissure_mask(own_wm, x_mm) & own_wm.any(axis=2)[..., None])
    prior = region(ventricle_prior(grid))
    csf_v = max(csf_m, float(np.percentile(data[prior], VENTRICLE_CORE_PERCENTILE))) if prior.any() else csf_m
    dark = data < csf_v + VENTRICLE_LEVEL * (wm_m - csf_v)
    vent_mask = _ventricle_mask(dark, vent_region & ~fissure, prior, MIN_PIECE_ML / grid.voxel_volume_ml)
    brain_allowed = scaled(ndi.distance_transform_edt(tmpl.brain <= 0.5) * grid.spacing <= BRAIN_MARGIN_MM)
    brain_mask_ = _brain_mask(csf_frac, head, brain_allowed)
    vox = grid.voxel_volume_ml
    brain = float((1.0 - csf_frac)[brain_mask_].sum(dtype=np.float64)) * vox
    vent = float(vent_mask.sum(dtype=np.float64)) * vox
    m = Measurement(brain_volume=brain, ventricular_volume=vent, intracranial_volume=icv,
                    csf_mean=float(csf_m), gm_mean=float(gm_m), wm_mean=float(wm_m))
    return Segmentation(grid=grid, image=data.astype(np.float32), head=head, csf=csf_frac,
                        ventricle_region=vent_region, ventricle_mask=vent_mask, brain_mask=brain_mask_,
                        measurement=m)
