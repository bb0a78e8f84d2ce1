"""Prepare real scans: a native-space, whole-head T1 -> a brain-extracted volume in MNI152 space on a grid.

``synthbrain prepare`` runs, per subject, each step with the field's own library:

1. N4 bias-field correction (SimpleITK), fitted at about 6 mm inside an Otsu head mask and divided
   out at the scan's own resolution;
2. brain extraction with deepbet (its networks ship inside its wheel; nothing is downloaded); when
   deepbet is not installed or finds an implausible brain (< 600 or > 2500 mL) the MNI152 brain
   mask, mapped through the registration, is used instead and the QC flags say so;
3. rigid, then affine registration of the extracted brain to the MNI152 2009 template (SimpleITK
   ``ImageRegistrationMethod``: Mattes mutual information, 8 to 2 mm, on the 2 mm template whatever
   the output grid);
4. resampling onto the grid (anti-aliased like :func:`synthbrain.data.preprocess.resample_to_grid`)
   and the project's intensity normalisation (:func:`synthbrain.data.preprocess.preprocess`).

Outputs are a BIDS derivative dataset: the preprocessed T1w (the file name and sidecar
:class:`synthbrain.data.bids.BIDSDataset` reads, so a prepared dataset trains as it is), its brain
mask, the transform (ITK ``.tfm``: MNI152 LPS mm -> subject LPS mm; resampling a result back onto
the scan needs subject -> MNI, ``sitk.Resample(mni_image, subject_image, transform.GetInverse())``, which
is what :func:`to_subject_space` does), a QC picture per subject and ``prepare-qc.tsv``.

Every output is a ``real`` volume (:mod:`synthbrain.export`): the NIfTI descriptions, the sidecars
(``Provenance``) and ``dataset_description.json`` say so, and nothing written names the input file: a
loose file not named ``sub-<id>...`` gets an opaque label (``sub-`` and a digest of its bytes), and the
sidecars identify the input by a digest only (``SourceFingerprint``).

:func:`check_prepared` is the one test of whether a volume is ready for a model, used by every door
(reconstruct, measure, training data, the app's uploads): its field of view must hold the MNI brain,
a rigid fit to the template (at 6 mm, a fraction of a second) must be within 5 degrees and 6 mm of
identity, its brain-masked correlation with the template must not be low, and there must be no
bright tissue (skull, scalp) outside the dilated template brain.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from synthbrain.cache import code_hash
from synthbrain.errors import DatasetError, InvalidVolumeError, SynthBrainError, UnpreparedVolumeError
from synthbrain.grids import DEMO, SPACE, Grid, get_grid
from synthbrain.io import Volume

OnStep = Callable[[int, int, dict], None]

# ------------------------------------------------------------------------------------------ check

# 6 mm over a wider field of view than the grids (room for a scalp all round): the check's own grid
CHECK_GRID = Grid("check", (34, 43, 34), 6.0, (-97.0, -139.0, -87.0))
MAX_ROTATION_DEG = 5.0         # phantom subjects fit within 1 degree, the template rotated 6 degrees does not
MAX_SHIFT_MM = 6.0             # phantom subjects (head size varies about the brain's centre) within 3.5 mm
MIN_CORRELATION = 0.3          # brain-masked, as placed; phantom subjects >= 0.45, a non-brain or a T2 far below
MIN_COVERAGE = 0.9             # share of the MNI brain inside the image's field of view
OUTSIDE_MARGIN_MM = 10.0       # "outside the brain" = more than this beyond the template brain mask
OUTSIDE_LEVEL = 0.25           # bright = above this share of the brain's robust maximum
MAX_OUTSIDE_ML = 20.0          # a scalp is hundreds of mL; residual dura a few
SCREEN_CORRELATION = 0.95      # at or above this the volume is the template's own placement: no rigid fit


@dataclass(frozen=True)
class Preparedness:
    """How far a volume is from being ready for a model; ``reasons`` is empty when it is."""

    coverage: float                # share of the MNI152 brain inside the volume's field of view
    correlation: float | None      # brain-masked Pearson r with the template, as placed (6 mm)
    rotation_deg: float | None     # rigid fit to the template: rotation (degrees) ...
    shift_mm: float | None         # ... and displacement of the brain's centre (mm)
    outside_ml: float | None       # bright tissue > 10 mm outside the template brain (mL)
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"coverage": self.coverage, "correlation": self.correlation, "rotation_deg": self.rotation_deg,
                "shift_mm": self.shift_mm, "outside_ml": self.outside_ml, "reasons": list(self.reasons)}


@lru_cache(maxsize=1)
def _check_reference():
    """(template, brain mask, fit mask, outside region) on CHECK_GRID."""
    from synthbrain.data.template import load_template

    tmpl = load_template(CHECK_GRID)
    brain = tmpl.brain > 0.5
    dist = ndi.distance_transform_edt(~brain) * CHECK_GRID.spacing
    return tmpl, brain, dist <= 8.0, dist > OUTSIDE_MARGIN_MM


def _coverage(volume: Volume, brain: np.ndarray) -> float:
    ijk = np.argwhere(brain)
    world = CHECK_GRID.voxel_to_world(ijk)
    inv = np.linalg.inv(volume.affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((vox >= -0.5) & (vox <= np.array(volume.shape) - 0.5), axis=1)
    return float(inside.mean())


def check_prepared(volume: Volume, grid: Grid | str | None = None, whole_head: bool = False) -> Preparedness:
    """Whether ``volume`` (any grid, RAS) is a brain-extracted T1 aligned to MNI152 space.

    ``grid`` is accepted for symmetry with the other entry points; the check always runs on its own
    6 mm grid, so its figures do not depend on the model's grid. ``whole_head``: for a model trained on
    whole heads (not skull-stripped), skull and scalp are expected, so bright tissue outside the brain
    is measured but not a reason; the placement checks stand.
    """
    from synthbrain.data.preprocess import resample_to_grid

    tmpl, brain, fit_mask, outside = _check_reference()
    reasons: list[str] = []
    coverage = _coverage(volume, brain)
    centre = volume.affine[:3, :3] @ ((np.array(volume.shape) - 1) / 2.0) + volume.affine[:3, 3]
    if coverage < MIN_COVERAGE:
        far = float(np.linalg.norm(centre - tmpl.centroid_mm))
        reasons.append(f"its field of view holds only {100 * coverage:.0f} % of the MNI152 brain (its affine puts "
                       f"the image's centre {far:.0f} mm from the brain's): it is not in MNI space")
    data = np.clip(resample_to_grid(volume.data, volume.affine, CHECK_GRID), 0.0, None)
    region = fit_mask & (data > 0)
    if region.sum() < 100:
        reasons.append("the image is empty inside the MNI152 brain region")
        return Preparedness(coverage, None, None, None, None, tuple(reasons))
    data = data / float(np.percentile(data[region], 99.5))
    outside_ml = float((data[outside] > OUTSIDE_LEVEL).sum()) * CHECK_GRID.voxel_volume_ml
    r = float(np.corrcoef(data[brain], tmpl.t1[brain])[0, 1]) if data[brain].std() > 0 else 0.0
    rotation = shift = None
    if coverage >= 0.5:
        rotation, shift = (0.0, 0.0) if r >= SCREEN_CORRELATION else _rigid_offset(data, tmpl, fit_mask)
    if r < MIN_CORRELATION:
        reasons.append(f"its brain-masked correlation with the MNI152 template is {r:.2f} (a prepared T1 has "
                       f"> {MIN_CORRELATION:g})")
    if rotation is not None and (rotation > MAX_ROTATION_DEG or shift > MAX_SHIFT_MM):
        reasons.append(f"it is {rotation:.0f} degrees and {shift:.0f} mm away from the MNI152 template (a rigid fit; "
                       f"a prepared scan is within {MAX_ROTATION_DEG:g} degrees and {MAX_SHIFT_MM:g} mm)")
    if outside_ml > MAX_OUTSIDE_ML and not whole_head:
        reasons.append(f"it has {outside_ml:.0f} mL of bright tissue more than {OUTSIDE_MARGIN_MM:g} mm outside the "
                       "MNI152 brain (skull or scalp: it is not brain-extracted, or not aligned)")
    return Preparedness(coverage, r, rotation, shift, outside_ml, tuple(reasons))


def require_prepared(volume: Volume, grid: Grid | str | None = None, whole_head: bool = False) -> Preparedness:
    """:func:`check_prepared`, raising :class:`UnpreparedVolumeError` (naming the file) when it fails."""
    p = check_prepared(volume, grid, whole_head=whole_head)
    if not p.ok:
        if whole_head:  # the model wants the head as it is: brain extraction would take away what it was trained on
            raise UnpreparedVolumeError(f"{volume.source or 'volume'}: not ready for this whole-head model: "
                                        f"{'; '.join(p.reasons)}. It needs a whole-head T1 rigidly aligned to "
                                        "MNI152 space")
        raise UnpreparedVolumeError(f"{volume.source or 'volume'}: not prepared: {'; '.join(p.reasons)}. Run "
                                    "`synthbrain prepare` on it first (bias correction, brain extraction, "
                                    "registration to MNI152)")
    return p


def _rigid_offset(data: np.ndarray, tmpl, fit_mask: np.ndarray) -> tuple[float, float]:
    """(rotation in degrees, shift of the template's brain centre in mm) of a rigid fit of ``data``
    (on CHECK_GRID) to the template: correlation metric, moment-initialised."""
    import SimpleITK as sitk

    fixed = to_sitk(tmpl.t1, CHECK_GRID.affine)
    moving = to_sitk(data, CHECK_GRID.affine)
    mask = sitk.Cast(to_sitk(fit_mask.astype(np.float32), CHECK_GRID.affine), sitk.sitkUInt8)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=100)
    reg.SetOptimizerScalesFromPhysicalShift()
    try:
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg.SetInitialTransform(init, inPlace=False)
        t = reg.Execute(fixed, moving)
    except RuntimeError:  # ITK gives up (e.g. nothing of the image overlaps the template): far off
        return math.inf, math.inf
    return _rotation_and_shift(t, tmpl.centroid_mm)


def _rotation_and_shift(transform, centre_ras: np.ndarray) -> tuple[float, float]:
    """Rotation angle (degrees, of the linear part's closest rotation) and how far ``centre_ras`` moves (mm)."""
    if hasattr(transform, "GetNumberOfTransforms") and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    m = np.array(transform.GetMatrix()).reshape(3, 3)
    u, _, vt = np.linalg.svd(m)
    rot = u @ vt
    angle = math.degrees(math.acos(float(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))))
    c = _LPS3 @ np.asarray(centre_ras, float)
    return angle, float(np.linalg.norm(np.array(transform.TransformPoint(tuple(c))) - c))


# ------------------------------------------------------------------------------- SimpleITK bridge

_LPS3 = np.diag([-1.0, -1.0, 1.0])
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS mm <-> LPS mm (ITK's world)


def to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of ``data`` (X, Y, Z) whose voxel -> world (RAS mm) map is ``affine``."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)))
    lps = _LPS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    return img


def from_sitk(img) -> np.ndarray:
    """(X, Y, Z) float32 array of a SimpleITK image."""
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0)).astype(np.float32, copy=False)


