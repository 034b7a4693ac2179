#!/usr/bin/env python3
"""Data parallel `loom train` on several GPUs against one GPU ([Parallel], [Multi-GPU]).

usage: python3 bench/ddp_train_scaling.py LOOM_BINARY [--gpus 2] [--steps 30] [--batch 16]

Makes a GPT-2 124M model directory (12 layers, 768 wide, 12 heads, 1024 positions, vocab
50304, tied head; random initial weights from loom.seed) with the byte-level tokenizer of
tests/fixtures/tokenizers/gpt2-style, and a training text from the Python sources installed with
torch (the GPU machine has no network). Then, with torchrun's environment variables on one host
(NCCL_NVLS_ENABLE=0):
  1 GPU,  global batch B            the reference curve and step time
  N GPUs, global batch B            strong scaling: the loss curve must match the reference
  N GPUs, batch B per GPU (N x B)   weak scaling: efficiency = its tokens/s / (N x one GPU's)
  N GPUs, global batch B, ZeRO-1    optimizer state sharded: the same curve again
A step's time is the difference of consecutive "elapsed_s" in the log; the table gives the
median over the steps after the fifth.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(HERE)


def make_model(d):
    os.makedirs(d, exist_ok=True)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "n_inner": None,
        "vocab_size": 50304, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(SOURCE, "tests/fixtures/tokenizers/gpt2-style/tokenizer.json"), d)


def make_text(path, limit=8 << 20):
    import torch  # only for where its sources are
    root = os.path.dirname(torch.__file__)
    with open(path, "w") as out:
        written = 0
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    text = f.read()
                out.write(text)
                written += len(text)
                if written >= limit:
                    return


def manifest(path, model, text, out, batch, steps, parallel, zero=0):
    with open(path, "w") as f:
        f.write(f"""[loom]
seed = 7
device = "cuda"

[model]
path = "{model}"

[train]
data = "{text}"
validation_fraction = 0.0
seq_len = 1024
batch_size = {batch}
steps = {steps}
lr = 6e-4
min_lr = 6e-5
warmup = 5
weight_decay = 0.1
grad_clip = 1.0
precision = "bf16"
init = "random"
eval_every = 0
out = "{out}"
""")
        if parallel:
            f.write(f'\n[parallel]\nuse = "data"\nzero_stage = {zero}\n')


def launch(loom, toml, world, port):
    procs = []
    for r in range(world):
        env = dict(os.environ, NCCL_NVLS_ENABLE="0", LOOM_DEVICE="cuda")
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([loom, "train", toml], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    for r, (p, o) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            sys.exit(f"rank {r} of {world} failed ({p.returncode}):\n{o}")
    return outs[0]


def read_log(out):
    steps = [json.loads(l) for l in open(os.path.join(out, "train_log.jsonl")) if '"loss"' in l]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])][4:]
    return [s["loss"] for s in steps], statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("loom")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="loom-ddp-")
    model, text = os.path.join(work, "gpt2-124m"), os.path.join(work, "text.txt")
    make_model(model)
    make_text(text)
    runs = [("1 GPU, global batch %d" % a.batch, 1, a.batch, False, 0),
            ("%d GPUs, global batch %d" % (a.gpus, a.batch), a.gpus, a.batch, True, 0),
            ("%d GPUs, batch %d per GPU" % (a.gpus, a.batch), a.gpus, a.batch * a.gpus, True, 0),
            ("%d GPUs, global batch %d, ZeRO-1" % (a.gpus, a.batch), a.gpus, a.batch, True, 1)]
    results = []
    for i, (name, world, batch, parallel, zero) in enumerate(runs):
        out = os.path.join(work, "run%d" % i)
        toml = os.path.join(work, "run%d.toml" % i)
        manifest(toml, model, text, out, batch, a.steps, parallel, zero)
        first = launch(a.loom, toml, world, 29600 + i)
        losses, step_s = read_log(out)
        results.append((name, world, batch, losses, step_s, first.strip().splitlines()[-2:]))
    ref = results[0][3]
    one_tok_s = a.batch * 1024 / results[0][4]
    print("| run | ranks | global batch | median step ms | tokens/s | vs one GPU | max rel. loss diff vs 1 GPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, world, batch, losses, step_s, _ in results:
        tok_s = batch * 1024 / step_s
        diff = max(abs(x - y) / abs(y) for x, y in zip(losses, ref)) if batch == a.batch else float("nan")
        print(f"| {name} | {world} | {batch} | {step_s * 1e3:.1f} | {tok_s:,.0f} | {tok_s / one_tok_s:.2f}x | "
              f"{'-' if diff != diff else f'{diff:.2e}'} |")
    weak = results[2]
    eff = weak[2] * 1024 / weak[4] / (a.gpus * one_tok_s)
    print(f"\nweak scaling efficiency ({a.gpus} GPUs, batch {a.batch} per GPU): {eff:.1%}")
    print("first and last losses:", ", ".join(f"{r[0]}: {r[3][0]:.4f} -> {r[3][-1]:.4f}" for r in results))
    for r in results:
        print(r[0], "|", " / ".join(r[5]))


if __name__ == "__main__":
    main()
