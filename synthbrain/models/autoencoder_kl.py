"""Stage 1, KL flavour: MONAI's ``AutoencoderKL`` behind the same methods as the VQ-VAE.

The published UK Biobank brain LDM (Pinaya et al. 2022, MONAI model zoo) compresses a volume with a
KL-regularised autoencoder, not a VQ-VAE. :class:`KLAutoencoder` gives it the interface the rest of
SynthBrain calls on stage 1 (``encode``, ``quantize``, ``quantize_eval``, ``encode_quantized``,
``decode``, ``config.latent_shape``, ``config.compression``), so sampling, editing and reconstruction
take either autoencoder without asking which one it is. A KL latent is continuous: "quantising" it
is the identity, and encoding returns the posterior mean (deterministic; the LDM's training drew a
sample around it). There is no codebook, so code indices and codebook statistics do not exist.

Only loading (an imported bundle) is supported; SynthBrain trains the VQ-VAE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from synthbrain.errors import ConfigError

KIND = "kl"
# peak memory of an encode / decode in feature maps of its widest level (see encode_bytes, decode_bytes)
ENCODE_MAPS = 4.0
WHOLE_DECODE_MAPS = 4.0
SLICED_DECODE_OVERHEAD = 1.35


@dataclass(frozen=True)
class KLAutoencoderConfig:
    """``AutoencoderKL`` arguments (MONAI names). Each level after the first halves every axis."""

    kind: str = KIND
    channels: tuple[int, ...] = (64, 128, 128, 128)
    latent_channels: int = 3
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_levels: tuple[bool, ...] = (False, False, False, False)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if self.kind != KIND:
            raise ConfigError(f"a KL autoencoder config has kind {KIND!r}, got {self.kind!r}")
        if not self.channels or len(self.channels) > 6 or not 1 <= min(self.channels) <= max(self.channels) <= 1024:
            raise ConfigError(f"KL autoencoder channels must be 1..6 levels of 1..1024, got {self.channels}")
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError("KL autoencoder attention_levels needs one entry per channels level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(f"KL autoencoder channels {self.channels} must be multiples of norm_num_groups "
                              f"({self.norm_num_groups})")
        if not (1 <= self.latent_channels <= 256 and 1 <= self.num_res_blocks <= 16):
            raise ConfigError("KL autoencoder latent_channels must be in 1..256 and num_res_blocks in 1..16")
        if not (math.isfinite(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ConfigError(f"KL autoencoder norm_eps must be in (0, 1), got {self.norm_eps}")

    @property
    def downsampling(self) -> int:
        """Factor by which each axis shrinks (MONAI's AutoencoderKL halves at every level but the last)."""
        return 2 ** (len(self.channels) - 1)

    @property
    def embedding_dim(self) -> int:  # the latent's channels, under the VQ-VAE config's name
        return self.latent_channels

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(C, x, y, z) of the latent of a volume of spatial ``shape``."""
        f = self.downsampling
        if any(s % f for s in shape):
            raise ConfigError(f"volume shape {tuple(shape)} is not divisible by {f} (the autoencoder's downsampling)")
        return (self.latent_channels, *(s // f for s in shape))

    def compression(self, shape: tuple[int, ...]) -> dict:
        """Latent size relative to the volume (values / voxels); a continuous latent has no code bits."""
        c, *lat = self.latent_shape(shape)
        return {"latent_values_per_voxel": c * math.prod(lat) / math.prod(shape), "latent_shape": [c, *lat]}

    def feature_map_elements(self, shape: tuple[int, ...]) -> int:
        """Elements of the widest feature map of one volume's pass (the decoder's first level runs at
        full resolution with ``channels[0]`` channels)."""
        voxels = math.prod(shape)
        return max(c * voxels // (2 ** i) ** 3 for i, c in enumerate(self.channels))

    def _levels(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """(channels, voxels) of the encoder's levels, full resolution first (the decoder's in reverse)."""
        voxels = math.prod(shape)
        return [(c, voxels // (2 ** i) ** 3) for i, c in enumerate(self.channels)]

    def encode_bytes(self, shape: tuple[int, ...], batch: int = 1, element: int = 4) -> int:
        """Memory (bytes) an encode of ``batch`` volumes of spatial ``shape`` adds at its peak: about
        4 feature maps of its widest level (a residual block holds its input, the normalised input,
        its activation and the convolution's output). Measured on this architecture at 1 mm (channels
        16-32): 3.8 maps."""
        return int(ENCODE_MAPS * batch * element * max(c * v for c, v in self._levels(shape)))

    def decode_bytes(self, shape: tuple[int, ...], sliced: bool = False, lazy_bytes: int = 1 << 30,
                     batch: int = 1, element: int = 4) -> int:
        """Memory (bytes) a decode to volumes of spatial ``shape`` adds at its peak.

        Whole: 4 of its widest feature map (an upsampled map held with its normalised copy and
        activation; measured 3.3-3.75 at 1 mm, channels 8-32). Sliced (:mod:`synthbrain.models.sliced_decode`):
        at each level the block's input (the upsampled map, or where that is larger than ``lazy_bytes``
        the map before the upsampling) and two maps of the level's width, plus 35 % for slab temporaries
        (measured at 1 mm, channels 16-32: 1.03 GB where this gives 1.04, 1.71 where it gives 1.85).
        For the UK Biobank autoencoder at 1 mm: 10.9 GB whole, 4.2 GB sliced."""
        levels = list(reversed(self._levels(shape)))  # the decoder: latent resolution first
        per = batch * element
        if not sliced:
            maps = [c * v for c, v in levels]
            maps += [c * v2 for (c, _), (_, v2) in zip(levels, levels[1:])]  # each upsampling's output
            return int(WHOLE_DECODE_MAPS * per * max(maps))
        stages = [3 * levels[0][0] * levels[0][1]]
        for (c_in, v_in), (c, v) in zip(levels, levels[1:]):
            up = c_in * v  # the upsampling keeps its input's channels at the finer resolution
            held = c_in * v_in if up * per > lazy_bytes else up
            stages.append(held + 2 * c * v)
        return int(SLICED_DECODE_OVERHEAD * per * max(stages))

    def monai_kwargs(self) -> dict:
        d = asdict(self)
        d.pop("kind")
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, **d}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KLAutoencoderConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown KL autoencoder config keys: {sorted(unknown)}")
        return cls(**d)


class KLAutoencoder(nn.Module):
    """MONAI ``AutoencoderKL`` over (B, 1, X, Y, Z) volumes in [0, 1], with the VQ-VAE's methods."""

    def __init__(self, config: KLAutoencoderConfig = KLAutoencoderConfig()) -> None:
        super().__init__()
        from monai.networks.nets import AutoencoderKL

        self.config = config
        self.net = AutoencoderKL(**config.monai_kwargs())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> posterior mean (B, C, x, y, z)."""
        z_mu, _ = self.net.encode(x)
        return z_mu

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A continuous latent stays as it is (no codebook, no commitment loss)."""
        return z, z.new_zeros(())

    def quantize_eval(self, z: torch.Tensor) -> torch.Tensor:
        return z

    @torch.no_grad()
    def encode_quantized(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, x, y, z) -> volume (B, 1, X, Y, Z)."""
        return self.net.decode(q)

    # an upsampled feature map larger than this is recomputed rather than stored (sliced_decode)
    lazy_bytes: int = 1 << 30

    def decode_sliced(self, q: torch.Tensor, rows: int = 8, lazy_bytes: int | None = None) -> torch.Tensor:
        """:meth:`decode` in bounded memory, equal up to float rounding (synthbrain.models.sliced_decode);
        a decoder with blocks that cannot be sliced (attention) is decoded whole."""
        from synthbrain.models.sliced_decode import NotSliceable, sliced_decode

        try:
            return sliced_decode(self.net, q, rows=rows,
                                 lazy_bytes=self.lazy_bytes if lazy_bytes is None else lazy_bytes)
        except NotSliceable:
            return self.decode(q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction from the posterior mean, zero loss, latent), as the VQ-VAE returns."""
        z = self.encode(x)
        return self.decode(z), z.new_zeros(()), z

    def code_indices(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a KL autoencoder has a continuous latent: there are no codebook indices")

    def codebook_stats(self, indices: torch.Tensor) -> dict[str, float]:
        raise ConfigError("a KL autoencoder has no codebook")
