"""The ``synthbrain`` command line. Each command parses its options and calls one library function;
heavy imports (torch, monai, nibabel) happen inside the commands so that ``--help`` is instant.

Errors the library raises on purpose (``SynthBrainError``) print one line and exit with code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from synthbrain.errors import SynthBrainError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="SynthBrain: synthetic 3D brain MRI (VQ-VAE + conditional latent diffusion).")
train_app = typer.Typer(no_args_is_help=True, help="Train a stage (autoencoder, then prior).")
evaluate_app = typer.Typer(no_args_is_help=True, help="Evaluate a bundle's stage; figures go to its metrics.json.")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
tune_app = typer.Typer(no_args_is_help=True, help="Tune a stage's hyperparameters with Optuna (workers share "
                       "one study through --storage).")
app.add_typer(tune_app, name="tune")

@app.callback()
def _options(trust_unverified: bool = typer.Option(
        False, "--trust-unverified", help="load bundles whose config.json has no checksums of their weights")) -> None:
    """SynthBrain: synthetic 3D brain MRI (VQ-VAE + conditional latent diffusion)."""
    import os

    if trust_unverified:
        from synthbrain.bundle import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


GridOpt = typer.Option("demo", "--grid", help="demo (80x112x80 at 2 mm) or full (160x224x160 at 1 mm)")
DEVICE_HELP = "auto (a GPU if there is one, else the CPU), cpu, cuda or cuda:N"


def _pick_device(value: str) -> str:
    """--device resolved once for the library (which takes a device name): auto becomes cpu or cuda:0."""
    from synthbrain.training.distributed import pick_device

    return str(pick_device(value))


# the same default everywhere; training resolves it itself (under torchrun each rank takes its own GPU)
DeviceOpt = typer.Option("auto", "--device", callback=_pick_device, help=DEVICE_HELP)
TrainDeviceOpt = typer.Option("auto", "--device", help=DEVICE_HELP)


def _out_file(value: Path | None, suffixes: tuple[str, ...] = ()) -> Path | None:
    from synthbrain.outputs import check_output_file

    return None if value is None else check_output_file(value, suffixes)


def _out_folder(value: Path | None) -> Path | None:
    from synthbrain.outputs import check_output_folder

    return None if value is None else check_output_folder(value)


def OutOpt(default, help: str, kind: str = "folder", suffixes: tuple[str, ...] = ()):  # noqa: N802 (an option)
    """--out, checked while the command line is parsed and before any other option (eager): a path
    that cannot be written fails at once, not after the work (or after another option imports torch)."""
    check = _out_folder if kind == "folder" else lambda v: _out_file(v, suffixes)
    return typer.Option(default, "--out", help=help, is_eager=True, callback=check)


def _err(message: str) -> None:
    typer.echo(f"synthbrain: error: {message}", err=True)


@contextmanager
def progress(description: str) -> Iterator:
    """A rich progress bar on stderr; yields an ``on_step(i, n, info)`` callback for the library. It is
    transient: drawn live on a terminal and gone afterwards, so an error stays the only line."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None, info="")

        def on_step(i: int, n: int, info: dict | None = None) -> None:
            info = dict(info or {})
            if "warning" in info:  # a note from the library (a skipped checkpoint): kept, not transient
                console.print(f"synthbrain: warning: {info.pop('warning')}", markup=False, highlight=False,
                              soft_wrap=True)
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (info or {}).items())
            bar.update(task, completed=i, total=n, info=text)

        yield on_step


