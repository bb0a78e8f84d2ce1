"""Model: the bundle's card, configuration, metrics, training curves and, where they exist, its tuning trials."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app_support import common
from synthbrain.tuning import find_summary

bundle = common.current_bundle()
st.subheader(f"Bundle: {bundle.name}")
# the folder's name only: the page may be served to people who have no business knowing the server's folders
st.caption(f"Bundle folder: `{Path(bundle.path).name}` · grid {bundle.grid.name} "
           f"({' x '.join(map(str, bundle.grid.shape))} at {bundle.grid.spacing:g} mm)")
if common.is_phantom(bundle):
    st.info(common.PHANTOM_NOTE, icon=":material/info:")

tuning_file = find_summary(bundle.path, bundle.config)  # a `synthbrain tune` summary beside the bundle or its config
tabs = st.tabs(["Model card", "Configuration", "Metrics", "Training curves"] + (["Tuning"] if tuning_file else []))
card, config, metrics, curves = tabs[:4]
with card:
    import re

    # the card's pictures are files in the bundle: shown here, not linked (a relative link would 404)
    pictures = re.findall(r"^!\[([^\]]*)\]\(([^)]+)\)\s*$", bundle.card, flags=re.M)
    text = re.sub(r"^!\[[^\]]*\]\([^)]+\)\s*$", "", bundle.card, flags=re.M)
    st.markdown(text or "_This bundle has no MODEL_CARD.md._")
    for caption, name in pictures:
        f = bundle.path / name if bundle.path else None
        if f is not None and f.is_file() and f.parent == bundle.path:
            st.image(f.read_bytes(), caption=caption)
with config:
    st.markdown("**Conditions**")
    st.dataframe(pd.DataFrame([{"name": c.name, "label": c.label, "unit": c.unit, "kind": c.kind,
                                "range": c.range_text, "default": str(c.default)} for c in bundle.schema]),
                 hide_index=True, key="model_conditions")
    st.markdown("**config.json**")
    st.json(bundle.config, expanded=1)
with metrics:
    from synthbrain.model_card import PICTURES, headline, metric_tables

    if bundle.metrics:
        shown = headline(bundle.metrics)  # the figures a reader looks for first
        if shown:
            for col, (label, value) in zip(st.columns(len(shown)), shown):
                col.metric(label, value)
        tables = metric_tables(bundle.metrics)
        for table in tables:
            st.markdown(f"**{table.title}**")
            st.table(pd.DataFrame([{"Metric": r.label, "Value": r.value, "Unit": r.unit} for r in table.rows]),
                     hide_index=True)
            for note in table.notes:
                st.caption(note)
            if not table.name:
                for file, (section, caption) in PICTURES.items():
                    if section == table.section and bundle.path and (bundle.path / file).is_file():
                        st.image((bundle.path / file).read_bytes(), caption=caption.replace("`", ""))
        with st.expander("metrics.json (raw)"):
            st.json(bundle.metrics, expanded=2)
    else:
        st.markdown("_No metrics.json in this bundle yet (`synthbrain evaluate` writes it)._")
with curves:
    from synthbrain.bundle import TRAINING_LOG_SUFFIX
    from synthbrain.training.run import read_metrics

    files = sorted(bundle.path.glob(f"*{TRAINING_LOG_SUFFIX}")) if bundle.path else []
    if not files:
        st.markdown("_This bundle ships no training log; the curves are in the training run's metrics.csv._")
    for f in files:
        import plotly.express as px

        rows = pd.DataFrame(read_metrics(f))
        stage = f.name[: -len(TRAINING_LOG_SUFFIX)]
        names = sorted(rows["name"].unique())
        name = st.selectbox(f"{stage.capitalize()} training: metric", names,
                            index=names.index("loss") if "loss" in names else 0, key=f"curve_pick_{stage}")
        part = rows[rows["name"] == name]
        fig = px.line(part, x="step", y="value", color="split", title=f"{stage}: {name}", markers=len(part) < 50,
                      labels={"step": "optimiser step", "value": name})
        fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10})
        st.plotly_chart(fig, key=f"curve_{stage}")
if tuning_file:
    with tabs[4]:
        from synthbrain.errors import SynthBrainError
        from synthbrain.tuning import figure, read_summary, trials_table

        try:
            tuned = read_summary(tuning_file)
        except SynthBrainError as e:
            st.warning(common.public_message(e))
        else:
            best = tuned["best"]
            st.markdown(f"**Optuna study `{tuned['study']}`** ({tuned['stage']}): {tuned['direction']} validation "
                        f"{tuned['metric']} after {tuned['budget_steps']} steps per trial; "
                        + ", ".join(f"{n} {s}" for s, n in sorted(tuned["counts"].items()))
                        + (f"; best trial {best['number']}, {tuned['metric']} {best['value']:.4g}." if best else "."))
            st.dataframe(pd.DataFrame(trials_table(tuned)), hide_index=True, key="tuning_trials")
            for name in ("history", "importances"):
                fig = figure(tuned, name)
                if fig is not None:
                    st.plotly_chart(fig, key=f"tuning_{name}")
