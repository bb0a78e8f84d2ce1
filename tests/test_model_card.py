"""The one metrics formatter shared by MODEL_CARD.md and the app's Model page."""

from __future__ import annotations

import pytest

from synthbrain.model_card import format_metric, metric_tables


@pytest.mark.parametrize("key,value,section,expected", [
    ("psnr", 27.849918937683107, "autoencoder", ("27.85", "dB")),
    ("ssim_brain", 0.9145385712385178, "mni152_template", ("0.915", "")),
    ("ms_ssim_real_subjects", 0.8486607670783997, "diversity", ("0.849", "")),
    ("r", 0.974257885244443, "ventricular_volume_adherence", ("0.974", "")),
    ("mae", 3.3903101224374192, "ventricular_volume_adherence", ("3.4", "mL")),
    ("bias", -0.257980412498801, "brain_volume_adherence", ("-0.3", "mL")),
    ("mae", 0.016219167364761235, "autoencoder", ("0.0162", "intensity (0..1)")),
    ("mean_ventricle_increase_mL", 33.14427253154617, "ageing", ("33.1", "mL")),
    ("share_flagged", 0.05, "audit", ("5.0", "%")),
    ("latent_shape", [4, 10, 14, 10], "autoencoder", ("4 x 10 x 14 x 10", "")),
    ("held_out", True, "autoencoder", ("yes", "")),
    ("perplexity", 331.1252899227377, "autoencoder", ("331.1", "")),
])
def test_format_metric(key, value, section, expected):
    assert format_metric(key, value, section) == expected


def test_nested_sections_become_their_own_tables_and_raw_parts_stay_out():
    metrics = {"autoencoder": {"psnr": 27.8499, "per_subject": {"sub-1": {"psnr": 27.1}}, "units": {"psnr": "dB"},
                               "mni152_template": {"source": "nilearn MNI152", "psnr_brain": 22.123456}},
               "tuning": {"best_value": 24.123456789, "trials": 12, "note": "Optuna TPE"}}
    tables = {t.key: t for t in metric_tables(metrics)}
    assert list(tables) == ["autoencoder", "autoencoder: mni152_template", "tuning"]
    assert [r.key for r in tables["autoencoder"].rows] == ["psnr"]  # per-subject figures and units stay raw
    assert tables["autoencoder: mni152_template"].title == "Autoencoder: MNI152 template"
    assert ("PSNR in the brain", "22.12", "dB") in [(r.label, r.value, r.unit) for r in
                                                    tables["autoencoder: mni152_template"].rows]
    assert tables["tuning"].notes == ("Optuna TPE",) and "24.12" in tables["tuning"].markdown()
