#!/usr/bin/env python3
"""The PyTorch side of the [Engine] GPU benchmark: a Llama-3.2-1B-shape model (random weights,
bf16) through Hugging Face transformers and through a minimal compiled PyTorch decoder, beside the
device's own ceilings (copy bandwidth, cuBLAS bf16 GEMM rate), in one run.

usage: bench/llama1b_torch.py [--model-dir DIR] [--json PATH] [--seed N]

1. Model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64,
   intermediate 8192, vocab 128256, tied embeddings, rope_theta 500000 with llama3 scaling:
   factor 32, low/high frequency factors 1/4, original 8192 positions; 131072 positions),
   initialised by transformers' own init (normal, std 0.02) under a fixed seed, cast to bf16 and
   saved with save_pretrained (safetensors) to --model-dir (default /tmp/llama1b-shape), so that
   Loom's benchmark can load the same weights afterwards. When DIR/config.json exists the model is
   loaded from DIR instead.
2. HF transformers in PyTorch eager mode (no torch.compile; attn_implementation as transformers
   picks it, printed: sdpa): a manual greedy loop of model.forward with a DynamicCache (not
   generate()): a random 128-token prompt per sequence is prefilled (logits_to_keep=1), then 128
   decode steps, each one forward on one token per sequence plus an argmax. Decode tokens/s =
   batch * 128 / the time of the 128 steps (CUDA events around the loop, Python overhead
   included), at batch 1 and 32; one full-length untimed pass first (the first pass through the
   cache's growing sizes is several times slower), then --hf-reps timed ones. Prefill tokens/s = 2048 / the time of one forward of a random
   2048-token prompt at batch 1 (use_cache, logits_to_keep=1).
3. A minimal Llama decoder in plain PyTorch on the same weights (taken from the HF model: q/k/v and
   gate/up fused into one matrix each, lm_head = the embedding), with a static KV cache
   preallocated for 256 positions. Its decode step (embedding, 16 layers, final norm, lm_head,
   argmax) is compiled with torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False),
   so it replays as a CUDA graph; one compile per batch size. Its prefill (F.scaled_dot_product_
   attention, is_causal, enable_gqa: flash) writes the cache; it is timed eagerly and compiled
   with torch.compile's default mode (fused elementwise kernels, no CUDA graph); the table gives
   the compiled one. Same measurements as 2. Its logits are checked against HF's (bf16, and a
   float32 copy as the reference) on a 64-token prompt (eager prefill, all positions) and on one
   decode step after it (eager, and compiled as a graph replay), printed as max abs error,
   relative error ||d|| / ||ref|| and argmax agreement; both prefills also on the 2048-token
   prompt (last logits, and the last layer's cached values at every position, poisoned with NaN
   before the compiled run).
4. Device ceilings: median of device-to-device copies of a 1 GiB buffer (2 * bytes / time: bytes
   read + written; and bytes / time), a read-only pass (amax over the same 1 GiB), and cuBLAS bf16
   GEMM rates through torch: 8192^3 and the prefill's fused shapes at 2048 tokens (qkv 2048->3072,
   o 2048->2048, gate_up 2048->16384, down 8192->2048; 4 weight sets in rotation so they come
   from memory, as in the model).
Limits: decode tokens/s limit = batch * bandwidth / weight bytes, bandwidth = 2 * bytes / time of
the copy, weight bytes = every parameter read once per step, 2 bytes each (the 16 layers, the
norms and the lm_head, which is the tied embedding; the embedding lookup reads a few rows only).
KV-cache reads are left out of that limit (printed beside it). Prefill limit = 2048 / (FLOPs /
8192^3 GEMM rate), FLOPs = 2 * tokens * layer parameters + causal attention + one lm_head row.
Every timing is a median over repetitions after warm-up, CUDA events around the region. Prints
tables last; writes all numbers to --json (rewritten after each section, so a run cut short keeps
what it measured).
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

T0 = time.time()

PROMPT, NEW, PREFILL = 128, 128, 2048
CACHE_LEN = PROMPT + NEW  # static cache positions for the decode runs
ROPE_POSITIONS = 4096

CONFIG = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
    max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192})


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def timed_ms(fn):
    start, stop = events()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def median_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = [timed_ms(fn) for _ in range(reps)]
    return statistics.median(times), times


# ---------------------------------------------------------------- device ceilings

def copy_bandwidth(reps=20):
    n = (1 << 30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms, times = median_ms(lambda: dst.copy_(src), 3, reps)
    read_ms, _ = median_ms(lambda: torch.amax(src), 3, reps)
    nbytes = n * 2
    out = {"buffer_bytes": nbytes, "copy_median_ms": ms, "copy_times_ms": times,
           "copy_rw_bytes_per_s": 2 * nbytes / (ms * 1e-3), "copy_bytes_per_s": nbytes / (ms * 1e-3),
           "read_only_amax_median_ms": read_ms, "read_only_bytes_per_s": nbytes / (read_ms * 1e-3)}
    del src, dst
    torch.cuda.empty_cache()
    return out


def gemm_rates():
    out = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = median_ms(lambda: torch.matmul(a, b), 5, 20)
    out["matmul_8192^3"] = {"m": 8192, "n": 8192, "k": 8192, "median_ms": ms, "tflops": 2 * 8192**3 / (ms * 1e-3) / 1e12}
    del a, b
    shapes = {"qkv": (2048, 3072, 2048), "o": (2048, 2048, 2048), "gate_up": (2048, 16384, 2048),
              "down": (2048, 2048, 8192)}
    calls = 20
    for name, (m, n, k) in shapes.items():
        sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                 torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]

        def run():
            for i in range(calls):
                x, w = sets[i % 4]
                F.linear(x, w)

        ms, _ = median_ms(run, 2, 10)
        ms /= calls
        out[f"linear_{name}"] = {"m": m, "n": n, "k": k, "median_ms": ms, "tflops": 2 * m * n * k / (ms * 1e-3) / 1e12}
        del sets
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- the model through transformers

def load_or_create(model_dir, seed):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    created = not os.path.isfile(os.path.join(model_dir, "config.json"))
    if created:
        config = LlamaConfig(**CONFIG)
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
        # Built in bf16 as from_pretrained(dtype=bf16) builds it (not .to(bf16) afterwards, which
        # would also round the rotary inv_freq buffer to bf16); transformers' init, on the GPU.
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        try:
            model.save_pretrained(model_dir, safe_serialization=True)
        except TypeError:  # a transformers without the argument: safetensors is its only format
            model.save_pretrained(model_dir)
    else:
        try:
            model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        except TypeError:
            model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
        model = model.to("cuda")
    model.eval()
    info = {"model_dir": model_dir, "created": created, "seed": seed, "transformers": transformers.__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "files": {f: os.path.getsize(os.path.join(model_dir, f)) for f in sorted(os.listdir(model_dir))}}
    with open(os.path.join(model_dir, "config.json")) as f:
        info["config_json"] = json.load(f)
    try:
        from safetensors import safe_open
        keys = []
        for f in info["files"]:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(model_dir, f), "pt") as st:
                    keys += list(st.keys())
        info["safetensors_tensors"] = len(keys)
        info["safetensors_has_lm_head"] = "lm_head.weight" in keys
    except Exception as e:  # informational only
        info["safetensors_error"] = repr(e)
    info["tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    info["weight_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    info["weight_std"] = {"embed": model.model.embed_tokens.weight.float().std().item(),
                          "layers.0.q_proj": model.model.layers[0].self_attn.q_proj.weight.float().std().item()}
    if not all(math.isfinite(v) and v > 0 for v in info["weight_std"].values()):
        raise RuntimeError(f"weights not initialised: {info['weight_std']}")
    info["rotary_inv_freq_dtype"] = str(getattr(model.model.rotary_emb, "inv_freq", torch.empty(0)).dtype)
    info["parameters"] = sum(p.numel() for p in model.parameters())  # tied counted once
    return model, info


def hf_decode(model, batch, reps, gen):
    prompt = torch.randint(0, CONFIG["vocab_size"], (batch, PROMPT), device="cuda", generator=gen)

    def run(steps):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)

        def loop():
            nonlocal tok, out
            for _ in range(steps):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)

        return timed_ms(loop)

    run(NEW)  # warm-up over the full length: the first pass through the cache's growing sizes is slow
    times = [run(NEW) for _ in range(reps)]
    ms = statistics.median(times)
    return {"batch": batch, "prompt": PROMPT, "steps": NEW, "median_ms": ms, "times_ms": times,
            "tokens_per_s": batch * NEW / (ms * 1e-3), "ms_per_step": ms / NEW}


def hf_prefill(model, reps, gen):
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, PREFILL), device="cuda", generator=gen)
    ms, times = median_ms(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1), 2, reps)
    return {"tokens": PREFILL, "median_ms": ms, "times_ms": times, "tokens_per_s": PREFILL / (ms * 1e-3)}


# ---------------------------------------------------------------- a minimal Llama in plain PyTorch

def llama3_inv_freq(theta, dim, factor, low, high, original):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rms_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rope(x, cos, sin):  # the rotate-half convention of transformers' Llama
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class Layer(torch.nn.Module):
    def __init__(self, hl):
        super().__init__()
        a, m = hl.self_attn, hl.mlp
        p = lambda t: torch.nn.Parameter(t, requires_grad=False)
        self.wqkv = p(torch.cat([a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data]).contiguous())
        self.wo = p(a.o_proj.weight.data)
        self.w13 = p(torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data]).contiguous())
        self.w2 = p(m.down_proj.weight.data)
        self.ln1 = p(hl.input_layernorm.weight.data)
        self.ln2 = p(hl.post_attention_layernorm.weight.data)
        self.register_buffer("k_cache", None)
        self.register_buffer("v_cache", None)


class MiniLlama(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        c = CONFIG
        self.h, self.kv, self.d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.eps = c["rms_norm_eps"]
        self.embed = torch.nn.Parameter(hf.model.embed_tokens.weight.data, requires_grad=False)  # also lm_head
        self.norm = torch.nn.Parameter(hf.model.norm.weight.data, requires_grad=False)
        self.layers = torch.nn.ModuleList(Layer(hl) for hl in hf.model.layers)
        r = c["rope_scaling"]
        inv = llama3_inv_freq(c["rope_theta"], self.d, r["factor"], r["low_freq_factor"], r["high_freq_factor"],
                              r["original_max_position_embeddings"]).cuda()
        freqs = torch.outer(torch.arange(ROPE_POSITIONS, device="cuda", dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), -1)
        self.register_buffer("cos", emb.cos().to(torch.bfloat16))
        self.register_buffer("sin", emb.sin().to(torch.bfloat16))

    def setup_cache(self, batch, length):
        """Zeroed caches of this shape; kept when the shape is the same (so CUDA graphs recorded on
        them stay valid; stale entries past a sequence's position are masked out)."""
        if self.layers[0].k_cache is not None and self.layers[0].k_cache.shape == (batch, self.kv, length, self.d):
            return
        for layer in self.layers:
            layer.k_cache = torch.zeros(batch, self.kv, length, self.d, device="cuda", dtype=torch.bfloat16)
            layer.v_cache = torch.zeros_like(layer.k_cache)
            for t in (layer.k_cache, layer.v_cache):  # updated in place inside the CUDA graph
                torch._dynamo.mark_static_address(t)

    def _qkv(self, layer, x, cos, sin):
        b, t, _ = x.shape
        qkv = F.linear(rms_norm(x, layer.ln1, self.eps), layer.wqkv)
        q, k, v = qkv.split([self.h * self.d, self.kv * self.d, self.kv * self.d], -1)
        q = rope(q.view(b, t, self.h, self.d).transpose(1, 2), cos, sin)
        k = rope(k.view(b, t, self.kv, self.d).transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, self.kv, self.d).transpose(1, 2)

    def _mlp(self, layer, x):
        g, u = F.linear(rms_norm(x, layer.ln2, self.eps), layer.w13).chunk(2, -1)
        return x + F.linear(F.silu(g) * u, layer.w2)

    def prefill(self, tokens, all_logits=False):
        """Positions 0..T-1 of every sequence; writes the cache; SDPA (flash) attention."""
        b, t = tokens.shape
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, cos, sin)
            layer.k_cache[:, :, :t] = k
            layer.v_cache[:, :, :t] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, self.h * self.d), layer.wo)
            x = self._mlp(layer, x)
        x = rms_norm(x if all_logits else x[:, -1:], self.norm, self.eps)
        return F.linear(x, self.embed)


