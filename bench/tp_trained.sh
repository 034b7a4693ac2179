#!/usr/bin/env bash
# [Multi-GPU] item 1 on a trained model: trains the 1B-shape KJV model of
# configs/multi_gpu/train_llama1b_kjv.toml with Loom (data parallel over GPUS processes), then runs
# bench/tp_inference_scaling.py on it for 2 GPUs and, when GPUS >= 4, for 4: greedy tokens of
# --check-prompts held-out verses under tensor parallelism against one GPU, and the speeds.
#
# usage: bench/tp_trained.sh BIN_DIR KJV_DIR [GPUS] [REPEAT]
#   BIN_DIR: holds loom (LOOM_PLUGIN_PATH set to the plugins)
#   KJV_DIR: scripts/prepare_kjv.sh's output (train.txt, val.txt)
set -euo pipefail
bin=$1 kjv=$2 gpus=${3:-2} repeat=${4:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
model=/tmp/llama1b-kjv out=/tmp/llama1b-kjv-train
mkdir -p "$model"
cp "$here/configs/multi_gpu/llama1b-kjv.config.json" "$model/config.json"
cp "$here/models/tiny-kjv/tokenizer.model" "$model/"
start=$(date +%s)
pids=()
for ((r = 0; r < gpus; r++)); do
  RANK=$r WORLD_SIZE=$gpus LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29650 NCCL_NVLS_ENABLE=0 \
    "$bin/loom" train "$here/configs/multi_gpu/train_llama1b_kjv.toml" --set model.path="$model" \
    --set train.data="$kjv/train.txt" --set train.validation_data="$kjv/val.txt" --set train.out="$out" \
    > "/tmp/llama1b-kjv-train.$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -20 /tmp/llama1b-kjv-train.*.log; exit 1; }; done
echo "trained in $(( $(date +%s) - start )) s on $gpus GPUs:"
grep -E "^trained|validation" /tmp/llama1b-kjv-train.0.log | tail -3
for n in 2 4; do
  ((n <= gpus)) || continue
  python3 "$here/bench/tp_inference_scaling.py" "$bin/loom" --gpus "$n" --repeat "$repeat" --model "$out/model" \
    --check-text "$kjv/val.txt" --check-prompts 8 --check-steps 128 || status=$?
done
exit "${status:-0}"