@app.command()
def cohort(
    n: int = typer.Option(20, "--n", min=1, help="number of subjects"),
    grid: str = GridOpt,
    seed: int = typer.Option(0, "--seed", help="same seed, same cohort (byte for byte)"),
    out: Path = OutOpt(..., "folder for the BIDS dataset"),
    only: str | None = typer.Option(None, "--only", help="comma-separated labels: write just these subjects"),
    jobs: int = typer.Option(1, "--jobs", min=1, help="subjects rendered at once (processes; same files)"),
    preprocess: bool = typer.Option(False, "--preprocess", help="also write the preprocessed derivatives on "
                                    "--grid (no alignment check or registration: the phantom is made in MNI space)"),
) -> None:
    """Generate a phantom BIDS cohort from the MNI152 template (known true volumes)."""
    from synthbrain.data.cohort import generate_cohort

    labels = [s.strip() for s in only.split(",") if s.strip()] if only else None
    with progress(f"cohort ({grid})") as on_step:
        path = generate_cohort(out, n=n, grid=grid, seed=seed, on_step=on_step, only=labels, jobs=jobs,
                               preprocess=preprocess)
    typer.echo(f"wrote {len(labels) if labels else n} phantom subjects to {path}")


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
    out: Path | None = OutOpt(None, "write the table as TSV here", kind="file"),
) -> None:
    """Brain and ventricular volume (mL) of T1 volumes, from the image alone."""
    from synthbrain.data.bids import tsv_text
    from synthbrain.data.prepare import require_prepared
    from synthbrain.io import atomic_write, read_volume
    from synthbrain.measure import measure_volume

    files = _expand_inputs(paths)
    rows = []
    with progress("measure") as on_step:
        for i, f in enumerate(files):
            vol = read_volume(f)
            require_prepared(vol)  # a native-space or whole-head scan gives nonsense volumes: refused
            m = measure_volume(vol)
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
    jobs: int = typer.Option(1, "--jobs", min=1, help="subjects preprocessed at once (processes)"),
    schema: Path | None = typer.Option(None, "--schema", help="JSON file declaring the cohort's conditions "
                                       "(as for train); default: age, sex, ventricular_volume, brain_volume"),
) -> None:
    """Preprocess a BIDS dataset onto a grid (cached under derivatives/synthbrain/)."""
    from synthbrain.data.bids import BIDSDataset, schema_for_dataset

    ds = BIDSDataset(data, grid=grid, schema=schema_for_dataset(data, schema_file=schema))
    with progress(f"preprocess ({grid})") as on_step:
        ds.prepare(on_step, jobs=jobs)
    typer.echo(f"preprocessed {len(ds)} subjects into {data / 'derivatives' / 'synthbrain'}")


@app.command()
def prepare(
    inputs: list[Path] = typer.Argument(..., help="BIDS dataset folders (every sub-*) and/or T1w NIfTI files"),
    grid: str = GridOpt,
    out: Path | None = OutOpt(None, "derivative dataset folder (default for one BIDS folder: "
                              "BIDS/derivatives/synthbrain, where training finds it)"),
    jobs: int = typer.Option(1, "--jobs", min=1, help="subjects prepared at once (processes)"),
    brain_extraction: str = typer.Option("auto", "--brain-extraction",
                                         help="auto (deepbet when installed), deepbet, or template (the MNI152 "
                                              "brain mask through the registration)"),
) -> None:
    """Bring native-space, whole-head T1s into MNI152 space on a grid: N4 bias correction, brain extraction,
    rigid + affine registration, resampling, intensity normalisation. Writes BIDS derivatives, the transforms
    (.tfm), a QC picture per subject and prepare-qc.tsv, all marked real. A loose file not named sub-* gets an
    opaque label (a digest; shown here, written nowhere). Complete subjects are skipped (resumable; redone when
    the input, grid, --brain-extraction or code changed); a subject that fails is named and the others go on;
    the exit code is 1 when any failed."""
    from synthbrain.data.prepare import prepare_dataset

    with progress(f"prepare ({grid})") as on_step:
        s = prepare_dataset(inputs, out, grid, jobs=jobs, brain_extraction=brain_extraction, on_step=on_step)
    for label, path in s.labelled.items():  # only here: nothing written names a loose file
        typer.echo(f"{path} -> {label}")
    for label, message in s.failed.items():
        _err(f"{label}: {message}")
    typer.echo(f"prepared {len(s.prepared)} of {s.total} subjects ({len(s.skipped)} already complete, "
               f"{len(s.failed)} failed) into {s.out}; QC table {s.qc_table}")
    if s.failed:
        raise typer.Exit(1)


SchemaOpt = typer.Option(None, "--schema", help="JSON file declaring the cohort's conditions (participants.tsv "
                         "columns: name, kind, unit, range, levels; see the README); default: age, sex, "
                         "ventricular_volume, brain_volume")


def _check_schema(data: Path, condition: list[str], schema: Path | None) -> None:
    """A declared schema checked against participants.tsv before torch is imported: a value that does not
    fit is named (subject, column) at once, not after the models load."""
    if schema is not None:
        from synthbrain.data.bids import schema_for_dataset

        schema_for_dataset(data, condition, schema_file=schema)


