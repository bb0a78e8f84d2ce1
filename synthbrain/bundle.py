"""The model bundle: the unit of exchange between training, the CLI, the app and the tests.

A folder::

    config.json               format_version, synthbrain version, grid, intensity normalisation,
                              condition schema, autoencoder / prior configs, latent scale factor,
                              training data fingerprints, seeds, steps trained, sha256 of weights
    autoencoder.safetensors   weights only (safetensors, the model config in its metadata)
    prior.safetensors         (once stage 2 is trained)
    metrics.json              what ``synthbrain evaluate`` measured
    MODEL_CARD.md             data, commands, metrics, limits, intended use

:func:`load_bundle` is the one way to read it; nothing is unpickled, and a bundle that is missing
files, corrupt, truncated or does not match its config is refused with a ``BundleError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from synthbrain.conditions import ConditionSchema
from synthbrain.errors import BundleError, SynthBrainError
from synthbrain.grids import Grid

FORMAT_VERSION = 1
# What a bundle may imply before anything of it is allocated (the published UK Biobank prior has
# 553 M parameters; a 1 mm decode of its autoencoder peaks near 13 GB):
MAX_PARAMETERS = 1_000_000_000          # per network
MAX_ACTIVATION_BYTES = 32 * 1024**3     # the largest feature maps of one volume's forward pass, estimated
TRUST_ENV = "SYNTHBRAIN_TRUST_UNVERIFIED"  # "1": load a bundle whose config.json has no checksums
COMPONENTS = ("autoencoder", "prior")
TRAINING_LOG_SUFFIX = "_training.csv"  # <stage>_training.csv: the run's metrics.csv, kept with the weights
INTENSITY = {"method": "divide by the 99.5th percentile of brain voxels, clip to [0, 1]",
             "range": [0.0, 1.0], "background": 0.0}


def demo_bundle_path() -> Path:
    """The demo bundle shipped inside the package (demo grid, trained on the phantom cohort)."""
    return Path(str(resources.files("synthbrain") / "assets" / "demo"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded bundle. ``autoencoder`` / ``prior`` are eval-mode torch modules (``prior`` may be None)."""

    path: Path | None
    config: dict
    grid: Grid
    schema: ConditionSchema
    autoencoder: Any = None
    prior: Any = None
    metrics: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name") or (self.path.name if self.path else "bundle")

    @property
    def scale_factor(self) -> float:
        """The latent scale factor the prior was trained with (saved once, never recomputed)."""
        try:
            value = float(self.config["prior"]["latent_scale_factor"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{self.path}: config.json has no prior.latent_scale_factor") from None
        if not (math.isfinite(value) and value > 0):
            raise BundleError(f"{self.path}: config.json: prior.latent_scale_factor must be finite and > 0, "
                              f"got {value}")
        return value

    @property
    def population(self):
        """Age- and sex-typical volumes of the prior's training data (see synthbrain.population)."""
        from synthbrain.population import PopulationModel

        return PopulationModel.from_dict(self.config.get("population"))

    def trained_on(self, stage: str, dataset) -> bool:
        """Whether ``dataset`` (a BIDSDataset) is the data ``stage`` was trained on, or a larger phantom
        cohort of the same seed and grid (whose first subjects are the same files): by how it was
        generated or, for real data, by name and subject labels. Then its recorded held-out subjects
        are the same people."""
        trained = self.config.get(stage, {}).get("data_fingerprint", {})
        here = dataset.fingerprint()
        made_by, made_here = trained.get("generated_by"), here.get("generated_by")
        if made_by and made_here:
            return _cohort_family(made_by) == _cohort_family(made_here)
        held = set(self.config.get(stage, {}).get("val_subjects", []))
        return bool(trained) and trained.get("name") == here.get("name") and held <= set(dataset.labels)

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    @property
    def card(self) -> str:
        p = self.path / "MODEL_CARD.md" if self.path else None
        return p.read_text() if p and p.is_file() else ""


def _cohort_family(command: str) -> str:
    """``synthbrain cohort --n 240 --grid demo --seed 2026`` without its ``--n``: cohorts that differ only
    in size share their first subjects."""
    words = command.split()
    return " ".join(w for i, w in enumerate(words) if w != "--n" and (i == 0 or words[i - 1] != "--n"))


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object, or one-line :class:`BundleError`."""
    if not path.is_file():
        raise BundleError(f"{path.parent}: not a model bundle (no {path.name})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BundleError(f"{path}: {what} must be a JSON object")
    return d


def read_config(path: str | Path) -> dict:
    """A bundle's config.json, checked for format version and required keys (no weights loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle folder not found")
    cfg = read_json_object(path / "config.json", "config.json")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format_version {version!r} is not supported (this synthbrain reads "
                          f"{FORMAT_VERSION})")
    for key in ("grid", "conditions", "autoencoder"):
        if key not in cfg:
            raise BundleError(f"{path}/config.json: missing {key!r}")
    return cfg


def _networks(cfg: dict, grid: Grid, schema: ConditionSchema, components: tuple[str, ...]) -> dict:
    """The networks a config describes, built on PyTorch's ``meta`` device: no memory is allocated."""
    import torch

    from synthbrain.models.autoencoder import autoencoder_config_from_dict, build_autoencoder

    out = {}
    with torch.device("meta"):
        ae_cfg = autoencoder_config_from_dict(cfg["autoencoder"]["config"])
        if "autoencoder" in components:
            out["autoencoder"] = build_autoencoder(ae_cfg)
        if "prior" in components and "prior" in cfg:
            from synthbrain.models.prior import Prior, PriorConfig

            out["prior"] = Prior(PriorConfig.from_dict(cfg["prior"]["config"]),
                                 latent_shape=ae_cfg.latent_shape(grid.shape), condition_width=schema.width)
    return out


def implied_size(cfg: dict, grid: Grid, schema: ConditionSchema, components: tuple[str, ...] = COMPONENTS) -> dict:
    """Parameters of each network, and an estimate of the largest feature maps of one volume's pass
    through the autoencoder (bytes, float32: the widest level's channels at its resolution, times a
    few live tensors), from the config alone."""
    nets = _networks(cfg, grid, schema, components)
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    from synthbrain.models.autoencoder import autoencoder_config_from_dict

    widest = autoencoder_config_from_dict(cfg["autoencoder"]["config"]).feature_map_elements(grid.shape)
    return {"parameters": params, "activation_bytes": 4 * 4 * widest}


def _check_size(path: Path, cfg: dict, grid: Grid, schema: ConditionSchema, components: tuple[str, ...]) -> None:
    size = implied_size(cfg, grid, schema, components)
    for name, n in size["parameters"].items():
        if n > MAX_PARAMETERS:
            raise BundleError(f"{path}: the {name} config implies {n:,} parameters ({4 * n / 1024**3:.1f} GiB); "
                              f"at most {MAX_PARAMETERS:,} are loaded")
    if size["activation_bytes"] > MAX_ACTIVATION_BYTES:
        raise BundleError(f"{path}: the autoencoder config implies about {size['activation_bytes'] / 1024**3:.0f} GiB "
                          f"of feature maps per volume ({sum(size['parameters'].values()):,} parameters); at most "
                          f"{MAX_ACTIVATION_BYTES / 1024**3:.0f} GiB")


def _load_weights(path: Path, component: str, cfg: dict) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / f"{component}.safetensors"
    if not f.is_file():
        raise BundleError(f"{path}: {f.name} is missing")
    expected = cfg[component].get("sha256")
    if not expected and os.environ.get(TRUST_ENV) != "1":
        raise BundleError(f"{path}/config.json has no sha256 for {f.name}, so damaged or replaced weights could not "
                          f"be told from the real ones; load it anyway only if you trust it: synthbrain "
                          f"--trust-unverified ... (or {TRUST_ENV}=1)")
    if expected and sha256_file(f) != expected:
        raise BundleError(f"{f}: checksum does not match config.json (corrupt or replaced file)")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{f}: cannot read weights ({e})") from None


def _build(component: str, cfg: dict, state: dict, grid: Grid, schema: ConditionSchema, path: Path):
    import torch

    from synthbrain.models.autoencoder import autoencoder_config_from_dict, build_autoencoder

    try:
        # built on the meta device and given the file's tensors (assign): the weights are in memory once,
        # not a random initialisation plus a copy (2.2 GB saved on the published 553 M-parameter prior)
        with torch.device("meta"):
            if component == "autoencoder":
                model = build_autoencoder(autoencoder_config_from_dict(cfg["autoencoder"]["config"]))
            else:
                from synthbrain.models.prior import Prior, PriorConfig

                ae_cfg = autoencoder_config_from_dict(cfg["autoencoder"]["config"])
                model = Prior(PriorConfig.from_dict(cfg["prior"]["config"]),
                              latent_shape=ae_cfg.latent_shape(grid.shape), condition_width=schema.width)
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}  # float16 files: float32
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError("a tensor of the network is not in the file")
    except SynthBrainError as e:
        raise BundleError(f"{path}: {component} config is invalid ({e})") from None
    except _MALFORMED as e:
        raise BundleError(f"{path}/config.json: {component} entry is incomplete or malformed "
                          f"({type(e).__name__}: {e})") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise BundleError(f"{path}: {component}.safetensors does not match its config ({first})") from None
    return model.eval()


# What parsing a hand-edited or damaged config.json can raise before our own checks see a value: a
# string, list or null where a number or mapping belongs, NaN or infinity where an integer belongs.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def load_bundle(path: str | Path | None = None, device: str = "cpu",
                components: tuple[str, ...] = COMPONENTS) -> Bundle:
    """Load a bundle (default: the shipped demo bundle) with its networks in eval mode on ``device``."""
    path = Path(path) if path is not None else demo_bundle_path()
    cfg = read_config(path)
    try:
        grid = Grid.from_dict(cfg["grid"])
        schema = ConditionSchema.from_dict(cfg["conditions"])
    except SynthBrainError as e:
        raise BundleError(f"{path}/config.json: {e}") from None
    except _MALFORMED as e:
        raise BundleError(f"{path}/config.json: grid or conditions entry is incomplete or malformed "
                          f"({type(e).__name__}: {e})") from None
    try:
        _check_size(path, cfg, grid, schema, components)
    except SynthBrainError as e:
        raise BundleError(f"{path}/config.json: {e}") from None
    except _MALFORMED as e:
        raise BundleError(f"{path}/config.json: a network entry is incomplete or malformed "
                          f"({type(e).__name__}: {e})") from None
    bundle = Bundle(path=path, config=cfg, grid=grid, schema=schema)
    for component in components:
        if component not in cfg:
            continue
        state = _load_weights(path, component, cfg)
        model = _build(component, cfg, state, grid, schema, path)
        setattr(bundle, component, model.to(device))
    if "autoencoder" in components and bundle.autoencoder is None:
        raise BundleError(f"{path}: bundle has no autoencoder")
    metrics_path = path / "metrics.json"
    bundle.metrics = read_json_object(metrics_path, "metrics.json") if metrics_path.is_file() else {}
    return bundle


