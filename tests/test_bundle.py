"""The model bundle: save -> load gives identical outputs; damaged bundles are refused clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env

from synthbrain.bundle import copy_bundle, load_bundle, read_config
from synthbrain.errors import BundleError
from synthbrain.models.autoencoder import Autoencoder, AutoencoderConfig
from synthbrain.models.prior import Prior, PriorConfig


def _outputs(bundle) -> dict[str, torch.Tensor]:
    """A reconstruction and a prior prediction of fixed inputs (seeded), from a loaded bundle."""
    x = torch.rand(1, 1, *bundle.grid.shape, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, *bundle.prior.padded_shape, generator=torch.Generator().manual_seed(1))
    ctx = torch.rand(2, 1, bundle.schema.width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return {"recon": bundle.autoencoder.decode(bundle.autoencoder.encode_quantized(x)),
                "prior": bundle.prior(z, torch.tensor([10, 500]), ctx)}


ROUND_TRIP = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_bundle import _outputs
from synthbrain.bundle import load_bundle
torch.save(_outputs(load_bundle(sys.argv[1])), sys.argv[2])
"""


def test_save_load_round_trip_through_files_changes_nothing(tiny_bundle, tmp_path):
    """Save the loaded networks to a new bundle folder, load that in a fresh process: same outputs."""
    from pathlib import Path

    from synthbrain.bundle import save_weights, write_config

    a = load_bundle(tiny_bundle)
    copy = copy_bundle(tiny_bundle, tmp_path / "copy")
    cfg = read_config(copy)
    for component in ("autoencoder", "prior"):
        cfg[component]["sha256"] = save_weights(copy, component, getattr(a, component), cfg[component]["config"])
    write_config(copy, cfg)

    def outputs_in_a_fresh_process(bundle) -> dict[str, torch.Tensor]:
        # both sides in the same kind of process (one thread): bit-equality holds for a given thread count
        out = tmp_path / f"{bundle.name}.pt"
        subprocess.run([sys.executable, "-c", ROUND_TRIP, str(bundle), str(out), str(Path(__file__).parent)],
                       check=True, env=subprocess_env(), capture_output=True)
        return torch.load(out, weights_only=True)

    theirs, mine = outputs_in_a_fresh_process(copy), outputs_in_a_fresh_process(tiny_bundle)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # and they are the outputs of the networks that were saved, computed here before the save (to
    # float tolerance: this process has other threads): a load that dropped weights would differ
    here = _outputs(a)
    assert all(torch.allclose(here[k], theirs[k], rtol=1e-4, atol=1e-5) for k in here)
    # and a fresh network differs, so the comparison above means something
    fresh = Autoencoder(a.autoencoder.config).eval()
    x = torch.rand(1, 1, *a.grid.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(fresh.decode(fresh.encode_quantized(x)), mine["recon"])


def test_bundle_holds_what_the_design_says(tiny_bundle):
    cfg = read_config(tiny_bundle)
    for key in ("format_version", "synthbrain_version", "grid", "intensity", "conditions", "autoencoder", "prior",
                "population"):
        assert key in cfg, key
    assert cfg["grid"]["name"] == "tiny"
    assert cfg["prior"]["latent_scale_factor"] > 0
    for stage in ("autoencoder", "prior"):
        assert cfg[stage]["steps_trained"] == 8 and len(cfg[stage]["sha256"]) == 64
        assert cfg[stage]["data_fingerprint"]["subjects"] > 0
    names = [c["name"] for c in cfg["conditions"]["conditions"]]
    assert names == ["age", "sex", "ventricular_volume", "brain_volume"]
    assert (tiny_bundle / "MODEL_CARD.md").read_text().count("phantom") >= 1
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in tiny_bundle.iterdir()), "no pickles"


def _damaged(tiny_bundle, tmp_path, how: str):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    cfg_path = b / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "truncated weights":
        w = b / "autoencoder.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif how == "flipped byte in weights":
        w = b / "prior.safetensors"
        raw = bytearray(w.read_bytes())
        raw[-10] ^= 0xFF
        w.write_bytes(bytes(raw))
    elif how == "weights of another shape":
        cfg["autoencoder"]["config"]["channels"] = [8, 8, 8]
        cfg["autoencoder"]["config"]["num_res_channels"] = [8, 8, 8]
        cfg_path.write_text(json.dumps(cfg))
    elif how == "missing weights":
        (b / "autoencoder.safetensors").unlink()
    elif how == "config is not JSON":
        cfg_path.write_text("{oops")
    elif how == "future format":
        cfg["format_version"] = 99
        cfg_path.write_text(json.dumps(cfg))
    elif how == "not a bundle":
        shutil.rmtree(b)
        b.mkdir()
    elif how == "no such folder":
        shutil.rmtree(b)
    elif how == "pickle instead of safetensors":  # (and trusted: see test_damaged_bundle_is_refused)
        w = b / "autoencoder.safetensors"
        torch.save({"x": torch.zeros(2)}, w)  # what a careless export might leave
        cfg["autoencoder"].pop("sha256")
        cfg_path.write_text(json.dumps(cfg))
    elif how == "weights flipped, checksum removed":
        w = b / "prior.safetensors"
        raw = bytearray(w.read_bytes())
        raw[-10] ^= 0xFF
        w.write_bytes(bytes(raw))
        cfg["prior"].pop("sha256")
        cfg_path.write_text(json.dumps(cfg))
    elif how in TAMPERED:
        section, key, value = TAMPERED[how]
        target = cfg
        for k in section:
            target = target[k]
        target[key] = value
        cfg_path.write_text(json.dumps(cfg))  # json writes NaN, and reads it back
    return b


