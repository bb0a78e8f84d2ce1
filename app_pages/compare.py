"""Compare: a real (or template / phantom) scan beside its stage-1 reconstruction (VQ-VAE, or an imported
KL autoencoder), crosshair locked."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_support import common, jobs, results, scans
from app_support.viewer import viewer
from synthbrain.errors import SynthBrainError

RESULT = "cmp_result"            # this session's latest CompareResult
THRESHOLD = "cmp_threshold"      # the overlay threshold slider
THRESHOLD_FOR = "cmp_threshold_for"  # the result key that slider was set for


@st.cache_data(show_spinner=False, max_entries=16)
def reconstruct_builtin(bundle_path: str, device: str, weights: str, source: str, index: int) -> results.CompareResult:
    """Reconstruction of a built-in scan (the template or a phantom subject): the same for every user,
    so shared. ``weights`` (the autoencoder's sha256) keys the cache to the weights, not the folder."""
    from synthbrain.reconstruction import reconstruct

    bundle = common.load_bundle_cached(bundle_path, device)
    scan = scans.builtin_scan(source, index, bundle.grid.name)
    recon = jobs.run(lambda _: reconstruct(bundle, scan.volume, device=device), "", show=False)
    return results.make_compare(scan.key, scan.label, recon, scan.details, provenance=scan.provenance, bundle=bundle)


bundle = common.current_bundle()
whole_head = common.whole_head(bundle)
on_grid = (f"({bundle.grid.name}: {' x '.join(map(str, bundle.grid.shape))} voxels at {bundle.grid.spacing:g} mm)")
if getattr(bundle.autoencoder.config, "kind", None) == "kl":
    st.markdown("This model's autoencoder (stage 1, a KL autoencoder) squeezes a whole head into a small grid of "
                "continuous values and decodes it back. How close the decoded head is to the scan shows what the "
                f"model keeps and what it loses. The scan is first resampled onto the model's grid {on_grid}"
                + (" and min-max normalised to [0, 1] over the whole head, as the model's training data were; it "
                   "must be a T1 aligned to MNI space, **with** its skull (a brain-extracted scan is not what this "
                   "model was trained on)." if whole_head else " and its intensities normalised."))
else:
    st.markdown("The VQ-VAE (stage 1) squeezes a whole brain into a small grid of codes and decodes it back. "
                "How close the decoded brain is to the scan shows what the model keeps and what it loses. "
                f"The scan is first resampled onto the model's grid {on_grid} "
                "and its intensities normalised; it must be a brain-extracted T1 aligned to MNI space (an upload "
                "that is not can be prepared here first).")
if common.is_phantom(bundle):
    st.info(common.PHANTOM_NOTE, icon=":material/info:")

scan = scans.scan_picker("cmp", bundle.grid, whole_head=whole_head)
go = st.button("Reconstruct", type="primary", disabled=scan is None, key="cmp_go")
if go and scan is not None:
    try:
        with st.spinner("Preprocessing, encoding and decoding…"):
            source, _, index = scan.key.partition(":")
            if source == "upload":
                from synthbrain.reconstruction import reconstruct

                volume, on = scan.volume, common.device()
                recon = jobs.run(lambda _: reconstruct(bundle, volume, device=on), "Reconstructing…")
                # the user's own scan: kept in this session only, never in a shared cache
                st.session_state[RESULT] = results.make_compare(scan.key, scan.label, recon,
                                                                provenance=scan.provenance, bundle=bundle)
            else:
                st.session_state[RESULT] = reconstruct_builtin(
                    str(bundle.path), common.device(), bundle.config["autoencoder"].get("sha256", ""), source,
                    int(index))
    except SynthBrainError as e:
        common.show_error(e)

key = scan.key if scan is not None else None
result = st.session_state.get(RESULT)
if result is None or result.key != key:
    st.markdown("Choose a scan and press **Reconstruct**.")
    st.stop()

st.subheader(f"{result.label}: original and reconstruction")
if result.details:
    st.caption(result.details)
c1, c2 = st.columns(2)
opacity = c1.slider("Difference overlay opacity", 0.0, 1.0, 0.7, step=0.05, key="cmp_opacity")
if st.session_state.get(THRESHOLD_FOR) != result.key:
    # a new result: start from its own robust threshold (only its 5 % largest differences in the brain coloured)
    st.session_state[THRESHOLD] = result.diff_threshold
    st.session_state[THRESHOLD_FOR] = result.key
top = max(0.2, round(result.diff_top + 0.05, 2))
threshold = c2.slider("Hide differences smaller than", 0.0, top, step=0.005, key=THRESHOLD, format="%.3f",
                      help="Intensities are normalised to [0, 1]. The default colours only the 5 % of brain voxels "
                           f"that differ most (|difference| ≥ {result.diff_threshold:.3f} for this scan); "
                           "0 colours every voxel that differs at all.")
masks = st.toggle("Overlay what was measured (brain, ventricles)", key="cmp_masks",
                  disabled=not result.measurement_rows(),
                  help="The voxels the measured volumes count, on the original and on its reconstruction; the "
                       "viewer's toolbar hides each overlay and sets its opacity.")
viewer(result.panels(opacity, threshold, masks=masks), key="cmp_viewer", sync=True, height=520,
       screenshot=f"{result.download_stem(bundle.grid)}_view.png")
st.caption("The crosshair, slices and zoom of the two panels are locked together. The overlay on the right is "
           "reconstruction − original in intensity units (0..1 scale; warm: brighter, cool: darker), coloured where "
           f"|difference| ≥ {threshold:.3f}; its colour bar is under the slices.")

left, right = st.columns(2)
with left:
    st.markdown("**Reconstruction quality**")
    st.table(pd.DataFrame(results.metrics_rows(result.recon, whole_head=whole_head)), hide_index=True)
with right:
    st.markdown("**Compression**")
    st.table(pd.DataFrame(results.compression_rows(result.recon)), hide_index=True)

st.markdown("**Measured volumes**")
if result.measurement_rows():
    st.table(pd.DataFrame(result.measurement_rows()), hide_index=True)
    st.caption("Measured from each image alone, as on Generate: how much the reconstruction changes the volumes "
               "a study would read off it. Ventricles are the lateral and third ventricles (never the fissure "
               "between the hemispheres); the overlay toggle above shows the voxels counted.")
else:
    st.caption(f"Not measured: {result.measure_error}")

st.download_button(f"Download the reconstruction ({results.kind(result.recon_provenance).title}; NIfTI + JSON, .zip)",
                   data=lambda: result.download_zip(bundle), file_name=f"{result.download_stem(bundle.grid)}.zip",
                   mime="application/zip", on_click="ignore", icon=":material/download:", key="cmp_dl")
if result.recon_provenance != "synthetic":
    st.caption("A reconstruction carries the anatomy of the scan it came from: it is *derived* data, not "
               "synthetic, and must be handled like the scan itself. Its file holds no name or header text of the "
               "upload, only a digest of its voxels.")
