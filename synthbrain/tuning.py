"""Hyperparameter search over training configs, with Optuna.

A *study* lives in an RDB storage (``sqlite:///path/study.db`` on one machine, ``postgresql://...`` on a
cluster), so any number of workers (``synthbrain tune`` processes, on any machines that reach the database)
share it: each asks the study for a trial, trains it and reports back, as in Optuna's "easy parallelization".
A trial is a short, budgeted run of the project's own training (``train_autoencoder`` / ``train_prior``)
with the trial's config; after each validation an ``on_validate`` callback reports the validation metric
(autoencoder: PSNR, maximised; prior: denoising loss of the EMA weights, minimised) to Optuna, and the
pruner (``MedianPruner``) may stop it there. Heartbeats mark a trial whose worker died as failed, and it
is queued again once (``RetryHeartbeatStaleTrialCallback``).

Written to the output folder after every trial (atomically, so several workers may share it):
``best-config.json`` (the best trial's full config, with the base config's number of steps; it is what
``synthbrain train ... --config`` takes), ``tuning.json`` (every trial: state, value, parameters, steps;
the figures as plotly JSON) and ``tuning.html`` (the table and the figures: optimisation history,
parameter importances; self-contained, opens offline). Each trial's run folder is ``trials/trial-NNNN``
(checkpoints removed once it ends).

A worker may itself be a ``torchrun`` job (one trial trained by DDP over its processes): Optuna's documented
pattern for distributed trials, ``TorchDistributedTrial`` (optuna-integration). Rank 0 talks to the storage;
every rank runs the objective, and the trial's suggestions, reports and pruning decisions are broadcast.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthbrain.errors import ConfigError, TrainingDiverged

OnStep = Callable[[int, int, dict], None]
STAGES = ("autoencoder", "prior")
# study attributes a joining worker must match (attribute -> what it is called in the message)
JOINED_ON = {"stage": "stage", "data": "data", "grid": "grid", "bundle": "bundle", "budget_steps": "--budget-steps",
             "reports": "--reports", "base_config": "base config (--config)"}
# stage -> (validation metric, direction)
OBJECTIVES = {"autoencoder": ("psnr", "maximize"), "prior": ("loss", "minimize")}
SUMMARY, SUMMARY_HTML, BEST_CONFIG = "tuning.json", "tuning.html", "best-config.json"
WIDTHS = (0.5, 1.0, 2.0)          # multipliers of the base config's channels
CODEBOOK_SIZES = (64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class TuneSettings:
    stage: str
    trials: int = 10              # trials this worker runs (the study holds those of every worker)
    budget_steps: int = 200       # optimiser steps per trial
    reports: int = 4              # validations (reports to the pruner) per trial
    pruner: str = "median"        # median | none
    prune_startup_trials: int = 2  # trials completed before any is pruned
    seed: int | None = None       # sampler seed: reproducible with one worker; leave unset with several

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"tune: stage must be autoencoder or prior, got {self.stage!r}")
        if self.trials < 1 or self.budget_steps < 1 or self.reports < 1 or self.prune_startup_trials < 0:
            raise ConfigError("tune: --trials, --budget-steps and --reports must be >= 1")
        if self.pruner not in ("median", "none"):
            raise ConfigError(f"tune: --pruner must be median or none, got {self.pruner!r}")

    @property
    def val_every(self) -> int:
        return max(1, self.budget_steps // self.reports)


# ------------------------------------------------------------------------------------ search spaces


def _scaled(channels, factor: float, multiple: int) -> list[int]:
    """Channels times ``factor``, rounded to a positive multiple of ``multiple``."""
    return [max(multiple, int(round(c * factor / multiple)) * multiple) for c in channels]


def suggest(trial, stage: str, base: dict, grid_shape: tuple[int, ...] | None = None) -> dict:
    """The trial's config: ``base`` (a full config dict, as ``--config`` takes) with the sampled values.

    Autoencoder: learning rate, width (channels x 0.5 / 1 / 2), codebook size (those within the size
    budget on ``grid_shape``) and dimension, commitment cost and loss weights (spectral; SSIM and the
    adversarial weight when the base config uses them). Prior: learning rate, UNet width, how many of
    the deepest levels have attention, residual blocks per level, condition dropout."""
    cfg = json.loads(json.dumps(base))
    t, m = cfg["train"], cfg["model"]
    t["lr"] = trial.suggest_float("lr", 1e-5, 3e-3, log=True)
    width = trial.suggest_categorical("width", WIDTHS)
    if stage == "autoencoder":
        from synthbrain.models.autoencoder import AutoencoderConfig

        m["channels"] = _scaled(m["channels"], width, 1)
        m["num_res_channels"] = _scaled(m["num_res_channels"], width, 1)
        sizes = list(CODEBOOK_SIZES)
        if grid_shape is not None:
            probe = AutoencoderConfig.from_dict({**m, "channels": tuple(m["channels"]),
                                                 "num_res_channels": tuple(m["num_res_channels"])})
            sizes = [k for k in sizes if _within_budget(probe, k, grid_shape)] or [m["num_embeddings"]]
        m["num_embeddings"] = trial.suggest_categorical("num_embeddings", sizes)
        m["embedding_dim"] = trial.suggest_categorical("embedding_dim", (2, 3, 4, 8))
        m["commitment_cost"] = trial.suggest_float("commitment_cost", 0.05, 1.0, log=True)
        loss = cfg["loss"]
        loss["spectral"] = trial.suggest_float("spectral", 0.01, 1.0, log=True)
        if loss.get("ssim", 0) > 0:
            loss["ssim"] = trial.suggest_float("ssim", 0.05, 1.0, log=True)
        if loss.get("adversarial", 0) > 0:
            loss["adversarial"] = trial.suggest_float("adversarial", 0.005, 0.2, log=True)
    else:
        multiple = math.lcm(int(m["norm_num_groups"]), int(m["num_head_channels"]))
        m["channels"] = _scaled(m["channels"], width, multiple)
        levels = len(m["channels"])
        n_att = trial.suggest_int("attention_levels", 1, min(2, levels))
        m["attention_levels"] = [i >= levels - n_att for i in range(levels)]
        m["num_res_blocks"] = trial.suggest_int("num_res_blocks", 1, 2)
        m["condition_dropout"] = trial.suggest_float("condition_dropout", 0.05, 0.3)
    return cfg


def _within_budget(cfg, num_embeddings: int, shape: tuple[int, ...]) -> bool:
    from dataclasses import replace

    try:
        replace(cfg, num_embeddings=num_embeddings).check_size_budget(shape)
    except ConfigError:
        return False
    return True


def budgeted(cfg: dict, settings: TuneSettings) -> dict:
    """A trial's training config: ``settings.budget_steps`` steps, ``settings.reports`` validations,
    one checkpoint at the end. The prior's EMA is shortened to fit the budget (its validation reads the
    EMA weights, which a 0.999 average over a few hundred steps would leave near initialisation); the
    exported best config keeps the base's."""
    out = json.loads(json.dumps(cfg))
    t = out["train"]
    k = settings.budget_steps
    t.update(steps=k, val_every=settings.val_every, ckpt_every=k, keep_checkpoints=1,
             warmup_steps=min(int(t.get("warmup_steps", 0)), k // 10), log_every=min(int(t.get("log_every", 10)),
                                                                                   settings.val_every))
    if "ema_decay" in out:
        out["ema_decay"] = max(0.0, min(float(out["ema_decay"]), 1.0 - 5.0 / k))
    return out


