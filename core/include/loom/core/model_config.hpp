// loom::ModelConfig: a Hugging Face config.json read into the geometry Loom's model code needs.
//
// Architectures, chosen by `architectures[0]`: LlamaForCausalLM (Llama 2/3/3.x, SmolLM,
// TinyLlama; rope_scaling type "llama3"), Qwen2ForCausalLM (q/k/v bias), MistralForCausalLM
// (sliding window), GPT2LMHeadModel (learned positions, LayerNorm, GELU). Both the classic keys
// (rope_theta, rope_scaling) and transformers 5's rope_parameters are read.
// Errors: loom::Error (runtime) "path/config.json: key: cause". Thread-safety: value type.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

enum class Architecture { llama, qwen2, mistral, gpt2 };

struct RopeConfig {
  double theta = 10000.0;
  // "default" or "llama3" (Llama 3.1+ frequency scaling); other types are refused.
  std::string type = "default";
  double factor = 1.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  int64_t original_max_positions = 8192;
};

struct ModelConfig {
  Architecture architecture = Architecture::llama;
  std::string architecture_name; // as config.json spells it
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_positions = 0;
  double norm_eps = 1e-5;  // rms_norm_eps, or GPT-2's layer_norm_epsilon
  RopeConfig rope;         // unused by GPT-2
  int64_t sliding_window = 0; // 0: full attention
  bool tie_word_embeddings = false;
  bool attention_bias = false; // q/k/v biases (Qwen2; Llama's attention_bias)
  bool mlp_bias = false;
  std::string activation = "silu"; // silu (gated MLP) or gelu_new (GPT-2)
  std::vector<int32_t> eos_token_ids; // generation_config.json's eos_token_id, else config.json's
  // config.json's "quantization_config" object as JSON text (a pre-quantized Hugging Face
  // checkpoint: AutoAWQ, GPTQ), empty when absent; ModelWeights::load reads it.
  std::string quantization_config;
};

// Parses config.json text; `source` names it in errors.
ModelConfig parse_model_config(std::string_view json_text, const std::string &source);
// Reads <dir>/config.json, then <dir>/generation_config.json when present (its eos_token_id, when
// set, replaces the config's, as in transformers).
ModelConfig load_model_config(const std::filesystem::path &model_dir);
// Merges a generation_config.json text into `config`.
void apply_generation_config(std::string_view json_text, const std::string &source, ModelConfig &config);

const char *architecture_name(Architecture a);

// Copies what a model directory needs besides its weights (config.json, generation_config.json
// and the tokenizer files), those that `from` has, into the existing directory `to`; nothing when
// they are the same directory. For writers of model directories (loom quantize, loom train).
void copy_model_files(const std::filesystem::path &from, const std::filesystem::path &to);

} // namespace loom
