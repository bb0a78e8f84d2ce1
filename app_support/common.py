"""What every page shares: the model bundle and generator (loaded once per process), condition widgets
built from the bundle's schema, and errors. Model work runs through the job queue (``jobs.py``).

Configuration (environment, so that ``synthbrain app`` and tests can set it):
    SYNTHBRAIN_BUNDLE   bundle folder to open first (default: the demo bundle shipped in the package)
    SYNTHBRAIN_MODELS   folder whose sub-folders are bundles to choose from in the sidebar
    SYNTHBRAIN_DEVICE   torch device for the models: auto (default: cuda when available), cpu, cuda, cuda:N
    SYNTHBRAIN_DATA     folder of BIDS datasets: the Audit page finds a model's training data there
    SYNTHBRAIN_WORKERS  model jobs that run at once (default: 1 on the CPU, 2 on a GPU; see jobs.py)

One user's inputs and results live only in ``st.session_state``; the shared caches hold the bundle,
the generator and results computed from built-in data (the template, phantom subjects), never an
upload.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from synthbrain.errors import ConfigError, SynthBrainError

BUNDLE_STATE = "bundle_path"


# ------------------------------------------------------------------------------------------ bundles


@dataclass(frozen=True)
class BundleChoice:
    path: str
    label: str


def demo_path() -> str:
    from synthbrain.bundle import demo_bundle_path

    return str(demo_bundle_path())


def bundle_choices() -> list[BundleChoice]:
    """The bundles a user can pick: SYNTHBRAIN_BUNDLE (or the demo bundle) first, then every folder in
    SYNTHBRAIN_MODELS with a readable config.json (unreadable ones are left out)."""
    from synthbrain.bundle import read_config

    first = os.environ.get("SYNTHBRAIN_BUNDLE") or demo_path()
    paths = [first] + ([demo_path()] if first != demo_path() else [])
    models = os.environ.get("SYNTHBRAIN_MODELS")
    if models and Path(models).is_dir():
        paths += sorted(str(p) for p in Path(models).iterdir() if (p / "config.json").is_file())
    out, seen = [], set()
    for p in paths:
        real = str(Path(p).resolve())
        if real in seen:
            continue
        seen.add(real)
        try:
            name = read_config(p).get("name") or Path(p).name
        except SynthBrainError:
            if p == first:  # the configured bundle: keep it, so the page can say what is wrong with it
                name = Path(p).name
            else:
                continue
        out.append(BundleChoice(p, f"{name} (shipped demo)" if real == str(Path(demo_path()).resolve()) else name))
    return out


def device() -> str:
    """SYNTHBRAIN_DEVICE as the library's device picker reads ``--device`` (auto, cpu, cuda, cuda:N); a
    name it refuses (``gpu``, a GPU this machine lacks) is a ConfigError the page shows."""
    from synthbrain.training.distributed import pick_device

    raw = os.environ.get("SYNTHBRAIN_DEVICE", "").strip() or "auto"
    try:
        return str(pick_device(raw))
    except ConfigError as e:  # the picker speaks of --device; here the setting is the variable
        said = re.sub(r"^--device \S+: ", "", str(e)).replace("--device ", "SYNTHBRAIN_DEVICE=")
        raise ConfigError(f"SYNTHBRAIN_DEVICE={raw}: {said}") from None


@st.cache_resource(show_spinner="Loading the model bundle…")
def load_bundle_cached(path: str, device: str):
    """One loaded bundle per (folder, device) for the whole server process."""
    wait_for_model_code()
    from synthbrain.bundle import load_bundle

    return load_bundle(path, device=device)


@st.cache_resource(show_spinner=False)
def generator_cached(path: str, device: str):
    wait_for_model_code()
    from synthbrain.sampling import Generator

    return Generator(load_bundle_cached(path, device), device=device)


_warming: set[tuple[str, str]] = set()
_warming_lock = threading.Lock()


def _import_model_code() -> None:
    try:
        import synthbrain.bundle  # noqa: F401  (torch, MONAI: seconds on a cold start)
        import synthbrain.sampling  # noqa: F401  (diffusers)
    except Exception:  # noqa: BLE001  (the page that needs them imports them again and shows the error)
        pass
    finally:
        _imported.set()


_importing = threading.Lock()
_imported = threading.Event()


def import_model_code() -> None:
    """Import torch, MONAI and diffusers in a background thread, once per process. The first page after
    start-up needs them before it can load a bundle: ``app.py`` starts this as soon as the page's heading
    is out, so the imports overlap with the browser drawing the page. Started any earlier, the import
    would hold the interpreter while the heading waits."""
    if _importing.acquire(blocking=False):
        threading.Thread(target=_import_model_code, name="synthbrain-imports", daemon=True).start()


def wait_for_model_code() -> None:
    """Until the background import is done (started here if it was not). Whatever loads a model waits
    for it: diffusers' lazily loaded names are not safe to import from two threads at once (the warm-up
    once failed with "cannot import name 'DPMSolverMultistepScheduler'" beside the import)."""
    import_model_code()
    _imported.wait()


def warm_generator(path: str, device: str) -> None:
    """Build the generator of a loaded bundle in a background thread, once per process, while the user
    sets the sliders: the first Generate then waits for the model only. (The cache computes a value once,
    so a page that asks for the generator meanwhile waits for this build instead of making another.)"""
    with _warming_lock:
        if (path, device) in _warming:
            return
        _warming.add((path, device))
    threading.Thread(target=generator_cached, args=(path, device), name="synthbrain-warm-up", daemon=True).start()


def guidance_warning(bundle, guidance: float | None) -> str | None:
    """``synthbrain.sampling.guidance_warning``, imported when first asked for (it imports torch), so a
    page's top lines stay light and its title is drawn at once."""
    wait_for_model_code()
    from synthbrain.sampling import guidance_warning as warning

    return warning(bundle, guidance)


