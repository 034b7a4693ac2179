#!/usr/bin/env bash
# usage: scripts/prepare_fortunes.sh OUT_DIR
# Makes the text of the LoRA fine-tune in configs/train_lora_fortunes.toml: every fortune of
# Debian's `fortunes` package (the non-offensive collection in /usr/share/games/fortunes), one
# fortune a line (its lines joined by single spaces), every tenth fortune held out:
# OUT_DIR/train.txt and OUT_DIR/val.txt. The default model never saw this text (it was trained
# on the King James Bible), so validation loss measures what the adapter learns.
set -euo pipefail
out=$1
mkdir -p "$out"
dpkg-query -W -f='${Status}' fortunes 2>/dev/null | grep -q "install ok installed" || {
  echo "install Debian's fortunes first (apt-get install fortunes)"; exit 1; }
dir=/usr/share/games/fortunes
python3 - "$dir" "$out" <<'PY'
import os, sys
src, out = sys.argv[1], sys.argv[2]
fortunes = []
for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    # The collections are the files without an extension (.dat indexes them, .u8 are links).
    if "." in name or not os.path.isfile(path) or os.path.islink(path):
        continue
    text = open(path, encoding="utf-8", errors="replace").read()
    for entry in text.split("\n%\n"):
        one = " ".join(entry.replace("\n%", "").split())
        if one:
            fortunes.append(one)
with open(f"{out}/train.txt", "w") as t, open(f"{out}/val.txt", "w") as v:
    for i, f in enumerate(fortunes):
        (v if i % 10 == 9 else t).write(f + "\n")
print(f"{len(fortunes)} fortunes -> {out}/train.txt, {out}/val.txt (every tenth)")
PY
