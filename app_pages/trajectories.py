"""Trajectories: one brain through age, from a fixed seed or from a real scan (edited, so the subject
stays recognisable), with measured volumes against age, a GIF of a plane and the series as NIfTI."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from app_support import common, jobs, scans
from app_support.results import base_layer
from app_support.viewer import Panel, viewer
from synthbrain import series
from synthbrain.errors import SynthBrainError

RESULT = "traj_result"           # this session's latest Trajectory
RESULT_FOR = "traj_result_for"   # what it started from: "seed" or the scan's key
PLAY_SECONDS = 0.5               # per frame while the viewer plays the series
STARTS = {"seed": "A seed: a new synthetic brain", "scan": "A real scan: edit it, keeping the subject"}

bundle = common.sampling_page("cannot generate a series.")
schema = bundle.schema
population = bundle.population
axis = series.axis_name(schema)
ax = schema[axis]
ax_label = f"{ax.label} ({ax.unit})" if ax.unit else ax.label

start = st.radio("Start from", list(STARTS), format_func=STARTS.__getitem__, horizontal=True, key="traj_start",
                 help="A seed: the same starting noise at every age. A real scan: its latent is partly noised "
                      "and denoised under each frame's conditions (SDEdit).")
scan = None
if start == "scan":
    scan = scans.scan_picker("traj", bundle.grid, whole_head=common.whole_head(bundle))
    if scan is not None and scan.details:
        st.caption(scan.details)
started_from = "seed" if start == "seed" else scan.key if scan is not None else None


def forget_series() -> None:
    for name in (RESULT, RESULT_FOR):
        st.session_state.pop(name, None)


if st.session_state.get(RESULT) is not None and st.session_state.get(RESULT_FOR) != started_from:
    forget_series()  # another start, a new upload or a bad one: the old series is not this one's

# ------------------------------------------------------------------------------------- controls
with st.sidebar:
    st.header("Series")
    span = ax.high - ax.low
    low, high = st.slider(f"{ax_label} range", float(ax.low), float(ax.high), step=common.condition_step(ax),
                          value=(float(round(ax.low + 0.1 * span)), float(round(ax.high - 0.1 * span))),
                          format="%.0f" if common.condition_step(ax) >= 1 else "%.1f", key="traj_range")
    k = st.slider("Frames", 2, series.MAX_FRAMES, 5, key="traj_k",
                  help="Evenly spaced over the range; the viewer's slider steps through them live. "
                       "More frames: smoother ageing, longer to make.")
    st.header("Other conditions")
    settings: dict[str, series.Setting] = {}
    for c in schema:
        if c.name == axis:
            continue
        modes = series.modes_for(c, population)
        mode = modes[0]
        if len(modes) > 1:
            mode = st.selectbox(c.label, modes, format_func=series.MODES.__getitem__, key=f"traj_mode_{c.name}")
        if mode == "typical":
            st.caption(f"{c.label}: the population's typical value at each frame's {ax.label.lower()} and sex.")
            settings[c.name] = series.Setting("typical")
        elif mode == "fixed":
            value = common.condition_inputs([c], key="traj_fixed")[c.name]
            settings[c.name] = series.Setting("fixed", value)
        elif mode == "sweep":
            a = common.condition_inputs([c], key="traj_from", label_suffix=", first frame")[c.name]
            b = common.condition_inputs([c], key="traj_to", label_suffix=", last frame")[c.name]
            settings[c.name] = series.Setting("sweep", a, b)
        else:
            a = common.condition_inputs([c], key="traj_from", label_suffix=", before")[c.name]
            b = common.condition_inputs([c], key="traj_to", label_suffix=", from then on")[c.name]
            at = st.slider(f"{c.label} changes at {ax_label.lower()}", float(ax.low), float(ax.high),
                           value=float(common.initial_value(ax)), step=common.condition_step(ax),
                           key=f"traj_at_{c.name}")
            settings[c.name] = series.Setting("switch", a, b, at)
    st.header("Sampling")
    seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="traj_seed",
                           help="The same seed at every frame: one brain, not a new one per age.")
    prior_cfg = bundle.prior.config
    steps = st.slider("Denoising steps", 1, 100, int(prior_cfg.default_steps), key="traj_steps")
    guidance = common.guidance_control(bundle, "traj_guidance")
    strength = 0.5
    if start == "scan":
        strength = st.slider("Edit strength", 0.1, 1.0, 0.5, step=0.05, key="traj_strength",
                             help="How far the scan's latent is noised before denoising under the new "
                                  "conditions: low keeps the subject, 1 ignores it.")
    ready = high > low and (start == "seed" or scan is not None)
    go = st.button("Generate the series", type="primary", width="stretch", key="traj_go", disabled=not ready)
    if not high > low:
        st.caption("Choose a range that spans more than one value.")

if go:
    try:
        values = series.axis_values(low, high, int(k))
        conditions = series.plan_series(schema, population, axis, values, settings)
        source = None
        if scan is not None and start == "scan":
            from synthbrain.data.preprocess import preprocess

            source = preprocess(scan.volume, bundle.grid, bundle.config.get("intensity"))[0]
        generator = common.generator_cached(str(bundle.path), common.device())
        job = partial(series.build_trajectory, generator, bundle, conditions, axis=axis, seed=int(seed),
                      steps=int(steps), guidance=float(guidance), source=source,
                      source_label=scan.label if source is not None else "", strength=float(strength))
        result = jobs.run(lambda on_step: job(on_step=on_step), f"Series of {len(conditions)}:")
        st.session_state[RESULT] = result
        st.session_state[RESULT_FOR] = started_from
    except SynthBrainError as e:
        forget_series()  # the message replaces the old series, not sits above it
        common.show_error(e)

# --------------------------------------------------------------------------------------- result
traj: series.Trajectory | None = st.session_state.get(RESULT)
if traj is None:
    st.markdown(f"Choose the {ax.label.lower()} range and the other conditions in the sidebar, then press "
                "**Generate the series**.")
    st.stop()

n = len(traj.frames)
how = (f"edits of **{traj.source_label}** at strength {traj.strength:g}" if traj.is_edit
       else f"one seed (**{traj.seed}**) at every frame")
st.subheader(f"{n} frames, {traj.label(0)} to {traj.label(n - 1)}")
st.markdown(f"{how} · {traj.steps} steps · guidance {traj.guidance:g}")
# Live ageing: the whole series goes to the browser once (one 4D file) and the viewer's own age slider
# steps through it while dragged (no rerun, no reload: the canvases, crosshair and window stay)
title = "Derived T1w (an edit of a person's scan)" if traj.is_edit else "Synthetic T1w (not a person)"
panels = [Panel(title, layers=(base_layer(traj.display_series, f"{traj.stem(0)}_series.nii.gz"),))]
if traj.is_edit:
    source = base_layer(traj.source_display, "source.nii.gz")
    panels.insert(0, Panel("Source scan (real, preprocessed)", layers=(source,)))
viewer(panels, key="traj_viewer", sync=True, height=380, frames=[traj.caption(i) for i in range(n)],
       frame_name=ax.label, frame_seconds=PLAY_SECONDS, screenshot=f"{traj.stem(0)}_series_view.png")
st.caption(f"Drag the {ax.label.lower()} slider above the viewer to watch this brain change frame by frame, or press "
           "Play: every frame is already in your browser.")

st.markdown("**Measured volumes along the series**")
st.plotly_chart(traj.figure(), key="traj_chart")
rows = []
for i, f in enumerate(traj.frames):
    row = {ax_label: traj.axis_values[i]}
    for name, label in series.MEASURED:
        req = traj.requested(name)
        if req is not None:
            row[f"{label}, requested (mL)"] = f"{req[i]:.1f}"
        got = f.measured.get(name) if f.measured else None
        row[f"{label}, measured (mL)"] = f"{got:.1f}" if got is not None else "n/a"
    rows.append(row)
st.dataframe(pd.DataFrame(rows), hide_index=True, key="traj_table")
if any(f.measured is None for f in traj.frames):
    st.caption("n/a: the frame could not be measured (an undertrained model's output has no clear grey / white "
               "matter contrast).")

# ------------------------------------------------------------------------------------ downloads
st.markdown("**Animation and downloads**")
gif_col, controls = st.columns([1, 2], gap="large")
with controls:
    c1, c2 = st.columns(2)
    plane = c1.selectbox("GIF plane", ["axial", "coronal", "sagittal"], key="traj_gif_plane")
    grid = bundle.grid
    dim = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    lo_mm = float(grid.affine[dim, 3])
    hi_mm = lo_mm + grid.spacing * (grid.shape[dim] - 1)
    from synthbrain.viz.slices import centre_mm

    centre = centre_mm(traj.frames[0].volume)
    where = c2.slider(f"{'xyz'[dim]} position (mm)", float(np.floor(lo_mm)), float(np.ceil(hi_mm)),
                      float(round(centre[dim])), step=float(grid.spacing), format="%+.0f",
                      key=f"traj_gif_pos_{plane}")
    point = centre.copy()
    point[dim] = where
    gif = traj.gif(plane, point)
    stem = f"{traj.subject}_{axis}-{traj.axis_values[0]:g}-{traj.axis_values[-1]:g}"
    d1, d2 = st.columns(2)
    d1.download_button(f"GIF of the {plane} plane", data=gif, file_name=f"{stem}_{plane}.gif", mime="image/gif",
                       on_click="ignore", icon=":material/animated_images:", key="traj_dl_gif", width="stretch")
    d2.download_button("NIfTI series + JSON sidecars (.zip)", data=traj.zip, file_name=f"{stem}.zip",
                       mime="application/zip", on_click="ignore", icon=":material/download:", key="traj_dl_zip",
                       width="stretch")
    st.caption("The zip is a small BIDS-like dataset: one session per frame (NIfTI + JSON sidecar) and a "
               "sessions.tsv of requested and measured volumes. "
               + ("**Derived data**: edits of a person's scan carry that person's anatomy; handle them like the scan. "
                  "The files name the scan by a digest of its voxels only." if traj.is_edit
                  else "Synthetic: not a scan of any person."))
with gif_col:
    st.image(gif, caption=f"{plane.capitalize()} plane at {'xyz'[dim]} = {where:+.0f} mm through the series "
                          "(neurological: left on the left)")