def decode_step(model, tok, pos):
    """One token per sequence at position pos (a 1-element tensor): next tokens (greedy) and logits."""
    b = tok.shape[0]
    h, kv, d = model.h, model.kv, model.d
    x = F.embedding(tok, model.embed)  # [b, 1, hidden]
    cos, sin = model.cos[pos], model.sin[pos]  # [1, d]
    length = model.layers[0].k_cache.shape[2]
    visible = torch.arange(length, device=tok.device) <= pos  # [length]
    for layer in model.layers:
        q, k, v = model._qkv(layer, x, cos, sin)  # [b, heads, 1, d]
        layer.k_cache[:, :, pos] = k
        layer.v_cache[:, :, pos] = v
        qg = q.reshape(b, kv, h // kv, d)  # query head j * group + g reads KV head j
        s = torch.matmul(qg, layer.k_cache.transpose(-1, -2)).float() * (d ** -0.5)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).to(x.dtype)
        o = torch.matmul(p, layer.v_cache).reshape(b, 1, h * d)
        x = x + F.linear(o, layer.wo)
        x = model._mlp(layer, x)
    logits = F.linear(rms_norm(x[:, 0], model.norm, model.eps), model.embed)  # [b, vocab]
    return logits.argmax(-1, keepdim=True), logits


