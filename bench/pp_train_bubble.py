#!/usr/bin/env python3
"""Pipeline parallel `loom train` on 2 or more GPUs against one GPU ([Parallel], [Multi-GPU] item 3).

usage: python3 bench/pp_train_bubble.py LOOM_BINARY [--steps 16] [--batch 16] [--stages 2]
                                        [--runs 1:even,2:even,4:even,2:8+4,2:9+3]

GPT-2 124M (the model and text of bench/ddp_train_scaling.py: random initial weights, the
byte-level tokenizer, torch's Python sources as text), seq_len 1024, bf16 GEMMs, `--batch`
sequences a step. Runs, with torchrun's environment variables on one host (NCCL_NVLS_ENABLE=0):
  1 GPU                                  the reference curve and step time
  p stages, for each K:SPLIT of --runs   (p = --stages, one GPU each) train.pipeline_micro_batch
                                         = K sequences, so m = batch / K micro-batches under
                                         1F1B; SPLIT "even" (12 / p layers each) or the layers
                                         per stage ("8+4")
Each row gives the largest relative difference of the 2-stage loss curve from the 1-GPU curve,
the median step times (steps after the fifth) and the bubble: the log's "pipeline_idle" (each
stage's time not spent in its own forward and backward passes, measured with CUDA events,
averaged over the stages; median over the steps after the fifth) next to the 1F1B formula
(p - 1) / (m + p - 1) for p stages of equal cost. With 6 + 6 layers the last stage also
runs the head (768 x 50304, about 4.5 layers' worth of FLOPs) and the cross-entropy: the stages
are not of equal cost, and the idle time the formula does not explain is that imbalance; the
uneven splits move layers to the first stage to even it out.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_train_scaling import launch, make_model, make_text, manifest  # noqa: E402


def read_log(out):
    steps = [json.loads(l) for l in open(os.path.join(out, "train_log.jsonl")) if '"loss"' in l]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])][4:]
    idle = [s["pipeline_idle"] for s in steps[5:] if "pipeline_idle" in s]
    return [s["loss"] for s in steps], statistics.median(times), (statistics.median(idle) if idle else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("loom")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--runs", default="1:even,2:even,4:even,2:8+4,2:9+3")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="loom-pp-")
    model, text = os.path.join(work, "gpt2-124m"), os.path.join(work, "text.txt")
    make_model(model)
    make_text(text)
    out = os.path.join(work, "one")
    manifest(out + ".toml", model, text, out, a.batch, a.steps, False)
    launch(a.loom, out + ".toml", 1, 29700)
    ref, one_s, _ = read_log(out)
    rows, p = [], a.stages
    for i, run in enumerate(a.runs.split(",")):
        k, split = run.split(":")
        k, m = int(k), a.batch // int(k)
        out = os.path.join(work, f"stages{i}")
        manifest(out + ".toml", model, text, out, a.batch, a.steps, False)
        with open(out + ".toml") as f:
            toml = f.read().replace("[train]\n", f"[train]\npipeline_micro_batch = {k}\n", 1)
        toml += f'\n[parallel]\nuse = "pipeline"\nstages = {p}\n'
        if split != "even":
            toml += "stage_layers = [%s]\n" % ", ".join(split.split("+"))
        with open(out + ".toml", "w") as f:
            f.write(toml)
        launch(a.loom, out + ".toml", p, 29701 + i)
        got, two_s, idle = read_log(out)
        diff = max(abs(x - y) / abs(y) for x, y in zip(got, ref))
        rows.append((k, m, split, two_s, idle, (p - 1) / (m + p - 1), diff, got[-1]))
    print(f"1 GPU, batch {a.batch} x 1024 tokens: median step {one_s * 1e3:.1f} ms, last loss {ref[-1]:.4f}\n")
    print(f"| sequences per micro-batch | micro-batches m | layers per stage | {p}-stage step ms | speed-up vs 1 GPU | "
          "measured idle (bubble) | 1F1B formula (p-1)/(m+p-1) | max rel. loss diff | last loss |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, m, split, two_s, idle, formula, diff, last in rows:
        layers = " + ".join([str(12 // p)] * p) if split == "even" else split.replace("+", " + ")
        print(f"| {k} | {m} | {layers} | {two_s * 1e3:.1f} | {one_s / two_s:.2f}x | {idle:.3f} | {formula:.3f} | "
              f"{diff:.2e} | {last:.4f} |")


if __name__ == "__main__":
    main()
