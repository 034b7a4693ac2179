#!/usr/bin/env python3
"""[Batching] item 5: serving 256 requests on the Llama-3.2-1B-shape model, Loom's continuous-
batching scheduler against Hugging Face transformers' batched generate(), in one run.

usage: bench/serve_vs_hf.py LOOM_SERVE_BENCH [--model-dir DIR] [--batches 32,64,128]
                            [--requests 256] [--seed 0] [--json PATH] [--skip-hf]

Requests (fixed, documented): --requests prompts of random token ids (uniform over [1000, 100000),
numpy Generator(PCG64, seed)); prompt lengths uniform in [32, 512], output lengths uniform in
[16, 256] (inclusive); every request arrives at time 0. Greedy decoding, no stop token: each
request generates exactly its output length. Written to requests.json beside --json for Loom.

Loom: bench/serve_bench.cpp (LOOM_SERVE_BENCH) with [scheduler] max_seqs = batch limit,
max_batched_tokens 8192, flash attention on a paged KV cache (block 16), bf16.

Peer: transformers' generate() on the same model (bf16, sdpa attention, its default dynamic KV
cache), requests taken in order in static batches of the batch limit, prompts left-padded, each
batch generating the longest output length in it (generate() has one max_new_tokens per call);
only each request's own output tokens count as output. TTFT of a request = the time its batch's
first generated token is known since the start of the whole run (batches run one after another);
ITL = the gaps between the batch's consecutive steps (a LogitsProcessor records the time at each
step; generate() synchronises every step), over each request's own tokens. One warm-up batch of 4
requests first.

Throughput = output tokens / wall time. Roofline (batch limit B, decode-only, bandwidth-bound):
B * bandwidth / bytes read per step, bytes = the weights (every parameter once, bf16) + the KV
cache of B sequences at the requests' mean context (prompt + half the output); bandwidth = the
measured device-to-device copy rate (2 * bytes / time of a 1 GiB copy, median of 20).

The end-to-end throughput includes the prefills and the end of the run, when fewer requests
remain than the batch limit, which the decode-only roofline does not. Two more measures: each
decode step that ran the full batch and nothing else (Loom's step log), against the roofline at
that step's own KV bytes (median over the steps); and the ceiling of this workload, the
throughput with free prefills and every decode step at the roofline (ideal_schedule_ceiling).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama1b_torch  # noqa: E402  (the model: made or loaded, the same weights as the engine bench)


def make_requests(n, seed):
    g = np.random.Generator(np.random.PCG64(seed))
    prompt_lens = g.integers(32, 512, size=n, endpoint=True)
    output_lens = g.integers(16, 256, size=n, endpoint=True)
    prompts = [g.integers(1000, 100000, size=int(l)).tolist() for l in prompt_lens]
    return {"prompts": prompts, "output_lens": [int(x) for x in output_lens], "seed": seed}


def pct(values, p):
    if not values:
        return 0.0
    v = sorted(values)
    at = p * (len(v) - 1)
    lo = int(at)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (at - lo)


class StepClock:
    """A LogitsProcessor that records the wall time of every generation step."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(model, reqs, batch):
    from transformers import LogitsProcessorList

    prompts, outs = reqs["prompts"], reqs["output_lens"]
    ttft, itl, generated = [], [], 0
    t0 = time.perf_counter()
    for b in range(0, len(prompts), batch):
        idx = list(range(b, min(b + batch, len(prompts))))
        longest = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), longest), dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding
            p = prompts[i]
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        clock = StepClock()
        max_new = max(outs[i] for i in idx)
        with torch.no_grad():
            model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                           pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        # The processor runs before a step's token is chosen; the token is known by the next
        # step's call (or the end of generate()).
        known = clock.times[1:] + [time.perf_counter()]
        for i in idx:
            n = outs[i]
            generated += n
            ttft.append(known[0] - t0)
            itl.extend(known[t] - known[t - 1] for t in range(1, n))
    seconds = time.perf_counter() - t0
    return {"side": "hf", "batch": batch, "requests": len(prompts), "output_tokens": generated,
            "seconds": seconds, "output_tok_s": generated / seconds,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p99_ms": 1e3 * pct(itl, 0.99)}


def ideal_schedule_ceiling(reqs, batch, bandwidth, weight_bytes, kv_per_token):
    """Output tokens/s of the requests served at `batch` with free prefills and every decode step
    at the bandwidth bound (weights + the running sequences' KV, read once): first come, first
    served, a finished request's slot taken by the next at once, as Loom's scheduler does. The
    most any engine could reach on this workload, short of the decode-only roofline because
    the batch runs part-empty at the end and the KV grows."""
    waiting = list(zip((len(p) for p in reqs["prompts"]), reqs["output_lens"]))
    waiting.reverse()
    running = []  # [context, tokens still to generate]
    seconds = 0.0
    tokens = 0
    while waiting or running:
        while waiting and len(running) < batch:
            prompt, out = waiting.pop()
            tokens += 1  # the prefill's token
            if out > 1:
                running.append([prompt + 1, out - 1])
        if not running:
            continue
        seconds += (weight_bytes + sum(r[0] for r in running) * kv_per_token) / bandwidth
        tokens += len(running)
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    return tokens / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("loom_bench")
    ap.add_argument("--model-dir", default="/tmp/llama1b-shape")
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="serve.json")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        made = llama1b_torch.load_or_create(args.model_dir, 0)
        del made  # Loom runs next, beside no PyTorch allocation
        torch.cuda.empty_cache()
    reqs = make_requests(args.requests, args.seed)
    req_path = os.path.join(os.path.dirname(os.path.abspath(args.json)), "requests.json")
    with open(req_path, "w") as f:
        json.dump(reqs, f)
    results = {"requests": {"n": args.requests, "seed": args.seed,
                            "prompt_tokens": sum(len(p) for p in reqs["prompts"]),
                            "output_tokens": sum(reqs["output_lens"])}}

    loom = subprocess.run([args.loom_bench, args.model_dir, req_path, "--batches", args.batches],
                          capture_output=True, text=True)
    sys.stderr.write(loom.stderr)
    if loom.returncode != 0:
        print(loom.stdout)
        sys.exit(f"loom_serve_bench failed ({loom.returncode})")
    results["loom"] = [json.loads(line) for line in loom.stdout.splitlines() if line.startswith("{")]

    bandwidth = llama1b_torch.copy_bandwidth()["copy_rw_bytes_per_s"]  # the engine bench's measure
    results["copy_bandwidth_gb_s"] = bandwidth / 1e9
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
    except TypeError:  # an older transformers
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.bfloat16)
    model = model.cuda().eval()
    cfg = model.config
    weight_bytes = 2 * sum(p.numel() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    mean_context = statistics.mean(len(p) for p in reqs["prompts"]) + statistics.mean(reqs["output_lens"]) / 2
    results["roofline"] = {str(b): b * bandwidth / (weight_bytes + b * mean_context * kv_per_token) for b in batches}
    results["ideal_schedule_tok_s"] = {str(b): ideal_schedule_ceiling(reqs, b, bandwidth, weight_bytes, kv_per_token)
                                       for b in batches}
    for r in results["loom"]:  # each full-batch decode step against the roofline at its own KV
        steps = r.get("full_decode_steps", [])
        r["full_decode"] = {
            "steps": len(steps),
            "step_ms_p50": 1e3 * pct([s for s, _ in steps], 0.5),
            "tok_s_p50": pct([r["batch"] / s for s, _ in steps], 0.5),
            "of_roofline_p50": pct([(weight_bytes + c * kv_per_token) / (bandwidth * s) for s, c in steps], 0.5),
        }
    results["hf"] = []
    if not args.skip_hf:
        warm = {"prompts": reqs["prompts"][:4], "output_lens": [8] * 4}
        run_hf(model, warm, 4)
        for b in batches:
            results["hf"].append(run_hf(model, reqs, b))
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

    print(f"{args.requests} requests (seed {args.seed}): prompts 32-512 tokens ({results['requests']['prompt_tokens']} in all), "
          f"outputs 16-256 ({results['requests']['output_tokens']} in all); copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("| batch limit | Loom tok/s | HF tok/s | Loom / HF | roofline tok/s | Loom / roofline | "
          "Loom TTFT p50 / p99 (ms) | HF TTFT p50 / p99 (ms) | Loom ITL p50 / p99 (ms) | HF ITL p50 / p99 (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    hf = {r["batch"]: r for r in results["hf"]}
    for r in results["loom"]:
        b = r["batch"]
        h = hf.get(b)
        roof = results["roofline"][str(b)]
        print(f"| {b} | {r['output_tok_s']:,.0f} | {h['output_tok_s']:,.0f} | {r['output_tok_s'] / h['output_tok_s']:.1f}x | "
              if h else f"| {b} | {r['output_tok_s']:,.0f} | - | - | ", end="")
        print(f"{roof:,.0f} | {r['output_tok_s'] / roof:.0%} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              + (f"{h['ttft_p50_ms']:.0f} / {h['ttft_p99_ms']:.0f} | " if h else "- | ")
              + f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} | "
              + (f"{h['itl_p50_ms']:.2f} / {h['itl_p99_ms']:.2f} |" if h else "- |"))
    print("\nDecode steps at the full batch (every sequence of the limit decoding, nothing prefilling), each "
          "against the roofline at its own KV bytes; and the end-to-end ceiling of this workload (free "
          "prefills, every decode step at the roofline):")
    print("| batch limit | full-batch steps | step ms p50 | tok/s p50 | of roofline p50 | end-to-end ceiling tok/s | "
          "ceiling / roofline | Loom end-to-end / ceiling |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["loom"]:
        b = r["batch"]
        d = r["full_decode"]
        ceiling = results["ideal_schedule_tok_s"][str(b)]
        print(f"| {b} | {d['steps']} | {d['step_ms_p50']:.2f} | {d['tok_s_p50']:,.0f} | {d['of_roofline_p50']:.0%} | "
              f"{ceiling:,.0f} | {ceiling / results['roofline'][str(b)]:.0%} | {r['output_tok_s'] / ceiling:.0%} |")


if __name__ == "__main__":
    main()
