"""A real cohort's own conditions: a schema file declares them (name, kind, unit, range, levels, codes),
they are checked against participants.tsv with messages that name the subject and the column, and a
categorical diagnosis goes end to end: ``synthbrain train prior --schema`` and ``synthbrain sample
--condition diagnosis=AD`` (the real command line), and old bundles keep their schema as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import DIAGNOSES, DIAGNOSIS_SCHEMA, subprocess_env, write_json, write_tsv

from synthbrain.conditions import ConditionSchema, read_schema_file
from synthbrain.data.bids import read_tsv, schema_for_dataset
from synthbrain.errors import ConditionError, DatasetError


def synthbrain(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthbrain", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, check=False)


def says(error: Exception, message: str) -> bool:
    """Whether the error's text holds the parts of ``message`` ("..." between them), in order."""
    text, at = str(error), 0
    for part in message.split("..."):
        at = text.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


def declared(**changes) -> dict:
    """DIAGNOSIS_SCHEMA with entries changed by name (None removes a key)."""
    d = json.loads(json.dumps(DIAGNOSIS_SCHEMA))
    for name, change in changes.items():
        entry = next(e for e in d["conditions"] if e["name"] == name)
        for k, v in change.items():
            entry.pop(k, None) if v is None else entry.__setitem__(k, v)
    return d


# ------------------------------------------------------------------------------ the schema file


def test_schema_file_declares_kinds_units_ranges_levels_and_codes(tmp_path):
    schema = read_schema_file(write_json(tmp_path / "schema.json", DIAGNOSIS_SCHEMA))
    assert schema.names == ["age", "sex", "diagnosis"]
    age, sex, dx = schema
    assert (age.kind, age.unit, age.low, age.high, age.description) == ("continuous", "years", 18.0, 100.0,
                                                                         "age at scan")
    assert (sex.kind, sex.categories) == ("binary", ("F", "M"))
    assert (dx.kind, dx.label, dx.categories) == ("categorical", "Diagnosis", DIAGNOSES)
    assert sex.validate("1") == "M" and sex.validate("2") == "F" and sex.validate("F") == "F"  # codes, labels
    with pytest.raises(ConditionError, match="1 = M, 2 = F"):
        sex.validate("3")  # with codes, a number is never read as an index into the levels
    np.testing.assert_array_equal(schema.encode({"age": 59, "sex": "2", "diagnosis": "AD"}),
                                  [41 / 82, 0, 0, 0, 1])  # diagnosis one-hot, after age and sex
    # the schema travels in a bundle's config.json: the round trip keeps the codes
    assert ConditionSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON (line 1"),
    (json.dumps([1, 2]), 'a "conditions" list'),
    (json.dumps({"conditions": []}), "empty"),
    (json.dumps(declared(age={"unit": None})), "condition 1 ('age'): a continuous condition needs its unit"),
    (json.dumps(declared(age={"range": [18]})), "condition 1 ('age'): a continuous condition needs its valid range"),
    (json.dumps(declared(age={"range": [90, 18]})), "condition 1 ('age'): ...low (90.0) must be < high"),
    (json.dumps(declared(diagnosis={"levels": None})), "condition 3 ('diagnosis'): a categorical condition needs"),
    (json.dumps(declared(diagnosis={"levels": ["CN"]})), "condition 3 ('diagnosis'): ...>= 2 categories"),
    (json.dumps(declared(diagnosis={"kind": "ordinal"})), "kind must be one of continuous, binary, categorical"),
    (json.dumps(declared(diagnosis={"range": [0, 2]})), "a range is for continuous"),
    (json.dumps(declared(diagnosis={"lvls": ["CN", "AD"]})), "unknown key(s) lvls"),
    (json.dumps(declared(sex={"codes": {"1": "male"}})), "code(s) map to 'male', which is not one of"),
    (json.dumps(declared(sex={"levels": ["F", "M", "X"]})), "binary needs exactly 2"),
    (json.dumps(declared(diagnosis={"name": "age"})), "duplicate condition names"),
    (json.dumps(declared(diagnosis={"name": "dx group"})), "must be a Python identifier"),
], ids=["json", "not an object", "empty", "no unit", "no range", "empty range", "no levels", "one level",
        "bad kind", "range on categorical", "typo", "code to no level", "binary of 3", "duplicate", "bad name"])
