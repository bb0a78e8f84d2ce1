#!/usr/bin/env bash
# The wheels a device session needs (benchmarks/gpu_session.sh installs them there with pip --no-index):
# exactly the packages that training, evaluation and sampling import and that the device's python3 3.12
# lacks (/work/.library/device/KINDS.md lists what it has). All four are pure Python; SimpleITK (52 MB,
# over the carry limit with the tree) is not needed: the cohort preprocesses itself (--preprocess).
# The versions are those this checkout's tests run with. Run here, from anywhere:
#
#   bash benchmarks/gpu_wheels.sh        # -> .whl/ (ignored by git), and the size of what a run carries
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=(monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 diffusers==0.42.1)
rm -rf .whl
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d .whl "${wheels[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
[ "$(ls .whl/*.whl | wc -l)" = "${#wheels[@]}" ] || { echo "gpu_wheels: expected ${#wheels[@]} wheels" >&2; exit 1; }
# what travels with a run: tracked and untracked-not-ignored files, plus the carried .whl (limit 64 MiB)
tree=$( { git ls-files -z --cached; git ls-files -z --others --exclude-standard; } | sort -zu \
        | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl
awk -v t="$tree" -v w="$whl" 'BEGIN {printf "gpu_wheels: wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a run carries\n", w/2^20, t/2^20, (t+w)/2^20; exit (t+w > 60*2^20)}' \
    || { echo "gpu_wheels: too close to the 64 MiB limit" >&2; exit 1; }
