"""Import the MONAI model zoo's ``brain_image_synthesis_latent_diffusion_model`` as a SynthBrain bundle.

That bundle (Pinaya et al. 2022, trained on 31,740 UK Biobank T1s) is a folder the user downloads
from the MONAI model zoo; SynthBrain never downloads it. Its layout::

    configs/inference.json    the networks' arguments, the noise schedule, the latent shape
    configs/metadata.json     version, authors, references, published metrics, data format
    models/autoencoder.pt     AutoencoderKL state dict   (older copies: models/autoencoder.pth)
    models/model.pt           DiffusionModelUNet state dict (older copies: models/diffusion_model.pth)
    LICENSE, docs/README.md, docs/data_license.txt (where present)

Only plain JSON values are read from ``inference.json``: its ``$`` expressions are MONAI bundle code
and are never evaluated (a few are parsed as text: the weight file names, the noise shape, the
conditioning order, the reference step count). Weights are read with ``torch.load(weights_only=True)``
and must be flat state dicts of tensors in one of two key layouts, told apart by their keys: MONAI
core's (``load_old: 0``, fine-tuned copies) or the GenerativeModels package's (``load_old: 1``, the
published weights), which MONAI's own ``load_old_state_dict`` maps. Whatever cannot be mapped
(a missing, extra or misshapen key, an architecture argument SynthBrain does not build) is refused
with a :class:`~synthbrain.errors.BundleError` that names the file and the key.

The imported bundle is a normal SynthBrain bundle: a KL autoencoder (:mod:`synthbrain.models.autoencoder_kl`),
a prior with the bundle's UNet conditioned by concatenation and cross-attention and *no* classifier-free
guidance (it was trained with the conditions always present), latent scale factor 1 (the reference
sampler decodes the latent as it is), the grid whose shape the latent implies (``full`` for the
published model) and the intensity convention of its training data (whole head, min-max to [0, 1]).

Its four conditions are the bundle's normalised [0, 1] inputs, labelled so: the real-unit ranges of
the normalisation are not published. A mapping file supplied by the user (see
:func:`read_condition_mapping`) states them, and only then are the sliders in years and mL.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthbrain.conditions import Condition, ConditionSchema
from synthbrain.errors import BundleError, ConditionError, SynthBrainError

OnStep = Callable[[int, int, dict], None]

ZOO_NAME = "brain_image_synthesis_latent_diffusion_model"
ZOO_URL = "https://github.com/Project-MONAI/model-zoo/tree/dev/models/" + ZOO_NAME
PAPER = ('Pinaya, W. H. L., Tudosiu, P.-D., Dafflon, J., Da Costa, P. F., Fernandez, V., Nachev, P., Ourselin, S., '
         'Cardoso, M. J. "Brain imaging generation with latent diffusion models." MICCAI Workshop on Deep '
         'Generative Models, Springer, 2022, pp. 117-126 (arXiv:2209.07162)')
# the conditioning vector of the reference sampler: torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]])
SOURCE_CONDITIONS = ("gender", "age", "ventricular_vol", "brain_vol")
OUR_NAMES = {"gender": "sex", "age": "age", "ventricular_vol": "ventricular_volume", "brain_vol": "brain_volume"}
DESCRIPTIONS = {  # what the bundle's docs/README.md says each input is
    "gender": "sex",
    "age": "age",
    "ventricular_vol": "volume of ventricular cerebrospinal fluid",
    "brain_vol": "brain volume normalised for head size",
}
LABELS = {"gender": "Sex", "age": "Age", "ventricular_vol": "Ventricular volume", "brain_vol": "Brain volume"}
WEIGHT_FILES = {"autoencoder": ("autoencoder.pt", "autoencoder.pth"), "prior": ("model.pt", "diffusion_model.pth")}
PATH_KEYS = {"autoencoder": "load_autoencoder_path", "prior": "load_diffusion_path"}

AE_TARGETS = ("monai.networks.nets.AutoencoderKL", "generative.networks.nets.AutoencoderKL")
UNET_TARGETS = ("monai.networks.nets.DiffusionModelUNet", "generative.networks.nets.DiffusionModelUNet")
SCHEDULER_TARGETS = ("DDIMScheduler", "DDPMScheduler")
OLD_SCHEDULES = {"scaled_linear": "scaled_linear_beta", "linear": "linear_beta", "sigmoid": "sigmoid_beta"}
# arguments that change how a network runs, not which weights it has
RUNTIME_ONLY = {"use_flash_attention", "use_checkpoint", "dropout_cattn"}
# arguments fixed by what SynthBrain builds, with the only value it takes
FIXED = {"spatial_dims": 3, "include_fc": True, "use_combined_linear": False}
AE_FIXED = {**FIXED, "in_channels": 1, "out_channels": 1, "use_convtranspose": False}
UNET_FIXED = {**FIXED, "with_conditioning": True, "num_class_embeds": None}

INTENSITY = {"method": "min-max normalised to [0, 1] over the whole head (the model's training data: UK Biobank T1w, "
                       "rigid registration to MNI space with UniRes, not skull-stripped)",
             "range": [0.0, 1.0], "background": 0.0, "whole_head": True, "skull_stripped": False,
             "source": "the bundle's docs/README.md (Preprocessing)"}
DEFAULT_STEPS = 10  # DPM-Solver++ 2M steps when none are asked for (the reference: 50 DDIM steps)


@dataclass(frozen=True)
class ZooBundle:
    """What :func:`read_zoo_bundle` found in a model-zoo folder (nothing loaded yet)."""

    path: Path
    inference: dict
    metadata: dict
    autoencoder: Any                 # KLAutoencoderConfig
    prior: Any                       # PriorConfig
    latent_shape: tuple[int, ...]    # (C, x, y, z)
    image_shape: tuple[int, int, int]
    files: dict[str, Path]           # component -> weights file
    defaults: dict[str, float]       # the reference sampler's condition values (normalised)
    reference: dict                  # the reference sampler: scheduler, steps, load_old, ...


# ------------------------------------------------------------------------------------------ reading


def _json(path: Path, root: Path) -> dict:
    from synthbrain.bundle import read_json_object

    if not path.is_file():
        raise BundleError(f"{root}: not a MONAI model-zoo bundle (no {path.relative_to(root)})")
    return read_json_object(path, path.name)


def _section(inference: dict, key: str, targets: tuple[str, ...], where: Path) -> dict:
    d = inference.get(key)
    if not isinstance(d, dict):
        raise BundleError(f"{where}: no {key!r} network definition")
    target = d.get("_target_")
    if target not in targets:
        raise BundleError(f"{where}: {key}._target_ is {target!r}; SynthBrain imports {' or '.join(targets)}")
    return d


def _arguments(d: dict, key: str, fixed: dict, known: set[str], where: Path) -> dict:
    """The network's arguments as MONAI core names them (``num_channels`` -> ``channels``), with
    runtime-only ones dropped; an argument SynthBrain cannot build is refused by name."""
    args = {k: v for k, v in d.items() if not k.startswith("_") and k not in RUNTIME_ONLY}
    if "num_channels" in args:  # the GenerativeModels package's name
        args["channels"] = args.pop("num_channels")
    for k, v in list(args.items()):
        if isinstance(v, str) and v.startswith(("$", "@", "%")):
            raise BundleError(f"{where}: {key}.{k} is an expression ({v!r}); SynthBrain reads plain values only")
        if k in fixed:
            if v != fixed[k]:
                raise BundleError(f"{where}: {key}.{k} = {v!r} is not supported (SynthBrain builds {fixed[k]!r})")
            args.pop(k)
        elif k not in known:
            raise BundleError(f"{where}: {key}.{k} is an argument SynthBrain does not map")
    if isinstance(args.get("num_res_blocks"), list):
        blocks = set(args["num_res_blocks"])
        if len(blocks) != 1:
            raise BundleError(f"{where}: {key}.num_res_blocks differs between levels ({args['num_res_blocks']}); "
                              f"not supported")
        args["num_res_blocks"] = blocks.pop()
    return args


def _expression_number_list(text: Any, pattern: str) -> list[int] | None:
    m = re.search(pattern, str(text or ""))
    return [int(v) for v in re.findall(r"\d+", m.group(1))] if m else None


def read_zoo_bundle(path: str | Path) -> ZooBundle:
    """Read and check a model-zoo folder's configs and find its weight files (no weights loaded)."""
    from synthbrain.models.autoencoder_kl import KLAutoencoderConfig
    from synthbrain.models.prior import PriorConfig

    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: folder not found (download the MONAI model-zoo bundle {ZOO_NAME} first)")
    inf_path = root / "configs" / "inference.json"
    if not inf_path.is_file() and (root / ZOO_NAME / "configs" / "inference.json").is_file():
        raise BundleError(f"{root}: not a MONAI model-zoo bundle itself; did you mean {root / ZOO_NAME}?")
    inference = _json(inf_path, root)
    metadata = _json(root / "configs" / "metadata.json", root)

    ae_args = _arguments(_section(inference, "autoencoder_def", AE_TARGETS, inf_path), "autoencoder_def", AE_FIXED,
                         {"channels", "latent_channels", "num_res_blocks", "norm_num_groups", "norm_eps",
                          "attention_levels", "with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn"}, inf_path)
    un_args = _arguments(_section(inference, "diffusion_def", UNET_TARGETS, inf_path), "diffusion_def", UNET_FIXED,
                         {"in_channels", "out_channels", "channels", "num_res_blocks", "attention_levels",
                          "norm_num_groups", "norm_eps", "resblock_updown", "num_head_channels",
                          "transformer_num_layers", "cross_attention_dim", "upcast_attention"}, inf_path)
    try:
        ae = KLAutoencoderConfig.from_dict(ae_args)
    except (SynthBrainError, TypeError, ValueError) as e:
        raise BundleError(f"{inf_path}: autoencoder_def: {e}") from None

    conds = re.findall(r"@(\w+)", str(inference.get("conditioning", "")).split("]]")[0])
    if tuple(conds) != SOURCE_CONDITIONS:
        raise BundleError(f"{inf_path}: conditioning is {conds or inference.get('conditioning')!r}; SynthBrain maps "
                          f"exactly [{', '.join(SOURCE_CONDITIONS)}]")
    width = len(SOURCE_CONDITIONS)
    lc = ae.latent_channels
    if un_args.get("cross_attention_dim") != width:
        raise BundleError(f"{inf_path}: diffusion_def.cross_attention_dim is {un_args.get('cross_attention_dim')!r}; "
                          f"the {width} conditions need {width}")
    if un_args.get("out_channels") != lc or un_args.get("in_channels") != lc + width:
        raise BundleError(f"{inf_path}: diffusion_def in_channels/out_channels are {un_args.get('in_channels')}/"
                          f"{un_args.get('out_channels')}; a {lc}-channel latent with its {width} conditions "
                          f"concatenated needs {lc + width}/{lc}")

    sched = inference.get("scheduler")
    if not isinstance(sched, dict) or not str(sched.get("_target_", "")).endswith(SCHEDULER_TARGETS):
        raise BundleError(f"{inf_path}: no DDIM or DDPM 'scheduler' entry")
    schedule = sched.get("schedule") or OLD_SCHEDULES.get(str(sched.get("beta_schedule")), sched.get("beta_schedule"))
    try:
        prior = PriorConfig(
            channels=tuple(un_args["channels"]), attention_levels=tuple(un_args["attention_levels"]),
            num_res_blocks=int(un_args.get("num_res_blocks", 2)),
            num_head_channels=un_args.get("num_head_channels", 8),
            norm_num_groups=int(un_args.get("norm_num_groups", 32)), norm_eps=float(un_args.get("norm_eps", 1e-6)),
            resblock_updown=bool(un_args.get("resblock_updown", False)),
            transformer_num_layers=int(un_args.get("transformer_num_layers", 1)),
            upcast_attention=bool(un_args.get("upcast_attention", False)),
            num_train_timesteps=int(sched.get("num_train_timesteps", 1000)), schedule=str(schedule),
            beta_start=float(sched.get("beta_start", 1e-4)), beta_end=float(sched.get("beta_end", 2e-2)),
            prediction_type=str(sched.get("prediction_type", "epsilon")),
            condition_dropout=0.0, default_steps=DEFAULT_STEPS, default_guidance=1.0, classifier_free_guidance=False)
    except KeyError as e:
        raise BundleError(f"{inf_path}: diffusion_def has no {e.args[0]!r}") from None
    except (SynthBrainError, TypeError, ValueError) as e:
        raise BundleError(f"{inf_path}: diffusion_def or scheduler: {e}") from None

    noise = _expression_number_list(inference.get("noise"), r"randn\(\s*\(([\d,\s]+)\)")
    if not noise or len(noise) != 5 or noise[1] != lc:
        raise BundleError(f"{inf_path}: 'noise' does not give a (1, {lc}, x, y, z) latent shape: "
                          f"{inference.get('noise')!r}")
    latent = tuple(noise[1:])
    image = tuple(s * ae.downsampling for s in latent[1:])
    published = metadata
    for key in ("network_data_format", "outputs", "pred", "spatial_shape"):
        published = published.get(key) if isinstance(published, dict) else None
    if published is not None:
        try:
            published = tuple(int(s) for s in published)
        except (TypeError, ValueError):
            raise BundleError(f"{root}/configs/metadata.json: outputs.pred.spatial_shape is {published!r}") from None
        if published != image:
            raise BundleError(f"{root}: metadata.json gives images of {published}, but inference.json's latent "
                              f"{latent} decodes to {image}")

    defaults = {}
    for name in SOURCE_CONDITIONS:
        v = inference.get(name, 0.5)
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise BundleError(f"{inf_path}: {name} = {v!r} (the conditions are in [0, 1])")
        defaults[name] = float(v)

    files = {c: _weights_file(root, inference, c) for c in WEIGHT_FILES}
    steps = _expression_number_list(inference.get("set_timesteps"), r"num_inference_steps\s*=\s*(\d+)")
    load_old = inference.get("load_old")
    reference = {"scheduler": str(sched.get("_target_")), "steps": steps[0] if steps else None,
                 "clip_sample": sched.get("clip_sample"), "schedule": str(schedule),
                 "load_old": int(load_old) if isinstance(load_old, (int, bool)) else None,
                 "decode": "autoencoder.decode_stage_2_outputs(latent), no scale factor"}
    return ZooBundle(root, inference, metadata, ae, prior, latent, image, files, defaults, reference)


