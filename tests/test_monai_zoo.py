"""Importing the MONAI model zoo's UK Biobank brain LDM (``synthbrain import-bundle``).

The real bundle is not here (and is never downloaded): the tests build its exact architecture
classes (MONAI AutoencoderKL + DiffusionModelUNet, the same arguments but few channels) with random
weights, save them with ``torch.save(state_dict)`` in both key layouts the model zoo has shipped, in
its folder layout with its config files, and import that. The real sizes are built on the ``meta``
device only, to check the key mapping and the parameter counts.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthbrain.bundle import load_bundle, read_config
from synthbrain.errors import BundleError, ConditionError, ConfigError
from synthbrain.grids import FULL, TINY
from synthbrain.importers.monai_zoo import import_monai_zoo, map_state_dict, read_zoo_bundle
from synthbrain.testing import UKB_LDM_INFERENCE

METADATA = {"version": "1.0.0", "authors": "Walter H. L. Pinaya, Petru-Daniel Tudosiu, et al.",
            "copyright": "Copyright (c) MONAI Consortium", "data_source": "https://www.ukbiobank.ac.uk/",
            "eval_metrics": {"fid": 0.0076, "msssim": 0.6555, "4gmsssim": 0.3883},
            "intended_use": "This is a research tool/prototype and not to be used clinically",
            "references": ["Pinaya, Walter HL, et al. \"Brain imaging generation with latent diffusion models.\""],
            "network_data_format": {"outputs": {"pred": {"spatial_shape": [160, 224, 160]}}}}


def small_inference() -> dict:
    """The same classes and arguments with few channels, on the tiny grid (latent 3 x 4 x 6 x 4)."""
    inf = copy.deepcopy(UKB_LDM_INFERENCE)
    inf["autoencoder_def"].update(channels=[8, 8, 8, 8], norm_num_groups=4)
    inf["diffusion_def"].update(channels=[8, 16, 16], norm_num_groups=4, num_head_channels=[0, 8, 16])
    inf["noise"] = "$torch.randn((1, 3, 4, 6, 4)).to(@device)"
    return inf


def build_networks(inf: dict, device: str = "cpu"):
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    def args(d):
        return {k: v for k, v in d.items() if not k.startswith("_")}

    torch.manual_seed(0)
    with torch.device(device):
        return AutoencoderKL(**args(inf["autoencoder_def"])), DiffusionModelUNet(**args(inf["diffusion_def"]))


def generative_layout(state: dict) -> dict:
    """MONAI-core keys -> the GenerativeModels package's names for these two architectures (what MONAI's
    load_old_state_dict maps back): upsampling convolutions were ``conv`` (now ``postconv``), cross-
    attention outputs ``to_out.0`` (now ``out_proj``)."""
    out = {}
    for k, v in state.items():
        k = k.replace(".postconv.", ".conv.")
        out[re.sub(r"(transformer_blocks\.\d+\.attn\d)\.out_proj\.", r"\1.to_out.0.", k)] = v
    return out


def write_zoo(root: Path, inf: dict, layout: str = "monai", old_names: bool = False, metadata: dict | None = None):
    """A model-zoo folder: configs, LICENSE, weights in ``layout`` (``monai`` or ``generative``)."""
    ae, unet = build_networks(inf)
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "docs").mkdir()
    inf = copy.deepcopy(inf)
    inf["load_old"] = int(layout == "generative")
    names = ("autoencoder.pth", "diffusion_model.pth") if old_names else ("autoencoder.pt", "model.pt")
    if old_names:
        inf["load_autoencoder_path"] = "$@model_dir + '/autoencoder.pth'"
        inf["load_diffusion_path"] = "$@model_dir + '/diffusion_model.pth'"
    (root / "configs" / "inference.json").write_text(json.dumps(inf, indent=4))
    meta = copy.deepcopy(METADATA if metadata is None else metadata)
    latent = [int(v) for v in re.findall(r"\d+", re.search(r"randn\(\((.*?)\)\)", inf["noise"]).group(1))]
    shape = [s * 8 for s in latent[2:]]  # the autoencoder's 4 levels halve 3 times
    meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] = shape
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    (root / "LICENSE").write_text("                                 Apache License\n"
                                  "                           Version 2.0, January 2004\n")
    (root / "docs" / "README.md").write_text("# Brain Imaging Generation with Latent Diffusion Models\n")
    for net, name in zip((ae, unet), names):
        state = net.state_dict()
        torch.save(generative_layout(state) if layout == "generative" else state, root / "models" / name)
    return ae.eval(), unet.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "brain_image_synthesis_latent_diffusion_model"
    ae, unet = write_zoo(root, small_inference(), layout="generative")
    return root, ae, unet


@pytest.fixture(scope="module")
def imported(zoo, tmp_path_factory):
    return import_monai_zoo(zoo[0], tmp_path_factory.mktemp("imported") / "ukb")


# ------------------------------------------------------------------------------------------ mapping


@pytest.mark.parametrize("layout,old_names", [("generative", False), ("monai", True)])
def test_both_key_layouts_import_to_monais_own_networks(tmp_path, layout, old_names):
    root = tmp_path / "zoo"
    ae, unet = write_zoo(root, small_inference(), layout=layout, old_names=old_names)
    out = import_monai_zoo(root, tmp_path / "bundle")
    cfg = read_config(out)
    assert cfg["autoencoder"]["imported_from"]["key_layout"] == layout
    assert cfg["prior"]["imported_from"]["file"] == ("models/diffusion_model.pth" if old_names else "models/model.pt")
    b = load_bundle(out)
    # what MONAI itself loads from these files (load_old_state_dict for the old layout) computes the same
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    inf = small_inference()
    ref_ae = AutoencoderKL(**{k: v for k, v in inf["autoencoder_def"].items() if not k.startswith("_")})
    ref_unet = DiffusionModelUNet(**{k: v for k, v in inf["diffusion_def"].items() if not k.startswith("_")})
    for net, name in ((ref_ae, "autoencoder"), (ref_unet, "model" if not old_names else "diffusion_model")):
        state = torch.load(root / "models" / f"{name}.pt{'h' if old_names else ''}", weights_only=True)
        (net.load_old_state_dict if layout == "generative" else net.load_state_dict)(state)
        net.eval()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 3, 4, 6, 4, generator=g)
    x = torch.randn(1, 3, 4, 8, 4, generator=g)  # the prior's padded latent
    ctx = torch.rand(1, 1, 4, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(b.autoencoder.decode(z), ref_ae.decode_stage_2_outputs(z))
        cond = ctx[:, 0, :, None, None, None].expand(-1, -1, *x.shape[2:])
        assert torch.equal(b.prior(x, t, ctx), ref_unet(torch.cat([x, cond], 1), timesteps=t, context=ctx))
        assert torch.equal(b.autoencoder.decode(z), ae.decode(z))  # and the network that was saved


def test_real_sizes_map_on_the_meta_device(tmp_path):
    """The published architecture (13.8 M + 553 M parameters) in the old layout maps key for key."""
    root = tmp_path / "zoo"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(UKB_LDM_INFERENCE))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA))
    for name in ("autoencoder.pt", "model.pt"):
        (root / "models" / name).write_bytes(b"")
    zoo = read_zoo_bundle(root)
    assert zoo.latent_shape == (3, 20, 28, 20) and zoo.image_shape == FULL.shape
    assert zoo.reference["steps"] == 50 and zoo.prior.classifier_free_guidance is False
    ae, unet = build_networks(UKB_LDM_INFERENCE, device="meta")
    assert sum(p.numel() for p in ae.parameters()) == 13_766_248
    assert sum(p.numel() for p in unet.parameters()) == 553_168_899
    for net in (ae, unet):
        old = generative_layout(net.state_dict())
        assert set(old) != set(net.state_dict())  # the layouts differ for these networks
        mapped, layout = map_state_dict(net, old, root / "models" / "x.pt")
        assert layout == "generative" and set(mapped) == set(net.state_dict())
        assert all(mapped[k] is old[generative_layout({k: 0}).popitem()[0]] for k in mapped)


# ------------------------------------------------------------------------------------------ the bundle


def test_imported_bundle_samples_two_steps_on_its_grid_without_guidance(imported):
    from synthbrain.sampling import Generator, sample_sidecar

    cfg = read_config(imported)
    assert cfg["grid"]["name"] == "tiny" and cfg["intensity"]["whole_head"] is True
    assert cfg["prior"]["latent_scale_factor"] == 1.0
    assert cfg["source"]["licence"]["title"].startswith("Apache License")
    card = (imported / "MODEL_CARD.md").read_text()
    for text in ("Pinaya", "Apache License", "not published", "normalised", "No classifier-free guidance"):
        assert text in card
    gen = Generator(load_bundle(imported), device="cpu")
    batches = []
    gen.prior.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    s = gen.sample({"age": 0.7, "sex": 1.0}, n=1, seed=3, steps=2)[0]
    assert batches == [1, 1]  # one pass a step: no unconditional half
    assert s.volume.data.shape == TINY.shape and np.allclose(s.volume.affine, TINY.affine)
    assert s.volume.data.min() >= 0.0 and s.volume.data.max() <= 1.0 and s.volume.data.std() > 0
    assert s.provenance == "synthetic" and s.guidance == 1.0
    assert sample_sidecar(s, gen.bundle)["Provenance"] == "synthetic"
    assert np.array_equal(gen.sample({"age": 0.7, "sex": 1.0}, seed=3, steps=2)[0].volume.data, s.volume.data)
    with pytest.raises(ConfigError, match="without classifier-free guidance"):
        gen.sample({}, steps=2, guidance=2.0)


def test_conditions_are_normalised_unless_a_mapping_states_units(zoo, imported, tmp_path):
    schema = load_bundle(imported, components=()).schema
    assert schema.names == ["sex", "age", "ventricular_volume", "brain_volume"]  # the bundle's order
    assert schema["sex"].categories == ("0", "1") and "code" in schema["sex"].label  # the bundle's 0/1, unlabelled
    assert all(c.unit == "" and "normalised" in c.label and (c.low, c.high) == (0.0, 1.0) for c in schema
               if c.name != "sex")
    assert schema.defaults() == {"sex": "0", "age": 0.1, "ventricular_volume": 0.2, "brain_volume": 0.4}
    mapping = tmp_path / "units.json"
    mapping.write_text(json.dumps({"age": {"unit": "years", "low": 44, "high": 82},
                                   "brain_vol": {"unit": "mL", "low": 900, "high": 1600},
                                   "gender": {"categories": ["F", "M"]}}))
    out = import_monai_zoo(zoo[0], tmp_path / "mapped", mapping_file=mapping)
    mapped = load_bundle(out, components=()).schema
    assert (mapped["age"].unit, mapped["age"].low, mapped["age"].high) == ("years", 44.0, 82.0)
    assert mapped["brain_volume"].unit == "mL" and mapped["ventricular_volume"].unit == ""  # not named: normalised
    # the same model input: 63 years is normalised (63 - 44) / (82 - 44) = 0.5
    assert np.allclose(mapped.encode({"age": 63, "sex": "M", "brain_volume": 1250, "ventricular_volume": 0.2}),
                       [1.0, 0.5, 0.2, 0.5])
    assert read_config(out)["conditions_mapping"]["stated_by"].startswith("the user")
    mapping.write_text(json.dumps({"age": {"low": 44, "high": 82}}))
    with pytest.raises(ConditionError, match="age has no unit"):
        import_monai_zoo(zoo[0], tmp_path / "no-unit", mapping_file=mapping)
    assert not (tmp_path / "no-unit").exists()


# ------------------------------------------------------------------------------------------ refusals


def _resave(root: Path, name: str, change) -> None:
    f = root / "models" / name
    state = torch.load(f, weights_only=True)
    torch.save(change(state), f)


def _damage(kind: str, root: Path) -> str:
    """Damage a good zoo folder; return what the one-line error must say."""
    inf_path = root / "configs" / "inference.json"
    inf = json.loads(inf_path.read_text())
    if kind == "no-weights":
        (root / "models" / "model.pt").unlink()
        return r"models: no model\.pt or diffusion_model\.pth"
    if kind == "truncated":
        f = root / "models" / "autoencoder.pt"
        f.write_bytes(f.read_bytes()[:5000])
        return r"autoencoder\.pt: (not a PyTorch checkpoint|cannot be read)"
    if kind == "extra-key":
        _resave(root, "model.pt", lambda s: {**s, "surprise.weight": torch.zeros(2)})
        return r"model\.pt: key 'surprise\.weight'"
    if kind == "missing-key":
        _resave(root, "autoencoder.pt", lambda s: {k: v for k, v in s.items() if k != "quant_conv_mu.conv.weight"})
        return r"autoencoder\.pt: .*'quant_conv_mu\.conv\.weight'"
    if kind == "wrapped":
        _resave(root, "model.pt", lambda s: {"state_dict": s, "epoch": 3})
        return r"model\.pt: key 'state_dict' holds a dict, not a tensor"
    if kind == "mismatched-architecture":  # configs say 16 channels where the weights have 8
        inf["autoencoder_def"]["channels"] = [16, 16, 16, 16]
        inf_path.write_text(json.dumps(inf))
        return r"autoencoder\.pt: .* has shape"
    if kind == "unknown-argument":
        inf["diffusion_def"]["num_class_embeds"] = 3
        inf_path.write_text(json.dumps(inf))
        return r"diffusion_def\.num_class_embeds = 3 is not supported"
    if kind == "conditioning-order":
        inf["conditioning"] = "$torch.tensor([[@age, @gender, @ventricular_vol, @brain_vol]])"
        inf_path.write_text(json.dumps(inf))
        return r"conditioning is \['age', 'gender'"
    raise AssertionError(kind)


DAMAGE = ("no-weights", "truncated", "extra-key", "missing-key", "wrapped", "mismatched-architecture",
          "unknown-argument", "conditioning-order")


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_or_mismatched_bundle_is_refused_naming_file_and_key(zoo, tmp_path, kind):
    import shutil

    root = tmp_path / "zoo"
    shutil.copytree(zoo[0], root)
    expected = _damage(kind, root)
    with pytest.raises(BundleError, match=expected):
        import_monai_zoo(root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_cli_imports_and_refuses_in_one_line(zoo, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "synthbrain", "import-bundle", *map(str, args)],
                              capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)

    good = run(zoo[0], "--out", tmp_path / "ok")
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "ok" / "prior.safetensors").is_file() and "imported" in good.stdout
    again = run(zoo[0], "--out", tmp_path / "ok")  # an existing bundle is not overwritten
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not an empty folder" in again.stderr
    missing = run(tmp_path / "nowhere", "--out", tmp_path / "x")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "nowhere: folder not found" in missing.stderr
    parent = run(zoo[0].parent, "--out", tmp_path / "y")  # the folder the bundle was downloaded into
    assert parent.returncode == 2 and f"did you mean {zoo[0]}?" in parent.stderr


# ------------------------------------------------------------------------------------------ sampling on a CPU


def test_sliced_decode_equals_the_whole_decode_without_running_a_block_whole(imported):
    from synthbrain.sampling import Generator

    b = load_bundle(imported)
    z = torch.randn(1, 3, 4, 6, 4, generator=torch.Generator().manual_seed(2))
    calls = []
    for blk in b.autoencoder.net.decoder.blocks:
        blk.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        whole = b.autoencoder.decode(z)
        assert calls  # the hooks see a whole decode
        # uneven slabs, even ones, one slab; upsamplings stored, or recomputed where they feed a residual block
        for rows, lazy in ((5, 0), (8, 1 << 30), (64, 0)):
            calls.clear()
            sliced = b.autoencoder.decode_sliced(z, rows=rows, lazy_bytes=lazy)
            assert not calls  # every block ran in slabs, none on the whole tensor
            assert sliced.shape == whole.shape == (1, 1, *TINY.shape)
            assert (sliced - whole).abs().max() <= 1e-5 * max(1.0, float(whole.abs().max()))
    gens = {d: Generator(b, device="cpu", precision="fp32", decode=d) for d in ("whole", "sliced")}
    assert Generator(b, device="cpu").sliced_decode is False  # auto: only at the 1 mm grid
    vols = {d: g.sample({"age": 0.3}, seed=1, steps=2)[0].volume.data for d, g in gens.items()}
    assert np.abs(vols["whole"] - vols["sliced"]).max() <= 1e-5


def test_a_bf16_sliced_decode_is_the_fp32_whole_decode_within_the_stated_tolerance(imported):
    """What ``precision auto`` decodes with on a CPU with AMX tiles (bf16 under autocast, sliced), on any
    CPU: within 40 dB PSNR of the fp32 whole decode over its value range (measured at 1 mm on the real
    architecture: 54.7 dB, benchmarks/results.md), and the volume stays float32 in [0, 1]."""
    from synthbrain.sampling import Generator, autocast

    b = load_bundle(imported)
    z = torch.randn(1, 3, 4, 6, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = b.autoencoder.decode(z)
        with autocast(torch.device("cpu"), "bf16"):
            low = b.autoencoder.decode_sliced(z, rows=5)
    assert low.dtype == torch.bfloat16  # it did run in bf16
    err = (low.float() - whole).pow(2).mean()
    assert 10 * torch.log10((whole.max() - whole.min()) ** 2 / err) >= 40.0
    vol = Generator(b, device="cpu", precision="bf16", decode="sliced").sample({"age": 0.3}, seed=1, steps=2)[0]
    assert vol.volume.data.dtype == np.float32 and vol.volume.data.min() >= 0.0 and vol.volume.data.max() <= 1.0
    assert vol.info["precision"] == "bf16"


def test_few_step_solver_runs_on_the_bundles_own_schedule(imported):
    from monai.networks.schedulers import DDIMScheduler

    from synthbrain.sampling import Generator

    gen = Generator(load_bundle(imported), device="cpu")
    ref = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205,
                        clip_sample=False)
    solver = gen.new_scheduler(4)
    assert torch.allclose(solver.betas, ref.betas.float()) and solver.config.prediction_type == "epsilon"
    assert solver.config.algorithm_type == "dpmsolver++" and len(solver.timesteps) == 4
    assert gen.config.default_steps < 50  # fewer than the reference's 50 DDIM steps


@pytest.mark.slow
def test_a_full_grid_import_samples_a_1mm_volume_with_the_grids_affine(tmp_path):
    """The published latent shape (3 x 20 x 28 x 20): a 160 x 224 x 160 brain on the full grid, decoded
    in slabs (auto on a CPU at 1 mm), with the full grid's affine."""
    from synthbrain.sampling import Generator

    inf = small_inference()
    inf["noise"] = UKB_LDM_INFERENCE["noise"]
    inf["autoencoder_def"].update(channels=[4, 4, 4, 4], norm_num_groups=2)
    write_zoo(tmp_path / "zoo", inf, layout="monai")
    gen = Generator.from_bundle(import_monai_zoo(tmp_path / "zoo", tmp_path / "bundle"), device="cpu")
    assert gen.grid.name == "full" and gen.sliced_decode
    s = gen.sample({"age": 0.5}, steps=2)[0]
    assert s.volume.data.shape == (160, 224, 160) and np.array_equal(s.volume.affine, FULL.affine)
    assert s.provenance == "synthetic"