def _grid_image(grid: Grid):
    return to_sitk(np.zeros(grid.shape, np.float32), grid.affine)


# --------------------------------------------------------------------------------------- pipeline

EXTRACTORS = ("auto", "deepbet", "template")
BRAIN_ML = (600.0, 2500.0)       # a plausible extracted brain (intracranial, mL)
AFFINE_SCALES = (0.67, 1.5)      # an affine outside this scaling range is refused (rigid kept)
# what prepare_volume's on_step names, in order
STEPS = ("N4 bias-field correction", "brain extraction", "registration to MNI152", "resampling onto the grid",
         "quality check")


@dataclass(frozen=True, eq=False)
class Prepared:
    """A prepared scan: ``volume`` on the grid in [0, 1] (zero outside the brain), its ``mask``, the
    ``transform`` (SimpleITK, MNI LPS -> subject LPS), the input as its header places it on the
    grid (``before``, for pictures) and the QC figures."""

    volume: Volume
    mask: np.ndarray
    transform: Any
    before: Volume
    qc: dict
    info: dict = field(default_factory=dict)


def deepbet_available() -> bool:
    try:
        import deepbet  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=2)
def _deepbet(no_gpu: bool):
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=no_gpu)


def _n4(img, spacing: float):
    """N4 bias correction fitted at about 6 mm inside an Otsu head mask (two fitting levels), divided out
    at full resolution. On a field of +-30 % it leaves about 2.5 % (log-intensity s.d.)."""
    import SimpleITK as sitk

    shrink = max(1, int(round(6.0 / spacing)))
    small = sitk.Shrink(img, [shrink] * 3) if shrink > 1 else img
    head = sitk.OtsuThreshold(small, 0, 1, 200)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 50])
    n4.Execute(small, head)
    log_bias = n4.GetLogBiasFieldAsImage(img)
    return sitk.Cast(img / sitk.Exp(log_bias), sitk.sitkFloat32)


