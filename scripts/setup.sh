#!/usr/bin/env bash
# Create ./.venv with Stemset and everything its tests need.
# `scripts/setup.sh --plain` installs Stemset alone (no test extra): what running the commands needs.
# STEMSET_TORCH pins the torch build installed first (default: the CPU wheel 2.13.0 this project's
# machines carry; set STEMSET_TORCH=torch to let pip pick, e.g. a CUDA build on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${STEMSET_TORCH:-torch==2.13.0}"
if [ "${1:-}" = "--plain" ]; then
  python -m pip install -q -e .
else
  python -m pip install -q -e ".[test]"
fi
echo "Stemset installed in $(pwd)/.venv: activate with '. .venv/bin/activate'"
