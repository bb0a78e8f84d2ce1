"""MODEL_CARD.md for a bundle, written from its config.json and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

INTENDED_USE = """\
## Intended use
Teaching, demonstrations and methods development: exploring how a conditional generative model of
3D brain MRI behaves (ageing, ventricular enlargement, sex differences in head size), comparing real
scans with their reconstructions, and testing pipelines on synthetic data that carries no personal
information. **Not for diagnosis, and not a substitute for real data in clinical research.**
"""

PHANTOM_LIMITS = """\
## Limits
- Trained on a *phantom* cohort: every training subject is the MNI152 2009 template deformed by a
  simple ageing model (``synthbrain cohort``). The model has seen one anatomy, not a population; its
  samples look like the template, and its "ageing" is the phantom's, not a real brain's.
- Demo grid (2 mm, 80 x 112 x 80): fine cortical detail is below its resolution.
- Conditions outside the ranges in config.json are refused.
"""


GENERIC_LIMITS = """\
## Limits
- A model reflects its training data: scanners, ages and populations it has not seen are out of scope.
- Conditions outside the ranges in config.json are refused.
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(d: dict) -> str:
    rows = [f"| {k} | {_fmt(v)} |" for k, v in d.items() if not isinstance(v, (dict, list))]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n" if rows else ""


def render_model_card(bundle_dir: Path) -> str:
    bundle_dir = Path(bundle_dir)
    cfg = json.loads((bundle_dir / "config.json").read_text())
    metrics_path = bundle_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    grid = cfg["grid"]
    lines = [f"# Model card: {cfg.get('name', bundle_dir.name)}", "",
             f"SynthBrain {cfg.get('synthbrain_version')} bundle (format {cfg.get('format_version')}). "
             f"Grid `{grid['name']}`: {' x '.join(map(str, grid['shape']))} voxels at {grid['spacing']} mm, "
             f"{grid.get('space', 'MNI152NLin2009aSym')} space, RAS+.", "",
             "Volumes sampled from this model are **synthetic**: they are not scans of any person.", "",
             "## Conditions", "", "| name | unit | kind | range | default |", "|---|---|---|---|---|"]
    for c in cfg["conditions"]["conditions"]:
        rng = f"{c['low']:g}..{c['high']:g}" if c["kind"] == "continuous" else ", ".join(c["categories"])
        lines.append(f"| {c['name']} | {c.get('unit', '')} | {c['kind']} | {rng} | {c.get('default')} |")
    lines.append("")
    for stage in ("autoencoder", "prior"):
        if stage not in cfg:
            continue
        s = cfg[stage]
        imported = s.get("imported_from")
        origin = ([f"- imported from `{imported['file']}` ({imported['key_layout']} key layout), not trained here"]
                  if imported else [f"- trained for {s.get('steps_trained')} steps, seed {s.get('seed')}",
                                    f"- data: {json.dumps(s.get('data_fingerprint', {}))}"])
        lines += [f"## {stage.capitalize()}", "", *origin,
                  "- commands:", *[f"  - `{c}`" for c in s.get("commands", [s.get("command", "")])],
                  f"- network config: `{json.dumps(s.get('config', {}))}`"]
        if "compression" in s:
            comp = s["compression"]
            bits = (f"; code bits {100 * comp['latent_bits_per_volume_bits']:.3f} % of a 16-bit volume"
                    if "latent_bits_per_volume_bits" in comp else " (a continuous latent)")
            lines.append(f"- latent {comp['latent_shape']}: {100 * comp['latent_values_per_voxel']:.3f} % of the "
                         f"voxel count{bits}")
        if "latent_scale_factor" in s:
            lines.append(f"- latent scale factor {s['latent_scale_factor']:.5g}")
        lines.append("")
    pictures = {"reconstruction.png": "A held-out subject, its reconstruction and the difference "
                                      "(`synthbrain evaluate autoencoder`)",
                "samples.png": "Samples of the prior (`synthbrain evaluate prior`)"}
    for name, caption in pictures.items():
        if (bundle_dir / name).is_file():
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    if metrics:
        lines += ["## Metrics (metrics.json)", ""]
        for section, values in metrics.items():
            if isinstance(values, dict):
                lines += [f"### {section}", "", _table(values)]
                for name, sub in values.items():  # one level of nested figures (adherence, audit, membership)
                    if isinstance(sub, dict) and name not in ("per_subject", "units", "weights_sha256") and _table(sub):
                        lines += [f"#### {section}: {name}", "", _table(sub)]
    phantom = any(cfg.get(stage, {}).get("data_fingerprint", {}).get("phantom") for stage in ("autoencoder", "prior"))
    lines += [INTENDED_USE, PHANTOM_LIMITS if phantom else GENERIC_LIMITS]
    extra = bundle_dir / "CARD_NOTES.md"
    if extra.is_file():
        lines += [extra.read_text()]
    return "\n".join(lines)


def write_model_card(bundle_dir: Path) -> Path:
    from synthbrain.io import atomic_write

    path = Path(bundle_dir) / "MODEL_CARD.md"
    atomic_write(path, render_model_card(bundle_dir))
    return path
