"""The MNI152 2009 template that nilearn ships (no download), on a SynthBrain grid.

nilearn carries the ICBM 2009 nonlinear symmetric T1 (brain-extracted), grey- and white-matter
probability maps and the brain mask at 1 mm. From them we derive, once per grid and process:

- tissue fractions ``gm``, ``wm`` and ``csf`` (= brain mask - GM - WM, clipped), summing to <= 1;
- ``ventricles``: the CSF fraction inside the lateral and third ventricles, found as the large
  CSF components deep (> 15 mm) inside the brain near the midline and the midline slit between the
  commissures, never the interhemispheric fissure or the cisterns round the splenium;
- ``ventricle_region``: where a ventricle measurement looks (the ventricles dilated by 12 mm,
  kept > 8 mm away from the brain's surface and > 4 mm from other CSF, so that sulcal and
  cisternal CSF does not count);
- ``search_mask``: the brain mask dilated by 6 mm (where preprocessing looks for brain);
- ``deep_gm`` / ``deep_wm``: large regions of nearly pure deep grey / white matter, whose median
  intensities are robust references for measuring tissue in any image.

All arrays are on the grid (RAS+), fractions in [0, 1].
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from synthbrain.grids import Grid, get_grid


@dataclass(frozen=True, eq=False)
class Template:
    grid: Grid
    t1: np.ndarray            # normalised T1 in [0, 1] (99.5th percentile of brain voxels = 1)
    gm: np.ndarray            # grey-matter fraction
    wm: np.ndarray            # white-matter fraction
    csf: np.ndarray           # CSF fraction inside the brain mask (ventricles included)
    brain: np.ndarray         # brain-mask fraction (GM + WM + CSF)
    ventricles: np.ndarray    # CSF fraction inside the ventricles
    ventricle_region: np.ndarray  # bool: where ventricles are measured
    search_mask: np.ndarray   # bool: dilated brain mask
    depth: np.ndarray         # mm from the brain-mask surface (0 outside)
    deep_gm: np.ndarray       # bool: grey matter > 0.8, > 25 mm deep, > 12 mm from ventricles and the fissure
    deep_wm: np.ndarray       # bool: white matter > 0.95, > 15 mm deep (reference WM intensity)
    tissue_intensity: tuple[float, float, float]  # median T1 of pure (> 0.9) CSF, GM, WM

    @property
    def centroid_mm(self) -> np.ndarray:
        """Centre of mass of the brain mask, world mm (RAS)."""
        com = np.array(ndi.center_of_mass(self.brain))
        return self.grid.voxel_to_world(com[None])[0]

    def volume_ml(self, fraction: np.ndarray) -> float:
        return float(fraction.sum(dtype=np.float64) * self.grid.voxel_volume_ml)

    @property
    def brain_volume_ml(self) -> float:
        """Grey + white matter, mL."""
        return self.volume_ml(self.gm + self.wm)

    @property
    def ventricular_volume_ml(self) -> float:
        return self.volume_ml(self.ventricles)

    @property
    def intracranial_volume_ml(self) -> float:
        return self.volume_ml(self.brain)


def _nilearn_images():
    """(t1, gm, wm, mask) as nibabel images, from files inside the nilearn package."""
    import nibabel as nib
    from nilearn import datasets

    return (nib.load(datasets.MNI152_FILE_PATH), nib.load(datasets.GM_MNI152_FILE_PATH),
            nib.load(datasets.WM_MNI152_FILE_PATH), datasets.load_mni152_brain_mask(resolution=1))


MIDLINE_MM = 4.0  # half width of the band round x = 0 where the interhemispheric fissure lies
# the third ventricle: the CSF slit on the midline between the anterior and posterior commissures,
# under the fornix and above the hypothalamus (MNI mm; the template blurs it to a few mm wide)
_THIRD_VENTRICLE_MM = {"x": (-5.0, 5.0), "y": (-28.0, 2.0), "z": (-10.0, 10.0)}


def fissure_mask(wm: np.ndarray, x_mm: np.ndarray, half_width_mm: float = MIDLINE_MM) -> np.ndarray:
    """bool (X, Y, Z): the interhemispheric fissure and the midline cisterns as seen from white
    matter ``wm`` (bool, RAS+ array whose first axis has the world x coordinates ``x_mm``): within
    ``half_width_mm`` of the midline, every voxel above the topmost white matter of its (x, y) column
    (the corpus callosum), and whole columns with no white matter (in front of the genu, behind the
    splenium). The third ventricle lies under the callosum and the fornix, so it is not in it; the
    lateral ventricles lie off the midline."""
    midline = np.abs(np.asarray(x_mm)) <= half_width_mm
    z = np.arange(wm.shape[2])
    top = np.where(wm.any(axis=2), wm.shape[2] - 1 - np.argmax(wm[:, :, ::-1], axis=2), -1)  # (X, Y)
    return (z[None, None, :] > top[:, :, None]) & midline[:, None, None]


def _ventricle_seed(csf: np.ndarray, mask: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Lateral + third ventricles at 1 mm (RAS+ ``affine`` with no rotation). Lateral: the CSF
    (> 0.5) components of > 2 mL deep (> 15 mm) in the brain whose centre lies within 25 mm of the
    midline and above z = 0, once the interhemispheric fissure (:func:`fissure_mask`) is taken out,
    so that neither the fissure nor the cisterns round the splenium (the velum interpositum, the
    quadrigeminal cistern), which touch the ventricles in the blurred template, count. Third: the
    largest CSF component of the midline slit box ``_THIRD_VENTRICLE_MM``, outside the fissure."""
    axes = [affine[i, 3] + affine[i, i] * np.arange(csf.shape[i]) for i in range(3)]
    fissure = fissure_mask(wm, axes[0])
    depth = ndi.distance_transform_edt(mask)
    cand = (csf > 0.5) & (depth > 15) & ~fissure
    lab, n = ndi.label(cand)
    if n == 0:
        return np.zeros_like(cand)
    idx = np.arange(1, n + 1)
    sizes = ndi.sum(cand, lab, idx)
    centres = np.array(ndi.center_of_mass(cand, lab, idx)).reshape(-1, 3)
    world = centres @ affine[:3, :3].T + affine[:3, 3]
    seed = np.isin(lab, idx[(sizes > 2000) & (np.abs(world[:, 0]) < 25) & (world[:, 2] > 0)])
    box = np.ones(csf.shape, bool)
    for i, name in enumerate("xyz"):
        lo, hi = _THIRD_VENTRICLE_MM[name]
        inside = (axes[i] >= lo) & (axes[i] <= hi)
        box &= inside.reshape([-1 if j == i else 1 for j in range(3)])
    lab3, n3 = ndi.label((csf > 0.5) & box & ~fissure)
    if n3:
        seed |= lab3 == 1 + int(np.argmax(ndi.sum(lab3 > 0, lab3, np.arange(1, n3 + 1))))
    return seed


