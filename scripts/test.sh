#!/usr/bin/env bash
# Set up (first run) and run the test suite: two pytest workers, each taking whole test files (a file's runs share
# their fixtures), so one imports while the other computes; -n 0 runs it in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=600 TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
exec python -m pytest -n 2 --dist loadfile "$@"
