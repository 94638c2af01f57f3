#!/usr/bin/env bash
# The installed commands start, and every module imports, with the main dependencies alone: run it
# in a venv made by `scripts/setup.sh --plain` (no test extra), from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
stemset --help >/dev/null
for command in separate process catalog dev api status backfill worker; do
  stemset "$command" --help >/dev/null
done
stemset api serve --help >/dev/null
stemset worker serve --help >/dev/null
python -m stemset_assets.cli --help >/dev/null
# The code location loads (Dagster's lazy form: calling defs builds the definitions).
python -c "import stemset_assets.definitions as d; d.defs()"
# Every module imports: a run-time import that only the test extra provides fails here.
python - <<'PY'
import importlib
import pkgutil

import gpu_worker
import stemset_assets

for package in (gpu_worker, stemset_assets):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
PY
echo "commands and modules load from the plain install"
