#!/usr/bin/env python3
"""Training text for the speculative-decoding benchmark's models that includes rewriting examples.

usage: bench/speculative_copy_data.py TRAIN.txt OUT.txt [EVERY]

The copying workload of bench/speculative_prompts.py gives a model a passage of 4 held-out
verses and then the passage's first 8 words again: a model asked to rewrite a passage, which an
instruction-tuned model does and a model trained only on verses, one a line, does only in part
(the 1B-class target kept 27% of prompt lookup's drafts). So the models are trained on the same
corpus with rewriting shown by example: OUT.txt holds every line of TRAIN.txt, in order, and
after every EVERY-th group of 4 consecutive verses (default 8) one more line, that group's
passage written twice ("v1 v2 v3 v4 v1 v2 v3 v4", one document as the trainer reads a line).
Only training verses are used; the benchmark's prompts and the validation loss come from
val.txt, which this does not touch.
"""
import sys

src, out = sys.argv[1], sys.argv[2]
every = int(sys.argv[3]) if len(sys.argv) > 3 else 8
if every < 1:
    sys.exit(f"speculative_copy_data.py: EVERY must be at least 1 (got {every})")
verses = [line.rstrip("\n") for line in open(src, encoding="utf-8")]
verses = [v for v in verses if v.strip()]
copies = 0
with open(out, "w", encoding="utf-8") as f:
    for g in range(0, len(verses), 4):
        group = verses[g:g + 4]
        f.write("\n".join(group) + "\n")
        if len(group) == 4 and (g // 4) % every == every - 1:
            passage = " ".join(v.strip() for v in group)
            f.write(passage + " " + passage + "\n")
            copies += 1
print(f"{out}: {len(verses)} verses and {copies} passages written twice (one group of 4 in {every})")
