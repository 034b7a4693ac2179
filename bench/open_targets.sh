#!/bin/sh
# Where the open speed targets stand, in one command on the GPU machine (one device call, about
# 7 minutes on an H200): the 1B-shape model made (or loaded), then
#   [Batching] 256 requests at batch limit 64 (the full-batch decode steps against the roofline;
#              no HF peer: --skip-hf), the flash decode kernel at served shapes (batch 4/32/64,
#              512-2048 keys, head dims 64 and 128) beside PyTorch's sdpa, and the op times of a
#              batch-64 decode step;
#   [PEFT]     8 LoRA adapters of rank 16 at batch 32 against the base model;
#   [Quantizers] batch-1 decode with bf16, int8 and int4 weights.
# [Training] (bench/train_gpt2_vs_torch.py, with torch.compile) takes longer and runs alone.
# Each part's full output goes to OUT_DIR/<part>.log; the lines that hold the numbers are printed.
# usage: bench/open_targets.sh BIN_DIR [MODEL_DIR] [OUT_DIR]
#   (BIN_DIR: loom_serve_bench, loom_attention_bench, loom_lora_bench, loom_model_bench;
#    scripts/stage-device-build stages them)
set -eu
bin=$1
model=${2:-/tmp/llama1b-shape}
out=${3:-/tmp/open-targets}
here=$(dirname "$0")
mkdir -p "$out"
python3 -c "import sys; sys.path.insert(0, '$here'); from llama1b_torch import load_or_create; load_or_create('$model', 0)" \
  > "$out/model.log" 2>&1 || { tail -20 "$out/model.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
echo "== [Batching] serving, batch limit 64"
python3 "$here/serve_vs_hf.py" "$bin/loom_serve_bench" --model-dir "$model" --batches 64 --skip-hf --json "$out/serve.json" \
  > "$out/serve.log" 2>&1 || { tail -20 "$out/serve.log"; exit 1; }
tail -12 "$out/serve.log"
echo "== [Batching] decode attention at served shapes"
python3 "$here/attention_vs_torch.py" "$bin/loom_attention_bench" --lengths 512,2048 --dims 64,128 --batches 4,32,64 --no-prefill \
  > "$out/attention.log" 2>&1 || { tail -20 "$out/attention.log"; exit 1; }
tail -14 "$out/attention.log"
echo "== [Batching] where a batch-64 decode step goes (CUDA events between operations)"
LOOM_CUDA_OP_TIMES=1 "$bin/loom_model_bench" "$model" --attention flash --batches 64 --prompt 384 --new 64 --reps 1 \
  > "$out/optimes.log" 2>&1 || { tail -20 "$out/optimes.log"; exit 1; }
grep "decode " "$out/optimes.log" | sort -t: -k2 -rn | head -12
echo "== [PEFT] 8 adapters of rank 16, batch 32"
"$bin/loom_lora_bench" "$model" --adapters 8 --rank 16 --batch 32 --attention flash > "$out/lora.log" 2>&1 ||
  { tail -20 "$out/lora.log"; exit 1; }
tail -8 "$out/lora.log"
echo "== [Quantizers] batch-1 decode"
for q in none int8 int4; do
  if [ "$q" = none ]; then set -- ; else set -- --quantizer "$q"; fi
  "$bin/loom_model_bench" "$model" --attention flash --batches 1 --reps 3 "$@" > "$out/quant-$q.log" 2>&1 ||
    { tail -20 "$out/quant-$q.log"; exit 1; }
  echo "$q: $(grep 'decode tok/s' "$out/quant-$q.log" | head -1 | tr '\n' ' ')"
done
