"""Stage 2 training: the conditional latent diffusion prior on cached VQ-VAE latents.

The training set is encoded once with the bundle's frozen autoencoder (quantised latents, cached in
the run folder as ``latents.safetensors``); the latent scale factor (1 / standard deviation of the
training latents) is computed from them once and saved in the bundle. The exported prior is the
exponential moving average of the weights (``torch.optim.swa_utils``), as is usual for diffusion.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from synthbrain.models.prior import Prior, PriorConfig
from synthbrain.training.config import TrainConfig, config_sections
from synthbrain.training.distributed import DistContext, step_generator, unwrap
from synthbrain.training.loop import OnValidate, Run, StageSetup, init_from_bundle, run_stage
from synthbrain.training.run import command_line, run_commands

OnStep = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class PriorTraining:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=20000, batch_size=16, lr=2e-4, warmup_steps=500, val_every=500, ckpt_every=500, log_every=25,
        grad_clip=1.0, val_fraction=0.1))
    model: PriorConfig = field(default_factory=PriorConfig)
    ema_decay: float = 0.999

    @classmethod
    def from_dict(cls, d: dict) -> PriorTraining:
        return config_sections(cls, d)

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "model": self.model.to_dict(), "ema_decay": self.ema_decay}


class PriorStage:
    def __init__(self, prior: Prior, cfg: PriorTraining, scale: float, device: torch.device,
                 dist: DistContext) -> None:
        from monai.networks.schedulers import DDPMScheduler
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.cfg, self.scale, self.device = cfg, scale, device
        self.prior = prior.to(device)
        self.net = net = dist.wrap(self.prior, device)
        self.ema = AveragedModel(self.prior, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.networks = {"prior": net, "prior_ema": self.ema}
        self.optimizers = {"prior": torch.optim.AdamW(prior.parameters(), lr=cfg.train.lr,
                                                      weight_decay=cfg.train.weight_decay)}
        self.scheduler = DDPMScheduler(**cfg.model.scheduler_kwargs())
        self.dist = dist
        self._micro_step, self._micro = -1, 0

    def _loss(self, latents: torch.Tensor, context: torch.Tensor, net, generator: torch.Generator,
              drop: float, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """The denoising loss of a batch; ``part`` (rank, world size): the batch is that rank's slice of
        a global batch, whose noise, timesteps and condition dropout are drawn whole and sliced, so that
        K ranks draw what one process with the whole global batch would."""
        rank, world = part
        x0 = self.prior.pad(latents.to(self.device) * self.scale)
        b = x0.shape[0]
        mine = slice(rank * b, (rank + 1) * b)
        # drawn on the generator's device (a CPU generator cannot draw on a GPU), then moved to the data
        noise = torch.randn((world * b, *x0.shape[1:]), generator=generator, device=generator.device)[mine]
        noise = noise.to(self.device)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (world * b,), generator=generator,
                          device=generator.device)[mine].to(self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        # the dropout mask of the global batch, applied to this rank's rows (world copies of them)
        ctx = Prior.drop_conditions(context.to(self.device)[:, None, :].repeat(world, 1, 1), drop, generator)[mine]
        pred = net(noisy, t, ctx).float()
        kind = self.cfg.model.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            target = self.scheduler.get_velocity(x0, noise, t)
        return torch.nn.functional.mse_loss(pred, target)

    def train_step(self, batch, step: int, backward) -> dict[str, float]:
        latents, context = batch
        # micro-batches of one step (gradient accumulation) must not share noise
        self._micro = self._micro + 1 if step == self._micro_step else 0
        self._micro_step = step
        g = step_generator(self.cfg.train.seed, 0, step, salt=self._micro)  # the global batch's stream
        loss = self._loss(latents, context, self.net, g, self.cfg.model.condition_dropout,
                          (self.dist.rank, self.dist.world_size))
        backward(loss, "prior")
        return {"loss": loss.item()}

    def after_step(self, step: int) -> dict[str, float]:
        self.ema.update_parameters(self.prior)
        return {}

    def validate(self, batches: Sequence) -> dict[str, float]:
        g = torch.Generator().manual_seed(12345)  # the same noise every validation, and none of the training RNG
        losses = [self._loss(lat, ctx, self.ema.module, g, 0.0).item() for lat, ctx in batches]
        return {"loss": sum(losses) / len(losses)}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}  # randomness comes from step_generator: nothing to restore

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass


@torch.no_grad()
def encode_dataset(autoencoder, dataset, device: torch.device, on_step: OnStep | None = None) -> torch.Tensor:
    """Quantised latents (N, C, x, y, z) of every subject of a dataset."""
    out = []
    for i in range(len(dataset)):
        x = torch.from_numpy(dataset.volume(i)[None, None].copy()).to(device)
        out.append(autoencoder.encode_quantized(x).cpu())
        if on_step is not None:
            on_step(i + 1, len(dataset), {"encode": dataset.subjects[i].label})
    return torch.cat(out)


def cached_latents(run_dir: Path, autoencoder, dataset, device, sha: str, on_step=None) -> torch.Tensor:
    """Latents of ``dataset``, from ``run_dir/latents.safetensors`` when it was made by the same
    autoencoder (``sha``) from the same subjects."""
    from safetensors.torch import load_file, save_file

    path = run_dir / "latents.safetensors"
    key = json.dumps({"autoencoder_sha256": sha, "subjects": dataset.labels, "data": dataset.fingerprint()},
                     sort_keys=True)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(path))["latents"]
    latents = encode_dataset(autoencoder, dataset, device, on_step)
    tmp = path.with_name(".latents.tmp")
    save_file({"latents": latents.contiguous()}, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return latents


def train_prior(bundle: str | Path, data: str | Path, out: str | Path, steps: int | None = None,
                resume: bool = False, config_file: Path | None = None, device: str | None = None,
                on_step: OnStep | None = None, extra_conditions: Sequence[str] = (),
                on_validate: OnValidate | None = None, schema_file: str | Path | None = None,
                init_from: str | Path | None = None) -> Path:
    """Train the prior on ``data`` with the autoencoder of ``bundle``; returns ``out/bundle``.
    ``init_from``: a bundle whose prior (same network configuration and conditions) the run starts
    from instead of a random initialisation (fine-tuning on a changed cohort); a resumed run goes on
    from its own checkpoint."""
    def setup(run: Run) -> StageSetup:
        return _prior_setup(run, bundle, data, extra_conditions, schema_file, init_from)

    return run_stage(PriorTraining, out, setup, steps=steps, resume=resume, config_file=config_file,
                     device=device, on_step=on_step, on_validate=on_validate)


def _prior_setup(run: Run, bundle: str | Path, data: str | Path, extra_conditions: Sequence[str],
                 schema_file: str | Path | None, init_from: str | Path | None = None) -> StageSetup:
    from synthbrain.bundle import copy_bundle, export_stage, load_bundle, read_config
    from synthbrain.data.bids import BIDSDataset, schema_for_dataset, split_subjects
    from synthbrain.population import PopulationModel

    cfg: PriorTraining = run.config
    src = load_bundle(bundle, device=str(run.device), components=("autoencoder",))
    schema = schema_for_dataset(data, extra_conditions, schema_file=schema_file)
    full = BIDSDataset(data, grid=src.grid, schema=schema)
    train_ids, val_ids = split_subjects(full.labels, cfg.train.val_fraction, cfg.train.seed)
    index = {lab: i for i, lab in enumerate(full.labels)}
    tr = torch.tensor([index[s] for s in train_ids])
    sha = src.config["autoencoder"].get("sha256", "")
    stage = scale = None
    init_info: dict = {}

    def prepare() -> None:
        full.prepare()
        cached_latents(run.dir, src.autoencoder, full, run.device, sha)

    def build():
        nonlocal stage, scale
        latents = cached_latents(run.dir, src.autoencoder, full, run.device, sha)
        conds = torch.stack([torch.from_numpy(full.conditions(i)) for i in range(len(full))])
        va = torch.tensor([index[s] for s in val_ids], dtype=torch.long)
        scale = 1.0 / float(latents[tr].std())
        prior = Prior(cfg.model, latent_shape=tuple(latents.shape[1:]), condition_width=schema.width)
        if init_from is not None:
            init_info.update(init_from_bundle(prior, init_from, "prior"))
        stage = PriorStage(prior, cfg, scale, run.device, run.dist)
        val_batches = [(latents[va[i:i + 16]], conds[va[i:i + 16]]) for i in range(0, len(va), 16)]
        return stage, lambda idx: (latents[tr[idx]], conds[tr[idx]]), len(tr), val_batches

    def export(out_bundle: Path, steps_trained: int, val: dict) -> None:
        copy_bundle(bundle, out_bundle)
        config = read_config(out_bundle)
        config["conditions"] = schema.to_dict()
        config["population"] = PopulationModel.fit([full.subjects[int(i)].values for i in tr], schema).to_dict()
        config["prior"] = {
            "config": cfg.model.to_dict(), "train": cfg.train.to_dict(), "ema_decay": cfg.ema_decay,
            "latent_scale_factor": scale, "steps_trained": steps_trained, "seed": cfg.train.seed,
            "command": command_line(), "commands": run_commands(run.dir), "config_file": run.config_file,
            "data_fingerprint": full.fingerprint(), "val_subjects": val_ids,
            "weights": "exponential moving average",
        }
        if init_info:
            config["prior"]["initialised_from"] = init_info
        export_stage(out_bundle, "prior", unwrap(stage.ema.module), config, run.dir, val, steps_trained)

    info = {"stage": "prior", "bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()),
            "train_subjects": train_ids, "val_subjects": val_ids, "conditions": schema.to_dict()}
    return StageSetup(info, prepare, build, export)