def _weights_file(root: Path, inference: dict, component: str) -> Path:
    names = list(WEIGHT_FILES[component])
    m = re.search(r"['\"]/?([^'\"/]+\.pth?)['\"]", str(inference.get(PATH_KEYS[component], "")))
    if m and m.group(1) not in names:
        names.insert(0, m.group(1))
    for name in names:
        if (root / "models" / name).is_file():
            return root / "models" / name
    raise BundleError(f"{root}/models: no {' or '.join(names)} (the {component} weights; the model zoo's "
                      f"large_files.yml says where to download them)")


# ------------------------------------------------------------------------------------------ weights


def load_state(file: Path) -> dict:
    """A flat state dict (str -> tensor) from ``file``, with ``torch.load(weights_only=True)``."""
    import torch

    if not zipfile.is_zipfile(file):
        raise BundleError(f"{file}: not a PyTorch checkpoint (torch.save zip archive); damaged or not weights")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BundleError(f"{file}: cannot be read as weights ({first})") from None
    if not isinstance(obj, Mapping) or not obj:
        raise BundleError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise BundleError(f"{file}: key {k!r} holds a {type(v).__name__}, not a tensor (a wrapped checkpoint? "
                              f"SynthBrain reads the network's state dict itself)")
    return dict(obj)


