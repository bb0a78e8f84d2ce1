"""Phantom demo cohort: synthetic subjects made from the MNI152 template, with known volumes.

Every subject is the template pushed through a documented ageing model. The random parameters of a
subject are drawn first (:func:`sample_subject`, from a generator seeded by the cohort seed and the
subject's index), then handed to a deterministic renderer (:func:`render_subject`), so each subject's
sidecar records exactly what was done to it and the same seed gives the same cohort, byte for byte.

The ageing model (rates are round figures in line with the literature cited in docs/phantom.md):

- head size: a linear scale about the brain's centre, 0.885 (F) or 0.92 (M) of the template times
  an individual factor exp(N(0, 0.03)): male brains ~12 % larger by volume (Ruigrok et al. 2014);
- brain atrophy relative to age 40: 0.2 %/year rising by 0.006 %/year per year of age, i.e. 0.2 %/y
  at 40, ~0.4 %/y at 70, 0.5 %/y at 90 (Scahill et al. 2003; Fotenos et al. 2005; Fjell et al.
  2009), plus 3 % (MCI) or 6 % (AD) extra (Fox & Freeborough 1997; Sluimer et al. 2008), plus
  N(0, 1.5 %) individual variation;
- ventricles: log-volume rising by 0.015/year plus 0.0002/year^2 after 40 (about 2.5x between
  40 and 80; Kaye et al. 1992; Apostolova et al. 2012), x1.19 (MCI) or x1.42 (AD) (Nestor et al.
  2008), with individual log-normal variation (sd 0.25);
- ventricular enlargement is a smooth, invertible deformation (a stationary velocity field along
  the normal of the ventricles, integrated with MONAI's ``DVF2DDF``) that pushes the surrounding
  tissue outward; cortical atrophy thins grey matter into CSF (a partial-volume change of the
  image and the tissue maps) with an individual, smooth regional pattern;
- individual anatomy: a smooth random displacement field (Gaussian-filtered noise, 10 mm, 1-2.5 mm);
- acquisition: gamma contrast change, a smooth multiplicative bias field (Legendre polynomials of
  degree 2), Gaussian noise inside the head.

Label maps (GM, WM, CSF, ventricles as fractions) are deformed with the image, and the true volumes
are their sums. It is a phantom made from one template: say so wherever it is shown.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from synthbrain.grids import SPACE, Grid, get_grid

DIAGNOSES = ("CN", "MCI", "AD")
DISEASE_FACTOR = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}
HEAD_SCALE = {"F": 0.885, "M": 0.92}
DSEG_LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "ventricles"}
PHANTOM_NOTE = ("Phantom data: every subject is the MNI152 2009 template deformed by a simple ageing model. "
                "It is not a real person and not a realistic population.")
PREPARED_NOTE = "phantom made in MNI152 space by synthbrain cohort (brain only, aligned by construction)"
_LAMBDA_MM = 10.0        # decay length of the ventricular push into the surrounding tissue
_ALPHAS = (-3.0, -1.5, 0.0, 2.0, 4.0, 6.0, 8.0, 11.0)  # velocity magnitudes (mm) of the calibration table

OnStep = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class SubjectParams:
    """Everything random about one phantom subject; rendering these is deterministic."""

    participant_id: str
    age: float
    sex: str
    diagnosis: str
    head_scale: float
    brain_loss: float          # fraction of template brain volume lost to ageing + disease
    ventricle_ratio: float     # target ventricular volume / template's, before head scaling
    atrophy_pattern_seed: int
    elastic_seed: int
    elastic_mm: float
    gamma: float
    bias_coefficients: tuple[float, ...]
    noise_sd: float
    noise_seed: int


def expected_brain_loss(age: float, diagnosis: str) -> float:
    """Population-mean fraction of brain volume lost since age 40 (no individual variation)."""
    t = max(age - 40.0, 0.0)
    return 0.002 * t + 0.00003 * t * t + 0.06 * DISEASE_FACTOR[diagnosis]


def expected_log_ventricle_ratio(age: float, diagnosis: str) -> float:
    t = max(age - 40.0, 0.0)
    return 0.015 * t + 0.0002 * t * t + 0.35 * DISEASE_FACTOR[diagnosis] - math.log(1.45)


def sample_subject(seed: int, index: int, age_range: tuple[float, float] = (40.0, 90.0)) -> SubjectParams:
    """Draw subject ``index`` of the cohort with ``seed`` (independent of the cohort size)."""
    rng = np.random.default_rng([seed, index])
    age = float(np.round(rng.uniform(*age_range), 1))
    sex = "F" if rng.random() < 0.5 else "M"
    frac = (age - 40.0) / 50.0
    p_ad, p_mci = 0.02 + 0.18 * frac, 0.08 + 0.17 * frac
    u = rng.random()
    diagnosis = "AD" if u < p_ad else "MCI" if u < p_ad + p_mci else "CN"
    return SubjectParams(
        participant_id=f"{index + 1:04d}",
        age=age, sex=sex, diagnosis=diagnosis,
        head_scale=float(HEAD_SCALE[sex] * math.exp(rng.normal(0.0, 0.03))),
        brain_loss=float(np.clip(expected_brain_loss(age, diagnosis) + rng.normal(0.0, 0.015), 0.0, 0.4)),
        ventricle_ratio=float(math.exp(expected_log_ventricle_ratio(age, diagnosis) + rng.normal(0.0, 0.25))),
        atrophy_pattern_seed=int(rng.integers(2**31)),
        elastic_seed=int(rng.integers(2**31)),
        elastic_mm=float(rng.uniform(1.0, 2.5)),
        gamma=float(rng.uniform(0.85, 1.15)),
        bias_coefficients=tuple(float(c) for c in rng.normal(0.0, 0.04, size=9)),
        noise_sd=float(rng.uniform(0.005, 0.02)),
        noise_seed=int(rng.integers(2**31)),
    )


# --- deformation fields (voxel units, shape (3, X, Y, Z)) ------------------------------------------

def _smooth_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return f / (f.std() + 1e-8)


@lru_cache(maxsize=2)
def _ventricle_normal_field(grid: Grid) -> np.ndarray:
    """exp(-d/lambda) * grad(d): a unit-ish outward field around the ventricles, fading with the
    distance d from them and vanishing on their medial axis (voxel units per mm of velocity)."""
    from synthbrain.data.template import load_template

    tmpl = load_template(grid)
    inside = tmpl.ventricles > 0.3
    d = (ndi.distance_transform_edt(~inside) - ndi.distance_transform_edt(inside)) * grid.spacing
    d = ndi.gaussian_filter(d, 2.0 / grid.spacing)
    grad = np.stack(np.gradient(d, grid.spacing))
    fade = np.exp(-np.maximum(d, 0.0) / _LAMBDA_MM)
    return (grad * fade / grid.spacing).astype(np.float32)


def _ventricle_ddf(grid: Grid, alpha_mm: float) -> np.ndarray:
    """Backward displacement (voxels) that enlarges (alpha > 0) or shrinks the ventricles."""
    import torch
    from monai.networks.blocks import DVF2DDF

    field = _ventricle_normal_field(grid)
    # pulling the template back through exp(-v) pushes its tissue outward along v
    dvf = torch.from_numpy(-alpha_mm * field)[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*native grid_sample")  # MONAI says which backend it uses
        ddf = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(dvf)
    return ddf[0].numpy()


def _warp(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndi.map_coordinates(image, coords, order=1, mode="constant", cval=0.0, prefilter=False)


@lru_cache(maxsize=3)
def ventricle_calibration(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, log volume ratios): how much the ventricular deformation changes the template's
    ventricles, used to pick the velocity that gives a subject's target ventricle ratio (cached on disk)."""
    from synthbrain.cache import cached_arrays
    from synthbrain.data.template import load_template

    def build() -> dict[str, np.ndarray]:
        tmpl = load_template(grid)
        ident = np.indices(grid.shape, dtype=np.float32)
        base = tmpl.ventricles.sum(dtype=np.float64)
        ratios = [_warp(tmpl.ventricles, ident + _ventricle_ddf(grid, a)).sum(dtype=np.float64) / base
                  for a in _ALPHAS]
        return {"alphas": np.array(_ALPHAS), "log_ratios": np.log(np.array(ratios))}

    from synthbrain.data import preprocess, template

    a = cached_arrays(f"ventricle-calibration-{grid.name}-{'x'.join(map(str, grid.shape))}-{grid.spacing:g}mm", build,
                      depends_on=(sys.modules[__name__], template, preprocess))
    return a["alphas"], a["log_ratios"]


