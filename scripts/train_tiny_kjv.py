#!/usr/bin/env python3
"""Trains the default model that ships with Loom (models/tiny-kjv) with PyTorch on a GPU.

usage: train_tiny_kjv.py DATA_DIR OUT_DIR
DATA_DIR holds train.bin and val.bin from scripts/prepare_kjv.sh (uint16 token ids of the King
James Bible, sentencepiece BPE, 2000 pieces). Writes a Hugging Face LlamaForCausalLM (about 1.9M
parameters, bf16 safetensors) to OUT_DIR, keeping the weights of the best validation loss.
Until Loom's own trainer exists ([Training]), this is how the default model is made; it took
under a minute on one H100.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEQ, BATCH, STEPS, LR, WARMUP, EVAL_EVERY = 256, 64, 1000, 2e-3, 100, 100


def batches(data, rng):
    starts = rng.integers(0, len(data) - SEQ - 1, BATCH)
    x = np.stack([data[s:s + SEQ + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x).cuda()


def main():
    data_dir, out = sys.argv[1], sys.argv[2]
    train = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=192, intermediate_size=448, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).cuda()
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {len(train)} train tokens", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    val_rng = np.random.default_rng(1)
    val_batches = [batches(val, val_rng) for _ in range(8)]
    best, best_state, start = float("inf"), None, time.time()
    for step in range(1, STEPS + 1):
        lr = LR * min(1.0, step / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / STEPS)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batches(train, rng)
        # Targets are the inputs shifted by one; the loss is computed here (HF's `labels` would shift again).
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, config.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % EVAL_EVERY == 0 or step == STEPS:
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                v = sum(torch.nn.functional.cross_entropy(model(input_ids=b[:, :-1]).logits.float().reshape(-1, config.vocab_size),
                                                          b[:, 1:].reshape(-1)).item() for b in val_batches) / len(val_batches)
            model.train()
            if v < best:
                best = v
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            print(f"step {step} train {loss.item():.3f} val {v:.3f} ({time.time() - start:.0f} s)", flush=True)
    model.load_state_dict(best_state)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump({"best_val_loss": round(best, 4), "steps": STEPS, "seq": SEQ, "batch": BATCH, "lr": LR,
                   "torch": torch.__version__}, f, indent=1)
    print(f"best validation loss {best:.3f}")


if __name__ == "__main__":
    main()