def _extract(data: np.ndarray, affine: np.ndarray, device: str) -> np.ndarray | None:
    """deepbet's brain mask (bool, same array), or None when deepbet is not installed."""
    if not deepbet_available():
        return None
    import nibabel as nib

    bet = _deepbet(device == "cpu")
    _, mask, _ = bet.run(nib.Nifti1Image(data, affine))
    return np.asarray(mask.dataobj) > 0


def _register(fixed, fixed_mask, moving):
    """Rigid (versor; 8 and 4 mm) then affine (4 and 2 mm); Mattes MI on 8 % of the template's brain
    region. Returns (transform, final metric, notes)."""
    import SimpleITK as sitk

    def method(shrink, sigma):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.08, seed=1)
        reg.SetMetricFixedMask(fixed_mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=100,
                                                     relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel(sigma)
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return reg

    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid_reg = method([4, 2], [2, 1])
    rigid_reg.SetInitialTransform(init, inPlace=True)
    rigid_reg.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(init.GetCenter())
    affine.SetMatrix(init.GetMatrix())
    affine.SetTranslation(init.GetTranslation())
    rigid = sitk.AffineTransform(affine)
    affine_reg = method([2, 1], [1, 0])
    affine_reg.SetInitialTransform(affine, inPlace=True)
    affine_reg.Execute(fixed, moving)
    scales = np.linalg.svd(np.array(affine.GetMatrix()).reshape(3, 3), compute_uv=False)
    if scales.min() < AFFINE_SCALES[0] or scales.max() > AFFINE_SCALES[1]:
        return rigid, float(rigid_reg.GetMetricValue()), ["affine refused (implausible scaling); rigid kept"]
    return affine, float(affine_reg.GetMetricValue()), []


def prepare_volume(volume: Volume, grid: Grid | str = "demo", *, brain_extraction: str = "auto",
                   device: str = "cpu", on_step: OnStep | None = None) -> Prepared:
    """Run the whole pipeline on one scan (RAS, any spacing and field of view) in memory.

    ``on_step(i, len(STEPS), {"step": STEPS[i]})`` as step ``i`` starts, and ``(len(STEPS), len(STEPS),
    {"step": "done"})`` at the end.
    """
    import SimpleITK as sitk

    from synthbrain.data.preprocess import preprocess, resample_to_grid
    from synthbrain.data.template import load_template

    def step(i: int) -> None:
        if on_step is not None:
            on_step(i, len(STEPS), {"step": STEPS[i] if i < len(STEPS) else "done"})

    grid = get_grid(grid)
    name = volume.source or "volume"
    if brain_extraction not in EXTRACTORS:
        raise SynthBrainError(f"brain extraction {brain_extraction!r}: choose one of {', '.join(EXTRACTORS)}")
    if brain_extraction == "deepbet" and not deepbet_available():
        raise SynthBrainError("brain extraction 'deepbet' asked for but deepbet is not installed "
                              "(pip install deepbet), or use --brain-extraction template")
    spacing = float(min(volume.spacing))
    data = np.clip(volume.data, 0.0, None)
    if not np.any(data > 0):
        raise InvalidVolumeError(f"{name}: the image is empty (no positive intensities)")
    flags: list[str] = []
    step(0)
    try:
        corrected = _n4(to_sitk(data, volume.affine), spacing)
    except RuntimeError as e:
        raise InvalidVolumeError(f"{name}: N4 bias correction failed ({_first_line(e)})") from None
    corrected_np = from_sitk(corrected)

    mask_native = None
    step(1)
    if brain_extraction in ("auto", "deepbet"):
        try:
            mask_native = _extract(corrected_np, volume.affine, device)
        except RuntimeError as e:  # torch's errors (out of memory, a CUDA fault) are RuntimeErrors
            raise InvalidVolumeError(f"{name}: brain extraction with deepbet failed ({_first_line(e)}); "
                                     "--brain-extraction template uses the MNI152 brain mask instead") from None
        if mask_native is not None:
            ml = float(mask_native.sum()) * float(np.prod(volume.spacing)) / 1000.0
            if not BRAIN_ML[0] <= ml <= BRAIN_ML[1]:
                flags.append(f"deepbet found {ml:.0f} mL of brain; template mask used")
                mask_native = None
        else:
            flags.append("deepbet not installed; template mask used")
    extractor = "deepbet" if mask_native is not None else "template"

    step(2)
    reg_tmpl = load_template(DEMO)
    fixed = to_sitk(reg_tmpl.t1, DEMO.affine)
    fixed_mask = sitk.Cast(to_sitk(reg_tmpl.search_mask.astype(np.float32), DEMO.affine), sitk.sitkUInt8)
    moving = corrected if mask_native is None else to_sitk(corrected_np * mask_native, volume.affine)
    try:
        transform, metric, notes = _register(fixed, fixed_mask, moving)
    except RuntimeError as e:
        raise InvalidVolumeError(f"{name}: registration to MNI152 failed ({_first_line(e)})") from None
    flags += notes

    step(3)
    # anti-alias in the scan's space (as resample_to_grid does), then one interpolation onto the grid
    sigma_vox = np.maximum(0.0, (grid.spacing / np.array(volume.spacing) - 1.0) / 2.0)
    source = corrected_np * mask_native if mask_native is not None else corrected_np
    if np.any(sigma_vox > 0.05):
        source = ndi.gaussian_filter(source, sigma=sigma_vox, mode="constant")
    ref = _grid_image(grid)
    tmpl = load_template(grid)
    try:
        on_grid = from_sitk(sitk.Resample(to_sitk(source, volume.affine), ref, transform, sitk.sitkLinear, 0.0))
        if mask_native is not None:
            mask = from_sitk(sitk.Resample(to_sitk(mask_native.astype(np.float32), volume.affine), ref, transform,
                                           sitk.sitkLinear, 0.0)) > 0.5
        else:
            mask = tmpl.brain > 0.5
    except RuntimeError as e:
        raise InvalidVolumeError(f"{name}: resampling onto the {grid.name} grid failed ({_first_line(e)})") from None
    on_grid = np.where(mask, on_grid, 0.0).astype(np.float32)
    pre, info = preprocess(Volume(on_grid, grid.affine, source=name), grid)
    mask &= pre.data > 0

    step(4)
    linear = np.array(transform.GetMatrix()).reshape(3, 3)  # MNI -> subject: subject mL = MNI mL * det
    brain_ml = float(mask.sum()) * grid.voxel_volume_ml * abs(float(np.linalg.det(linear)))
    inside = tmpl.brain > 0.5
    r = float(np.corrcoef(pre.data[inside], tmpl.t1[inside])[0, 1])
    rotation, shift = _rotation_and_shift(transform, tmpl.centroid_mm)
    check = check_prepared(pre)
    flags += list(check.reasons)
    if not BRAIN_ML[0] <= brain_ml <= BRAIN_ML[1]:
        flags.append(f"brain volume {brain_ml:.0f} mL is implausible")
    qc = {"registration_metric": -metric, "correlation": r, "brain_volume_ml": brain_ml,
          "input_rotation_deg": rotation, "input_shift_mm": shift, "brain_extraction": extractor,
          "flags": flags}
    before = resample_to_grid(data, volume.affine, grid)
    scale = float(np.percentile(before[before > 0], 99.5)) if np.any(before > 0) else 1.0
    before = Volume(np.clip(before / scale, 0.0, 1.0), grid.affine, source=name)
    step(len(STEPS))
    return Prepared(volume=pre, mask=mask, transform=transform, before=before, qc=qc, info=info.to_dict())


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


# ----------------------------------------------------------------------------------- the datasets

QC_TABLE = "prepare-qc.tsv"
QC_COLUMNS = ["subject", "status", "registration_metric", "correlation", "brain_volume_ml", "input_rotation_deg",
              "input_shift_mm", "brain_extraction", "flags"]


@dataclass(frozen=True)
class Job:
    label: str         # sub-<id>
    t1w: Path          # the input scan
    rel: str | None    # its path in its BIDS dataset (the sidecar's Sources); None for a loose file

    @property
    def name(self) -> str:
        """How messages and outputs name the input: a loose file's own name is never written."""
        return self.t1w.name if self.rel is not None else self.label


@dataclass(frozen=True)
class PrepareSummary:
    out: Path
    prepared: list[str]
    skipped: list[str]
    failed: dict[str, str]   # label -> message
    qc_table: Path
    labelled: dict[str, Path] = field(default_factory=dict)  # opaque label -> the loose file it stands for

    @property
    def total(self) -> int:
        return len(self.prepared) + len(self.skipped) + len(self.failed)


def output_paths(out: Path, label: str, grid: Grid) -> dict[str, Path]:
    """Where subject ``label``'s outputs go in the derivative dataset ``out``."""
    anat = out / label / "anat"
    stem = f"{label}_space-{SPACE}_res-{grid.res_label}"
    return {"t1w": anat / f"{stem}_desc-preproc_T1w.nii.gz",
            "mask": anat / f"{stem}_desc-brain_mask.nii.gz",
            "transform": anat / f"{label}_from-T1w_to-{SPACE}_mode-image_xfm.tfm",
            "qc": out / label / "figures" / f"{label}_res-{grid.res_label}_desc-prepare_T1w.png"}


def _plain_label(path: Path) -> str | None:
    m = re.match(r"sub-([A-Za-z0-9]+)", path.name)
    return f"sub-{m.group(1)}" if m else None


def _label_for_file(path: Path) -> str:
    """``sub-<id>`` of a file named ``sub-<id>...``; any other name (often a person's) is not used: the
    label is ``sub-`` and 12 hex digits of the file's SHA-256 (the same file gets the same label)."""
    plain = _plain_label(path)
    if plain is not None:
        return plain
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror}") from None
    return f"sub-{digest[:12]}"


