"""Model: the bundle's card, configuration, metrics and, where the bundle has them, training curves."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_support import common

bundle = common.current_bundle()
st.title(f"Model: {bundle.name}")
st.caption(f"Bundle folder: `{bundle.path}` · grid {bundle.grid.name} "
           f"({' x '.join(map(str, bundle.grid.shape))} at {bundle.grid.spacing:g} mm)")
if common.is_phantom(bundle):
    st.info(common.PHANTOM_NOTE, icon=":material/info:")

card, config, metrics, curves = st.tabs(["Model card", "Configuration", "Metrics", "Training curves"])
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
    if bundle.metrics:
        st.json(bundle.metrics, expanded=2)
    else:
        st.markdown("_No metrics.json in this bundle yet (`synthbrain evaluate` writes it)._")
with curves:
    from synthbrain.bundle import TRAINING_LOG_SUFFIX
    from synthbrain.training.loop import read_metrics

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