def map_state_dict(net, state: dict, file: Path) -> tuple[dict, str]:
    """Map ``state`` onto the keys of MONAI network ``net`` (any device, ``meta`` included); returns
    (the state dict in MONAI-core keys, the layout found: ``monai`` or ``generative``)."""
    own = net.state_dict()
    keys, wanted = set(state), set(own)
    if wanted <= keys:
        layout = "monai"
        if extra := sorted(keys - wanted):
            raise BundleError(f"{file}: unexpected key {extra[0]!r} ({len(extra)} in all) for the architecture in "
                              f"configs/inference.json")
        mapped = state
    elif keys < wanted:
        missing = sorted(wanted - keys)
        raise BundleError(f"{file}: missing key {missing[0]!r} ({len(missing)} in all) for the architecture in "
                          f"configs/inference.json")
    else:
        layout = "generative"
        mapped = _map_old_layout(net, own, state, file)
    for k, v in own.items():
        if tuple(mapped[k].shape) != tuple(v.shape):
            raise BundleError(f"{file}: {k} has shape {tuple(mapped[k].shape)}; the architecture in "
                              f"configs/inference.json needs {tuple(v.shape)}")
    return mapped, layout


def _map_old_layout(net, own: dict, state: dict, file: Path) -> dict:
    """The GenerativeModels key layout mapped by MONAI's own ``load_old_state_dict``, which is made to
    hand back the dict it builds instead of loading it, and checked: MONAI's mapping would keep a
    network's random initial weights for keys the file lacks and ignore keys it cannot place."""
    captured: dict = {}
    left = dict(state)  # MONAI pops what it maps

    def capture(d, strict=True, assign=False):
        captured.update(d)

    net.state_dict = lambda *a, **k: dict(own)
    net.load_state_dict = capture
    try:
        net.load_old_state_dict(left)
    except KeyError as e:
        raise BundleError(f"{file}: neither the MONAI-core nor the old GenerativeModels key layout of this "
                          f"architecture (no key {e.args[0]!r})") from None
    finally:
        del net.state_dict, net.load_state_dict
    if left:
        extra = sorted(left)
        raise BundleError(f"{file}: key {extra[0]!r} ({len(extra)} in all) has no place in the architecture in "
                          f"configs/inference.json (old GenerativeModels layout)")
    given = {id(v) for v in state.values()}
    if unfilled := [k for k in own if id(captured.get(k)) not in given]:
        raise BundleError(f"{file}: no weights for {unfilled[0]!r} ({len(unfilled)} in all) in the old "
                          f"GenerativeModels layout")
    return captured