def find_jobs(inputs: Sequence[Path]) -> list[Job]:
    """Subjects to prepare: every ``sub-*`` of a BIDS folder (its first T1w) and each file given."""
    from synthbrain.data.bids import find_t1w

    jobs: list[Job] = []
    for p in map(Path, inputs):
        if p.is_dir():
            subs = sorted(d.name for d in p.glob("sub-*") if d.is_dir())
            if not subs:
                raise DatasetError(f"{p}: no sub-* folders (expected a BIDS dataset)")
            for sub in subs:
                t1w = find_t1w(p, sub)
                jobs.append(Job(sub, t1w, str(t1w.relative_to(p))))
        elif p.is_file():
            jobs.append(Job(_label_for_file(p), p, None))
        else:
            raise DatasetError(f"{p}: no such file or folder")
    seen: dict[str, Path] = {}
    for j in jobs:
        if j.label in seen:
            raise DatasetError(f"{j.label}: two inputs map to this subject ({seen[j.label]} and {j.t1w}); "
                               "rename one (or drop a copy)")
        seen[j.label] = j.t1w
    return jobs


def default_out(inputs: Sequence[Path]) -> Path:
    """``<BIDS>/derivatives/synthbrain`` for one BIDS folder (where training looks for it)."""
    from synthbrain.data.bids import DERIVATIVE

    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        return Path(inputs[0]) / "derivatives" / DERIVATIVE
    raise DatasetError("give --out: outputs go beside a BIDS folder only when it is the one input")


