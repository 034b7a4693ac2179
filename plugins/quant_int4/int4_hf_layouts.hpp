// 4-bit linears as Hugging Face checkpoints ship them, read into the `int4` quantizer's own
// group-wise format (int4_math.hpp) without re-quantizing: the codes, zero points and scales are
// the checkpoint's, so the weights are exactly the ones its producer wrote (fp16 scales widen
// to float32 exactly). Plugin-internal; the host hands the tensors of one linear and metadata
// that names the layout (core/model_weights.cpp builds it from config.json's quantization_config).
//
//   "autoawq-gemm" (AutoAWQ, version "gemm"; transformers' quant_method "awq"):
//     qweight int32 [in, out / 8]: word (i, c) holds the codes of inputs row i for outputs
//       8c .. 8c + 7, output 8c + kAwqOrder[n] in nibble n (bits 4n .. 4n + 3);
//     qzeros int32 [in / group, out / 8]: the zero points, packed the same way;
//     scales float16 [in / group, out].
//   "gptq" (AutoGPTQ / GPTQModel, quant_method "gptq", sym or not, desc_act false):
//     qweight int32 [in / 8, out]: word (r, o) holds inputs 8r .. 8r + 7 of output o, input
//       8r + n in nibble n;
//     qzeros int32 [in / group, out / 8]: output 8c + n in nibble n, stored as z - zero_offset
//       modulo 16 (zero_offset 1 for checkpoint_format "gptq", 0 for "gptq_v2");
//     scales float16 [in / group, out]; g_idx int32 [in] (optional): must be input / group,
//       inputs in order (act-order checkpoints, which permute them, are refused).
// A weight is read back as (code - zero) * scale in both.
//
// Metadata: {"format": "autoawq-gemm" | "gptq", "bits": 4, "group_size": G, "out": O, "in": I,
// "zero_offset": 0 | 1 (gptq)}. Errors name the tensor or key (loomp::Fail, INVALID_ARGUMENT).
#pragma once

#include <cstdint>

#include <nlohmann/json.hpp>

#include "int4_math.hpp"
#include "loom/loom_plugin_api.h"

namespace loomp::int4q {

// AutoAWQ's packing order: nibble n of a word holds output 8c + kAwqOrder[n].
inline constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Whether metadata (an object with a "format" string, parse_quant_metadata) names one of these.
bool is_hf_layout(const nlohmann::json& meta);
Int4Weight import_hf_layout(const loom_named_tensor* ts, uint32_t count, const nlohmann::json& meta);

}  // namespace loomp::int4q
