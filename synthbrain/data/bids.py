"""BIDS datasets: ``participants.tsv`` + ``sub-<id>/anat/sub-<id>_T1w.nii.gz``.

:class:`BIDSDataset` preprocesses every T1w onto a grid once, caches the result as a BIDS derivative
(``derivatives/synthbrain/sub-<id>/anat/sub-<id>_space-MNI152NLin2009aSym_res-<r>_desc-preproc_T1w.nii.gz``
with a JSON sidecar that fingerprints its source), and yields ``(volume, condition vector)`` pairs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from synthbrain.conditions import DEFAULT_SCHEMA, ConditionSchema, read_schema_file
from synthbrain.errors import ConditionError, DatasetError, SynthBrainError
from synthbrain.grids import SPACE, Grid, get_grid

MISSING = {"", "n/a", "na", "nan", "none"}
DERIVATIVE = "synthbrain"
OnStep = Callable[[int, int, dict], None]


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a tab-separated file with a header line, as dicts of strings."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 tab-separated values") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable tab-separated table ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def tsv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows -> TSV text (floats with 2 decimals, missing values as ``n/a``)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, (float, np.floating)):
            return f"{v:.2f}"
        return str(v)
    return "\t".join(columns) + "\n" + "".join("\t".join(fmt(r.get(c)) for c in columns) + "\n" for r in rows)


def subject_label(participant_id: str) -> str:
    """``sub-0001`` or ``0001`` -> ``sub-0001``."""
    pid = participant_id.strip()
    return pid if pid.startswith("sub-") else f"sub-{pid}"


def find_t1w(root: Path, sub: str) -> Path:
    anat = root / sub / "anat"
    try:
        for ext in (".nii.gz", ".nii"):
            p = anat / f"{sub}_T1w{ext}"
            if p.is_file():
                return p
        # sessions or acquisition entities: take the first T1w found, in sorted order
        found = sorted(root.glob(f"{sub}/**/{sub}_*T1w.nii*"))
    except (OSError, ValueError) as e:  # a participant_id no file can be named after (too long, a NUL, ...)
        raise DatasetError(f"{sub[:80]}: cannot look for its T1w image ({type(e).__name__}: "
                           f"{getattr(e, 'strerror', None) or e})") from None
    if not found:
        raise DatasetError(f"{sub}: no T1w image (looked for {sub}/anat/{sub}_T1w.nii.gz)")
    return found[0]


def derivative_path(root: Path, sub: str, grid: Grid, suffix: str = "desc-preproc_T1w") -> Path:
    return (root / "derivatives" / DERIVATIVE / sub / "anat"
            / f"{sub}_space-{SPACE}_res-{grid.res_label}_{suffix}.nii.gz")


def _file_fingerprint(path: Path, grid: Grid) -> str:
    """What a cached derivative depends on (the source file's name, size and time, the grid, the
    preprocessing code) as an opaque digest: a real volume's sidecar never names its source file."""
    from synthbrain.cache import code_hash
    from synthbrain.data import preprocess

    st = path.stat()
    g = grid.to_dict()
    text = (f"{path.name}:{st.st_size}:{st.st_mtime_ns}:"
            f"{g['shape']}:{g['spacing']}:{g['origin']}:{code_hash(preprocess)}")
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Subject:
    label: str                    # sub-<id>
    t1w: Path
    values: dict[str, Any]        # condition values in real units (validated)
    row: dict[str, str]           # the participants.tsv row as read