def _fingerprint(t1w: Path, grid: Grid) -> str:
    """The digest :class:`synthbrain.data.bids.BIDSDataset` looks for (input file, grid, preprocessing code)."""
    from synthbrain.data.bids import _file_fingerprint

    return _file_fingerprint(t1w, grid)


def _extractor_key(brain_extraction: str) -> str:
    """What ``--brain-extraction`` resolves to on this installation (deepbet's version included)."""
    if brain_extraction == "template" or not deepbet_available():
        return f"{brain_extraction}:template"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{brain_extraction}:deepbet-{version('deepbet')}"
    except PackageNotFoundError:
        return f"{brain_extraction}:deepbet"


def _resume_key(t1w: Path, grid: Grid, brain_extraction: str) -> str:
    """What a subject's outputs depend on: the input file, the grid, the preprocessing code (all in
    :func:`_fingerprint`), the brain extraction asked for and this module's code."""
    text = f"{_fingerprint(t1w, grid)}|{_extractor_key(brain_extraction)}|{code_hash(sys.modules[__name__])}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _complete(job: Job, out: Path, grid: Grid, brain_extraction: str) -> dict | None:
    """The QC of a subject whose outputs exist and were made from this input, on this grid, with this
    brain extraction and this version of the code; else None."""
    paths = output_paths(out, job.label, grid)
    from synthbrain.io import sidecar_path

    side = sidecar_path(paths["t1w"])
    if not all(p.is_file() for p in paths.values()) or not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    prep = meta.get("Prepare") if isinstance(meta, dict) else None
    if not isinstance(prep, dict) or prep.get("ResumeKey") != _resume_key(job.t1w, grid, brain_extraction):
        return None
    return prep.get("QC")


