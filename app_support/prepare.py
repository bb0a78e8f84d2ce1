"""The "prepare it" step of an upload that is not ready for a model (not brain-extracted, or not in MNI
space, as :func:`synthbrain.data.prepare.check_prepared` finds): the message, a button that runs the
pipeline of ``synthbrain prepare`` (:func:`synthbrain.data.prepare.prepare_volume`: N4, brain extraction,
registration to MNI152, the grid, normalisation) in the app's job queue with a progress bar, then the
before / after in three planes and the registration quality, and the prepared volume to go on with.

The prepared volume is *real* data (:mod:`synthbrain.export`: an input, preprocessed, as
``synthbrain prepare`` writes it): the person's scan, kept in this session's state only (never a shared
cache); its download never carries its file name or header text,
and a reconstruction of it is derived.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import streamlit as st

from app_support import common, jobs
from synthbrain.errors import SynthBrainError
from synthbrain.export import REAL, kind
from synthbrain.io import Volume

STATE = "{key}_prepared"         # session state: this session's PreparedUpload for the picker ``key``
PICTURE_ROWS = ("upload, placed by its header", "prepared", "MNI152 template")


@dataclass(frozen=True, eq=False)
class PreparedUpload:
    """An upload after :func:`prepare_volume`: ``digest`` keys it to the upload's bytes."""

    digest: str
    source: Volume                 # the upload as read (for the digest its outputs carry)
    result: object                 # synthbrain.data.prepare.Prepared
    found: tuple[str, ...]         # what check_prepared found wrong with the upload
    check: object                  # synthbrain.data.prepare.Preparedness of the prepared volume
    seconds: float                 # the pipeline's own time (not the wait in the queue)
    grid: object

    @property
    def volume(self) -> Volume:
        return self.result.volume

    @cached_property
    def picture(self) -> bytes:
        """The QC picture of ``synthbrain prepare``: upload, prepared and template, three planes each."""
        from synthbrain.data.template import load_template
        from synthbrain.viz.slices import rows_png

        tmpl = load_template(self.grid)
        q = self.result.qc
        rows = list(zip(PICTURE_ROWS, (self.result.before, self.volume, Volume(tmpl.t1, self.grid.affine)),
                        strict=True))
        return rows_png(rows, point_mm=tmpl.centroid_mm, width_px=900,
                        title=f"Prepared upload ({kind(REAL).name}): r = {q['correlation']:.3f} with the "
                              f"template; it was {q['input_rotation_deg']:.1f} deg, {q['input_shift_mm']:.1f} mm off",
                        footer="; ".join(q["flags"]) or "no flags")

    def qc_rows(self) -> list[dict]:
        q = self.result.qc
        rows = [("Correlation with the MNI152 template", f"{q['correlation']:.3f}", "",
                 "brain-masked Pearson r after preparing; 1 = identical"),
                ("Registration metric", f"{q['registration_metric']:.3f}", "nats",
                 "Mattes mutual information with the template at the end of the affine fit; higher is better"),
                ("Rotation of the upload off MNI152", f"{q['input_rotation_deg']:.1f}", "degrees",
                 "what the registration undid"),
                ("Shift of the upload off MNI152", f"{q['input_shift_mm']:.1f}", "mm",
                 "of the brain's centre; what the registration undid"),
                ("Brain volume", f"{q['brain_volume_ml']:.0f}", "mL", f"extracted brain ({q['brain_extraction']})"),
                ("Time", f"{self.seconds:.1f}", "s", "the pipeline's run, on this server")]
        return [{"Figure": a, "Value": b, "Unit": c, "Meaning": d} for a, b, c, d in rows]

    def stem(self) -> str:
        from synthbrain.grids import SPACE

        return f"prepared_space-{SPACE}_res-{self.grid.res_label}_T1w"

    def zip(self) -> bytes:
        """The prepared volume (NIfTI + sidecar), its transform (ITK .tfm) and the QC picture: a real
        (preprocessed input) dataset that never carries the upload's file name or header text."""
        import os
        import tempfile

        import SimpleITK as sitk

        from synthbrain import __version__
        from synthbrain.data.prepare import STEPS
        from synthbrain.export import DatasetWriter, file_stem
        from synthbrain.grids import SPACE

        stem = file_stem(REAL, self.stem())
        tfm = f"{stem[: -len('_T1w')]}_from-T1w_to-{SPACE}_mode-image_xfm.tfm"
        fields = {"SpatialReference": SPACE, "Grid": self.grid.to_dict(), **self.result.info,
                  "Prepare": {"Version": __version__, "Steps": list(STEPS), "QC": self.result.qc,
                              "Transform": tfm,
                              "TransformDirection": "MNI152 (LPS mm) -> the upload (LPS mm), ITK convention"}}
        out = DatasetWriter(REAL, "SynthBrain: an upload prepared in the app",
                            {"Name": "synthbrain prepare (app)", "Version": __version__})
        out.add("", self.stem(), self.volume, fields, source=self.source)
        # ITK writes transforms to files only; a transform holds 12 numbers and a centre, no anatomy
        fd, path = tempfile.mkstemp(suffix=".tfm")
        os.close(fd)
        try:
            sitk.WriteTransform(self.result.transform, path)
            with open(path, "rb") as f:
                out.text(tfm, f.read())
        finally:
            os.unlink(path)
        out.text(f"{stem[: -len('_T1w')]}_qc.png", self.picture)
        return out.close()