def _network(component: str, zoo: ZooBundle, schema: ConditionSchema):
    """The SynthBrain wrapper of a component, on the meta device (no memory)."""
    import torch

    from synthbrain.models.autoencoder_kl import KLAutoencoder
    from synthbrain.models.prior import Prior

    with torch.device("meta"):
        if component == "autoencoder":
            return KLAutoencoder(zoo.autoencoder)
        return Prior(zoo.prior, latent_shape=zoo.latent_shape, condition_width=schema.width)


def load_component(component: str, zoo: ZooBundle, schema: ConditionSchema) -> tuple[Any, str, str]:
    """(the SynthBrain network with the file's weights, float32 on the CPU; the key layout; the
    file's sha256)."""
    import torch

    from synthbrain.bundle import sha256_file

    file = zoo.files[component]
    model = _network(component, zoo, schema)
    inner = model.net if component == "autoencoder" else model.unet
    prefix = "net." if component == "autoencoder" else "unet."
    state = load_state(file)
    mapped, layout = map_state_dict(inner, state, file)
    del state
    full = {prefix + k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in mapped.items()}
    model.load_state_dict(full, strict=True, assign=True)
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise BundleError(f"{file}: some of the network's tensors were not in the file")
    return model.to(torch.device("cpu")).eval(), layout, sha256_file(file)