# ---------------------------------------------------------------------------------------- the study


def storage_for(url: str):
    """An Optuna ``RDBStorage`` for ``url`` with heartbeats (a trial whose worker died is failed after two
    minutes and queued again once) and, for SQLite, a long busy timeout (workers write to one file)."""
    import optuna
    from sqlalchemy.exc import ArgumentError, OperationalError

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(5):  # two workers creating the tables of a new database at once: one loses the race
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            except OperationalError as e:
                if attempt == 4 or "already exists" not in str(e) and "locked" not in str(e):
                    raise ConfigError(f"--storage {safe_url(url)}: {' '.join(str(e.orig).split())}") from None
            except (ValueError, ImportError, ArgumentError) as e:  # a malformed URL, an unknown or missing driver
                raise ConfigError(f"--storage {safe_url(url)}: {' '.join(str(e).split())}") from None


def safe_url(url: str) -> str:
    """A storage URL without its password (for messages and summaries)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable URL)"


def open_study(url: str, name: str, settings: TuneSettings, meta: dict, pruner=None):
    """Create the study or join it (``load_if_exists``); refuses a study made for another stage or data."""
    import optuna

    metric, direction = OBJECTIVES[settings.stage]
    if pruner is None:  # never at a trial's first report (step val_every): one validation is too early to judge
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup_trials,
                                              n_warmup_steps=settings.val_every + 1)
                  if settings.pruner == "median" else optuna.pruners.NopPruner())
    sampler = optuna.samplers.TPESampler(seed=settings.seed)
    study = optuna.create_study(storage=storage_for(url), study_name=name, direction=direction,
                                load_if_exists=True, pruner=pruner, sampler=sampler)
    old = study.user_attrs
    meta = json.loads(json.dumps(meta))  # as the storage holds it (tuples become lists)
    if not old:
        for k, v in meta.items():
            study.set_user_attr(k, v)
    else:
        for k, label in JOINED_ON.items():
            if k not in old and k == "reports":  # a study made before reports were recorded
                continue
            if old.get(k) != meta.get(k):
                was = f"another {label}" if k == "base_config" else f"{label} {old.get(k)!r}, not {meta.get(k)!r}"
                raise ConfigError(f"study {name!r} in {safe_url(url)} was made with {was}: join it with the same "
                                  "arguments or choose another --study")
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} {direction}s nothing: it was created to {study.direction.name.lower()}")
    return study


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial to stderr; the library reports through ``on_step`` instead."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def tune(stage: str, data: str | Path, out: str | Path, settings: TuneSettings, storage: str | None = None,
         study_name: str | None = None, base_config: Path | None = None, grid: str = "demo",
         bundle: str | Path | None = None, device: str | None = None, extra_conditions=(),
         on_step: OnStep | None = None, pruner=None, schema_file: str | Path | None = None) -> dict:
    """Run ``settings.trials`` trials of the study ``study_name`` in ``storage`` (default: a SQLite file
    ``out/study.db``), then write the summary; returns it (see the module docstring)."""
    import optuna

    from synthbrain.data.bids import BIDSDataset, schema_for_dataset
    from synthbrain.training.autoencoder import AutoencoderTraining
    from synthbrain.training.config import load_config_file
    from synthbrain.training.distributed import DistContext
    from synthbrain.training.prior import PriorTraining

    dist = DistContext.from_env()
    if stage == "prior" and bundle is None:
        raise ConfigError("tune prior needs --bundle (a bundle with a trained autoencoder)")
    out = Path(out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name or f"synthbrain-{stage}"
    cls = AutoencoderTraining if stage == "autoencoder" else PriorTraining
    base = cls.from_dict(load_config_file(base_config)).to_dict()
    grid_shape = None
    if stage == "autoencoder":
        from synthbrain.grids import get_grid

        grid_shape = get_grid(grid).shape
    else:
        from synthbrain.bundle import read_config

        grid = read_config(Path(bundle))["grid"]["name"]
    schema = schema_for_dataset(data, extra_conditions, schema_file=schema_file)
    dataset = BIDSDataset(data, grid=grid, schema=schema)  # a bad dataset fails here, once, not in every trial
    if dist.is_main:
        dataset.prepare()
    meta = {"stage": stage, "data": str(Path(data).resolve()), "grid": grid, "budget_steps": settings.budget_steps,
            "bundle": str(Path(bundle).resolve()) if bundle else None, "base_config": base,
            "reports": settings.reports, "metric": OBJECTIVES[stage][0]}
    metric = OBJECTIVES[stage][0]

    def objective(trial) -> float:
        if dist.enabled:  # every rank runs this; rank 0 holds the real trial (None elsewhere)
            from optuna_integration.pytorch_distributed import TorchDistributedTrial

            trial = TorchDistributedTrial(trial)
        cfg = suggest(trial, stage, base, grid_shape)
        run_dir = out / "trials" / f"trial-{trial.number:04d}"
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(budgeted(cfg, settings), indent=1))
        dist.barrier()
        trial.set_user_attr("config", cfg)
        trial.set_user_attr("run", str(run_dir.relative_to(out)))
        values: dict[int, float] = {}

        def on_validate(step: int, metrics: dict) -> None:
            value = float(metrics[metric])
            values[step] = value
            trial.report(value, step)
            trial.set_user_attr("steps", step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4g} at step {step}")

        def on_train_step(i: int, n: int, info: dict) -> None:
            if on_step is not None and "warning" not in info:
                on_step(done, settings.trials, {"trial": trial.number, "step": f"{i}/{n}"})

        try:
            _train(stage, data, run_dir, grid, bundle, run_dir / "config.json", device, extra_conditions,
                   on_train_step, on_validate, schema_file)
        finally:
            if dist.is_main:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if not values:
            raise ConfigError(f"tune: trial {trial.number} had no validation; the config needs held-out "
                              "subjects (train.val_fraction > 0)")
        return values[max(values)]

    done = 0

    def after_trial(study, trial) -> None:
        nonlocal done
        done += 1
        write_summary(study, out, storage)
        if on_step is not None:
            best = _best(study)
            on_step(done, settings.trials, {"trial": trial.number, "state": trial.state.name.lower(),
                                            **({"best": best.value} if best else {})})

    with _quiet_optuna(), _process_group(dist, device):
        if not dist.is_main:  # the other ranks of a torchrun worker follow rank 0's trials
            dist.barrier()
            for _ in range(settings.trials):
                with contextlib.suppress(optuna.TrialPruned, TrainingDiverged):
                    objective(None)
            return {}
        study = open_study(storage, study_name, settings, meta, pruner)
        dist.barrier()
        study.optimize(objective, n_trials=settings.trials, callbacks=[after_trial], catch=(TrainingDiverged,))
        return write_summary(study, out, storage)


@contextlib.contextmanager
def _process_group(dist, device: str | None) -> Iterator[None]:
    """Under torchrun: one process group for the whole worker (every trial's training reuses it)."""
    if not dist.enabled:
        yield
        return
    import torch

    from synthbrain.training.distributed import pick_device

    dev = pick_device(device, dist)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _train(stage, data, run_dir, grid, bundle, config_file, device, extra_conditions, on_step, on_validate,
           schema_file=None):
    if stage == "autoencoder":
        from synthbrain.training.autoencoder import train_autoencoder

        return train_autoencoder(data, run_dir, grid=grid, config_file=config_file, device=device, on_step=on_step,
                                 extra_conditions=extra_conditions, on_validate=on_validate,
                                 schema_file=schema_file)
    from synthbrain.training.prior import train_prior

    shared = run_dir.parent.parent / "latents.safetensors"  # encode the dataset once for every trial
    own = run_dir / "latents.safetensors"
    if shared.is_file() and not own.exists():
        with contextlib.suppress(OSError):
            own.hardlink_to(shared)
    result = train_prior(bundle, data, run_dir, config_file=config_file, device=device, on_step=on_step,
                         extra_conditions=extra_conditions, on_validate=on_validate, schema_file=schema_file)
    if own.is_file() and not shared.exists():
        with contextlib.suppress(OSError):
            shared.hardlink_to(own)
    return result


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


# ------------------------------------------------------------------------------------------ summary


def summary(study, storage: str) -> dict:
    """The study as JSON: every trial, the best one, the best config and the figures (plotly JSON)."""
    import optuna

    attrs = study.user_attrs
    best = _best(study)
    trials = []
    for t in study.get_trials(deepcopy=False):
        end = t.datetime_complete
        trials.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                       "steps": t.user_attrs.get("steps"),
                       "seconds": (end - t.datetime_start).total_seconds() if end and t.datetime_start else None,
                       "run": t.user_attrs.get("run")})
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    best_config = None
    if best is not None:
        best_config = json.loads(json.dumps(best.user_attrs["config"]))
        best_config["train"]["steps"] = attrs["base_config"]["train"]["steps"]
    figures = {}
    completed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if completed:
        figures["history"] = optuna.visualization.plot_optimization_history(study).to_plotly_json()
    if len(completed) >= 2:
        with contextlib.suppress(ValueError, RuntimeError, ZeroDivisionError):  # e.g. every value the same
            figures["importances"] = optuna.visualization.plot_param_importances(study).to_plotly_json()
    return {"study": study.study_name, "storage": safe_url(storage), "stage": attrs.get("stage"),
            "metric": attrs.get("metric"), "direction": study.direction.name.lower(), "data": attrs.get("data"),
            "grid": attrs.get("grid"), "bundle": attrs.get("bundle"), "budget_steps": attrs.get("budget_steps"),
            "counts": counts, "trials": trials,
            "best": ({"number": best.number, "value": best.value, "params": best.params} if best else None),
            "best_config": best_config, "figures": figures}


