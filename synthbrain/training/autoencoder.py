"""Stage 1 training: the VQ-VAE on a BIDS dataset, exported as a model bundle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from synthbrain.errors import ConfigError
from synthbrain.models.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderLossConfig
from synthbrain.training.config import TrainConfig, config_sections
from synthbrain.training.distributed import DistContext, step_generator, unwrap
from synthbrain.training.loop import OnValidate, Run, StageSetup, init_from_bundle, run_stage
from synthbrain.training.run import command_line, run_commands

OnStep = Callable[[int, int, dict], None]
RESTART_EVERY = 20  # steps between dead-code restarts
VAL_DURING_TRAINING = 8  # held-out subjects validated during training (evaluate uses all)


@dataclass(frozen=True)
class AutoencoderTraining:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=20000, batch_size=1, lr=3e-4,
                                                                    warmup_steps=200, val_every=500,
                                                                    ckpt_every=200))
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderTraining:
        return config_sections(cls, d)

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "model": self.model.to_dict(), "loss": self.loss.to_dict()}


class AutoencoderStage:
    """L1 + spectral (JukeboxLoss) + SSIM + commitment, and an optional patch-GAN after a warm-up."""

    def __init__(self, model: Autoencoder, cfg: AutoencoderTraining, device: torch.device, dist: DistContext) -> None:
        from monai.losses import JukeboxLoss, PatchAdversarialLoss, SSIMLoss
        from monai.networks.nets import PatchDiscriminator

        self.cfg, self.device, self.dist = cfg, device, dist
        self.model = model.to(device)
        self.net = net = dist.wrap(self.model, device)
        self.networks: dict[str, torch.nn.Module] = {"autoencoder": net}
        t = cfg.train
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "autoencoder": torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)}
        self.l1 = torch.nn.L1Loss()
        self.spectral = JukeboxLoss(spatial_dims=3)
        self.ssim = SSIMLoss(spatial_dims=3, data_range=1.0)
        self.disc = None
        if cfg.loss.adversarial > 0:
            d = PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=cfg.loss.discriminator_channels,
                                   in_channels=1, out_channels=1).to(device)
            self.disc = dist.wrap(d, device)
            self.networks["discriminator"] = self.disc
            self.optimizers["discriminator"] = torch.optim.AdamW(d.parameters(), lr=cfg.loss.discriminator_lr)
            self.adv = PatchAdversarialLoss(criterion="least_squares")
        self._last_z: torch.Tensor | None = None

    def _adversarial_on(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.loss.adversarial_start

    def train_step(self, batch: torch.Tensor, step: int, backward) -> dict[str, float]:
        w = self.cfg.loss
        x = batch.to(self.device, non_blocking=True)
        recon, q_loss, z = self.net(x)
        recon = recon.float()
        l1 = self.l1(recon, x)
        spec = self.spectral(recon, x)
        loss = w.l1 * l1 + w.spectral * spec + q_loss
        logs = {"l1": l1.item(), "spectral": spec.item(), "commitment": q_loss.item()}
        if w.ssim > 0:
            ssim = self.ssim(recon, x)
            loss = loss + w.ssim * ssim
            logs["ssim_loss"] = ssim.item()
        if self._adversarial_on(step):
            # the generator's term goes through the bare discriminator (frozen): DDP would otherwise wait
            # for discriminator gradients that this backward pass never produces
            disc = unwrap(self.disc)
            disc.requires_grad_(False)
            g_adv = self.adv(disc(recon)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + w.adversarial * g_adv
            logs["g_adv"] = g_adv.item()
        backward(loss, "autoencoder")
        if self._adversarial_on(step):
            unwrap(self.disc).requires_grad_(True)
            d_loss = 0.5 * (self.adv(self.disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
                            + self.adv(self.disc(x)[-1], target_is_real=True, for_discriminator=True))
            backward(w.adversarial * d_loss, "discriminator")
            logs["d_loss"] = d_loss.item()
        logs["loss"] = loss.item()
        logs["perplexity"] = float(unwrap(self.net).net.quantizer.perplexity)
        self._last_z = z.detach()
        return logs

    def after_step(self, step: int) -> dict[str, float]:
        # step 0 included: the codebook starts from encoder outputs instead of N(0, 1) noise
        if step % RESTART_EVERY or self._last_z is None:
            return {}
        # every rank restarts from the global batch's latents with rank 0's stream: the codebook stays the
        # same on every rank, and the one a single process with the whole global batch would make
        z = self.dist.all_gather_cat(self._last_z)
        g = step_generator(self.cfg.train.seed, 0, step, salt=1)
        return {"codes_restarted": float(self.model.restart_dead_codes(z, g))}

    def validate(self, batches: Sequence[torch.Tensor]) -> dict[str, float]:
        from synthbrain.metrics import reconstruction_metrics

        rows, indices = [], []
        for x in batches:
            x = x.to(self.device)
            recon = self.model.decode(self.model.quantize_eval(self.model.encode(x))).float()
            rows.append(reconstruction_metrics(recon, x, ms_ssim=False))
            indices.append(self.model.code_indices(x))
        out = {k: float(sum(r[k] for r in rows) / len(rows)) for k in rows[0]}
        out.update(self.model.codebook_stats(torch.cat([i.reshape(-1) for i in indices])))
        return out

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}  # randomness comes from step_generator: nothing to restore

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass


def load_volumes(dataset, indices: Sequence[int]) -> torch.Tensor:
    """Preprocessed volumes of ``indices`` as one (N, 1, X, Y, Z) float32 tensor in memory."""
    return torch.stack([torch.from_numpy(dataset.volume(i)[None].copy()) for i in indices])


def train_autoencoder(data: str | Path, out: str | Path, grid: str = "demo", steps: int | None = None,
                      resume: bool = False, config_file: Path | None = None, device: str | None = None,
                      on_step: OnStep | None = None, extra_conditions: Sequence[str] = (),
                      on_validate: OnValidate | None = None, schema_file: str | Path | None = None,
                      init_from: str | Path | None = None) -> Path:
    """Train the VQ-VAE on a BIDS dataset; returns the exported bundle folder ``out/bundle``.
    ``init_from``: a bundle whose autoencoder (same configuration) the run starts from (fine-tuning on
    a changed cohort); a resumed run goes on from its own checkpoint."""
    from synthbrain.grids import get_grid

    def check(cfg: AutoencoderTraining) -> None:
        try:
            cfg.model.check_size_budget(get_grid(grid).shape)
        except ConfigError as e:
            raise ConfigError(f"grid {grid}: {e}") from None

    def setup(run: Run) -> StageSetup:
        return _autoencoder_setup(run, data, grid, extra_conditions, schema_file, init_from)

    return run_stage(AutoencoderTraining, out, setup, steps=steps, resume=resume, config_file=config_file,
                     device=device, on_step=on_step, on_validate=on_validate, check=check)


def _autoencoder_setup(run: Run, data: str | Path, grid: str, extra_conditions: Sequence[str],
                       schema_file: str | Path | None, init_from: str | Path | None = None) -> StageSetup:
    from synthbrain.bundle import export_stage, new_config
    from synthbrain.data.bids import BIDSDataset, schema_for_dataset, split_subjects

    cfg: AutoencoderTraining = run.config
    schema = schema_for_dataset(data, extra_conditions, schema_file=schema_file)
    probe = BIDSDataset(data, grid=grid, schema=schema)
    train_ids, val_ids = split_subjects(probe.labels, cfg.train.val_fraction, cfg.train.seed)
    train_ds = BIDSDataset(data, grid=grid, schema=schema, subjects=train_ids)
    val_ds = BIDSDataset(data, grid=grid, schema=schema, subjects=val_ids) if val_ids else None
    model = None
    init_info: dict = {}

    def build():
        nonlocal model
        train_vols = load_volumes(train_ds, range(len(train_ds)))
        val_vols = load_volumes(val_ds, range(len(val_ds))) if val_ds else torch.empty(0)
        model = Autoencoder(cfg.model)
        if init_from is not None:
            init_info.update(init_from_bundle(model, init_from, "autoencoder"))
        stage = AutoencoderStage(model, cfg, run.device, run.dist)
        return (stage, lambda idx: train_vols[idx], len(train_vols),
                [v[None] for v in val_vols[:VAL_DURING_TRAINING]])

    def export(bundle_dir: Path, steps_trained: int, val: dict) -> None:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        config = new_config(train_ds.grid, schema, name=f"synthbrain-{grid}")
        config["autoencoder"] = {
            "config": cfg.model.to_dict(), "loss": cfg.loss.to_dict(), "train": cfg.train.to_dict(),
            "steps_trained": steps_trained, "seed": cfg.train.seed, "command": command_line(),
            "commands": run_commands(run.dir), "config_file": run.config_file,
            "data_fingerprint": train_ds.fingerprint(), "val_subjects": val_ids,
            "compression": cfg.model.compression(train_ds.grid.shape),
        }
        if init_info:
            config["autoencoder"]["initialised_from"] = init_info
        export_stage(bundle_dir, "autoencoder", model, config, run.dir, val, steps_trained)

    info = {"stage": "autoencoder", "data": str(Path(data).resolve()), "grid": grid,
            "train_subjects": train_ids, "val_subjects": val_ids, "conditions": schema.to_dict()}
    return StageSetup(info, probe.prepare, build, export)
