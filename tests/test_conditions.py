"""The condition schema: normalisation to [0, 1] and back, validation messages, JSON round trip,
and schemas derived from a participants table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthbrain.conditions import DEFAULT_SCHEMA, NULL_VALUE, Condition, ConditionSchema
from synthbrain.errors import ConditionError

AGE = DEFAULT_SCHEMA["age"]
SEX = DEFAULT_SCHEMA["sex"]
SITE = Condition("site", "Site", "", "categorical", categories=("Leeds", "Oxford", "Bristol"))

# a participants.tsv as read: every value a string, some missing
PARTICIPANTS = {
    "participant_id": ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"],
    "age": ["52.3", "71.0", "44.8", "88.1", "63.5"],
    "sex": ["F", "M", "M", "F", "F"],
    "diagnosis": ["CN", "AD", "MCI", "n/a", "CN"],
    "ventricular_volume": ["18.12", "55.4", "12.77", "71.03", "30.0"],
    "brain_volume": ["1150.2", "1010.9", "1302.55", "950.1", "1101.0"],
    "education": ["12", "16", "", "18", "10"],
}


# ------------------------------------------------------------------------------ one condition


@pytest.mark.parametrize("condition, value, entries", [
    (AGE, 40.0, [0.0]),
    (AGE, 90.0, [1.0]),
    (AGE, 65.0, [0.5]),
    (DEFAULT_SCHEMA["brain_volume"], 1200.0, [0.5]),
    (SEX, "F", [0.0]),
    (SEX, "M", [1.0]),
    (SITE, "Leeds", [1.0, 0.0, 0.0]),
    (SITE, "Bristol", [0.0, 0.0, 1.0]),
], ids=["age low", "age high", "age mid", "brain mid", "F", "M", "site 0", "site 2"])
def test_normalise_maps_into_unit_range_and_back(condition, value, entries):
    vec = condition.normalise(value)
    assert vec.dtype == np.float32 and vec.shape == (condition.width,)
    np.testing.assert_allclose(vec, entries, atol=1e-6)
    assert condition.denormalise(vec) == pytest.approx(value)


@pytest.mark.parametrize("condition", [c for c in DEFAULT_SCHEMA] + [SITE], ids=lambda c: c.name)
def test_round_trip_over_the_whole_range(condition):
    if condition.kind == "continuous":
        values = np.linspace(condition.low, condition.high, 11)
        back = [condition.denormalise(condition.normalise(v)) for v in values]
        np.testing.assert_allclose(back, values, rtol=1e-6)
        assert all(0.0 <= condition.normalise(v)[0] <= 1.0 for v in values)
    else:
        assert [condition.denormalise(condition.normalise(c)) for c in condition.categories] == list(
            condition.categories)


def test_denormalise_clips_and_picks_the_nearest_category():
    assert AGE.denormalise([1.7]) == AGE.high
    assert AGE.denormalise([-0.2]) == AGE.low
    assert SEX.denormalise([0.49]) == "F" and SEX.denormalise([0.51]) == "M"
    assert SITE.denormalise([0.2, 0.1, 0.7]) == "Bristol"
    with pytest.raises(ConditionError, match="expected 3 entries"):
        SITE.denormalise([1.0, 0.0])


@pytest.mark.parametrize("condition, value, valid_range", [
    (AGE, 39.9, "40..90 years"),
    (AGE, 120, "40..90 years"),
    (AGE, float("nan"), "40..90 years"),
    (AGE, "old", "40..90 years"),
    (AGE, None, "40..90 years"),
    (DEFAULT_SCHEMA["ventricular_volume"], 400.0, "5..150 mL"),
    (DEFAULT_SCHEMA["brain_volume"], -1.0, "700..1700 mL"),
    (SEX, "X", "one of F, M"),
    (SEX, "2", "one of F, M"),
    (SITE, "Leeds ", None),  # surrounding blanks are ignored: valid
    (SITE, "leeds", "one of Leeds, Oxford, Bristol"),
    (SITE, "1.5", "one of Leeds, Oxford, Bristol"),
], ids=["age just below", "age 120", "age NaN", "age text", "age None", "ventricles", "brain negative",
        "sex X", "sex code 2", "site blanks", "site case", "site code 1.5"])
def test_invalid_value_raises_naming_the_valid_range(condition, value, valid_range):
    if valid_range is None:
        assert condition.validate(value) == "Leeds"
        return
    with pytest.raises(ConditionError) as err:
        condition.validate(value)
    assert condition.name in str(err.value)
    assert valid_range in str(err.value)
    with pytest.raises(ConditionError):
        condition.normalise(value)


@pytest.mark.parametrize("alias", ["F", "f", "female", "Female", "W", "woman", "0", " F "])
def test_sex_aliases_for_female(alias):
    assert SEX.validate(alias) == "F"
    assert SEX.normalise(alias)[0] == 0.0


@pytest.mark.parametrize("alias", ["M", "m", "male", "MALE", "man", "1", 1])
def test_sex_aliases_for_male(alias):
    assert SEX.validate(alias) == "M"
    assert SEX.normalise(alias)[0] == 1.0


@pytest.mark.parametrize("code, category", [
    ("0", "Leeds"), ("2", "Bristol"), ("1.0", "Oxford"), (2, "Bristol"),
])
def test_numeric_codes_index_the_categories(code, category):
    assert SITE.validate(code) == category
    one_hot = np.eye(3, dtype=np.float32)[SITE.categories.index(category)]
    np.testing.assert_array_equal(SITE.normalise(code), one_hot)


def test_categorical_is_one_hot():
    vecs = np.stack([SITE.normalise(c) for c in SITE.categories])
    np.testing.assert_array_equal(vecs, np.eye(3))
    assert SITE.width == 3 and SEX.width == 1 and AGE.width == 1


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "2age", "kind": "continuous", "low": 0, "high": 1}, "identifier"),
    ({"name": "age", "kind": "continuous", "low": None, "high": 1}, "finite"),
    ({"name": "age", "kind": "continuous", "low": 0, "high": float("inf")}, "finite"),
    ({"name": "age", "kind": "continuous", "low": 5, "high": 5}, "must be <"),
    ({"name": "age", "kind": "continuous", "low": 0, "high": 1, "default": 2}, "out of range"),
    ({"name": "sex", "kind": "binary", "categories": ("F", "M", "X")}, "exactly 2"),
    ({"name": "site", "kind": "categorical", "categories": ("A",)}, ">= 2"),
    ({"name": "site", "kind": "categorical", "categories": ("A", "A")}, "duplicate"),
    ({"name": "site", "kind": "ordinal", "categories": ("A", "B")}, "kind"),
], ids=["name", "no low", "infinite high", "empty range", "bad default", "binary 3", "categorical 1",
        "duplicates", "unknown kind"])
def test_condition_validates_its_definition(kwargs, fragment):
    with pytest.raises(ConditionError, match=fragment):
        Condition(label="x", unit="", **kwargs)


# ---------------------------------------------------------------------------------------- schema


def test_default_schema_layout():
    assert DEFAULT_SCHEMA.names == ["age", "sex", "ventricular_volume", "brain_volume"]
    assert DEFAULT_SCHEMA.width == 4
    assert NULL_VALUE < 0  # outside [0, 1], so "no condition" differs from every real one


def test_encode_decode_round_trip():
    values = {"age": 71.5, "sex": "M", "ventricular_volume": 42.0, "brain_volume": 1010.0}
    vec = DEFAULT_SCHEMA.encode(values)
    assert vec.dtype == np.float32 and vec.shape == (4,)
    assert np.all((vec >= 0) & (vec <= 1))
    np.testing.assert_allclose(vec[:2], [(71.5 - 40) / 50, 1.0], rtol=1e-6)
    decoded = DEFAULT_SCHEMA.decode(vec)
    assert decoded["sex"] == "M"
    for name in ("age", "ventricular_volume", "brain_volume"):
        assert decoded[name] == pytest.approx(values[name], rel=1e-5)
    with pytest.raises(ConditionError, match="needs 4"):
        DEFAULT_SCHEMA.decode(vec[:3])


def test_complete_fills_defaults_and_validates():
    full = DEFAULT_SCHEMA.complete({"age": "70", "sex": "male", "brain_volume": None})
    assert full == {"age": 70.0, "sex": "M", "ventricular_volume": 30.0, "brain_volume": 1150.0}
    assert DEFAULT_SCHEMA.complete() == DEFAULT_SCHEMA.defaults()
    with pytest.raises(ConditionError, match="40..90 years"):
        DEFAULT_SCHEMA.complete({"age": 20})


def test_complete_rejects_unknown_names_and_lists_the_known_ones():
    with pytest.raises(ConditionError) as err:
        DEFAULT_SCHEMA.complete({"age": 60, "height": 180, "iq": 100})
    message = str(err.value)
    assert "height" in message and "iq" in message
    assert all(name in message for name in DEFAULT_SCHEMA.names)
    with pytest.raises(ConditionError, match="unknown condition 'height'"):
        DEFAULT_SCHEMA["height"]


def test_duplicate_names_are_refused():
    with pytest.raises(ConditionError, match="duplicate"):
        DEFAULT_SCHEMA.with_condition(AGE)


@pytest.mark.parametrize("schema", [DEFAULT_SCHEMA, DEFAULT_SCHEMA.with_condition(SITE)],
                         ids=["default", "site"])
def test_schema_json_round_trip(schema):
    text = json.dumps(schema.to_dict())
    back = ConditionSchema.from_dict(json.loads(text))
    assert back == schema
    assert back.to_dict()["null_value"] == NULL_VALUE
    values = {"age": 55.0, "sex": "F", "ventricular_volume": 20.0, "brain_volume": 1300.0}
    if "site" in schema.names:
        values["site"] = "Oxford"
    np.testing.assert_array_equal(back.encode(values), schema.encode(values))


@pytest.mark.parametrize("d, fragment", [
    ({}, "no 'conditions'"),
    ({"conditions": [{"name": "age", "low": 0, "high": 1}]}, "lacks 'kind'"),
    ({"conditions": [{"name": "age", "kind": "continuous", "low": 9, "high": 1}]}, "must be <"),
])
def test_from_dict_refuses_malformed_schemas(d, fragment):
    with pytest.raises(ConditionError, match=fragment):
        ConditionSchema.from_dict(d)


# ----------------------------------------------------------------- schemas from participants.tsv


def test_with_extra_columns_adds_diagnosis_and_a_numeric_column():
    schema = DEFAULT_SCHEMA.with_extra_columns(PARTICIPANTS, ["diagnosis", "education", "age"])
    assert schema.names == DEFAULT_SCHEMA.names + ["diagnosis", "education"]  # age is there already
    diagnosis = schema["diagnosis"]
    assert diagnosis.kind == "categorical"
    assert set(diagnosis.categories) == {"AD", "CN", "MCI"}  # 'n/a' is a missing value, not a category
    education = schema["education"]
    assert education.kind == "continuous" and (education.low, education.high) == (10.0, 18.0)
    assert schema.width == 4 + 3 + 1
    vec = schema.encode({"age": 60, "diagnosis": "MCI", "education": 14})
    assert vec[4 + diagnosis.categories.index("MCI")] == 1.0 and vec[4:7].sum() == 1.0
    assert vec[7] == pytest.approx(0.5)


def test_with_extra_columns_two_labels_make_a_binary_condition():
    schema = DEFAULT_SCHEMA.with_extra_columns({"scanner": ["Prisma", "Skyra", "Prisma"]}, ["scanner"])
    assert schema["scanner"].kind == "binary" and schema.width == 5


def test_with_extra_columns_refuses_a_missing_column():
    with pytest.raises(ConditionError, match="'site'"):
        DEFAULT_SCHEMA.with_extra_columns(PARTICIPANTS, ["site"])


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_with_ranges_from_holds_every_observed_value(margin):
    schema = DEFAULT_SCHEMA.with_ranges_from(PARTICIPANTS, margin=margin)
    for name in ("age", "ventricular_volume", "brain_volume"):
        c = schema[name]
        values = [float(v) for v in PARTICIPANTS[name]]
        span = max(values) - min(values)
        # tightened to what was seen (+ margin), rounded outward to whole units
        assert min(values) - margin * span - 1 < c.low <= min(values) - margin * span
        assert max(values) + margin * span <= c.high < max(values) + margin * span + 1
        assert c.low == int(c.low) and c.high == int(c.high)
        for v in PARTICIPANTS[name]:
            assert 0.0 <= c.normalise(v)[0] <= 1.0
        assert c.low <= c.default <= c.high
    assert schema["sex"] == DEFAULT_SCHEMA["sex"]


def test_with_ranges_from_refuses_values_the_data_did_not_span():
    schema = DEFAULT_SCHEMA.with_ranges_from(PARTICIPANTS)
    DEFAULT_SCHEMA["age"].validate(90.0)
    with pytest.raises(ConditionError, match="out of range"):
        schema["age"].validate(90.0)  # nobody this old was seen


def test_with_ranges_from_a_single_value_still_gives_a_valid_range():
    schema = DEFAULT_SCHEMA.with_ranges_from({"age": ["65"]})
    assert schema["age"].low < schema["age"].high
    assert schema["age"].validate("65") == 65.0
