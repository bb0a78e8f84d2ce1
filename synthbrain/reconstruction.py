"""Real scan -> preprocessed volume -> stage-1 reconstruction (VQ-VAE or KL autoencoder), with quality and
compression figures. The scan is preprocessed by the bundle's own intensity convention (config.json
``intensity``: brain-extracted and percentile-scaled for SynthBrain's bundles, whole head and min-max for
an imported model-zoo LDM)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from synthbrain.io import Volume


@dataclass(frozen=True, eq=False)
class Reconstruction:
    original: Volume        # preprocessed onto the bundle's grid, [0, 1]
    reconstruction: Volume  # decoded from the quantised latent, [0, 1]
    latent: np.ndarray      # (C, x, y, z) quantised latent (a KL autoencoder's: the posterior mean)
    indices: np.ndarray | None  # (x, y, z) codebook indices; None for a KL autoencoder (no codebook)
    metrics: dict           # psnr (dB), ssim, ms_ssim, mae, psnr_brain (dB)
    compression: dict       # latent values per voxel, code bits per 16-bit voxel bits, latent shape

    @property
    def difference(self) -> Volume:
        """Reconstruction minus original (same grid)."""
        return Volume(self.reconstruction.data - self.original.data, self.original.affine, source="difference")


@torch.inference_mode()
def reconstruct(
    bundle, volume: Volume, device: str | torch.device = "cpu", preprocessed: bool = False,
    decode: str = "auto",
) -> Reconstruction:
    """Preprocess ``volume`` onto the bundle's grid (unless ``preprocessed``), encode, quantise, decode.

    A volume that is not ready for the bundle is refused first (:class:`~synthbrain.errors.UnpreparedVolumeError`):
    for SynthBrain's bundles a brain-extracted T1 in MNI space (saying to run ``synthbrain prepare``), for a
    whole-head bundle a T1 aligned to MNI space (skull and scalp expected). So is one this machine has too
    little memory to encode and decode (:class:`~synthbrain.errors.InsufficientMemoryError`), before any
    work. ``decode``: as :class:`synthbrain.sampling.Generator`'s (``auto``: a KL autoencoder decodes in
    slabs on a CPU at 1 mm)."""
    from synthbrain.data.prepare import require_prepared
    from synthbrain.data.preprocess import is_whole_head, preprocess
    from synthbrain.memory import decode_bytes, encode_bytes, require_memory
    from synthbrain.metrics import reconstruction_metrics
    from synthbrain.models.autoencoder_kl import KIND as KL
    from synthbrain.sampling import resolve_decode

    grid = bundle.grid
    device = torch.device(device)
    intensity = bundle.config.get("intensity")
    whole_head = is_whole_head(intensity)
    ae = bundle.autoencoder
    sliced = resolve_decode(ae, device, grid, decode)
    # encode and decode run one after the other: the larger of the two is what must be free
    require_memory(max(encode_bytes(ae.config, grid.shape), decode_bytes(ae.config, grid.shape, sliced=sliced)),
                   device, f"reconstructing a {grid.name}-grid ({' x '.join(map(str, grid.shape))}) volume")
    if not preprocessed:
        require_prepared(volume, grid, whole_head=whole_head)
    pre = volume if preprocessed else preprocess(volume, grid, intensity)[0]
    ae = ae.to(device).eval()
    x = torch.from_numpy(pre.data[None, None].copy()).to(device)
    z = ae.encode(x)
    q = ae.quantize_eval(z)
    idx = None if getattr(ae.config, "kind", None) == KL else ae.code_indices(x)  # a KL latent has no codes
    rec = (ae.decode_sliced(q) if sliced else ae.decode(q)).float().clamp(0.0, 1.0)
    metrics = reconstruction_metrics(rec, x)
    return Reconstruction(original=Volume(pre.data, grid.affine, source=volume.source),
                          reconstruction=Volume(rec[0, 0].cpu().numpy(), grid.affine, source="reconstruction"),
                          latent=q[0].cpu().numpy(), indices=None if idx is None else idx[0].cpu().numpy(),
                          metrics=metrics,
                          compression=ae.config.compression(grid.shape))
