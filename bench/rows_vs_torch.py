#!/usr/bin/env python3
"""Loom's CUDA row kernels beside PyTorch's on the same shapes, in one run.

usage: bench/rows_vs_torch.py PATH/TO/loom_rows_bench
Prints a table: op, shape, Loom median (us), PyTorch median (us), ratio (PyTorch / Loom: above 1
means Loom is faster). PyTorch is timed like Loom: CUDA events around each call, 20 warm-up and
200 timed calls, median. Inputs: float32 normal(0, 3) logits.
"""
import json
import subprocess
import sys

import torch


def median_us(fn):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(20):
        fn()
    times = []
    for _ in range(200):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0)
    times.sort()
    return times[100]


def torch_time(op, rows, cols):
    x = torch.randn(rows, cols, device="cuda") * 3.0
    if op == "softmax":  # out of place (Loom's runs in place): one extra write for PyTorch
        return median_us(lambda: torch.softmax(x, dim=-1))
    return median_us(lambda: torch.argmax(x, dim=-1))


def main():
    ours = [json.loads(line) for line in subprocess.run([sys.argv[1]], check=True, capture_output=True,
                                                      text=True).stdout.splitlines()]
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"| op | rows x cols | Loom (us) | PyTorch (us) | PyTorch / Loom |")
    print(f"| --- | --- | ---: | ---: | ---: |")
    for r in ours:
        theirs = torch_time(r["op"], r["rows"], r["cols"])
        print(f"| {r['op']} | {r['rows']} x {r['cols']} | {r['median_us']:.1f} | {theirs:.1f} | {theirs / r['median_us']:.2f} |")


if __name__ == "__main__":
    main()
