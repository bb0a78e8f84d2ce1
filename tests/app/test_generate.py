"""The Generate page under AppTest: widgets from the schema, sampling on the button only, the result,
its viewer files, the session gallery, errors as one-line messages."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from synthbrain.viz.surfaces import read_mz3

from .app_helpers import nifti_array, open_page, texts, viewer_calls


def sidebar_slider(at, label):
    return next(s for s in at.sidebar.slider if s.label == label)


def generate(at, *, seed=3, steps=2):
    """Fixed seed, few steps, press Generate."""
    if at.sidebar.toggle(key="gen_random_seed").value:
        at.sidebar.toggle(key="gen_random_seed").set_value(False).run()
    at.sidebar.number_input(key="gen_seed").set_value(seed)
    at.sidebar.slider(key="gen_steps").set_value(steps)
    return at.sidebar.button(key="gen_go").click().run()


def test_widgets_follow_the_schema(bundle):
    at = open_page("generate")
    assert not at.exception
    for c in bundle.schema:
        if c.kind == "continuous":
            s = sidebar_slider(at, f"{c.label} ({c.unit})" if c.unit else c.label)
            assert (s.min, s.max) == (c.low, c.high)
            assert c.low <= s.value <= c.high
        else:
            r = next(r for r in at.sidebar.radio if r.label.startswith(c.label))
            assert list(r.options) == list(c.categories)
    steps = at.sidebar.slider(key="gen_steps")
    assert steps.value == bundle.prior.config.default_steps
    assert at.sidebar.slider(key="gen_guidance").value == bundle.prior.config.default_guidance
    # nothing is sampled before the button is pressed
    assert at.session_state["gen_gallery"] == []
    assert not viewer_calls(at)
    page = texts(at)
    assert "not a scan of any person" in page
    assert "phantom" in page  # the demo bundle is trained on the phantom cohort


def test_typical_volumes_follow_age_and_sex(bundle):
    at = open_page("generate")
    vent = sidebar_slider(at, "Ventricular volume (mL)")
    assert vent.disabled  # typical mode: the volumes come from age and sex
    sidebar_slider(at, "Age (years)").set_value(85.0).run()
    old = sidebar_slider(at, "Ventricular volume (mL)").value
    expected = bundle.population.typical(bundle.schema, {"age": 85.0, "sex": "F"})
    assert old == pytest.approx(expected["ventricular_volume"])
    sidebar_slider(at, "Age (years)").set_value(45.0).run()
    young = sidebar_slider(at, "Ventricular volume (mL)").value
    assert young < old  # the phantom's ventricles grow with age
    # moving sliders never samples
    assert at.session_state["gen_gallery"] == []


def test_generate_shows_the_sample_in_the_viewer(bundle):
    at = open_page("generate")
    sidebar_slider(at, "Age (years)").set_value(72.0).run()
    at = generate(at, seed=3)
    assert not at.exception
    (item,) = at.session_state["gen_gallery"]
    assert item.sample.seed == 3 and item.sample.steps == 2
    assert item.sample.conditions["age"] == 72.0
    assert "Sample 1" in texts(at)

    main, solid = viewer_calls(at)
    assert main.spec["sync"] is False and len(main.panels) == 1
    img = main.volume(0)
    assert img.shape == bundle.grid.shape
    np.testing.assert_allclose(img.affine, bundle.grid.affine, atol=1e-4)
    # the browser gets the sample's intensities (int16 + slope), not something else
    np.testing.assert_allclose(nifti_array(img), item.sample.volume.data, atol=1e-4)
    # 3D panel: MZ3 surfaces in mm inside the grid's field of view
    assert solid.panels[0]["view"] == "render" and not solid.panels[0]["layers"]
    verts, faces = read_mz3(solid.surface(0, 0))
    assert len(faces) <= 200_000 and len(verts) > 100
    lo = bundle.grid.affine[:3, 3] - 2 * bundle.grid.spacing
    hi = lo + np.array(bundle.grid.shape) * bundle.grid.spacing + 4 * bundle.grid.spacing
    assert np.all(verts >= lo) and np.all(verts <= hi)

    table = at.table[0].value
    assert list(table["Condition"])[0] == "Age (years)"
    assert list(table["Requested"])[0] == "72.0"
    labels = [b.label for b in at.get("download_button")]
    assert any("NIfTI" in label for label in labels) and any("png" in label for label in labels)

    # what was measured, as overlays on request: the voxel fractions the measured volumes sum, with colour bars
    assert len(main.panels[0]["layers"]) == 1
    at.toggle(key="gen_masks").set_value(True).run()
    main = viewer_calls(at)[0]
    assert main.spec["key"] == "gen_viewer" and len(main.panels[0]["layers"]) == 3
    for k, name in ((1, "brain_volume"), (2, "ventricular_volume")):
        total = float(nifti_array(main.volume(0, k)).sum()) * bundle.grid.voxel_volume_ml
        assert total == pytest.approx(item.measured[name], rel=1e-3), name
        assert "(mL)" in main.panels[0]["layers"][k]["colorbar"]


def test_same_seed_same_brain_new_seed_new_brain():
    at = generate(open_page("generate"), seed=11)
    at = generate(at, seed=11)
    at = generate(at, seed=12)
    a, b, c = (it.sample.volume.data for it in at.session_state["gen_gallery"])
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_gallery_shows_two_samples_side_by_side():
    at = generate(generate(open_page("generate"), seed=1), seed=2)
    assert not at.exception
    gallery = at.session_state["gen_gallery"]
    assert [it.number for it in gallery] == [1, 2]
    assert len(at.get("image")) == 2  # thumbnails
    assert len(viewer_calls(at)) == 2  # slices and 3D; the pair viewer waits for a choice
    at.multiselect(key="gen_pair").set_value([2, 1]).run()
    main, solid, side = viewer_calls(at)
    assert side.spec["sync"] is True and len(side.panels) == 2
    ids = [p["layers"][0]["id"] for p in side.panels]
    assert ids[0] != ids[1]
    # the pair viewer shows the two chosen samples' voxels
    for k, it in enumerate(reversed(gallery)):  # in the order chosen
        np.testing.assert_allclose(nifti_array(side.volume(k)), it.sample.volume.data, atol=1e-4)
    at.button(key="gen_clear").click().run()
    assert at.session_state["gen_gallery"] == []
    assert not viewer_calls(at)



def test_gallery_items_reopen_download_and_delete(media):
    """Every older sample can be shown again, downloaded (NIfTI + sidecar through the exporter) and
    deleted; captions tell same-seed samples apart by steps, guidance, precision and time."""
    from synthbrain.io import volume_from_bytes
    from synthbrain.sampling import resolve_precision

    at = generate(generate(generate(open_page("generate"), seed=1, steps=1), seed=1, steps=2), seed=3, steps=1)
    assert not at.exception
    one, two, three = at.session_state["gen_gallery"]
    captions = [img.proto.imgs[0].caption for img in at.get("image")]  # newest first
    precision = resolve_precision(torch.device("cpu"))  # bf16 on a CPU with AMX tiles, else fp32
    assert captions[2].startswith("Sample 1:") and f"seed 1 · 1 step · guidance 2 · {precision} · " in captions[2]
    assert "seed 1 · 2 steps · guidance 2" in captions[1] and " s at " in captions[1]
    assert at.subheader[0].value == "Sample 3" and at.button(key="gen_open_3").disabled

    at.button(key="gen_open_1").click().run()
    assert at.subheader[0].value == "Sample 1" and at.button(key="gen_open_1").disabled
    np.testing.assert_allclose(nifti_array(viewer_calls(at)[0].volume(0)), one.volume.data, atol=1e-4)

    (button,) = [b for b in at.get("download_button") if b.proto.id.endswith("gen_dl_2")]
    name, blob = media.deferred(button)
    assert name == f"{two.stem}.zip" and "desc-synthetic" in name
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert sorted(z.namelist()) == sorted([f"{two.stem}.nii.gz", f"{two.stem}.json"])
        side = json.loads(z.read(f"{two.stem}.json"))
        vol = volume_from_bytes(z.read(f"{two.stem}.nii.gz"), f"{two.stem}.nii.gz")
    assert side["Synthetic"] is True and side["Seed"] == 1 and side["Steps"] == 2
    np.testing.assert_allclose(vol.data, two.volume.data, atol=1e-6)

    at.multiselect(key="gen_pair").set_value([1, 2]).run()
    at.button(key="gen_del_1").click().run()  # the one shown, and in the pair
    assert not at.exception
    assert [it.number for it in at.session_state["gen_gallery"]] == [2, 3]
    assert at.subheader[0].value == "Sample 3" and at.session_state["gen_pair"] == [2]
    assert len(at.get("image")) == 2 and not any(b.key == "gen_open_1" for b in at.button)

def test_volumes_set_by_hand_reach_the_sampler():
    at = open_page("generate")
    at.sidebar.radio(key="gen_volume_mode").set_value("Set by hand").run()
    vent = next(s for s in at.sidebar.slider if s.label == "Ventricular volume (mL)")
    assert not vent.disabled
    assert vent.value != 50.0 and vent.min <= 50.0 <= vent.max
    vent.set_value(50.0).run()
    at = generate(at)
    assert at.session_state["gen_gallery"][0].sample.conditions["ventricular_volume"] == 50.0


def test_downloads_hold_the_sample_and_its_sidecar(bundle):
    from app_support import results

    at = generate(open_page("generate"), seed=5)
    item = at.session_state["gen_gallery"][0]
    with zipfile.ZipFile(io.BytesIO(results.sample_zip(item))) as z:
        names = sorted(z.namelist())
        assert names == sorted([f"{item.stem}.nii.gz", f"{item.stem}.json"])
        sidecar = json.loads(z.read(f"{item.stem}.json"))
        from synthbrain.io import volume_from_bytes

        vol = volume_from_bytes(z.read(f"{item.stem}.nii.gz"), f"{item.stem}.nii.gz")
    assert sidecar["Synthetic"] is True and sidecar["Seed"] == 5
    np.testing.assert_allclose(vol.data, item.sample.volume.data, atol=1e-6)
    png = results.sample_png(item, bundle.schema)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_bundle_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(tmp_path / "nowhere"))
    at = open_page("generate")
    assert not at.exception
    assert any("bundle folder not found" in e.value for e in at.error)


def test_models_folder_bundles_are_offered(monkeypatch, tmp_path):
    from synthbrain.bundle import demo_bundle_path

    good = tmp_path / "models" / "second"
    good.mkdir(parents=True)
    cfg = json.loads((demo_bundle_path() / "config.json").read_text())
    cfg["name"] = "second-model"
    (good / "config.json").write_text(json.dumps(cfg))   # config only: listed, but cannot load
    bad = tmp_path / "models" / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(tmp_path / "models"))
    at = open_page("generate")
    box = at.sidebar.selectbox[0]
    assert box.label == "Model bundle"
    assert list(box.options) == ["synthbrain-demo (shipped demo)", "second-model"]  # the broken one is left out
    box.select(str(good)).run()
    assert not at.exception
    assert any("autoencoder.safetensors is missing" in e.value for e in at.error)


def test_a_categorical_condition_is_a_select_box_that_reaches_the_sampler(monkeypatch, diagnosis_bundle):
    """A bundle trained with a cohort's schema file (age, coded sex, diagnosis; no volumes): the page
    builds its controls from that schema, a select box for the diagnosis."""
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(diagnosis_bundle.bundle))
    at = open_page("generate")
    assert not at.exception
    box = next(s for s in at.sidebar.selectbox if s.label == "Diagnosis")
    assert list(box.options) == ["CN", "MCI", "AD"] and box.value == "CN"
    assert not any(r.key == "gen_volume_mode" for r in at.sidebar.radio)  # no volumes in this schema
    box.select("AD").run()
    at = generate(at, steps=2)
    assert not at.exception
    (item,) = at.session_state["gen_gallery"]
    assert item.sample.conditions["diagnosis"] == "AD"
    assert "diagnosis AD" in texts(at)
