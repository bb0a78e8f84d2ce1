"""Brain and ventricular volume from the image alone, checked against volumes known by construction:
the MNI152 template's own tissue maps and the phantom subjects' label fractions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from synthbrain.data.template import load_template
from synthbrain.errors import InvalidVolumeError
from synthbrain.grids import DEMO, FULL
from synthbrain.io import Volume, read_volume
from synthbrain.measure import (
    LABELS,
    fissure_mask,
    grid_for,
    measure_volume,
    measurement_labels,
    segment,
)


def _true_volumes(cohort) -> dict[str, tuple[float, float]]:
    """participant label -> (brain, ventricular) volume in mL, from participants.tsv."""
    return {r["participant_id"]: (float(r["brain_volume"]), float(r["ventricular_volume"]))
            for r in cohort.participants()}


def test_template_measures_as_its_tissue_maps():
    tmpl = load_template("demo")
    m = measure_volume(Volume(tmpl.t1, DEMO.affine, source="template"))
    assert m.brain_volume == pytest.approx(tmpl.brain_volume_ml, rel=0.15)
    assert m.ventricular_volume == pytest.approx(tmpl.ventricular_volume_ml, rel=0.1)  # lateral + third
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


# ------------------------------------------------------------------ what is counted: the masks


@pytest.fixture(scope="module")
def demo_samples() -> dict[str, Volume]:
    """Two brains from the shipped bundle: small and large requested ventricles (about 5 s)."""
    from synthbrain.sampling import Generator

    gen = Generator.from_bundle(None, device="cpu")
    conds = [{"age": 50, "sex": "F", "ventricular_volume": 10.0}, {"age": 85, "sex": "M", "ventricular_volume": 50.0}]
    return {f"sample {c['ventricular_volume']:g} mL": s.volume for c, s in zip(conds, gen.sample(conds, n=2))}


def _face_components(mask: np.ndarray) -> int:
    return ndi.label(mask, structure=ndi.generate_binary_structure(3, 1))[1]


def test_ventricles_are_few_pieces_inside_the_template_region_none_in_the_fissure(demo_samples):
    vols = {"template": Volume(load_template("demo").t1, DEMO.affine), **demo_samples}
    tmpl = load_template("demo")
    fissure = fissure_mask(tmpl.wm > 0.5, DEMO.axis_mm(0))
    assert tmpl.volume_ml(tmpl.csf * fissure) > 5.0  # fluid that must not count
    measured = {}
    for name, vol in vols.items():
        seg = segment(vol, DEMO)
        mask = seg.ventricle_mask
        measured[name] = seg.measurement.ventricular_volume
        assert mask.sum() * DEMO.voxel_volume_ml > 2.0, name
        assert 1 <= _face_components(mask) <= 3, name
        assert np.all(seg.ventricle_region[mask]), name
        # the fissure: the midline above the template's corpus callosum, and the template's own
        # "ventricles" there (the CSF deep in the fissure that its ventricle map also holds)
        assert not np.any(mask & fissure), name
        assert seg.csf[fissure & seg.head].sum() * DEMO.voxel_volume_ml > 2.0, name  # fluid there, not counted
        assert seg.measurement.ventricular_volume == pytest.approx(
            seg.ventricles.sum(dtype=np.float64) * DEMO.voxel_volume_ml, rel=1e-6)
    assert measured["sample 50 mL"] > 2 * measured["sample 10 mL"]


def test_measurement_labels_are_the_counted_compartments(phantom_cohort):
    vol = read_volume(phantom_cohort.t1w(phantom_cohort.labels[0]))
    labels, affine = measurement_labels(vol)
    seg = segment(vol)
    np.testing.assert_array_equal(affine, DEMO.affine)
    assert labels.dtype == np.uint8 and labels.shape == DEMO.shape
    assert {0, 1, 2, 3} <= set(np.unique(labels).tolist()) <= set(LABELS)  # no dura in a phantom
    vent = labels == 2
    np.testing.assert_array_equal(vent, seg.ventricle_mask)
    assert np.all(labels[~seg.head] == 0)
    # the labelled ventricles are the measured volume; the labelled brain is the bulk of it
    ml = DEMO.voxel_volume_ml
    assert vent.sum() * ml == pytest.approx(seg.measurement.ventricular_volume, rel=1e-9)
    assert (labels == 1).sum() * ml == pytest.approx(seg.measurement.brain_volume, rel=0.1)


def test_dura_and_a_sinus_left_round_the_brain_are_not_brain():
    """What a brain extraction leaves (a dura-like shell of grey-matter intensity 4 - 6 mm out and a
    superior sagittal sinus along the top of the fissure) adds tissue to the head, not to the brain."""
    tmpl = load_template("demo")
    clean = Volume(tmpl.t1, DEMO.affine, source="template")
    d = ndi.distance_transform_edt(tmpl.brain <= 0.5) * DEMO.spacing
    gm = float(np.median(tmpl.t1[tmpl.deep_gm]))
    shell = (d > 4.0) & (d <= 6.0)
    xyz = DEMO.voxel_to_world(np.indices(DEMO.shape).reshape(3, -1).T).reshape(*DEMO.shape, 3)
    top = xyz[..., 2][tmpl.brain > 0.5].max()
    sinus = (np.hypot(xyz[..., 0], xyz[..., 2] - (top - 4.0)) <= 4.0) & (d > 0) & (xyz[..., 1] > -60)
    dirty = Volume(np.where(shell | sinus, gm, tmpl.t1).astype(np.float32), DEMO.affine, source="dirty")
    a, b = segment(clean, DEMO), segment(dirty, DEMO)
    added_to_head = (b.head & ~a.head).sum() * DEMO.voxel_volume_ml
    assert added_to_head > 50.0  # the shell and the sinus are inside the measured head
    assert b.measurement.brain_volume == pytest.approx(a.measurement.brain_volume, abs=0.1 * added_to_head)
    labels = b.labels
    assert np.mean(labels[shell & b.head] == 4) > 0.9  # shown as non-brain
