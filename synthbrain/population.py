"""Age- and sex-typical volumes of the training population.

Sampling a brain "at age 85" needs ventricular and brain volumes that fit that age, or the model is
asked for an 85-year-old with a 45-year-old's ventricles. This module fits, on the training
participants, a regression of each continuous volume condition on age (linear + quadratic) and sex
(for volumes, on the log scale, since they grow multiplicatively), and predicts typical values.
It is saved in the bundle's config.json and used by trajectories and the ageing evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthbrain.conditions import ConditionSchema

AGE = "age"
SEX = "sex"


@dataclass(frozen=True)
class PopulationModel:
    """``coefficients[name]`` = (intercept, age, age^2, male) on the log scale, with age centred at
    ``age_centre`` years."""

    coefficients: dict[str, tuple[float, ...]] = field(default_factory=dict)
    age_centre: float = 65.0

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, Any]], schema: ConditionSchema) -> PopulationModel:
        names = [c.name for c in schema if c.kind == "continuous" and c.name != AGE]
        if AGE not in schema.names or not names:
            return cls()
        ages = np.array([float(r[AGE]) for r in rows])
        centre = float(np.round(ages.mean(), 1))
        a = ages - centre
        male = np.array([1.0 if SEX in schema.names and schema[SEX].validate(r[SEX]) == schema[SEX].categories[-1]
                         else 0.0 for r in rows]) if SEX in schema.names else np.zeros_like(a)
        design = np.stack([np.ones_like(a), a, a**2, male], axis=1)
        coefs = {}
        for n in names:
            y = np.log(np.maximum(np.array([float(r[n]) for r in rows]), 1e-6))
            coefs[n] = tuple(float(c) for c in np.linalg.lstsq(design, y, rcond=None)[0])
        return cls(coefs, centre)

    def typical(self, schema: ConditionSchema, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` completed with age- and sex-typical volumes (clipped to the schema's ranges);
        values given explicitly are kept."""
        out = dict(values)
        full = schema.complete({k: v for k, v in values.items() if k in (AGE, SEX)})
        age = float(full[AGE]) if AGE in full else self.age_centre
        male = 1.0 if SEX in schema.names and full[SEX] == schema[SEX].categories[-1] else 0.0
        a = age - self.age_centre
        for name, c in self.coefficients.items():
            if out.get(name) is None and name in schema.names:
                cond = schema[name]
                v = float(np.exp(c[0] + c[1] * a + c[2] * a * a + c[3] * male))
                out[name] = float(np.clip(round(v, 1), cond.low, cond.high))
        return out

    def to_dict(self) -> dict:
        return {"age_centre": self.age_centre, "coefficients": {k: list(v) for k, v in self.coefficients.items()},
                "model": "log(value) ~ 1 + (age - centre) + (age - centre)^2 + male"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PopulationModel:
        if not d:
            return cls()
        return cls({k: tuple(v) for k, v in d.get("coefficients", {}).items()}, float(d.get("age_centre", 65.0)))