@train_app.command("autoencoder")
def train_autoencoder_cmd(
    data: Path = typer.Option(..., "--data", help="BIDS dataset (participants.tsv + sub-*/anat/*_T1w.nii.gz)"),
    out: Path = OutOpt(..., "run folder: checkpoints, metrics.csv, and the bundle in out/bundle"),
    grid: str = GridOpt,
    steps: int | None = typer.Option(None, "--steps", min=1, help="optimiser steps (default from config)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
    config: Path | None = typer.Option(None, "--config", help="JSON with train / model / loss sections"),
    device: str = TrainDeviceOpt,
    condition: list[str] = typer.Option([], "--condition", help="extra participants.tsv column to condition on"),
    schema: Path | None = SchemaOpt,
    init_from: Path | None = typer.Option(None, "--init-from", help="bundle whose autoencoder to start from "
                                          "(fine-tuning: same model configuration)"),
) -> None:
    """Train the VQ-VAE (stage 1); exports a bundle to OUT/bundle. Works under torchrun."""
    _check_schema(data, condition, schema)
    from synthbrain.training.autoencoder import train_autoencoder

    with progress("train autoencoder") as on_step:
        bundle = train_autoencoder(data, out, grid=grid, steps=steps, resume=resume, config_file=config,
                                   device=device, on_step=on_step, extra_conditions=condition,
                                   schema_file=schema, init_from=init_from)
    _rank0_echo(f"bundle written to {bundle}")


def _rank0_echo(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        typer.echo(text)


@train_app.command("prior")
def train_prior_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="bundle with a trained autoencoder"),
    data: Path = typer.Option(..., "--data", help="BIDS dataset with the conditions in participants.tsv"),
    out: Path = OutOpt(..., "run folder; the bundle with the prior goes to out/bundle"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="optimiser steps (default from config)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
    config: Path | None = typer.Option(None, "--config", help="JSON with train / model sections"),
    device: str = TrainDeviceOpt,
    condition: list[str] = typer.Option([], "--condition", help="extra participants.tsv column to condition on"),
    schema: Path | None = SchemaOpt,
    init_from: Path | None = typer.Option(None, "--init-from", help="bundle whose prior to start from "
                                          "(fine-tuning: same model configuration and conditions)"),
) -> None:
    """Train the conditional latent diffusion prior (stage 2) on cached latents. Works under torchrun."""
    _check_schema(data, condition, schema)
    from synthbrain.training.prior import train_prior

    with progress("train prior") as on_step:
        out_bundle = train_prior(bundle, data, out, steps=steps, resume=resume, config_file=config, device=device,
                                 on_step=on_step, extra_conditions=condition, schema_file=schema,
                                 init_from=init_from)
    _rank0_echo(f"bundle written to {out_bundle}")


BundleOpt = typer.Option(None, "--bundle", help="model bundle folder (default: the shipped demo bundle)")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 on GPUs and AMX CPUs, else fp32), fp32, bf16, fp16")


@app.command()
def reconstruct(
    path: Path = typer.Argument(..., help="T1 NIfTI in MNI space (brain-extracted)"),
    bundle: Path | None = BundleOpt,
    out: Path = OutOpt(..., "reconstruction .nii.gz", kind="file", suffixes=(".nii.gz", ".nii")),
    device: str = DeviceOpt,
) -> None:
    """Preprocess, encode, quantise and decode a scan; prints PSNR and SSIM against the preprocessed input.
    The reconstruction is *derived* data (it carries the scanned person's anatomy): its header and
    sidecar say so, and name the scan by a digest of its voxels only, never by file name."""
    from synthbrain.bundle import load_bundle
    from synthbrain.export import DERIVED, kind, sidecar
    from synthbrain.io import read_volume, write_volume
    from synthbrain.reconstruction import reconstruct as run

    vol = read_volume(path)
    b = load_bundle(bundle, device=device, components=("autoencoder",))
    rec = run(b, vol, device=device)
    m = rec.metrics
    write_volume(out, rec.reconstruction, description=kind(DERIVED).description,
                 sidecar=sidecar(DERIVED, {"Kind": "VQ-VAE reconstruction", "Bundle": b.name, "Metrics": m,
                                           "Compression": rec.compression, "Grid": b.grid.to_dict()},
                                 source=rec.original))
    typer.echo(f"PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  MS-SSIM {m['ms_ssim']:.4f}  MAE {m['mae']:.4f}  "
               f"(latent {100 * rec.compression['latent_values_per_voxel']:.2f} % of voxels) -> {out}")


