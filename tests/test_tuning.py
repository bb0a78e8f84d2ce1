"""``synthbrain tune``: Optuna workers sharing one SQLite study, pruning, and the exported best config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import optuna
import pytest
from conftest import TINY_AUTOENCODER, TINY_PRIOR, subprocess_env, write_json

from synthbrain.errors import ConfigError
from synthbrain.tuning import (
    BEST_CONFIG,
    SUMMARY,
    SUMMARY_HTML,
    TuneSettings,
    find_summary,
    open_study,
    read_summary,
    tune,
)


@pytest.fixture
def prepared_cohort(tiny_cohort, tmp_path):
    """A private copy of the tiny cohort, preprocessed (as `synthbrain preprocess` leaves it)."""
    from synthbrain.data.bids import BIDSDataset

    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    BIDSDataset(data, grid="tiny").prepare()
    return data


def _tune_cmd(data, out, storage, config, *extra):
    return [sys.executable, "-m", "synthbrain", "tune", "autoencoder", "--data", str(data), "--grid", "tiny",
            "--config", str(config), "--trials", "1", "--budget-steps", "2", "--reports", "2", "--storage", storage,
            "--study", "shared", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_and_the_best_config_trains(prepared_cohort, tmp_path, monkeypatch):
    """Two workers started together against one new SQLite file (they also race to create its tables),
    one a plain process and one a 2-process torchrun job (Optuna's TorchDistributedTrial: its trial is
    trained by DDP): both trials land, each with its reports; the exported config trains."""
    config = write_json(tmp_path / "base.json", TINY_AUTOENCODER)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "tune"
    env = subprocess_env()
    cmd = _tune_cmd(prepared_cohort, out, storage, config, "--pruner", "none")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]  # files, not pipes: no limit on what they print
    workers = []
    for c, log in zip((cmd, torchrun), logs):
        with open(log, "w") as f:
            workers.append(subprocess.Popen(c, env=env, stdout=f, stderr=subprocess.STDOUT))
    for w, log in zip(workers, logs):
        assert w.wait(timeout=600) == 0, log.read_text()[-4000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1]  # one trial from each worker, none lost or doubled
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert all(set(t.intermediate_values) == {1, 2} for t in trials)  # a report at each validation
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 2
    runs = [json.loads((out / t.user_attrs["run"] / "run.json").read_text()) for t in trials]
    assert sorted(r["world_size"] for r in runs) == [1, 2]

    d = read_summary(out / SUMMARY)
    assert d["counts"] == {"complete": 2} and {"history", "importances"} <= set(d["figures"])
    best = max(trials, key=lambda t: t.value)
    assert d["best"]["number"] == best.number
    assert "tuning-history" in (out / SUMMARY_HTML).read_text()
    assert not list(out.glob("trials/*/checkpoints"))

    exported = json.loads((out / BEST_CONFIG).read_text())
    assert exported["train"]["steps"] == TINY_AUTOENCODER["train"]["steps"]  # the base's length, not the budget
    assert exported["train"]["lr"] == pytest.approx(best.params["lr"])
    from typer.testing import CliRunner

    from synthbrain.cli import app

    monkeypatch.chdir(out)  # as in the README: a relative --config (here in its --config=PATH form)
    run = CliRunner().invoke(app, ["train", "autoencoder", "--data", str(prepared_cohort), "--grid", "tiny",
                                   f"--config={BEST_CONFIG}", "--steps", "2", "--out", str(tmp_path / "best"),
                                   "--device", "cpu"])
    assert run.exit_code == 0, run.output
    bundle = tmp_path / "best" / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    trained = config["autoencoder"]["config"]
    assert trained["num_embeddings"] == best.params["num_embeddings"]
    assert trained["embedding_dim"] == best.params["embedding_dim"]
    monkeypatch.chdir(tmp_path / "best")  # the app runs in another folder (the repository's)
    assert find_summary(bundle, config) == out.resolve() / SUMMARY


def test_a_pruned_trial_is_recorded_as_pruned(prepared_cohort, tmp_path):
    """A pruner that stops every trial at its first report (PSNR below 1e9 dB): the trial ends PRUNED
    at step 1, its checkpoints are gone, and there is no best config to export."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    settings = TuneSettings(stage="autoencoder", trials=1, budget_steps=4, reports=4)
    d = tune("autoencoder", prepared_cohort, tmp_path / "tune", settings, storage=storage, study_name="p",
             base_config=write_json(tmp_path / "base.json", TINY_AUTOENCODER), grid="tiny", device="cpu",
             pruner=optuna.pruners.ThresholdPruner(lower=1e9))
    (trial,) = optuna.load_study(study_name="p", storage=storage).get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    assert d["counts"] == {"pruned": 1} and d["best"] is None
    assert not (tmp_path / "tune" / BEST_CONFIG).exists()
    assert not (tmp_path / "tune" / "trials" / "trial-0000" / "checkpoints").exists()