# config.json edits that must be refused before anything is allocated: (path, key, value)
TAMPERED = {
    "grid of 1024 per axis": (("grid",), "shape", [1024, 1024, 1024]),
    "grid of 125 M voxels": (("grid",), "shape", [500, 500, 500]),
    "negative spacing": (("grid",), "spacing", -2.0),
    "a million channels": (("autoencoder", "config"), "channels", [1_000_000, 8, 8]),
    "1e10 timesteps": (("prior", "config"), "num_train_timesteps", 10_000_000_000),
    "NaN scale factor": (("prior",), "latent_scale_factor", float("nan")),
    "unknown noise schedule": (("prior", "config"), "schedule", "exotic"),
}


DAMAGE = {
    "truncated weights": "checksum",
    "flipped byte in weights": "checksum",
    "weights of another shape": "does not match its config",
    "missing weights": "autoencoder.safetensors is missing",
    "config is not JSON": "not valid JSON",
    "future format": "format_version 99",
    "not a bundle": "not a model bundle",
    "no such folder": "bundle folder not found",
    "pickle instead of safetensors": "cannot read weights",
    "weights flipped, checksum removed": "has no sha256 for prior.safetensors",
    "grid of 1024 per axis": "too large",
    "grid of 125 M voxels": "too large",
    "negative spacing": "spacing must be in",
    "a million channels": "at most 6 levels of at most 1024",
    "1e10 timesteps": "num_train_timesteps must be in",
    "NaN scale factor": "latent_scale_factor must be finite",
    "unknown noise schedule": "schedule must be one of",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_bundle_is_refused(tiny_bundle, tmp_path, how, monkeypatch):
    from synthbrain.bundle import TRUST_ENV

    b = _damaged(tiny_bundle, tmp_path, how)
    if how == "pickle instead of safetensors":  # trusted, so that the pickle itself is what is refused
        monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.raises(BundleError, match=DAMAGE[how]) as e:
        assert load_bundle(b).scale_factor > 0
    assert "\n" not in str(e.value)


def test_an_unverified_bundle_loads_only_when_trusted(tiny_bundle, tmp_path, monkeypatch):
    from synthbrain.bundle import TRUST_ENV

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    cfg = json.loads((b / "config.json").read_text())
    for c in ("autoencoder", "prior"):
        cfg[c].pop("sha256")
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="--trust-unverified"):
        load_bundle(b)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_bundle(b).prior is not None


@pytest.mark.parametrize("how", ["grid of 1024 per axis", "a million channels", "1e10 timesteps", "NaN scale factor",
                                 "weights flipped, checksum removed"])