@app.command()
def sample(
    bundle: Path | None = BundleOpt,
    age: float | None = typer.Option(None, "--age", help="years"),
    sex: str | None = typer.Option(None, "--sex", help="F or M"),
    ventricular_volume: float | None = typer.Option(None, "--ventricular-volume", help="mL"),
    brain_volume: float | None = typer.Option(None, "--brain-volume", help="mL"),
    condition: list[str] = typer.Option([], "--condition", help="any condition as NAME=VALUE"),
    n: int = typer.Option(1, "--n", "-n", min=1, help="number of brains (-n under torchrun, which takes --n as "
                          "an abbreviation of its own options)"),
    seed: int = typer.Option(0, "--seed", help="sample i uses seed + i"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="solver steps (default: the bundle's)"),
    guidance: float | None = typer.Option(None, "--guidance", help="classifier-free guidance scale"),
    out: Path = OutOpt(..., "folder for the BIDS-like synthetic dataset"),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    no_measure: bool = typer.Option(False, "--no-measure", help="skip measuring the samples' volumes"),
) -> None:
    """Sample synthetic brains for requested conditions. An unspecified volume takes the value typical of
    the requested age and sex in the model's training population; other unspecified conditions the
    schema's typical value. Under torchrun the ranks share the seeds and write one dataset, the one a
    single process writes."""
    from contextlib import nullcontext

    from synthbrain.bundle import load_bundle
    from synthbrain.sampling import Generator, sample_dataset
    from synthbrain.training.distributed import distributed, pick_device

    values: dict = {"age": age, "sex": sex, "ventricular_volume": ventricular_volume, "brain_volume": brain_volume}
    for item in condition:
        if "=" not in item:
            raise SynthBrainError(f"--condition {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        values[k.strip()] = v.strip()
    values = {k: v for k, v in values.items() if v is not None}
    b = load_bundle(bundle)
    gen = Generator(b, device=pick_device(device), precision=precision)
    full = gen.complete(values)  # validates before any work: out-of-range values stop here
    note = gen.guidance_warning(guidance)
    with distributed(gen.device) as dist:
        if note and dist.is_main:
            typer.echo(f"synthbrain: warning: {note}", err=True)
        with progress(f"sample + write ({gen.device})") if dist.is_main else nullcontext() as on_step:
            s = sample_dataset(gen, out, full, n=n, seed=seed, steps=steps, guidance=guidance,
                               measure=not no_measure, on_step=on_step, dist=dist)
    ranks = f", {s['world_size']} processes" if s["world_size"] > 1 else ""
    _rank0_echo(f"wrote {n} synthetic brains to {out} ({s['seconds_per_brain']:.2f} s per brain on {gen.device}, "
                f"{gen.precision}{ranks})")


@app.command("import-bundle")
def import_bundle_cmd(
    path: Path = typer.Argument(..., help="the downloaded MONAI model-zoo folder "
                                "brain_image_synthesis_latent_diffusion_model (configs/, models/)"),
    out: Path = OutOpt(..., "new folder for the SynthBrain bundle"),
    conditions: Path | None = typer.Option(None, "--conditions", help="JSON mapping of the normalised conditions "
                                           "to real units, e.g. {\"age\": {\"unit\": \"years\", \"low\": 44, "
                                           "\"high\": 82}}; without it they stay normalised [0, 1]"),
) -> None:
    """Import the MONAI model zoo's UK Biobank brain LDM (Pinaya et al. 2022) as a SynthBrain bundle.
    Nothing is downloaded: PATH is the folder you downloaded from the MONAI model zoo."""
    from synthbrain.importers.monai_zoo import import_monai_zoo

    with progress("import-bundle") as on_step:
        dest = import_monai_zoo(path, out, mapping_file=conditions, on_step=on_step)
    typer.echo(f"imported {path} -> {dest} (use it with: synthbrain sample --bundle {dest} ...)")


@evaluate_app.command("autoencoder")
def evaluate_autoencoder_cmd(
    bundle: Path = typer.Option(..., "--bundle"),
    data: Path = typer.Option(..., "--data", help="BIDS dataset; the bundle's held-out subjects are used if present"),
    device: str = DeviceOpt,
) -> None:
    """PSNR and SSIM inside the brain (the headline), over the whole volume, MS-SSIM, MAE, codebook usage
    and the size budget; into the bundle's metrics.json, with a three-plane picture (reconstruction.png)."""
    from synthbrain.evaluation import RECONSTRUCTION_PNG, evaluate_autoencoder

    with progress("evaluate autoencoder") as on_step:
        r = evaluate_autoencoder(bundle, data, device=device, on_step=on_step)
    typer.echo(f"{r['subjects']} subjects ({'held out' if r['held_out'] else 'all'}): in the brain PSNR "
               f"{r['psnr_brain']:.2f} dB, SSIM {r['ssim_brain']:.4f}; whole volume PSNR {r['psnr']:.2f} dB, "
               f"SSIM {r['ssim']:.4f}, MS-SSIM {r['ms_ssim']:.4f}, MAE {r['mae']:.4f}; codebook usage "
               f"{100 * r['codebook_usage']:.1f} %; size {r['code_bits']:,} code bits = "
               f"{100 * r['latent_bits_per_volume_bits']:.2f} % of a 16-bit volume "
               f"({100 * r['latent_values_per_voxel']:.2f} % as many values as voxels); MNI152 template: PSNR "
               f"{r['mni152_template']['psnr_brain']:.2f} dB in the brain, {r['mni152_template']['psnr']:.2f} dB "
               f"whole -> {bundle / 'metrics.json'}, {bundle / RECONSTRUCTION_PNG}")


@evaluate_app.command("prior")
def evaluate_prior_cmd(
    bundle: Path = typer.Option(..., "--bundle"),
    data: Path = typer.Option(..., "--data", help="BIDS dataset whose conditions are requested"),
    device: str = DeviceOpt,
    n_conditions: int = typer.Option(32, "--n-conditions", min=3),
    n_ageing: int = typer.Option(20, "--n-ageing", min=1),
    steps: int | None = typer.Option(None, "--steps", min=1, help="solver steps (default: the bundle's)"),
    guidance: float | None = typer.Option(None, "--guidance", help="guidance scale (default: the bundle's)"),
    precision: str = PrecisionOpt,
    set_defaults: bool = typer.Option(False, "--set-defaults",
                                      help="make --steps / --guidance the bundle's sampling defaults"),
) -> None:
    """Conditioning adherence, ageing, diversity, realism (MMD) and sampling time -> metrics.json."""
    from synthbrain.bundle import set_sampling_defaults
    from synthbrain.evaluation import evaluate_prior

    if set_defaults:  # before the run, so that the metrics describe the bundle as it now samples
        if steps is None and guidance is None:
            raise SynthBrainError("--set-defaults needs --steps and/or --guidance")
        set_sampling_defaults(bundle, steps=steps, guidance=guidance)
    with progress("evaluate prior") as on_step:
        r = evaluate_prior(bundle, data, device=device, n_conditions=n_conditions, n_ageing=n_ageing, steps=steps,
                           guidance=guidance, precision=precision, on_step=on_step)
    v, b = r.get("ventricular_volume_adherence", {}), r.get("brain_volume_adherence", {})
    typer.echo(f"ventricles r {v.get('r', float('nan')):.3f} (MAE {v.get('mae', float('nan')):.1f} mL)  "
               f"brain r {b.get('r', float('nan')):.3f} (MAE {b.get('mae', float('nan')):.1f} mL)  "
               f"ageing {100 * r.get('ageing', {}).get('share_larger_ventricles_when_older', float('nan')):.0f} %  "
               f"{r['seconds_per_sample']:.2f} s/sample -> {bundle / 'metrics.json'}")


AuditShiftOpt = typer.Option(2, "--max-shift", min=0, max=5, help="voxels of shift searched along each axis")


@app.command()
def audit(
    bundle: Path | None = BundleOpt,
    samples: Path = typer.Option(..., "--samples", help="folder of synthetic samples (synthbrain sample / release)"),
    train: Path = typer.Option(..., "--train", help="BIDS dataset the bundle was trained on"),
    holdout: Path | None = typer.Option(None, "--holdout", help="BIDS dataset of real subjects the model never saw "
                                        "(default: the prior's held-out subjects in --train, else a fraction)"),
    holdout_fraction: float = typer.Option(0.1, "--holdout-fraction", help="share of --train held out for "
                                           "calibration when neither --holdout nor recorded held-out subjects exist"),
    out: Path = OutOpt(..., "report folder: report.json, report.html, pairs/*.png"),
    max_shift: int = AuditShiftOpt,
    jobs: int = typer.Option(2, "--jobs", min=1, help="threads for the search"),
    device: str = DeviceOpt,
) -> None:
    """Memorisation audit: each sample's nearest training subject (image and embedding), thresholds
    calibrated on held-out real subjects; flags samples closer to a training subject than any of them."""
    from synthbrain.bundle import load_bundle
    from synthbrain.privacy import AuditSettings, holdout_split, read_samples, write_report
    from synthbrain.privacy import audit as run_audit

    settings = AuditSettings(max_shift=max_shift, jobs=jobs)
    b = load_bundle(bundle, device=device, components=("autoencoder",))
    vols = read_samples(samples, b.grid)
    train_ds, held = holdout_split(b, train, holdout, holdout_fraction)
    with progress("audit") as on_step:
        report = run_audit(vols, train_ds, held, b, settings, device=device, on_step=on_step)
    by_id = dict(vols)
    d = write_report(report, out, by_id.__getitem__, lambda label: train_ds.volume(train_ds.labels.index(label)),
                     b.grid)
    typer.echo(f"{d['flagged']} of {d['samples']} samples flagged ({100 * d['share_flagged']:.1f} %) against "
               f"{d['train_subjects']} training subjects; thresholds r {d['thresholds']['correlation']:.4f}, "
               f"cosine {d['thresholds']['cosine']:.4f} from {len(held)} held-out subjects; "
               f"{1000 * d['seconds']['per_sample_x_training_subject']:.2f} ms per sample x training subject "
               f"-> {out / 'report.html'}")


@app.command()
def release(
    bundle: Path | None = BundleOpt,
    n: int = typer.Option(..., "--n", "-n", min=1, help="number of synthetic subjects (-n under torchrun)"),
    conditions: str = typer.Option("population", "--conditions", help="grid, population or a TSV file of "
                                   "conditions (one row per subject)"),
    train: Path = typer.Option(..., "--train", help="BIDS dataset the bundle was trained on (for the audit)"),
    holdout: Path | None = typer.Option(None, "--holdout", help="held-out real subjects (calibration)"),
    out: Path = OutOpt(..., "new folder for the release (or a release to resume)"),
    seed: int = typer.Option(0, "--seed"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="solver steps (default: the bundle's)"),
    guidance: float | None = typer.Option(None, "--guidance", help="guidance scale (default: the bundle's)"),
    max_shift: int = AuditShiftOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
) -> None:
    """Sample, audit, replace what is flagged, and write a shareable BIDS derivative dataset (resumable).
    Under torchrun the ranks share the subjects and write one release, the one a single process writes."""
    from contextlib import nullcontext

    import torch

    from synthbrain.bundle import load_bundle
    from synthbrain.privacy import AuditSettings
    from synthbrain.privacy import release as run
    from synthbrain.training.distributed import distributed

    b = load_bundle(bundle, device=device)
    with distributed(torch.device(device)) as dist, (progress("release") if dist.is_main else nullcontext()) as on_step:
        s = run(b, n, conditions, train, out, holdout, seed=seed, steps=steps, guidance=guidance,
                settings=AuditSettings(max_shift=max_shift), device=device, precision=precision,
                on_step=on_step, dist=dist)
    _rank0_echo(f"released {s['released']} of {s['requested']} synthetic subjects to {out}; "
                f"{s['replaced_flagged_samples']} flagged samples replaced, {len(s['dropped'])} dropped")


@evaluate_app.command("guidance")
def evaluate_guidance_cmd(
    bundle: Path = typer.Option(..., "--bundle"),
    data: Path = typer.Option(..., "--data", help="BIDS dataset whose conditions are requested"),
    values: str = typer.Option("0,1,1.5,2,3,5,7.5,10", "--values", help="guidance scales, comma-separated"),
    n_conditions: int = typer.Option(16, "--n-conditions", min=3),
    steps: int | None = typer.Option(None, "--steps", min=1, help="solver steps (default: the bundle's)"),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
) -> None:
    """Adherence, diversity and artefacts at each guidance scale; the good range goes to config.json
    (the CLI and the app warn outside it) and the curve to metrics.json."""
    from synthbrain.evaluation import guidance_sweep

    try:
        scales = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise SynthBrainError(f"--values {values!r}: expected numbers separated by commas") from None
    with progress("guidance sweep") as on_step:
        r = guidance_sweep(bundle, data, scales, n_conditions=n_conditions, steps=steps, device=device,
                           precision=precision, on_step=on_step)
    for p in r["curve"]:
        typer.echo(f"guidance {p['guidance']:>4g}: ventricles r {p['ventricular_volume']['r']:.3f} "
                   f"(MAE {p['ventricular_volume']['mae']:.1f} mL), brain r {p['brain_volume']['r']:.3f} "
                   f"(MAE {p['brain_volume']['mae']:.1f} mL), same-condition MS-SSIM "
                   f"{p['ms_ssim_same_condition']:.3f}, "
                   f"bright outside the brain {100 * p['bright_outside_brain']:.3f} %{'  good' if p['good'] else ''}")
    typer.echo(f"good range: {r['good_range']} -> {bundle / 'config.json'}")


@evaluate_app.command("privacy")
def evaluate_privacy_cmd(
    bundle: Path = typer.Option(..., "--bundle"),
    data: Path = typer.Option(..., "--data", help="the BIDS dataset the bundle was trained on"),
    n_samples: int = typer.Option(100, "--n-samples", min=1, help="fresh samples to audit"),
    device: str = DeviceOpt,
) -> None:
    """Share of fresh samples flagged by the memorisation audit, and membership-inference AUC / TPR at
    1 % FPR (prior loss, autoencoder reconstruction error) -> metrics.json."""
    from synthbrain.evaluation import evaluate_privacy

    with progress("evaluate privacy") as on_step:
        r = evaluate_privacy(bundle, data, n_samples=n_samples, device=device, on_step=on_step)
    a, p, e = r["audit"], r["membership_prior"], r["membership_autoencoder"]
    typer.echo(f"{a['flagged']} of {a['samples']} fresh samples flagged ({100 * a['share_flagged']:.1f} %); "
               f"membership AUC prior {p['auc']:.3f} (TPR at 1 % FPR {p['tpr_at_1pct_fpr']:.3f}), autoencoder "
               f"{e['auc']:.3f} ({e['tpr_at_1pct_fpr']:.3f}) -> {bundle / 'metrics.json'}")


TrialsOpt = typer.Option(10, "--trials", min=1, help="trials this worker runs (the study holds every worker's)")
StorageOpt = typer.Option(None, "--storage", help="Optuna RDB URL shared by the workers: sqlite:///PATH.db, "
                          "postgresql://USER@HOST/DB (default: sqlite in --out)")
BudgetOpt = typer.Option(200, "--budget-steps", min=1, help="optimiser steps per trial")
ReportsOpt = typer.Option(4, "--reports", min=1, help="validations per trial (reported to the pruner)")
PrunerOpt = typer.Option("median", "--pruner", help="median (Optuna's MedianPruner) or none")
TuneSeedOpt = typer.Option(None, "--seed", help="sampler seed (reproducible with one worker; unset with several)")


def _tune(stage: str, out: Path, **kwargs) -> None:
    from synthbrain.tuning import BEST_CONFIG, SUMMARY_HTML, TuneSettings, tune

    settings = TuneSettings(stage=stage, trials=kwargs.pop("trials"), budget_steps=kwargs.pop("budget_steps"),
                            reports=kwargs.pop("reports"), pruner=kwargs.pop("pruner"), seed=kwargs.pop("seed"))
    with progress(f"tune {stage}") as on_step:
        d = tune(stage, out=out, settings=settings, on_step=on_step, **kwargs)
    if not d:  # a torchrun worker's other ranks: rank 0 reports
        return
    best = d["best"]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(d["counts"].items()))
    typer.echo(f"study {d['study']}: {counts}; "
               + (f"best trial {best['number']} ({d['metric']} {best['value']:.4g}) -> {out / BEST_CONFIG}, "
                  if best else "no completed trial yet; ")
               + f"summary {out / SUMMARY_HTML}")