def _alpha_for_ratio(grid: Grid, ratio: float) -> float:
    alphas, log_ratios = ventricle_calibration(grid)
    order = np.argsort(log_ratios)
    return float(np.interp(math.log(ratio), log_ratios[order], alphas[order]))


def _bias_field(shape: tuple[int, int, int], coefficients: tuple[float, ...]) -> np.ndarray:
    """exp of a degree-2 Legendre polynomial over the volume (no constant term)."""
    from numpy.polynomial import legendre

    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    terms = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)]
    log_field = np.zeros(shape, dtype=np.float64)
    for c, (i, j, k) in zip(coefficients, terms):
        ci, cj, ck = np.eye(3)[i], np.eye(3)[j], np.eye(3)[k]
        log_field += c * (legendre.legval(axes[0], ci)[:, None, None] * legendre.legval(axes[1], cj)[None, :, None]
                          * legendre.legval(axes[2], ck)[None, None, :])
    return np.exp(log_field).astype(np.float32)


@dataclass(frozen=True, eq=False)
class PhantomSubject:
    params: SubjectParams
    t1: np.ndarray            # (X, Y, Z) float32, arbitrary units (brain ~0..1000)
    dseg: np.ndarray          # (X, Y, Z) uint8, labels DSEG_LABELS
    brain_volume_ml: float
    ventricular_volume_ml: float
    intracranial_volume_ml: float
    ventricle_alpha_mm: float
    atrophy_amount: float


