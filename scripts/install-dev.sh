#!/usr/bin/env bash
# Dev and CI install: Debian's fortunes (real text for the evaluation suite),
# a virtual environment in .venv, and the package with its test extra, with the
# CPU build of torch pinned by scripts/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/games/fortunes/computers ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null
  else
    echo "The evaluation suite needs Debian's fortunes package (/usr/share/games/fortunes)." >&2
    exit 1
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -c scripts/constraints.txt -e '.[test]'