# ------------------------------------------------------------------------------------------ conditions


def condition_schema(defaults: Mapping[str, float], mapping: Mapping[str, Any] | None = None) -> ConditionSchema:
    """The imported schema, in the bundle's order: each condition its normalised [0, 1] input (labelled
    so) unless ``mapping`` (from :func:`read_condition_mapping`) states its real unit and range."""
    mapping = mapping or {}
    conditions = []
    for src in SOURCE_CONDITIONS:
        name, d = OUR_NAMES[src], float(defaults.get(src, 0.5))
        m = mapping.get(name)
        what = DESCRIPTIONS[src]
        if m is None and src == "gender":  # a code, 0 or 1, as the reference sampler takes it
            conditions.append(Condition(
                name, "Sex (bundle code 0 or 1)", "", "binary", categories=("0", "1"), default=str(int(d >= 0.5)),
                description=f"the bundle's '{src}' input, 0 or 1; which code is which sex is not published"))
        elif m is None:
            conditions.append(Condition(
                name, f"{LABELS[src]} (normalised, 0-1)", "", "continuous", low=0.0, high=1.0, default=d,
                description=f"the bundle's '{src}' input ({what}), normalised to [0, 1]; the real-unit range of "
                            f"the normalisation is not published"))
        elif "categories" in m:
            cats = tuple(m["categories"])
            conditions.append(Condition(
                name, m.get("label", LABELS[src]), "", "binary", categories=cats, default=cats[int(d >= 0.5)],
                description=f"the bundle's '{src}' input ({what}): {cats[0]} = 0, {cats[1]} = 1 (as stated in "
                            f"the mapping file)"))
        else:
            low, high = float(m["low"]), float(m["high"])
            default = float(m["default"]) if "default" in m else round(low + d * (high - low), 3)
            conditions.append(Condition(
                name, m.get("label", LABELS[src]), m["unit"], "continuous", low=low, high=high, default=default,
                description=f"the bundle's '{src}' input ({what}): 0 = {low:g} {m['unit']}, 1 = {high:g} {m['unit']} "
                            f"(as stated in the mapping file)"))
    return ConditionSchema(tuple(conditions))


