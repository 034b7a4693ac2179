#!/usr/bin/env bash
# usage: scripts/prepare_kjv.sh OUT_DIR
# Makes the training data of the default model (models/tiny-kjv): the King James Bible from
# Debian's bible-kjv (public domain), one verse a line without references; a sentencepiece BPE
# tokenizer of 2000 pieces trained on it (spm_train from Debian's sentencepiece), with byte
# fallback, so that any text (JSON output under a schema, say) has ids; and the verses as token
# ids (uint16 little-endian, each verse preceded by BOS = 1), split 98% / 2% into train.bin and
# val.bin by verse, and the same split as text, a verse a line, in train.txt and val.txt.
# configs/train_default_model.toml (loom train) trains the default model from the text files;
# scripts/train_tiny_kjv.py (PyTorch, the model's first maker) from the .bin files.
set -euo pipefail
out=$1
mkdir -p "$out"
for p in bible-kjv sentencepiece; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
    echo "install $p first (apt-get install $p)"; exit 1; }
done
echo | bible -f "gen1:1-rev22:21" | sed -E 's/^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ //' | grep -v '^\s*$' > "$out/kjv.txt"
spm_train --input="$out/kjv.txt" --model_prefix="$out/tokenizer" --vocab_size=2000 --model_type=bpe \
  --character_coverage=1.0 --byte_fallback=true --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --input_sentence_size=0 \
  --num_threads=2 > "$out/spm_train.log" 2>&1
spm_encode --model="$out/tokenizer.model" --output_format=id < "$out/kjv.txt" > "$out/kjv.ids"
python3 - "$out" <<'PY'
import array, sys
out = sys.argv[1]
train, val = array.array("H"), array.array("H")
for i, line in enumerate(open(f"{out}/kjv.ids")):
    ids = [1] + [int(t) for t in line.split()]
    (val if i % 50 == 49 else train).extend(ids)
with open(f"{out}/kjv.txt") as verses, open(f"{out}/train.txt", "w") as t, open(f"{out}/val.txt", "w") as v:
    for i, line in enumerate(verses):
        (v if i % 50 == 49 else t).write(line)
for name, a in (("train", train), ("val", val)):
    with open(f"{out}/{name}.bin", "wb") as f:
        a.tofile(f)  # x86-64: little-endian
print(f"verses -> {len(train)} train and {len(val)} validation tokens")
PY