class BIDSDataset:
    """A BIDS dataset as ``(volume (1, X, Y, Z) float32 in [0, 1], conditions (width,) float32)`` pairs.

    ``subjects`` restricts it to some participant labels (e.g. a training split). Construction reads
    ``participants.tsv`` and checks every subject has a T1w and a valid value for each condition;
    preprocessing happens on first access (or all at once with :meth:`prepare`).

    ``intensity``: a bundle's convention (config.json ``intensity``). A whole-head one (the imported UK
    Biobank model's) keeps the skull and scalp: its volumes must be whole-head T1s rigidly aligned to
    MNI152, min-max normalised over the field of view, cached apart from the brain-extracted ones
    (``desc-wholehead``).
    """

    def __init__(self, root: str | Path, grid: Grid | str = "demo", schema: ConditionSchema = DEFAULT_SCHEMA,
                 subjects: Iterable[str] | None = None, intensity: dict | None = None) -> None:
        from synthbrain.data.preprocess import is_whole_head

        self.root = Path(root)
        self.grid = get_grid(grid)
        self.schema = schema
        self.intensity = intensity
        self.whole_head = is_whole_head(intensity)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a folder")
        rows = read_tsv(self.root / "participants.tsv")
        if "participant_id" not in rows[0]:
            raise DatasetError(f"{self.root / 'participants.tsv'}: no participant_id column")
        wanted = None if subjects is None else {subject_label(s) for s in subjects}
        self.subjects: list[Subject] = []
        for number, row in enumerate(rows, start=2):
            if not (row["participant_id"] or "").strip():
                raise DatasetError(f"{self.root / 'participants.tsv'}: line {number} has no participant_id")
            sub = subject_label(row["participant_id"])
            if wanted is not None and sub not in wanted:
                continue
            self.subjects.append(Subject(sub, find_t1w(self.root, sub), self._values(sub, row), row))
        if not self.subjects:
            raise DatasetError(f"{self.root}: no subjects" + (" match the requested split" if wanted else ""))

    def _values(self, sub: str, row: Mapping[str, str]) -> dict[str, Any]:
        values = {}
        for c in self.schema:
            raw = row.get(c.name)
            if raw is None:
                raise DatasetError(f"participants.tsv has no {c.name!r} column (needed for {sub})")
            if raw.strip().lower() in MISSING:
                raise DatasetError(f"{sub}: no value for {c.name!r} in participants.tsv")
            try:
                values[c.name] = c.validate(raw)
            except ConditionError as e:
                raise DatasetError(f"{sub}: {e}") from None
        return values

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.subjects]

    def __len__(self) -> int:
        return len(self.subjects)

    def conditions(self, index: int) -> np.ndarray:
        return self.schema.encode(self.subjects[index].values)

    def preprocessed_path(self, index: int, known_prepared: str | None = None) -> Path:
        """Preprocess subject ``index`` onto the grid unless a cache with the same source exists (as
        ``synthbrain prepare`` writes one). A T1w that is not prepared (not in MNI space, or with a skull)
        is refused with a message that says to run ``synthbrain prepare``. ``known_prepared`` (why, for
        the sidecar) skips that check for volumes their producer made in MNI space (the phantom cohort)."""
        from synthbrain.data.prepare import require_prepared
        from synthbrain.data.preprocess import preprocess
        from synthbrain.export import REAL, kind, sidecar
        from synthbrain.io import read_volume, sidecar_path, write_volume

        s = self.subjects[index]
        out = derivative_path(self.root, s.label, self.grid,
                              "desc-wholehead_T1w" if self.whole_head else "desc-preproc_T1w")
        source = _file_fingerprint(s.t1w, self.grid)
        side = sidecar_path(out)
        if out.is_file() and side.is_file():
            try:
                if json.loads(side.read_text()).get("SourceFingerprint") == source:
                    return out
            except json.JSONDecodeError:
                pass  # a damaged sidecar: preprocess again
        try:
            scan = read_volume(s.t1w)
            # nothing unaligned or with a skull reaches a model
            checked = (require_prepared(scan, self.grid, whole_head=self.whole_head).to_dict()
                       if known_prepared is None else {"Skipped": known_prepared})
            vol, info = preprocess(scan, self.grid, self.intensity)
        except SynthBrainError as e:
            raise DatasetError(f"{s.label}: {e}") from None
        write_volume(out, vol, description=kind(REAL).description,
                     sidecar=sidecar(REAL, {"SourceFingerprint": source, "Sources": [str(s.t1w.relative_to(self.root))],
                                            "SpatialReference": SPACE, **info.to_dict(),
                                            "PreparedCheck": checked}))
        return out

    def prepare(self, on_step: OnStep | None = None, jobs: int = 1, known_prepared: str | None = None) -> None:
        """Preprocess every subject now (cached ones are skipped), ``jobs`` subjects at a time in worker
        processes (the files are the same as one process writes); ``known_prepared``: see
        :meth:`preprocessed_path`."""
        if jobs < 1:
            raise DatasetError(f"--jobs must be >= 1, got {jobs}")
        if jobs == 1 or len(self) <= 1:
            for i in range(len(self)):
                self.preprocessed_path(i, known_prepared)
                if on_step is not None:
                    on_step(i + 1, len(self), {"subject": self.subjects[i].label})
            return
        import multiprocessing
        from concurrent.futures import as_completed

        from synthbrain.data.template import load_template

        load_template(self.grid)  # builds the on-disk cache once, before the workers read it
        # spawn: a forked child would inherit the parent's torch thread pool in whatever state
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(self)), mp_context=ctx) as pool:
            futures = {pool.submit(_preprocess_one, self.root, self.grid, self.schema, known_prepared, s.label): s.label
                       for s in self.subjects}
            for k, f in enumerate(as_completed(futures)):
                f.result()
                if on_step is not None:
                    on_step(k + 1, len(self), {"subject": futures[f]})

    def volume(self, index: int) -> np.ndarray:
        """Preprocessed volume of subject ``index``: (X, Y, Z) float32 in [0, 1]."""
        from synthbrain.io import read_volume

        return read_volume(self.preprocessed_path(index)).data

    def __getitem__(self, index: int):
        import torch

        return (torch.from_numpy(self.volume(index)[None].copy()),
                torch.from_numpy(self.conditions(index)))

    def fingerprint(self) -> dict:
        """What the data was: subject count, a hash of the participant rows and the T1w file sizes."""
        h = hashlib.sha256()
        for s in self.subjects:
            h.update(json.dumps([s.label, s.row, s.t1w.stat().st_size], sort_keys=True).encode())
        desc_path = self.root / "dataset_description.json"
        try:
            desc = json.loads(desc_path.read_text()) if desc_path.is_file() else {}
        except json.JSONDecodeError:
            desc = {}
        made_by = (desc.get("GeneratedBy") or [{}])[0].get("Description", "")
        return {"name": desc.get("Name", self.root.name), "subjects": len(self), "grid": self.grid.name,
                "phantom": "Phantom" in desc, "generated_by": made_by, "sha256": h.hexdigest()}


