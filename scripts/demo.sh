#!/usr/bin/env bash
# Set up (first run), run the main job on the tiny embedded default with a local Ray cluster, then stream a
# 60-second video on the CPU from the shipped sprite-world student.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=600 TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
sfpp-ray train --config configs/tiny.yaml "$@"
if [ ! -f weights/world_student/config.json ]; then
  echo "weights/world_student is not in this checkout: no 60-second video" >&2
  exit 0
fi
echo "streaming 60 s of sprite-world video from weights/world_student on the CPU"
sfpp-ray generate --config configs/world_gpu.yaml --checkpoint weights/world_student --prompt "a blue triangle, a white triangle and a green square bouncing steadily on a brown gradient background" --seconds 60 --out outputs/demo_60s.mp4 run.device=cpu >/dev/null
echo "video: $PWD/outputs/demo_60s.mp4"
