"""An imported MONAI model-zoo bundle (the UK Biobank LDM's architecture, tiny and random, made by
``import_monai_zoo`` as ``synthbrain import-bundle`` makes it) in the app: picked in the sidebar from
SYNTHBRAIN_MODELS, Generate and Trajectories without a guidance control, Compare reconstructing a scan
through its KL autoencoder with the whole-head intensity convention, the Model page, and the memory
guard refusing before any work."""

from __future__ import annotations

import pytest

from synthbrain.grids import TINY

from .app_helpers import ROOT, TIMEOUT, frame, texts, viewer_calls


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """SYNTHBRAIN_MODELS with one imported bundle (``ukb``) on the tiny grid."""
    from test_monai_zoo import small_inference, write_zoo

    from synthbrain.importers.monai_zoo import import_monai_zoo

    root = tmp_path_factory.mktemp("imported")
    write_zoo(root / "zoo", small_inference(), layout="generative")
    import_monai_zoo(root / "zoo", root / "models" / "ukb")
    return root / "models"


@pytest.fixture
def imported(models, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    return str(models / "ukb")


def open_with(page: str, bundle_path: str | None = None):
    """app.py on ``page``; ``bundle_path`` chosen in the sidebar's bundle picker."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.switch_page(f"app_pages/{page}.py")
    at.run()
    if bundle_path is not None:
        from app_support.common import bundle_choices

        picker = next(s for s in at.sidebar.selectbox if s.label == "Model bundle")
        label = next(c.label for c in bundle_choices() if c.path == bundle_path)
        assert label in picker.options  # shown by its name
        picker.set_value(bundle_path).run()
    return at


def test_the_imported_bundle_is_picked_and_generates_at_guidance_1_with_no_control(imported):
    from app_support.common import NO_GUIDANCE, bundle_choices

    label = next(c.label for c in bundle_choices() if c.path == imported)
    assert label.startswith("brain_image_synthesis_latent_diffusion_model")
    at = open_with("generate", imported)
    assert not at.exception
    keys = {s.key for s in at.sidebar.slider}
    assert "gen_guidance" not in keys and "gen_steps" in keys  # no guidance slider for a bundle without CFG
    assert NO_GUIDANCE in texts(at)
    assert any(s.label == "Age (normalised, 0-1)" for s in at.sidebar.slider)  # no invented units
    at.sidebar.toggle(key="gen_random_seed").set_value(False).run()
    at.sidebar.slider(key="gen_steps").set_value(2)
    at = at.sidebar.button(key="gen_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (item,) = at.session_state["gen_gallery"]
    assert item.sample.guidance == 1.0 and item.sample.provenance == "synthetic"
    assert item.sample.volume.shape == TINY.shape
    assert "guidance 1 ·" in texts(at)
    # a whole head is not measured (its skull would count as brain): the page says so instead of numbers
    assert item.measured is None and "needs a brain-extracted volume" in item.measure_error
    assert "needs a brain-extracted volume" in texts(at)
    (view, *_) = viewer_calls(at)
    assert view.volume(0).shape == TINY.shape and "not a person" in view.panels[0]["title"]
    # 3D: the head's outline, not a "brain" segmented out of a head with its skull
    surfaces, note = item.surface_set
    assert [s.name for s in surfaces] == ["head.mz3"] and "outer surface of the head" in note
    assert "outer surface of the head" in texts(at)


def test_the_demo_bundle_keeps_its_guidance_slider(imported):
    at = open_with("generate")  # the demo bundle comes first
    assert "gen_guidance" in {s.key for s in at.sidebar.slider}


def test_a_series_without_guidance(imported):
    at = open_with("trajectories", imported)
    assert not at.exception
    assert "traj_guidance" not in {s.key for s in at.sidebar.slider}
    at.sidebar.slider(key="traj_k").set_value(2)
    at.sidebar.slider(key="traj_steps").set_value(1)
    at = at.sidebar.button(key="traj_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    traj = at.session_state["traj_result"]
    assert len(traj.frames) == 2 and traj.guidance == 1.0 and traj.provenance == "synthetic"
    assert all(f.measured is None and "whole heads" in f.measure_error for f in traj.frames)


def test_compare_reconstructs_a_scan_through_the_kl_autoencoder_whole_head_min_max(imported):
    at = open_with("compare", imported)
    assert not at.exception
    assert "KL autoencoder" in texts(at) and "min-max" in texts(at)
    at = at.button(key="cmp_go").click().run()  # the template (the first source)
    assert not at.exception and not at.error, [e.value for e in at.error]
    result = at.session_state["cmp_result"]
    assert result.recon.indices is None  # a continuous latent: no code indices
    assert result.recon_provenance == "derived"  # the template is real data; its reconstruction is derived
    original = result.recon.original.data
    # the bundle's convention: min-max over the whole field of view, no brain mask
    assert original.min() == 0.0 and original.max() == 1.0
    from synthbrain.data.preprocess import preprocess

    masked = preprocess(result.recon.original, TINY)[0].data  # SynthBrain's own convention masks the head away
    assert (original > 0).sum() > (masked > 0).sum()
    tables = [frame(t.value) for t in at.table]
    assert "PSNR in the head" in tables[0]["Metric"] and "PSNR in the brain" not in tables[0]["Metric"]
    figures = dict(zip(tables[1]["Figure"], tables[1]["Value"]))
    assert figures["Latent grid (channels x X x Y x Z)"] == "3 x 4 x 6 x 4"
    assert "continuous" in figures["Latent"] and "Code bits / bits of a 16-bit volume" not in figures
    (view,) = viewer_calls(at)
    assert len(view.panels) == 2


def test_learn_describes_the_kl_autoencoder_and_shows_it(imported):
    """The Learn page follows the bundle's stage 1: a continuous latent, no codebook, no VQ-VAE."""
    at = open_with("learn", imported)
    assert not at.exception, at.exception
    headers = [h.value for h in at.header]
    assert headers[0].startswith("1. The KL autoencoder") and not any("VQ-VAE" in h for h in headers)
    page = texts(at)
    assert "positions with 3 channels" in page and "codebook vectors" not in page and "VQ-VAE" not in page
    at = at.button(key="learn_vq_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("image")) == 3  # the template, its reconstruction and the latent's channels
    assert "codes appear" not in texts(at)
    figures = dict(zip(*(frame(at.table[1].value)[k] for k in ("Figure", "Value"))))
    assert "continuous" in figures["Latent"]


def test_model_page_shows_the_imported_card(imported):
    at = open_with("model", imported)
    assert not at.exception and not at.error
    assert "Pinaya" in texts(at)


def test_too_little_memory_is_refused_in_one_line_before_sampling(imported, monkeypatch):
    import synthbrain.memory

    at = open_with("generate", imported)
    monkeypatch.setattr(synthbrain.memory, "available_bytes", lambda device=None: 2**20)  # 1 MB free
    from synthbrain.models.prior import Prior

    calls = []
    monkeypatch.setattr(Prior, "forward", lambda *a, **k: calls.append(1))
    at.sidebar.slider(key="gen_steps").set_value(2)
    at = at.sidebar.button(key="gen_go").click().run()
    assert not at.exception
    (error,) = at.error
    assert "needs about" in error.value and "only 1 MB is free" in error.value and "\n" not in error.value
    assert not calls and at.session_state["gen_gallery"] == []  # refused before the first denoising step
