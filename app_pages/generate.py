"""Generate: conditions in real units -> a synthetic brain, in linked slices and 3D, with what was measured on it."""

from __future__ import annotations

import secrets
from functools import partial

import pandas as pd
import streamlit as st

from app_support import common, jobs, results
from app_support.viewer import viewer
from synthbrain.errors import SynthBrainError

GALLERY = results.GALLERY        # this session's samples (list of GalleryItem), newest last
CURRENT = "gen_current"          # number of the sample shown on top
MAX_GALLERY = 12                 # oldest samples are dropped beyond this many ...
MAX_GALLERY_BYTES = 120 * 2**20  # ... or this much memory (a 1 mm sample is ~30 MB), keeping at least 2
VOLUME_CONDITIONS = ("ventricular_volume", "brain_volume")

bundle = common.sampling_page("cannot generate; it can still reconstruct scans on the Compare page.")
schema = bundle.schema

# ------------------------------------------------------------------------------------- controls
with st.sidebar:
    st.header("Conditions")
    population = bundle.population
    volume_names = [n for n in VOLUME_CONDITIONS if n in schema.names and n in population.coefficients]
    typical = None
    if volume_names:
        mode = st.radio("Volumes", ["Typical for age and sex", "Set by hand"], key="gen_volume_mode",
                        help="Typical: the training population's average volumes for the chosen age and sex.")
        if mode.startswith("Typical"):
            known = {n: common.current_value(schema[n], "gen") for n in ("age", "sex") if n in schema.names}
            typical = population.typical(schema, known)
    conditions = common.condition_inputs(schema, key="gen", disabled=tuple(volume_names) if typical else (),
                                         values=typical)
    st.header("Sampling")
    random_seed = st.toggle("New random seed each time", value=True, key="gen_random_seed")
    seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="gen_seed",
                           disabled=random_seed, help="The same seed and conditions give the same brain.")
    prior_cfg = bundle.prior.config
    steps = st.slider("Denoising steps", 1, 100, int(prior_cfg.default_steps), key="gen_steps",
                      help="Solver steps (DPM-Solver++): more is slower; past about 5 it changes little.")
    guidance = common.guidance_control(bundle, "gen_guidance")
    go = st.button("Generate", type="primary", width="stretch", key="gen_go")

# ----------------------------------------------------------------------------------- generation
gallery: list = st.session_state.setdefault(GALLERY, [])
# the job's progress and errors go in a slot that is there on every run: an element that appeared only
# while sampling would move the viewers below it, and Streamlit would rebuild them (losing their state)
busy = st.empty()
if go:
    busy = busy.container()
    if random_seed:
        seed = secrets.randbelow(2**31 - 1)  # shown with the result, so the brain can be made again
    try:
        generator = common.generator_cached(str(bundle.path), common.device())
        job = partial(generator.sample, conditions, n=1, seed=int(seed), steps=int(steps), guidance=float(guidance))
        with busy:
            sample = jobs.run(lambda on_step: job(on_step=on_step)[0], "Sampling:")
        number = (gallery[-1].number + 1) if gallery else 1
        gallery.append(results.make_item(number, sample, bundle))
        del gallery[:-MAX_GALLERY]
        while len(gallery) > 2 and sum(it.nbytes for it in gallery) > MAX_GALLERY_BYTES:
            del gallery[0]
        st.session_state[CURRENT] = number
    except SynthBrainError as e:
        with busy:
            common.show_error(e)

# --------------------------------------------------------------------------------------- result
items = {it.number: it for it in gallery}
item = items.get(st.session_state.get(CURRENT)) or (gallery[-1] if gallery else None)
if item is None:
    st.markdown("Set the conditions in the sidebar and press **Generate**.")
    st.stop()

s = item.sample
st.subheader(f"Sample {item.number}")
st.markdown(f"{item.describe(schema)} · seed **{s.seed}** · {s.steps} steps · guidance {s.guidance:g} · "
            f"{s.seconds:.1f} s ({s.info.get('precision', 'fp32')})")
slices, solid = st.columns([2.6, 1], gap="small")
with slices:  # drawn first: the 3D surfaces are built after the slices are on their way
    masks = st.toggle("Overlay what was measured (brain, ventricles)", key="gen_masks",
                      help="The voxels the measured volumes count, over the slices; the viewer's toolbar "
                           "shows or hides each and sets their opacity.")
    viewer([item.panel("Synthetic T1w (not a person)", masks=masks)], key="gen_viewer", sync=False, height=400,
           screenshot=f"{item.stem}_view.png")