@tune_app.command("autoencoder")
def tune_autoencoder_cmd(
    data: Path = typer.Option(..., "--data", help="BIDS dataset"),
    trials: int = TrialsOpt,
    storage: str | None = StorageOpt,
    study: str = typer.Option("synthbrain-autoencoder", "--study", help="study name in the storage"),
    budget_steps: int = BudgetOpt,
    out: Path = OutOpt(Path("tune-autoencoder"), "trial runs, tuning.json/.html, best-config.json"),
    config: Path | None = typer.Option(None, "--config", help="base config (JSON) the search starts from"),
    grid: str = GridOpt,
    reports: int = ReportsOpt,
    pruner: str = PrunerOpt,
    seed: int | None = TuneSeedOpt,
    device: str = TrainDeviceOpt,
    condition: list[str] = typer.Option([], "--condition", help="extra participants.tsv column to condition on"),
    schema: Path | None = SchemaOpt,
) -> None:
    """Search learning rate, width, codebook size and dimension and loss weights of the VQ-VAE: short
    trials, pruned on validation PSNR; the best config goes to OUT/best-config.json."""
    _tune("autoencoder", out, data=data, trials=trials, storage=storage, study_name=study, budget_steps=budget_steps,
          base_config=config, grid=grid, reports=reports, pruner=pruner, seed=seed, device=device,
          extra_conditions=condition, schema_file=schema)


