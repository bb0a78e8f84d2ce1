"""Image-quality and generation metrics, on MONAI's implementations.

Volumes are (B, 1, X, Y, Z) tensors in [0, 1] (data range 1). PSNR and SSIM are over the whole volume
(as in the brain-LDM literature); ``psnr_brain`` and ``ssim_brain`` only over voxels where the target is
non-zero (the background is easy and flatters whole-volume figures: these are the headline).
MS-SSIM uses a 5-voxel Gaussian window (sigma 1.5) and the standard five scale weights (Wang et al.
2003), so that an 80-voxel axis fits all five; smaller volumes use as many scales as fit, with the
weights renormalised (the number is reported as ``ms_ssim_scales``).
"""

from __future__ import annotations

import numpy as np
import torch

MS_SSIM_KERNEL = 5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_metric(shape: tuple[int, ...]):
    """MONAI's MultiScaleSSIMMetric with as many of the five scales as ``shape`` allows (None if < 2)."""
    from monai.metrics import MultiScaleSSIMMetric

    smallest = min(shape)
    n = len(MS_SSIM_WEIGHTS)
    while n > 1 and smallest <= (MS_SSIM_KERNEL - 1) * 2 ** (n - 1):
        n -= 1
    if n < 2:
        return None
    w = MS_SSIM_WEIGHTS[:n]
    return MultiScaleSSIMMetric(spatial_dims=len(shape), data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                                weights=tuple(v / sum(w) for v in w))


def reconstruction_metrics(recon: torch.Tensor, target: torch.Tensor, ms_ssim: bool = True) -> dict[str, float]:
    """Mean PSNR (dB), SSIM, MS-SSIM, MAE and brain PSNR (dB) of a batch of reconstructions."""
    from monai.metrics import PSNRMetric, SSIMMetric

    recon = recon.detach().float().clamp(0.0, 1.0)
    target = target.detach().float()
    out = {
        "psnr": float(PSNRMetric(max_val=1.0)(recon, target).mean()),
        "ssim": float(SSIMMetric(spatial_dims=3, data_range=1.0)(recon, target).mean()),
        "mae": float((recon - target).abs().mean()),
    }
    brain = target > 0
    if brain.any():
        mse = ((recon - target)[brain] ** 2).mean()
        out["psnr_brain"] = float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))
        out["ssim_brain"] = masked_ssim(recon, target, brain)
    metric = ms_ssim_metric(tuple(target.shape[2:])) if ms_ssim else None
    if metric is not None:
        out["ms_ssim"] = float(metric(recon, target).mean())
    return out


def masked_ssim(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kernel_size: int = 11,
                sigma: float = 1.5) -> float:
    """Mean of MONAI's local SSIM map (Gaussian window, as ``SSIMMetric``) over the windows centred on
    ``mask`` voxels; (B, 1, X, Y, Z) tensors, data range 1."""
    from monai.metrics.regression import compute_ssim_and_cs

    dims = recon.ndim - 2
    ssim_map, _ = compute_ssim_and_cs(recon, target, spatial_dims=dims, kernel_size=(kernel_size,) * dims,
                                      kernel_sigma=(sigma,) * dims, data_range=1.0)
    h = kernel_size // 2  # the map is a 'valid' convolution: window centres start h voxels in
    inner = mask[(slice(None), slice(None), *(slice(h, s - h) for s in mask.shape[2:]))]
    return float(ssim_map[inner].mean()) if inner.any() else float("nan")


def ms_ssim_pairs(volumes: torch.Tensor, max_pairs: int = 45, seed: int = 0) -> float:
    """Mean MS-SSIM over distinct pairs of ``volumes`` (N, 1, X, Y, Z): lower means more diverse."""
    n = volumes.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        raise ValueError("diversity needs at least two volumes")
    rng = np.random.default_rng(seed)
    if len(pairs) > max_pairs:
        pairs = [pairs[k] for k in rng.choice(len(pairs), max_pairs, replace=False)]
    metric = ms_ssim_metric(tuple(volumes.shape[2:]))
    if metric is None:
        return float("nan")
    a = torch.stack([volumes[i] for i, _ in pairs]).float().clamp(0, 1)
    b = torch.stack([volumes[j] for _, j in pairs]).float().clamp(0, 1)
    return float(metric(a, b).mean())


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def agreement(requested, measured) -> dict[str, float]:
    """Pearson r and mean absolute error between requested and measured values."""
    requested, measured = np.asarray(requested, float), np.asarray(measured, float)
    if requested.size == 0:
        return {"r": float("nan"), "mae": float("nan"), "bias": float("nan"), "n": 0}
    return {"r": pearson(requested, measured), "mae": float(np.abs(requested - measured).mean()),
            "bias": float((measured - requested).mean()), "n": int(requested.size)}
