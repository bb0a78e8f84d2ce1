"""The Audit page's shared parts: where the model's training data can be found on this server, and
the prepared training set + calibration (a :class:`synthbrain.privacy.Auditor`), built once per
server process for a (bundle, data folder) pair. The training data is the server's, never a user's
upload; the samples audited are the session's own."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from synthbrain.errors import SynthBrainError

DATA_ENV = "SYNTHBRAIN_DATA"   # a folder of BIDS datasets (e.g. ~/.cache/synthbrain/data)


def training_data_choices(bundle) -> list[str]:
    """Dataset folders under SYNTHBRAIN_DATA that the bundle's prior was trained on."""
    from synthbrain.conditions import ConditionSchema
    from synthbrain.data.bids import BIDSDataset

    root = os.environ.get(DATA_ENV)
    if not root or not Path(root).is_dir():
        return []
    out = []
    for p in sorted(Path(root).iterdir()):
        if not (p / "participants.tsv").is_file():
            continue
        try:
            if bundle.trained_on("prior", BIDSDataset(p, grid=bundle.grid, schema=ConditionSchema(()))):
                out.append(str(p))
        except SynthBrainError:
            continue
    return out


@st.cache_resource(show_spinner="Preparing the training set and calibrating on held-out subjects (once per "
                                 "server; a few minutes for a large cohort)…", max_entries=2)
def auditor_cached(bundle_path: str, weights: str, data: str, device: str):
    """(Auditor, training dataset) for the bundle at ``bundle_path`` with these ``weights`` (its
    autoencoder's sha256) and the training data folder ``data``."""
    from app_support import jobs
    from app_support.common import load_bundle_cached
    from synthbrain.privacy import Auditor, holdout_split

    bundle = load_bundle_cached(bundle_path, device)
    train, held = holdout_split(bundle, data)
    # encoding the training set is model work: it takes its turn in the queue like any other job
    return jobs.run(lambda _: Auditor(bundle, train, held, device=device), "", show=False), train