def render_subject(params: SubjectParams, grid: Grid | str) -> PhantomSubject:
    """Deterministically render one phantom subject on ``grid``."""
    from synthbrain.data.template import load_template

    grid = get_grid(grid)
    tmpl = load_template(grid)
    shape = grid.shape

    # 1. backward map: subject voxel -> template voxel (head scale, then individual, then ventricles)
    centre = grid.world_to_voxel(tmpl.centroid_mm[None])[0].astype(np.float32)[:, None, None, None]
    coords = centre + (np.indices(shape, dtype=np.float32) - centre) / params.head_scale
    rng = np.random.default_rng(params.elastic_seed)
    elastic = np.stack([_smooth_noise(shape, 10.0 / grid.spacing, rng) for _ in range(3)])
    elastic *= params.elastic_mm / grid.spacing
    coords = coords + np.stack([_warp(e, coords) for e in elastic])
    alpha = _alpha_for_ratio(grid, params.ventricle_ratio)
    if alpha != 0.0:
        ddf = _ventricle_ddf(grid, alpha)
        coords = coords + np.stack([_warp(c, coords) for c in ddf])

    # 2. cortical atrophy in template space: remove the brain loss that ventricular growth did not
    rng = np.random.default_rng(params.atrophy_pattern_seed)
    pattern = np.clip(1.0 + 0.5 * _smooth_noise(shape, 15.0 / grid.spacing, rng), 0.2, 2.0)
    # cortical: fades within ~8 mm of the brain's surface, deep grey matter is spared
    weight = tmpl.gm * np.exp(-tmpl.depth / 8.0) * pattern
    brain_t = tmpl.brain_volume_ml
    vent_growth = tmpl.ventricular_volume_ml * (params.ventricle_ratio - 1.0)
    wanted = max(params.brain_loss * brain_t - vent_growth, 0.0)
    amount = wanted / (tmpl.volume_ml(tmpl.gm * weight) + 1e-9)
    atrophy = np.clip(amount * weight, 0.0, 0.9)

    # 3. pull the template's maps into the subject
    gm, wm, csf, brain, vent, t1, atr = (_warp(a, coords) for a in
                                         (tmpl.gm, tmpl.wm, tmpl.csf, tmpl.brain, tmpl.ventricles, tmpl.t1, atrophy))
    lost = gm * atr
    gm = gm - lost
    csf = csf + lost
    # grey matter turned into CSF darkens by the pure-tissue contrast of the template
    i_gm, i_csf = float(np.median(tmpl.t1[tmpl.gm > 0.9])), float(np.median(tmpl.t1[tmpl.csf > 0.9]))
    t1 = np.clip(t1 - lost * (i_gm - i_csf), 0.0, None)

    # 4. acquisition: contrast, bias field, noise inside the head
    head = brain > 0.5
    t1 = t1**params.gamma * _bias_field(shape, params.bias_coefficients)
    noise = np.random.default_rng(params.noise_seed).standard_normal(shape).astype(np.float32)
    t1 = np.where(head, np.clip(t1 + params.noise_sd * noise, 0.0, None), t1 * (t1 > 0.05))
    t1 = (1000.0 * t1).astype(np.float32)

    other_csf = np.clip(csf - vent, 0.0, None)
    stack = np.stack([np.clip(1.0 - brain, 0.0, None), other_csf, gm, wm, vent])
    dseg = np.argmax(stack, axis=0).astype(np.uint8)
    v = grid.voxel_volume_ml
    return PhantomSubject(params=params, t1=t1, dseg=dseg,
                          brain_volume_ml=float((gm + wm).sum(dtype=np.float64) * v),
                          ventricular_volume_ml=float(vent.sum(dtype=np.float64) * v),
                          intracranial_volume_ml=float(brain.sum(dtype=np.float64) * v),
                          ventricle_alpha_mm=alpha, atrophy_amount=float(amount))


PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "subject label"},
    "age": {"Description": "age at scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "diagnosis": {"Description": "phantom disease group (drives atrophy)",
                  "Levels": {"CN": "cognitively normal", "MCI": "mild cognitive impairment",
                             "AD": "Alzheimer's disease"}},
    "ventricular_volume": {"Description": "true lateral + third ventricle volume (sum of the deformed label fractions)",
                           "Units": "mL"},
    "brain_volume": {"Description": "true grey + white matter volume (sum of the deformed label fractions)",
                     "Units": "mL"},
    "intracranial_volume": {"Description": "true brain-mask volume (GM + WM + CSF)", "Units": "mL"},
}


def _write_subject(out: Path, grid: Grid, seed: int, index: int) -> dict:
    """Render subject ``index`` of the cohort ``seed`` and write its T1w, sidecar and label map;
    returns its participants.tsv row. A pure function of its arguments (it runs in worker processes)."""
    from synthbrain.io import Volume, write_volume

    params = sample_subject(seed, index)
    subj = render_subject(params, grid)
    sid = f"sub-{params.participant_id}"
    sidecar = {"Phantom": PHANTOM_NOTE, "Space": SPACE, "Grid": grid.name, "Parameters": asdict(params),
               "VentricleVelocity_mm": subj.ventricle_alpha_mm, "AtrophyAmount": subj.atrophy_amount}
    write_volume(out / sid / "anat" / f"{sid}_T1w.nii.gz", Volume(subj.t1, grid.affine),
                 description="SynthBrain phantom T1w (synthetic, not a person)", sidecar=sidecar,
                 dtype="int16")
    deriv = out / "derivatives" / "phantom" / sid / "anat"
    write_volume(deriv / f"{sid}_space-{SPACE}_res-{grid.res_label}_dseg.nii.gz",
                 Volume(subj.dseg.astype(np.float32), grid.affine),
                 description="SynthBrain phantom label map (synthetic)", dtype="uint8")
    return {"participant_id": sid, "age": f"{params.age:.1f}", "sex": params.sex,
            "diagnosis": params.diagnosis, "ventricular_volume": subj.ventricular_volume_ml,
            "brain_volume": subj.brain_volume_ml, "intracranial_volume": subj.intracranial_volume_ml}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one subject per core: the workers, not torch, use the machine's cores


