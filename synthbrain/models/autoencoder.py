"""Stage 1: the VQ-VAE autoencoder, a thin wrapper over MONAI's ``VQVAE``.

A volume (B, 1, X, Y, Z) in [0, 1] is encoded to a latent grid ``prod(strides)`` times smaller per
axis with ``embedding_dim`` channels, snapped to the nearest of ``num_embeddings`` codebook vectors
(EMA codebook, MONAI's ``EMAQuantizer``) and decoded back. Each level of ``channels`` is one
convolution of stride 2 (kernel 4) or 1 (kernel 3) followed by residual layers.

The size budget is the encoded size: one code index of ceil(log2 num_embeddings) bits per latent
position must come to at most ``MAX_CODE_BITS_FRACTION`` (1 %) of the bits of the same volume stored
as 16-bit integers. A config over it is refused before anything is trained. With the old default
(8x per axis) the demo grid 80 x 112 x 80 became 1,400 indices of 9 bits (0.11 %); 4x per axis
gives 20 x 28 x 20 = 11,200 indices, 0.88 % with 512 codes and 0.98 % with 1,024.

Dead codes (EMA usage below a threshold) are restarted from random encoder outputs of the current
batch, as in Dhariwal et al. 2020 (Jukebox); MONAI's quantiser does not do it itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from synthbrain.errors import ConfigError

MAX_CODE_BITS_FRACTION = 0.01  # code-index bits / bits of the volume as 16-bit integers


@dataclass(frozen=True)
class AutoencoderConfig:
    channels: tuple[int, ...] = (32, 64, 128)     # per level: one strided convolution, then residual layers
    num_res_layers: int = 1
    num_res_channels: tuple[int, ...] = (32, 64, 128)
    strides: tuple[int, ...] | None = None        # per level, 1 or 2; None: 2 at every level
    num_embeddings: int = 512                     # codebook size
    embedding_dim: int = 4                        # latent channels
    commitment_cost: float = 0.25
    decay: float = 0.99                           # EMA decay of the codebook
    dead_code_threshold: float = 0.01             # EMA uses per step below which a code is restarted

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "num_res_channels", tuple(int(c) for c in self.num_res_channels))
        strides = (2,) * len(self.channels) if self.strides is None else tuple(int(s) for s in self.strides)
        object.__setattr__(self, "strides", strides)
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"autoencoder channels must be positive, got {self.channels}")
        if len(self.num_res_channels) != len(self.channels):
            raise ConfigError("num_res_channels must have one entry per level (as many as channels)")
        if len(strides) != len(self.channels) or not set(strides) <= {1, 2}:
            raise ConfigError(f"autoencoder strides must be 1 or 2, one per level of channels, got {list(strides)}")
        if len(self.channels) > 6 or max(self.channels) > 1024 or max(self.num_res_channels) > 1024:
            raise ConfigError(f"autoencoder channels must be at most 6 levels of at most 1024, got {self.channels}")
        if min(self.num_res_channels) < 1 or not 0 <= self.num_res_layers <= 16:
            raise ConfigError("autoencoder num_res_channels must be positive and num_res_layers in 0..16")
        if not (2 <= self.num_embeddings <= 65536 and 1 <= self.embedding_dim <= 256):
            raise ConfigError(f"num_embeddings must be in 2..65536 and embedding_dim in 1..256, got "
                              f"{self.num_embeddings} and {self.embedding_dim}")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"decay must be in (0, 1), got {self.decay}")
        if not (math.isfinite(self.commitment_cost) and self.commitment_cost >= 0 and self.dead_code_threshold >= 0):
            raise ConfigError("commitment_cost and dead_code_threshold must be finite and >= 0")

    @property
    def downsampling(self) -> int:
        """Factor by which each axis shrinks."""
        return math.prod(self.strides)

    @property
    def code_bits(self) -> int:
        """Bits of one code index: ceil(log2 num_embeddings)."""
        return math.ceil(math.log2(self.num_embeddings))

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(C, x, y, z) of the latent of a volume of spatial ``shape``."""
        f = self.downsampling
        if any(s % f for s in shape):
            raise ConfigError(f"volume shape {tuple(shape)} is not divisible by {f} (the autoencoder's downsampling)")
        return (self.embedding_dim, *(s // f for s in shape))

    def compression(self, shape: tuple[int, ...]) -> dict[str, float]:
        """Latent size relative to the volume: values / voxels, and code bits / 16-bit voxel bits."""
        c, *lat = self.latent_shape(shape)
        voxels = math.prod(shape)
        codes = math.prod(lat)
        return {"latent_values_per_voxel": c * codes / voxels,
                "latent_bits_per_volume_bits": codes * self.code_bits / (16 * voxels),
                "code_bits": codes * self.code_bits, "volume_bits": 16 * voxels,
                "latent_shape": [c, *lat]}

    def check_size_budget(self, shape: tuple[int, ...]) -> dict[str, float]:
        """:meth:`compression` of a volume of spatial ``shape``; ConfigError when the code bits exceed
        :data:`MAX_CODE_BITS_FRACTION` of the 16-bit volume (the message gives the size)."""
        comp = self.compression(shape)
        if comp["latent_bits_per_volume_bits"] > MAX_CODE_BITS_FRACTION:
            lat = "x".join(map(str, comp["latent_shape"][1:]))
            raise ConfigError(
                f"autoencoder over the size budget: {lat} code indices of {self.code_bits} bits = "
                f"{comp['code_bits']:,} bits, {100 * comp['latent_bits_per_volume_bits']:.2f} % of the "
                f"{comp['volume_bits']:,} bits of a 16-bit {'x'.join(map(str, shape))} volume "
                f"(at most {100 * MAX_CODE_BITS_FRACTION:g} %); use fewer codes or more downsampling")
        return comp

    def feature_map_elements(self, shape: tuple[int, ...]) -> int:
        """Elements of the widest feature map of one volume's pass (a level's channels at its resolution)."""
        voxels, widest, scale = math.prod(shape), 0, 1
        for c, r, st in zip(self.channels, self.num_res_channels, self.strides):
            scale *= st
            widest = max(widest, max(c, r) * voxels // scale**3)
        return widest

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown autoencoder config keys: {sorted(unknown)}")
        return cls(**d)


class Autoencoder(nn.Module):
    """VQ-VAE over (B, 1, X, Y, Z) volumes; see the module docstring."""

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig(), spatial_dims: int = 3) -> None:
        super().__init__()
        from monai.networks.nets import VQVAE

        self.config = config
        down = tuple((2, 4, 1, 1) if s == 2 else (1, 3, 1, 1) for s in config.strides)
        # the decoder runs the levels in reverse; a stride-2 transposed convolution of kernel 4 and padding 1
        # exactly doubles, a stride-1 one of kernel 3 keeps the size
        up = tuple((2, 4, 1, 1, 0) if s == 2 else (1, 3, 1, 1, 0) for s in reversed(config.strides))
        self.net = VQVAE(
            spatial_dims=spatial_dims, in_channels=1, out_channels=1,
            channels=config.channels, num_res_layers=config.num_res_layers,
            num_res_channels=config.num_res_channels,
            downsample_parameters=down, upsample_parameters=up,
            num_embeddings=config.num_embeddings, embedding_dim=config.embedding_dim,
            commitment_cost=config.commitment_cost, decay=config.decay,
            ddp_sync=True,
        )

    @property
    def quantizer(self):
        return self.net.quantizer.quantizer  # MONAI's EMAQuantizer

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> continuous latent (B, C, x, y, z), before quantisation."""
        return self.net.encode(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous latent -> (quantised latent, commitment loss). Updates the EMA codebook in training."""
        q, loss = self.net.quantize(z)
        return q, loss

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """(Quantised) latent (B, C, x, y, z) -> volume (B, 1, X, Y, Z)."""
        return self.net.decode(q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction, commitment loss, continuous latent)."""
        z = self.encode(x)
        q, loss = self.quantize(z)
        return self.decode(q), loss, z

    @torch.no_grad()
    def encode_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """Volume -> quantised latent, without touching the codebook (eval-mode quantisation)."""
        return self.quantize_eval(self.encode(x))

    @torch.no_grad()
    def quantize_eval(self, z: torch.Tensor) -> torch.Tensor:
        """Snap a latent to the codebook without updating it (also in training mode)."""
        q = self.quantizer
        _, _, idx = q.quantize(z)
        return q.embed(idx)

    @torch.no_grad()
    def code_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Volume -> (B, x, y, z) int64 codebook indices."""
        _, _, idx = self.quantizer.quantize(self.encode(x))
        return idx

    @torch.no_grad()
    def codebook_stats(self, indices: torch.Tensor) -> dict[str, float]:
        """Usage (share of codes used) and perplexity of a set of code indices."""
        n = self.config.num_embeddings
        counts = torch.bincount(indices.reshape(-1), minlength=n).double()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-12)).sum())
        return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(perplexity)}

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace codes whose EMA usage fell below the threshold by random encoder outputs of ``z``.

        Returns how many were restarted (a 0-dim tensor on the codebook's device). The indices are drawn
        on the generator's device and then moved to ``z``'s (a CPU generator cannot draw on a GPU), one per
        code, and the update is a masked select: no host synchronisation, and it runs on any device
        (``meta`` included). Under DDP, rank 0's codebook is broadcast afterwards.
        """
        q = self.quantizer
        dead = q.ema_cluster_size < self.config.dead_code_threshold              # (K,)
        flat = z.detach().float().movedim(1, -1).reshape(-1, q.embedding_dim)    # (B*x*y*z, D)
        pick = random_indices(flat.shape[0], q.num_embeddings, generator).to(flat.device)
        new = flat[pick].to(q.embedding.weight.dtype)                            # (K, D)
        # a restarted code starts just above the threshold: kept where we put it by the EMA
        # normalisation, and dead again after ~70 steps if no encoder output picks it
        size = torch.where(dead, torch.full_like(q.ema_cluster_size, 2.0 * self.config.dead_code_threshold),
                           q.ema_cluster_size)
        n = size.sum()
        weights = (size + q.epsilon) / (n + q.num_embeddings * q.epsilon) * n
        q.embedding.weight.data.copy_(torch.where(dead[:, None], new, q.embedding.weight.data))
        q.ema_w.data.copy_(torch.where(dead[:, None], new * weights[:, None], q.ema_w.data))
        q.ema_cluster_size.data.copy_(size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (q.embedding.weight.data, q.ema_cluster_size.data, q.ema_w.data):
                torch.distributed.broadcast(t, src=0)
        return dead.sum()


def random_indices(high: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` int64 indices in [0, high), drawn on the generator's device (CPU without one); the caller
    moves them to its data. PyTorch refuses a CPU generator for a CUDA draw, so a draw never names
    the data's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, (n,), generator=generator, device=device)


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Offline-safe losses: no pretrained network is needed (none can be downloaded here)."""

    l1: float = 1.0
    spectral: float = 0.1        # MONAI JukeboxLoss: L1 between FFT magnitudes
    ssim: float = 0.0            # MONAI SSIMLoss (1 - SSIM); ~10 s a step on 2 CPU cores at 2 mm, so off there
    adversarial: float = 0.0     # MONAI PatchDiscriminator + least-squares PatchAdversarialLoss
    adversarial_start: int = 2000  # step after which the adversarial term is switched on
    discriminator_lr: float = 1e-4
    discriminator_channels: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def autoencoder_config_from_dict(d: dict):
    """The stage-1 config of a bundle's ``autoencoder.config``: the VQ-VAE's, or with ``kind: kl`` a KL
    autoencoder's (an imported MONAI ``AutoencoderKL``, see synthbrain.models.autoencoder_kl)."""
    if isinstance(d, dict) and "kind" in d:
        from synthbrain.models.autoencoder_kl import KIND, KLAutoencoderConfig

        if d["kind"] != KIND:
            raise ConfigError(f"unknown autoencoder kind {d['kind']!r} (known: {KIND!r}, or none for the VQ-VAE)")
        return KLAutoencoderConfig.from_dict(d)
    return AutoencoderConfig.from_dict(d)


def build_autoencoder(config) -> nn.Module:
    """The stage-1 network of a config from :func:`autoencoder_config_from_dict`."""
    if isinstance(config, AutoencoderConfig):
        return Autoencoder(config)
    from synthbrain.models.autoencoder_kl import KLAutoencoder

    return KLAutoencoder(config)
