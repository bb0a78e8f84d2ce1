"""What a GPU session imports: training, evaluation and sampling must not pull in the app's libraries
(streamlit, plotly, pyvista) or those of other commands (optuna, SimpleITK, deepbet), which the GPU machine
lacks and which do not travel there (DEVELOPERS.md, benchmarks/gpu_wheels.sh)."""

from __future__ import annotations

import subprocess
import sys

from conftest import subprocess_env

SESSION_MODULES = ("synthbrain.cli", "synthbrain.training.autoencoder", "synthbrain.training.prior",
                   "synthbrain.evaluation", "synthbrain.sampling", "synthbrain.data.cohort", "synthbrain.data.bids",
                   "synthbrain.bundle", "synthbrain.metrics", "synthbrain.privacy")
NOT_THERE = ("streamlit", "plotly", "pyvista", "vtk", "optuna", "SimpleITK", "deepbet")


def test_session_modules_import_nothing_the_gpu_machine_lacks():
    code = (f"import importlib, sys\nfor m in {SESSION_MODULES!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=subprocess_env(), check=False)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    assert {"torch", "synthbrain"} <= imported  # the modules were imported
    assert not imported & set(NOT_THERE)