def _preprocess_one(root: Path, grid: Grid, schema: ConditionSchema, known_prepared: str | None, label: str) -> None:
    BIDSDataset(root, grid=grid, schema=schema, subjects=[label]).preprocessed_path(0, known_prepared)


def split_subjects(labels: Sequence[str], val_fraction: float = 0.1, seed: int = 0,
                   min_val: int = 1) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a seeded hash of each label.

    A subject is held out when its hash, read as a fraction in [0, 1), is below ``val_fraction``: the
    decision depends on the subject alone, so adding subjects never moves one to the other side. So
    the validation set holds about (not exactly) ``val_fraction`` of the subjects; with few subjects
    it is topped up to ``min_val`` with the next lowest hashes (those may move back to training once
    the dataset grows).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {val_fraction}")

    def position(label: str) -> float:
        return int(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest()[:16], 16) / 16**16

    keyed = sorted(labels, key=position)
    n_val = 0 if val_fraction == 0 else max(min_val, sum(position(s) < val_fraction for s in labels))
    if n_val >= len(labels):
        raise DatasetError(f"{len(labels)} subjects are too few to hold {n_val} out for validation")
    val = set(keyed[:n_val])
    return [s for s in labels if s not in val], [s for s in labels if s in val]


def schema_for_dataset(root: str | Path, extra_conditions: Sequence[str] = (),
                       base: ConditionSchema = DEFAULT_SCHEMA,
                       schema_file: str | Path | None = None) -> ConditionSchema:
    """The condition schema a model trained on ``root`` gets: the default conditions (plus
    ``extra_conditions`` columns), with continuous ranges set to what the participants span.

    With ``schema_file`` (see :func:`synthbrain.conditions.read_schema_file`) the cohort's declared
    conditions replace the default ones: every subject's value of every declared column is checked
    against its declaration (a number in the valid range, one of the levels), each error naming the
    subject and the column, and every level must occur in the data (a model cannot learn one it never
    sees). Continuous ranges are then narrowed to what the participants span, within the declared range."""
    if schema_file is not None:
        return _declared_schema(Path(root), read_schema_file(schema_file), Path(schema_file).name,
                                extra_conditions)
    rows = read_tsv(Path(root) / "participants.tsv")
    table: dict[str, list[Any]] = {}
    for row in rows:
        sub = subject_label(row.get("participant_id") or "?")
        for c in list(base.names) + list(extra_conditions):
            raw = row.get(c)
            if raw is None:
                raise DatasetError(f"participants.tsv has no {c!r} column (needed for {sub})")
            if raw.strip().lower() in MISSING:
                raise DatasetError(f"{sub}: no value for {c!r} in participants.tsv")
            table.setdefault(c, []).append(raw)
    for c in base:
        if c.kind == "continuous":
            try:
                bad = [v for v in table[c.name] if not math.isfinite(float(v))]
            except ValueError as e:
                raise DatasetError(f"participants.tsv: column {c.name!r} must be numbers ({e})") from None
            if bad:
                raise DatasetError(f"participants.tsv: column {c.name!r} must be finite numbers, got {bad[0]!r}")
    widened = ConditionSchema(tuple(
        replace(c, low=-1e9, high=1e9) if c.kind == "continuous" else c for c in base))
    try:
        return widened.with_extra_columns(table, extra_conditions).with_ranges_from(table)
    except ConditionError as e:
        raise DatasetError(f"participants.tsv: {e}") from None


