"""Trajectories: one brain through a condition (usually age). Plan the conditions of every frame
(:class:`Setting` per condition, :func:`plan_series`), sample them from one seed (the same starting
noise, so one brain) or as edits of one preprocessed scan (SDEdit, :meth:`Generator.edit`), measure
each frame, and keep the series as a :class:`Trajectory` that gives its chart, GIF and a BIDS-like
zip through the one exporter (:mod:`synthbrain.export`).

```python
from synthbrain.sampling import Generator
from synthbrain.series import axis_values, build_trajectory, plan_series

gen = Generator.from_bundle()
ages = axis_values(55, 85, 4)                                   # [55.0, 65.0, 75.0, 85.0] years
plan = plan_series(gen.schema, gen.bundle.population, "age", ages, {})
traj = build_trajectory(gen, gen.bundle, plan, axis="age", seed=3, steps=4, guidance=2.0)
traj.zip()                                                      # bytes: one session per frame
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from synthbrain.errors import ConfigError, InvalidVolumeError
from synthbrain.io import Volume

OnStep = Callable[[int, int, dict], None]
MODES = {"typical": "Typical for age and sex", "fixed": "Fixed", "sweep": "Sweep (start → end)",
         "switch": "Changes at an age"}
MEASURED = (("brain_volume", "Brain volume"), ("ventricular_volume", "Ventricular volume"))
MAX_FRAMES = 25                  # e.g. every 2 years from 40 to 88: enough for a smooth live age slider


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Setting:
    """How one condition moves along the series: ``typical`` (the population's value for the frame's
    age and sex), ``fixed`` at ``value``, ``sweep`` linearly from ``value`` to ``end`` (continuous),
    or ``switch`` from ``value`` to ``end`` at axis value ``at`` (a category, e.g. a diagnosis)."""

    mode: str
    value: float | str | None = None
    end: float | str | None = None
    at: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {tuple(MODES)}, got {self.mode!r}")
        if self.mode in ("fixed", "sweep", "switch") and self.value is None:
            raise ConfigError(f"a {self.mode} setting needs a value")
        if self.mode in ("sweep", "switch") and self.end is None:
            raise ConfigError(f"a {self.mode} setting needs an end value")
        if self.mode == "switch" and self.at is None:
            raise ConfigError("a switch setting needs the axis value 'at' where it changes")


def axis_name(schema) -> str:
    """The condition a trajectory runs along: age where the schema has it, else its first
    continuous condition."""
    from synthbrain.population import AGE

    if AGE in schema.names:
        return AGE
    for c in schema:
        if c.kind == "continuous":
            return c.name
    raise ConfigError("the condition schema has no continuous condition to sweep")


def modes_for(condition, population) -> list[str]:
    """The settings a condition can take (the first is its default)."""
    from synthbrain.population import SEX

    if condition.kind == "continuous":
        typical = ["typical"] if condition.name in population.coefficients else []
        return typical + ["fixed", "sweep"]
    # the subject's sex is who they are, not something that changes along one brain's ageing
    return ["fixed"] if condition.name == SEX else ["fixed", "switch"]


def axis_values(low: float, high: float, k: int) -> list[float]:
    """``k`` evenly spaced values from ``low`` to ``high`` (inclusive), rounded to 0.1."""
    if not 2 <= k <= MAX_FRAMES:
        raise ConfigError(f"a series has 2..{MAX_FRAMES} frames, got {k}")
    if not high > low:
        raise ConfigError(f"the range must go up: got {low:g} to {high:g}")
    return [round(float(v), 1) for v in np.linspace(low, high, k)]


def plan_series(schema, population, axis: str, values: Sequence[float],
                settings: Mapping[str, Setting]) -> list[dict[str, Any]]:
    """The conditions of every frame, in real units: ``axis`` takes ``values[i]``; every other
    condition follows its setting (a missing setting: its first mode of :func:`modes_for`, at the
    schema's default)."""
    n = len(values)
    frames = []
    for i, v in enumerate(values):
        t = i / (n - 1) if n > 1 else 0.0
        out: dict[str, Any] = {axis: float(v)}
        for c in schema:
            if c.name == axis:
                continue
            s = settings.get(c.name) or Setting(modes_for(c, population)[0], c.default)
            if s.mode not in modes_for(c, population):
                raise ConfigError(f"condition {c.name!r} cannot be set as {s.mode!r}")
            if s.mode == "typical":
                continue  # filled in below, from this frame's age and sex
            if s.mode == "fixed":
                out[c.name] = s.value
            elif s.mode == "sweep":
                out[c.name] = round(float(s.value) + t * (float(s.end) - float(s.value)), 1)
            else:
                out[c.name] = s.end if float(v) >= float(s.at) else s.value
        frames.append(schema.complete(population.typical(schema, out)))
    return frames


# -------------------------------------------------------------------------------------- sampling


def sample_series(generator, conditions: Sequence[Mapping[str, Any]], *, seed: int, steps: int, guidance: float,
                  source: np.ndarray | None = None, strength: float = 0.5, on_step: OnStep | None = None) -> list:
    """One sample per entry of ``conditions``, all from the same ``seed`` (the same starting noise, so
    one brain), or, given a preprocessed ``source`` volume (X, Y, Z) on the bundle's grid, edits of it
    (``Generator.edit`` at ``strength``). ``on_step(i, n)`` counts denoising steps over the series."""
    k = len(conditions)

    def frame_step(j: int) -> OnStep | None:
        if on_step is None:
            return None

        def step(i: int, n: int, info: dict | None = None) -> None:
            on_step(j * n + i, k * n, {**(info or {}), "frame": j + 1})
        return step

    out = []
    latent = None if source is None else generator.encode(source)  # one scan, many ages: encoded once
    for j, cond in enumerate(conditions):
        if source is None:
            out.append(generator.sample(cond, n=1, seed=seed, steps=steps, guidance=guidance,
                                        on_step=frame_step(j))[0])
        else:
            out.append(generator.edit(source, cond, strength=strength, seed=seed, steps=steps, guidance=guidance,
                                      on_step=frame_step(j), latent=latent))
    return out


@dataclass(eq=False)
class Frame:
    """One frame of a series: the sample, its viewer copy, and what was measured on it (mL)."""

    sample: Any                     # synthbrain.sampling.Sample
    display: bytes                  # gzip NIfTI for the viewer
    measured: dict[str, float] | None = None
    measure_error: str | None = None

    @property
    def volume(self) -> Volume:
        return self.sample.volume


def make_frame(sample, grid, whole_head: bool = False) -> Frame:
    """A sample with its display file and what was measured on it (or why it could not be; a whole-head
    model's samples are not measured: see WHOLE_HEAD_UNMEASURED)."""
    from synthbrain.data.preprocess import WHOLE_HEAD_UNMEASURED
    from synthbrain.measure import measure_volume
    from synthbrain.viz.display import display_bytes

    display = display_bytes(sample.volume, sample.provenance)
    if whole_head:
        return Frame(sample, display, None, WHOLE_HEAD_UNMEASURED)
    try:
        m = measure_volume(sample.volume, grid)
    except InvalidVolumeError as e:
        return Frame(sample, display, None, str(e))
    return Frame(sample, display, {"brain_volume": m.brain_volume, "ventricular_volume": m.ventricular_volume,
                                   "intracranial_volume": m.intracranial_volume})


# ----------------------------------------------------------------------------------------- result


@dataclass(eq=False)
class Trajectory:
    """A finished series: its frames (in order along ``axis``), how they were made, and, for edits,
    the scan they started from. What it can give: its chart (:meth:`figure`), a GIF of one plane
    (:meth:`gif`), and the series as files (:meth:`zip`, :meth:`sidecar`). The app keeps one in a
    session's state only (an edit holds a person's scan)."""

    frames: list[Frame]
    bundle: Any = field(repr=False)
    axis: str
    seed: int
    steps: int
    guidance: float
    source_label: str = ""          # edits: the scan they started from (shown in this session, never written)
    source: Volume | None = None    # edits: the preprocessed scan
    source_display: bytes = b""
    strength: float | None = None

    @property
    def is_edit(self) -> bool:
        return self.source is not None

    @property
    def provenance(self) -> str:
        """``derived`` for edits of a scan (they carry that person's anatomy), else ``synthetic``."""
        from synthbrain.export import DERIVED, SYNTHETIC

        return DERIVED if self.is_edit else SYNTHETIC

    @property
    def axis_values(self) -> list[float]:
        return [float(f.sample.conditions[self.axis]) for f in self.frames]

    @property
    def axis_condition(self):
        return self.bundle.schema[self.axis]

    def label(self, i: int) -> str:
        """'age 62.5 years'."""
        c = self.axis_condition
        return f"{c.label.lower()} {self.axis_values[i]:g} {c.unit}".strip()

    def caption(self, i: int) -> str:
        """What frame ``i`` is, in one line: the requested conditions and what was measured on it (mL)."""
        frame = self.frames[i]
        asked = ", ".join(f"{c.label.lower()} {frame.sample.conditions[c.name]:g} {c.unit}".strip()
                          if c.kind == "continuous" else f"{c.label.lower()} {frame.sample.conditions[c.name]}"
                          for c in self.bundle.schema)
        m = frame.measured
        got = (f"brain {m['brain_volume']:.0f} mL, ventricles {m['ventricular_volume']:.1f} mL" if m
               else "n/a (" + (frame.measure_error or "not measured") + ")")
        return f"Frame {i + 1} of {len(self.frames)}. Requested: {asked}. Measured: {got}."

    @cached_property
    def display_series(self) -> bytes:
        """Every frame in one 4D gzip NIfTI for the viewer (frame ``t`` = ``frames[t]``), so the viewer
        steps through the series in the browser (the live age slider) without a file per frame."""
        from synthbrain.viz.display import display_series_bytes

        return display_series_bytes([f.volume for f in self.frames], self.provenance)

    def requested(self, name: str) -> list[float] | None:
        if name not in self.bundle.schema.names:
            return None
        return [float(f.sample.conditions[name]) for f in self.frames]

    def measured(self, name: str) -> list[float | None]:
        return [f.measured.get(name) if f.measured else None for f in self.frames]

    def figure(self):
        from synthbrain.viz.figures import VolumeSeries, trajectory_figure

        c = self.axis_condition
        series = [VolumeSeries(label, self.measured(name), self.requested(name)) for name, label in MEASURED]
        return trajectory_figure(self.axis_values, series, x_title=f"{c.label} ({c.unit})" if c.unit else c.label)

    def gif(self, plane: str, point_mm: Sequence[float] | None = None) -> bytes:
        from synthbrain.viz.series import series_gif

        # one fixed window (the viewer's): frames are comparable and the GIF matches the viewer
        prefix = "derived, " if self.is_edit else "synthetic, "
        return series_gif([f.volume for f in self.frames], plane, point_mm=point_mm,
                          labels=[prefix + self.label(i) for i in range(len(self.frames))], window=(0.0, 0.9))

    @property
    def subject(self) -> str:
        """BIDS subject label of the series ('sub-synthseed3'; an edit: 'sub-derivededit3')."""
        return f"sub-{self.subject_label}"

    @property
    def subject_label(self) -> str:
        return f"derivededit{self.seed}" if self.is_edit else f"synthseed{self.seed}"

    def entities(self, i: int) -> str:
        from synthbrain.sampling import sample_entities

        return sample_entities(self.bundle, self.subject_label, f"{i + 1:02d}")

    def stem(self, i: int) -> str:
        """File stem of frame ``i``, with the kind (``desc-synthetic`` / ``desc-derived``) in it."""
        from synthbrain.export import file_stem

        return file_stem(self.provenance, self.entities(i))

    def sidecar(self, i: int) -> dict:
        from synthbrain.sampling import sample_sidecar

        f = self.frames[i]
        measured = ({f"{k}_mL": v for k, v in f.measured.items()} if f.measured else {"error": f.measure_error})
        series = {"Frame": i + 1, "Frames": len(self.frames), "Axis": self.axis,
                  "Mode": "edit of a scan (SDEdit)" if self.is_edit else "one seed through the series"}
        if self.is_edit:
            series.update(Strength=self.strength)  # the source is named by its digest only (see export)
        return sample_sidecar(f.sample, self.bundle, {"Measured": measured, "Series": series})

    def zip(self) -> bytes:
        """The series as a small BIDS-like dataset (through the one exporter): one session per frame
        (NIfTI float32 + JSON sidecar), a sessions.tsv with requested and measured values,
        dataset_description.json; synthetic for one seed, derived for edits of a scan."""
        from synthbrain.export import DatasetWriter, generated_by
        from synthbrain.sampling import samples_table

        title = ("SynthBrain edits of a scan through age (derived data)" if self.is_edit
                 else "SynthBrain synthetic trajectory")
        writer = DatasetWriter(self.provenance, title, generated_by(self.bundle))
        sub = self.subject
        sessions = [f"ses-{i + 1:02d}" for i in range(len(self.frames))]
        for i, f in enumerate(self.frames):
            writer.add(f"{sub}/{sessions[i]}/anat", self.entities(i), f.volume, self.sidecar(i))
        rows, cols, units = samples_table([f.sample for f in self.frames], sessions, self.bundle,
                                          [f.measured for f in self.frames], id_column="session_id")
        writer.table(f"{sub}/{sub}_sessions.tsv", rows, cols, units)
        return writer.close()

    @property
    def nbytes(self) -> int:
        extra = self.source.data.nbytes + len(self.source_display) if self.source is not None else 0
        shown = len(self.__dict__.get("display_series", b""))  # once the viewer has asked for it
        return sum(f.volume.data.nbytes + len(f.display) for f in self.frames) + extra + shown


def build_trajectory(generator, bundle, conditions: Sequence[Mapping[str, Any]], *, axis: str, seed: int,
                     steps: int, guidance: float, source: Volume | None = None, source_label: str = "",
                     strength: float = 0.5, on_step: OnStep | None = None) -> Trajectory:
    """Sample the series (see :func:`sample_series`), then measure every frame. ``conditions``: one
    dict per frame in real units (:func:`plan_series`); ``source``: a preprocessed scan on the
    bundle's grid (edits, derived data) or None (one seed, synthetic); ``source_label`` names it in
    this session only (never written). ``on_step(i, n)`` runs over the whole job: the denoising
    steps, then one step per measured frame. The generator is reentrant, so callers need no lock."""
    from synthbrain.data.preprocess import is_whole_head
    from synthbrain.export import REAL
    from synthbrain.viz.display import display_bytes

    k = len(conditions)
    total = [0]
    whole_head = is_whole_head(bundle.config.get("intensity"))

    def sampling(i: int, n: int, info: dict) -> None:
        total[0] = n
        if on_step is not None:
            on_step(i, n + k, info)

    samples = sample_series(generator, conditions, seed=seed, steps=steps, guidance=guidance,
                            source=None if source is None else source.data, strength=strength, on_step=sampling)
    frames = []
    for j, s in enumerate(samples):
        frames.append(make_frame(s, bundle.grid, whole_head=whole_head))
        if on_step is not None:
            on_step(total[0] + j + 1, total[0] + k, {"measured": j + 1})
    shown = display_bytes(source, REAL) if source is not None else b""
    return Trajectory(frames, bundle, axis, seed, steps, guidance, source_label=source_label, source=source,
                      source_display=shown, strength=strength if source is not None else None)
