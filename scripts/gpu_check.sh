#!/usr/bin/env bash
# Issue #33's check on a machine with an NVIDIA GPU, in one go (about 6 minutes on an H100):
# install the project beside the machine's own torch, run the tests marked gpu, and print
# (and write into docs/benchmarks/devices.md) the CPU/GPU table of scripts/bench_gpu.py.
#
#   bash scripts/gpu_wheels.sh       # first, where a package registry is reachable: fills .whl/
#   bash scripts/gpu_check.sh        # then on the GPU machine (no network needed)
#
# Results also go to $OUT (default /tmp/gpu-check): the test log, the table, the docs page.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${GPU_CHECK_PYTHON:-python3}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
OUT=${OUT:-/tmp/gpu-check}
SITE=${GPU_CHECK_SITE:-/tmp/compressor-site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no NVIDIA GPU visible"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# the dependencies the image lacks, carried as wheels; then this project (not editable:
# the package maps compressor.plugins onto plugins/)
if [ "${GPU_CHECK_WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
  --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -P -c "import compressor, compressor.plugins.sketchtune as s; print('testing', compressor.__file__)"

# the tests marked gpu, against the installed package (-P: not the source tree in cwd)
start=$(date +%s)
set +e
"$PY" -P -m pytest tests -m gpu -q -p no:cacheprovider -n 4 --durations=10 2>&1 | tee "$OUT/gpu-tests.log"
tests=${PIPESTATUS[0]}
set -e
echo "gpu tests: exit $tests in $(( $(date +%s) - start )) s"

# the table; run from outside the tree so `python -m compressor` finds the installed one
start=$(date +%s)
(cd /tmp && "$PY" "$REPO/scripts/bench_gpu.py" --write-docs ${GPU_CHECK_BENCH_ARGS:-}) 2>&1 | tee "$OUT/bench.log"
echo "bench: $(( $(date +%s) - start )) s"
cp docs/benchmarks/devices.md "$OUT/devices.md"
exit "$tests"
