// Reads AutoAWQ-GEMM and GPTQ 4-bit linears into Int4Weight (int4_hf_layouts.hpp has the layouts).
#include "int4_hf_layouts.hpp"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "loom_plugin_util.hpp"
#include "loom_quant_util.hpp"

namespace loomp::int4q {
namespace {

// An IEEE half's bits as float (exact: every half is a float).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else {
    float v = std::ldexp(static_cast<float>(mant), -24);  // subnormal (or zero)
    return sign ? -v : v;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

int64_t meta_int(const nlohmann::json& meta, const char* key, const std::string& who) {
  if (!meta.contains(key) || !meta[key].is_number_integer())
    invalid(who + ": metadata has no integer \"" + key + "\"");
  return meta[key].get<int64_t>();
}

// The scales [groups, out] of a float16, bfloat16 or float32 tensor, as float32 [groups, out].
std::vector<float> read_scales(const DLTensor* t, int64_t groups, int64_t out, const std::string& who) {
  if (t->ndim != 2 || t->shape[0] != groups || t->shape[1] != out)
    invalid(who + ": tensor 'scales' must have shape [" + std::to_string(groups) + ", " + std::to_string(out) +
            "] (in_features / group_size, out_features), got " + shape_str(*t));
  const bool f16 = is_dtype(t->dtype, kDLFloat, 16), bf16 = is_dtype(t->dtype, kDLBfloat, 16), f32 = is_f32(t->dtype);
  if (!f16 && !bf16 && !f32) invalid(who + ": tensor 'scales' must be float16, bfloat16 or float32");
  check_cpu_tensor(t, "scales", static_cast<uint8_t>(t->dtype.code), t->dtype.bits, {groups, out});
  std::vector<float> v(static_cast<size_t>(groups * out));
  for (size_t k = 0; k < v.size(); ++k) {
    if (f32) {
      v[k] = data_of<float>(*t)[k];
    } else {
      const uint16_t h = data_of<uint16_t>(*t)[k];
      if (f16) {
        v[k] = half_to_float(h);
      } else {
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(&v[k], &bits, sizeof bits);
      }
    }
    if (!(v[k] > 0.0f) || !std::isfinite(v[k]))
      invalid(who + ": tensor 'scales' holds a non-positive or non-finite scale");
  }
  return v;
}

const uint32_t* words_of(const DLTensor* t, const char* name, const std::vector<int64_t>& shape, const std::string& who) {
  if (t->ndim != static_cast<int32_t>(shape.size()) || t->shape[0] != shape[0] || t->shape[1] != shape[1] ||
      !is_i32(t->dtype))
    invalid(who + ": tensor '" + name + "' must be int32 of shape " + shape_str(shape) + ", got " + shape_str(*t));
  check_i32(t, name, shape);
  return data_of<uint32_t>(*t);
}

}  // namespace

bool is_hf_layout(const nlohmann::json& meta) { return meta["format"] == "autoawq-gemm" || meta["format"] == "gptq"; }

Int4Weight import_hf_layout(const loom_named_tensor* ts, uint32_t count, const nlohmann::json& meta) {
  const std::string format = meta["format"].get<std::string>();
  const std::string who = "int4 (" + format + ")";
  if (meta_int(meta, "bits", who) != 4) invalid(who + ": metadata \"bits\" must be 4 (only 4-bit checkpoints load)");
  const int64_t group = meta_int(meta, "group_size", who), out = meta_int(meta, "out", who), in = meta_int(meta, "in", who);
  if (out < 8 || out % 8 != 0 || in < 8 || in % 8 != 0)
    invalid(who + ": a linear of shape [" + std::to_string(out) + ", " + std::to_string(in) +
            "] does not pack into 32-bit words (both extents must be multiples of 8)");
  if (group < 2 || group % 2 != 0 || in % group != 0)
    invalid(who + ": group_size " + std::to_string(group) + " does not divide in_features " + std::to_string(in) +
            " into even groups");
  const int64_t groups = in / group;
  const bool awq = format == "autoawq-gemm";
  int64_t offset = 0;
  if (!awq) {
    offset = meta_int(meta, "zero_offset", who);
    if (offset != 0 && offset != 1) invalid(who + ": metadata \"zero_offset\" must be 0 or 1");
  }
  const uint32_t* qweight =
      words_of(find_named_tensor(ts, count, "qweight", who), "qweight", awq ? std::vector<int64_t>{in, out / 8}
                                                                              : std::vector<int64_t>{in / 8, out}, who);
  const uint32_t* qzeros = words_of(find_named_tensor(ts, count, "qzeros", who), "qzeros", {groups, out / 8}, who);
  const std::vector<float> scales = read_scales(find_named_tensor(ts, count, "scales", who), groups, out, who);
  if (!awq) {
    if (const DLTensor* g = find_named_tensor(ts, count, "g_idx", who, /*optional=*/true)) {
      if (g->ndim != 1 || g->shape[0] != in || !is_i32(g->dtype))
        invalid(who + ": tensor 'g_idx' must be int32 of shape [" + std::to_string(in) + "], got " + shape_str(*g));
      check_i32(g, "g_idx", {in});
      const int32_t* gi = data_of<int32_t>(*g);
      for (int64_t i = 0; i < in; ++i)
        if (gi[i] != i / group)
          invalid(who + ": tensor 'g_idx' puts input " + std::to_string(i) + " in group " + std::to_string(gi[i]) +
                  ", not input / group_size: act-order (desc_act) checkpoints do not load");
    }
  }
  for (uint32_t k = 0; k < count; ++k) {
    const std::string name = ts[k].name ? ts[k].name : "";
    const std::string suffix = name.substr(name.rfind('.') + 1);  // (npos + 1 == 0: the whole name)
    if (suffix != "qweight" && suffix != "qzeros" && suffix != "scales" && (awq || suffix != "g_idx"))
      invalid(who + ": unexpected tensor '" + name + "'");
  }
  int nibble_of[8];  // the nibble holding output 8c + j (AWQ's order, else j)
  for (int n = 0; n < 8; ++n) nibble_of[awq ? kAwqOrder[n] : n] = n;
  Int4Weight w = sized_weight(out, in, group, /*zero_point=*/true);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t o = 0; o < out; ++o) {
      const uint32_t word = qzeros[g * (out / 8) + o / 8];
      const auto stored = static_cast<int64_t>((word >> (4 * nibble_of[o % 8])) & 15u);
      w.zeros[static_cast<size_t>(o * groups + g)] = static_cast<uint8_t>((stored + offset) & 15);
      w.scales[static_cast<size_t>(o * groups + g)] = scales[static_cast<size_t>(g * out + o)];
    }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const uint32_t code = awq ? (qweight[i * (out / 8) + o / 8] >> (4 * nibble_of[o % 8])) & 15u
                                : (qweight[(i / 8) * out + o] >> (4 * (i % 8))) & 15u;
      w.packed[static_cast<size_t>(o * (in / 2) + i / 2)] |= static_cast<uint8_t>(code << (4 * (i & 1)));
    }
  return w;
}

}  // namespace loomp::int4q
