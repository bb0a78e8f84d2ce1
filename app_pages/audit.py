"""Audit: is any of this session's samples a copy of one of the model's training subjects?"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from app_support import audit, common, jobs, results
from app_support.viewer import Panel, viewer
from synthbrain.errors import SynthBrainError
from synthbrain.io import Volume
from synthbrain.privacy import histogram_figure

REPORT = "aud_report"            # (AuditReport, {sample id: gallery number})

bundle = common.current_bundle()
st.markdown(
    "Generative models can reproduce their training scans. Before synthetic brains are shared, each one is "
    "compared with every training subject: by image (correlation of its deviation from the average brain, inside "
    "the brain, allowing shifts of up to 2 voxels and small turns) and by the model's own encoder features. "
    "A sample is **flagged** when it is closer to a training subject than any *held-out* real subject "
    "(one the model never saw) is. "
    "The same audit runs from the command line (`synthbrain audit`) and before every `synthbrain release`.")

gallery = st.session_state.get(results.GALLERY, [])
if not gallery:
    st.info("This session has no samples yet: make some on the **Generate** page, then come back.",
            icon=":material/info:")
    st.stop()

choices = audit.training_data_choices(bundle)
made_by = bundle.config.get("prior", {}).get("data_fingerprint", {}).get("generated_by")
path = st.text_input("The model's training data (a BIDS folder on the server)", value=choices[0] if choices else "",
                     key="aud_data", help=f"Datasets found in {audit.DATA_ENV} that this model was trained on are "
                     "filled in. Folders are read on the server; nothing is uploaded.")
if made_by:
    st.caption(f"This model's training data is a phantom cohort; `{made_by} --out FOLDER` re-creates it byte for "
               f"byte (set {audit.DATA_ENV} to the folder above it and it is found here).")
go = st.button(f"Audit this session's {len(gallery)} sample{'s' if len(gallery) > 1 else ''}", type="primary",
               disabled=not path.strip(), key="aud_go")
if go:
    try:
        auditor, _ = audit.auditor_cached(str(bundle.path), bundle.config["autoencoder"].get("sha256", ""),
                                          path.strip(), common.device())
        volumes = [(f"sample-{it.number}", it.volume.data) for it in gallery]
        report = jobs.run(lambda on_step: auditor.audit(volumes, on_step), "Comparing with the training set:")
        st.session_state[REPORT] = (report, {f"sample-{it.number}": it.number for it in gallery}, path.strip())
    except SynthBrainError as e:
        common.show_error(e)

found = st.session_state.get(REPORT)
if found is None:
    st.stop()
report, numbers, data_path = found
d = report.to_dict()
c1, c2, c3, c4 = st.columns(4)
c1.metric("Samples audited", d["samples"])
c2.metric("Flagged", f"{d['flagged']} ({100 * d['share_flagged']:.0f} %)")
c3.metric("Image threshold (r)", f"{d['thresholds']['correlation']:.3f}")
c4.metric("Embedding threshold (cosine)", f"{d['thresholds']['cosine']:.3f}")
st.caption(f"Against {d['train_subjects']} training subjects; thresholds calibrated on "
           f"{d['calibration']['holdout_subjects']} held-out subjects (their maximum). Search cost "
           f"{1000 * d['seconds']['per_sample_x_training_subject']:.2f} ms per sample x training subject.")
if d["flagged"]:
    st.error(f"{d['flagged']} sample(s) are closer to a training subject than any unseen subject: do not share "
             "them.", icon=":material/warning:")
else:
    st.success("No sample is closer to a training subject than the held-out subjects are.",
               icon=":material/check_circle:")

left, right = st.columns(2)
left.plotly_chart(histogram_figure(d, "correlation"), key="aud_hist_image")
right.plotly_chart(histogram_figure(d, "cosine"), key="aud_hist_embedding")
st.dataframe(pd.DataFrame([{"Sample": r["id"], "Image r": round(r["correlation"], 4),
                            "Nearest (image)": r["nearest_by_image"], "Cosine": round(r["cosine"], 4),
                            "Nearest (embedding)": r["nearest_by_embedding"],
                            "Flagged": ", ".join(r["reasons"]) if r["flagged"] else "no"} for r in d["per_sample"]]),
             hide_index=True, key="aud_table")

items = {it.number: it for it in gallery}
ids = [r["id"] for r in d["per_sample"] if numbers.get(r["id"]) in items]
if ids:
    pick = st.selectbox("Show a sample beside its nearest training subject", ids, key="aud_pick")
    row = next(r for r in d["per_sample"] if r["id"] == pick)
    try:
        _, train = audit.auditor_cached(str(bundle.path), bundle.config["autoencoder"].get("sha256", ""), data_path,
                                        common.device())
        nearest = Volume(train.volume(train.labels.index(row["nearest_by_image"])), bundle.grid.affine)
        viewer([items[numbers[pick]].panel(f"{pick} (synthetic)"),
                Panel(f"Nearest training subject {row['nearest_by_image']} (training data)",
                      layers=(results.base_layer(results.display_bytes(nearest, "real"), "nearest.nii.gz"),))],
               key="aud_viewer", sync=True, height=360, screenshot=f"audit_{pick}_nearest_desc-real_view.png")
        st.caption(f"r = {row['correlation']:.4f} at a shift of {tuple(row['shift_voxels'])} voxels; "
                   f"crosshair locked.")
    except SynthBrainError as e:
        common.show_error(e)
st.download_button("Download the report (.json)", data=json.dumps(d, indent=2), file_name="audit-report.json",
                   mime="application/json", on_click="ignore", icon=":material/download:", key="aud_dl")
