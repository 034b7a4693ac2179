#!/usr/bin/env python3
"""The decode step's linears: Loom's ways of running them beside PyTorch's matmul, in one run.

usage: bench/linear_vs_torch.py PATH/TO/loom_linear_bench [--tokens 16,32,64,128] [--reps 30] [--json F]

Runs loom_linear_bench (cublasGemmEx with the default algorithm, as the CUDA backend calls it;
the fastest of cuBLASLt's heuristic algorithms, each timed; the skinny tensor-core kernel at its
own K split and at each forced one), then times `x @ w.t()` in PyTorch on the same shapes the
same way: 16 calls, each on its own weight copy (the model's 16 layers, so the weights come from
memory), captured in one CUDA graph, the median of the replays / 16. Prints one table: shape,
tokens, PyTorch us, then Loom's us per way and PyTorch / Loom's best (above 1: Loom is faster).

The shapes are the 1B-shape model's layer linears (bench/gemm_shapes_torch.py). PyTorch writes a
bfloat16 product; Loom's o and down add float32 into the residual (as the backend does), and its
skinny gate/up applies SwiGLU too (half the outputs): the comparison is the layer's work, not the
same kernel contract.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_vs_torch import graph_median_us, run_loom_bench  # noqa: E402  (the same timing and runner)
from gemm_shapes_torch import SHAPES  # noqa: E402

LAYERS = 16


def main():
    rows, json_path = run_loom_bench(sys.argv[1:], __doc__)
    cases = {}
    for r in rows:
        cases.setdefault((r["shape"], r["tokens"]), {})[r["method"]] = r["us"]

    torch.manual_seed(0)
    table = []
    for shape in dict.fromkeys(s for s, _ in cases):
        k, n = SHAPES[shape]
        copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        for (s, tokens), methods in cases.items():
            if s != shape:
                continue
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            peer = graph_median_us(lambda i: x @ copies[i % LAYERS].t(), calls=LAYERS, reps=30, warmup=3)
            lt = min((us for m, us in methods.items() if m.startswith("lt_best")), default=None)
            skinny = {m: us for m, us in methods.items() if m.startswith("skinny_splits_")}
            forced = {m: us for m, us in skinny.items() if m != "skinny_splits_0"}
            best_forced = min(forced, key=forced.get) if forced else None
            best = min([methods["cublas"], *([lt] if lt else []), *skinny.values()])
            table.append({"shape": shape, "tokens": tokens, "torch_us": round(peer, 2), "cublas_us": methods["cublas"],
                          "lt_best_us": lt, "skinny_auto_us": skinny.get("skinny_splits_0"),
                          "skinny_best": best_forced and f"{forced[best_forced]} ({best_forced.rsplit('_', 1)[1]})",
                          "torch_over_loom_best": round(peer / best, 2), "bytes": 2 * k * n})
        del copies

    print("| shape | tokens | PyTorch us | cublasGemmEx us | best cuBLASLt us | skinny (own split) us | skinny best forced (splits) | PyTorch / Loom's best |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in table:
        print(f"| {t['shape']} | {t['tokens']} | {t['torch_us']} | {t['cublas_us']} | {t['lt_best_us']} | "
              f"{t['skinny_auto_us'] if t['skinny_auto_us'] is not None else '-'} | {t['skinny_best'] or '-'} | "
              f"{t['torch_over_loom_best']}x |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"loom": rows, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