NO_GUIDANCE = ("No guidance control: this model was trained with its conditions always present (no "
               "classifier-free guidance), so it follows them at guidance 1, one network pass a step.")


def guidance_control(bundle, key: str) -> float:
    """The guidance slider (and its out-of-range warning), or for a bundle without classifier-free
    guidance a caption saying why there is none: such a bundle samples at guidance 1 only (the library
    refuses any other value)."""
    cfg = bundle.prior.config
    if not getattr(cfg, "classifier_free_guidance", True):
        st.caption(NO_GUIDANCE)
        return 1.0
    guidance = st.slider("Guidance", 0.0, 10.0, float(cfg.default_guidance), step=0.5, key=key,
                         help="Classifier-free guidance: how strongly the conditions are followed (1 = none).")
    if note := guidance_warning(bundle, guidance):
        st.warning(note, icon=":material/warning:")
    return guidance


def bundle_sidebar() -> str:
    """The sidebar's bundle picker; returns the chosen bundle folder (kept across pages)."""
    choices = bundle_choices()
    paths = [c.path for c in choices]
    current = st.session_state.get(BUNDLE_STATE)
    index = paths.index(current) if current in paths else 0
    if len(choices) > 1:
        labels = {c.path: c.label for c in choices}
        chosen = st.sidebar.selectbox("Model bundle", paths, index=index, format_func=labels.__getitem__,
                                      help="Bundles found in SYNTHBRAIN_MODELS")
    else:
        chosen = paths[0]
        st.sidebar.caption(f"Model bundle: **{choices[0].label}**")
    st.session_state[BUNDLE_STATE] = chosen
    return chosen


def current_bundle():
    """The chosen bundle, loaded (cached); shows the error and stops the page if it cannot load."""
    path = bundle_sidebar()
    try:
        return load_bundle_cached(path, device())
    except SynthBrainError as e:
        show_error(e)
        st.stop()


def whole_head(bundle) -> bool:
    """Whether the bundle was trained on whole-head images (its config's ``intensity``: an imported
    model-zoo LDM), so scans are taken with skull and scalp and min-max normalised."""
    from synthbrain.data.preprocess import is_whole_head

    return is_whole_head(bundle.config.get("intensity"))


def is_phantom(bundle) -> bool:
    """Whether the bundle was trained on the phantom cohort (its data fingerprint says so)."""
    return any(bool(bundle.config.get(part, {}).get("data_fingerprint", {}).get("phantom"))
               for part in ("autoencoder", "prior"))


PHANTOM_NOTE = ("This demo model was trained on a **phantom** cohort: the MNI152 template deformed by a simple "
                "ageing model. It has seen one anatomy, not a population; what it shows about ageing is the "
                "phantom's, not a real brain's.")


def sampling_page(without_prior: str):
    """The head of a page that samples, under the heading ``app.py`` drew: the synthetic-data note, the
    phantom note where it applies; stops with ``without_prior`` if the chosen bundle cannot sample.
    Returns the bundle.

    The note is drawn before the bundle loads (seconds on the first visit after start-up); then the
    bundle loads (a spinner) and the generator is built in the background (:func:`warm_generator`)."""
    from synthbrain.export import SYNTHETIC_NOTE

    st.caption(SYNTHETIC_NOTE)
    bundle = current_bundle()
    if bundle.has_prior:
        warm_generator(str(bundle.path), device())
    if is_phantom(bundle):
        st.info(PHANTOM_NOTE, icon=":material/info:")
    if not bundle.has_prior:
        st.error(f"{bundle.name}: this bundle has no prior (stage 2), so it {without_prior}")
        st.stop()
    return bundle


