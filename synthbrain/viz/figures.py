"""Plotly figures of measured volumes (the app draws them; a notebook can too)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MEASURED_COLOUR = "#d62728"
REQUESTED_COLOUR = "#7f7f7f"


@dataclass(frozen=True)
class VolumeSeries:
    """One volume along a series: ``measured`` (None where it could not be measured) and, where
    the model was asked for it, ``requested``; both in ``unit`` (mL)."""

    label: str                                  # e.g. "Brain volume"
    measured: Sequence[float | None]
    requested: Sequence[float | None] | None = None
    unit: str = "mL"


def trajectory_figure(x: Sequence[float], series: Sequence[VolumeSeries], x_title: str = "Age (years)",
                      title: str = ""):
    """One panel per volume (shared x axis): the measured values as a line with markers (gaps where
    not measured) and the requested values as a dashed reference line. Traces are named
    '<label>: measured' and '<label>: requested'."""
    from plotly.subplots import make_subplots

    if not series:
        raise ValueError("trajectory_figure needs at least one series")
    xs = [float(v) for v in x]
    for s in series:
        for name, values in (("measured", s.measured), ("requested", s.requested)):
            if values is not None and len(values) != len(xs):
                raise ValueError(f"{s.label} {name}: {len(values)} values for {len(xs)} x positions")
    fig = make_subplots(rows=len(series), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{s.label} ({s.unit})" for s in series])
    for row, s in enumerate(series, start=1):
        if s.requested is not None:
            fig.add_scatter(x=xs, y=[None if v is None else float(v) for v in s.requested], row=row, col=1,
                            name=f"{s.label}: requested", mode="lines", legendgroup="requested",
                            line=dict(color=REQUESTED_COLOUR, dash="dash"))
        fig.add_scatter(x=xs, y=[None if v is None else float(v) for v in s.measured], row=row, col=1,
                        name=f"{s.label}: measured", mode="lines+markers", legendgroup="measured",
                        line=dict(color=MEASURED_COLOUR), connectgaps=False)
        fig.update_yaxes(title_text=s.unit, row=row, col=1)
    fig.update_xaxes(title_text=x_title, row=len(series), col=1)
    fig.update_layout(height=220 + 180 * len(series), margin=dict(l=10, r=10, t=60 if title else 40, b=10),
                      title=title or None, legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0))
    return fig
