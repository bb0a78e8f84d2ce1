"""Compare: a real (or template / phantom) scan beside its VQ-VAE reconstruction, crosshair locked."""

from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

from app_support import common, results
from app_support.viewer import viewer
from synthbrain.errors import SynthBrainError

RESULT = "cmp_result"            # this session's latest CompareResult
UPLOAD = "cmp_upload"            # (file hash, Volume or error message) of the current upload
SOURCES = {"template": "MNI152 template", "phantom": "Phantom subject", "upload": "Upload a NIfTI"}
PHANTOM_SEED = 0                 # phantom subjects are drawn as in `synthbrain cohort --seed 0`


@st.cache_data(show_spinner=False, max_entries=16)
def reconstruct_builtin(bundle_path: str, device: str, weights: str, source: str, index: int) -> results.CompareResult:
    """Reconstruction of a built-in scan (the template or a phantom subject): the same for every user,
    so shared. ``weights`` (the autoencoder's sha256) keys the cache to the weights, not the folder."""
    from nilearn.datasets import MNI152_FILE_PATH

    from synthbrain.data.cohort import render_subject, sample_subject
    from synthbrain.io import Volume, read_volume
    from synthbrain.reconstruction import reconstruct

    bundle = common.load_bundle_cached(bundle_path, device)
    if source == "template":
        volume, details = read_volume(MNI152_FILE_PATH), "MNI152 2009 T1 (1 mm) as nilearn ships it"
    else:
        params = sample_subject(PHANTOM_SEED, index - 1)
        subject = render_subject(params, bundle.grid)
        volume = Volume(subject.t1, bundle.grid.affine, source=f"phantom-{index:04d}")
        details = (f"Phantom subject {index}: age {params.age:g} years, sex {params.sex}, {params.diagnosis}; "
                   f"true brain volume {subject.brain_volume_ml:.0f} mL, "
                   f"ventricles {subject.ventricular_volume_ml:.1f} mL. "
                   "A phantom is the MNI152 template deformed by a simple ageing model, not a person.")
    with common.model_lock():
        recon = reconstruct(bundle, volume, device=device)
    return results.make_compare(f"{source}:{index}", SOURCES[source] + (f" {index}" if source == "phantom" else ""),
                                recon, details)


bundle = common.current_bundle()
st.title("Compare a scan with its reconstruction")
st.markdown("The VQ-VAE (stage 1) squeezes a whole brain into a small grid of codes and decodes it back. "
            "How close the decoded brain is to the scan shows what the model keeps and what it loses. "
            "The scan is first resampled onto the model's grid "
            f"({bundle.grid.name}: {' x '.join(map(str, bundle.grid.shape))} voxels at {bundle.grid.spacing:g} mm) "
            "and its intensities normalised; it must be a brain-extracted T1 aligned to MNI space.")
if common.is_phantom(bundle):
    st.info(common.PHANTOM_NOTE, icon=":material/info:")

source = st.radio("Scan", list(SOURCES), format_func=SOURCES.__getitem__, horizontal=True, key="cmp_source")
key, upload_volume, ready = None, None, True
if source == "template":
    key = "template:0"
elif source == "phantom":
    index = st.columns([1, 3])[0].number_input("Phantom subject", min_value=1, max_value=10_000, value=1, step=1,
                                               key="cmp_phantom", help="Subject number in the phantom cohort "
                                               "(`synthbrain cohort --seed 0`)")
    key = f"phantom:{index}"
else:
    file = st.file_uploader("T1-weighted NIfTI (.nii or .nii.gz), brain-extracted, in MNI space",
                            type=["nii", "nii.gz"], key="cmp_file",
                            help="The file stays in this browser session; it is never written to disk or shared.")
    ready = False
    if file is not None:
        data = file.getvalue()
        digest = hashlib.sha256(data).hexdigest()[:16]
        cached = st.session_state.get(UPLOAD)
        if not cached or cached[0] != digest:
            from synthbrain.io import volume_from_bytes

            try:
                cached = (digest, volume_from_bytes(data, file.name), None)
            except SynthBrainError as e:
                cached = (digest, None, str(e))
            st.session_state[UPLOAD] = cached
        _, upload_volume, problem = cached
        if problem:
            st.error(problem, icon=":material/error:")
        else:
            v = upload_volume
            st.caption(f"{file.name}: {' x '.join(map(str, v.shape))} voxels of "
                       f"{' x '.join(f'{s:.2g}' for s in v.spacing)} mm")
            key, ready = f"upload:{digest}", True

go = st.button("Reconstruct", type="primary", disabled=not ready, key="cmp_go")
if go:
    try:
        with st.spinner("Preprocessing, encoding and decoding…"):
            if source == "upload":
                from synthbrain.reconstruction import reconstruct

                with common.models_busy():
                    recon = reconstruct(bundle, upload_volume, device=common.device())
                # the user's own scan: kept in this session only, never in a shared cache
                st.session_state[RESULT] = results.make_compare(key, upload_volume.source or "upload", recon)
            else:
                st.session_state[RESULT] = reconstruct_builtin(
                    str(bundle.path), common.device(), bundle.config["autoencoder"].get("sha256", ""), source,
                    int(key.split(":")[1]))
    except SynthBrainError as e:
        common.show_error(e)

result = st.session_state.get(RESULT)
if result is None or result.key != key:
    st.markdown("Choose a scan and press **Reconstruct**.")
    st.stop()

st.subheader(f"{result.label}: original and reconstruction")
if result.details:
    st.caption(result.details)
c1, c2 = st.columns(2)
opacity = c1.slider("Difference overlay opacity", 0.0, 1.0, 0.7, step=0.05, key="cmp_opacity")
threshold = c2.slider("Hide differences smaller than", 0.0, 0.2, 0.03, step=0.01, key="cmp_threshold",
                      help="Intensities are normalised to [0, 1]; red: reconstruction brighter, blue: darker.")
viewer(result.panels(opacity, threshold), key="cmp_viewer", sync=True, height=520)
st.caption("The crosshair, slices and zoom of the two panels are locked together. The overlay on the right is "
           "reconstruction − original (warm: brighter, cool: darker).")

left, right = st.columns(2)
with left:
    st.markdown("**Reconstruction quality**")
    st.table(pd.DataFrame(results.metrics_rows(result.recon)), hide_index=True)
with right:
    st.markdown("**Compression**")
    st.table(pd.DataFrame(results.compression_rows(result.recon)), hide_index=True)


def _reconstruction_file() -> bytes:
    from synthbrain.io import to_nifti_bytes

    return to_nifti_bytes(result.recon.reconstruction, description="SynthBrain VQ-VAE reconstruction")


st.download_button("Download the reconstruction (.nii.gz)", data=_reconstruction_file,
                   file_name=f"reconstruction_res-{bundle.grid.res_label}.nii.gz", mime="application/gzip",
                   on_click="ignore", icon=":material/download:", key="cmp_dl")
