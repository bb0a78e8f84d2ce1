"""Series (synthbrain.series): the plan of every frame's conditions, one brain through age from a
seed, what the series gives (frames measured, a zip), and bad plans refused with ConfigError."""

from __future__ import annotations

import gzip
import io
import zipfile

import nibabel as nib
import numpy as np
import pytest

from synthbrain import series
from synthbrain.bundle import load_bundle
from synthbrain.conditions import Condition, ConditionSchema
from synthbrain.errors import ConditionError, ConfigError
from synthbrain.export import SYNTHETIC
from synthbrain.population import PopulationModel
from synthbrain.sampling import Generator

# ---------------------------------------------------------------------------------------- plan


@pytest.fixture
def schema_with_diagnosis():
    return ConditionSchema((
        Condition("age", "Age", "years", "continuous", 40.0, 90.0, default=60.0),
        Condition("sex", "Sex", "", "binary", categories=("F", "M"), default="F"),
        Condition("diagnosis", "Diagnosis", "", "categorical", categories=("CN", "MCI", "AD"), default="CN"),
        Condition("ventricular_volume", "Ventricular volume", "mL", "continuous", 5.0, 120.0, default=30.0),
        Condition("brain_volume", "Brain volume", "mL", "continuous", 800.0, 1600.0, default=1100.0),
    ))


def test_plan_follows_each_setting(schema_with_diagnosis):
    schema = schema_with_diagnosis
    pop = PopulationModel({"ventricular_volume": (3.4, 0.03, 0.0, 0.1)}, age_centre=65.0)
    assert series.axis_name(schema) == "age"
    assert series.modes_for(schema["sex"], pop) == ["fixed"]
    assert series.modes_for(schema["diagnosis"], pop) == ["fixed", "switch"]
    assert series.modes_for(schema["ventricular_volume"], pop) == ["typical", "fixed", "sweep"]
    assert series.modes_for(schema["brain_volume"], pop) == ["fixed", "sweep"]  # no population model for it
    ages = series.axis_values(50.0, 80.0, 4)
    assert ages == [50.0, 60.0, 70.0, 80.0]
    plan = series.plan_series(schema, pop, "age", ages, {
        "sex": series.Setting("fixed", "M"),
        "diagnosis": series.Setting("switch", "CN", "AD", at=65.0),
        "ventricular_volume": series.Setting("typical"),
        "brain_volume": series.Setting("sweep", 1200.0, 1050.0)})
    assert [p["age"] for p in plan] == ages and {p["sex"] for p in plan} == {"M"}
    assert [p["diagnosis"] for p in plan] == ["CN", "CN", "AD", "AD"]
    assert [p["brain_volume"] for p in plan] == [1200.0, 1150.0, 1100.0, 1050.0]
    want = [pop.typical(schema, {"age": a, "sex": "M"})["ventricular_volume"] for a in ages]
    assert [p["ventricular_volume"] for p in plan] == want and want[0] < want[-1]
    # settings left out take their first mode at the schema's default
    plain = series.plan_series(schema, pop, "age", ages, {})
    assert {p["diagnosis"] for p in plain} == {"CN"} and {p["brain_volume"] for p in plain} == {1100.0}


@pytest.mark.parametrize("call, message", [
    (lambda s, p: series.axis_values(60.0, 60.0, 3), "range must go up"),
    (lambda s, p: series.axis_values(40.0, 60.0, 1), "2..25 frames"),
    (lambda s, p: series.Setting("sweep", 1.0), "end value"),
    (lambda s, p: series.Setting("wobble", 1.0), "mode must be"),
    (lambda s, p: series.Setting("switch", "CN", "AD"), "axis value 'at'"),
    (lambda s, p: series.plan_series(s, p, "age", [50.0, 60.0],
                                     {"sex": series.Setting("switch", "F", "M", 55.0)}), "cannot be set"),
    (lambda s, p: series.axis_name(ConditionSchema((s["sex"],))), "no continuous condition"),
])
def test_bad_plans_are_refused_with_a_config_error(schema_with_diagnosis, call, message):
    with pytest.raises(ConfigError, match=message):
        call(schema_with_diagnosis, PopulationModel())


def test_a_bad_category_is_refused(schema_with_diagnosis):
    with pytest.raises(ConditionError):
        series.plan_series(schema_with_diagnosis, PopulationModel(), "age", [50.0, 60.0],
                           {"diagnosis": series.Setting("fixed", "flu")})


# ------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def gen(tiny_bundle):
    return Generator(load_bundle(tiny_bundle), device="cpu")


def test_one_seed_through_age_is_the_samples_of_that_seed(gen):
    ages = series.axis_values(55.0, 85.0, 3)
    plan = series.plan_series(gen.schema, gen.bundle.population, "age", ages, {"sex": series.Setting("fixed", "M")})
    steps: list[tuple[int, int, dict]] = []
    traj = series.build_trajectory(gen, gen.bundle, plan, axis="age", seed=7, steps=2, guidance=2.0,
                                   on_step=lambda i, n, info: steps.append((i, n, info)))
    assert traj.provenance == SYNTHETIC and not traj.is_edit and traj.axis_values == ages
    for f, cond in zip(traj.frames, plan):
        alone = gen.sample(cond, seed=7, steps=2, guidance=2.0)[0]
        assert np.array_equal(f.volume.data, alone.volume.data) and f.sample.conditions == alone.conditions
        assert f.display[:2] == b"\x1f\x8b"  # the viewer's gzip NIfTI
        assert f.measured is not None or f.measure_error
    # progress over the whole job: 3 frames x (2 steps, then the decode as a step of its own, announced
    # as it starts), then one per measured frame
    assert [i for i, _, info in steps if info.get("stage") != "decode"] == list(range(1, 13))
    assert [i for i, _, info in steps if info.get("stage") == "decode"] == [2, 5, 8]
    assert {n for _, n, _ in steps} == {12}
    assert traj.label(0) == "age 55 years" and traj.subject == "sub-synthseed7"
    with zipfile.ZipFile(io.BytesIO(traj.zip())) as z:
        assert len([n for n in z.namelist() if n.endswith(".nii.gz")]) == 3
    # the viewer's copy of the whole series (the live age slider): one 4D file, frame t = frame t
    shown = nib.Nifti1Image.from_bytes(gzip.decompress(traj.display_series))
    assert shown.shape == (*gen.grid.shape, 3) and b"SYNTHETIC" in shown.header["descrip"].tobytes()
    np.testing.assert_allclose(shown.affine, gen.grid.affine)
    for t, f in enumerate(traj.frames):
        np.testing.assert_allclose(np.asarray(shown.dataobj[..., t]), f.volume.data, atol=1e-4)
    assert traj.caption(1).startswith("Frame 2 of 3. Requested: age 70 years")
