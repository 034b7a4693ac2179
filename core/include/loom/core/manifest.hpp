// loom::Manifest: a TOML manifest parsed into a typed, validated spec.
//
// Schema (unknown keys anywhere are errors):
//   [loom]        plugin_paths = [..] (relative to the manifest), device = "auto"|"cpu"|"cuda"|"cuda:N",
//                 seed = int, threads = int (CPU backend threads; 0 = one per hardware thread)
//   [model]       path = a Hugging Face model directory (relative to the manifest); without it,
//                 `loom run` uses a Llama-shaped model with seeded random weights;
//                 dtype = "auto"|"float32"|"bfloat16": the weights' precision ("auto" keeps the
//                 checkpoint's: bfloat16 for bf16/fp16 checkpoints, float32 for fp32 ones)
//   [run]         what `loom run` does (see RunSpec)
//   [embedding]   how the model embeds text for dense retrievers (see EmbeddingSpec)
//   [agent]       the agent loop: the model calls the pipeline's tools (see AgentSpec)
//   [attention] [quantizer] [parallel]                  one component each, optional
//   [[sampler]] [[adapter]] [[retriever]] [[tool]]      ordered lists of components
// A component table carries `use` (component name, required), optional `library` (a path),
// `version` (a range such as ">=1.0, <2"), `name` (its slot name), and the component's own
// parameters, which are checked against the component's declaration when the pipeline is built.
// Errors are loom::Error (manifest) whose message starts with "file:line:col: key.path:".
// Thread-safety: value types; parse functions are reentrant.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "loom/abi.h"
#include "loom/core/component_table.hpp"

