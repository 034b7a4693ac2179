#!/bin/sh
# [Quantizers] item 5 in one run (see bench/README.md): batch-1 decode of the 1B-shape model
# (bench/llama1b_torch.py's random weights) in bf16, int8 and int4 through loom_model_bench, in
# the order of BENCHMARKS.md's tables (bf16 and int8 twice, int8 once more on its previous
# kernel, LOOM_QUANT_STREAM=0), then the step's 65 products alone (loom_quant_gemv_bench).
# usage: bench/quant_decode.sh BIN_DIR [MODEL_DIR]
#   BIN_DIR holds loom_model_bench and loom_quant_gemv_bench (e.g. build/default/bin)
set -eu
bin=$1
model=${2:-/tmp/llama1b-shape}
here=$(dirname "$0")
python3 -c "import sys; sys.path.insert(0, '$here'); from llama1b_torch import load_or_create; load_or_create('$model', 0)" \
  > /dev/null
decode() {  # QUANTIZER (none for bf16) STREAM
  if [ "$1" = none ]; then set -- "" "$2" "bf16"; else set -- "--quantizer $1" "$2" "$1"; fi
  printf '%-5s LOOM_QUANT_STREAM=%s  ' "$3" "$2"
  log=$(mktemp)
  # shellcheck disable=SC2086  # $1 is empty or two words
  if ! LOOM_QUANT_STREAM=$2 "$bin/loom_model_bench" "$model" --attention flash --batches 1 --reps 3 $1 2>"$log" |
    grep "decode tok/s batch 1"; then
    echo "loom_model_bench failed:" >&2
    cat "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}
decode none 1
decode int8 1
decode int8 0
decode int4 1
decode none 1
decode int8 1
"$bin/loom_quant_gemv_bench"