def test_prior_trials_share_the_encoded_latents_and_refuse_another_stages_study(tiny_bundle, prepared_cohort,
                                                                              tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    base = write_json(tmp_path / "prior.json", TINY_PRIOR)
    settings = TuneSettings(stage="prior", trials=2, budget_steps=2, reports=1, pruner="none", seed=0)
    d = tune("prior", prepared_cohort, tmp_path / "tune", settings, storage=storage, study_name="s",
             base_config=base, bundle=tiny_bundle, device="cpu")
    assert d["counts"] == {"complete": 2} and d["direction"] == "minimize" and d["metric"] == "loss"
    trials = tmp_path / "tune" / "trials"
    shared = (tmp_path / "tune" / "latents.safetensors").stat()
    assert all((trials / t / "latents.safetensors").stat().st_ino == shared.st_ino
               for t in ("trial-0000", "trial-0001"))  # encoded once, linked into each trial
    cfg = json.loads((tmp_path / "tune" / BEST_CONFIG).read_text())
    assert set(cfg) == {"train", "model", "ema_decay"} and cfg["ema_decay"] == 0.999  # the base's EMA, not the trial's
    # joining the study with other arguments is refused, before any trial, with a message
    ae = TuneSettings(stage="autoencoder", trials=1, budget_steps=2)
    with pytest.raises(ConfigError, match="made with stage 'prior'"):
        tune("autoencoder", prepared_cohort, tmp_path / "tune2", ae, storage=storage, study_name="s", grid="tiny")
    other = json.loads(json.dumps(TINY_PRIOR))
    other["train"]["batch_size"] = 2
    for kwargs, message in ((dict(base_config=write_json(tmp_path / "other.json", other)), "another base config"),
                            (dict(base_config=base, reports=2), "--reports 1, not 2")):
        joining = TuneSettings(stage="prior", trials=1, budget_steps=2, reports=kwargs.pop("reports", 1))
        with pytest.raises(ConfigError, match=f"made with .*{message}"):
            tune("prior", prepared_cohort, tmp_path / "tune3", joining, storage=storage, study_name="s",
                 bundle=tiny_bundle, device="cpu", **kwargs)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 2


def test_a_diverged_trial_fails_and_the_worker_goes_on(prepared_cohort, tmp_path, monkeypatch):
    """Trial 0 trains with a learning rate of 1e12 (NaN at step 2, TrainingDiverged): it is recorded as
    failed and the worker runs trial 1."""
    import synthbrain.tuning as tuning

    real = tuning.suggest

    def suggest(trial, *a, **k):
        cfg = real(trial, *a, **k)
        if trial.number == 0:
            cfg["train"]["lr"] = 1e12
        return cfg

    monkeypatch.setattr(tuning, "suggest", suggest)
    settings = TuneSettings(stage="autoencoder", trials=2, budget_steps=3, reports=1, pruner="none", seed=0)
    d = tune("autoencoder", prepared_cohort, tmp_path / "tune", settings, study_name="d",
             base_config=write_json(tmp_path / "base.json", TINY_AUTOENCODER), grid="tiny", device="cpu")
    assert [t["state"] for t in d["trials"]] == ["fail", "complete"]
    assert d["best"]["number"] == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell, not optimize: no heartbeat thread
def test_the_median_pruner_waits_for_a_trials_second_report(tmp_path):
    """The first report (at step val_every) is never pruned, however bad; the second one is."""
    settings = TuneSettings(stage="autoencoder", budget_steps=4, reports=2, prune_startup_trials=1)
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "m", settings, {"stage": "autoencoder"})
    good = study.ask()
    for step in (2, 4):
        good.report(30.0, step)
    study.tell(good, 30.0)
    bad = study.ask()
    bad.report(1.0, 2)
    assert not bad.should_prune()
    bad.report(1.0, 4)
    assert bad.should_prune()


def test_the_summary_is_found_beside_the_recorded_config_file_whatever_the_working_folder(tmp_path,
                                                                                          monkeypatch):
    tuned = tmp_path / "tune"
    tuned.mkdir()
    (tuned / SUMMARY).write_text("{}")
    bundle = tmp_path / "runs" / "ae" / "bundle"
    recorded = {"autoencoder": {"config_file": str(tuned / BEST_CONFIG)}}
    assert find_summary(bundle, recorded) == tuned / SUMMARY
    # bundles from before config_file: an absolute --config=PATH of a recorded command line
    old = {"autoencoder": {"commands": [f"synthbrain train autoencoder --config={tuned / BEST_CONFIG} --out x"]}}
    assert find_summary(bundle, old) == tuned / SUMMARY
    # a relative one meant a file in a working folder nobody knows now: not guessed from the app's
    monkeypatch.chdir(tmp_path)
    relative = {"autoencoder": {"commands": [f"synthbrain train autoencoder --config tune/{BEST_CONFIG}"]}}
    assert find_summary(bundle, relative) is None


@pytest.mark.parametrize("storage, message", [
    ("bogus://x", "Can't load plugin"),
    ("sqlite:////proc/no-such-folder/study.db", "unable to open database file"),
])
def test_a_bad_storage_is_one_line_and_exit_2(tiny_cohort, tmp_path, monkeypatch, capsys, storage, message):
    from synthbrain.cli import main

    monkeypatch.setattr(sys, "argv", ["synthbrain", "tune", "autoencoder", "--data", str(tiny_cohort.root), "--grid",
                                      "tiny", "--storage", storage, "--out", str(tmp_path / "t"), "--trials", "1"])
    assert main() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synthbrain: error: --storage") and message in err and "\n" not in err
