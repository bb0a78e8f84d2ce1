"""Sampling: bundle + conditions + seed -> synthetic brain volumes.

:class:`Generator` integrates the prior's probability-flow ODE with DPM-Solver++ (2nd-order multistep,
``diffusers``' ``DPMSolverMultistepScheduler`` on the exact beta schedule the prior was trained with by
MONAI's scheduler) for a few steps (the bundle's ``default_steps``). MONAI has no DPM-Solver, and at
3-5 steps it keeps the conditioning adherence of 50 DDIM steps (``benchmarks/sampling_speed.py``).
Classifier-free guidance is one batched forward pass (the conditional and unconditional halves
together); the latent is then snapped to the VQ-VAE codebook and decoded. Sample ``i`` of a call
with ``seed`` draws its noise from ``torch.Generator`` seeded with ``seed + i`` on the CPU, so a brain
depends on its own seed only: the same on any batch size, and the same for the same seed on the same
machine. The networks run under autocast where the hardware has fast low precision (``precision``:
bf16 on CUDA with bf16, fp16 on other CUDA, bf16 on CPUs with AMX tiles; fp32 otherwise).

A :class:`Generator` is reentrant (the diffusers pattern): every call builds its own solver from the
stored scheduler config, the networks stay in eval mode under ``torch.inference_mode``, and nothing
else is written during a call, so threads may share one generator and each gets what it would get alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthbrain.conditions import NULL_VALUE
from synthbrain.errors import BundleError, ConfigError, InvalidVolumeError
from synthbrain.export import DERIVED, SYNTHETIC, SYNTHETIC_NOTE  # noqa: F401  (SYNTHETIC_NOTE: for callers)
from synthbrain.io import Volume

OnStep = Callable[[int, int, dict], None]
SAMPLER = "DPM-Solver++ 2M (diffusers) on the prior's MONAI noise schedule, classifier-free guidance"


@dataclass(frozen=True, eq=False)
class Sample:
    volume: Volume                   # (X, Y, Z) float32 in [0, 1] on the bundle's grid
    conditions: dict[str, Any]       # requested, in real units (defaults filled in)
    seed: int
    steps: int
    guidance: float
    seconds: float = 0.0             # wall time of the call that made it, per sample
    info: dict = field(default_factory=dict)

    @property
    def provenance(self) -> str:
        """``synthetic`` (from noise) or ``derived`` (an edit of a person's scan, see :meth:`Generator.edit`)."""
        return self.info.get("provenance", SYNTHETIC)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``auto``: bf16 on CUDA with bf16 (else fp16), bf16 on a CPU with AMX tiles (where oneDNN runs
    bf16 convolutions several times faster than fp32), fp32 on other CPUs."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bf16" if device.type == "cpu" and amx() else "fp32"


DECODES = ("auto", "whole", "sliced")
SLICED_DECODE_VOXELS = 4_000_000  # auto: slice the decode of grids this large (the 1 mm grid) on a CPU


def resolve_decode(autoencoder, device: torch.device, grid, decode: str = "auto") -> bool:
    """Whether to decode in bounded memory (``sliced``; a KL autoencoder only, equal to ``whole`` up to
    float rounding, ~20 % slower): ``auto`` slices on a CPU at grids of ``SLICED_DECODE_VOXELS`` or more."""
    if decode not in DECODES:
        raise ConfigError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    can = hasattr(autoencoder, "decode_sliced")
    if decode == "sliced" and not can:
        raise ConfigError("sliced decoding is for KL autoencoders (imported bundles); this bundle has a VQ-VAE")
    if decode == "auto":
        import math

        return can and device.type == "cpu" and math.prod(grid.shape) >= SLICED_DECODE_VOXELS
    return decode == "sliced"


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_scheduler(config):
    """DPM-Solver++ (2M) on the prior's training noise schedule (MONAI's betas, passed through)."""
    from diffusers import DPMSolverMultistepScheduler
    from monai.networks.schedulers import DDPMScheduler

    kw = config.scheduler_kwargs()
    betas = DDPMScheduler(**kw).betas
    return DPMSolverMultistepScheduler(num_train_timesteps=kw["num_train_timesteps"], trained_betas=betas.numpy(),
                                       prediction_type=kw["prediction_type"], algorithm_type="dpmsolver++",
                                       solver_order=2, final_sigmas_type="zero")


@dataclass(frozen=True, eq=False)
class DenoisingStep:
    """One point on the way from noise to a brain (see :meth:`Generator.denoising_steps`)."""

    step: int                        # 0: the starting noise; k: after solver step k
    steps: int                       # solver steps of the whole run
    latent: np.ndarray               # (C, x, y, z) float32, the latent cropped to the autoencoder's grid
    volume: Volume                   # that latent decoded: (X, Y, Z) float32 in [0, 1] on the bundle's grid

    @property
    def label(self) -> str:
        return "noise" if self.step == 0 else f"step {self.step} of {self.steps}"


class Generator:
    """Samples brains from a bundle with a prior. Reentrant: one generator may serve many threads at
    once (each call has its own solver state; the networks are only read)."""

    def __init__(self, bundle, device: str | torch.device | None = None, precision: str = "auto",
                 decode: str = "auto") -> None:
        if bundle.prior is None:
            raise BundleError(f"{bundle.path}: bundle has no prior; train one with 'synthbrain train prior'")
        self.bundle = bundle
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.prior = bundle.prior.to(self.device).eval()
        self.autoencoder = bundle.autoencoder.to(self.device).eval()
        self.config = self.prior.config
        self.scale = bundle.scale_factor
        self.schema = bundle.schema
        self.precision = resolve_precision(self.device, precision)
        self.sliced_decode = resolve_decode(self.autoencoder, self.device, bundle.grid, decode)
        # the solver's config (immutable), not a solver: set_timesteps and every step write to a solver
        self.scheduler_config = make_scheduler(self.config).config

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, device: str | None = None,
                    precision: str = "auto", decode: str = "auto") -> Generator:
        """Load a bundle (default: the shipped demo bundle) and make a generator on ``device``."""
        from synthbrain.bundle import load_bundle

        return cls(load_bundle(path, device="cpu"), device=device, precision=precision, decode=decode)

    @property
    def grid(self):
        return self.bundle.grid

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial noise (B, C, X, Y, Z) of the padded latent, one CPU generator per seed."""
        shape = self.prior.padded_shape
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def new_scheduler(self, steps: int, start_step: int = 0):
        """A fresh DPM-Solver++ for one call, set to ``steps`` timesteps starting at ``start_step``. Each
        call owns one: the solver keeps its multistep history and step index in itself."""
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        scheduler.set_begin_index(start_step)
        return scheduler

    # The loop is MONAI's DiffusionInferer.sample loop (the same -1 fill for the unconditional half)
    # written out, because the app and the CLI need what it cannot give: a progress callback, per-sample
    # seeds, starting part-way for editing, intermediate latents, and a scheduler MONAI does not have.
    def _solve(self, x: torch.Tensor, context: torch.Tensor, steps: int, guidance: float, start_step: int = 0,
               scheduler=None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (k, t, latent after solver step k) for each step from ``start_step`` on."""
        scheduler = scheduler or self.new_scheduler(steps, start_step)
        with torch.inference_mode():
            x = x.to(self.device)
            context = context.to(self.device)
            null = torch.full_like(context, NULL_VALUE)
            guided = guidance != 1.0
            ctx = torch.cat([null, context]) if guided else context
        for k, t in enumerate(scheduler.timesteps[start_step:]):
            with torch.inference_mode():  # per step: the mode must not leak to the caller between yields
                inp = torch.cat([x, x]) if guided else x
                tt = torch.full((inp.shape[0],), int(t), device=self.device, dtype=torch.long)
                with autocast(self.device, self.precision):
                    out = self.prior(inp, tt, ctx).float()
                if guided:
                    uncond, cond = out.chunk(2)
                    out = uncond + guidance * (cond - uncond)
                x = scheduler.step(out, t, x).prev_sample
            yield k, int(t), x

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, context: torch.Tensor, steps: int, guidance: float,
                on_step: OnStep | None = None, offset: int = 0, total: int | None = None,
                start_step: int = 0, intermediates: list | None = None, scheduler=None) -> torch.Tensor:
        """Solve from noise ``x`` (B, C, X, Y, Z) under ``context`` (B, 1, W) in ``steps`` steps;
        ``start_step`` > 0 skips the first steps (for editing a partly noised latent, see :meth:`edit`).
        ``scheduler``: a solver from :meth:`new_scheduler` already used for this call (else a fresh one)."""
        n = total or steps - start_step
        for k, t, latent in self._solve(x, context, steps, guidance, start_step, scheduler):
            x = latent
            if intermediates is not None:
                intermediates.append(x.detach().cpu())
            if on_step is not None:
                on_step(offset + k + 1, n, {"t": t})
        return x

    def denoising_steps(self, conditions: Mapping[str, Any] | None = None, seed: int = 0, steps: int | None = None,
                        guidance: float | None = None, shown: Sequence[int] | None = None
                        ) -> Iterator[DenoisingStep]:
        """Watch one sample being made: yield the starting noise (step 0) and the latent after each
        solver step (or only the steps in ``shown``, 1-based), each decoded by the autoencoder. Step
        ``steps``' volume is what :meth:`sample` returns for the same arguments. Decoding costs about
        as much as a solver step, so ask for a few steps where time matters. Bad arguments raise here,
        before the first step is asked for."""
        steps, guidance = self._steps_and_guidance(steps, guidance)
        wanted = set(range(1, steps + 1) if shown is None else (int(k) for k in shown))
        if bad := sorted(k for k in wanted if not 1 <= k <= steps):
            raise ConfigError(f"shown steps must be in 1..{steps}, got {bad}")
        context, _ = self.context([conditions or {}])
        self.require_memory(1)
        return self._denoising_steps(context, seed, steps, guidance, wanted)

    def _denoising_steps(self, context: torch.Tensor, seed: int, steps: int, guidance: float,
                         wanted: set[int]) -> Iterator[DenoisingStep]:
        noise = self.noise([seed])
        yield self._decoded(0, steps, noise)
        for k, _, x in self._solve(noise, context, steps, guidance):
            if k + 1 in wanted:
                yield self._decoded(k + 1, steps, x)

    def _decoded(self, step: int, steps: int, latent: torch.Tensor) -> DenoisingStep:
        vol = self.decode(latent)[0, 0].cpu().numpy()
        crop = self.prior.crop(latent)[0].float().cpu().numpy()
        return DenoisingStep(step, steps, crop, Volume(vol, self.grid.affine, source=f"denoising-step-{step}"))

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Padded, scaled latent -> volumes (B, 1, X, Y, Z) in [0, 1] (through the codebook)."""
        z = self.prior.crop(latent.to(self.device)) / self.scale
        q = self.autoencoder.quantize_eval(z.float())  # nearest code in fp32: no ties flipped by rounding
        with autocast(self.device, self.precision):
            vol = (self.autoencoder.decode_sliced(q) if self.sliced_decode else self.autoencoder.decode(q)).float()
        return vol.clamp_(0.0, 1.0)

    @torch.inference_mode()
    def encode(self, volume: np.ndarray) -> torch.Tensor:
        """A preprocessed volume (X, Y, Z) on the grid -> padded, scaled latent (1, C, ...)."""
        x = torch.from_numpy(np.asarray(volume, np.float32)[None, None]).to(self.device)
        return self.prior.pad(self.autoencoder.encode_quantized(x) * self.scale)

    def complete(self, conditions: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate ``conditions``; a volume not given takes the value typical of the requested age and
        sex in the training population (bundle.population), any other condition the schema's default."""
        given = {k: v for k, v in dict(conditions or {}).items() if v is not None}
        return self.schema.complete(self.bundle.population.typical(self.schema, given))

    def context(self, conditions: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, list[dict]]:
        full = [self.complete(c) for c in conditions]
        vec = torch.from_numpy(np.stack([self.schema.encode(c) for c in full]))[:, None, :]
        return vec, full

    def guidance_warning(self, guidance: float | None) -> str | None:
        return guidance_warning(self.bundle, guidance)

    def decode_memory(self, batch: int = 1) -> int:
        """Bytes the decode of ``batch`` latents adds at its peak, from the autoencoder's config (sliced or
        whole, at this generator's precision, as it decodes; see synthbrain.memory)."""
        from synthbrain.memory import decode_bytes

        return decode_bytes(self.autoencoder.config, self.grid.shape, sliced=self.sliced_decode, batch=batch,
                            precision=self.precision)

    def require_memory(self, batch: int = 1) -> None:
        """Refuse (:class:`~synthbrain.errors.InsufficientMemoryError`) before any work when this device
        has less memory free than the decode of ``batch`` latents needs."""
        from synthbrain.memory import require_memory

        require_memory(self.decode_memory(batch), self.device,
                       f"decoding {'a' if batch == 1 else batch} {self.grid.name}-grid "
                       f"({' x '.join(map(str, self.grid.shape))}) volume{'s' if batch > 1 else ''} "
                       f"({'sliced' if self.sliced_decode else 'whole'})")

    def _decode_step(self, latent: torch.Tensor, on_step: OnStep | None, done: int, total: int) -> torch.Tensor:
        """:meth:`decode` as a progress step of its own (at 1 mm it takes longer than the denoising):
        announced as ``(done, total, {"stage": "decode"})`` before it starts, ``done + 1`` after."""
        if on_step is not None:
            on_step(done, total, {"stage": "decode"})
        vol = self.decode(latent)
        if on_step is not None:
            on_step(done + 1, total, {"stage": "decoded"})
        return vol

    def _steps_and_guidance(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        steps = int(steps or self.config.default_steps)
        guidance = float(self.config.default_guidance if guidance is None else guidance)
        if not self.config.classifier_free_guidance and guidance != 1.0:
            # trained with the conditions always present: there is no unconditional prediction to guide from
            raise ConfigError(f"{self.bundle.name} was trained without classifier-free guidance (it has no "
                              f"unconditional mode): guidance is fixed at 1, got {guidance:g}")
        if not 1 <= steps <= self.config.num_train_timesteps:
            raise ConfigError(f"steps must be in 1..{self.config.num_train_timesteps}, got {steps}")
        if not 0.0 <= guidance <= 20.0:
            raise ConfigError(f"guidance must be in 0..20, got {guidance}")
        return steps, guidance

    def sample(self, conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, n: int = 1,
               seed: int = 0, steps: int | None = None, guidance: float | None = None,
               on_step: OnStep | None = None, batch_size: int = 4) -> list[Sample]:
        """``n`` brains for ``conditions`` (one dict for all, or a list of ``n`` dicts, in real units;
        missing ones are filled by :meth:`complete`). Sample ``i`` uses seed ``seed + i``."""
        if isinstance(conditions, Mapping) or conditions is None:
            conditions = [dict(conditions or {})] * n
        conditions = list(conditions)
        if len(conditions) != n:
            raise ConfigError(f"got {len(conditions)} condition sets for n = {n}")
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        steps, guidance = self._steps_and_guidance(steps, guidance)
        context, full = self.context(conditions)
        self.require_memory(min(n, batch_size))
        t0 = time.perf_counter()
        out: list[Sample] = []
        # progress: each batch's solver steps, then its decode as one more step
        total = (steps + 1) * ((n + batch_size - 1) // batch_size)
        for b in range(0, n, batch_size):
            seeds = list(range(seed + b, seed + min(n, b + batch_size)))
            offset = (b // batch_size) * (steps + 1)
            x = self.denoise(self.noise(seeds), context[b:b + len(seeds)], steps, guidance, on_step,
                             offset=offset, total=total)
            vols = self._decode_step(x, on_step, offset + steps, total).cpu().numpy()
            for j, s in enumerate(seeds):
                out.append(Sample(Volume(vols[j, 0], self.grid.affine, source=f"seed-{s}"), full[b + j], s,
                                  steps, guidance, info={"precision": self.precision}))
        per = (time.perf_counter() - t0) / n
        return [replace(s, seconds=per) for s in out]

    def edit(self, volume: np.ndarray, conditions: Mapping[str, Any], strength: float = 0.5, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, on_step: OnStep | None = None,
             latent: torch.Tensor | None = None) -> Sample:
        """Re-imagine a real (preprocessed) volume under new conditions: encode it, noise its latent to
        ``strength`` (0 = unchanged, 1 = pure noise) and denoise under ``conditions`` (SDEdit), so the
        subject stays recognisable while the conditions change. The result is *derived* from that
        person's scan (never synthetic): its info carries the provenance and the source's digest.
        ``latent``: ``encode(volume)`` when the caller already has it (one scan edited at many ages
        is encoded once)."""
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        steps, guidance = self._steps_and_guidance(steps, guidance)
        context, full = self.context([conditions])
        start = min(steps - 1, int(round(steps * (1.0 - strength))))
        self.require_memory(1)
        scheduler = self.new_scheduler(steps, start)
        z0 = self.encode(volume) if latent is None else latent.to(self.device)
        noise = self.noise([seed]).to(self.device)
        x = scheduler.add_noise(z0, noise, scheduler.timesteps[start:start + 1])
        total = steps - start + 1  # the solver steps left, then the decode
        x = self.denoise(x, context, steps, guidance, on_step, start_step=start, scheduler=scheduler, total=total)
        vol = self._decode_step(x, on_step, total - 1, total).cpu().numpy()[0, 0]
        from synthbrain.export import source_digest

        return Sample(Volume(vol, self.grid.affine, source=f"edit-seed-{seed}"), full[0], seed, steps, guidance,
                      info={"strength": strength, "precision": self.precision, "provenance": DERIVED,
                            "source_digest": source_digest(np.asarray(volume, np.float32))})


def guidance_warning(bundle, guidance: float | None) -> str | None:
    """A sentence when ``guidance`` is outside the range of scales the bundle was measured to sample
    well at (``prior.guidance_range``, written by ``synthbrain evaluate guidance``), else None."""
    prior = bundle.config.get("prior", {})
    r = prior.get("guidance_range")
    g = float(prior.get("config", {}).get("default_guidance", 1.0) if guidance is None else guidance)
    if not r or float(r[0]) <= g <= float(r[1]):
        return None
    what = ("the requested volumes are followed loosely" if g < float(r[0])
            else "samples may show artefacts (bright blobs outside the brain) and vary less")
    return f"guidance {g:g} is outside this model's measured good range {r[0]:g}-{r[1]:g}: {what}"


def sample_sidecar(sample: Sample, bundle, extra: Mapping[str, Any] | None = None) -> dict:
    """The JSON sidecar of a sample: what was asked, how it was made, and what it is (synthetic, or
    derived for an edit of a scan, whose source is named by digest only)."""
    from synthbrain.export import sidecar

    fields = {"Conditions": sample.conditions, "Seed": sample.seed, "Steps": sample.steps, "Guidance": sample.guidance,
              "Sampler": SAMPLER, "Precision": sample.info.get("precision", "fp32"),
              "Bundle": {"name": bundle.name, "autoencoder_sha256": bundle.config["autoencoder"].get("sha256"),
                         "prior_sha256": bundle.config.get("prior", {}).get("sha256")},
              "Grid": bundle.grid.to_dict(), **(extra or {})}
    if sample.provenance == DERIVED:
        fields["Strength"] = sample.info.get("strength")
    return sidecar(sample.provenance, fields, sample.info.get("source_digest"))


def sample_entities(bundle, subject: str, session: str | None = None) -> str:
    """``sub-<subject>[_ses-<session>]_space-<space>_res-<r>_T1w`` (the kind's desc entity is added by
    the exporter)."""
    from synthbrain.grids import SPACE

    ses = f"_ses-{session}" if session else ""
    return f"sub-{subject}{ses}_space-{SPACE}_res-{bundle.grid.res_label}_T1w"


def samples_table(samples: Sequence[Sample], subjects: Sequence[str], bundle, measured: Sequence[dict | None] | None,
                  id_column: str = "participant_id") -> tuple[list[dict], list[str], dict]:
    """Rows, columns and column descriptions of a participants.tsv (or sessions.tsv) of samples:
    requested conditions, seed and (unless ``measured`` is None) the volumes measured on each sample
    in mL (n/a where a sample could not be measured)."""
    with_measured = measured is not None
    measured = measured if with_measured else [None] * len(samples)
    rows = []
    for sub, s, m in zip(subjects, samples, measured):
        row = {id_column: sub, **s.conditions, "seed": s.seed}
        if m is not None:
            row.update(measured_brain_volume=m.get("brain_volume"),
                       measured_ventricular_volume=m.get("ventricular_volume"))
        rows.append(row)
    cols = [id_column, *bundle.schema.names, "seed"]
    if with_measured:
        cols += ["measured_brain_volume", "measured_ventricular_volume"]
    units = {c.name: {"Description": f"requested {c.label.lower()}", **({"Units": c.unit} if c.unit else {})}
             for c in bundle.schema}
    units.update(seed={"Description": "random seed of the sample"},
                 measured_brain_volume={"Description": "grey + white matter measured on the sample", "Units": "mL"},
                 measured_ventricular_volume={"Description": "ventricles measured on the sample", "Units": "mL"})
    return rows, cols, {c: units[c] for c in cols if c in units}


def measure_sample(sample: Sample) -> tuple[dict | None, dict]:
    """(volumes in mL or None, the sidecar's ``Measured`` entry) of a sample."""
    from synthbrain.measure import measure_volume

    try:
        m = measure_volume(sample.volume)
    except InvalidVolumeError as e:  # an untrained or broken model's output: keep it, say why
        return None, {"error": str(e)}
    vols = {"brain_volume": m.brain_volume, "ventricular_volume": m.ventricular_volume}
    return vols, {"brain_volume_mL": m.brain_volume, "ventricular_volume_mL": m.ventricular_volume}


DATASET_TITLE = "SynthBrain synthetic cohort"
# what makes a folder a dataset: written last, once every subject is on disk, and removed first
INDEX_FILES = ("participants.tsv", "participants.json", "dataset_description.json")


def _start_dataset(out: Path, bundle, clear_index: bool = True):
    from synthbrain.export import DatasetWriter, generated_by

    writer = DatasetWriter(SYNTHETIC, DATASET_TITLE, generated_by(bundle), folder=out)
    if clear_index:  # a folder that held a dataset must not look complete before this one is
        for name in INDEX_FILES:
            (out / name).unlink(missing_ok=True)
    return writer


def _write_subject(writer, i: int, sample: Sample, bundle, measure: bool) -> dict:
    """Write subject ``i`` (``sub-synth<i + 1>``, 4 digits): its volume and sidecar; returns its
    participants.tsv row."""
    sub = f"synth{i + 1:04d}"
    vols, entry = measure_sample(sample) if measure else (None, None)
    writer.add(f"sub-{sub}/anat", sample_entities(bundle, sub), sample.volume,
               sample_sidecar(sample, bundle, {"Measured": entry} if measure else None))
    rows, _, _ = samples_table([sample], [f"sub-{sub}"], bundle, [vols] if measure else None)
    return rows[0]


def _finish_dataset(writer, rows: Sequence[dict], bundle, measure: bool) -> None:
    _, cols, units = samples_table([], [], bundle, [] if measure else None)
    writer.table("participants.tsv", rows, cols, units)
    writer.close()


def write_samples(out_dir: str | Path, samples: Sequence[Sample], bundle, measure: bool = True,
                  on_step: OnStep | None = None) -> Path:
    """Write synthetic samples as a BIDS-like derivative dataset (through :mod:`synthbrain.export`):
    ``participants.tsv`` (requested conditions, seed, measured volumes) and
    ``sub-synthNNNN/anat/sub-synthNNNN_space-<space>_res-<r>_desc-synthetic_T1w.nii.gz`` + sidecars.
    participants.tsv and dataset_description.json are written last (and removed first), so an
    interrupted write never looks like a complete dataset."""
    if any(s.provenance != SYNTHETIC for s in samples):
        raise ConfigError("write_samples writes synthetic samples only; edits of a scan are derived data")
    out = Path(out_dir)
    writer = _start_dataset(out, bundle)
    rows = []
    for i, s in enumerate(samples):
        rows.append(_write_subject(writer, i, s, bundle, measure))
        if on_step is not None:
            on_step(i + 1, len(samples), {"wrote": rows[-1]["participant_id"]})
    _finish_dataset(writer, rows, bundle, measure)
    return out


def shard(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The subjects (indices into ``0..n-1``) rank ``rank`` of ``world_size`` samples, batch by batch:
    every ``world_size``-th batch of ``batch_size`` consecutive subjects, from batch ``rank``. Whole
    batches, not every K-th subject: each brain is then computed in the batch one process computes it
    in (the same seeds beside it), so K ranks make the very brains one process makes."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"cannot shard: batch_size {batch_size}, rank {rank} of {world_size}")
    return [range(b, min(n, b + batch_size)) for b in range(rank * batch_size, n, world_size * batch_size)]


def sample_dataset(gen: Generator, out_dir: str | Path, conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]]
                   | None = None, n: int = 1, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                   measure: bool = True, on_step: OnStep | None = None, dist=None, batch_size: int = 4) -> dict:
    """Sample ``n`` brains (sample ``i``: seed ``seed + i``; ``conditions`` one dict for all or ``n``) and
    write them as one dataset in :func:`write_samples`' layout, a batch at a time (a large cohort is
    never held in memory).

    ``dist`` (the :class:`~synthbrain.training.distributed.DistContext` of a torchrun job; default: one
    process) shards the work: each rank samples its :func:`shard` of the subjects and writes their
    volumes and sidecars into ``out_dir`` (a folder every rank sees); when every rank has finished, rank
    0 alone writes participants.tsv (every rank's rows, gathered, in subject order) and
    dataset_description.json. These are removed before any rank writes a subject, so a run with a
    failed rank never leaves a folder that looks like a complete dataset. A rank may get no subject.

    Returns ``{"subjects": this rank's count, "world_size", "seconds_per_brain"}`` (the mean over every
    rank's brains of the sampling time per brain, from the gathered figures)."""
    import torch

    from synthbrain.training.distributed import DistContext

    dist = dist or DistContext()
    if isinstance(conditions, Mapping) or conditions is None:
        conditions = [dict(conditions or {})] * n
    conditions = list(conditions)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if len(conditions) != n:
        raise ConfigError(f"got {len(conditions)} condition sets for n = {n}")
    steps, guidance = gen._steps_and_guidance(steps, guidance)  # refused here, before any file
    device = gen.device if gen.device.type == "cuda" else torch.device("cpu")  # of the collectives
    out = Path(out_dir)
    writer = _start_dataset(out, gen.bundle, clear_index=dist.is_main)
    dist.all_gather_json(None, device)  # no rank writes a subject before the old index is gone

    batches = shard(n, batch_size, dist.rank, dist.world_size)
    total = sum(steps + 1 + len(b) for b in batches)  # solver steps, decodes and subjects written
    done, rows, seconds = 0, [], []
    for b in batches:
        base = done
        part = gen.sample(conditions[b.start:b.stop], n=len(b), seed=seed + b.start, steps=steps, guidance=guidance,
                          batch_size=batch_size, on_step=None if on_step is None else (
                              lambda i, _n, info, base=base: on_step(base + i, total, info)))
        done += steps + 1  # the batch's solver steps and its decode
        for i, s in zip(b, part):
            rows.append([i, _write_subject(writer, i, s, gen.bundle, measure)])
            seconds.append(s.seconds)
            done += 1
            if on_step is not None:
                on_step(done, total, {"wrote": rows[-1][1]["participant_id"]})
        del part  # the batch is on disk

    parts = dist.all_gather_json({"rows": rows, "seconds": seconds}, device)  # every rank has finished here
    every = sorted((r for p in parts for r in p["rows"]), key=lambda r: r[0])
    if [i for i, _ in every] != list(range(n)):  # a bug, not a user error
        raise RuntimeError(f"sharded sampling wrote subjects {[i for i, _ in every]}, expected 0..{n - 1}")
    if dist.is_main:
        _finish_dataset(writer, [row for _, row in every], gen.bundle, measure)
    all_seconds = [t for p in parts for t in p["seconds"]]
    return {"subjects": len(rows), "world_size": dist.world_size,
            "seconds_per_brain": sum(all_seconds) / len(all_seconds)}
