#!/usr/bin/env bash
# [Speculative] item 5 on the GPU machine: trains the 105M target (configs/speculative/
# train_target.toml) with Loom on the King James Bible, then times batch-1 greedy decoding of it
# with prompt lookup and with the default model (models/tiny-kjv, trained by Loom on the same
# corpus) as the draft model, against plain decoding (bench/speculative_bench.cpp), beside
# transformers' prompt lookup and assisted generation on the same models (bench/speculative_vs_hf.py).
#
# usage: bench/speculative.sh BIN_DIR KJV_DIR [STEPS]
#   BIN_DIR: holds loom and loom_speculative_bench (LOOM_PLUGIN_PATH set to the plugins)
#   KJV_DIR: scripts/prepare_kjv.sh's output (train.txt, val.txt)
set -euo pipefail
bin=$1 kjv=$2 steps=${3:-128}
here=$(cd "$(dirname "$0")/.." && pwd)
model=/tmp/kjv-105m
mkdir -p "$model"
cp "$here/configs/speculative/kjv-105m.config.json" "$model/config.json"
cp "$here/models/tiny-kjv/tokenizer.model" "$here/models/tiny-kjv/generation_config.json" "$model/"
start=$(date +%s)
"$bin/loom" train "$here/configs/speculative/train_target.toml" --set model.path="$model" \
  --set train.data="$kjv/train.txt" --set train.validation_data="$kjv/val.txt" --set train.out=/tmp/kjv-105m-train \
  > /tmp/kjv-105m-train.log 2>&1 || { tail -20 /tmp/kjv-105m-train.log; exit 1; }
echo "trained in $(( $(date +%s) - start )) s:"; grep -iE "val|valid" /tmp/kjv-105m-train.log | tail -5
python3 "$here/bench/speculative_prompts.py" "$kjv" /tmp/speculative_prompts.jsonl 12
python3 "$here/bench/speculative_vs_hf.py" "$bin/loom_speculative_bench" /tmp/kjv-105m-train/model "$here/models/tiny-kjv" \
  /tmp/speculative_prompts.jsonl "$steps" 4