def errors(got, ref, logits=True):
    got, ref = got.float(), ref.float()
    d = got - ref
    out = {"max_abs": d.abs().max().item(), "rel_l2": (d.norm() / ref.norm()).item(), "ref_max_abs": ref.abs().max().item()}
    if logits:
        out["argmax_agree"] = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return out


def hf_cache_layer(cache, i):
    """(keys, values) of layer i of a transformers DynamicCache, [batch, kv heads, positions, head_dim]."""
    if hasattr(cache, "layers"):  # transformers 5
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def check_against_hf(hf, mini, step, gen):
    """Logits of a 64-token prompt (every position) and of one decode step after it: the minimal
    decoder (eager prefill; decode step eager and compiled, the latter as a CUDA graph replay)
    against transformers in bf16, and both against transformers in float32 (the reference)."""
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, 64), device="cuda", generator=gen)
    ref = hf(input_ids=prompt, use_cache=True)
    tok = ref.logits[:, -1].argmax(-1, keepdim=True)
    ref_step = hf(input_ids=tok, past_key_values=ref.past_key_values, use_cache=True).logits[:, -1]
    hf32 = copy.deepcopy(hf).float()
    ref32 = hf32(input_ids=prompt, use_cache=True)
    ref32_step = hf32(input_ids=tok, past_key_values=ref32.past_key_values, use_cache=True).logits[:, -1]
    del hf32
    torch.cuda.empty_cache()
    mini.setup_cache(1, CACHE_LEN)
    got = mini.prefill(prompt, all_logits=True)
    pos = torch.tensor([64], device="cuda")
    _, eager_step = decode_step(mini, tok, pos)
    for _ in range(3):  # compile + warm-up, record, replay: the same cache write each time
        torch.compiler.cudagraph_mark_step_begin()
        _, logits = step(mini, tok, pos)
        logits = logits.clone()
    out = {"prefill_64": errors(got[0], ref.logits[0]),
           "prefill_64_hf_bf16_vs_fp32": errors(ref.logits[0], ref32.logits[0]),
           "prefill_64_minimal_vs_fp32": errors(got[0], ref32.logits[0]),
           "decode_step_at_64": errors(logits, ref_step),
           "decode_step_at_64_eager": errors(eager_step, ref_step),
           "decode_step_at_64_hf_bf16_vs_fp32": errors(ref_step, ref32_step),
           "decode_step_at_64_minimal_vs_fp32": errors(logits, ref32_step)}
    # the rope table against transformers' own, where its rotary module takes (x, position_ids)
    try:
        x = torch.zeros(1, 1, CONFIG["head_dim"], device="cuda", dtype=torch.bfloat16)
        cos, sin = hf.model.rotary_emb(x, torch.arange(ROPE_POSITIONS, device="cuda")[None])
        out["rope_table_max_abs"] = max((cos[0].float() - mini.cos.float()).abs().max().item(),
                                        (sin[0].float() - mini.sin.float()).abs().max().item())
    except Exception as e:
        out["rope_table_error"] = repr(e)
    return out