def _public_message(e: Exception, job: Job) -> str:
    """One line; a loose file's name (in read errors) replaced by its label."""
    text = " ".join(str(e).split())
    if job.rel is None:
        text = text.replace(str(job.t1w), job.label).replace(job.t1w.name, job.label)
    return text


def _run_job(job: Job, out: Path, grid_name: str, brain_extraction: str, device: str) -> dict:
    """Prepare one subject and write its outputs (the sidecar last: it marks them complete)."""
    from dataclasses import replace

    from synthbrain.io import read_volume

    grid = get_grid(grid_name)
    try:
        vol = replace(read_volume(job.t1w), source=job.name)
        res = prepare_volume(vol, grid, brain_extraction=brain_extraction, device=device)
        _write_outputs(job, out, grid, brain_extraction, res)
    except SynthBrainError as e:
        return {"status": "failed", "error": _public_message(e, job)}
    return {"status": "prepared", "qc": res.qc}


def _write_outputs(job: Job, out: Path, grid: Grid, brain_extraction: str, res: Prepared) -> None:
    """The transform, mask, QC picture and prepared T1w (with the sidecar that marks them complete), all
    through :mod:`synthbrain.export`'s ``real`` kind. A write that fails is a :class:`DatasetError`."""
    import SimpleITK as sitk

    from synthbrain import __version__
    from synthbrain.data.template import load_template
    from synthbrain.export import REAL, kind, sidecar
    from synthbrain.io import atomic_write, write_volume
    from synthbrain.viz.slices import rows_png

    real = kind(REAL)
    paths = output_paths(out, job.label, grid)
    anat = paths["t1w"].parent
    q = res.qc
    sources = {"Sources": [job.rel]} if job.rel is not None else {}
    fields = {"SourceFingerprint": _fingerprint(job.t1w, grid), **sources, "SpatialReference": SPACE, **res.info,
              "Prepare": {"Version": __version__, "ResumeKey": _resume_key(job.t1w, grid, brain_extraction),
                          "BrainExtractionAsked": brain_extraction, "QC": q,
                          "Steps": ["N4 bias-field correction (SimpleITK)",
                                    f"brain extraction ({q['brain_extraction']})",
                                    "rigid + affine registration to MNI152 2009 (SimpleITK, Mattes MI)",
                                    f"resampling to the {grid.name} grid", "intensity normalisation"],
                          "Transform": str(paths["transform"].relative_to(anat)),
                          "TransformDirection": "MNI152 (LPS mm) -> subject (LPS mm), ITK convention",
                          "Mask": paths["mask"].name,
                          "QCImage": str(paths["qc"].relative_to(out / job.label))}}
    side = sidecar(REAL, fields)  # refuses identifying keys before anything is written
    mask_side = sidecar(REAL, {"Type": "Brain", "SpatialReference": SPACE, **sources})
    png = rows_png([("input, placed by its header", res.before), ("prepared", res.volume),
                    ("MNI152 template", Volume(load_template(grid).t1, grid.affine))],
                   title=f"{job.label}, {real.title}: r = {q['correlation']:.3f} with the template, brain "
                         f"{q['brain_volume_ml']:.0f} mL, input {q['input_rotation_deg']:.1f} deg / "
                         f"{q['input_shift_mm']:.1f} mm off MNI",
                   footer="; ".join(q["flags"]) or "no flags", width_px=900)
    target = paths["transform"]
    try:
        anat.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp.tfm")
        try:
            sitk.WriteTransform(res.transform, str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        target = paths["mask"]
        write_volume(target, Volume(res.mask.astype(np.float32), grid.affine), dtype="uint8",
                     description="SynthBrain REAL brain mask (prepared input)", sidecar=mask_side)
        target = paths["qc"]
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, png)
        target = paths["t1w"]
        write_volume(target, res.volume, description=real.description, sidecar=side)
    except OSError as e:
        raise DatasetError(f"{job.label}: cannot write {target.relative_to(out)}: {e.strerror or e}") from None
    except RuntimeError as e:  # ITK's WriteTransform
        raise DatasetError(f"{job.label}: cannot write {target.relative_to(out)}: {_first_line(e)}") from None