namespace loom {

struct ComponentSpec {
  loom_kind kind = 0;
  std::string slot;          // "attention", "sampler[1]", or the table's `name`
  std::string use;           // component name
  std::filesystem::path library; // empty unless the manifest names a library file
  std::string version_range;     // empty = any
  // [[adapter]] weights = "dir": a PEFT adapter directory (adapter_model.safetensors, and
  // adapter_config.json checked against the table) loaded into the adapter once attached.
  std::filesystem::path weights;
  // [[retriever]] index = "dir": what `loom index build --out dir` saved; the retriever loads its
  // own part (dir/<slot>) through the ABI's load when the pipeline is built.
  std::filesystem::path index;
  std::shared_ptr<const ComponentTable> table;
};

// One prompt of a batch ([run] prompts): a text, encoded by the model's tokenizer, or token ids.
struct PromptSpec {
  std::string text;         // non-empty for a text prompt
  std::vector<int32_t> ids; // token ids otherwise
};

struct ToolCallSpec {
  std::string tool;
  std::string arguments_json;
};

// What `loom run` does: the model ([model], or seeded random weights of the geometry below)
// generates `steps` tokens after `prompt` (token ids) through the pipeline's attention,
// quantizer, adapters, parallel strategy and sampler chain; retrievers answer `query`; tools
// run `tool_calls`. The geometry keys apply only without a [model].
struct RunSpec {
  int64_t steps = 16;
  std::vector<int32_t> prompt{1};
  std::string prompt_text;          // set when `prompt` is a string: the model's tokenizer encodes it
  // A batch of prompts instead of `prompt` (or `messages`): generated together, each with the
  // same steps and stop rules; empty when not given.
  std::vector<PromptSpec> prompts;
  // Tokens each of `prompts` may generate (its own `steps`), when given: one per prompt.
  std::vector<int64_t> prompt_steps;
  // Samples per prompt (1-64): each prompt becomes n sequences, prompt-major (sequence
  // p * n + j is sample j of prompt p), sample j drawn with the key nth_sample_seed(seed, j)
  // (request_queue.hpp; sample 0 with the seed itself, so n = 1 is the plain run; the HTTP
  // server's `n` uses the same keys). Not with beam search, {passages} or [agent].
  int64_t n = 1;
  std::vector<int32_t> stop_tokens; // generation ends after one of these
  bool stop_tokens_set = false;     // else the model's eos_token_id stops it
  std::vector<std::string> stop;    // generation ends where its text first contains one of these
  // A conversation (role, content) instead of `prompt`, rendered with `chat_template`
  // ("auto" from the model's tokenizer_config.json, or llama3, chatml, mistral, plain).
  std::vector<std::pair<std::string, std::string>> messages;
  std::string chat_template = "auto";
  std::string query;
  int64_t top_k = 3;
  // A metadata filter every retriever applies to run.query's results (retriever.h's syntax:
  // `source == "plugins.md" && chunk >= 1`); empty: none.
  std::string filter;
  std::vector<ToolCallSpec> tool_calls;
  int64_t vocab_size = 256;
  int64_t hidden_size = 64;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 2;
  int64_t n_layers = 2;
};

// [scheduler]: when given, the run's prompts are served as requests by core's continuous-batching
// scheduler over a paged KV cache (core/serving.cpp) instead of one fixed batch.
struct SchedulerSpec {
  bool enabled = false;             // a [scheduler] table was given
  int64_t max_seqs = 64;            // sequences in one step (the batch limit)
  int64_t max_batched_tokens = 2048; // tokens in one step: decode tokens plus prefill chunks
  bool chunked_prefill = true;      // a long prompt is prefilled over several steps
  bool prefix_caching = true;       // full KV blocks are reused by requests with the same prefix
  int64_t kv_blocks = 0;            // blocks in the KV pool; 0: as many as kv_cache_mib holds
  int64_t kv_cache_mib = 0;         // 0: the backend's default (most of the GPU's free memory)
  // Speculative decoding, with a [drafter] (DESIGN.md "Speculative decoding"): the drafts the
  // drafter may propose per step and sequence (k); with speculative_adaptive each sequence's k
  // follows its acceptance (1 .. speculative_max_tokens).
  int64_t speculative_tokens = 4;
  bool speculative_adaptive = false;
  int64_t speculative_max_tokens = 8;
};

// [embedding]: the model as an embedding model (DESIGN.md, "Embeddings"). With this table the
// host embeds every document `loom index build` adds and every query a run or `loom index
// query` asks, and passes the vectors to the retrievers (loom_document/loom_query.embedding),
// which dense retrievers need and lexical ones ignore.
struct EmbeddingSpec {
  bool enabled = false;          // an [embedding] table was given
  std::string pooling = "mean";  // mean | last: over the final norm's outputs of the text's tokens
  bool normalize = true;         // unit length (L2)
  std::string query_prefix;      // prepended to queries ("query: " for e5-style models)
  std::string document_prefix;   // prepended to documents
  int64_t max_tokens = 512;      // longer texts are cut to their first max_tokens tokens
  int64_t batch = 16;            // texts per forward pass
};

// [agent]: `loom run` as an agent loop (core/agent_loop.cpp, DESIGN.md "Agent loop"): each
// turn the model writes one JSON action, constrained by a grammar built from the tools'
// schemas, either {"tool": NAME, "arguments": {...}} or {"final": "answer"}; arguments are
// validated against the tool's schema before it runs, and its (capped) result is fed back as
// untrusted text. The loop stops at a final answer, max_steps turns, the max_tokens budget, a
// call identical to an earlier one, or a conversation that leaves no room for another turn.
struct AgentSpec {
  bool enabled = false;
  int64_t max_steps = 6;           // model turns
  int64_t max_tokens = 1024;       // tokens generated over the whole loop
  int64_t step_tokens = 256;       // tokens of one turn
  double call_timeout_s = 30.0;    // a tool call's time limit (the loop then goes on without it)
  int64_t max_result_bytes = 4096; // a tool result is cut off here before the model sees it
  std::vector<std::string> tools;  // the tools offered (names); empty: every tool of the pipeline
  // json: the grammar-constrained JSON action above. native: no grammar; the model calls tools
  // in its family's own format (<tool_call>{"name", "arguments"}</tool_call> as Hermes and Qwen
  // write it; a bare {"name", "parameters"} object for Llama 3), and plain text is its answer.
  std::string format = "json";
};

// [train]: what `loom train` does with the [model] (core/training_run.cpp). Paths are resolved
// against the manifest's directory.
struct TrainSpec {
  bool enabled = false;                      // a [train] table was given
  std::filesystem::path data;                // .txt (one document a line) or .jsonl ("text" or chat "messages")
  std::filesystem::path validation_data;     // optional; else validation_fraction of the data's sequences
  double validation_fraction = 0.05;
  int64_t seq_len = 128;                     // tokens per packed training sequence
  int64_t batch_size = 8;                    // sequences per micro-batch
  int64_t grad_accum = 1;                    // micro-batches per optimizer step
  int64_t steps = 100;                       // optimizer steps
  double lr = 1e-3, min_lr = 0.0;            // peak and final learning rate
  std::string schedule = "cosine";           // cosine | linear | constant (after warmup)
  int64_t warmup = 0;                        // steps of linear warmup from 0
  double weight_decay = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double grad_clip = 1.0;                    // max global gradient norm; 0 = no clipping
  bool recompute = false;                    // activation recomputation (less memory, one more forward)
  // Who computes attention and its gradients: "core" (the trainer's own) or "plugin" (the
  // pipeline's [attention] component, its forward and backward; the CPU engine, float32).
  std::string attention = "core";
  // Pipeline parallel: sequences per pipeline micro-batch (1F1B runs a rank's share of each
  // micro-batch above as share / pipeline_micro_batch pipeline micro-batches); must divide it.
  int64_t pipeline_micro_batch = 1;
  // float32 | bf16: on CUDA, bf16 rounds the linears' GEMM operands to bfloat16 (float32 master
  // weights, gradients, optimizer state and accumulation); the CPU computes in float32 and refuses bf16.
  std::string precision = "float32";
  // pretrained: start from the [model]'s weights; random: pretrain from transformers-style random
  // weights (seeded by loom.seed; the [model] directory gives only config.json and the tokenizer).
  std::string init = "pretrained";
  std::string save_dtype = "float32";        // the exported model/'s tensors: float32 | bfloat16 (checkpoints stay float32)
  int64_t eval_every = 0;                    // validation every N steps (0: at the end only)
  int64_t save_every = 0;                    // a resumable checkpoint every N steps (0: at the end only)
  std::filesystem::path out;                 // output directory (checkpoints, the exported model, log, plot)
  std::filesystem::path resume;              // a checkpoint directory to continue from; empty: start fresh
};

// [server]: `loom serve`'s HTTP front end (hosts/server). Generation goes through [scheduler],
// which serving needs.
struct ServerSpec {
  bool enabled = false;                 // a [server] table was given
  std::string host = "127.0.0.1";
  int64_t port = 8080;                  // 0: any free port (printed at start)
  std::string model_name;               // the id /v1/models lists and requests name; "": the model directory's name
  std::vector<std::string> api_keys;    // Bearer keys for every route but /health (none: no auth)
  std::string admin_key;                // Bearer key for /admin routes ("" : admin routes refused)
  int64_t max_queue = 64;               // requests waiting beyond [scheduler] max_seqs; more get 429
  int64_t max_body_bytes = 1 << 20;     // larger bodies get 413
  int64_t max_tokens = 256;             // a request's max_tokens when it gives none
  int64_t max_positions = 0;            // prompt + new tokens of one request; 0: the model's
  double request_timeout_s = 600;       // a generation running longer ends (finish_reason "length")
  double drain_timeout_s = 30;          // SIGTERM: how long in-flight requests may finish
  int64_t max_connections = 2048;       // connection threads; more connections wait for one
  double read_timeout_s = 10;           // an idle or slow connection is closed after this
};

struct Manifest {
  std::string source_name;             // file path or a caller-given name
  std::filesystem::path base_dir;      // relative paths resolve against it
  std::vector<std::filesystem::path> plugin_paths;
  std::string device = "auto";
  uint64_t seed = 0;
  int64_t threads = 0;              // [loom] threads; 0 = one per hardware thread
  std::filesystem::path model_path; // empty: the synthetic model
  std::string model_dtype = "auto"; // [model] dtype: auto, float32 or bfloat16
  // [model] calibration: a text file (one passage a line) whose activations the quantizer sees
  // (activation-aware methods such as int4's "awq"); empty: none. Each line is encoded with BOS
  // and lines are packed into sequences of at most calibration_length tokens, up to
  // calibration_tokens tokens in all.
  std::filesystem::path calibration_path;
  int64_t calibration_tokens = 512;
  int64_t calibration_length = 256;
  RunSpec run;
  EmbeddingSpec embedding;
  AgentSpec agent;
  SchedulerSpec scheduler;
  ServerSpec server;
  TrainSpec train;
  std::vector<ComponentSpec> components; // manifest order within each kind

  std::vector<const ComponentSpec *> of_kind(loom_kind kind) const;
};

// `overrides` are "key.path=value" strings (the CLI's --set): the value is a TOML value, or a
// bare string when it does not parse as one. They apply before validation.
Manifest parse_manifest_file(const std::filesystem::path &path,
                             const std::vector<std::string> &overrides = {});
Manifest parse_manifest_string(std::string_view text, std::string_view source_name,
                               const std::vector<std::string> &overrides = {},
                               const std::filesystem::path &base_dir = {});

// One component table given as TOML text (hot swap): `use = "top-k"\nk = 5`.
ComponentSpec parse_component_spec(loom_kind kind, std::string_view slot, std::string_view text,
                                   std::string_view source_name,
                                   const std::filesystem::path &base_dir = {});

const char *kind_name(loom_kind kind);          // "sampler"; "unknown" otherwise
loom_kind kind_from_name(std::string_view name); // 0 when unknown
bool kind_is_list(loom_kind kind);               // sampler, adapter, retriever, tool

} // namespace loom
