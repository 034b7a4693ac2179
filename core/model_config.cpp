#include "loom/core/model_config.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "json_guard.hpp"
#include "loom/core/error.hpp"

namespace loom {

namespace {

using nlohmann::json;

class ConfigReader {
 public:
  ConfigReader(const json &j, std::string source) : j_(j), source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string &key, const std::string &why) const {
    throw runtime_error(source_ + ": " + key + ": " + why);
  }

  bool has(const char *key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  int64_t integer(const char *key, int64_t min, int64_t max) const {
    if (!has(key)) fail(key, "missing");
    return integer_of(j_.at(key), key, min, max);
  }
  int64_t integer_or(const char *key, int64_t fallback, int64_t min, int64_t max) const {
    return has(key) ? integer_of(j_.at(key), key, min, max) : fallback;
  }
  double number_or(const char *key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_number()) fail(key, "expected a number");
    return j_.at(key).get<double>();
  }
  bool boolean_or(const char *key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_boolean()) fail(key, "expected true or false");
    return j_.at(key).get<bool>();
  }
  std::string string_or(const char *key, const std::string &fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_string()) fail(key, "expected a string");
    return j_.at(key).get<std::string>();
  }

  int64_t integer_of(const json &v, const std::string &key, int64_t min, int64_t max) const {
    if (!v.is_number_integer()) fail(key, "expected an integer");
    int64_t x = v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
    if (x < min || x > max) fail(key, std::to_string(x) + " is outside [" + std::to_string(min) + ", " + std::to_string(max) + "]");
    return x;
  }

  const json &json_value() const { return j_; }
  const std::string &source() const { return source_; }

 private:
  const json &j_;
  std::string source_;
};

// Bounds that no real model exceeds; they keep later size arithmetic far from overflow.
constexpr int64_t kMaxVocab = 1 << 22, kMaxHidden = 1 << 16, kMaxLayers = 1024, kMaxHeads = 1024,
                  kMaxPositions = int64_t{1} << 24;

void read_rope(const ConfigReader &r, RopeConfig &rope) {
  const json &j = r.json_value();
  // transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; older files have
  // rope_theta at the top level and rope_scaling {rope_type | type, ...}.
  const json *params = nullptr;
  std::string where;
  if (j.contains("rope_parameters") && !j.at("rope_parameters").is_null()) {
    params = &j.at("rope_parameters");
    where = "rope_parameters";
  } else if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null()) {
    params = &j.at("rope_scaling");
    where = "rope_scaling";
  }
  rope.theta = r.number_or("rope_theta", rope.theta);
  if (params == nullptr) return;
  if (!params->is_object()) r.fail(where, "expected an object");
  ConfigReader p(*params, r.source());
  rope.theta = p.number_or("rope_theta", rope.theta);
  rope.type = p.string_or("rope_type", p.string_or("type", "default"));
  if (rope.type == "default") return;
  if (rope.type != "llama3")
    r.fail(where + ".rope_type", "'" + rope.type + "' is not supported (supported: default, llama3)");
  rope.factor = p.number_or("factor", rope.factor);
  rope.low_freq_factor = p.number_or("low_freq_factor", rope.low_freq_factor);
  rope.high_freq_factor = p.number_or("high_freq_factor", rope.high_freq_factor);
  rope.original_max_positions = p.integer_or("original_max_position_embeddings", rope.original_max_positions, 1, kMaxPositions);
  if (!(rope.factor > 0) || !(rope.low_freq_factor > 0) || !(rope.high_freq_factor > rope.low_freq_factor))
    r.fail(where, "llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0");
}

} // namespace

const char *architecture_name(Architecture a) {
  switch (a) {
  case Architecture::llama: return "LlamaForCausalLM";
  case Architecture::qwen2: return "Qwen2ForCausalLM";
  case Architecture::mistral: return "MistralForCausalLM";
  case Architecture::gpt2: return "GPT2LMHeadModel";
  }
  return "?";
}

