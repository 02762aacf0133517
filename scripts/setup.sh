#!/usr/bin/env bash
# Creates .venv in the checkout with everything the project needs (CPU torch on a machine without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "set-up: $*" >&2; }
if [ ! -x .venv/bin/python ]; then say "creating .venv with $("$PY" --version)"; "$PY" -m venv .venv; fi
. .venv/bin/activate
if [ ! -f .venv/.sfpp-installed ] || [ pyproject.toml -nt .venv/.sfpp-installed ]; then
  start=$SECONDS
  say "installing into .venv (first run: a few minutes; later runs skip this)"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then say "torch (CUDA build)"; python -m pip install -q "torch>=2.11,<2.14";
    else say "torch 2.13.0 (CPU build)"; python -m pip install -q "torch==2.13.0"; fi
  fi
  # DeepSpeed builds from source: let it see the installed torch instead of pulling another one.
  say "DeepSpeed"
  python -m pip install -q --no-build-isolation "deepspeed>=0.17,<0.20"
  say "sfpp-ray and its dependencies (Ray Train and Data, diffusers, transformers, MLflow, pytest)"
  python -m pip install -q -e ".[test]"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "building DeepSpeed's CPU collective once"
    # DeepSpeed compiles its CPU shared-memory collective on first use; build it now, once, so the
    # first distributed start does not stall for a minute inside Ray Train.
    DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" \
      python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
  fi
  touch .venv/.sfpp-installed
  say "done in $((SECONDS - start)) s"
fi
