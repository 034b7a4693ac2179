#!/bin/sh
# The [Engine] GPU benchmark in one run (see bench/README.md): the PyTorch peers make (or load)
# the Llama-3.2-1B-shape model and measure themselves and the device's ceilings; Loom's bench
# loads the same weights and measures itself; engine_table.py prints the comparison.
# usage: bench/engine_bench.sh LOOM_MODEL_BENCH [MODEL_DIR] [OUT_DIR]
set -eu
bench=$1
model=${2:-/tmp/llama1b-shape}
out=${3:-.}
here=$(dirname "$0")
python3 "$here/llama1b_torch.py" --model-dir "$model" --json "$out/torch.json" > "$out/torch.log" 2>&1 || {
  tail -30 "$out/torch.log"; exit 1; }
"$bench" "$model" --attention flash --batches 1,32 --json "$out/loom.json" | tee "$out/loom.log"
python3 "$here/engine_table.py" "$out/loom.json" "$out/torch.json" | tee "$out/table.md"