ModelConfig parse_model_config(std::string_view text, const std::string &source) {
  if (detail::json_too_deep(text, 32)) throw runtime_error(source + ": JSON nested deeper than 32 levels");
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw runtime_error(source + ": not valid JSON");
  if (!j.is_object()) throw runtime_error(source + ": expected a JSON object");
  ConfigReader r(j, source);
  ModelConfig c;
  if (!j.contains("architectures") || !j.at("architectures").is_array() || j.at("architectures").empty() ||
      !j.at("architectures")[0].is_string())
    r.fail("architectures", "expected a list naming the model class");
  c.architecture_name = j.at("architectures")[0].get<std::string>();
  if (c.architecture_name == "LlamaForCausalLM") c.architecture = Architecture::llama;
  else if (c.architecture_name == "Qwen2ForCausalLM") c.architecture = Architecture::qwen2;
  else if (c.architecture_name == "MistralForCausalLM") c.architecture = Architecture::mistral;
  else if (c.architecture_name == "GPT2LMHeadModel") c.architecture = Architecture::gpt2;
  else
    r.fail("architectures", "'" + c.architecture_name +
                                "' is not supported (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel)");

  c.vocab_size = r.integer("vocab_size", 1, kMaxVocab);
  if (c.architecture == Architecture::gpt2) {
    c.hidden_size = r.integer("n_embd", 1, kMaxHidden);
    c.n_layers = r.integer("n_layer", 1, kMaxLayers);
    c.n_heads = r.integer("n_head", 1, kMaxHeads);
    c.n_kv_heads = c.n_heads;
    c.intermediate_size = r.integer_or("n_inner", 4 * c.hidden_size, 1, kMaxHidden * 8);
    c.max_positions = r.integer("n_positions", 1, kMaxPositions);
    c.norm_eps = r.number_or("layer_norm_epsilon", 1e-5);
    c.activation = r.string_or("activation_function", "gelu_new");
    if (c.activation != "gelu_new") r.fail("activation_function", "'" + c.activation + "' is not supported (gelu_new)");
    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", true);
    c.attention_bias = true;
    c.mlp_bias = true;
    if (!r.boolean_or("scale_attn_weights", true) || r.boolean_or("scale_attn_by_inverse_layer_idx", false) ||
        r.boolean_or("reorder_and_upcast_attn", false))
      r.fail("scale_attn_weights", "only GPT-2's standard attention scaling is supported");
  } else {
    c.hidden_size = r.integer("hidden_size", 1, kMaxHidden);
    c.intermediate_size = r.integer("intermediate_size", 1, kMaxHidden * 8);
    c.n_layers = r.integer("num_hidden_layers", 1, kMaxLayers);
    c.n_heads = r.integer("num_attention_heads", 1, kMaxHeads);
    c.n_kv_heads = r.integer_or("num_key_value_heads", c.n_heads, 1, kMaxHeads);
    c.max_positions = r.integer_or("max_position_embeddings", 2048, 1, kMaxPositions);
    c.norm_eps = r.number_or("rms_norm_eps", 1e-6);
    c.activation = r.string_or("hidden_act", "silu");
    if (c.activation != "silu") r.fail("hidden_act", "'" + c.activation + "' is not supported (silu)");
    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
    c.attention_bias = c.architecture == Architecture::qwen2 ? true : r.boolean_or("attention_bias", false);
    c.mlp_bias = r.boolean_or("mlp_bias", false);
    read_rope(r, c.rope);
    if (c.architecture == Architecture::mistral) c.sliding_window = r.integer_or("sliding_window", 0, 0, kMaxPositions);
    if (c.architecture == Architecture::qwen2 && r.boolean_or("use_sliding_window", false))
      r.fail("use_sliding_window", "Qwen2's sliding-window layers are not supported yet");
  }
  if (c.hidden_size % c.n_heads != 0 && !r.has("head_dim"))
    r.fail("num_attention_heads", "hidden_size " + std::to_string(c.hidden_size) + " is not a multiple of it");
  c.head_dim = r.integer_or("head_dim", c.hidden_size / c.n_heads, 1, 1024);
  if (r.has("eos_token_id")) {
    const json &e = j.at("eos_token_id");
    if (e.is_array()) {
      for (const auto &id : e) c.eos_token_ids.push_back(static_cast<int32_t>(r.integer_of(id, "eos_token_id", 0, c.vocab_size - 1)));
    } else {
      c.eos_token_ids.push_back(static_cast<int32_t>(r.integer_of(e, "eos_token_id", 0, c.vocab_size - 1)));
    }
  }
  if (c.architecture != Architecture::gpt2 && c.head_dim % 2 != 0)
    r.fail("head_dim", std::to_string(c.head_dim) + " is odd; rotary embeddings rotate pairs");
  if (c.n_heads % c.n_kv_heads != 0)
    r.fail("num_key_value_heads", std::to_string(c.n_kv_heads) + " does not divide num_attention_heads " + std::to_string(c.n_heads));
  if (c.architecture == Architecture::gpt2 && c.head_dim * c.n_heads != c.hidden_size)
    r.fail("n_head", "n_embd must be a multiple of n_head");
  if (j.contains("quantization_config") && !j.at("quantization_config").is_null()) {
    if (!j.at("quantization_config").is_object()) r.fail("quantization_config", "expected an object");
    c.quantization_config = j.at("quantization_config").dump();
  }
  return c;
}

namespace {

std::string read_small_file(const std::filesystem::path &path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw runtime_error(path.string() + ": cannot open (not a regular file)");
  if (std::filesystem::file_size(path, ec) > (1u << 24)) throw runtime_error(path.string() + ": larger than 16 MiB, not a config");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw runtime_error(path.string() + ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  if (text.str().size() > (1u << 24)) throw runtime_error(path.string() + ": larger than 16 MiB, not a config");
  return text.str();
}

} // namespace

void apply_generation_config(std::string_view text, const std::string &source, ModelConfig &config) {
  if (detail::json_too_deep(text, 32)) throw runtime_error(source + ": JSON nested deeper than 32 levels");
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) throw runtime_error(source + ": not a JSON object");
  ConfigReader r(j, source);
  if (!r.has("eos_token_id")) return;
  // As transformers: generation_config's eos_token_id replaces the model config's.
  const json &e = j.at("eos_token_id");
  std::vector<int32_t> ids;
  auto add = [&](const json &id) { ids.push_back(static_cast<int32_t>(r.integer_of(id, "eos_token_id", 0, config.vocab_size - 1))); };
  if (e.is_array()) {
    for (const auto &id : e) add(id);
  } else {
    add(e);
  }
  config.eos_token_ids = std::move(ids);
}

ModelConfig load_model_config(const std::filesystem::path &model_dir) {
  std::filesystem::path path = model_dir / "config.json";
  ModelConfig config = parse_model_config(read_small_file(path), path.string());
  // generation_config.json may name more end-of-sequence ids (Llama 3 instruct models do).
  std::filesystem::path generation = model_dir / "generation_config.json";
  if (std::error_code ec; std::filesystem::is_regular_file(generation, ec))
    apply_generation_config(read_small_file(generation), generation.string(), config);
  return config;
}

void copy_model_files(const std::filesystem::path &from, const std::filesystem::path &to) {
  if (std::filesystem::equivalent(from, to)) return;
  for (const char *name : {"config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                           "tokenizer_config.json", "special_tokens_map.json"})
    if (std::filesystem::exists(from / name))
      std::filesystem::copy_file(from / name, to / name, std::filesystem::copy_options::overwrite_existing);
}

} // namespace loom
