#!/usr/bin/env python3
"""Loom's `flash` attention beside PyTorch's scaled_dot_product_attention (flash backend), in one run.

usage: bench/attention_vs_torch.py PATH/TO/loom_attention_bench [loom_attention_bench args...] [--json F]

Runs loom_attention_bench first (its JSON lines give each case and how it was timed), then times
torch.nn.functional.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION) on
the same shapes the same way, and prints one table: case, Loom median (us), PyTorch median (us),
PyTorch / Loom (above 1: Loom is faster; the [Batching] target is >= 0.9).

Same method on both sides: `calls` attention calls captured in one CUDA graph, `warmup` untimed
replays, then `reps` replays each between CUDA events; median over reps, divided by `calls`.
Inputs: bfloat16, uniform in [-1, 1), scale 1/sqrt(head_dim).
  prefill: q, k, v of `batch` sequences of `length` tokens, is_causal=True. q is [B, L, H, D]
           transposed to [B, H, L, D] (a view, as a model hands it over; Loom's q is [T, H, D]).
  decode:  q of one token per sequence over `length` keys, is_causal=False (torch's causal mask is
           top-left aligned, so a 1-token query would see only key 0); K/V rotate over `copies`
           sets, as Loom's caches do, so that each call reads its keys from memory.
GQA, two ways, each timed, the faster one reported: enable_gqa=True on K/V of kv_heads heads
("gqa"), or K/V repeated to all heads beforehand, outside the timed region ("repeat").
Loom's prefill also writes the new k/v into its paged cache inside the timed call (torch has no
cache to write); see bench/attention_bench.cpp.
"""
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def graph_median_us(fn, calls, reps, warmup):
    """fn(i) is the i-th attention call; returns the median microseconds of one call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    for _ in range(warmup):
        graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0 / calls)
    del graph
    times.sort()
    return times[len(times) // 2]


def uniform(*shape):
    return torch.rand(*shape, device="cuda", dtype=torch.float32).mul_(2).sub_(1).to(torch.bfloat16)


def torch_case(c, mode):
    B, L, H, Hkv, D = c["batch"], c["length"], c["heads"], c["kv_heads"], c["head_dim"]
    decode = c["phase"] == "decode"
    copies = c["copies"] if decode else 1
    q = uniform(B, 1 if decode else L, H, D).transpose(1, 2)
    kvs = []
    for _ in range(copies):
        k, v = uniform(B, Hkv, L, D), uniform(B, Hkv, L, D)
        if mode == "repeat":
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        kvs.append((k, v))
    gqa = mode == "gqa"

    def call(i):
        k, v = kvs[i % copies]
        return F.scaled_dot_product_attention(q, k, v, is_causal=not decode, enable_gqa=gqa)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return graph_median_us(call, c["calls"], c["reps"], c["warmup"])


def run_loom_bench(argv, usage):
    """Runs `argv` (a Loom bench and its arguments, less a `--json F` pair, which is returned) and
    returns (its JSON lines, F or None); exits with `usage` when argv is empty."""
    args = list(argv)
    json_path = None
    if "--json" in args:
        i = args.index("--json")
        json_path = args[i + 1]
        del args[i:i + 2]
    if not args:
        sys.exit(usage)
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        sys.exit(f"{args[0]} exited with {run.returncode}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")], json_path


def main():
    ours, json_path = run_loom_bench(sys.argv[1:], __doc__)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; CUDA {torch.version.cuda}")
    rows = []
    for c in ours:
        theirs = {}
        for mode in ("gqa", "repeat"):
            try:
                theirs[mode] = torch_case(c, mode)
            except RuntimeError as e:  # the flash backend refuses the shape in this mode
                print(f"# torch {mode} {c['phase']} b{c['batch']} L{c['length']} hd{c['head_dim']}: "
                      f"{str(e).splitlines()[0]}")
            torch.cuda.empty_cache()
        best = min(theirs, key=theirs.get) if theirs else None
        rows.append({"loom": c, "torch_us": theirs, "torch_best": best})
        others = ", ".join(f"{m} {t:.1f}" for m, t in theirs.items())
        print(f"# {c['phase']} b{c['batch']} L{c['length']} hd{c['head_dim']}: loom {c['median_us']:.1f} us "
              f"({c['tflops']:.0f} TFLOP/s, {c['kv_gbps']:.0f} GB/s KV, |out| max {c['out_max_abs']:.3f}); "
              f"torch {others} us", flush=True)
    heads = f"{ours[0]['heads']}/{ours[0]['kv_heads']}" if ours else "?"
    print(f"\nbf16, causal prefill, {heads} query/KV heads; median of {ours[0]['reps'] if ours else '?'} "
          f"graph replays per case")
    print("| case | Loom (us) | PyTorch (us) | PyTorch GQA | PyTorch / Loom |")
    print("| --- | ---: | ---: | --- | ---: |")
    for r in rows:
        c, best = r["loom"], r["torch_best"]
        name = f"{c['phase']} b{c['batch']} L{c['length']} hd{c['head_dim']}"
        if best is None:
            print(f"| {name} | {c['median_us']:.1f} | - | - | - |")
            continue
        t = r["torch_us"][best]
        print(f"| {name} | {c['median_us']:.1f} | {t:.1f} | {best} | {t / c['median_us']:.2f} |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
