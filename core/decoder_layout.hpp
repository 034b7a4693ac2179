// Private to core: which of a trainer's parameters each role of a decoder layer is, found by the
// checkpoint's module names; shared by the CPU trainer (DecoderTrainer) and the CUDA one.
#pragma once

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/model_config.hpp"

namespace loom {

// The decoder layer a parameter belongs to: the number after "layers." (the Llama family, also
// inside PEFT's adapter names) or GPT-2's "h."; -1 for the embeddings, head, final norm and
// adapter parameters shared by all layers.
inline int64_t decoder_layer_of(std::string_view name) {
  for (std::string_view key : {std::string_view("layers."), std::string_view("h.")}) {
    for (size_t at = name.find(key); at != std::string_view::npos; at = name.find(key, at + 1)) {
      if (key == "h." && at != 0 && name[at - 1] != '.') continue;  // "h." begins a name component
      const char *first = name.data() + at + key.size(), *last = name.data() + name.size();
      int64_t layer = -1;
      const auto [end, ec] = std::from_chars(first, last, layer);
      if (ec == std::errc() && end < last && *end == '.') return layer;
    }
  }
  return -1;
}

// The token embedding's parameter (which a tied head shares).
inline bool is_token_embedding(std::string_view name) { return name == "model.embed_tokens.weight" || name == "wte.weight"; }

// Whether a pipeline stage holding decoder layers [first, end) (end < 0: to the last), with or
// without the embedding (the first stage) and the head (the last: with a tied head, also the
// token embedding's copy), trains parameter `name`.
inline bool stage_holds(std::string_view name, int64_t first, int64_t end, bool embedding, bool head, bool tied) {
  if (const int64_t layer = decoder_layer_of(name); layer >= 0) return layer >= first && (end < 0 || layer < end);
  if (is_token_embedding(name)) return embedding || (head && tied);
  if (name == "wpe.weight") return embedding;
  return head;  // the final norm and the head
}

// Parameter indices of one decoder layer (SIZE_MAX for an absent bias or, in GPT-2, an unused
// role: q holds c_attn [H, 3H], o c_proj, up c_fc, down the MLP's c_proj; the norms' biases are
// LayerNorm's).
struct DecoderLayerParams {
  size_t norm1 = SIZE_MAX, q = SIZE_MAX, k = SIZE_MAX, v = SIZE_MAX, o = SIZE_MAX, norm2 = SIZE_MAX, gate = SIZE_MAX,
         up = SIZE_MAX, down = SIZE_MAX;
  size_t q_b = SIZE_MAX, k_b = SIZE_MAX, v_b = SIZE_MAX, o_b = SIZE_MAX, gate_b = SIZE_MAX, up_b = SIZE_MAX,
         down_b = SIZE_MAX, norm1_b = SIZE_MAX, norm2_b = SIZE_MAX;
};

// Each layer's roles: "<prefix><module>.weight" through need(name) (which throws when absent),
// and ".bias" through find(name) (SIZE_MAX when absent) where the module may have one.
// Layers [first, end) (end < 0: to the last), for a pipeline stage.
template <class Find, class Need>
std::vector<DecoderLayerParams> decoder_layer_params(const ModelConfig &config, Find find, Need need, int64_t first = 0,
                                                     int64_t end = -1) {
  using L = DecoderLayerParams;
  struct Role {
    size_t L::*weight;
    size_t L::*bias;  // null: the module has no bias slot
    const char *module;
  };
  static constexpr Role kGpt2[] = {{&L::norm1, &L::norm1_b, "ln_1"}, {&L::q, &L::q_b, "attn.c_attn"},
                                   {&L::o, &L::o_b, "attn.c_proj"},  {&L::norm2, &L::norm2_b, "ln_2"},
                                   {&L::up, &L::up_b, "mlp.c_fc"},   {&L::down, &L::down_b, "mlp.c_proj"}};
  static constexpr Role kLlama[] = {{&L::norm1, nullptr, "input_layernorm"},
                                    {&L::q, &L::q_b, "self_attn.q_proj"},
                                    {&L::k, &L::k_b, "self_attn.k_proj"},
                                    {&L::v, &L::v_b, "self_attn.v_proj"},
                                    {&L::o, &L::o_b, "self_attn.o_proj"},
                                    {&L::norm2, nullptr, "post_attention_layernorm"},
                                    {&L::gate, &L::gate_b, "mlp.gate_proj"},
                                    {&L::up, &L::up_b, "mlp.up_proj"},
                                    {&L::down, &L::down_b, "mlp.down_proj"}};
  const bool gpt2 = config.architecture == Architecture::gpt2;
  std::vector<DecoderLayerParams> layers;
  for (int64_t l = first; l < (end < 0 ? config.n_layers : end); ++l) {
    const std::string prefix = (gpt2 ? "h." : "model.layers.") + std::to_string(l) + ".";
    L layer;
    for (const Role &r : gpt2 ? std::span<const Role>(kGpt2) : std::span<const Role>(kLlama)) {
      layer.*r.weight = need(prefix + r.module + ".weight");
      if (r.bias) layer.*r.bias = find(prefix + r.module + ".bias");
    }
    layers.push_back(layer);
  }
  return layers;
}

}  // namespace loom