def load_template(grid: Grid | str) -> Template:
    """The template on ``grid``: computed once per machine (about 6 s for the demo grid) and kept in
    the on-disk cache (synthbrain.cache), then held once per process."""
    # cache by the Grid, so that "demo" and DEMO share one entry
    return _load_template(get_grid(grid))


@lru_cache(maxsize=3)
def _load_template(grid: Grid) -> Template:
    from synthbrain.cache import cached_arrays

    key = f"template-{grid.name}-{'x'.join(map(str, grid.shape))}-{grid.spacing:g}mm"
    from synthbrain.data import preprocess

    a = cached_arrays(key, lambda: _build_template_arrays(grid), depends_on=(sys.modules[__name__], preprocess))
    return Template(grid=grid, t1=a["t1"], gm=a["gm"], wm=a["wm"], csf=a["csf"], brain=a["brain"],
                    ventricles=a["ventricles"], ventricle_region=a["ventricle_region"], search_mask=a["search_mask"],
                    depth=a["depth"], deep_gm=a["deep_gm"], deep_wm=a["deep_wm"],
                    tissue_intensity=tuple(float(v) for v in a["tissue_intensity"]))


def _build_template_arrays(grid: Grid) -> dict[str, np.ndarray]:
    from synthbrain.data.preprocess import resample_to_grid

    t1_img, gm_img, wm_img, mask_img = _nilearn_images()
    affine = t1_img.affine
    mask1 = np.asarray(mask_img.get_fdata() > 0)
    gm1 = np.asarray(gm_img.get_fdata(), dtype=np.float32) / 255.0 * mask1
    wm1 = np.asarray(wm_img.get_fdata(), dtype=np.float32) / 255.0 * mask1
    tissue = gm1 + wm1
    over = tissue > 1.0
    gm1[over] /= tissue[over]
    wm1[over] /= tissue[over]
    csf1 = np.clip(mask1 - gm1 - wm1, 0.0, 1.0)
    seed = _ventricle_seed(csf1, mask1, wm1 > 0.5, affine)
    # the seed is CSF > 0.5; one voxel more catches the partial-volume rim
    vent1 = csf1 * ndi.binary_dilation(seed, iterations=1)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    t1 /= float(np.percentile(t1[mask1], 99.5))

    def on_grid(a: np.ndarray) -> np.ndarray:
        return np.clip(resample_to_grid(a, affine, grid), 0.0, None)

    gm, wm, csf, brain, vent = (on_grid(a) for a in (gm1, wm1, csf1, mask1.astype(np.float32), vent1))
    t1g = np.clip(on_grid(t1), 0.0, 1.0)
    brain = np.clip(brain, 0.0, 1.0)
    inside = brain > 0.5
    depth = ndi.distance_transform_edt(inside) * grid.spacing
    dist_to_vent = ndi.distance_transform_edt(vent < 0.5) * grid.spacing
    # sulcal and cisternal CSF (the interhemispheric fissure above all) must not count as ventricle
    other_csf = ndi.distance_transform_edt((csf - vent) < 0.3) * grid.spacing
    region = (dist_to_vent <= 12.0) & (depth > 8.0) & ((other_csf > 4.0) | (dist_to_vent == 0))
    search = ndi.distance_transform_edt(~inside) * grid.spacing <= 6.0
    # deep grey matter is the nuclei (caudate, putamen, thalamus), not the cingulate cortex along the
    # interhemispheric fissure, which is as deep but blurred with the fissure's CSF in the template
    midline_csf = fissure_mask(wm > 0.5, grid.axis_mm(0)) & (csf > 0.3)
    off_midline = ndi.distance_transform_edt(~midline_csf) * grid.spacing > 12.0
    pure = np.array([np.median(t1g[f > 0.9]) for f in (csf, gm, wm)], dtype=np.float64)
    return {"t1": t1g, "gm": gm, "wm": wm, "csf": np.minimum(csf, brain), "brain": brain,
            "ventricles": np.minimum(vent, csf), "ventricle_region": region, "search_mask": search,
            "depth": depth.astype(np.float32),
            "deep_gm": (gm > 0.8) & (depth > 25.0) & (dist_to_vent > 12.0) & off_midline,
            "deep_wm": (wm > 0.95) & (depth > 15.0), "tissue_intensity": pure}
