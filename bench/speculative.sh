#!/usr/bin/env bash
# [Speculative] item 5 on the GPU machine: trains a target model with Loom on the King James Bible,
# then times batch-1 greedy decoding of it with prompt lookup and with the default model
# (models/tiny-kjv, trained by Loom on the same corpus) as the draft model, against plain decoding
# (bench/speculative_bench.cpp), beside transformers' prompt lookup and assisted generation on the
# same models (bench/speculative_vs_hf.py).
#
# usage: [TRAIN_GPUS=N] [DRAFT=kjv-draft] [COPY_EVERY=N] bench/speculative.sh BIN_DIR KJV_DIR [STEPS] [TARGET] [PROMPTS] [HF_REPEAT]
#   BIN_DIR: holds loom and loom_speculative_bench (LOOM_PLUGIN_PATH set to the plugins)
#   KJV_DIR: scripts/prepare_kjv.sh's output (train.txt, val.txt)
#   TARGET: kjv-105m (default: configs/speculative/train_target.toml, 105M parameters) or kjv-1b
#     (train_target_1b.toml: Llama-3.2-1B's layers, 0.98B parameters, data parallel over
#     TRAIN_GPUS processes, default 1)
#   PROMPTS: prompts per workload (default 12); HF_REPEAT: transformers' runs per prompt (default 2)
#   DRAFT: tiny-kjv (default: models/tiny-kjv, head dim 48, on `sdpa`) or kjv-draft
#     (configs/speculative/train_draft.toml, trained here on the first GPU, head dim 64, on `flash`)
#   COPY_EVERY: the models trained here learn from train.txt with one group of 4 verses in N
#     also written out twice as one line (bench/speculative_copy_data.py; default 3), so that they
#     rewrite a given passage, as the copying workload asks; 0 trains on train.txt alone
#   TEMPERATURE: > 0 samples (temperature, then dist) and adds the draft model's sampled drafts
#     (min(1, p/q)); transformers is then not run (HF_REPEAT = 0 skips it too)
#   K: drafts per step (default 4), for Loom and for transformers' prompt lookup and assistant
#   TARGET_SET: more `--set KEY=VALUE` overrides of the target's training manifest, space-separated
#     (for example "train.steps=1000 train.seq_len=512")
set -euo pipefail
bin=$1 kjv=$2 steps=${3:-128} target=${4:-kjv-105m} n_prompts=${5:-12} hf_repeat=${6:-2}
gpus=${TRAIN_GPUS:-1} draft=${DRAFT:-tiny-kjv} copy_every=${COPY_EVERY:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
train_text=$kjv/train.txt
if ((copy_every > 0)); then
  train_text=/tmp/speculative_train_copy.txt
  python3 "$here/bench/speculative_copy_data.py" "$kjv/train.txt" "$train_text" "$copy_every"
fi
case "$target" in
  kjv-105m) manifest=train_target.toml ;;
  kjv-1b) manifest=train_target_1b.toml ;;
  *) echo "speculative.sh: unknown target '$target' (kjv-105m or kjv-1b)" >&2; exit 2 ;;
esac
model=/tmp/$target out=/tmp/$target-train
mkdir -p "$model"
cp "$here/configs/speculative/$target.config.json" "$model/config.json"
cp "$here/models/tiny-kjv/tokenizer.model" "$here/models/tiny-kjv/generation_config.json" "$model/"
target_set=()
for kv in ${TARGET_SET:-}; do target_set+=(--set "$kv"); done
start=$(date +%s)
pids=()
for ((r = 0; r < gpus; r++)); do
  launch=()
  ((gpus == 1)) || launch=(env RANK=$r WORLD_SIZE=$gpus LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29660)
  "${launch[@]}" "$bin/loom" train "$here/configs/speculative/$manifest" --set model.path="$model" \
    --set train.data="$train_text" --set train.validation_data="$kjv/val.txt" --set train.out="$out" \
    "${target_set[@]}" > "/tmp/$target-train.$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -20 /tmp/"$target"-train.*.log; exit 1; }; done
echo "trained in $(( $(date +%s) - start )) s on $gpus GPU(s):"; grep -iE "val|valid" "/tmp/$target-train.0.log" | tail -5
grep -o '"step":[0-9]*\|"val_loss":[0-9.]*' "$out/train_log.jsonl" | paste -sd' ' | grep -o '"step":[0-9]* "val_loss":[0-9.]*' || true
case "$draft" in
  tiny-kjv) draft_dir=$here/models/tiny-kjv draft_attention=sdpa ;;
  kjv-draft)
    mkdir -p /tmp/kjv-draft
    cp "$here/configs/speculative/kjv-draft.config.json" /tmp/kjv-draft/config.json
    cp "$here/models/tiny-kjv/tokenizer.model" "$here/models/tiny-kjv/generation_config.json" /tmp/kjv-draft/
    start=$(date +%s)
    "$bin/loom" train "$here/configs/speculative/train_draft.toml" --set train.data="$train_text" \
      --set train.validation_data="$kjv/val.txt" > /tmp/kjv-draft-train.log 2>&1 || { tail -20 /tmp/kjv-draft-train.log; exit 1; }
    echo "draft trained in $(( $(date +%s) - start )) s:"; grep -E "^trained" /tmp/kjv-draft-train.log
    grep -o '"step":[0-9]*\|"val_loss":[0-9.]*' /tmp/kjv-draft-train/train_log.jsonl | paste -sd' ' | grep -o '"step":[0-9]* "val_loss":[0-9.]*' || true
    draft_dir=/tmp/kjv-draft-train/model draft_attention=flash ;;
  *) echo "speculative.sh: unknown draft '$draft' (tiny-kjv or kjv-draft)" >&2; exit 2 ;;
esac
python3 "$here/bench/speculative_prompts.py" "$kjv" /tmp/speculative_prompts.jsonl "$n_prompts"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python3 "$here/bench/speculative_vs_hf.py" "$bin/loom_speculative_bench" \
  "$out/model" "$draft_dir" /tmp/speculative_prompts.jsonl "$steps" "${K:-4}" "$hf_repeat" "$draft_attention" "${TEMPERATURE:-0}"
