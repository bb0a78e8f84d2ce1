"""The Model page under AppTest: card, conditions, config, metrics, training curves when present."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np

from synthbrain.bundle import demo_bundle_path, load_bundle

from .app_helpers import frame, open_page, texts


def plotly_array(a) -> np.ndarray:
    """A plotly JSON array: a list, or (plotly >= 6) {"dtype", "bdata": base64}."""
    if isinstance(a, dict):
        return np.frombuffer(base64.b64decode(a["bdata"]), dtype=a["dtype"])
    return np.asarray(a)


def test_model_page_shows_card_and_schema():
    bundle = load_bundle()
    at = open_page("model")
    assert not at.exception
    assert f"Bundle: {bundle.name}" in texts(at)
    assert "Intended use" in texts(at)  # from MODEL_CARD.md
    conditions = frame(at.dataframe[0].value)
    assert conditions["name"] == bundle.schema.names
    assert [c.range_text for c in bundle.schema] == conditions["range"]
    assert len(at.get("json")) >= 1


def test_training_curves_come_from_the_bundles_training_log(monkeypatch, tmp_path, tiny_bundle):
    # a bundle exported by training carries its run's log
    assert (tiny_bundle / "autoencoder_training.csv").is_file() and (tiny_bundle / "prior_training.csv").is_file()
    folder = shutil.copytree(demo_bundle_path(), tmp_path / "bundle")
    (folder / "prior_training.csv").write_text(
        "step,split,name,value\n1,train,loss,0.9\n2,train,loss,0.5\n2,val,loss,0.7\n"
    )
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page("model")
    assert not at.exception
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(figs) == 2  # the demo bundle's own autoencoder log, and the prior log written here
    (fig,) = [f for f in figs if f["layout"]["title"]["text"] == "prior: loss"]
    ys = sorted(float(v) for trace in fig["data"] for v in plotly_array(trace["y"]))
    assert ys == [0.5, 0.7, 0.9]


def test_tuning_summary_beside_the_trained_config_is_shown(monkeypatch, tmp_path):
    """A bundle trained with `--config TUNE/best-config.json` shows that study: table and figures."""
    import optuna

    from synthbrain.tuning import write_summary

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="ae", direction="maximize")
    base = {"train": {"steps": 100, "lr": 1e-3}, "model": {}, "loss": {}}
    for attr, value in {"stage": "autoencoder", "metric": "psnr", "budget_steps": 20, "base_config": base}.items():
        study.set_user_attr(attr, value)
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
            "width": optuna.distributions.CategoricalDistribution([0.5, 1.0, 2.0])}
    for lr, width, psnr in ((1e-4, 0.5, 20.0), (1e-3, 1.0, 24.0), (3e-3, 2.0, 22.5)):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "width": width}, distributions=dist, value=psnr, intermediate_values={20: psnr},
            user_attrs={"config": {**base, "train": {"steps": 20, "lr": lr}}, "steps": 20}))
    write_summary(study, tmp_path / "tune", storage)

    folder = shutil.copytree(demo_bundle_path(), tmp_path / "runs" / "bundle")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["autoencoder"]["commands"] = [f"synthbrain train autoencoder --config {tmp_path / 'tune' / 'best-config.json'}"]
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page("model")
    assert not at.exception
    said = texts(at)
    assert "Optuna study `ae`" in said and "best trial 1, psnr 24" in said, said
    (table,) = [frame(d.value) for d in at.dataframe if "psnr" in d.value.columns]
    assert table["psnr"] == [20.0, 24.0, 22.5] and table["width"] == [0.5, 1.0, 2.0]
    titles = {json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")}
    assert {"Optimization History Plot", "Hyperparameter Importances"} <= titles


def test_an_unreadable_tuning_summary_is_named_without_its_folders(monkeypatch, tmp_path):
    from synthbrain.tuning import SUMMARY

    folder = shutil.copytree(demo_bundle_path(), tmp_path / "srv-private" / "bundle")
    (folder / SUMMARY).write_text("{not json")
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page("model")
    assert not at.exception
    (warning,) = at.warning
    assert SUMMARY in warning.value and "not a readable tuning summary" in warning.value
    assert "srv-private" not in warning.value and str(tmp_path) not in warning.value


def test_metrics_are_rounded_tables_with_units_and_the_bundles_pictures(monkeypatch, tmp_path):
    """Adherence, diversity, fidelity: figures with units and sensible rounding, pictures from the bundle
    folder, and the raw metrics.json only inside its expander."""
    import re
    from io import BytesIO

    from PIL import Image

    folder = shutil.copytree(demo_bundle_path(), tmp_path / "bundle")
    bundle = load_bundle(folder)
    png = BytesIO()
    Image.new("L", (24, 12), 128).save(png, format="PNG")
    (folder / "reconstruction.png").write_bytes(png.getvalue())
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(folder))
    at = open_page("model")
    assert not at.exception
    m = bundle.metrics
    metrics = {e.label: e.value for e in at.metric}
    assert metrics["Reconstruction PSNR"] == f"{m['autoencoder']['psnr']:.2f} dB"
    assert metrics["Reconstruction SSIM"] == f"{m['autoencoder']['ssim']:.3f}"
    assert metrics["Ventricles r"] == f"{m['prior']['ventricular_volume_adherence']['r']:.3f}"
    assert metrics["Ventricles MAE"] == f"{m['prior']['ventricular_volume_adherence']['mae']:.1f} mL"
    tables = {}
    for t in at.table:
        rows = frame(t.value)
        for label, value, unit in zip(rows["Metric"], rows["Value"], rows["Unit"]):
            tables.setdefault(label, []).append((value, unit))
    # the held-out subjects' figure, then the MNI152 template's (its own nested table); a bundle whose
    # autoencoder training's last validation is kept shows that one first (its own section)
    assert tables["PSNR in the brain"][-2:] == [(f"{m['autoencoder']['psnr_brain']:.2f}", "dB"),
                                           (f"{m['autoencoder']['mni152_template']['psnr_brain']:.2f}", "dB")]
    assert tables["MS-SSIM synthetic same condition"] == [(
        f"{m['prior']['diversity']['ms_ssim_synthetic_same_condition']:.3f}", "")]
    assert {unit for _, unit in tables["bias (measured - requested)"]} == {"mL"}
    assert "lower = more diverse" in texts(at)  # the diversity note beside its table
    assert "`bundle`" in texts(at) and str(tmp_path) not in texts(at)  # the folder's name, not the server's path
    # no raw float anywhere outside the expander
    shown = texts(at) + " ".join(f"{e.value}" for e in at.metric) + " ".join(t.value.to_string() for t in at.table)
    assert not re.findall(r"\d\.\d{6,}", shown)
    (raw,) = at.expander
    assert raw.label == "metrics.json (raw)" and len(raw.get("json")) == 1
    # reconstruction.png, shown from the bundle folder beside the autoencoder's figures
    assert any("its reconstruction" in img.proto.imgs[0].caption for img in at.get("image"))

