"""The ``synthbrain`` command line. Each command parses its options and calls one library function;
heavy imports (torch, monai, nibabel) happen inside the commands so that ``--help`` is instant.

Errors the library raises on purpose (``SynthBrainError``) print one line and exit with code 2.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from synthbrain.errors import SynthBrainError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="SynthBrain: synthetic 3D brain MRI (VQ-VAE + conditional latent diffusion).")
train_app = typer.Typer(no_args_is_help=True, help="Train a stage (autoencoder, then prior).")
evaluate_app = typer.Typer(no_args_is_help=True, help="Evaluate a bundle's stage; figures go to its metrics.json.")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")

GridOpt = typer.Option("demo", "--grid", help="demo (80x112x80 at 2 mm) or full (160x224x160 at 1 mm)")


def _err(message: str) -> None:
    typer.echo(f"synthbrain: error: {message}", err=True)


@contextmanager
def progress(description: str) -> Iterator:
    """A rich progress bar; yields an ``on_step(i, n, info)`` callback for the library."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None, info="")

        def on_step(i: int, n: int, info: dict | None = None) -> None:
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (info or {}).items())
            bar.update(task, completed=i, total=n, info=text)

        yield on_step


@app.command()
def cohort(
    n: int = typer.Option(20, "--n", min=1, help="number of subjects"),
    grid: str = GridOpt,
    seed: int = typer.Option(0, "--seed", help="same seed, same cohort (byte for byte)"),
    out: Path = typer.Option(..., "--out", help="folder for the BIDS dataset"),
) -> None:
    """Generate a phantom BIDS cohort from the MNI152 template (known true volumes)."""
    from synthbrain.data.cohort import generate_cohort

    with progress(f"cohort ({grid})") as on_step:
        path = generate_cohort(out, n=n, grid=grid, seed=seed, on_step=on_step)
    typer.echo(f"wrote {n} phantom subjects to {path}")


def _expand_inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.nii*") if "derivatives" not in q.relative_to(p).parts
                           and q.name.endswith((".nii", ".nii.gz")))
            if not found:
                raise SynthBrainError(f"{p}: no .nii or .nii.gz files in this folder")
            files.extend(found)
        else:
            files.append(p)
    return files


@app.command()
def measure(
    paths: list[Path] = typer.Argument(..., help="NIfTI files (brain-extracted T1 in MNI space) or folders"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the table as TSV here"),
) -> None:
    """Brain and ventricular volume (mL) of T1 volumes, from the image alone."""
    from synthbrain.data.bids import tsv_text
    from synthbrain.io import atomic_write, read_volume
    from synthbrain.measure import measure_volume

    files = _expand_inputs(paths)
    rows = []
    with progress("measure") as on_step:
        for i, f in enumerate(files):
            m = measure_volume(read_volume(f))
            rows.append({"file": str(f), "brain_volume": m.brain_volume, "ventricular_volume": m.ventricular_volume,
                         "intracranial_volume": m.intracranial_volume})
            on_step(i + 1, len(files), {"file": f.name})
    columns = ["file", "brain_volume", "ventricular_volume", "intracranial_volume"]
    text = tsv_text(rows, columns)
    if out is not None:
        atomic_write(out, text)
        typer.echo(f"wrote {len(rows)} rows to {out} (volumes in mL)")
    else:
        typer.echo("# volumes in mL")
        typer.echo(text, nl=False)


@app.command()
def preprocess(
    data: Path = typer.Argument(..., help="BIDS dataset folder (participants.tsv + sub-*/anat/*_T1w.nii.gz)"),
    grid: str = GridOpt,
) -> None:
    """Preprocess a BIDS dataset onto a grid (cached under derivatives/synthbrain/)."""
    from synthbrain.data.bids import BIDSDataset

    ds = BIDSDataset(data, grid=grid)
    with progress(f"preprocess ({grid})") as on_step:
        ds.prepare(on_step)
    typer.echo(f"preprocessed {len(ds)} subjects into {data / 'derivatives' / 'synthbrain'}")


@train_app.command("autoencoder")
def train_autoencoder_cmd(
    data: Path = typer.Option(..., "--data", help="BIDS dataset (participants.tsv + sub-*/anat/*_T1w.nii.gz)"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoints, metrics.csv, and the bundle in out/bundle"),
    grid: str = GridOpt,
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="optimiser steps (default from config)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON with train / model / loss sections"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    condition: list[str] = typer.Option([], "--condition", help="extra participants.tsv column to condition on"),
) -> None:
    """Train the VQ-VAE (stage 1); exports a bundle to OUT/bundle. Works under torchrun."""
    from synthbrain.training.autoencoder import train_autoencoder

    with progress("train autoencoder") as on_step:
        bundle = train_autoencoder(data, out, grid=grid, steps=steps, resume=resume, config_file=config,
                                   device=device, on_step=on_step, extra_conditions=condition)
    typer.echo(f"bundle written to {bundle}")


def main() -> int:
    """Entry point: our errors become one line on stderr and exit code 2 (click handles usage errors)."""
    try:
        app(prog_name="synthbrain")
    except SynthBrainError as e:
        _err(" ".join(str(e).split()))
        return 2
    return 0
