#!/usr/bin/env python3
"""[Speculative] item 5's peer: Hugging Face transformers' own speculative decoding on the same
models and prompts as bench/speculative_bench.cpp, in the same run.

usage: bench/speculative_vs_hf.py BENCH_BINARY TARGET_DIR DRAFT_DIR PROMPTS.jsonl [STEPS] [K] [HF_REPEAT]
                                  [DRAFT_ATTENTION] [TEMPERATURE]

Runs Loom's bench (its table and JSON lines, and the prompts' token ids), then transformers'
generate() at batch 1, greedy, STEPS new tokens with no stop token, bf16 on the GPU: plain,
prompt lookup (prompt_lookup_num_tokens=K) and an assistant model (num_assistant_tokens=K,
constant schedule). A request's decode rate is (tokens - 1) / (time of its last token - time of
its first), taken from a streamer, as Loom's bench does; the fastest of HF_REPEAT runs (default 2;
0 runs Loom's bench alone). TEMPERATURE > 0 has Loom's bench sample (its --temperature) and runs
Loom's bench alone: transformers' runs here are greedy. Prints one table: per workload and mode,
Loom's and transformers' median decode rates and speed-ups over their own plain decoding.
"""
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

bench, target_dir, draft_dir, prompts = sys.argv[1:5]
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 128
k = int(sys.argv[6]) if len(sys.argv) > 6 else 4
hf_repeat = int(sys.argv[7]) if len(sys.argv) > 7 else 2
draft_attention = sys.argv[8] if len(sys.argv) > 8 else "sdpa"  # Loom's attention component for the draft
temperature = sys.argv[9] if len(sys.argv) > 9 else "0"
ids_file = "/tmp/speculative_ids.jsonl"

loom = subprocess.run([bench, "--target", target_dir, "--draft", draft_dir, "--prompts", prompts, "--steps", str(steps),
                       "--k", str(k), "--repeat", "3", "--ids", ids_file, "--draft-attention", draft_attention,
                       "--temperature", temperature], capture_output=True, text=True)
if loom.returncode != 0:
    sys.exit(f"{bench} failed ({loom.returncode}):\n{loom.stdout}\n{loom.stderr}")
loom = loom.stdout
print(loom)
loom_rows = {(r["workload"], r["mode"]): r for r in (json.loads(l) for l in loom.splitlines() if l.startswith("{"))}
if hf_repeat < 1 or float(temperature) > 0:  # Loom's table alone (the peer's runs cost minutes of device time at 1B)
    sys.exit(0)


class Clock(BaseStreamer):
    def __init__(self):
        self.times, self.first = [], True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.extend([now] * value.numel())

    def end(self):
        pass


dev = "cuda"
target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16).to(dev).eval()
draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.bfloat16).to(dev).eval()
draft.generation_config.num_assistant_tokens = k
draft.generation_config.num_assistant_tokens_schedule = "constant"
requests = [json.loads(l) for l in open(ids_file)]
modes = {"plain": {}, f"ngram k={k}": {"prompt_lookup_num_tokens": k}, f"draft-model k={k}": {"assistant_model": draft}}


def decode_rate(ids, extra):
    clock = Clock()
    x = torch.tensor([ids], device=dev)
    with torch.no_grad():
        out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, streamer=clock, pad_token_id=0, **extra)
    t = clock.times
    return (len(t) - 1) / (t[-1] - t[0]), out[0, len(ids):].tolist()


decode_rate(requests[0]["prompt_ids"], {})  # warm-up
rates = {}
for name, extra in modes.items():
    for i, r in enumerate(requests):
        best = max((decode_rate(r["prompt_ids"], extra) for _ in range(hf_repeat)), key=lambda x: x[0])
        rates[(name, i)] = best
print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
print("| workload | mode | Loom tokens/s | Loom speed-up | transformers tokens/s | transformers speed-up | Loom / transformers |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for w in dict.fromkeys(r["workload"] for r in requests):
    idx = [i for i, r in enumerate(requests) if r["workload"] == w]
    for name in modes:
        hf = statistics.median(rates[(name, i)][0] for i in idx)
        hf_up = statistics.median(rates[(name, i)][0] / rates[("plain", i)][0] for i in idx)
        lr = loom_rows[(w, name)]
        print(f"| {w} | {name} | {lr['decode_tokens_per_s']:.1f} | {lr['speedup']:.2f}x | {hf:.1f} | {hf_up:.2f}x | "
              f"{lr['decode_tokens_per_s'] / hf:.2f}x |")
same = sum(rates[("plain", i)][1] == r["tokens"] for i, r in enumerate(requests))
print(f"transformers' plain greedy tokens equal Loom's on {same} of {len(requests)} prompts (bf16)")
