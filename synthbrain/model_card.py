"""MODEL_CARD.md for a bundle, written from its config.json and metrics.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


# pictures `synthbrain evaluate` writes into the bundle: file -> (metrics section, caption)
PICTURES = {"reconstruction.png": ("autoencoder", "A held-out subject, its reconstruction and the difference "
                                                  "(`synthbrain evaluate autoencoder`)"),
            "samples.png": ("prior", "Samples of the prior (`synthbrain evaluate prior`)")}
SKIPPED = ("per_subject", "units", "weights_sha256", "picture", "curve")  # in metrics.json, not in the tables
ACRONYMS = {"psnr": "PSNR", "ssim": "SSIM", "mae": "MAE", "auc": "AUC", "tpr": "TPR", "fpr": "FPR", "mmd": "MMD",
            "vqvae": "VQ-VAE", "mni152": "MNI152", "ms": "MS", "sd": "SD", "ml": "mL", "pct": "%", "r": "r", "n": "n"}
LABELS = {"ms_ssim": "MS-SSIM", "psnr_brain": "PSNR in the brain", "ssim_brain": "SSIM in the brain",
          "r": "r (requested vs measured)", "mae": "MAE", "bias": "bias (measured - requested)",
          "tpr_at_1pct_fpr": "TPR at 1 % FPR", "n": "n"}


@dataclass(frozen=True)
class MetricRow:
    key: str
    label: str
    value: str                  # formatted with the rounding its kind deserves
    unit: str = ""


@dataclass(frozen=True)
class MetricTable:
    """One section of metrics.json (``autoencoder``) or one nested figure set of it
    (``prior`` / ``ventricular_volume_adherence``), formatted for people."""

    section: str
    name: str = ""
    rows: tuple[MetricRow, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        text = humanise(self.name or self.section)
        return f"{humanise(self.section)}: {text}" if self.name else text

    @property
    def key(self) -> str:
        return f"{self.section}: {self.name}" if self.name else self.section

    def markdown(self) -> str:
        if not self.rows:
            return ""
        lines = ["| metric | value | unit |", "|---|---|---|"]
        lines += [f"| {r.label} | {r.value} | {r.unit} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def humanise(key: str) -> str:
    """``ventricular_volume_adherence`` -> 'Ventricular volume adherence'; ``ms_ssim`` -> 'MS-SSIM'."""
    if key in LABELS:
        return LABELS[key]
    parts = key.split("_")
    if len(parts) > 1 and parts[-1].lower() == "ml":  # the unit goes in its own column
        parts = parts[:-1]
    words = [ACRONYMS.get(w.lower(), w) for w in parts]
    text = " ".join(words).replace("MS SSIM", "MS-SSIM")
    return text[:1].upper() + text[1:] if words and words[0] == parts[0] else text


def _decimals(x: float, places: int) -> str:
    return f"{x:.{places}f}"


def format_metric(key: str, value, section: str = "", units: dict | None = None) -> tuple[str, str]:
    """(value as text, unit) for one figure of metrics.json: PSNR in dB to 2 decimals, SSIM / MS-SSIM,
    r and AUC to 3, volumes in mL to 1, shares as %, seconds to 3 significant digits, anything else
    to 4 significant digits (never a 16-digit float)."""
    units = units or {}
    unit = units.get(key, "")
    k = key.lower()
    if isinstance(value, bool):
        return ("yes" if value else "no"), ""
    if isinstance(value, int):
        return str(value), unit
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value) and "shape" in k:
            return " x ".join(map(str, value)), unit
        return ", ".join(format_metric(key, v, section, units)[0] for v in value), unit
    if not isinstance(value, float):
        return str(value), unit
    volume = section.endswith("volume_adherence") or section.endswith("_volume") or k.endswith("_ml")
    if k.startswith("psnr"):
        return _decimals(value, 2), unit or "dB"
    if ("ssim" in k or k in ("r", "auc") or k.startswith("tpr") or k.startswith("codebook_usage")
            or "correlation" in k or "cosine" in k):
        return _decimals(value, 3), unit
    if volume and (k in ("mae", "bias") or k.endswith("_ml")):
        return _decimals(value, 1), "mL"
    if k.startswith("share_") or k.endswith("_per_voxel") or k.endswith("_per_volume_bits"):
        return f"{100 * value:.{1 if k.startswith('share_') else 3}f}", "%"
    if k.startswith("seconds") or k.endswith("seconds"):
        return f"{value:.3g}", "s"
    if k in ("mae", "mse"):
        return _decimals(value, 4), unit or "intensity (0..1)"
    return f"{value:.4g}", unit


def metric_tables(metrics: dict) -> list[MetricTable]:
    """metrics.json as tables: one per section, then one per nested figure set (adherence, diversity,
    ``mni152_template``, audit...), one level deep. Notes (``note`` strings) go beside their table;
    per-subject figures, units, hashes and curves stay in the raw file."""
    out = []
    for section, values in metrics.items():
        if not isinstance(values, dict):
            continue
        out.append(_one_table(section, "", values, values.get("units") or {}))
        for name, sub in values.items():
            if isinstance(sub, dict) and name not in SKIPPED:
                table = _one_table(section, name, sub, sub.get("units") or {})
                if table.rows:
                    out.append(table)
    return [t for t in out if t.rows or t.notes]


HEADLINE = (("Reconstruction PSNR", "autoencoder", "", "psnr"), ("Reconstruction SSIM", "autoencoder", "", "ssim"),
            ("Ventricles r", "prior", "ventricular_volume_adherence", "r"),
            ("Ventricles MAE", "prior", "ventricular_volume_adherence", "mae"),
            ("Brain volume r", "prior", "brain_volume_adherence", "r"),
            ("Brain volume MAE", "prior", "brain_volume_adherence", "mae"))


def headline(metrics: dict) -> list[tuple[str, str]]:
    """(label, 'value unit') of the figures a reader looks for first, those metrics.json has."""
    out = []
    for label, section, name, key in HEADLINE:
        values = metrics.get(section, {})
        values = values.get(name, {}) if name and isinstance(values, dict) else values
        if isinstance(values, dict) and isinstance(values.get(key), (int, float)):
            text, unit = format_metric(key, values[key], name or section, values.get("units"))
            out.append((label, f"{text} {unit}" if unit in ("dB", "mL", "%", "s") else text))
    return out


def _one_table(section: str, name: str, values: dict, units: dict) -> MetricTable:
    rows, notes = [], []
    for k, v in values.items():
        if k in SKIPPED or isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], (dict, list))):
            continue
        if k in ("note", "rule") and isinstance(v, str):
            notes.append(v)
            continue
        text, unit = format_metric(k, v, name or section, units)
        rows.append(MetricRow(k, humanise(k), text, unit))
    return MetricTable(section, name, tuple(rows), tuple(notes))


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
        if c.get("codes"):  # what the training table held for each level
            rng += " (codes: " + ", ".join(f"{k} = {v}" for k, v in c["codes"].items()) + ")"
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
        start = s.get("initialised_from")
        if start:  # fine-tuned (--init-from): the steps above came after those of the network it started from
            origin.insert(1, f"- started from the {stage} of `{start.get('bundle')}` ({start.get('steps_trained')} "
                             f"steps; sha256 {str(start.get('sha256', ''))[:12]}), not from a random initialisation")
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
    for name, (_, caption) in PICTURES.items():
        if (bundle_dir / name).is_file():
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    if metrics:
        lines += ["## Metrics (metrics.json)", ""]
        for table in metric_tables(metrics):
            lines += [f"{'####' if table.name else '###'} {table.key}", "", table.markdown()]
            lines += [f"*{note}*\n" for note in table.notes]
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