def test_evaluate_autoencoder_reads_whole_heads_by_the_bundles_convention(imported, tmp_path):
    """`synthbrain evaluate autoencoder` on an imported (KL, whole-head) bundle: the cohort's whole-head
    T1s are cached min-max over the field of view with the skull kept (apart from brain-extracted
    derivatives), reconstructed through the KL autoencoder; no codebook figures."""
    import nibabel as nib
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.conditions import ConditionSchema
    from synthbrain.data import native
    from synthbrain.data.bids import BIDSDataset
    from synthbrain.data.template import load_template
    from synthbrain.evaluation import evaluate_autoencoder
    from synthbrain.io import read_volume

    mni = read_volume(MNI152_FILE_PATH)
    head = native.head_with_shell(mni)
    root = tmp_path / "heads"
    for label, data in (("sub-01", head), ("sub-02", 0.8 * head)):
        (root / label / "anat").mkdir(parents=True)
        nib.save(nib.Nifti1Image(data.astype(np.float32), mni.affine), root / label / "anat" / f"{label}_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    result = evaluate_autoencoder(imported, root)
    assert result["subjects"] == 2 and np.isfinite(result["psnr"]) and "codebook_usage" not in result
    ds = BIDSDataset(root, grid=TINY, schema=ConditionSchema(()), intensity=read_config(imported)["intensity"])
    cached = ds.preprocessed_path(0)
    assert "desc-wholehead" in cached.name
    vol = read_volume(cached).data
    assert vol.max() == pytest.approx(1.0) and vol.min() == pytest.approx(0.0)
    outside = load_template(TINY).brain < 0.01
    assert vol[outside].max() > 0.5  # the scalp is kept (a brain-extracted derivative is zero there)
    assert np.array_equal(result["latent_shape"], [3, 4, 6, 4])