@tune_app.command("prior")
def tune_prior_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="bundle with a trained autoencoder"),
    data: Path = typer.Option(..., "--data", help="BIDS dataset with the conditions in participants.tsv"),
    trials: int = TrialsOpt,
    storage: str | None = StorageOpt,
    study: str = typer.Option("synthbrain-prior", "--study", help="study name in the storage"),
    budget_steps: int = BudgetOpt,
    out: Path = OutOpt(Path("tune-prior"), "trial runs, tuning.json/.html, best-config.json"),
    config: Path | None = typer.Option(None, "--config", help="base config (JSON) the search starts from"),
    reports: int = ReportsOpt,
    pruner: str = PrunerOpt,
    seed: int | None = TuneSeedOpt,
    device: str = TrainDeviceOpt,
    condition: list[str] = typer.Option([], "--condition", help="extra participants.tsv column to condition on"),
    schema: Path | None = SchemaOpt,
) -> None:
    """Search learning rate, UNet width, attention levels, residual blocks and condition dropout of the
    prior: short trials, pruned on the validation loss; the best config goes to OUT/best-config.json."""
    _tune("prior", out, data=data, bundle=bundle, trials=trials, storage=storage, study_name=study,
          budget_steps=budget_steps, base_config=config, reports=reports, pruner=pruner, seed=seed, device=device,
          extra_conditions=condition, schema_file=schema)


