#!/usr/bin/env bash
# Set up, then run the main job on the embedded defaults: local ./media storage, the local
# separator, a SQLite Dagster instance in ./.dagster_home. Drops a synthesised demo take into
# media/inputs/h4n/ if that folder is empty, registers every input as a partition, materialises
# `recording` and the profile's default stems for each, then the `catalog`.
#   STEMSET_DEMO_MODELS=1  use tiny random-weight models (no download; the stems are noise)
# Afterwards: `dagster dev -w workspace.yaml` shows the runs, assets and catalog.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home}
mkdir -p "$DAGSTER_HOME"
if [ "${STEMSET_DEMO_MODELS:-}" = 1 ]; then
  # tiny models in .stemset/demo-models, pinned in .stemset/demo-config.yaml (their sets stay current)
  python -m stemset_assets.cli.quickstart --demo-models
else
  python -m stemset_assets.cli.quickstart
fi
