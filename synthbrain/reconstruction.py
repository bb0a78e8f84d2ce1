"""Real scan -> preprocessed volume -> VQ-VAE reconstruction, with quality and compression figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from synthbrain.io import Volume


@dataclass(frozen=True, eq=False)
class Reconstruction:
    original: Volume        # preprocessed onto the bundle's grid, [0, 1]
    reconstruction: Volume  # decoded from the quantised latent, [0, 1]
    latent: np.ndarray      # (C, x, y, z) quantised latent
    indices: np.ndarray     # (x, y, z) codebook indices
    metrics: dict           # psnr (dB), ssim, ms_ssim, mae, psnr_brain (dB)
    compression: dict       # latent values per voxel, code bits per 16-bit voxel bits, latent shape

    @property
    def difference(self) -> Volume:
        """Reconstruction minus original (same grid)."""
        return Volume(self.reconstruction.data - self.original.data, self.original.affine, source="difference")


@torch.inference_mode()
def reconstruct(
    bundle, volume: Volume, device: str | torch.device = "cpu", preprocessed: bool = False
) -> Reconstruction:
    """Preprocess ``volume`` onto the bundle's grid (unless ``preprocessed``), encode, quantise, decode.

    A volume that is not a brain-extracted T1 in MNI space is refused first
    (:class:`~synthbrain.errors.UnpreparedVolumeError`, saying to run ``synthbrain prepare``)."""
    from synthbrain.data.prepare import require_prepared
    from synthbrain.data.preprocess import preprocess
    from synthbrain.metrics import reconstruction_metrics

    grid = bundle.grid
    if not preprocessed:
        require_prepared(volume, grid)
    pre = volume if preprocessed else preprocess(volume, grid)[0]
    ae = bundle.autoencoder.to(device).eval()
    x = torch.from_numpy(pre.data[None, None].copy()).to(device)
    z = ae.encode(x)
    q = ae.quantize_eval(z)
    idx = ae.code_indices(x)
    rec = ae.decode(q).float().clamp(0.0, 1.0)
    metrics = reconstruction_metrics(rec, x)
    return Reconstruction(original=Volume(pre.data, grid.affine, source=volume.source),
                          reconstruction=Volume(rec[0, 0].cpu().numpy(), grid.affine, source="reconstruction"),
                          latent=q[0].cpu().numpy(), indices=idx[0].cpu().numpy(), metrics=metrics,
                          compression=ae.config.compression(grid.shape))