def read_condition_mapping(path: str | Path) -> dict[str, dict]:
    """Read a condition mapping file: a JSON object from condition name (SynthBrain's or the bundle's:
    ``age``, ``ventricular_volume`` / ``ventricular_vol``, ``brain_volume`` / ``brain_vol``, ``sex`` /
    ``gender``) to what its normalised input means::

        {"age": {"unit": "years", "low": 44, "high": 82},
         "ventricular_volume": {"unit": "mL", "low": 5, "high": 150},
         "sex": {"categories": ["F", "M"]}}

    A continuous entry needs ``unit``, ``low`` (the real value at 0) and ``high`` (at 1); ``label``
    and ``default`` (real units) are optional. ``sex`` may instead give its two ``categories`` (at 0
    and at 1). Conditions not named stay normalised. Nothing is assumed: a missing unit is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConditionError(f"{path}: condition mapping file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConditionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConditionError(f"{path}: must be a JSON object of condition -> {{unit, low, high}}")
    aliases = {**{v: v for v in OUR_NAMES.values()}, **OUR_NAMES}
    out: dict[str, dict] = {}
    for key, entry in raw.items():
        if key not in aliases:
            raise ConditionError(f"{path}: unknown condition {key!r}; the bundle's are {', '.join(OUR_NAMES.values())}")
        name = aliases[key]
        if name in out:
            raise ConditionError(f"{path}: {name} is given twice")
        if not isinstance(entry, dict):
            raise ConditionError(f"{path}: {key} must be an object like "
                                 f"{{\"unit\": \"mL\", \"low\": 5, \"high\": 150}}")
        if "categories" in entry:
            cats = entry["categories"]
            if name != "sex" or set(entry) - {"categories", "label"}:
                raise ConditionError(f"{path}: {key}: only sex takes categories (and then only 'categories', 'label')")
            if not (isinstance(cats, list) and len(cats) == 2 and all(isinstance(c, str) and c.strip() for c in cats)
                    and cats[0] != cats[1]):
                raise ConditionError(f"{path}: {key}.categories must be two different labels (the values at 0 and 1)")
            out[name] = {k: entry[k] for k in ("categories", "label") if k in entry}
            continue
        if unknown := sorted(set(entry) - {"unit", "low", "high", "label", "default"}):
            raise ConditionError(f"{path}: {key}: unknown field(s) {', '.join(unknown)} (unit, low, high, label, "
                                 f"default)")
        unit = entry.get("unit")
        if not isinstance(unit, str) or not unit.strip():
            raise ConditionError(f"{path}: {key} has no unit; state the unit of its range (years, mL, ...)")
        try:
            low, high = float(entry["low"]), float(entry["high"])
        except KeyError as e:
            raise ConditionError(f"{path}: {key} has no {e.args[0]!r} (the real value at normalised "
                                 f"{0 if e.args[0] == 'low' else 1})") from None
        except (TypeError, ValueError):
            raise ConditionError(f"{path}: {key}: low and high must be numbers") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConditionError(f"{path}: {key}: low ({low:g}) must be below high ({high:g})")
        out[name] = {**{k: entry[k] for k in ("label", "default") if k in entry}, "unit": unit.strip(),
                     "low": low, "high": high}
    return out


# ------------------------------------------------------------------------------------------ import


def _licence(root: Path) -> dict:
    """What the bundle itself says about its licence (nothing is assumed where it says nothing)."""
    out: dict[str, Any] = {}
    lic = root / "LICENSE"
    if lic.is_file():
        lines = [ln.strip() for ln in lic.read_text(errors="replace").splitlines() if ln.strip()]
        out["file"] = "LICENSE"
        out["title"] = " ".join(lines[:2]) if lines else ""
    data = root / "docs" / "data_license.txt"
    if data.is_file():
        out["data_licence_file"] = "docs/data_license.txt"
    out["note"] = ("MONAI model-zoo bundles carry their own licence for configuration files and weights (LICENSE); "
                   "the model zoo repository itself is Apache-2.0. The training data are UK Biobank's, used under "
                   "its access conditions.")
    return out


def import_monai_zoo(path: str | Path, out: str | Path, mapping_file: str | Path | None = None,
                     on_step: OnStep | None = None) -> Path:
    """Import the model-zoo folder ``path`` into a new SynthBrain bundle at ``out`` (which must not
    exist or be empty). ``mapping_file``: real units of the conditions (:func:`read_condition_mapping`).
    The bundle is written beside ``out`` and renamed into place at the end: an import that fails leaves
    nothing behind. Returns ``out``."""
    from synthbrain.bundle import new_config, save_weights, update_metrics, write_config
    from synthbrain.grids import GRIDS, SPACE
    from synthbrain.model_card import write_model_card

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: exists and is not an empty folder; give a new folder for the imported bundle")
    zoo = read_zoo_bundle(path)
    mapping = read_condition_mapping(mapping_file) if mapping_file else None
    grid = next((g for g in GRIDS.values() if tuple(g.shape) == zoo.image_shape), None)
    if grid is None:
        raise BundleError(f"{zoo.path}: images of {zoo.image_shape} voxels match no SynthBrain grid "
                          f"({', '.join(f'{g.name} {tuple(g.shape)}' for g in GRIDS.values())})")
    schema = condition_schema(zoo.defaults, mapping)
    tick = (lambda i, what: on_step(i, 4, {"stage": what})) if on_step else (lambda i, what: None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = zoo.metadata
        config = new_config(grid, schema, name=f"{ZOO_NAME} {meta.get('version', '')}".strip())
        config["intensity"] = INTENSITY
        config["grid"]["affine_note"] = (
            f"The model's axes are taken as the {grid.name} grid's: RAS+, {grid.spacing:g} mm, on the MNI field of "
            f"view of {SPACE}. The reference sampler saves its output without spatial metadata (MONAI SaveImage of a "
            f"plain tensor: an identity affine), so the bundle gives no other placement.")
        source = {"kind": "monai-model-zoo", "bundle": ZOO_NAME, "url": ZOO_URL, "version": meta.get("version"),
                  "monai_version": meta.get("monai_version"), "authors": meta.get("authors"),
                  "references": meta.get("references", []), "paper": PAPER, "copyright": meta.get("copyright"),
                  "data_source": meta.get("data_source"), "intended_use": meta.get("intended_use"),
                  "licence": _licence(zoo.path), "reference_sampler": zoo.reference,
                  "conditions": {"order": list(SOURCE_CONDITIONS),
                                 "as": {s: OUR_NAMES[s] for s in SOURCE_CONDITIONS},
                                 "normalised": [OUR_NAMES[s] for s in SOURCE_CONDITIONS
                                                if OUR_NAMES[s] not in (mapping or {})],
                                 "range_note": "each input in [0, 1]; the bundle does not publish the real-unit "
                                               "ranges of the normalisation"}}
        config["source"] = source
        if mapping:
            from synthbrain.bundle import sha256_file

            config["conditions_mapping"] = {"file": Path(mapping_file).name, "sha256": sha256_file(Path(mapping_file)),
                                            "entries": mapping, "stated_by": "the user who imported the bundle"}
        command = f"synthbrain import-bundle {zoo.path.name}" + (f" --conditions {Path(mapping_file).name}"
                                                                 if mapping_file else "")
        for i, component in enumerate(("autoencoder", "prior")):
            tick(2 * i, f"reading {zoo.files[component].name}")
            model, layout, src_sha = load_component(component, zoo, schema)
            entry = {"config": zoo.autoencoder.to_dict() if component == "autoencoder" else zoo.prior.to_dict(),
                     "imported_from": {"file": f"models/{zoo.files[component].name}", "sha256": src_sha,
                                       "key_layout": layout},
                     "parameters": sum(p.numel() for p in model.parameters()), "commands": [command]}
            if component == "autoencoder":
                entry["compression"] = zoo.autoencoder.compression(grid.shape)
            else:
                entry["latent_scale_factor"] = 1.0
            config[component] = entry
            tick(2 * i + 1, f"writing {component}.safetensors")
            entry["sha256"] = save_weights(tmp, component, model, entry["config"])
            del model
        write_config(tmp, config)
        published = meta.get("eval_metrics")
        if isinstance(published, dict) and published:
            update_metrics(tmp, "published", {**published, "source": f"configs/metadata.json of {ZOO_NAME} "
                                                                     f"(UK Biobank; Table 1 of the paper)"})
        (tmp / "CARD_NOTES.md").write_text(card_notes(config))
        write_model_card(tmp)
        tick(4, "done")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def card_notes(config: dict) -> str:
    """The imported bundle's own section of MODEL_CARD.md: source, licence, paper, conditions."""
    src = config["source"]
    lic = src["licence"]
    lic_line = (f"the bundle's `LICENSE` ({lic['title']})" if lic.get("file")
                else "no LICENSE file was in the imported folder; see the model zoo page")
    conds = []
    for c in config["conditions"]["conditions"]:
        rng = (f"{c['low']:g}..{c['high']:g} {c.get('unit', '')}".strip() if c["kind"] == "continuous"
               else " / ".join(c["categories"]))
        conds.append(f"| {c['name']} | {c['label']} | {rng} | {c['description']} |")
    mapped = config.get("conditions_mapping")
    return "\n".join([
        "## Source", "",
        f"Imported from the MONAI model zoo bundle `{src['bundle']}` version {src.get('version')} ({src['url']}), "
        f"by {str(src.get('authors')).rstrip('.')}. {src.get('copyright') or ''}", "",
        f"- Paper: {src['paper']}.",
        f"- Training data: {src.get('data_source')} (31,740 UK Biobank participants, T1w, 1 mm, per the bundle's "
        f"README).",
        f"- Licence: {lic_line}. {lic['note']}"
        + (" Data licence: `docs/data_license.txt` of the bundle." if lic.get("data_licence_file") else ""),
        f"- Intended use (the bundle's): {src.get('intended_use')}",
        f"- Weights: {config['autoencoder']['imported_from']['file']} "
        f"({config['autoencoder']['imported_from']['key_layout']} key layout), "
        f"{config['prior']['imported_from']['file']} ({config['prior']['imported_from']['key_layout']} key layout); "
        f"their sha256 are in config.json.",
        "- Published metrics (metrics.json, `published`): the bundle's own figures on UK Biobank, not measured by "
        "SynthBrain.", "",
        "## Conditions of the imported model", "",
        "The model takes four inputs, each in [0, 1], in this order: "
        + ", ".join(f"`{s}`" for s in src["conditions"]["order"]) + ". "
        + ("The real-unit ranges of that normalisation are **not published**, so they are shown as the normalised "
           "values they are; a mapping file (`synthbrain import-bundle ... --conditions mapping.json`) can state "
           "them." if not mapped else
           f"Real units come from the mapping file `{mapped['file']}` supplied by {mapped['stated_by']}; they are "
           f"that user's statement, not the bundle's. Conditions it does not name stay normalised."), "",
        "| name | label | range | meaning |", "|---|---|---|---|", *conds, "",
        "## How it samples here", "",
        "- No classifier-free guidance: the model was trained with the conditions always present (concatenated to "
        "the latent and as cross-attention context), so guidance is fixed at 1 and each step is one forward pass.",
        f"- DPM-Solver++ 2M on the bundle's own noise schedule ({config['prior']['config']['schedule']} "
        f"{config['prior']['config']['beta_start']:g}-{config['prior']['config']['beta_end']:g}, "
        f"{config['prior']['config']['num_train_timesteps']} steps, {config['prior']['config']['prediction_type']} "
        f"prediction), {config['prior']['config']['default_steps']} steps by default; the reference sampler runs "
        f"{src['reference_sampler'].get('steps')} DDIM steps.",
        "- Intensities: whole head (not skull-stripped), min-max normalised to [0, 1] (config.json `intensity`): "
        "a brain volume measured on a sample needs brain extraction first.",
        f"- Grid: {config['grid']['affine_note']}", ""])