def write_summary(study, out: Path, storage: str) -> dict:
    """``tuning.json``, ``tuning.html`` and ``best-config.json`` in ``out`` (atomic writes)."""
    from plotly.utils import PlotlyJSONEncoder

    from synthbrain.io import atomic_write

    d = summary(study, storage)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SUMMARY, json.dumps(d, indent=1, cls=PlotlyJSONEncoder) + "\n")
    atomic_write(out / SUMMARY_HTML, summary_html(d))
    if d["best_config"] is not None:
        atomic_write(out / BEST_CONFIG, json.dumps(d["best_config"], indent=1) + "\n")
    return d


def figure(d: dict, name: str):
    """A figure of a summary (``history`` or ``importances``) as a plotly Figure, or None."""
    import plotly.graph_objects as go

    spec = d.get("figures", {}).get(name)
    return go.Figure(spec) if spec else None


def trials_table(d: dict) -> list[dict]:
    """One row per trial: number, state, value, steps, seconds and each parameter."""
    return [{"trial": t["number"], "state": t["state"], d.get("metric") or "value": t["value"],
             "steps": t["steps"], "seconds": None if t["seconds"] is None else round(t["seconds"], 1), **t["params"]}
            for t in d["trials"]]


def summary_html(d: dict) -> str:
    """One self-contained page (plotly inlined): the trials table and the figures."""
    import html

    import plotly.io as pio

    figs = "".join(pio.to_html(f, full_html=False, div_id=f"tuning-{name}",
                               include_plotlyjs="inline" if i == 0 else False)
                   for i, (name, f) in enumerate((n, figure(d, n)) for n in ("history", "importances")) if f)
    rows = trials_table(d)
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape("" if v is None else str(v))

    table = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
             + "</table>")
    best = d["best"]
    head = (f"best: trial {best['number']}, {d['metric']} {best['value']:.4g}" if best else "no completed trial yet")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(d["counts"].items()))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>SynthBrain tuning: {html.escape(d['study'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 8px}}</style></head><body>
<h1>Tuning: {html.escape(d['study'])} ({html.escape(str(d['stage']))})</h1>
<p>{html.escape(d['direction'])} validation {html.escape(str(d['metric']))} after {d['budget_steps']} steps per trial;
trials: {html.escape(counts)}; {html.escape(head)}. Storage {html.escape(d['storage'])}. The best config is in
<code>{BEST_CONFIG}</code> (for <code>synthbrain train {html.escape(str(d['stage']))} --config</code>).</p>{figs}
<h2>Trials</h2>{table}
</body></html>
"""


def find_summary(bundle_path: Path | None, config: dict | None = None) -> Path | None:
    """The tuning summary that belongs to a bundle, if any: ``tuning.json`` in the bundle, beside it (the
    run folder), or beside the ``--config`` file that a stage of the bundle was trained with (its absolute
    path, which training records as ``config_file``; for bundles from before that, an absolute ``--config``
    of the recorded command lines: a relative one named a file in a working folder that is not known)."""
    if bundle_path is None:
        return None
    bundle_path = Path(bundle_path)
    places = [bundle_path / SUMMARY, bundle_path.parent / SUMMARY]
    for stage in STAGES:
        info = (config or {}).get(stage) or {}
        if info.get("config_file"):
            places.append(Path(info["config_file"]).parent / SUMMARY)
        for command in info.get("commands", []) or []:
            try:
                parts = shlex.split(command)  # the command line as training recorded it (shlex-quoted)
            except ValueError:
                continue
            for flag, value in zip(parts, [*parts[1:], ""]):
                if flag.startswith("--config="):
                    value = flag.split("=", 1)[1]
                elif flag != "--config":
                    continue
                path = Path(value).expanduser()
                if path.is_absolute():
                    places.append(path.parent / SUMMARY)
    return next((p for p in places if p.is_file()), None)


def read_summary(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable tuning summary ({e})") from None
    if not isinstance(d, dict) or "trials" not in d:
        raise ConfigError(f"{path}: not a tuning summary")
    return d
