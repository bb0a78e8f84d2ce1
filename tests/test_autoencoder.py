"""Stage 1's size budget and layout: code bits <= 1 % of a 16-bit volume, computed and enforced."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_AUTOENCODER, subprocess_env, write_json

from synthbrain.errors import ConfigError
from synthbrain.grids import DEMO
from synthbrain.models.autoencoder import MAX_CODE_BITS_FRACTION, Autoencoder, AutoencoderConfig


@pytest.mark.parametrize("strides, codes, expect_bits", [
    ((2, 2, 2), 512, 10 * 14 * 10 * 9),       # the old 8x design
    ((2, 2, 1), 512, 20 * 28 * 20 * 9),       # 4x, 9-bit codes
    ((2, 2, 1), 1000, 20 * 28 * 20 * 10),     # a codebook that is not a power of two costs ceil(log2 K) bits
])
def test_size_budget_counts_code_bits(strides, codes, expect_bits):
    cfg = AutoencoderConfig(channels=(4, 8, 8), num_res_channels=(4, 8, 8), strides=strides, num_embeddings=codes)
    comp = cfg.check_size_budget(DEMO.shape)
    assert comp["code_bits"] == expect_bits
    assert comp["volume_bits"] == 16 * math.prod(DEMO.shape)
    assert comp["latent_bits_per_volume_bits"] == pytest.approx(expect_bits / (16 * math.prod(DEMO.shape)))
    assert comp["latent_bits_per_volume_bits"] <= MAX_CODE_BITS_FRACTION


def test_a_config_over_the_budget_is_refused_with_its_size():
    # 4x per axis with 2,048 codes: 11,200 x 11 bits = 1.07 % of the volume
    cfg = AutoencoderConfig(channels=(4, 8), num_res_channels=(4, 8), strides=(2, 2), num_embeddings=2048)
    with pytest.raises(ConfigError, match=r"123,200 bits, 1\.07 % of the 11,468,800 bits"):
        cfg.check_size_budget(DEMO.shape)


def test_strides_set_the_latent_grid():
    cfg = AutoencoderConfig(channels=(4, 8, 8), num_res_channels=(4, 8, 8), strides=(2, 2, 1), embedding_dim=3)
    x = torch.rand(1, 1, 16, 24, 16)
    net = Autoencoder(cfg).eval()
    with torch.no_grad():
        z = net.encode(x)
        rec = net.decode(net.quantize_eval(z))
    assert cfg.downsampling == 4 and tuple(z.shape) == (1, 3, 4, 6, 4) == (1, *cfg.latent_shape((16, 24, 16)))
    assert rec.shape == x.shape
    assert AutoencoderConfig().strides == (2, 2, 2), "a config without strides (old bundles) halves at every level"
    with pytest.raises(ConfigError, match="strides must be 1 or 2"):
        AutoencoderConfig(channels=(4, 8), num_res_channels=(4, 8), strides=(2, 3))


def test_cli_refuses_an_over_budget_config_before_touching_data(tiny_cohort, tmp_path):
    cfg = json.loads(json.dumps(TINY_AUTOENCODER))
    # the tiny grid 32 x 48 x 32 at 2x per axis: 16 x 24 x 16 = 6,144 codes of 7 bits, 5.5 % of the volume
    cfg["model"].update(channels=[4], num_res_channels=[4], strides=[2], num_embeddings=128)
    data = shutil.copytree(tiny_cohort.root, tmp_path / "data")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "synthbrain", "train", "autoencoder", "--data", str(data),
                        "--out", str(tmp_path / "run"), "--grid", "tiny", "--config",
                        str(write_json(tmp_path / "c.json", cfg))], env=subprocess_env(), capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr
    assert "over the size budget" in r.stderr and "5.47 %" in r.stderr
    assert not (tmp_path / "run").exists()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before, "a run that cannot start writes nothing"
