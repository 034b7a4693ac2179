#!/usr/bin/env python3
"""[Training] item 7: GPT-2 124M training throughput, Loom against PyTorch, in one run.

usage: train_gpt2_vs_torch.py LOOM_TRAIN_BENCH [--batch 16] [--seq 1024] [--steps 10] [--skip-compile]

The model: GPT-2 124M (12 layers, 768 wide, 12 heads, vocab 50304, 1024 positions, tied head,
gelu_new), random initial weights, random tokens. A step is forward + backward + gradient
clipping (1.0) + AdamW (lr 6e-4, betas 0.9/0.95, weight decay 0.1), synchronised at its end.
PyTorch peers: a plain GPT-2 module (F.scaled_dot_product_attention, causal: the flash backend),
bf16 autocast, torch.optim.AdamW(fused=True), eager and torch.compile (default mode). Loom:
LOOM_TRAIN_BENCH (bench/train_bench.cpp) on the same shape, bf16 GEMM operands. Medians of the
timed steps after warm-up steps. MFU = tokens/s x FLOPs per token / the bf16 GEMM rate measured
here (8192^3 matmuls); FLOPs per token = 6 N + 12 layers x width x seq (N: parameters without
the position table), the usual estimate for a transformer's forward and backward.
"""
import argparse
import json
import math
import os
import subprocess
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS, WIDTH, HEADS, VOCAB, POSITIONS = 12, 768, 12, 50304, 1024


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH)
        self.c_proj = nn.Linear(WIDTH, WIDTH)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.c_fc = nn.Linear(WIDTH, 4 * WIDTH)
        self.mlp_proj = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(WIDTH, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(POSITIONS, WIDTH)
        self.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def gemm_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 8192 ** 3 / sorted(times)[len(times) // 2]


def torch_steps(compiled, batch, seq, steps, warmup):
    torch.manual_seed(0)
    model = GPT2().cuda()
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    times, loss = [], None
    for s in range(warmup + steps):
        x = torch.randint(0, VOCAB, (batch, seq + 1), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()  # on the host, as Loom's step ends
        torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - start)
    del model, opt
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2], loss_value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("loom_bench")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    tokens = args.batch * args.seq
    n_params = LAYERS * (12 * WIDTH * WIDTH + 13 * WIDTH) + VOCAB * WIDTH + 2 * WIDTH  # without wpe
    flops_per_token = 6 * n_params + 12 * LAYERS * WIDTH * args.seq
    peak = gemm_peak()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16 GEMM rate {peak / 1e12:.1f} TFLOP/s")

    rows = []
    with tempfile.TemporaryDirectory() as d:
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
                  "n_embd": WIDTH, "n_head": HEADS, "n_layer": LAYERS, "n_positions": POSITIONS, "n_inner": None,
                  "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                  "bos_token_id": 50256, "eos_token_id": 50256}
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        out = subprocess.run([args.loom_bench, d, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
                              str(args.steps), "--warmup", str(args.warmup), "--precision", "bf16"],
                             check=True, capture_output=True, text=True).stdout
        loom = json.loads(out.strip().splitlines()[-1])
    rows.append(("Loom (CUDA engine, bf16 GEMMs)", loom["step_s_median"], loom["last_loss"]))
    t, l = torch_steps(False, args.batch, args.seq, args.steps, args.warmup)
    rows.append(("PyTorch eager (bf16 autocast, fused AdamW)", t, l))
    if not args.skip_compile:
        t, l = torch_steps(True, args.batch, args.seq, args.steps, args.warmup)
        rows.append(("PyTorch torch.compile (bf16 autocast, fused AdamW)", t, l))

    print(f"GPT-2 124M, batch {args.batch} x {args.seq} tokens, median of {args.steps} steps after {args.warmup}")
    print("| engine | step ms | tokens/s | MFU | Loom / this | last loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    loom_rate = tokens / rows[0][1]
    for name, step, loss in rows:
        rate = tokens / step
        print(f"| {name} | {step * 1e3:.1f} | {rate:,.0f} | {rate * flops_per_token / peak:.1%} | "
              f"{loom_rate / rate:.2f} | {loss:.3f} |")


if __name__ == "__main__":
    main()