def test_a_bad_schema_file_is_one_line_naming_the_file_and_entry(tmp_path, text, message):
    path = tmp_path / "cohort-schema.json"
    path.write_text(text)
    with pytest.raises(ConditionError) as e:
        read_schema_file(path)
    assert says(e.value, message) and str(path) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ checked against the data


def cohort_table(tmp_path, change=None):
    rows = [{"participant_id": f"sub-{i:02d}", "age": str(40 + 3 * i), "sex": "12"[i % 2],
             "diagnosis": DIAGNOSES[i % 3], "site": "AB"[i % 2]} for i in range(1, 10)]
    if change:
        change(rows)
    write_tsv(tmp_path / "participants.tsv", rows)
    return tmp_path, write_json(tmp_path / "schema.json", DIAGNOSIS_SCHEMA)


def test_declared_conditions_replace_the_default_ones_with_ranges_from_the_data(tmp_path):
    root, schema_file = cohort_table(tmp_path)
    schema = schema_for_dataset(root, schema_file=schema_file)
    assert schema.names == ["age", "sex", "diagnosis"]  # no volume columns needed
    assert (schema["age"].low, schema["age"].high, schema["age"].unit) == (43.0, 67.0, "years")
    assert schema["diagnosis"].categories == DIAGNOSES and schema["sex"].codes == (("1", "M"), ("2", "F"))
    # a --condition column on top of the declared ones
    assert schema_for_dataset(root, ["site"], schema_file=schema_file).names[-1] == "site"


def _set(i, column, value):
    def change(rows):
        rows[i][column] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(2, "age", "130"), "sub-03, column 'age': age = 130 is out of range; valid range is 18..100 years"),
    (_set(1, "age", "sixty"), "sub-02, column 'age': age: 'sixty' is not a number"),
    (_set(3, "diagnosis", "Alzheimer"), "sub-04, column 'diagnosis': ...'Alzheimer' is not valid; expected one of "
                                        "CN, MCI, AD"),
    (_set(3, "diagnosis", "1"), "sub-04, column 'diagnosis': ...'1' is not valid"),  # never an index
    (_set(4, "sex", "3"), "sub-05, column 'sex': ...or a code: 1 = M, 2 = F"),
    (_set(5, "diagnosis", "n/a"), "sub-06, column 'diagnosis': no value; fill it in or remove sub-06's row"),
    (_set(6, "age", ""), "sub-07, column 'age': no value"),
    (lambda rows: [r.update(diagnosis="CN" if r["diagnosis"] == "MCI" else r["diagnosis"]) for r in rows],
     "column 'diagnosis': no subject has the level 'MCI'"),
    (lambda rows: [r.pop("diagnosis") for r in rows], "no column 'diagnosis', which schema.json declares"),
], ids=["out of range", "not a number", "unknown level", "index", "unknown code", "n/a", "empty", "unseen level",
        "no column"])
def test_data_that_breaks_the_schema_is_named_by_subject_and_column(tmp_path, change, message):
    root, schema_file = cohort_table(tmp_path, change)
    with pytest.raises(DatasetError) as e:
        schema_for_dataset(root, schema_file=schema_file)
    assert says(e.value, message) and "\n" not in str(e.value)


