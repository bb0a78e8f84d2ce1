"""Fixtures shared by ``tests/`` and ``benchmarks/``: tiny training configs (a few channels, the 5 mm
``tiny`` grid; they train in seconds on a CPU) and the ways a checkpoint gets damaged on disk.

Nothing here is used by the library itself."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

TINY_AUTOENCODER = {
    "train": {"steps": 8, "batch_size": 2, "lr": 2e-3, "warmup_steps": 0, "val_every": 4, "ckpt_every": 2,
              "log_every": 1, "val_fraction": 0.25, "seed": 0},
    "model": {"channels": [4, 8, 8], "num_res_channels": [4, 8, 8], "num_res_layers": 1, "num_embeddings": 32,
              "embedding_dim": 4},
}
TINY_PRIOR = {
    "train": {"steps": 8, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "val_every": 4, "ckpt_every": 4,
              "log_every": 1, "val_fraction": 0.25, "seed": 0},
    "model": {"channels": [16, 32], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 16,
              "norm_num_groups": 16, "default_steps": 3},
}


def _flip_a_bit(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one bit in the middle of the tensor data
    p.write_bytes(bytes(raw))


def _foreign(d: Path) -> None:
    (d / "checksums.json").unlink()
    (d / "tensors.safetensors").write_bytes(b"PK\x03\x04" * 64)  # a zip header: someone else's file


def _tensors(d: Path) -> Path:
    return d / "tensors.safetensors"


# description -> damage done to a checkpoint folder (``checkpoints/step-N``) of a step after 2
CHECKPOINT_DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated to 1,000 bytes": lambda d: _tensors(d).write_bytes(_tensors(d).read_bytes()[:1000]),
    "emptied": lambda d: _tensors(d).write_bytes(b""),
    "one bit flipped": lambda d: _flip_a_bit(_tensors(d)),
    "a pickle in its place": lambda d: _tensors(d).write_bytes(pickle.dumps({"w": [1.0] * 100})),
    "state.json cut short": lambda d: (d / "state.json").write_text('{"step": 4, "sampler": '),
    "checksums.json deleted, a foreign file in its place": _foreign,
}


# configs/inference.json of the MONAI model zoo's brain_image_synthesis_latent_diffusion_model (version
# 1.0.0), as published: the networks are built from it with random weights by tests and benchmarks
UKB_LDM_INFERENCE = {
    "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
    "bundle_root": ".", "load_old": 1, "model_dir": "$@bundle_root + '/models'",
    "gender": 0.0, "age": 0.1, "ventricular_vol": 0.2, "brain_vol": 0.4,
    "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
    "autoencoder_def": {
        "_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
        "latent_channels": 3, "channels": [64, 128, 128, 128], "num_res_blocks": 2, "norm_num_groups": 32,
        "norm_eps": 1e-06, "attention_levels": [False, False, False, False], "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False},
    "network_def": "@autoencoder_def",
    "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
    "diffusion_def": {
        "_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 3, "in_channels": 7, "out_channels": 3,
        "channels": [256, 512, 768], "num_res_blocks": 2, "attention_levels": [False, True, True],
        "norm_num_groups": 32, "norm_eps": 1e-06, "resblock_updown": True, "num_head_channels": [0, 512, 768],
        "with_conditioning": True, "transformer_num_layers": 1, "cross_attention_dim": 4, "upcast_attention": True,
        "use_flash_attention": False},
    "load_diffusion_path": "$@model_dir + '/model.pt'",
    "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", "_requires_": ["@load_diffusion"],
                  "beta_start": 0.0015, "beta_end": 0.0205, "num_train_timesteps": 1000,
                  "schedule": "scaled_linear_beta", "clip_sample": False},
    "noise": "$torch.randn((1, 3, 20, 28, 20)).to(@device)",
    "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
}