def _worker_init(threads: int) -> None:
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _threads_per_job(jobs: int) -> int:
    n = max(1, (os.cpu_count() or 1) // jobs)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(env)) if env.isdigit() and int(env) > 0 else n


def prepare_dataset(inputs: Sequence[str | Path], out: str | Path | None = None, grid: Grid | str = "demo", *,
                    jobs: int = 1, brain_extraction: str = "auto", device: str = "cpu",
                    on_step: OnStep | None = None) -> PrepareSummary:
    """Prepare every subject of ``inputs`` (BIDS folders and/or NIfTI files) into the derivative
    dataset ``out`` (default: ``<BIDS>/derivatives/synthbrain``), ``jobs`` subjects at a time.

    Subjects whose outputs are complete for the same input, grid, brain extraction and code are
    skipped; a subject that fails (a typed error, or its worker process killed) is recorded with its
    message and the others go on. ``on_step(i, n, {"subject", "status"})`` after each subject. The QC
    table (``out/prepare-qc.tsv``) lists every subject of this run. A loose file not named ``sub-*``
    is labelled by a digest; the summary's ``labelled`` says which file each such label stands for
    (nothing written says it).
    """
    from synthbrain.data.bids import tsv_text
    from synthbrain.io import atomic_write

    grid = get_grid(grid)
    if brain_extraction not in EXTRACTORS:
        raise SynthBrainError(f"--brain-extraction {brain_extraction!r}: choose one of {', '.join(EXTRACTORS)}")
    if jobs < 1:
        raise SynthBrainError(f"--jobs must be at least 1, got {jobs}")
    job_list = find_jobs([Path(p) for p in inputs])
    out = Path(out) if out is not None else default_out([Path(p) for p in inputs])
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_description(out)
    rows: dict[str, dict] = {}
    prepared, skipped, failed = [], [], {}
    todo = []
    n = len(job_list)
    for job in job_list:
        qc = _complete(job, out, grid, brain_extraction)
        if qc is not None:
            rows[job.label] = {"subject": job.label, "status": "skipped (complete)", **qc}
            skipped.append(job.label)
        else:
            todo.append(job)
    done = len(skipped)
    if on_step is not None and done:
        on_step(done, n, {"subject": skipped[-1], "status": "skipped"})

    def record(job: Job, result: dict) -> None:
        nonlocal done
        done += 1
        if result["status"] == "failed":
            failed[job.label] = result["error"]
            rows[job.label] = {"subject": job.label, "status": "failed", "flags": [result["error"]]}
        else:
            prepared.append(job.label)
            rows[job.label] = {"subject": job.label, "status": "prepared", **result["qc"]}
        if on_step is not None:
            on_step(done, n, {"subject": job.label, "status": result["status"]})

    args = (out, grid.name, brain_extraction, device)
    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            record(job, _run_job(job, *args))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        # a worker killed (out of memory, a signal) breaks the pool: its subject and those not yet
        # finished fail by name, the QC table is still written, and a run again retries them
        died = {"status": "failed", "error": "not prepared: a worker process died during the run (killed, e.g. "
                                             "out of memory); run prepare again to retry"}
        # spawn: a forked child would inherit the parent's torch / ITK thread pools in whatever state
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx, initializer=_worker_init,
                                 initargs=(_threads_per_job(jobs),)) as pool:
            futures = {}
            for job in todo:
                try:
                    futures[pool.submit(_run_job, job, *args)] = job
                except BrokenProcessPool:
                    record(job, died)
            for f in as_completed(futures):
                try:
                    result = f.result()
                except BrokenProcessPool:
                    result = died
                record(futures[f], result)

    table = out / QC_TABLE
    ordered = [_qc_row(rows[j.label]) for j in job_list]
    atomic_write(table, tsv_text(ordered, QC_COLUMNS))
    order = [j.label for j in job_list]  # subjects finish in any order; report them in input order
    return PrepareSummary(out, sorted(prepared, key=order.index), skipped,
                          {k: failed[k] for k in order if k in failed}, table,
                          {j.label: j.t1w for j in job_list if j.rel is None and j.label != _plain_label(j.t1w)})


