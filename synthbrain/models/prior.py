"""Stage 2: the conditional latent prior, MONAI's ``DiffusionModelUNet`` with MONAI schedulers.

The prior denoises VQ-VAE latents (C, x, y, z), multiplied by a scale factor that gives them unit
variance (computed once from the training latents and saved in the bundle). As in the MONAI brain
LDM, the condition vector enters twice: as extra input channels (broadcast over the latent grid) and
as the cross-attention context (B, 1, W). During training it is replaced by ``NULL_VALUE`` (-1, the
fill value MONAI's ``DiffusionInferer`` uses) with probability ``condition_dropout``, so the same
network also predicts unconditionally and classifier-free guidance works at sampling.

The latent is zero-padded to a multiple of the UNet's downsampling (10 x 14 x 10 -> 12 x 16 x 12 on
the demo grid) and cropped back after denoising, as ``LatentDiffusionInferer`` does with
``ldm_latent_shape``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from synthbrain.conditions import NULL_VALUE
from synthbrain.errors import ConfigError


@dataclass(frozen=True)
class PriorConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int | tuple[int, ...] = 32   # one for all levels, or one per level (0 where no attention)
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"     # as the MONAI brain LDM
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "v_prediction"    # v keeps few-step sampling stable
    condition_dropout: float = 0.15
    default_steps: int = 4                   # DPM-Solver++ steps when none are asked for
    default_guidance: float = 2.0
    # MONAI DiffusionModelUNet arguments the published UK Biobank LDM sets (defaults: MONAI's)
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    transformer_num_layers: int = 1
    upcast_attention: bool = False
    # False: trained with the conditions always present (condition_dropout 0), so there is no
    # unconditional prediction and guidance is fixed at 1 (one forward pass per step)
    classifier_free_guidance: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        heads = self.num_head_channels
        heads = int(heads) if isinstance(heads, (int, float)) else tuple(int(h) for h in heads)
        object.__setattr__(self, "num_head_channels", heads)
        if len(self.channels) != len(self.attention_levels):
            raise ConfigError("prior attention_levels needs one entry per channels level")
        if not self.channels or len(self.channels) > 6 or not 1 <= min(self.channels) <= max(self.channels) <= 2048:
            raise ConfigError(f"prior channels must be 1..6 levels of 1..2048, got {self.channels}")
        per_level = heads if isinstance(heads, tuple) else (heads,) * len(self.channels)
        if len(per_level) != len(self.channels) or any(
                not (1 <= h <= 1024 if a else 0 <= h <= 1024) for h, a in zip(per_level, self.attention_levels)):
            raise ConfigError(f"prior num_head_channels must be one number or one per level, in 1..1024 at levels "
                              f"with attention, got {heads}")
        if not (1 <= self.num_res_blocks <= 8 and self.norm_num_groups >= 1 and 1 <= self.transformer_num_layers <= 8):
            raise ConfigError("prior num_res_blocks must be in 1..8, transformer_num_layers in 1..8 and "
                              "norm_num_groups >= 1")
        if not (math.isfinite(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ConfigError(f"prior norm_eps must be in (0, 1), got {self.norm_eps}")
        if not self.classifier_free_guidance and (self.condition_dropout != 0 or self.default_guidance != 1.0):
            raise ConfigError("a prior without classifier-free guidance has condition_dropout 0 and "
                              "default_guidance 1")
        if not 1 <= self.num_train_timesteps <= 100_000:
            raise ConfigError(f"num_train_timesteps must be in 1..100000, got {self.num_train_timesteps}")
        if self.schedule not in ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"):
            raise ConfigError(f"schedule must be one of MONAI's linear_beta, scaled_linear_beta, sigmoid_beta, "
                              f"cosine; got {self.schedule!r}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(f"the noise schedule needs 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                              f"{self.beta_end}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(f"prior channels {self.channels} must be multiples of norm_num_groups "
                              f"({self.norm_num_groups})")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError("condition_dropout must be in [0, 1)")
        if not 1 <= self.default_steps <= self.num_train_timesteps:
            raise ConfigError(f"default_steps must be in 1..{self.num_train_timesteps}, got {self.default_steps}")
        if not 0.0 <= self.default_guidance <= 20.0:
            raise ConfigError(f"default_guidance must be in 0..20, got {self.default_guidance}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def padded_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        f = self.downsampling
        return tuple(int(math.ceil(s / f) * f) for s in spatial)

    def scheduler_kwargs(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "schedule": self.schedule,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "prediction_type": self.prediction_type}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PriorConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown prior config keys: {sorted(unknown)}")
        return cls(**d)


class Prior(nn.Module):
    """Conditional denoiser over padded latents: ``forward(x, timesteps, context)`` as MONAI's
    inferers call a diffusion model (``context`` is (B, 1, W), NULL_VALUE meaning unconditional)."""

    def __init__(self, config: PriorConfig, latent_shape: tuple[int, ...], condition_width: int) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.config = config
        self.latent_shape = tuple(latent_shape)          # (C, x, y, z) of the autoencoder
        self.condition_width = condition_width
        c = latent_shape[0]
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=c + condition_width, out_channels=c,
            channels=config.channels, attention_levels=config.attention_levels,
            num_res_blocks=config.num_res_blocks, num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_num_groups, with_conditioning=True,
            cross_attention_dim=condition_width, norm_eps=config.norm_eps, resblock_updown=config.resblock_updown,
            transformer_num_layers=config.transformer_num_layers, upcast_attention=config.upcast_attention,
        )

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return (self.latent_shape[0], *self.config.padded_shape(self.latent_shape[1:]))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, C, X, Y, Z) padded latent; context (B, 1, W)
        cond = context[:, 0, :, None, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)
        return self.unet(torch.cat([x, cond], dim=1), timesteps=timesteps, context=context.to(x.dtype))

    def pad(self, z: torch.Tensor) -> torch.Tensor:
        """Zero-pad a latent (B, C, x, y, z) to the UNet's shape, with MONAI's SpatialPad (symmetric),
        as LatentDiffusionInferer does with ``ldm_latent_shape``."""
        from monai.transforms import SpatialPad

        return _batched(SpatialPad(self.padded_shape[1:], method="symmetric"), z)

    def crop(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad`: MONAI's CenterSpatialCrop back to the autoencoder's latent shape."""
        from monai.transforms import CenterSpatialCrop

        return _batched(CenterSpatialCrop(self.latent_shape[1:]), z)

    @staticmethod
    def drop_conditions(context: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each sample's condition vector by NULL_VALUE with probability ``p`` (for CFG)."""
        if p <= 0:
            return context
        where = generator.device if generator is not None else context.device  # a generator draws on its own device
        drop = torch.rand(context.shape[0], generator=generator, device=where).to(context.device) < p
        return torch.where(drop[:, None, None], torch.full_like(context, NULL_VALUE), context)


def _batched(transform, z: torch.Tensor) -> torch.Tensor:
    """Apply a channel-first MONAI array transform to a (B, C, ...) batch (batch folded into channels)."""
    from monai.utils import convert_to_tensor

    b, c = z.shape[:2]
    out = convert_to_tensor(transform(z.reshape(b * c, *z.shape[2:])), track_meta=False)
    return out.reshape(b, c, *out.shape[1:])