def mini_decode(mini, step, batch, reps, gen):
    prompt = torch.randint(0, CONFIG["vocab_size"], (batch, PROMPT), device="cuda", generator=gen)
    mini.setup_cache(batch, CACHE_LEN)
    positions = torch.arange(PROMPT, PROMPT + NEW, device="cuda")

    def run(steps):
        tok = mini.prefill(prompt)[:, -1].argmax(-1, keepdim=True)

        def loop():
            nonlocal tok
            for i in range(steps):
                torch.compiler.cudagraph_mark_step_begin()
                nxt, _ = step(mini, tok, positions[i:i + 1])
                tok = nxt.clone()

        return timed_ms(loop)

    t = time.time()
    run(4)  # compile, warm-up, graph capture
    compile_s = time.time() - t
    times = [run(NEW) for _ in range(reps)]
    ms = statistics.median(times)
    return {"batch": batch, "prompt": PROMPT, "steps": NEW, "median_ms": ms, "times_ms": times,
            "tokens_per_s": batch * NEW / (ms * 1e-3), "ms_per_step": ms / NEW, "first_calls_s": compile_s}


def mini_prefill(mini, hf, reps, gen, res):
    """Eager, then compiled (torch.compile default mode: fused elementwise kernels, no CUDA graph).
    Both are checked against transformers in float32 (and transformers in bf16 for scale) on the
    2048-token prompt: the last position's logits, and the last layer's cached values at every
    position (which every position's hidden state in every layer feeds)."""
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, PREFILL), device="cuda", generator=gen)
    last = CONFIG["num_hidden_layers"] - 1
    ref = hf(input_ids=prompt, use_cache=True, logits_to_keep=1)
    ref_v = hf_cache_layer(ref.past_key_values, last)[1].clone()
    ref_logits = ref.logits[0, -1].clone()
    del ref
    hf32 = copy.deepcopy(hf).float()
    ref32 = hf32(input_ids=prompt, use_cache=True, logits_to_keep=1)
    ref32_v = hf_cache_layer(ref32.past_key_values, last)[1].clone()
    ref32_logits = ref32.logits[0, -1].clone()
    del hf32, ref32
    torch.cuda.empty_cache()
    checks = {"hf_bf16_vs_fp32_last_logits": errors(ref_logits, ref32_logits),
              "hf_bf16_vs_fp32_last_layer_v": errors(ref_v, ref32_v, logits=False)}

    mini.setup_cache(1, PREFILL)
    eager_logits = mini.prefill(prompt)[0, -1].clone()
    checks["eager_vs_fp32_last_logits"] = errors(eager_logits, ref32_logits)
    checks["eager_vs_fp32_last_layer_v"] = errors(mini.layers[last].v_cache, ref32_v, logits=False)
    ms, times = median_ms(lambda: mini.prefill(prompt), 2, reps)
    res["prefill_2048_eager"] = {"tokens": PREFILL, "median_ms": ms, "times_ms": times,
                                 "tokens_per_s": PREFILL / (ms * 1e-3)}
    compiled = torch.compile(mini.prefill, fullgraph=True, dynamic=False)
    mini.layers[last].v_cache.fill_(float("nan"))  # poisoned: the compiled prefill must write it all
    t = time.time()
    logits = compiled(prompt)[0, -1].clone()
    first_s = time.time() - t
    checks["compiled_vs_fp32_last_logits"] = errors(logits, ref32_logits)
    checks["compiled_vs_fp32_last_layer_v"] = errors(mini.layers[last].v_cache, ref32_v, logits=False)
    checks["compiled_vs_eager_last_logits"] = errors(logits, eager_logits)
    ms, times = median_ms(lambda: compiled(prompt), 2, reps)
    res["prefill_2048"] = {"tokens": PREFILL, "median_ms": ms, "times_ms": times, "tokens_per_s": PREFILL / (ms * 1e-3),
                           "compiled": True, "first_call_s": first_s, "checks": checks}