def _prepare(digest: str, volume: Volume, grid, device: str, on_step) -> PreparedUpload:
    """The job: the pipeline, then the check on its result (a job-queue worker thread runs it)."""
    from dataclasses import replace

    from synthbrain.data.prepare import check_prepared, prepare_volume

    found = check_prepared(volume).reasons
    start = time.perf_counter()
    # the library's messages name the volume by its source: "the upload", never the file's name
    res = prepare_volume(replace(volume, source="the upload"), grid, device=device, on_step=on_step)
    seconds = time.perf_counter() - start
    done = PreparedUpload(digest, volume, res, found, check_prepared(res.volume), seconds, grid)
    done.picture  # drawn here, in the queue, not in the page's script thread  # noqa: B018
    return done


def prepare_step(key: str, digest: str, name: str, volume: Volume, problem: str, grid):
    """The message and the **Prepare it** button for an unprepared upload; once prepared, its before /
    after and registration quality. Returns the prepared :class:`app_support.scans.Scan`, or None
    (not prepared yet, or still not usable after preparing: the page says why)."""
    from synthbrain.data.prepare import STEPS

    state = STATE.format(key=key)
    done: PreparedUpload | None = st.session_state.get(state)
    if done is None or done.digest != digest:
        st.session_state.pop(state, None)  # another upload's: it is not this one's
        slot = st.empty()
        with slot.container():
            st.error(problem, icon=":material/error:")
            st.markdown("**Prepare it here**: the same pipeline as `synthbrain prepare`, on this server: "
                        f"{', '.join(STEPS)} ({grid.name} grid, {grid.spacing:g} mm). About 10 to 30 s on a CPU. "
                        "The prepared scan is your scan, preprocessed, and stays in this browser session.")
            pressed = st.button("Prepare it", type="primary", key=f"{key}_prepare", icon=":material/auto_fix_high:")
        if not pressed:
            return None
        on = common.device()
        try:
            done = jobs.run(lambda on_step: _prepare(digest, volume, grid, on, on_step),
                            f"Preparing the upload ({' · '.join(STEPS)}):")
        except SynthBrainError as e:
            common.show_error(e)
            return None
        slot.empty()  # the message and the button give way to what was done
        st.session_state[state] = done
    return show_prepared(key, done, name)


def show_prepared(key: str, done: PreparedUpload, name: str):
    from app_support.scans import Scan

    q = done.result.qc
    with st.container(border=True):
        st.markdown(f"**{name} was not prepared; it has been prepared here** in {done.seconds:.1f} s "
                    f"(brain extraction: {q['brain_extraction']}).")
        st.caption(f"What the check found in the upload: {'; '.join(done.found)}.")
        st.image(done.picture, caption="Before and after, three planes each through the template brain's centre "
                                       "(neurological: left on the left): the upload as its header places it on "
                                       "the grid, the prepared scan, and the MNI152 template it was registered to.")
        st.markdown("**Registration quality**")
        st.table(pd.DataFrame(done.qc_rows()), hide_index=True)
        for flag in q["flags"]:
            st.warning(flag, icon=":material/warning:")
        st.download_button(f"Download the prepared scan ({kind(REAL).title}; NIfTI + JSON, transform, QC "
                           "picture, .zip)", data=done.zip, file_name=f"{done.stem()}.zip", mime="application/zip",
                           on_click="ignore", icon=":material/download:", key=f"{key}_prepared_dl")
        st.caption("Real data: the prepared scan is your scan, preprocessed; handle it like the scan. "
                   "Its files never carry the upload's file name or header text.")
    if not done.check.ok:
        st.error(f"After preparing, the scan is still not ready for the model: {'; '.join(done.check.reasons)}. "
                 "Check the pictures above: it may not be a T1-weighted brain scan.", icon=":material/error:")
        return None
    return Scan(f"upload:{done.digest}:prepared", f"{name} (prepared)", done.volume,
                f"{name}, prepared here (N4, brain extraction, registration to MNI152): the upload, preprocessed.",
                provenance=REAL)
