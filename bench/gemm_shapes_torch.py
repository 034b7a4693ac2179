#!/usr/bin/env python3
"""PyTorch's bf16 matmul (cuBLAS) on the linear shapes of the 1B-shape model's decode step.

usage: python3 bench/gemm_shapes_torch.py

For M = 32, 64 and 128 rows (the batch of a decode step) times x @ w.t() for each linear of a
Llama-3.2-1B-shape layer and the lm_head: 10 calls captured in one CUDA graph, each on another
copy of the weight (at least 200 MB of copies in all, so that weights come from memory and not
from L2), 3 warm-up replays, the median of 50 replays divided by 10 (attention_vs_torch's timing). Prints microseconds and the
weight-read rate per shape, and the per-step total (16 layers + lm_head). A reference for the
profile in BENCHMARKS.md ("Where a batch-64 decode step goes").
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_vs_torch import graph_median_us  # noqa: E402  (the same graph-replay timing)

SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048),
          "lm_head": (2048, 128256)}
LAYERS = 16


def main():
    torch.manual_seed(0)
    # Each shape's copies once (about 1.3 GB in all), shared by the three row counts.
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                      for _ in range(int(2e8 // (n * k * 2)) + 1)]
               for name, (k, n) in SHAPES.items()}
    for m in (32, 64, 128):
        total_us, total_bytes = 0.0, 0
        for name, (k, n) in SHAPES.items():
            copies = weights[name]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = graph_median_us(lambda i: x @ copies[i % len(copies)].t(), calls=10, reps=50, warmup=3)
            nbytes = n * k * 2
            times = 1 if name == "lm_head" else LAYERS
            total_us += us * times
            total_bytes += nbytes * times
            print(f"M={m} {name}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s")
        print(f"M={m} per step: {total_us:.0f} us, {total_bytes / total_us / 1e3:.0f} GB/s")


if __name__ == "__main__":
    main()
