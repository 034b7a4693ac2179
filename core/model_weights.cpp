#include "loom/core/model_weights.hpp"

#include <cstring>
#include <span>

#include "loom/core/error.hpp"

#include <nlohmann/json.hpp>

namespace loom {

namespace {

float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else { // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

bool weight_dtype(SafetensorsDtype d) {
  return d == SafetensorsDtype::F32 || d == SafetensorsDtype::F16 || d == SafetensorsDtype::BF16;
}

// F32, F16 or BF16 bytes (checked at load) to float32 values.
std::vector<float> to_float(SafetensorsDtype dtype, std::span<const std::byte> bytes) {
  const std::byte *p = bytes.data(); // may be unaligned: copy element by element
  const size_t numel = bytes.size() / dtype_size(dtype);
  std::vector<float> out(numel);
  switch (dtype) {
  case SafetensorsDtype::F32:
    if (numel) std::memcpy(out.data(), p, numel * 4);
    break;
  case SafetensorsDtype::F16:
    for (size_t i = 0; i < numel; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = half_to_float(h);
    }
    break;
  default: // BF16
    for (size_t i = 0; i < numel; ++i) {
      uint16_t b;
      std::memcpy(&b, p + 2 * i, 2);
      uint32_t bits = static_cast<uint32_t>(b) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
    break;
  }
  return out;
}

std::string shape_string(const std::vector<int64_t> &s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

bool ignorable_buffer(std::string_view name) {
  auto ends = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.substr(name.size() - suffix.size()) == suffix;
  };
  return ends("rotary_emb.inv_freq") || ends(".attn.masked_bias");
}

} // namespace

std::vector<float> tensor_as_float(SafetensorsDtype dtype, std::span<const std::byte> bytes) {
  if (!weight_dtype(dtype)) throw runtime_error(std::string("dtype ") + dtype_name(dtype) + " is not F32, F16 or BF16");
  return to_float(dtype, bytes);
}

std::map<std::string, std::vector<int64_t>> expected_weights(const ModelConfig &c) {
  std::map<std::string, std::vector<int64_t>> w;
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, hd = c.head_dim;
  if (c.architecture == Architecture::gpt2) {
    w["wte.weight"] = {V, H};
    w["wpe.weight"] = {c.max_positions, H};
    for (int64_t l = 0; l < c.n_layers; ++l) {
      std::string p = "h." + std::to_string(l) + ".";
      w[p + "ln_1.weight"] = {H};
      w[p + "ln_1.bias"] = {H};
      // Conv1D: [in, out]. The attention's width is the heads' (H itself, except on a tensor
      // parallel rank, whose config has its share of the heads).
      w[p + "attn.c_attn.weight"] = {H, 3 * c.n_heads * c.head_dim};
      w[p + "attn.c_attn.bias"] = {3 * c.n_heads * c.head_dim};
      w[p + "attn.c_proj.weight"] = {c.n_heads * c.head_dim, H};
      w[p + "attn.c_proj.bias"] = {H};
      w[p + "ln_2.weight"] = {H};
      w[p + "ln_2.bias"] = {H};
      w[p + "mlp.c_fc.weight"] = {H, I};
      w[p + "mlp.c_fc.bias"] = {I};
      w[p + "mlp.c_proj.weight"] = {I, H};
      w[p + "mlp.c_proj.bias"] = {H};
    }
    w["ln_f.weight"] = {H};
    w["ln_f.bias"] = {H};
    if (!c.tie_word_embeddings) w["lm_head.weight"] = {V, H};
    return w;
  }
  w["model.embed_tokens.weight"] = {V, H};
  for (int64_t l = 0; l < c.n_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    w[p + "input_layernorm.weight"] = {H};
    w[p + "post_attention_layernorm.weight"] = {H};
    w[p + "self_attn.q_proj.weight"] = {c.n_heads * hd, H};
    w[p + "self_attn.k_proj.weight"] = {c.n_kv_heads * hd, H};
    w[p + "self_attn.v_proj.weight"] = {c.n_kv_heads * hd, H};
    w[p + "self_attn.o_proj.weight"] = {H, c.n_heads * hd};
    if (c.attention_bias) {
      w[p + "self_attn.q_proj.bias"] = {c.n_heads * hd};
      w[p + "self_attn.k_proj.bias"] = {c.n_kv_heads * hd};
      w[p + "self_attn.v_proj.bias"] = {c.n_kv_heads * hd};
      if (c.architecture == Architecture::llama) w[p + "self_attn.o_proj.bias"] = {H};
    }
    w[p + "mlp.gate_proj.weight"] = {I, H};
    w[p + "mlp.up_proj.weight"] = {I, H};
    w[p + "mlp.down_proj.weight"] = {H, I};
    if (c.mlp_bias) {
      w[p + "mlp.gate_proj.bias"] = {I};
      w[p + "mlp.up_proj.bias"] = {I};
      w[p + "mlp.down_proj.bias"] = {H};
    }
  }
  w["model.norm.weight"] = {H};
  if (!c.tie_word_embeddings) w["lm_head.weight"] = {V, H};
  return w;
}

namespace {

// The checkpoint's "loom.quantization" metadata, checked against the model's linears; the
// modules' weights leave `expected`.
std::shared_ptr<QuantizedCheckpoint> read_quantization(const ModelConfig &config, const SafetensorsIndex &checkpoint,
                                                       std::map<std::string, std::vector<int64_t>> &expected) {
  auto it = checkpoint.metadata().find(QuantizedCheckpoint::kMetadataKey);
  if (it == checkpoint.metadata().end()) return nullptr;
  const std::string where = checkpoint.path().string() + ": __metadata__ " + QuantizedCheckpoint::kMetadataKey + ": ";
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception &e) {
    throw runtime_error(where + "not valid JSON (" + e.what() + ")");
  }
  if (config.architecture == Architecture::gpt2)
    throw runtime_error(where + "quantized GPT-2 checkpoints are not supported (Llama-family only)");
  if (!j.is_object() || !j.contains("quantizer") || !j["quantizer"].is_string() || !j.contains("modules") ||
      !j["modules"].is_object())
    throw runtime_error(where + "expected {\"quantizer\": name, \"modules\": {...}}");
  auto q = std::make_shared<QuantizedCheckpoint>();
  q->quantizer = j["quantizer"].get<std::string>();
  q->version = j.value("version", std::string());
  for (const auto &[module, m] : j["modules"].items()) {
    const std::string at = where + "module " + module + ": ";
    if (!m.is_object() || !m.contains("shape") || !m["shape"].is_array() || !m.contains("metadata") ||
        !m["metadata"].is_object())
      throw runtime_error(at + "expected {\"shape\": [out, in], \"metadata\": {...}}");
    QuantizedModule qm;
    for (const auto &d : m["shape"]) {
      if (!d.is_number_integer()) throw runtime_error(at + "shape must hold integers");
      qm.shape.push_back(d.get<int64_t>());
    }
    const bool tied_head = config.tie_word_embeddings && module == "lm_head";
    auto e = expected.find(module + ".weight");
    const std::vector<int64_t> want = tied_head ? std::vector<int64_t>{config.vocab_size, config.hidden_size}
                                      : e != expected.end() ? e->second : std::vector<int64_t>{};
    if (want.size() != 2) throw runtime_error(at + "not a linear layer of " + config.architecture_name + " with this config");
    if (qm.shape != want)
      throw runtime_error(at + "shape " + shape_string(qm.shape) + " does not match the config's " + shape_string(want));
    qm.metadata = m["metadata"].dump();
    if (!tied_head) expected.erase(e);
    q->modules.emplace(module, std::move(qm));
  }
  return q;
}

// A Hugging Face checkpoint quantized to 4 bits by AutoAWQ (GEMM layout) or GPTQ, described by
// config.json's quantization_config: every linear with a "<module>.qweight" tensor is handed to
// the `int4` quantizer with metadata naming the layout (plugins/quant_int4/int4_hf_layouts.hpp).
std::shared_ptr<QuantizedCheckpoint> read_hf_quantization(const ModelConfig &config, const SafetensorsIndex &checkpoint,
                                                          std::map<std::string, std::vector<int64_t>> &expected) {
  if (config.quantization_config.empty()) return nullptr;
  const std::string where = "config.json: quantization_config.";
  const nlohmann::json j = nlohmann::json::parse(config.quantization_config);
  const std::string method = j.contains("quant_method") && j["quant_method"].is_string() ? j["quant_method"].get<std::string>() : "";
  if (method != "awq" && method != "gptq")
    throw runtime_error(where + "quant_method: '" + method +
                        "' checkpoints do not load (Loom loads 4-bit AutoAWQ GEMM (\"awq\") and GPTQ (\"gptq\") checkpoints)");
  if (config.architecture == Architecture::gpt2) throw runtime_error(where + "quant_method: quantized GPT-2 checkpoints are not supported");
  auto integer = [&](const char *key) {
    if (!j.contains(key) || !j[key].is_number_integer()) throw runtime_error(where + key + ": expected an integer");
    return j[key].get<int64_t>();
  };
  if (integer("bits") != 4) throw runtime_error(where + "bits: " + std::to_string(integer("bits")) + " (only 4-bit checkpoints load)");
  const int64_t group = integer("group_size");
  nlohmann::json base{{"bits", 4}};
  if (method == "awq") {
    const std::string version = j.value("version", std::string("gemm"));
    if (version != "gemm" && version != "GEMM")
      throw runtime_error(where + "version: '" + version + "' (AutoAWQ's GEMM layout loads; GEMV, Marlin and ExLlama do not)");
    if (!j.value("zero_point", true)) throw runtime_error(where + "zero_point: false (AutoAWQ checkpoints without zero points do not load)");
    base["format"] = "autoawq-gemm";
  } else {
    if (j.value("desc_act", false)) throw runtime_error(where + "desc_act: true (act-order GPTQ checkpoints do not load)");
    const std::string format = j.value("checkpoint_format", std::string("gptq"));
    if (format != "gptq" && format != "gptq_v2")
      throw runtime_error(where + "checkpoint_format: '" + format + "' (\"gptq\" and \"gptq_v2\" load)");
    base["format"] = "gptq";
    base["zero_offset"] = format == "gptq" ? 1 : 0; // v1 stores zero points less one
  }
  auto q = std::make_shared<QuantizedCheckpoint>();
  q->quantizer = "int4";
  q->version = method;
  q->source = method == "awq" ? "AutoAWQ" : "GPTQ";
  for (const auto &[file, shard] : checkpoint.shards())
    for (const auto &t : shard.tensors()) {
      const std::string_view suffix = ".qweight";
      if (t.name.size() <= suffix.size() || !t.name.ends_with(suffix)) continue;
      const std::string module = t.name.substr(0, t.name.size() - suffix.size());
      auto e = expected.find(module + ".weight");
      if (e == expected.end() || e->second.size() != 2)
        throw runtime_error(shard.path().string() + ": " + t.name + ": not a linear layer of " + config.architecture_name +
                            " with this config");
      QuantizedModule qm;
      qm.shape = e->second;
      nlohmann::json meta = base;
      meta["out"] = qm.shape[0];
      meta["in"] = qm.shape[1];
      meta["group_size"] = group == -1 ? qm.shape[1] : group; // -1: one group per row (GPTQ)
      qm.metadata = meta.dump();
      expected.erase(e);
      q->modules.emplace(module, std::move(qm));
    }
  if (q->modules.empty())
    throw runtime_error(checkpoint.path().string() + ": config.json has a quantization_config (" + method +
                        "), but the checkpoint holds no \"<module>.qweight\" tensor");
  return q;
}

} // namespace

std::string_view QuantizedCheckpoint::module_of(std::string_view tensor) const {
  const size_t dot = tensor.rfind('.');
  if (dot == std::string_view::npos || tensor.substr(dot + 1) == "bias") return {};
  auto it = modules.find(tensor.substr(0, dot));
  return it == modules.end() ? std::string_view{} : std::string_view(it->first);
}

ModelWeights ModelWeights::load(const ModelConfig &config, const SafetensorsIndex &checkpoint) {
  auto expected = expected_weights(config);
  ModelWeights out;
  out.quantized_ = read_quantization(config, checkpoint, expected);
  if (!out.quantized_) out.quantized_ = read_hf_quantization(config, checkpoint, expected);
  for (const auto &[file, shard] : checkpoint.shards()) {
    for (const auto &t : shard.tensors()) {
      std::string name = t.name;
      if (config.architecture == Architecture::gpt2 && name.rfind("transformer.", 0) == 0) name = name.substr(12);
      std::string where = shard.path().string() + ": " + t.name + ": ";
      if (ignorable_buffer(name)) continue;
      if (const std::string_view module = out.quantized_ ? out.quantized_->module_of(name) : std::string_view{};
          !module.empty()) {
        QuantizedModule *m = &out.quantized_->modules.find(module)->second;
        const std::string suffix = name.substr(module.size() + 1);
        if (!shard.mapping()) throw runtime_error(where + "quantized checkpoints load from files only");
        for (const auto &[existing, w] : m->tensors)
          if (existing == suffix) throw runtime_error(where + "appears twice in the checkpoint");
        m->tensors.emplace_back(suffix, StoredWeight{t.dtype, t.shape, std::span<const std::byte>(t.data, static_cast<size_t>(t.nbytes)),
                                                     shard.mapping()});
        continue;
      }
      // GPT-2 checkpoints carry the causal mask as "h.N.attn.bias" [1, 1, P, P].
      if (config.architecture == Architecture::gpt2 && t.shape.size() == 4 && name.size() > 10 &&
          name.substr(name.size() - 10) == ".attn.bias")
        continue;
      // A tied checkpoint may still store lm_head.weight (unused); it must have the embedding's shape.
      if (config.tie_word_embeddings && name == "lm_head.weight") {
        if (t.shape != std::vector<int64_t>{config.vocab_size, config.hidden_size})
          throw runtime_error(where + "shape " + shape_string(t.shape) + " does not match the tied embedding's");
        continue;
      }
      auto it = expected.find(name);
      if (it == expected.end())
        throw runtime_error(where + "not a weight of " + config.architecture_name + " with this config");
      if (t.shape != it->second)
        throw runtime_error(where + "shape " + shape_string(t.shape) + " does not match the config's " + shape_string(it->second));
      if (out.weights_.count(name)) throw runtime_error(where + "appears twice in the checkpoint");
      if (!weight_dtype(t.dtype))
        throw runtime_error(where + "dtype " + dtype_name(t.dtype) + " is not a weight dtype Loom loads (F32, F16, BF16)");
      auto e = std::make_unique<Entry>();
      e->host.shape = t.shape;
      std::span<const std::byte> bytes(t.data, static_cast<size_t>(t.nbytes));
      if (shard.mapping()) {
        e->in_file = true;
        e->stored = StoredWeight{t.dtype, t.shape, bytes, shard.mapping()};
      } else {
        e->host.values = to_float(t.dtype, bytes); // borrowed bytes: not ours to keep
      }
      out.weights_.emplace(name, std::move(e));
    }
  }
  if (out.quantized_)
    for (const auto &[module, m] : out.quantized_->modules)
      if (m.tensors.empty())
        throw runtime_error(checkpoint.path().string() + ": " + module + ": quantized (" + QuantizedCheckpoint::kMetadataKey +
                            "), but the checkpoint holds none of its tensors");
  for (const auto &[name, shape] : expected)
    if (!out.weights_.count(name))
      throw runtime_error(checkpoint.path().string() + ": " + name + ": missing (" + config.architecture_name +
                          " with this config needs it, shape " + shape_string(shape) + ")");
  return out;
}

ModelWeights ModelWeights::from_map(std::map<std::string, HostWeight, std::less<>> weights) {
  ModelWeights out;
  for (auto &[name, w] : weights) {
    auto e = std::make_unique<Entry>();
    e->host = std::move(w);
    out.weights_.emplace(name, std::move(e));
  }
  return out;
}

HostWeight ModelWeights::take(std::string_view name) {
  auto it = weights_.find(name);
  if (it == weights_.end()) throw runtime_error("weight " + std::string(name) + " is not loaded");
  at(name); // converted, when it was not yet
  HostWeight w = std::move(it->second->host);
  weights_.erase(it);
  return w;
}

const HostWeight &ModelWeights::at(std::string_view name) const {
  auto it = weights_.find(name);
  if (it == weights_.end()) throw runtime_error("weight " + std::string(name) + " is not loaded");
  const Entry &e = *it->second;
  if (e.in_file) std::call_once(e.converted, [&e] { e.host.values = to_float(e.stored.dtype, e.stored.bytes); });
  return e.host;
}

const StoredWeight *ModelWeights::stored(std::string_view name) const {
  auto it = weights_.find(name);
  return it != weights_.end() && it->second->in_file ? &it->second->stored : nullptr;
}

} // namespace loom
