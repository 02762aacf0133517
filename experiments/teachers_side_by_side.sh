#!/usr/bin/env bash
# Teacher recipes compared on one GPU: each recipe's teacher stage runs at the same time as the others' (two
# or three stages share a GPU at about twice the throughput of one after another, docs/notes/teacher_runs.md), then
# experiments/teacher_sampler.py scores each teacher's samples against real clips under the same sampler
# settings, on validation scenes and the first and best settings again on held-out ones.
#
#     bash experiments/teachers_side_by_side.sh outputs/pair "teacher_pretrain.steps=5000" \
#         "teacher_pretrain.steps=5000 teacher_pretrain.timestep_shift=0.33"
#
# Each quoted argument is one recipe's key=value overrides; recipe i writes under <out>/recipe<i>, its logs under
# <out>/logs. Environment: SETTINGS (sampler settings), VALIDATION, HELDOUT and TOP (scene counts and how many
# best settings go on to the held-out scenes), WORKERS (data workers per recipe), CONFIG (the config file, by
# default configs/world_gpu.yaml), EXTRA (keys for every command, after the script's own: the stages are compiled,
# teacher_pretrain.compile=inductor, about twice as fast on a GPU; EXTRA=teacher_pretrain.compile=none on a CPU
# without a C++ compiler), GPUS (how many GPUs to spread the recipes over; by default all that nvidia-smi lists).
#
# With more than one GPU each recipe gets its own share of them (CUDA_VISIBLE_DEVICES): one each for as many
# recipes as GPUs, or two each for half as many (a recipe with trainer.num_workers=2 then trains on both), and
# the scorings run at the same time as well; with one GPU, or more recipes than GPUs, every recipe shares all.
set -u
root=${1:?usage: teachers_side_by_side.sh <output dir> "<recipe 1 keys>" ["<recipe 2 keys>" ...]}
shift
[ $# -ge 1 ] || { echo "give at least one recipe (a quoted list of key=value overrides)"; exit 2; }
logs=$root/logs
mkdir -p "$logs"
config=${CONFIG:-configs/world_gpu.yaml}
ngpu=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
share=$(( $# <= ngpu ? ngpu / $# : 0 ))  # GPUs a recipe has to itself; 0: all recipes share all GPUs
devices() {  # recipe number (from 1) -> its CUDA_VISIBLE_DEVICES, empty when the recipes share the GPUs
    [ "$share" -ge 1 ] && [ "$ngpu" -ge 2 ] || return 0
    seq -s, $(( ($1 - 1) * share )) $(( $1 * share - 1 ))
}
on_devices() {  # run a command with the recipe's devices, if it has its own
    local d; d=$(devices "$1"); shift
    if [ -n "$d" ]; then CUDA_VISIBLE_DEVICES=$d "$@"; else "$@"; fi
}
common="teacher_pretrain.compile=inductor teacher_pretrain.autocast=true trainer.zero_stage=0 teacher_pretrain.checkpoint_every=0 ${EXTRA:-}"
pids=()
i=0
for recipe in "$@"; do
    i=$((i + 1))
    d=$(devices $i)
    echo "recipe$i: $recipe${d:+ (GPUs $d)}" | tee -a "$logs/recipes.txt"
    # shellcheck disable=SC2086  # the recipe is a list of keys
    on_devices $i python3 experiments/long_horizon.py --config "$config" --out "$root/recipe$i" --stages teacher \
        teacher_pretrain.data_workers="${WORKERS:-6}" $common $recipe > "$logs/teacher$i.txt" 2>&1 &
    pids+=($!)
done
failed=0
for n in "${!pids[@]}"; do
    wait "${pids[$n]}" || { echo "recipe$((n + 1))'s teacher stage failed: $logs/teacher$((n + 1)).txt"; failed=1; }
done
score() {  # recipe number, recipe keys: its teacher's samples against real clips under each sampler setting
    # shellcheck disable=SC2086
    on_devices "$1" python3 experiments/teacher_sampler.py --config "$config" --run "$root/recipe$1" \
        --settings "${SETTINGS:-24:8:2,24:3:2,24:1:2,24:3:2:eta=0.5,24:3:2:eta=1}" \
        --validation "${VALIDATION:-32}" --heldout "${HELDOUT:-64}" --top "${TOP:-1}" $common $2 \
        2>&1 | grep -av "Loading weights"
}
scoring=()  # recipes scored in the background, on GPUs of their own
i=0
for recipe in "$@"; do
    i=$((i + 1))
    [ -f "$root/recipe$i/teacher/config.json" ] || continue
    if [ -n "$(devices $i)" ]; then
        score $i "$recipe" > "$logs/sampler$i.txt" & scoring+=($!)
    else
        echo "== recipe$i"; score $i "$recipe" | tee "$logs/sampler$i.txt"
    fi
done
for pid in "${scoring[@]}"; do wait "$pid"; done
i=0
for recipe in "$@"; do
    i=$((i + 1))
    [ -n "$(devices $i)" ] && [ -f "$logs/sampler$i.txt" ] && { echo "== recipe$i"; cat "$logs/sampler$i.txt"; }
done
exit $failed
