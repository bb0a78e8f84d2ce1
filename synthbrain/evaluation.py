"""``synthbrain evaluate``: measured quality of a bundle's stages, written to its metrics.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from synthbrain.errors import InvalidVolumeError
from synthbrain.io import Volume

OnStep = Callable[[int, int, dict], None]


def _eval_subjects(bundle, dataset, stage: str) -> tuple[list[int], bool]:
    """Indices to evaluate on: the stage's held-out subjects when the data holds them, else all."""
    held = set(bundle.config.get(stage, {}).get("val_subjects", []))
    idx = [i for i, s in enumerate(dataset.subjects) if s.label in held]
    if idx and bundle.trained_on(stage, dataset):
        return idx, True
    return list(range(len(dataset))), False


RECONSTRUCTION_PNG = "reconstruction.png"
SAMPLES_PNG = "samples.png"


def evaluate_autoencoder(bundle_path: str | Path, data: str | Path, device: str = "cpu",
                         on_step: OnStep | None = None, max_subjects: int | None = None) -> dict:
    """Brain-masked PSNR (dB) and SSIM (the headline), whole-volume PSNR, SSIM, MS-SSIM and MAE on
    (held-out) subjects, codebook usage (a VQ-VAE's) and the size budget; into metrics.json. Also writes
    ``reconstruction.png`` into the bundle: original | reconstruction | difference of the median subject.

    The data is read by the bundle's intensity convention: for a whole-head bundle (a KL autoencoder
    imported from the MONAI model zoo) whole-head T1s aligned to MNI152, min-max normalised, and the
    masked figures are over the head (its non-zero voxels), skull included. A KL autoencoder decodes in
    slabs on a CPU at 1 mm (as :func:`synthbrain.reconstruction.reconstruct` does)."""
    from synthbrain.bundle import load_bundle, update_metrics
    from synthbrain.conditions import ConditionSchema
    from synthbrain.data.bids import BIDSDataset
    from synthbrain.metrics import reconstruction_metrics
    from synthbrain.models.autoencoder_kl import KIND as KL
    from synthbrain.sampling import resolve_decode

    bundle = load_bundle(bundle_path, device=device, components=("autoencoder",))
    ds = BIDSDataset(data, grid=bundle.grid, schema=ConditionSchema(()), intensity=bundle.config.get("intensity"))
    idx, held_out = _eval_subjects(bundle, ds, "autoencoder")
    idx = idx[:max_subjects] if max_subjects else idx
    ae = bundle.autoencoder
    kl = getattr(ae.config, "kind", None) == KL
    sliced = resolve_decode(ae, torch.device(device), bundle.grid, "auto")
    rows, codes, times, recons = [], [], [], []
    with torch.inference_mode():
        for k, i in enumerate(idx):
            x = torch.from_numpy(ds.volume(i)[None, None].copy()).to(device)
            t0 = time.perf_counter()
            z = ae.encode_quantized(x)
            rec = (ae.decode_sliced(z) if sliced else ae.decode(z)).float().clamp(0, 1)
            times.append(time.perf_counter() - t0)
            rows.append(reconstruction_metrics(rec, x))
            recons.append(rec[0, 0].cpu().numpy())
            if not kl:  # a KL latent is continuous: no codes to count
                codes.append(ae.code_indices(x).reshape(-1))
            if on_step:
                on_step(k + 1, len(idx), {"psnr_brain": rows[-1]["psnr_brain"]})
    result = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    headline = ("psnr_brain", "ssim_brain", "psnr", "ssim")
    result.update({f"{k}_sd": float(np.std([r[k] for r in rows])) for k in headline})
    if codes:
        result.update(ae.codebook_stats(torch.cat(codes)))
    comp = ae.config.compression(bundle.grid.shape)
    if "code_bits" in comp:  # a VQ-VAE's codes (a KL latent is continuous: values per voxel only)
        result.update(latent_bits_per_volume_bits=comp["latent_bits_per_volume_bits"], code_bits=comp["code_bits"],
                      volume_bits_16bit=comp["volume_bits"])
    result.update(latent_values_per_voxel=comp["latent_values_per_voxel"], latent_shape=comp["latent_shape"],
                  subjects=len(idx), held_out=held_out, data=ds.fingerprint()["name"],
                  seconds_per_volume_encode_decode=float(np.median(times)), device=device,
                  units={"psnr": "dB", "psnr_brain": "dB", "mae": "intensity (0..1)", "code_bits": "bits",
                         "volume_bits_16bit": "bits"},
                  per_subject={ds.subjects[i].label: {k: round(r[k], 4) for k in headline}
                               for i, r in zip(idx, rows)})
    result["mni152_template"] = _template_fidelity(bundle, device)
    median = int(np.argsort([r["psnr_brain"] for r in rows])[len(rows) // 2])
    result["picture"] = {"file": RECONSTRUCTION_PNG, "subject": ds.subjects[idx[median]].label}
    _write_reconstruction_png(bundle, ds.volume(idx[median]), recons[median], ds.subjects[idx[median]].label,
                              rows[median], phantom=bool(ds.fingerprint().get("phantom")))
    update_metrics(bundle.path, "autoencoder", result)
    _refresh_card(bundle.path)
    return result


def _template_fidelity(bundle, device: str) -> dict:
    """The real brain on this machine: nilearn's 1 mm MNI152 2009 T1, preprocessed onto the grid as
    ``synthbrain reconstruct`` does, then reconstructed; PSNR in dB."""
    from nilearn import datasets

    from synthbrain.io import read_volume
    from synthbrain.reconstruction import reconstruct

    with torch.inference_mode():
        m = reconstruct(bundle, read_volume(datasets.MNI152_FILE_PATH), device=device).metrics
    return {"source": "nilearn MNI152 2009a symmetric T1, 1 mm, resampled to the grid",
            **{k: m[k] for k in ("psnr_brain", "ssim_brain", "psnr", "ssim")}}


def _write_reconstruction_png(bundle, original: np.ndarray, recon: np.ndarray, label: str, m: dict,
                              phantom: bool) -> None:
    from synthbrain.io import atomic_write
    from synthbrain.viz.slices import rows_png

    aff = bundle.grid.affine
    what = "phantom subject (not a person)" if phantom else "real scan"
    png = rows_png([(f"original: {what}", Volume(original, aff)), ("reconstruction (derived)", Volume(recon, aff))],
                   difference=Volume(recon - original, aff), difference_label="reconstruction - original",
                   title=f"{bundle.config.get('name', 'bundle')}: held-out {label}, PSNR in brain "
                         f"{m['psnr_brain']:.1f} dB, SSIM in brain {m['ssim_brain']:.3f}",
                   footer="the subject with the median brain PSNR of the evaluated set")
    atomic_write(Path(bundle.path) / RECONSTRUCTION_PNG, png)


def _write_samples_png(bundle, volumes: list, conditions: list[dict]) -> None:
    """Axial and coronal planes of synthetic samples, each captioned with its requested conditions."""
    from synthbrain.io import atomic_write
    from synthbrain.viz.series import grid_png

    def caption(c: dict) -> str:
        parts = [f"{c['age']:.0f} y" if "age" in c else "", str(c.get("sex", "")),
                 f"V {c['ventricular_volume']:.0f}" if "ventricular_volume" in c else "",
                 f"B {c['brain_volume']:.0f}" if "brain_volume" in c else ""]
        return " ".join(p for p in parts if p)

    title = (f"{bundle.name}: SYNTHETIC samples (not a person), one seed each; captions: requested age, sex, "
             "ventricular (V) and brain (B) volume in mL")
    atomic_write(Path(bundle.path) / SAMPLES_PNG, grid_png(volumes, labels=[caption(c) for c in conditions],
                                                           px_per_mm=1.25, title=title))


def _refresh_card(path: Path) -> None:
    from synthbrain.model_card import write_model_card

    write_model_card(path)


def _measure_or_none(volume):
    """A sample's measurement, or None when the image has no measurable brain (an untrained model's
    output): it then counts against the model rather than stopping the evaluation."""
    from synthbrain.measure import measure_volume

    try:
        return measure_volume(volume)
    except InvalidVolumeError:
        return None


def evaluate_prior(bundle_path: str | Path, data: str | Path, device: str = "cpu", n_conditions: int = 32,
                   n_ageing: int = 20, n_diversity: int = 8, steps: int | None = None,
                   guidance: float | None = None, precision: str = "auto", on_step: OnStep | None = None) -> dict:
    """Conditioning adherence, ageing, diversity, realism and sampling time; into metrics.json."""
    from monai.metrics import MMDMetric

    from synthbrain.bundle import load_bundle, update_metrics
    from synthbrain.data.bids import BIDSDataset
    from synthbrain.metrics import agreement, ms_ssim_pairs
    from synthbrain.sampling import SAMPLER, Generator

    bundle = load_bundle(bundle_path, device="cpu")
    gen = Generator(bundle, device=device, precision=precision)
    ds = BIDSDataset(data, grid=bundle.grid, schema=bundle.schema)
    idx, held_out = _eval_subjects(bundle, ds, "prior")
    rng = np.random.default_rng(0)
    if len(idx) < n_conditions:
        extra = [i for i in range(len(ds)) if i not in idx]
        idx = idx + list(rng.permutation(extra)[: n_conditions - len(idx)])
    idx = idx[:n_conditions]
    total = len(idx) + 2 * n_ageing + n_diversity
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if on_step:
            on_step(done, total, {"stage": what})

    # 1. conditioning adherence over real subjects' condition combinations
    requested = [ds.subjects[i].values for i in idx]
    measured, synth, times = [], [], []
    for k, cond in enumerate(requested):
        s = gen.sample(cond, n=1, seed=1000 + k, steps=steps, guidance=guidance)[0]
        synth.append(s.volume.data)
        times.append(s.seconds)  # sampling only, not measuring
        measured.append(_measure_or_none(s.volume))
        tick("adherence")
    seconds = float(np.median(times))
    ok = [k for k, m in enumerate(measured) if m is not None]
    result: dict = {"subjects": len(idx), "held_out_conditions": held_out, "unmeasurable_samples": len(idx) - len(ok),
                    "steps": s.steps, "guidance": s.guidance, "sampler": SAMPLER, "precision": gen.precision}
    for name in ("ventricular_volume", "brain_volume"):
        if name in bundle.schema.names:
            result[f"{name}_adherence"] = agreement([requested[k][name] for k in ok],
                                                    [getattr(measured[k], name) for k in ok])

    # 2. ageing: same seed at 45 and 85, volumes typical for each age and sex
    pop = bundle.population
    age = bundle.schema["age"] if "age" in bundle.schema.names else None
    if age is not None:
        young, old = max(45.0, age.low), min(85.0, age.high)
        wins, diffs = 0, []
        for s in range(n_ageing):
            sex = {"sex": ("F", "M")[s % 2]} if "sex" in bundle.schema.names else {}
            vols = []
            for a in (young, old):
                cond = pop.typical(bundle.schema, {"age": a, **sex})
                m = _measure_or_none(gen.sample(cond, n=1, seed=s, steps=steps, guidance=guidance)[0].volume)
                vols.append(None if m is None else m.ventricular_volume)
                tick("ageing")
            if None not in vols:
                wins += vols[1] > vols[0]
                diffs.append(vols[1] - vols[0])
        result["ageing"] = {"ages": [young, old], "seeds": n_ageing,
                            "share_larger_ventricles_when_older": wins / n_ageing,
                            "mean_ventricle_increase_mL": float(np.mean(diffs)) if diffs else float("nan"),
                            "unmeasurable_pairs": n_ageing - len(diffs)}

    # 3. diversity: MS-SSIM among samples of one condition vs among real subjects
    samples = gen.sample(bundle.schema.defaults(), n=n_diversity, seed=5000, steps=steps, guidance=guidance)
    for _ in samples:
        tick("diversity")
    synth_one = torch.from_numpy(np.stack([s.volume.data for s in samples]))[:, None]
    real_idx = rng.permutation(len(ds))[:n_diversity]
    real = torch.from_numpy(np.stack([ds.volume(int(i)) for i in real_idx]))[:, None]
    result["diversity"] = {"ms_ssim_synthetic_same_condition": ms_ssim_pairs(synth_one),
                           "ms_ssim_real_subjects": ms_ssim_pairs(real),
                           "note": "mean pairwise MS-SSIM; lower = more diverse"}

    # 4. realism: MMD (linear kernel) on VQ-VAE encoder features, synthetic vs real, and real vs real
    with torch.inference_mode():
        def features(vols: list[np.ndarray]) -> torch.Tensor:
            x = torch.from_numpy(np.stack(vols))[:, None]
            ae = gen.autoencoder  # on the generator's device
            return torch.cat([ae.encode(x[i:i + 4].to(gen.device)).float().cpu()
                              for i in range(0, len(x), 4)]).flatten(1)

        real_all = [ds.volume(i) for i in idx]
        f_real, f_syn = features(real_all), features(synth)
        half = len(f_real) // 2
        mmd = MMDMetric()
        result["realism"] = {"mmd_vqvae_features_synthetic_vs_real": float(mmd(f_real, f_syn)),
                             "mmd_vqvae_features_real_vs_real_halves": float(mmd(f_real[:half], f_real[half:2 * half])),
                             "note": "linear-kernel MMD on the VQ-VAE encoder's latent (no downloaded feature "
                                     "extractor); the real-vs-real value is the floor to compare with"}
    result["seconds_per_sample"] = seconds
    result["device"] = str(gen.device)
    _write_samples_png(bundle, [Volume(v, bundle.grid.affine) for v in synth[:8]], requested[:8])
    result["picture"] = {"file": SAMPLES_PNG, "conditions": "the first 8 of the adherence conditions"}
    result["data"] = ds.fingerprint()["name"]
    update_metrics(bundle.path, "prior", result)
    _refresh_card(bundle.path)
    return result


def _training_split(bundle, ds, stage: str) -> tuple[list[str], list[str]]:
    """(training subjects, held-out subjects) of a bundle's ``stage`` within dataset ``ds``, which must
    be the data that stage was trained on (checked by how it was generated or named)."""
    from synthbrain.errors import ConfigError

    info = bundle.config.get(stage, {})
    trained_on = info.get("data_fingerprint", {})
    held = set(info.get("val_subjects", []))
    if not bundle.trained_on(stage, ds) or not held <= set(ds.labels):
        what = trained_on.get("generated_by") or trained_on.get("name")
        raise ConfigError(f"{ds.root}: not the data the {stage} was trained on ({what!r}); membership needs it")
    # a larger phantom cohort of the same seed holds the training subjects first
    train = [s for s in ds.labels if s not in held][:trained_on.get("subjects", len(ds))]
    return train, sorted(held)


def evaluate_privacy(bundle_path: str | Path, data: str | Path, n_samples: int = 100, device: str = "cpu",
                     on_step: OnStep | None = None, seed: int = 20_000) -> dict:
    """How private the bundle's samples are, into metrics.json: the share of ``n_samples`` fresh
    samples (default conditions drawn from the training subjects) flagged by the memorisation audit
    against the prior's training set, calibrated on its held-out subjects; and membership inference
    (loss-threshold attack) on the prior and on the autoencoder."""
    from synthbrain.bundle import load_bundle, update_metrics
    from synthbrain.conditions import ConditionSchema
    from synthbrain.data.bids import BIDSDataset
    from synthbrain.privacy import AuditSettings, audit, membership_inference
    from synthbrain.sampling import Generator

    bundle = load_bundle(bundle_path, device="cpu")
    ds = BIDSDataset(data, grid=bundle.grid, schema=bundle.schema)
    prior_train, prior_held = _training_split(bundle, ds, "prior")
    ae_train, ae_held = _training_split(bundle, ds, "autoencoder")

    def part(labels, schema=None):
        return BIDSDataset(data, grid=bundle.grid, schema=schema or ConditionSchema(()), subjects=labels)

    gen = Generator(bundle, device=device)
    rng = np.random.default_rng(seed)
    conds = [ds.subjects[int(i)].values for i in rng.integers(0, len(ds), n_samples)]
    t0 = time.perf_counter()
    samples = gen.sample(conds, n=n_samples, seed=seed)
    t_sample = time.perf_counter() - t0
    report = audit([(f"sample-{s.seed}", s.volume.data) for s in samples], part(prior_train), part(prior_held),
                   bundle, AuditSettings(), device=device, on_step=on_step)
    d = report.to_dict()
    rng = np.random.default_rng(seed)
    member_sample = sorted(rng.choice(prior_train, min(len(prior_train), 4 * len(prior_held)), replace=False))
    prior_mia = membership_inference(bundle, part(member_sample, bundle.schema), part(prior_held, bundle.schema),
                                     device=device)
    ae_mia = membership_inference(bundle, part(ae_train, bundle.schema), part(ae_held, bundle.schema), device=device)
    result = {
        "audit": {k: d[k] for k in ("samples", "flagged", "share_flagged", "thresholds", "train_subjects")}
        | {"holdout_subjects": len(prior_held), "seconds_per_sample_x_training_subject":
           d["seconds"]["per_sample_x_training_subject"], "sampling_seconds": t_sample,
           "max_correlation": max(r["correlation"] for r in d["per_sample"]),
           "max_cosine": max(r["cosine"] for r in d["per_sample"])},
        "membership_prior": prior_mia["prior_loss"] | {"members_from": "prior training subjects (a random sample)"},
        "membership_autoencoder": ae_mia["reconstruction_error"] | {"members_from": "autoencoder training subjects"},
        "note": prior_mia["note"], "data": ds.fingerprint()["name"], "device": device,
    }
    update_metrics(bundle.path, "privacy", result)
    _refresh_card(bundle.path)
    return result


GUIDANCE_RULE = ("ventricles r >= 0.95 and brain r >= 0.90 (requested vs measured), each volume's mean absolute error "
                 "within 1.5 x the best of the sweep, and under 0.1 % of the voxels outside the template's dilated "
                 "brain mask brighter than 0.1 (no blobs)")


def good_guidance(curve: list[dict]) -> list[float]:
    """The scales of a guidance sweep's ``curve`` that meet :data:`GUIDANCE_RULE`."""
    best = {n: min(p[n]["mae"] for p in curve) for n in ("ventricular_volume", "brain_volume")}
    return [p["guidance"] for p in curve
            if p["ventricular_volume"]["r"] >= 0.95 and p["brain_volume"]["r"] >= 0.90 and p["unmeasurable"] == 0
            and p["bright_outside_brain"] < 1e-3 and all(p[n]["mae"] <= 1.5 * best[n] for n in best)]


def guidance_sweep(bundle_path: str | Path, data: str | Path, values=(0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0),
                   n_conditions: int = 16, n_diversity: int = 6, steps: int | None = None, device: str = "cpu",
                   precision: str = "auto", on_step: OnStep | None = None) -> dict:
    """Adherence, diversity and artefacts of the prior at each guidance scale in ``values``; the range
    of scales that meet :data:`GUIDANCE_RULE` goes to config.json (``prior.guidance_range``), where
    the CLI and the app warn outside it, and the curve to metrics.json (``guidance_sweep``)."""
    from synthbrain.bundle import load_bundle, read_config, update_metrics, write_config
    from synthbrain.data.bids import BIDSDataset
    from synthbrain.data.template import load_template
    from synthbrain.metrics import agreement, ms_ssim_pairs
    from synthbrain.sampling import Generator

    bundle = load_bundle(bundle_path, device="cpu")
    gen = Generator(bundle, device=device, precision=precision)
    ds = BIDSDataset(data, grid=bundle.grid, schema=bundle.schema)
    idx, _ = _eval_subjects(bundle, ds, "prior")
    idx = (idx + [i for i in range(len(ds)) if i not in idx])[:n_conditions]
    requested = [ds.subjects[i].values for i in idx]
    outside = ~load_template(bundle.grid).search_mask
    curve, done, total = [], 0, len(values) * (len(idx) + n_diversity)
    for g in values:
        measured, artefact = [], []
        for k, cond in enumerate(requested):
            s = gen.sample(cond, n=1, seed=1000 + k, steps=steps, guidance=float(g))[0]
            measured.append(_measure_or_none(s.volume))
            artefact.append(float((s.volume.data[outside] > 0.1).mean()))
            done += 1
            if on_step:
                on_step(done, total, {"guidance": g})
        ok = [k for k, m in enumerate(measured) if m is not None]
        point = {"guidance": float(g), "unmeasurable": len(idx) - len(ok),
                 "bright_outside_brain": float(np.max(artefact))}
        for name in ("ventricular_volume", "brain_volume"):
            point[name] = agreement([requested[k][name] for k in ok], [getattr(measured[k], name) for k in ok])
        same = gen.sample(bundle.schema.defaults(), n=n_diversity, seed=5000, steps=steps, guidance=float(g))
        done += n_diversity
        stack = torch.from_numpy(np.stack([x.volume.data for x in same]))[:, None]
        point["ms_ssim_same_condition"] = ms_ssim_pairs(stack)
        curve.append(point)
    good = good_guidance(curve)
    for point in curve:
        point["good"] = point["guidance"] in good
    result = {"curve": curve, "steps": steps or gen.config.default_steps, "conditions": len(idx),
              "good_range": [min(good), max(good)] if good else None, "rule": GUIDANCE_RULE}
    if good:
        config = read_config(bundle.path)
        config["prior"]["guidance_range"] = [min(good), max(good)]
        write_config(bundle.path, config)
    update_metrics(bundle.path, "guidance_sweep", result)
    _refresh_card(bundle.path)
    return result