with solid:
    st.markdown("**3D: brain and ventricles**")
    # the spinner in a place of its own: the 3D viewer after it keeps its position (and its state)
    with st.container(), st.spinner("Building surfaces…"):
        surfaces = item.surface_panel()
    if surfaces is not None:
        viewer([surfaces], key="gen_3d", height=426, screenshot=f"{item.stem}_3d.png")
    if item.surface_set[1]:
        st.caption(item.surface_set[1])

left, right = st.columns([3, 2])
with left:
    st.markdown("**Requested vs measured**")
    rows = []
    for c in schema:
        asked = s.conditions.get(c.name)
        got = item.measured.get(c.name) if item.measured else None
        unit = f" ({c.unit})" if c.unit else ""
        rows.append({"Condition": c.label + unit,
                     "Requested": f"{asked:.1f}" if isinstance(asked, float) else str(asked),
                     "Measured": f"{got:.1f}" if got is not None else "",
                     "Difference": f"{got - asked:+.1f}" if got is not None and isinstance(asked, float) else ""})
    if item.measured:
        rows.append({"Condition": "Intracranial volume (mL)", "Requested": "",
                     "Measured": f"{item.measured['intracranial_volume']:.1f}", "Difference": ""})
    st.table(pd.DataFrame(rows), hide_index=True)
    if item.measure_error:
        st.warning(f"Could not measure this sample: {item.measure_error}")
with right:
    st.markdown("**Downloads**")
    st.download_button("NIfTI + JSON sidecar (.zip)", data=lambda: results.sample_zip(item),
                       file_name=f"{item.stem}.zip", mime="application/zip", on_click="ignore",
                       icon=":material/download:", key="gen_dl_nifti")
    st.download_button("Three planes (.png)", data=lambda: results.sample_png(item, schema),
                       file_name=f"{item.stem}.png", mime="image/png", on_click="ignore",
                       icon=":material/image:", key="gen_dl_png")
    st.caption("Outputs are synthetic: sampled from a generative model, not scans of any person.")

# -------------------------------------------------------------------------------------- gallery


def show_item(number: int) -> None:
    st.session_state[CURRENT] = number


def delete_item(number: int) -> None:
    st.session_state[GALLERY] = [it for it in st.session_state.get(GALLERY, []) if it.number != number]
    if st.session_state.get(CURRENT) == number:
        st.session_state.pop(CURRENT, None)  # the newest left is shown
    if number in st.session_state.get("gen_pair", []):
        st.session_state["gen_pair"] = [n for n in st.session_state["gen_pair"] if n != number]


st.divider()
st.subheader(f"This session's samples ({len(gallery)})")
st.caption(f"Kept in this browser session only (the most recent, up to {MAX_GALLERY}); nobody else sees them. "
           "Open one to see it above, download it as NIfTI + JSON sidecar, or delete it.")
cols = st.columns(4)
for i, it in enumerate(reversed(gallery)):
    with cols[i % 4]:
        st.image(it.thumbnail, caption=it.caption(schema), width="stretch")
        b_open, b_dl, b_del = st.columns(3, gap="small")
        shown = it.number == item.number
        b_open.button("Shown" if shown else "Open", key=f"gen_open_{it.number}", disabled=shown,
                      on_click=show_item, args=(it.number,), icon=":material/visibility:", width="stretch",
                      help="Show this sample in the viewer above")
        b_dl.download_button(".zip", data=lambda it=it: results.sample_zip(it), file_name=f"{it.stem}.zip",
                             mime="application/zip", on_click="ignore", icon=":material/download:",
                             key=f"gen_dl_{it.number}", width="stretch", help="NIfTI + JSON sidecar")
        b_del.button("Delete", key=f"gen_del_{it.number}", on_click=delete_item, args=(it.number,),
                     icon=":material/delete:", width="stretch", help="Remove it from this session")
if len(gallery) >= 2:
    numbers = [it.number for it in gallery]
    pick = st.multiselect("Show two samples side by side (crosshair locked)", numbers, max_selections=2,
                          format_func=lambda n: f"Sample {n}", key="gen_pair", placeholder="Choose two samples")
    if len(pick) == 2:
        viewer([items[n].panel(f"Sample {n}: {items[n].short(schema)}") for n in pick], key="gen_pair_viewer",
               sync=True, height=330, screenshot=f"samples_{pick[0]}_{pick[1]}_desc-synthetic_view.png")
if st.button("Clear this session's samples", key="gen_clear"):
    st.session_state[GALLERY] = []
    st.session_state.pop(CURRENT, None)
    st.rerun()