def test_cli_refuses_a_tampered_bundle_in_one_line_with_little_memory(tiny_bundle, tmp_path, how):
    """`synthbrain sample` on a tampered bundle: exit 2, one line, no traceback, and the process never
    came near allocating what the config asks for (peak RSS < 1 GB)."""
    b = _damaged(tiny_bundle, tmp_path, how)
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(r.stderr)")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "synthbrain", "sample", "--bundle", str(b),
                        "--steps", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       env=subprocess_env())
    rc, peak_kib = (int(x) for x in r.stdout.split())
    assert rc == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("synthbrain: error:") and DAMAGE[how].split()[0] in r.stderr
    assert peak_kib < 1024**2, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_damaged_bundle_in_one_line(tiny_bundle, tiny_cohort, tmp_path):
    b = _damaged(tiny_bundle, tmp_path, "truncated weights")
    r = subprocess.run([sys.executable, "-m", "synthbrain", "reconstruct", str(tiny_cohort.t1w("sub-0001")),
                        "--bundle", str(b), "--out", str(tmp_path / "rec.nii.gz")],
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2
    assert r.stderr.strip().startswith("synthbrain: error:") and "checksum" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rec.nii.gz").exists()


def test_network_configs_are_validated():
    from synthbrain.errors import ConfigError

    with pytest.raises(ConfigError, match="multiples of norm_num_groups"):
        PriorConfig(channels=(16, 30), attention_levels=(False, True), norm_num_groups=16)
    ae = AutoencoderConfig(channels=(4, 8, 8), num_res_channels=(4, 8, 8))
    assert ae.latent_shape((32, 48, 32)) == (4, 4, 6, 4)
    with pytest.raises(ConfigError, match="not divisible by 8"):
        ae.latent_shape((30, 48, 32))
    assert Prior(PriorConfig(channels=(16, 32), attention_levels=(False, True), norm_num_groups=16),
                 (4, 4, 6, 4), 4).padded_shape == (4, 4, 6, 4)


def test_metrics_of_replaced_weights_are_dropped(tiny_bundle, tmp_path):
    from synthbrain.bundle import save_weights, update_metrics, write_config

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    update_metrics(b, "autoencoder", {"psnr": 30.0})
    update_metrics(b, "prior", {"seconds_per_sample": 1.0})
    cfg = read_config(b)
    bundle = load_bundle(b)
    with torch.no_grad():
        for p in bundle.prior.parameters():
            p.add_(0.01)  # "retrained" prior
    cfg["prior"]["sha256"] = save_weights(b, "prior", bundle.prior, cfg["prior"]["config"])
    write_config(b, cfg)
    metrics = json.loads((b / "metrics.json").read_text())
    assert "autoencoder" in metrics and "prior" not in metrics  # the autoencoder did not change


def test_sampling_defaults_change_without_touching_weights_or_metrics(tiny_bundle, tmp_path):
    from synthbrain.bundle import set_sampling_defaults, update_metrics
    from synthbrain.errors import ConfigError

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    update_metrics(b, "prior", {"seconds_per_sample": 1.0})
    weights = (b / "prior.safetensors").read_bytes()
    set_sampling_defaults(b, steps=4, guidance=3.0)
    cfg = load_bundle(b).prior.config
    assert (cfg.default_steps, cfg.default_guidance) == (4, 3.0)
    assert (b / "prior.safetensors").read_bytes() == weights
    assert "prior" in json.loads((b / "metrics.json").read_text())
    before = (b / "config.json").read_text()
    with pytest.raises(ConfigError, match="default_guidance must be in 0..20"):
        set_sampling_defaults(b, guidance=99.0)
    assert (b / "config.json").read_text() == before


def test_bundle_reproduces_its_final_checkpoints_outputs_exactly(tiny_bundle):
    """The bundle holds the final checkpoint's autoencoder and the prior's EMA weights, bit for bit:
    networks rebuilt from the checkpoints give exactly the bundle's outputs."""
    from safetensors.torch import load_file

    from synthbrain.training.checkpoint import list_checkpoints

    bundle = load_bundle(tiny_bundle)
    runs = tiny_bundle.parent.parent  # .../prior/bundle -> the folder with both runs

    def from_checkpoint(run: str, prefix: str, net: torch.nn.Module) -> torch.nn.Module:
        tensors = load_file(str(list_checkpoints(runs / run)[-1] / "tensors.safetensors"))
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        net.load_state_dict(state)
        return net.eval()

    ae = from_checkpoint("ae", "net/autoencoder/", Autoencoder(bundle.autoencoder.config))
    prior = from_checkpoint("prior", "net/prior_ema/module.",
                            Prior(bundle.prior.config, bundle.prior.latent_shape, bundle.prior.condition_width))
    expected = _outputs(bundle)
    bundle.autoencoder, bundle.prior = ae, prior
    got = _outputs(bundle)
    assert torch.equal(got["recon"], expected["recon"]) and torch.equal(got["prior"], expected["prior"])
    raw = from_checkpoint("prior", "net/prior/", Prior(prior.config, prior.latent_shape, prior.condition_width))
    bundle.prior = raw
    assert not torch.equal(_outputs(bundle)["prior"], expected["prior"]), "the bundle's prior is the EMA"


def test_saving_the_same_weights_twice_gives_the_same_file(tiny_bundle, tmp_path):
    """A checksum in config.json is only useful if a save is deterministic."""
    from synthbrain.bundle import save_weights

    model = load_bundle(tiny_bundle).autoencoder
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert save_weights(a, "autoencoder", model, {"k": 1, "j": 2}) == save_weights(b, "autoencoder", model,
                                                                                    {"k": 1, "j": 2})


def test_weights_cast_to_float16_halve_the_file_and_still_load_as_float32(tiny_bundle, tmp_path):
    from synthbrain.bundle import cast_weights

    path = copy_bundle(tiny_bundle, tmp_path / "b")
    before = (path / "prior.safetensors").stat().st_size
    ref = load_bundle(path).prior.state_dict()
    sha = cast_weights(path, "prior", "float16")
    assert read_config(path)["prior"]["sha256"] == sha and read_config(path)["prior"]["weights_dtype"] == "float16"
    assert (path / "prior.safetensors").stat().st_size < 0.6 * before
    prior = load_bundle(path).prior  # checksummed against the new sha256
    for k, v in prior.state_dict().items():
        assert v.dtype == ref[k].dtype  # cast back to float32 on load
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-3, atol=1e-4)
