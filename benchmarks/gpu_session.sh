#!/usr/bin/env bash
# Step 0 of a device session (see benchmarks/gpu_session.py for the plan and DEVELOPERS.md for the call):
# the carried wheels (.whl/, made by benchmarks/gpu_wheels.sh) into a site folder with pip --no-index,
# the repository on PYTHONPATH (no build, no install), then steps 1-3 in gpu_session.py.
#
#   bash benchmarks/gpu_session.sh [--budget-s 500] [--phase all|check|train|evaluate]   # on the device, $OUT set
#   bash benchmarks/gpu_session.sh --dry-run --out /tmp/gpu-dry                          # here, on the CPU
#
# --dry-run also makes this machine look like the device to Python: the packages the device lacks
# (monai, nibabel, nilearn, diffusers, SimpleITK, streamlit, ...) import from the carried wheels or not at all.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
py=${PYTHON:-python3}
site=${SYNTHBRAIN_SITE:-/tmp/site}
[ "$dry" = 1 ] && site=$(mktemp -d /tmp/gpu-dry-site.XXXXXX)
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_session: no wheels in .whl/ (run benchmarks/gpu_wheels.sh here first)" >&2; exit 2; }
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_session: the carried wheels did not install" >&2; exit 3; }
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$dry" = 1 ]; then
    blocker=$(mktemp -d /tmp/gpu-dry-blocker.XXXXXX)
    cat >"$blocker/sitecustomize.py" <<PY
# dry run: what the device lacks imports from the carried wheels in $site only
import importlib.machinery, sys
LACKS = set("$("$py" -c 'import sys; sys.path.insert(0, "benchmarks"); from gpu_session import DEVICE_LACKS; print(" ".join(DEVICE_LACKS))')".split())
class DeviceLike:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in LACKS or "." in name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, ["$site"])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (the device lacks it; not in the carried wheels)", name=name)
        return spec
sys.meta_path.insert(0, DeviceLike())
PY
    export PYTHONPATH="$blocker:$PYTHONPATH"
fi
echo "gpu_session: step 0 (wheels into $site) took ${SECONDS} s"
exec "$py" benchmarks/gpu_session.py "$@"
