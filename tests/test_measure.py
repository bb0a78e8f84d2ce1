"""Brain and ventricular volume from the image alone, checked against volumes known by construction:
the MNI152 template's own tissue maps and the phantom subjects' label fractions."""

from __future__ import annotations

import numpy as np
import pytest

from synthbrain.data.template import load_template
from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import DEMO, FULL
from synthbrain.io import Volume, read_volume
from synthbrain.measure import grid_for, measure_volume


def _true_volumes(cohort) -> dict[str, tuple[float, float]]:
    """participant label -> (brain, ventricular) volume in mL, from participants.tsv."""
    return {r["participant_id"]: (float(r["brain_volume"]), float(r["ventricular_volume"]))
            for r in cohort.participants()}


def test_template_measures_as_its_tissue_maps():
    tmpl = load_template("demo")
    m = measure_volume(Volume(tmpl.t1, DEMO.affine, source="template"))
    assert m.brain_volume == pytest.approx(tmpl.brain_volume_ml, rel=0.15)
    assert m.ventricular_volume == pytest.approx(tmpl.ventricular_volume_ml, rel=0.15)
    assert m.intracranial_volume == pytest.approx(tmpl.intracranial_volume_ml, rel=0.15)
    assert m.csf_mean < m.gm_mean < m.wm_mean  # T1 contrast
    assert set(m.to_dict()) == {"brain_volume", "ventricular_volume", "intracranial_volume", "csf_mean",
                                "gm_mean", "wm_mean"}


def test_phantom_brain_volumes_are_measured_within_ten_percent(phantom_cohort):
    truth = _true_volumes(phantom_cohort)
    measured = {label: measure_volume(read_volume(phantom_cohort.t1w(label))) for label in truth}
    for label, (brain, _) in truth.items():
        assert measured[label].brain_volume == pytest.approx(brain, rel=0.10), label
    # the subject whose ventricles are by far the largest is measured so
    biggest = max(truth, key=lambda label: truth[label][1])
    assert sorted(truth[label][1] for label in truth)[-2] * 2 < truth[biggest][1]
    assert max(measured, key=lambda label: measured[label].ventricular_volume) == biggest


def test_orientation_of_the_file_does_not_change_the_measurement(phantom_cohort):
    vol = read_volume(phantom_cohort.t1w(phantom_cohort.labels[0]))
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[[0, 2], 3] = [vol.shape[0] - 1, vol.shape[2] - 1]
    flipped = Volume(vol.data[::-1, :, ::-1].copy(), vol.affine @ flip)
    a, b = measure_volume(vol), measure_volume(flipped)
    assert b.brain_volume == pytest.approx(a.brain_volume, rel=1e-4)
    assert b.ventricular_volume == pytest.approx(a.ventricular_volume, rel=1e-4)


@pytest.mark.slow
def test_measured_volumes_track_the_true_ones(large_phantom_cohort):
    truth = _true_volumes(large_phantom_cohort)
    assert len(truth) >= 16
    measured = [measure_volume(read_volume(large_phantom_cohort.t1w(label))) for label in truth]
    true_brain, true_vent = np.array(list(truth.values())).T
    assert np.corrcoef(true_brain, [m.brain_volume for m in measured])[0, 1] >= 0.95
    assert np.corrcoef(true_vent, [m.ventricular_volume for m in measured])[0, 1] >= 0.95


@pytest.mark.parametrize("spacing, grid", [(1.0, FULL), (1.5, FULL), (2.0, DEMO), (3.0, DEMO)])
def test_grid_for_picks_the_nearest_grid(spacing, grid):
    vol = Volume(np.zeros((8, 8, 8)), np.diag([spacing, spacing, 1.0, 1.0]))
    assert grid_for(vol) is grid


def _ball(radius_mm: float) -> np.ndarray:
    xyz = DEMO.voxel_to_world(np.indices(DEMO.shape).reshape(3, -1).T).reshape(*DEMO.shape, 3)
    centre = load_template("demo").centroid_mm
    return (np.linalg.norm(xyz - centre, axis=-1) < radius_mm).astype(np.float32) * 500.0


NOT_A_BRAIN = {
    "zeros": (lambda: np.zeros(DEMO.shape, np.float32), "empty"),
    "uniform noise": (lambda: np.random.default_rng(0).uniform(0, 1000, DEMO.shape).astype(np.float32),
                      "contrast"),
    "constant": (lambda: np.full(DEMO.shape, 300.0, np.float32), "contrast"),
    "100 mL ball": (lambda: _ball(28.8), "less than 200 mL"),  # 4/3 pi 28.8^3 mm^3 = 100 mL
}


@pytest.mark.parametrize("case", list(NOT_A_BRAIN), ids=list(NOT_A_BRAIN))
def test_volume_without_a_brain_is_refused_naming_it(case):
    make, fragment = NOT_A_BRAIN[case]
    with pytest.raises(InvalidVolumeError) as err:
        measure_volume(Volume(make(), DEMO.affine, source="scan.nii.gz"))
    assert str(err.value).startswith("scan.nii.gz: ")
    assert fragment in str(err.value)
