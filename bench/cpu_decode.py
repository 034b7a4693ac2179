#!/usr/bin/env python3
"""CPU decode of the default model: Loom beside Hugging Face transformers, in one run.

usage: bench/cpu_decode.py LOOM_BINARY MODEL_DIR [CORES]
Both generate 128 tokens greedily after the prompt "And God said" (no stop token), float32 on
the CPU (Loom: device and dtype pinned, one thread per core), pinned to the same CORES (default "0,1": the 2-core budget of the issue) with
taskset; transformers uses its KV cache and torch.set_num_threads(len(cores)). Five runs each;
the table gives the median generation tokens/s (Loom's own timing line; transformers' wall time
of generate() minus nothing: prefill of 4 tokens included, which favours Loom by < 4%).
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

TOKENS, RUNS = 128, 5


def loom_rate(binary, model_dir, cores):
    manifest = f"""
[loom]
device = "cpu"
threads = {len(cores.split(','))}
[model]
path = "{os.path.abspath(model_dir)}"
dtype = "float32"
[run]
prompt = "And God said"
steps = {TOKENS}
stop_tokens = []
[attention]
use = "sdpa"
[[sampler]]
use = "greedy"
"""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(manifest)
    rates = []
    for _ in range(RUNS):
        out = subprocess.run(["taskset", "-c", cores, binary, "run", f.name], check=True, capture_output=True,
                             text=True).stdout
        m = re.search(r"generation (\d+) tokens at ([0-9.]+) tokens/s", out)
        assert m and int(m.group(1)) == TOKENS, out
        rates.append(float(m.group(2)))
    return statistics.median(rates)


def hf_rate(model_dir, cores):
    code = f"""
import time, torch, statistics
from transformers import LlamaForCausalLM
torch.set_num_threads({len(cores.split(','))})
m = LlamaForCausalLM.from_pretrained({model_dir!r}, dtype=torch.float32).eval()
x = torch.tensor([[1, 44, 135, 138]])  # BOS + "And God said" (spm_encode)
rates = []
for i in range({RUNS} + 1):
    t = time.perf_counter()
    with torch.no_grad():
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens={TOKENS}, min_new_tokens={TOKENS},
                         do_sample=False, pad_token_id=0)
    if i: rates.append({TOKENS} / (time.perf_counter() - t))  # the first run warms up
print(statistics.median(rates))
"""
    out = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    binary, model_dir = sys.argv[1], sys.argv[2]
    cores = sys.argv[3] if len(sys.argv) > 3 else "0,1"
    ours, theirs = loom_rate(binary, model_dir, cores), hf_rate(model_dir, cores)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}; cores {cores}")
    print("| model | Loom (tokens/s) | transformers (tokens/s) | Loom / transformers |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| {os.path.basename(os.path.normpath(model_dir))}, {TOKENS} tokens greedy, fp32 | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