def _declared_schema(root: Path, declared: ConditionSchema, schema_name: str,
                     extra_conditions: Sequence[str]) -> ConditionSchema:
    tsv = root / "participants.tsv"
    rows = read_tsv(tsv)
    names = declared.names + [c for c in extra_conditions if c not in declared.names]
    absent = [c for c in names if c not in rows[0]]
    if absent:
        source = f"{schema_name} declares" if absent[0] in declared.names else "--condition names"
        raise DatasetError(f"{tsv}: no column {absent[0]!r}, which {source} (its columns: "
                           f"{', '.join(k for k in rows[0] if k)})")
    table: dict[str, list[Any]] = {c: [] for c in names}
    for number, row in enumerate(rows, start=2):
        pid = (row.get("participant_id") or "").strip()
        sub = subject_label(pid) if pid else f"line {number}"
        for name in names:
            raw = row.get(name) or ""
            if raw.strip().lower() in MISSING:
                raise DatasetError(f"participants.tsv: {sub}, column {name!r}: no value; fill it in or remove "
                                   f"{sub}'s row")
            if name in declared.names:
                try:
                    declared[name].validate(raw, strict=True)
                except ConditionError as e:
                    raise DatasetError(f"participants.tsv: {sub}, column {name!r}: {e} ({schema_name})") from None
            table[name].append(raw)
    for c in declared:
        if c.kind != "continuous":
            seen = {c.validate(v) for v in table[c.name]}
            unseen = [level for level in c.categories if level not in seen]
            if unseen:
                raise DatasetError(f"participants.tsv: column {c.name!r}: no subject has the level {unseen[0]!r} "
                                   f"that {schema_name} declares; a model cannot learn a level it never sees "
                                   f"(add such subjects or remove the level)")
    try:
        schema = declared.with_extra_columns(table, extra_conditions).with_ranges_from(table)
    except ConditionError as e:
        raise DatasetError(f"participants.tsv: {e}") from None
    narrowed = []
    for c in schema:  # within the declared range (with_ranges_from rounds outward to whole units)
        if c.name in declared.names and c.kind == "continuous":
            d = declared[c.name]
            low, high = max(c.low, d.low), min(c.high, d.high)
            c = replace(c, low=low, high=high, default=float(min(high, max(low, c.default))))
        narrowed.append(c)
    return ConditionSchema(tuple(narrowed))
