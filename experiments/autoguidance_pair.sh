#!/usr/bin/env bash
# Autoguidance from a strong teacher, on one GPU: run 10's recipe (7500 steps) saving same-size guides at steps
# 1000 and 2500, and beside it a small, short-trained guide (4 layers, ffn 512, 1500 steps); two stages share
# the GPU at about twice the throughput of one (docs/notes/teacher_runs.md). Then the sampler settings without
# autoguidance and with each guide at weights 1.5 / 2 / 3, on 32 validation scenes, and the first and the
# best three on 64 held-out scenes (experiments/teacher_sampler.py).
#
#     bash experiments/autoguidance_pair.sh outputs/ag [key=value ...]    # logs in outputs/ag/logs; table last
#
# key=value overrides go to every command (after the script's own); VALIDATION and HELDOUT set the scene counts.
set -u
root=${1:?usage: autoguidance_pair.sh <output dir> [key=value ...]}
shift
teacher=$root/teacher_run; guide=$root/small_guide; logs=$root/logs
mkdir -p "$logs"
common="teacher_pretrain.autocast=true trainer.zero_stage=0 teacher_pretrain.checkpoint_every=0"
python3 experiments/long_horizon.py --out "$guide" --stages teacher model.num_layers=4 model.ffn_dim=512 \
    teacher_pretrain.steps=1500 teacher_pretrain.data_workers=2 $common "$@" > "$logs/small_guide.txt" 2>&1 &
python3 experiments/long_horizon.py --out "$teacher" --stages teacher teacher_pretrain.steps=7500 \
    teacher_pretrain.data_workers=10 "teacher_pretrain.guide_steps=[1000,2500]" $common "$@" > "$logs/teacher.txt" 2>&1 \
    || { echo "teacher stage failed: $logs/teacher.txt"; exit 1; }
wait
settings="24:8:2,24:3:2,24:8:4"
for g in "$teacher"/teacher/guide_step* "$guide/teacher"; do
    [ -f "$g/config.json" ] || { echo "no guide at $g (see $logs)"; continue; }
    for w in 1.5 2 3; do settings="$settings,24:8:2:autoguidance=$w:guide=$g"; done
    settings="$settings,24:8:1:autoguidance=2:guide=$g"
done
python3 experiments/teacher_sampler.py --run "$teacher" --validation "${VALIDATION:-32}" --heldout "${HELDOUT:-64}" \
    --top 3 --settings "$settings" "$@" 2>&1 | tee "$logs/sampler.txt"
