#!/usr/bin/env python3
"""Prompts of bench/speculative_bench.cpp, from the held-out verses of scripts/prepare_kjv.sh.

usage: bench/speculative_prompts.py KJV_DIR OUT.jsonl [N]

Two workloads, N prompts each (default 16), from val.txt (verses never trained on):
  continue  the first 8 words of a verse: free generation, where a draft model helps;
  copy      a passage of 4 consecutive verses followed by its first 8 words again: the model
            is asked (by example) to write the passage out a second time, the input-copying
            workload that prompt lookup is for.
"""
import json
import sys

kjv, out = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
verses = [v.strip() for v in open(f"{kjv}/val.txt") if len(v.split()) >= 12]
step = len(verses) // (n + 1)
with open(out, "w") as f:
    for i in range(n):
        v = verses[i * step]
        f.write(json.dumps({"workload": "continue", "prompt": " ".join(v.split()[:8])}) + "\n")
    for i in range(n):
        passage = " ".join(verses[i * step + 1:i * step + 5])
        f.write(json.dumps({"workload": "copy", "prompt": passage + " " + " ".join(passage.split()[:8])}) + "\n")