# ---------------------------------------------------------------- limits and report

def weight_bytes(params):
    return 2 * params


def kv_bytes_per_seq_step(pos):
    c = CONFIG
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2 * (pos + 1)


def prefill_flops(t):
    c = CONFIG
    h, f, kvd = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    layer_params = h * (h + 2 * kvd) + h * h + 3 * h * f
    attn = 4 * (t * (t + 1) // 2) * c["num_attention_heads"] * c["head_dim"]  # QK^T and PV, causal
    return c["num_hidden_layers"] * (2 * t * layer_params + attn) + 2 * h * c["vocab_size"]


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:,.{digits}f}"


def report(res):
    dev = res.get("device", {})
    print()
    print(f"device: {dev.get('name')}; torch {dev.get('torch')}; transformers {res.get('model', {}).get('transformers')}")
    copy = res.get("copy")
    gemm = res.get("gemm")
    params = res.get("model", {}).get("parameters")
    bw = copy["copy_rw_bytes_per_s"] if copy else None
    wb = weight_bytes(params) if params else None
    peak = gemm["matmul_8192^3"]["tflops"] * 1e12 if gemm else None
    limits = {}
    if bw and wb:
        for b in (1, 32):
            limits[f"decode_b{b}"] = b * bw / wb
            kv = b * statistics.mean(kv_bytes_per_seq_step(p) for p in range(PROMPT, PROMPT + NEW))
            limits[f"decode_b{b}_with_kv"] = b * bw / (wb + kv)
    if peak:
        limits["prefill_2048"] = PREFILL / (prefill_flops(PREFILL) / peak)
    if gemm:
        layer_ms = sum(gemm[f"linear_{n}"]["median_ms"] for n in ("qkv", "o", "gate_up", "down"))
        limits["prefill_2048_measured_gemms"] = PREFILL / (CONFIG["num_hidden_layers"] * layer_ms * 1e-3)
    res["limits"] = limits
    hf, mini = res.get("hf", {}), res.get("mini", {})
    rows = [("decode b1, 128 tokens after 128 (tokens/s)", "decode_b1"),
            ("decode b32, 128 tokens after 128 (tokens/s)", "decode_b32"),
            ("prefill 2048 tokens, b1 (tokens/s)", "prefill_2048")]
    print()
    print("| measurement | HF transformers eager | minimal PyTorch, compiled decode | limit | HF / limit | minimal / limit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, key in rows:
        a = hf.get(key, {}).get("tokens_per_s")
        m = mini.get(key, {}).get("tokens_per_s")
        lim = limits.get(key)
        frac = lambda v: f"{v / lim:.2f}" if v and lim else "n/a"
        print(f"| {label} | {fmt(a)} | {fmt(m)} | {fmt(lim)} | {frac(a)} | {frac(m)} |")
    print()
    print("| device ceiling | value |")
    print("| --- | ---: |")
    if copy:
        print(f"| copy 1 GiB, (read + written) / time (TB/s) | {copy['copy_rw_bytes_per_s'] / 1e12:.3f} |")
        print(f"| copy 1 GiB, bytes copied / time (TB/s) | {copy['copy_bytes_per_s'] / 1e12:.3f} |")
        print(f"| read-only pass (amax) over 1 GiB (TB/s) | {copy['read_only_bytes_per_s'] / 1e12:.3f} |")
    if gemm:
        for k, g in gemm.items():
            print(f"| bf16 {k} ({g['m']} x {g['k']} -> {g['n']}) (TFLOP/s) | {g['tflops']:.1f} |")
    if wb:
        print(f"| weight bytes read per decode step (GB) | {wb / 1e9:.3f} |")
    for k in ("decode_b1_with_kv", "decode_b32_with_kv", "prefill_2048_measured_gemms"):
        if k in limits:
            print(f"| limit {k.replace('_', ' ')} (tokens/s) | {fmt(limits[k])} |")
    for k in ("decode_b1", "decode_b32", "prefill_2048", "prefill_2048_eager"):
        for side, d in (("HF", hf), ("minimal", mini)):
            if k not in d:
                continue
            r = d[k]
            n = r["steps"] if "steps" in r else 1
            unit = "ms per step" if "steps" in r else "ms"
            spread = f" (reps {min(r['times_ms']) / n:.3f} to {max(r['times_ms']) / n:.3f})"
            print(f"| {side} {k.replace('_', ' ')}{' (compiled)' if r.get('compiled') else ''}, {unit} | "
                  f"{r['median_ms'] / n:.3f}{spread} |")
    chk = dict(res.get("check") or {})
    for k, e in mini.get("prefill_2048", {}).get("checks", {}).items():
        chk[f"prefill_2048_{k}"] = e
    for k, e in chk.items():
        if isinstance(e, dict):
            agree = f" / {e['argmax_agree']:.3f}" if "argmax_agree" in e else ""
            print(f"| {k}: max abs / rel L2{' / argmax agree' if agree else ''} | "
                  f"{e['max_abs']:.4f} / {e['rel_l2']:.2e}{agree} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="/tmp/llama1b-shape")
    ap.add_argument("--json", default="llama1b_torch.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-reps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch._logging.set_logs(perf_hints=True)  # says so if CUDA graphs are skipped
    res = {"device": {"name": torch.cuda.get_device_name(0), "torch": torch.__version__},
           "command": " ".join(sys.argv), "errors": {}}

    def save():
        res["elapsed_s"] = time.time() - T0
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)

    def section(name, fn):
        log(f"{name} ...")
        try:
            fn()
        except Exception:
            res["errors"][name] = traceback.format_exc()
            print(res["errors"][name], flush=True)
        save()

    gen = torch.Generator(device="cuda")
    gen.manual_seed(args.seed + 1)
    with torch.no_grad():
        section("copy", lambda: res.__setitem__("copy", copy_bandwidth()))
        section("gemm", lambda: res.__setitem__("gemm", gemm_rates()))
        state = {}

        def model():
            state["hf"], res["model"] = load_or_create(args.model_dir, args.seed)
            print(json.dumps({k: v for k, v in res["model"].items()}, indent=1), flush=True)

        section("model", model)
        hf = state.get("hf")
        if hf is not None:
            res["hf"] = {}
            for b in (1, 32):
                section(f"hf decode b{b}", lambda b=b: res["hf"].__setitem__(f"decode_b{b}", hf_decode(hf, b, args.hf_reps, gen)))
            section("hf prefill", lambda: res["hf"].__setitem__("prefill_2048", hf_prefill(hf, args.reps, gen)))
            res["mini"] = {}
            state["mini"] = MiniLlama(hf)
            step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            section("check", lambda: res.__setitem__("check", check_against_hf(hf, state["mini"], step, gen)))
            print(json.dumps(res.get("check"), indent=1), flush=True)
            for b in (1, 32):
                section(f"minimal decode b{b}",
                        lambda b=b: res["mini"].__setitem__(f"decode_b{b}", mini_decode(state["mini"], step, b, args.reps, gen)))
            section("minimal prefill", lambda: mini_prefill(state["mini"], hf, args.reps, gen, res["mini"]))
    report(res)
    save()
    log(f"done; JSON in {args.json}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
