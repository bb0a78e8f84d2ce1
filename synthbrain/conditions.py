"""The condition schema: what a model is conditioned on, in real units, and its normalisation.

A model sees a condition *vector* with every entry in [0, 1]: a continuous condition is scaled
linearly from its valid range, a binary one is 0 or 1, a categorical one is one-hot. The schema is
saved in every model bundle, so a bundle knows its own sliders, units and ranges.

The default schema (``DEFAULT_SCHEMA``) is the KCL Synthetic Brain Project's: age (years), sex (F/M),
ventricular volume (mL) and brain volume (mL). Extra columns of a ``participants.tsv`` (diagnosis,
site, ...) are added with :meth:`ConditionSchema.with_extra_columns`, or a cohort declares its own
conditions in a schema file (:func:`read_schema_file`; checked against its data by
:func:`synthbrain.data.bids.schema_for_dataset`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from synthbrain.errors import ConditionError

Kind = Literal["continuous", "binary", "categorical"]
_SEX_ALIASES = {"f": "F", "female": "F", "w": "F", "woman": "F", "0": "F",
                "m": "M", "male": "M", "man": "M", "1": "M"}
# Value a condition vector holds for "no condition" (classifier-free guidance): outside [0, 1] so the
# network can tell it apart, and MONAI's DiffusionInferer uses the same fill value by default.
NULL_VALUE = -1.0


@dataclass(frozen=True)
class Condition:
    """One condition. ``low``/``high`` bound a continuous value (inclusive, in ``unit``);
    ``categories`` lists the allowed labels of a binary (exactly two) or categorical condition;
    ``codes`` maps values a table holds to them (``(("1", "M"), ("2", "F"))``), and where a condition has
    codes, nothing else is read as an index into the labels."""

    name: str
    label: str
    unit: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    categories: tuple[str, ...] = ()
    default: float | str | None = None
    description: str = ""
    codes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ConditionError(f"condition name {self.name!r} must be a Python identifier")
        if self.kind == "continuous":
            if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)):
                raise ConditionError(f"condition {self.name!r}: a continuous condition needs finite low/high")
            if not self.low < self.high:
                raise ConditionError(f"condition {self.name!r}: low ({self.low}) must be < high ({self.high})")
            if self.default is None:
                object.__setattr__(self, "default", (self.low + self.high) / 2)
        elif self.kind in ("binary", "categorical"):
            cats = tuple(str(c) for c in self.categories)
            object.__setattr__(self, "categories", cats)
            if self.kind == "binary" and len(cats) != 2:
                raise ConditionError(f"condition {self.name!r}: binary needs exactly 2 categories, got {cats}")
            if self.kind == "categorical" and len(cats) < 2:
                raise ConditionError(f"condition {self.name!r}: categorical needs >= 2 categories, got {cats}")
            if len(set(cats)) != len(cats):
                raise ConditionError(f"condition {self.name!r}: duplicate categories {cats}")
            codes = tuple((str(k).strip(), str(v)) for k, v in self.codes)
            object.__setattr__(self, "codes", codes)
            bad = [v for _, v in codes if v not in cats]
            if bad:
                raise ConditionError(f"condition {self.name!r}: code(s) map to {bad[0]!r}, which is not one of "
                                     f"its levels {', '.join(cats)}")
            if self.default is None:
                object.__setattr__(self, "default", cats[0])
        else:
            raise ConditionError(f"condition {self.name!r}: kind must be continuous, binary or categorical")
        if self.codes and self.kind == "continuous":
            raise ConditionError(f"condition {self.name!r}: codes are for binary or categorical conditions")
        self.validate(self.default)

    @property
    def width(self) -> int:
        """Number of entries this condition takes in the condition vector."""
        return len(self.categories) if self.kind == "categorical" else 1

    @property
    def range_text(self) -> str:
        if self.kind == "continuous":
            return f"{self.low:g}..{self.high:g} {self.unit}".rstrip()
        return "one of " + ", ".join(self.categories)

    def validate(self, value: Any, strict: bool = False) -> float | str:
        """Parse ``value`` into this condition's type, or raise ``ConditionError`` naming the valid range.
        ``strict``: a label must be one of the levels (or a code, or a sex alias), never an index."""
        if self.kind == "continuous":
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ConditionError(
                    f"{self.name}: {value!r} is not a number (valid range {self.range_text})"
                ) from None
            if not math.isfinite(v) or not self.low <= v <= self.high:
                raise ConditionError(f"{self.name} = {value} is out of range; valid range is {self.range_text}")
            return v
        text = str(value).strip()
        if self.codes:
            text = dict(self.codes).get(text, text)
        if self.name == "sex" and self.categories == ("F", "M"):
            text = _SEX_ALIASES.get(text.lower(), text)
        if text not in self.categories:
            if self.codes or strict:
                codes = f" (or a code: {', '.join(f'{k} = {v}' for k, v in self.codes)})" if self.codes else ""
                raise ConditionError(f"{self.name} = {value!r} is not valid; expected {self.range_text}{codes}")
            # numeric codes (e.g. 0/1 from a TSV) index the categories
            try:
                idx = float(text)
            except ValueError:
                idx = -1.0
            if idx.is_integer() and 0 <= idx < len(self.categories):
                return self.categories[int(idx)]
            raise ConditionError(f"{self.name} = {value!r} is not valid; expected {self.range_text}")
        return text

    def normalise(self, value: Any) -> np.ndarray:
        """Real value -> (width,) float32 entries in [0, 1]."""
        v = self.validate(value)
        if self.kind == "continuous":
            return np.array([(v - self.low) / (self.high - self.low)], dtype=np.float32)
        idx = self.categories.index(v)
        if self.kind == "binary":
            return np.array([float(idx)], dtype=np.float32)
        out = np.zeros(self.width, dtype=np.float32)
        out[idx] = 1.0
        return out

    def denormalise(self, entries: Sequence[float] | np.ndarray) -> float | str:
        """(width,) entries -> real value (continuous: clipped to the range; categories: nearest)."""
        e = np.asarray(entries, dtype=np.float64).reshape(-1)
        if e.size != self.width:
            raise ConditionError(f"{self.name}: expected {self.width} entries, got {e.size}")
        if self.kind == "continuous":
            return float(self.low + np.clip(e[0], 0.0, 1.0) * (self.high - self.low))
        if self.kind == "binary":
            return self.categories[int(e[0] >= 0.5)]
        return self.categories[int(np.argmax(e))]

    def to_dict(self) -> dict:
        d = {"name": self.name, "label": self.label, "unit": self.unit, "kind": self.kind,
             "default": self.default, "description": self.description}
        if self.kind == "continuous":
            d.update(low=self.low, high=self.high)
        else:
            d["categories"] = list(self.categories)
            if self.codes:  # only where there are any: a bundle without codes keeps its config as it was
                d["codes"] = dict(self.codes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Condition:
        try:
            return cls(name=d["name"], label=d.get("label", d["name"]), unit=d.get("unit", ""), kind=d["kind"],
                       low=d.get("low"), high=d.get("high"), categories=tuple(d.get("categories", ())),
                       default=d.get("default"), description=d.get("description", ""),
                       codes=_codes(d.get("codes"), d["name"]))
        except KeyError as e:
            raise ConditionError(f"condition entry {dict(d)!r} lacks {e.args[0]!r}") from None


def _codes(raw: Any, name: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise ConditionError(f"condition {name!r}: codes must map values to labels, "
                             "e.g. {\"1\": \"M\", \"2\": \"F\"}")
    return tuple((str(k), v) for k, v in raw.items())


@dataclass(frozen=True)
class ConditionSchema:
    """An ordered set of conditions; the order fixes the layout of the condition vector."""

    conditions: tuple[Condition, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", tuple(self.conditions))
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise ConditionError(f"duplicate condition names in schema: {names}")

    def __len__(self) -> int:
        return len(self.conditions)

    def __iter__(self):
        return iter(self.conditions)

    def __getitem__(self, name: str) -> Condition:
        for c in self.conditions:
            if c.name == name:
                return c
        raise ConditionError(f"unknown condition {name!r}; this model knows {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.conditions]

    @property
    def width(self) -> int:
        """Length of the condition vector."""
        return sum(c.width for c in self.conditions)

    def defaults(self) -> dict[str, float | str]:
        return {c.name: c.default for c in self.conditions}

    def complete(self, values: Mapping[str, Any] | None = None) -> dict[str, float | str]:
        """Validate ``values`` and fill the ones not given with the schema's typical value."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ConditionError(f"unknown condition(s) {', '.join(unknown)}; this model knows {', '.join(self.names)}")
        return {c.name: c.validate(values[c.name]) if values.get(c.name) is not None else c.default
                for c in self.conditions}

    def encode(self, values: Mapping[str, Any]) -> np.ndarray:
        """Condition values (real units) -> (width,) float32 vector in [0, 1]; missing ones get defaults."""
        full = self.complete(values)
        return np.concatenate([c.normalise(full[c.name]) for c in self.conditions]).astype(np.float32)

    def decode(self, vector: Sequence[float] | np.ndarray) -> dict[str, float | str]:
        vec = np.asarray(vector, dtype=np.float64).reshape(-1)
        if vec.size != self.width:
            raise ConditionError(f"condition vector has {vec.size} entries; this schema needs {self.width}")
        out, i = {}, 0
        for c in self.conditions:
            out[c.name] = c.denormalise(vec[i:i + c.width])
            i += c.width
        return out

    def with_condition(self, condition: Condition) -> ConditionSchema:
        return replace(self, conditions=self.conditions + (condition,))

    def with_ranges_from(self, table: Mapping[str, Sequence[Any]], margin: float = 0.0) -> ConditionSchema:
        """Tighten continuous ranges to the values seen in ``table`` (column -> values), widened by
        ``margin`` (a fraction of the span). A model should not be asked outside what it was trained on."""
        new = []
        for c in self.conditions:
            if c.kind == "continuous" and c.name in table:
                vals = np.asarray([float(v) for v in table[c.name]], dtype=float)
                span = float(vals.max() - vals.min()) or 1.0
                # whole units outward, so sliders get round ends and every training value is inside
                low = float(math.floor(vals.min() - margin * span))
                high = float(math.ceil(vals.max() + margin * span))
                high = high if high > low else low + 1.0
                default = float(np.clip(round(float(np.median(vals)), 1), low, high))
                c = replace(c, low=low, high=high, default=default)
            new.append(c)
        return replace(self, conditions=tuple(new))

    def with_extra_columns(self, table: Mapping[str, Sequence[Any]], columns: Sequence[str]) -> ConditionSchema:
        """Add conditions for extra ``participants.tsv`` columns: numbers become continuous conditions
        spanning the observed values, anything else categorical (two labels: binary)."""
        schema = self
        for col in columns:
            if col in self.names:
                continue
            if col not in table:
                raise ConditionError(f"participants.tsv has no column {col!r}")
            values = [v for v in table[col] if v not in (None, "", "n/a")]
            try:
                nums = np.asarray([float(v) for v in values])
                cond = Condition(col, col.replace("_", " ").capitalize(), "", "continuous",
                                 low=float(nums.min()), high=float(max(nums.max(), nums.min() + 1e-6)))
            except ValueError:
                cats = tuple(sorted({str(v) for v in values}))
                cond = Condition(col, col.replace("_", " ").capitalize(), "",
                                 "binary" if len(cats) == 2 else "categorical", categories=cats)
            schema = schema.with_condition(cond)
        return schema

    def to_dict(self) -> dict:
        return {"conditions": [c.to_dict() for c in self.conditions], "null_value": NULL_VALUE}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionSchema:
        if "conditions" not in d:
            raise ConditionError("condition schema has no 'conditions' list")
        return cls(tuple(Condition.from_dict(c) for c in d["conditions"]))


