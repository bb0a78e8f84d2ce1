"""The Learn page under AppTest: its four sections, the VQ-VAE pictures and the denoising strip
after their buttons (from the live model), and the latent pictures it is built from."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from synthbrain.bundle import demo_bundle_path

from .app_helpers import frame, open_page, texts

SECTIONS = ["1. The VQ-VAE", "2. The prior", "3. Why synthetic data protects privacy", "4. The limits of this model"]


def png(media, image) -> Image.Image:
    return Image.open(io.BytesIO(media(image.value[0])))


def test_sections_render_with_the_models_numbers_and_nothing_runs_before_a_button(bundle):
    at = open_page("learn")
    assert not at.exception
    headers = [h.value for h in at.header]
    assert [next(h for h in headers if h.startswith(s)) for s in SECTIONS]
    page = texts(at)
    grid, ae = bundle.grid, bundle.autoencoder.config
    c, *lat = ae.latent_shape(grid.shape)
    assert f"{int(np.prod(grid.shape)):,} voxels" in page
    assert f"{' x '.join(map(str, lat))} = {int(np.prod(lat)):,} positions with {c} channels" in page
    assert f"nearest of {ae.num_embeddings} learned codebook vectors" in page
    assert "memorise" in page and "differential privacy" in page
    steps = bundle.config["prior"]["steps_trained"]
    assert f"Prior: trained for {steps} steps" in page and "phantom" in page
    assert not at.get("image") and not at.table  # heavy pictures wait for their buttons


def test_vqvae_pictures_after_the_button(bundle, media):
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.io import read_volume
    from synthbrain.reconstruction import reconstruct

    at = open_page("learn")
    at.button(key="learn_vq_go").click().run()
    assert not at.exception
    scan, recon, latent = at.get("image")
    for image in (scan, recon, latent):
        assert png(media, image).size[0] >= 600
    metrics = frame(at.table[0].value)
    want = reconstruct(bundle, read_volume(MNI152_FILE_PATH)).metrics
    assert metrics["Metric"][0] == "PSNR" and metrics["Value"][0] == pytest.approx(want["psnr"], abs=1e-3)
    assert "Latent values per voxel" in frame(at.table[1].value)["Figure"]
    assert "codes appear in this scan" in texts(at)
    # kept for the session: the pictures stay through other reruns
    at.slider(key="learn_steps").set_value(3).run()
    assert len(at.get("image")) == 3


def test_denoising_strip_after_the_button(media, bundle):
    from synthbrain.sampling import Generator
    from synthbrain.viz.latent import denoising_png

    at = open_page("learn")
    at.slider(key="learn_steps").set_value(2).run()
    assert not at.get("image")
    at.button(key="learn_steps_go").click().run()
    assert not at.exception
    (strip,) = at.get("image")
    img = png(media, strip)
    assert img.size[0] >= 1000 and np.asarray(img.convert("L")).std() > 10
    assert "one channel of the latent" in strip.captions[0]
    # what it shows: the library's denoising of seed 0 in 2 steps (the noise, step 1, step 2), and
    # its last frame is the brain sample() makes with the same seed and steps
    generator = Generator(bundle, device="cpu")
    frames = list(generator.denoising_steps(None, seed=0, steps=2))
    assert [f.label for f in frames] == ["noise", "step 1 of 2", "step 2 of 2"]
    want = Image.open(io.BytesIO(denoising_png([f.latent for f in frames], [f.volume for f in frames],
                                                [f.label for f in frames])))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(want))
    (sample,) = generator.sample(None, seed=0, steps=2)
    np.testing.assert_array_equal(frames[-1].volume.data, sample.volume.data)
    # a different seed is a different sample
    at.number_input(key="learn_seed").set_value(5).run()
    assert media(at.get("image")[0].value[0]) != media(strip.value[0])


def test_a_bundle_without_a_prior_says_so(monkeypatch, tmp_path):
    folder = shutil.copytree(demo_bundle_path(), tmp_path / "bundle")
    (folder / "prior.safetensors").unlink()
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("prior")
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page("learn")
    assert not at.exception
    assert any("has no prior" in w.value for w in at.warning)
    assert not any(b.key == "learn_steps_go" for b in at.button)


# --------------------------------------------------------------------------------- latent pictures


def test_latent_png_shows_codes_and_channels():
    from synthbrain.viz.latent import latent_png

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(4, 10, 14, 10)).astype(np.float32)
    indices = rng.integers(0, 512, size=(10, 14, 10))
    img = Image.open(io.BytesIO(latent_png(latent, indices, n_slices=5, width_px=800)))
    assert img.size[0] == 800
    assert img.size[1] > img.size[0] * 0.9  # five rows: the codes and four channels
    few = Image.open(io.BytesIO(latent_png(latent, indices, max_channels=1, width_px=800)))
    assert few.size[1] < img.size[1] / 2
    with pytest.raises(ValueError, match="latent"):
        latent_png(latent, indices[:5])
    # a continuous (KL) latent has no codes: its channels only, one row fewer
    kl = Image.open(io.BytesIO(latent_png(latent, None, n_slices=5, width_px=800)))
    assert kl.size[0] == 800 and kl.size[1] == pytest.approx(img.size[1] * 4 / 5, rel=0.02)


def test_denoising_png_needs_matching_inputs():
    from synthbrain.grids import DEMO
    from synthbrain.io import Volume
    from synthbrain.viz.latent import denoising_png

    z = np.zeros((4, 10, 14, 10), np.float32)
    v = Volume(np.zeros(DEMO.shape, np.float32), DEMO.affine)
    img = Image.open(io.BytesIO(denoising_png([z, z + 1], [v, v], ["noise", "step 1"], width_px=600)))
    assert img.size[0] == 600
    with pytest.raises(ValueError, match="as many"):
        denoising_png([z], [v, v], ["noise"])
