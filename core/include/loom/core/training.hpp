// loom::train: what `loom train MANIFEST` does ([Training]): the manifest's [model] trained on
// its [train] data on the CPU (core/decoder_trainer.hpp: float32, Llama family and GPT-2) or on a
// GPU (core/cuda_trainer.cpp: the Llama family, float32 or bf16 GEMM operands), with AdamW,
// a warmup-then-cosine/linear/constant schedule, gradient accumulation and clipping, validation
// loss and perplexity every eval_every steps, resumable checkpoints and a Hugging Face export.
//
// In train.out it writes:
//   train_log.jsonl   one JSON object per step {"step", "loss", "lr", "grad_norm", "tokens",
//                     "tokens_per_s", "elapsed_s"} and per evaluation {"step", "val_loss",
//                     "val_perplexity"}
//   checkpoint/       the latest resumable state: a model directory (config.json, tokenizer,
//                     model.safetensors in float32) plus optimizer.safetensors and
//                     trainer_state.json (step, data position); `[train] resume` continues it,
//                     giving the same losses as a run that was not interrupted
//   model/            the final model in the Hugging Face layout (what `[model] path` loads)
//   adapter/          instead, when the manifest has an [[adapter]] (LoRA, CPU): the base stays
//                     frozen and the adapter is trained and saved in the PEFT layout
//                     (adapter_config.json, adapter_model.safetensors); checkpoint/ then holds
//                     the adapter, its moments and the state
//   loss.png          the training and validation loss curves (gnuplot, when installed)
// With a [parallel] component (`data`), the process is one rank of a launched world (torchrun's
// RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT or mpirun's): each rank trains on its share of
// every batch, the gradients are summed over the ranks (core/data_parallel.hpp), and rank 0
// alone writes the files above; every rank reads train.resume.
// Errors: loom::Error (manifest category for bad [train] values, runtime otherwise).
// Thread-safety: one call at a time per output directory.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "loom/core/manifest.hpp"

namespace loom {

struct TrainOptions {
  // Stop after this many optimizer steps in this call (saving a checkpoint), as an interrupted
  // run would; 0: run to train.steps.
  int64_t stop_after = 0;
  // A progress line on stderr (step, loss, tokens/s, ETA).
  bool progress = true;
};

struct TrainResult {
  std::vector<std::pair<int64_t, double>> train_loss;  // (step, mean loss of the step's batch), this call's steps
  std::vector<std::pair<int64_t, double>> val_loss;    // (step, validation loss)
  int64_t step = 0;                                    // the last step done
  int64_t train_sequences = 0, validation_sequences = 0;
  std::string device;                                  // where it trained ("cuda:0 float32", "cpu float32 x4 threads")
  std::filesystem::path model_dir;                     // the export (empty when stopped early or training an adapter)
  std::filesystem::path adapter_dir;                   // an adapter run's export in the PEFT layout
  std::filesystem::path plot;                          // loss.png (empty when gnuplot was not found)
  bool writer = true;  // false on the data parallel ranks other than 0, which write nothing
};

TrainResult train(const Manifest &manifest, const TrainOptions &options = {});

}  // namespace loom
