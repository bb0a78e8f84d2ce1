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
    assert f"Model: {bundle.name}" in texts(at)
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
