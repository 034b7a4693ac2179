#!/usr/bin/env python3
"""Tensor parallel inference of the 1B-shape model on several GPUs against one ([Multi-GPU] item 1).

usage: python3 bench/tp_inference_scaling.py LOOM_BINARY [--gpus 2] [--prompt 2048] [--steps 256] [--repeat 1]
                                               [--warmup 1] [--model DIR --check-text FILE
                                               --check-prompts 8 --check-steps 128]

Makes (or reuses) the Llama-3.2-1B-shape model of bench/llama1b_torch.py in /tmp/loom-llama1b
(random bf16 weights, seed 0), then runs `loom run` with flash attention and greedy sampling:
  1 GPU, and N GPUs with [parallel] use = "tensor" (one process per GPU, torchrun's variables,
  NCCL_NVLS_ENABLE=0), the latter twice: with the default one-kernel sums over peer memory for
  small all-reduces (peer_all_reduce = true) and with NCCL for every sum (peer_all_reduce =
  false): a prompt of --prompt random token ids, --steps new tokens. The run's own line gives the
  prefill (prompt tokens/s) and decode (generation tokens/s) rates; with --repeat N each speed
  run is made N times (the runs of the configurations interleaved) and the table gives medians.
  Each speed run first makes --warmup untimed generations (`loom run --warmup`, default 1), so
  that its rates leave out first-use costs (kernel loading, GEMM heuristics, the ranks' start).
  The same two runs on two prompts at once, whose generated token ids are printed: the N-GPU
  run must give the 1-GPU run's tokens.
  --model DIR runs a model of that shape from DIR instead (bench/tp_trained.sh: one trained by
  Loom, whose logits are not the random model's near ties); with --check-text FILE the token check
  runs on --check-prompts prompts, the first eight words of FILE's first lines, for
  --check-steps new tokens each.
"""
import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def toml_prompt(p):
    return '"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(p, str) else str(p)


def manifest(path, model, prompts, steps, parallel, peer=True):
    with open(path, "w") as f:
        f.write(f'[loom]\ndevice = "cuda"\nseed = 1\n\n[model]\npath = "{model}"\n\n[run]\nsteps = {steps}\n'
                f'stop_tokens = []\n')
        if len(prompts) == 1:
            f.write(f"prompt = {toml_prompt(prompts[0])}\n")
        else:
            f.write("prompts = [" + ", ".join(toml_prompt(p) for p in prompts) + "]\n")
        f.write('\n[attention]\nuse = "flash"\n\n[[sampler]]\nuse = "greedy"\n')
        if parallel:
            f.write('\n[parallel]\nuse = "tensor"\n' + ("" if peer else "peer_all_reduce = false\n"))


def launch(loom, toml, world, port, warmup=0, extra=()):
    procs = []
    for r in range(world):
        env = dict(os.environ, NCCL_NVLS_ENABLE="0")
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([loom, "run", toml, *extra] + (["--warmup", str(warmup)] if warmup else []), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate()[0] for p in procs]
    for r, (p, o) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            sys.exit(f"rank {r} of {world} failed ({p.returncode}):\n{o}")
    return outs


def rates(out):
    m = re.search(r"prompt (\d+) tokens at ([\d.]+) tokens/s, generation (\d+) tokens at ([\d.]+) tokens/s", out)
    if not m:
        sys.exit("no rates in:\n" + out)
    return float(m.group(2)), float(m.group(4))


def tokens(out):
    return [line.split("tokens:", 1)[1].split() for line in out.splitlines() if "tokens:" in line]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("loom")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--model", help="a model directory of the 1B shape (default: the random-weight model)")
    ap.add_argument("--check-text", help="text file whose first lines begin the token check's prompts")
    ap.add_argument("--check-prompts", type=int, default=8)
    ap.add_argument("--check-steps", type=int, default=64)
    a = ap.parse_args()
    if a.model:
        model = a.model
    else:
        sys.path.insert(0, HERE)
        import llama1b_torch
        model = "/tmp/loom-llama1b"
        llama1b_torch.load_or_create(model, 0)
        import torch
        torch.cuda.empty_cache()
    rng = random.Random(5)
    long_prompt = [rng.randrange(1, 128000) for _ in range(a.prompt)]
    pair = [[rng.randrange(1, 128000) for _ in range(n)] for n in (37, 90)]
    if a.check_text:
        with open(a.check_text, encoding="utf-8") as f:
            lines = [line.split() for line in f if len(line.split()) >= 8]
        pair = [" ".join(words[:8]) for words in lines[:a.check_prompts]]
    work = tempfile.mkdtemp(prefix="loom-tp-")
    results = {}
    runs = [("1 GPU", 1, True), (f"{a.gpus} GPUs, tensor parallel, NCCL sums", a.gpus, False),
            (f"{a.gpus} GPUs, tensor parallel, peer-memory sums", a.gpus, True)]
    for i, (label, world, peer) in enumerate(runs):
        check = os.path.join(work, f"check{i}.toml")
        manifest(os.path.join(work, f"speed{i}.toml"), model, [long_prompt], a.steps, world > 1, peer)
        manifest(check, model, pair, a.check_steps, world > 1, peer)
        outs = launch(a.loom, check, world, 29800 + i, extra=["--tokens"])
        results[label] = {"rates": [], "tokens": [tokens(o) for o in outs]}
        for o, t in zip(outs, results[label]["tokens"]):  # a check without tokens would pass vacuously
            if len(t) != len(pair) or not all(t):
                sys.exit(f"{label}: expected {len(pair)} sequences of token ids in:\n{o}")
    for k in range(a.repeat):
        for i, (label, world, peer) in enumerate(runs):
            outs = launch(a.loom, os.path.join(work, f"speed{i}.toml"), world, 29700 + 10 * k + i, a.warmup)
            results[label]["rates"].append(rates(outs[0]))
            results[label]["line"] = outs[0].strip().splitlines()[-1]
    for r in results.values():
        r["rates"] = [(statistics.median(x[0] for x in r["rates"]), statistics.median(x[1] for x in r["rates"]))]
    one = results["1 GPU"]
    p1, d1 = one["rates"][0]
    print(f"| run | prefill tokens/s ({a.prompt}-token prompt) | decode tokens/s (batch 1, {a.steps} tokens) | "
          "prefill vs 1 GPU | decode vs 1 GPU | greedy tokens = 1 GPU's |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    ok = True
    notes = []
    for label, r in results.items():
        p, d = r["rates"][0]
        same = all(t == one["tokens"][0] for t in r["tokens"])
        agree = [next((i for i, (x, y) in enumerate(zip(mine, ref)) if x != y), len(ref))
                 for mine, ref in zip(r["tokens"][0], one["tokens"][0])]
        notes.append(f"{label}: tokens equal to 1 GPU's before the first difference, per prompt: {agree} "
                     f"of {[len(t) for t in one['tokens'][0]]}")
        ok = ok and same
        print(f"| {label} (rank 0's line) | {p:,.0f} | {d:,.1f} | {p / p1:.2f}x | {d / d1:.2f}x | {same} |")
    print("\n".join(notes))
    for label, r in results.items():
        print(label, "|", r["line"])
    if not ok:
        for label, r in results.items():
            print(label, "tokens:", r["tokens"][0])
        sys.exit(1)


if __name__ == "__main__":
    main()