@app.command("app")
def app_cmd(
    port: int = typer.Option(8501, "--port", min=1, max=65535),
    models: Path | None = typer.Option(None, "--models", help="folder of bundles to offer besides the demo bundle"),
    address: str = typer.Option("127.0.0.1", "--address", help="interface to listen on (0.0.0.0 for all)"),
) -> None:
    """Start the Streamlit app (from a source checkout). This process becomes the server (exec), so
    a service manager's SIGTERM or Ctrl+C stops the server itself, with nothing left behind."""
    import os
    import sys

    root = Path(__file__).resolve().parent.parent
    script = root / "app.py"
    if not script.is_file():
        raise SynthBrainError(f"{script} not found: the app runs from a source checkout (git clone, pip install -e .)")
    env = dict(os.environ)
    if models is not None:
        if not models.is_dir():
            raise SynthBrainError(f"{models}: --models must be a folder of bundles")
        env["SYNTHBRAIN_MODELS"] = str(models.resolve())
    # app_support.serve is `streamlit run` with the bounded upload manager in place from the start
    cmd = [sys.executable, "-m", "app_support.serve", str(script), "--server.port", str(port),
           "--server.address", address, "--server.headless", "true"]
    typer.echo(f"SynthBrain app on http://{address}:{port}  (Ctrl+C to stop)")
    sys.stdout.flush()  # exec discards whatever is still buffered
    sys.stderr.flush()
    os.chdir(root)
    os.execve(sys.executable, cmd, env)  # a child would be orphaned when this process is stopped


def main() -> int:
    """Entry point: our errors become one line on stderr and exit code 2 (click handles usage errors)."""
    try:
        app(prog_name="synthbrain")
    except SynthBrainError as e:
        _err(" ".join(str(e).split()))
        return 2
    return 0
