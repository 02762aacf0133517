#!/usr/bin/env bash
# Submit a training run to a running Ray cluster:
#   cluster/submit.sh configs/wan2.1_t2v_1.3b.yaml model.pretrained=/data/Wan2.1-T2V-1.3B-Diffusers/transformer ...
# RAY_ADDRESS picks the cluster's job server (default: a local one, or `ray dashboard` forwarding).
# A cluster with token authentication also needs RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) exported.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  --runtime-env cluster/runtime_env.yaml -- python -m sfpp_ray train --config "$@"