def _write_description(out: Path) -> None:
    """``dataset_description.json`` of a ``real`` dataset (:func:`synthbrain.export.dataset_description`);
    a folder that holds another kind of dataset is refused."""
    from synthbrain import __version__
    from synthbrain.export import REAL, dataset_description
    from synthbrain.io import atomic_write

    desc = out / "dataset_description.json"
    old = None
    if desc.is_file():
        try:
            old = json.loads(desc.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = None
    kind_there = old.get("Provenance") if isinstance(old, dict) else None
    if kind_there == REAL:
        return
    if kind_there is not None:
        raise DatasetError(f"{out}: holds a {kind_there} dataset; prepared real scans go to a folder of their own")
    atomic_write(desc, json.dumps(dataset_description(REAL, "SynthBrain prepared T1w",
                                                       {"Name": "synthbrain prepare", "Version": __version__}),
                                  indent=2) + "\n")


_QC_FORMATS = {"registration_metric": "{:.4f}", "correlation": "{:.4f}", "brain_volume_ml": "{:.1f}",
               "input_rotation_deg": "{:.2f}", "input_shift_mm": "{:.2f}"}


def _qc_row(row: dict) -> dict:
    """A QC table row: numbers at their precision, flags joined (``none`` when there are none)."""
    out = {k: (_QC_FORMATS[k].format(v) if k in _QC_FORMATS and v is not None else v) for k, v in row.items()}
    out["flags"] = "; ".join(row.get("flags") or []) or "none"
    return out


# ------------------------------------------------------------------------------------ map it back


def to_subject_space(volume: Volume, transform_path: str | Path, reference: Volume, *, order: int = 1) -> Volume:
    """Resample ``volume`` (MNI space, e.g. a reconstruction or a label map) onto the scan
    ``reference`` with the saved transform of ``synthbrain prepare`` (``order`` 0 for labels)."""
    import SimpleITK as sitk

    t = sitk.ReadTransform(str(transform_path))
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    # the .tfm maps MNI -> subject; resampling onto the subject grid needs subject -> MNI
    out = sitk.Resample(to_sitk(volume.data, volume.affine), to_sitk(np.zeros(reference.shape), reference.affine),
                        t.GetInverse(), interp, 0.0)
    return Volume(from_sitk(out), reference.affine, source=volume.source)
