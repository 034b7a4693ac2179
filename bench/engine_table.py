#!/usr/bin/env python3
"""The [Engine] benchmark table: Loom beside HF transformers (eager) and a compiled PyTorch decoder,
all measured in one run on the same GPU and the same weights.

usage: bench/engine_table.py LOOM_JSON TORCH_JSON
LOOM_JSON comes from loom_model_bench --json, TORCH_JSON from bench/llama1b_torch.py --json.
Ratios above 1 mean Loom is faster. The limits are llama1b_torch.py's, from the same run: decode =
batch x measured copy bandwidth (bytes read + written per second) / bytes read per step (all
weights, the tied lm_head included, plus the KV cache); prefill = 2048 tokens / (the prompt's
FLOPs / the measured cuBLAS bf16 8192^3 GEMM rate).
"""
import json
import sys


def main():
    loom = json.load(open(sys.argv[1]))
    torch = json.load(open(sys.argv[2]))
    hf, mini, limits = torch.get("hf", {}), torch.get("mini", {}), torch.get("limits", {})
    print(f"device: {torch.get('device', {}).get('name')}; Loom backend: {loom.get('backend')}, attention "
          f"{loom.get('attention')}; torch {torch.get('device', {}).get('torch')}")
    print()
    print("| measurement (tokens/s) | Loom | HF eager | compiled PyTorch | Loom / HF | Loom / compiled | limit | "
          "Loom / limit | compiled / limit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [("decode batch 1 (128 after 128)", "decode_b1", "decode_b1_with_kv"),
            ("decode batch 32 (128 after 128)", "decode_b32", "decode_b32_with_kv"),
            ("prefill, one 2048-token prompt", "prefill", "prefill_2048")]
    for label, key, limit_key in rows:
        ours = loom.get(key)
        tkey = "prefill_2048" if key == "prefill" else key
        h = hf.get(tkey, {}).get("tokens_per_s")
        if key == "prefill":
            m = mini.get("prefill_2048_compiled", mini.get("prefill_2048", {})).get("tokens_per_s")
        else:
            m = mini.get(tkey, {}).get("tokens_per_s")
        lim = limits.get(limit_key)

        def f(x, d=1):
            return "n/a" if x is None else f"{x:,.{d}f}"

        def r(a, b):
            return "n/a" if a is None or b is None else f"{a / b:.2f}"

        print(f"| {label} | {f(ours)} | {f(h)} | {f(m)} | {r(ours, h)} | {r(ours, m)} | {f(lim)} | {r(ours, lim)} | "
              f"{r(m, lim)} |")
    print()
    print(f"copy bandwidth (read + written): Loom's measurement {loom.get('copy_bandwidth_gbs', 0):,.0f} GB/s, "
          f"torch's {torch.get('copy', {}).get('copy_rw_bytes_per_s', 0) / 1e9:,.0f} GB/s; cuBLAS bf16 8192^3: "
          f"{loom.get('gemm_tflops', 0):,.0f} TFLOP/s (Loom), "
          f"{torch.get('gemm', {}).get('matmul_8192^3', {}).get('tflops', 0):,.0f} TFLOP/s (torch)")


if __name__ == "__main__":
    main()
