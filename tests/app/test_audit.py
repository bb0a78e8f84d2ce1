"""The Audit page under AppTest: this session's samples against the model's training data found in
SYNTHBRAIN_DATA, the report, and a sample beside its nearest training subject."""

from __future__ import annotations

from .app_helpers import open_page, texts, viewer_calls


def test_the_audit_page_audits_this_sessions_samples(private_bundle, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_BUNDLE", str(private_bundle))
    datasets = private_bundle.parents[1] / "datasets"
    monkeypatch.setenv("SYNTHBRAIN_DATA", str(datasets))
    at = open_page("audit")
    assert "no samples yet" in texts(at)

    at.switch_page("app_pages/generate.py").run()
    at.sidebar.slider(key="gen_steps").set_value(2)
    for _ in range(2):
        at.sidebar.button(key="gen_go").click().run()
    assert len(at.session_state["gen_gallery"]) == 2

    at.switch_page("app_pages/audit.py").run()
    assert at.text_input(key="aud_data").value == str(datasets / "cohort"), "the training data is found"
    at.button(key="aud_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Samples audited"] == "2"
    report, numbers, _ = at.session_state["aud_report"]
    d = report.to_dict()
    assert d["calibration"]["holdout_subjects"] == 3 and d["train_subjects"] == 7
    assert metrics["Flagged"].startswith(str(d["flagged"]))
    assert len(at.get("plotly_chart")) == 2
    assert list(at.dataframe[0].value["Sample"]) == ["sample-1", "sample-2"]
    (call,) = [c for c in viewer_calls(at) if len(c.panels) == 2]
    nearest = d["per_sample"][0]["nearest_by_image"]
    assert "synthetic" in call.panels[0]["title"] and nearest in call.panels[1]["title"]
    grid = at.session_state["gen_gallery"][0].bundle.grid
    assert call.volume(0).shape == call.volume(1).shape == tuple(grid.shape)
    (dl,) = [b for b in at.get("download_button") if "report" in b.proto.label]
    assert dl.proto.label.endswith("(.json)")