DEFAULT_SCHEMA = ConditionSchema((
    Condition("age", "Age", "years", "continuous", low=40.0, high=90.0, default=65.0,
              description="age at scan"),
    Condition("sex", "Sex", "", "binary", categories=("F", "M"), default="F",
              description="sex (F/M)"),
    Condition("ventricular_volume", "Ventricular volume", "mL", "continuous", low=5.0, high=150.0, default=30.0,
              description="lateral + third ventricles"),
    Condition("brain_volume", "Brain volume", "mL", "continuous", low=700.0, high=1700.0, default=1150.0,
              description="grey + white matter"),
))


# ------------------------------------------------------------------------------ schema files

KINDS = ("continuous", "binary", "categorical")
_DECLARED_KEYS = {"name", "kind", "unit", "range", "levels", "codes", "label", "default", "description"}


def schema_from_declaration(declared: Any, source: str = "schema") -> ConditionSchema:
    """A cohort's conditions as its schema file declares them (``source`` names the file in messages)::

        {"conditions": [
          {"name": "age", "kind": "continuous", "unit": "years", "range": [18, 90]},
          {"name": "sex", "kind": "binary", "levels": ["F", "M"], "codes": {"1": "M", "2": "F"}},
          {"name": "diagnosis", "kind": "categorical", "levels": ["CN", "MCI", "AD"]}]}

    Each entry's ``name`` is its ``participants.tsv`` column (a Python identifier); ``unit`` is
    required for a continuous condition (``""`` for a unitless score) and ``range`` is its valid
    [low, high] in that unit; ``levels`` are the labels of a binary (2) or categorical (>= 2) one, and
    ``codes`` optionally maps the values the table holds to them. ``label``, ``default`` and
    ``description`` are optional. Raises ``ConditionError`` naming the file and the entry."""
    if not isinstance(declared, Mapping) or not isinstance(declared.get("conditions"), list):
        raise ConditionError(f"{source}: expected a JSON object with a \"conditions\" list")
    if not declared["conditions"]:
        raise ConditionError(f"{source}: the \"conditions\" list is empty")
    out = []
    for i, entry in enumerate(declared["conditions"], start=1):
        where = f"{source}: condition {i}"
        if not isinstance(entry, Mapping):
            raise ConditionError(f"{where}: expected an object with name, kind, ...")
        name = entry.get("name")
        if isinstance(name, str):
            where += f" ({name!r})"
        unknown = sorted(str(k) for k in set(entry) - _DECLARED_KEYS)
        if unknown:
            raise ConditionError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(sorted(_DECLARED_KEYS))}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ConditionError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        fields: dict[str, Any] = {"low": None, "high": None, "categories": ()}
        if kind == "continuous":
            if "unit" not in entry or not isinstance(entry["unit"], str):
                raise ConditionError(f"{where}: a continuous condition needs its unit (e.g. \"years\", \"mL\"; "
                                     "\"\" for a unitless score)")
            rng = entry.get("range")
            if (not isinstance(rng, list) or len(rng) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
                raise ConditionError(f"{where}: a continuous condition needs its valid range as [low, high] "
                                     f"in {entry['unit'] or 'its unit'}, got {rng!r}")
            fields.update(low=float(rng[0]), high=float(rng[1]))
            for key in ("levels", "codes"):
                if key in entry:
                    raise ConditionError(f"{where}: {key} are for binary or categorical conditions")
        else:
            levels = entry.get("levels")
            if not isinstance(levels, list) or not all(isinstance(v, str) and v.strip() for v in levels):
                raise ConditionError(f"{where}: a {kind} condition needs its levels as a list of labels, "
                                     f"e.g. [\"CN\", \"MCI\", \"AD\"], got {levels!r}")
            if "range" in entry:
                raise ConditionError(f"{where}: a range is for continuous conditions")
            fields["categories"] = tuple(v.strip() for v in levels)
        label = entry.get("label", name.replace("_", " ").capitalize() if isinstance(name, str) else name)
        try:
            out.append(Condition(name=name, label=str(label), unit=str(entry.get("unit", "")), kind=kind,
                                 default=entry.get("default"), description=str(entry.get("description", "")),
                                 codes=_codes(entry.get("codes"), name), **fields))
        except ConditionError as e:
            raise ConditionError(f"{where}: {e}") from None
    try:
        return ConditionSchema(tuple(out))
    except ConditionError as e:
        raise ConditionError(f"{source}: {e}") from None


def read_schema_file(path: str | Path) -> ConditionSchema:
    """The schema a cohort's JSON schema file declares (see :func:`schema_from_declaration`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConditionError(f"{path}: schema file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConditionError(f"{path}: cannot read the schema file ({getattr(e, 'strerror', None) or e})") from None
    try:
        declared = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConditionError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return schema_from_declaration(declared, str(path))