def generate_cohort(out_dir: str | Path, n: int, grid: Grid | str = "demo", seed: int = 0,
                    on_step: OnStep | None = None, only: Sequence[str] | None = None, jobs: int = 1,
                    preprocess: bool = False) -> Path:
    """Write a BIDS dataset of ``n`` phantom subjects to ``out_dir`` and return its path.

    ``only`` (labels such as ``sub-0007``) writes just those subjects of the ``n``, identical to their
    files in the full cohort: enough to re-evaluate a model on its held-out subjects. ``jobs`` renders
    that many subjects at once in worker processes; the files are the same, byte for byte. ``preprocess``
    also writes each subject's preprocessed derivative on ``grid`` (what ``synthbrain preprocess`` writes),
    without the check that a scan is aligned to MNI152 (these are made in MNI space), so no registration
    (SimpleITK) runs.

    Layout: ``participants.tsv`` (+ ``.json``), ``sub-<id>/anat/sub-<id>_T1w.nii.gz`` (+ JSON sidecar
    with the subject's phantom parameters) and the true label maps under
    ``derivatives/phantom/sub-<id>/anat/sub-<id>_space-MNI152NLin2009aSym_res-<r>_dseg.nii.gz``.
    """
    from synthbrain import __version__
    from synthbrain.data.bids import tsv_text
    from synthbrain.data.template import load_template
    from synthbrain.errors import ConfigError
    from synthbrain.io import atomic_write

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    grid = get_grid(grid)
    out = Path(out_dir)
    if (out / "participants.tsv").exists():
        raise ConfigError(f"{out} already holds a dataset (participants.tsv); choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    desc = {"Name": "SynthBrain phantom cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
            "GeneratedBy": [{"Name": "synthbrain", "Version": __version__,
                             "Description": f"synthbrain cohort --n {n} --grid {grid.name} --seed {seed}"}],
            "SourceDatasets": [{"URL": "nilearn: MNI152 ICBM 2009 nonlinear symmetric template"}],
            "Phantom": PHANTOM_NOTE}
    atomic_write(out / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
    atomic_write(out / "README", f"SynthBrain phantom cohort ({n} subjects, {grid.name} grid).\n\n{PHANTOM_NOTE}\n")
    deriv = out / "derivatives" / "phantom"
    deriv.mkdir(parents=True, exist_ok=True)
    atomic_write(deriv / "dataset_description.json", json.dumps(
        {"Name": "SynthBrain phantom truth", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": desc["GeneratedBy"]}, indent=2) + "\n")
    atomic_write(deriv / "dseg.tsv", "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in DSEG_LABELS.items()))

    indices = list(range(n))
    if only:
        wanted = {label if label.startswith("sub-") else f"sub-{label}" for label in only}
        indices = [i for i in indices if f"sub-{i + 1:04d}" in wanted]
        missing = wanted - {f"sub-{i + 1:04d}" for i in indices}
        if missing:
            raise ConfigError(f"--only names subjects outside this cohort of {n}: {', '.join(sorted(missing))}")
    rows: dict[int, dict] = {}

    def done(i: int, row: dict) -> None:
        rows[i] = row
        if on_step is not None:
            on_step(len(rows), len(indices), {"subject": row["participant_id"]})

    if jobs == 1 or len(indices) <= 1:
        for i in indices:
            done(i, _write_subject(out, grid, seed, i))
    else:
        import multiprocessing
        from concurrent.futures import as_completed

        load_template(grid)  # builds the on-disk caches once, before the workers read them
        ventricle_calibration(grid)
        # spawn: a forked child would inherit the parent's torch thread pool in whatever state
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(indices)), mp_context=ctx,
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(_write_subject, out, grid, seed, i): i for i in indices}
            for f in as_completed(futures):
                done(futures[f], f.result())

    atomic_write(out / "participants.tsv", tsv_text([rows[i] for i in indices], list(PARTICIPANT_COLUMNS)))
    atomic_write(out / "participants.json", json.dumps(PARTICIPANT_COLUMNS, indent=2) + "\n")
    if preprocess:
        from synthbrain.data.bids import BIDSDataset

        BIDSDataset(out, grid=grid).prepare(on_step, jobs=jobs, known_prepared=PREPARED_NOTE)
    return out