# ----------------------------------------------------------------------------------------- widgets


def _step(low: float, high: float) -> float:
    span = high - low
    return 1.0 if span >= 50 else 0.5 if span >= 10 else float(f"{span / 100:.1g}")


def condition_step(c) -> float:
    """The slider step of continuous condition ``c`` (1 for wide ranges, finer for narrow ones)."""
    return _step(c.low, c.high)


def initial_value(c) -> float | str:
    """A condition's default as its widget starts: continuous values snapped to the slider's step."""
    if c.kind != "continuous":
        return c.default
    step = _step(c.low, c.high)
    return float(min(c.high, max(c.low, c.low + round((c.default - c.low) / step) * step)))


def current_value(c, key: str) -> float | str:
    """The value the widget of condition ``c`` (made with ``condition_inputs(key=key)``) will return."""
    return st.session_state.get(f"{key}_{c.name}", initial_value(c))


def condition_inputs(schema, *, key: str, disabled: tuple[str, ...] = (),
                     values: dict[str, Any] | None = None, label_suffix: str = "") -> dict[str, Any]:
    """One widget per condition of ``schema`` (or of any sequence of conditions), in real units: a
    slider over [low, high] for a continuous condition (unit in the label), a radio for a binary one,
    a select box for a categorical one. Widgets named in ``disabled`` are greyed out and show
    ``values`` instead; ``label_suffix`` ends every label (", start" / ", end" of a sweep)."""
    out: dict[str, Any] = {}
    for c in schema:
        label = (f"{c.label} ({c.unit})" if c.unit else c.label) + label_suffix
        wkey = f"{key}_{c.name}"
        off = c.name in disabled
        st.session_state.setdefault(wkey, initial_value(c))
        if c.kind == "continuous":
            if off and values and values.get(c.name) is not None:
                st.session_state[wkey] = float(values[c.name])
            step = _step(c.low, c.high)
            out[c.name] = st.slider(label, float(c.low), float(c.high), step=step, key=wkey, disabled=off,
                                    format="%.0f" if step >= 1 else "%.1f" if step >= 0.1 else "%g",
                                    help=c.description or None)
        else:
            widget = st.radio if c.kind == "binary" else st.selectbox
            extra = {"horizontal": True} if c.kind == "binary" else {}
            out[c.name] = widget(label, list(c.categories), key=wkey, disabled=off, help=c.description or None, **extra)
    return out


# what public_message cuts, left to right, one match at a time: a URL (``sqlite:////srv/db/study.db``,
# ``postgresql://user:secret@host/optuna``), a quoted absolute path (spaces and all), an unquoted one.
# Unquoted, a folder name may hold spaces (``/srv/my models/b1/x.pt``: more path follows it); the last
# part ends at a space, and whatever follows it stays as text. Cutting too much is the safe side.
_PART = r"[^\s/:;,'\"()\[\]]+"
_PUBLIC = re.compile(
    r"(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()\[\]<>]*[^\s'\"()\[\]<>.,;:])"
    r"|(?P<q>['\"])(?P<quoted>~?/[^'\"\n]*)(?P=q)"
    # a slash not inside a word or a number ("mL/year", "2/3" stay)
    rf"|(?P<path>(?<![\w.~/-])~?/(?:{_PART}(?: {_PART})*/)*{_PART}/?)"
)


def _last_part(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "/"


def _public(m: re.Match) -> str:
    if m["url"]:
        scheme, rest = m["url"].split("://", 1)
        rest = rest.split("?", 1)[0].split("#", 1)[0]
        # the host part may hold a user and password: only the last path part is kept
        name = rest.rstrip("/").rsplit("/", 1)[-1] if "/" in rest.rstrip("/") else ""
        return f"{scheme}://…/{name}" if name else f"{scheme}://…"
    if m["quoted"]:
        return f"{m['q']}{_last_part(m['quoted'])}{m['q']}"
    return _last_part(m["path"])


def public_message(error: SynthBrainError | str) -> str:
    """The message with every absolute path cut to its last part (the file or folder name) and every
    URL to its scheme and last part: a visitor learns which file is wrong, not how the server's disk is
    laid out, nor a database's host or password."""
    return _PUBLIC.sub(_public, str(error))


def show_error(error: SynthBrainError) -> None:
    """A library error as the one-line message the library wrote (file names, no server paths),
    never a traceback."""
    st.error(public_message(error), icon=":material/error:")