# float32, as trained: the bundle reproduces its checkpoint's outputs exactly (float16 weights made every
# output differ slightly from the run's). Older float16 bundles still load (cast to float32).
WEIGHTS_DTYPE = "float32"


def save_weights(path: Path, component: str, model, config: dict) -> str:
    """Write ``<component>.safetensors`` (the network's own tensors, the config in the metadata);
    returns its sha256. The bundle *is* these weights: every figure in metrics.json is measured on a
    model loaded from them."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _write_weights(path, component, state, config, WEIGHTS_DTYPE)


def _write_weights(path: Path, component: str, state: dict, config: dict, dtype: str) -> str:
    """``state`` to ``<component>.safetensors`` atomically, with the network ``config`` and ``dtype`` in
    its metadata; returns the file's sha256."""
    from safetensors.torch import save_file

    tmp = path / f".{component}.safetensors.tmp"
    # one metadata entry: safetensors keeps metadata in a hash map, so with several keys their order,
    # and the file's checksum, would change from one save to the next
    meta = json.dumps({"component": component, "config": config, "dtype": dtype}, sort_keys=True)
    try:
        save_file(state, str(tmp), metadata={"synthbrain": meta})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # renamed into place: complete or not at all, without reading the file back into memory
        # (2.2 GB for the published 553 M-parameter prior)
        os.replace(tmp, path / f"{component}.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(path / f"{component}.safetensors")


def cast_weights(bundle_dir: str | Path, component: str, dtype: str = "float16") -> str:
    """Store ``component``'s floating-point weights in ``dtype`` (float16 halves the file: the demo
    bundle must fit, with the code and the wheels, in what a GPU session carries), updating config.json's
    sha256; returns it. The network loads them cast back to float32, so its outputs change by the
    rounding: measure the bundle again afterwards (``synthbrain evaluate``)."""
    import torch

    bundle_dir = Path(bundle_dir)
    config = read_config(bundle_dir)
    target = getattr(torch, dtype)
    state = {k: t.to(target) if t.is_floating_point() else t
             for k, t in _load_weights(bundle_dir, component, config).items()}  # present and checksummed
    config[component]["sha256"] = _write_weights(bundle_dir, component, state, config[component]["config"], dtype)
    config[component]["weights_dtype"] = dtype
    write_config(bundle_dir, config)
    return config[component]["sha256"]


def _weights_stamp(config: dict) -> dict[str, str]:
    return {c: config[c].get("sha256", "") for c in COMPONENTS if c in config}


def export_stage(bundle_dir: Path, stage: str, model, config: dict, run_dir: Path,
                 validation: dict | None, step: int) -> None:
    """The last act of training a stage: its weights, config.json (``config[stage]`` filled in by the
    caller), the final validation figures, the run's training log and a fresh MODEL_CARD.md."""
    from synthbrain.model_card import write_model_card

    config[stage]["sha256"] = save_weights(bundle_dir, stage, model, config[stage]["config"])
    write_config(bundle_dir, config)
    if validation:
        update_metrics(bundle_dir, f"{stage}_training_validation", {**validation, "step": step})
    copy_training_log(run_dir, bundle_dir, stage)
    write_model_card(bundle_dir)


def copy_training_log(run_dir: Path, bundle_dir: Path, stage: str) -> None:
    """Keep the run's metrics.csv beside the weights it produced (the Model page plots it)."""
    src = Path(run_dir) / "metrics.csv"
    if src.is_file():
        shutil.copy2(src, Path(bundle_dir) / f"{stage}{TRAINING_LOG_SUFFIX}")


def write_config(path: Path, config: dict) -> None:
    """Write config.json, and drop every metrics.json section measured on other weights (each
    section carries the checksums of the weights it was measured on)."""
    from synthbrain.io import atomic_write

    atomic_write(path / "config.json", json.dumps(config, indent=2, sort_keys=False) + "\n")
    metrics_path = path / "metrics.json"
    if metrics_path.is_file():
        metrics = read_json_object(metrics_path, "metrics.json")
        stamp = _weights_stamp(config)
        kept = {k: v for k, v in metrics.items()
                if isinstance(v, dict) and v.get("weights_sha256")
                and all(stamp.get(c) == h for c, h in v["weights_sha256"].items())}
        if kept != metrics:
            atomic_write(metrics_path, json.dumps(kept, indent=2) + "\n")


def update_metrics(path: str | Path, section: str, values: dict) -> dict:
    """Merge ``values`` into ``metrics.json`` under ``section`` (e.g. 'autoencoder', 'prior')."""
    from synthbrain.io import atomic_write

    path = Path(path)
    p = path / "metrics.json"
    metrics = read_json_object(p, "metrics.json") if p.is_file() else {}
    stamp = _weights_stamp(read_config(path))
    used = ("autoencoder",) if section.startswith("autoencoder") else COMPONENTS
    metrics[section] = {**values, "weights_sha256": {c: stamp[c] for c in used if c in stamp}}
    atomic_write(p, json.dumps(metrics, indent=2) + "\n")
    return metrics


def set_sampling_defaults(path: str | Path, steps: int | None = None, guidance: float | None = None) -> dict:
    """Make ``steps`` / ``guidance`` the prior's default sampling settings (what the CLI and the app use
    when none are asked for). The weights are untouched, so the metrics stay; returns the prior config."""
    path = Path(path)
    config = read_config(path)
    if "prior" not in config:
        raise BundleError(f"{path}: bundle has no prior")
    from synthbrain.models.prior import PriorConfig

    model = config["prior"]["config"]
    if steps is not None:
        model["default_steps"] = int(steps)
    if guidance is not None:
        model["default_guidance"] = float(guidance)
    PriorConfig.from_dict(model)  # validated before it is written
    write_config(path, config)
    return model


def copy_bundle(src: Path, dst: Path) -> Path:
    """Copy a bundle folder (config, weights, metrics, card) to ``dst``."""
    src, dst = Path(src), Path(dst)
    read_config(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
    return dst


def new_config(grid: Grid, schema: ConditionSchema, name: str) -> dict:
    from synthbrain import __version__

    return {"format_version": FORMAT_VERSION, "synthbrain_version": __version__, "name": name,
            "grid": grid.to_dict(), "intensity": INTENSITY, "conditions": schema.to_dict(),
            "synthetic_output_note": "Volumes sampled from this model are synthetic: no real person."}
