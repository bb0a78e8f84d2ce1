"""A real scan to start from: the MNI152 template, a phantom subject, or the user's own upload.

Built-in scans are the same for everyone and are cached for the process; an upload is read once per
file and kept in that session's state only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import streamlit as st

from synthbrain.errors import SynthBrainError, UnpreparedVolumeError
from synthbrain.export import REAL, SYNTHETIC
from synthbrain.io import Volume

SOURCES = {"template": "MNI152 template", "phantom": "Phantom subject", "upload": "Upload a NIfTI"}
PHANTOM_SEED = 0                 # phantom subjects are drawn as in `synthbrain cohort --seed 0`


@dataclass(frozen=True, eq=False)
class Scan:
    key: str                     # "template:0", "phantom:3", "upload:<sha256 prefix>"
    label: str
    volume: Volume               # as read (any grid); preprocess before use
    details: str = ""
    provenance: str = REAL       # uploads and the template are real data; a phantom is synthetic (not a person)


@st.cache_data(show_spinner=False, max_entries=8)
def builtin_scan(source: str, index: int, grid_name: str) -> Scan:
    """The template (1 mm, as nilearn ships it) or phantom subject ``index`` (on ``grid_name``)."""
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.data.cohort import render_subject, sample_subject
    from synthbrain.grids import get_grid
    from synthbrain.io import read_volume

    if source == "template":
        return Scan("template:0", SOURCES["template"], read_volume(MNI152_FILE_PATH),
                    "MNI152 2009 T1 (1 mm) as nilearn ships it: an average of many brains, not one person.")
    params = sample_subject(PHANTOM_SEED, index - 1)
    grid = get_grid(grid_name)
    subject = render_subject(params, grid)
    volume = Volume(subject.t1, grid.affine, source=f"phantom-{index:04d}")
    return Scan(f"phantom:{index}", f"Phantom subject {index}", volume,
                f"Phantom subject {index}: age {params.age:g} years, sex {params.sex}, {params.diagnosis}; true brain "
                f"volume {subject.brain_volume_ml:.0f} mL, ventricles {subject.ventricular_volume_ml:.1f} mL."
                " A phantom is the MNI152 template deformed by a simple ageing model, not a person.",
                provenance=SYNTHETIC)


def scan_picker(key: str, grid, whole_head: bool = False) -> Scan | None:
    """Widgets to choose a scan (radio, phantom number, uploader); the chosen scan, or None while
    there is none (no upload yet, or a bad one: its message is shown). ``whole_head``: the model was
    trained on whole heads, so an upload is taken with its skull (aligned to MNI space, not brain-extracted)
    and is not offered the brain-extracting Prepare step."""
    source = st.radio("Scan", list(SOURCES), format_func=SOURCES.__getitem__, horizontal=True, key=f"{key}_source")
    if source == "template":
        return builtin_scan("template", 0, grid.name)
    if source == "phantom":
        index = st.number_input("Phantom subject", min_value=1, max_value=10_000, value=1, step=1,
                                key=f"{key}_phantom", help="Subject number in the phantom cohort "
                                "(`synthbrain cohort --seed 0`)")
        return builtin_scan("phantom", int(index), grid.name)
    file = st.file_uploader("T1-weighted NIfTI (.nii or .nii.gz), " + ("whole head (with skull), rigidly aligned to "
                            "MNI space" if whole_head else "brain-extracted, in MNI space"),
                            type=["nii", "nii.gz"], key=f"{key}_file",
                            help="The file stays in this browser session; it is never written to disk or shared. "
                                 "A scan that is not brain-extracted or not in MNI space gets a **Prepare it** "
                                 "step here (the pipeline of `synthbrain prepare`).")
    if file is None:
        return None
    data = file.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    cached = st.session_state.get(f"{key}_upload")
    if not cached or cached[0] != (digest, whole_head):
        from synthbrain.data.prepare import require_prepared
        from synthbrain.io import volume_from_bytes

        try:
            volume = volume_from_bytes(data, file.name)
            with st.spinner("Checking that the scan is in MNI space" + ("…" if whole_head else
                                                                         " and brain-extracted…")):
                # a native-space scan (or, for a brain-extracted model, a whole-head one) would give nonsense
                require_prepared(volume, grid, whole_head=whole_head)
            cached = ((digest, whole_head), volume, None)
        except UnpreparedVolumeError as e:  # readable, but not brain-extracted / in MNI space: keep it to prepare
            cached = ((digest, whole_head), volume, str(e))
        except SynthBrainError as e:
            cached = ((digest, whole_head), None, str(e))
        st.session_state[f"{key}_upload"] = cached
    _, volume, problem = cached
    if problem and volume is not None and not whole_head:  # Prepare brain-extracts: not for a whole-head model
        from app_support.prepare import prepare_step

        return prepare_step(key, digest, file.name, volume, problem, grid)
    if problem:
        st.error(problem, icon=":material/error:")
        return None
    st.caption(f"{file.name}: {' x '.join(map(str, volume.shape))} voxels of "
               f"{' x '.join(f'{s:.2g}' for s in volume.spacing)} mm")
    return Scan(f"upload:{digest}", file.name, volume)