def test_old_bundles_keep_their_schema_as_it_was():
    """The demo bundle's conditions read and write back unchanged (no codes key appears), so it loads
    and encodes exactly as before."""
    from synthbrain.bundle import demo_bundle_path, read_config

    stored = read_config(demo_bundle_path())["conditions"]
    schema = ConditionSchema.from_dict(stored)
    assert schema.to_dict() == stored and all(not c.codes for c in schema)
    assert schema["sex"].validate("1") == "M"  # the old reading of a 0/1 column is kept


# ------------------------------------------------------------------------------ end to end (the real CLI)


def test_a_cohort_with_a_diagnosis_trains_and_samples_with_diagnosis_ad(diagnosis_bundle, tmp_path):
    config = json.loads((diagnosis_bundle.bundle / "config.json").read_text())
    schema = ConditionSchema.from_dict(config["conditions"])
    assert schema.names == ["age", "sex", "diagnosis"] and schema["diagnosis"].categories == DIAGNOSES
    assert config["prior"]["steps_trained"] == 8
    card = (diagnosis_bundle.bundle / "MODEL_CARD.md").read_text()
    assert "| diagnosis |  | categorical | CN, MCI, AD | CN |" in card
    assert "| sex |  | binary | F, M (codes: 1 = M, 2 = F) |" in card

    out = tmp_path / "synth"
    r = synthbrain("sample", "--bundle", diagnosis_bundle.bundle, "--condition", "diagnosis=AD", "--sex", "M",
                   "--age", "60", "-n", "2", "--seed", "5", "--steps", "2", "--no-measure", "--device", "cpu",
                   "--out", out)
    assert r.returncode == 0, r.stderr
    rows = read_tsv(out / "participants.tsv")
    assert [(row["diagnosis"], row["sex"], float(row["age"])) for row in rows] == [("AD", "M", 60.0)] * 2
    files = sorted(out.glob("sub-*/anat/*_T1w.nii.gz"))
    assert len(files) == 2
    side = json.loads(files[0].with_name(files[0].name.replace(".nii.gz", ".json")).read_text())
    assert side["Conditions"]["diagnosis"] == "AD" and side["Synthetic"] is True


def test_diagnosis_reaches_the_network_and_a_bad_one_is_refused(diagnosis_bundle):
    from synthbrain.sampling import Generator

    gen = Generator.from_bundle(diagnosis_bundle.bundle, device="cpu")
    context, _ = gen.context([{"diagnosis": d} for d in DIAGNOSES])
    np.testing.assert_array_equal(context[:, 0, 2:].numpy(), np.eye(3))  # one-hot after age and sex
    # same noise, another diagnosis: another latent (a prior trained 8 steps moves it too little to
    # survive the codebook snap, so the latent is compared)
    noise = gen.noise([1, 1])
    latents = gen.denoise(noise, context[[2, 0]], steps=2, guidance=2.0)  # AD, CN
    assert (latents[0] - latents[1]).abs().max() > 1e-3
    with pytest.raises(ConditionError) as e:  # what `synthbrain sample --condition diagnosis=flu` prints
        gen.complete({"diagnosis": "flu"})
    assert str(e.value) == "diagnosis = 'flu' is not valid; expected one of CN, MCI, AD"


def test_train_refuses_data_that_breaks_the_schema_naming_subject_and_column(diagnosis_bundle, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copy(diagnosis_bundle.data / "participants.tsv", tmp_path / "participants.tsv")
    data.mkdir()
    rows = read_tsv(tmp_path / "participants.tsv")
    rows[3]["diagnosis"] = "Alzheimer"
    write_tsv(data / "participants.tsv", rows)
    r = synthbrain("train", "prior", "--bundle", diagnosis_bundle.bundle, "--data", data, "--schema",
                   diagnosis_bundle.schema, "--device", "cpu", "--out", tmp_path / "run")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("synthbrain: error: participants.tsv: sub-0004, column 'diagnosis': ")
    assert "'Alzheimer' is not valid; expected one of CN, MCI, AD" in line
    assert not (tmp_path / "run").exists()
