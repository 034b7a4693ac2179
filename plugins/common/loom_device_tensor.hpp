// Checks of DLTensors that live on a given device (CPU or CUDA), for plugins with a device path.
// Header-only, C++20, plugin-api only, like loom_plugin_util.hpp, whose fail()/invalid()/
// unsupported() it reports through.
//
// Why a second checker: check_cpu_tensor() in loom_plugin_util.hpp is for the CPU only, and a
// CUDA plugin must also refuse a tensor on the wrong device or ordinal, and data not aligned for
// its vector loads. The checks read only the DLTensor struct (host memory), never its data, so
// they are safe to run on tensors in device memory and during CUDA graph capture.
#ifndef LOOM_PLUGINS_COMMON_DEVICE_TENSOR_HPP
#define LOOM_PLUGINS_COMMON_DEVICE_TENSOR_HPP

#include <cstdint>
#include <string>
#include <vector>

#include "loom_plugin_util.hpp"

namespace loomp {

inline constexpr DLDataType kBF16{kDLBfloat, 16, 1};
inline constexpr DLDataType kF16{kDLFloat, 16, 1};
inline constexpr DLDataType kU8{kDLUInt, 8, 1};

inline bool same_dtype(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}
inline bool is_bf16(DLDataType t) { return same_dtype(t, kBF16); }
inline bool is_f16(DLDataType t) { return same_dtype(t, kF16); }

// Built by appending: GCC 12 at -O3 warns falsely (-Wrestrict) on `"literal" + std::string`.
inline std::string dtype_name(DLDataType t) {
  std::string name;
  switch (t.code) {
    case kDLFloat: name = "float"; break;
    case kDLBfloat: name = "bfloat"; break;
    case kDLInt: name = "int"; break;
    case kDLUInt: name = "uint"; break;
    default:
      name = "code";
      name += std::to_string(t.code);
      name += '_';
      break;
  }
  name += std::to_string(t.bits);
  if (t.lanes != 1) {
    name += 'x';
    name += std::to_string(t.lanes);
  }
  return name;
}

inline std::string device_name(DLDevice d) {
  std::string name;
  switch (d.device_type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: name = "cuda:"; break;
    default:
      name = "device type ";
      name += std::to_string(d.device_type);
      name += ':';
      break;
  }
  name += std::to_string(d.device_id);
  return name;
}

// Checks a tensor is present, on exactly `device`, of `dtype`, contiguous, of `shape` (-1 = any
// extent) and with data (plus byte_offset) aligned to `align` bytes. Wrong device ->
// UNSUPPORTED; anything else -> INVALID_ARGUMENT. `name` is the field named in the message.
inline void check_device_tensor(const DLTensor* t, const char* name, DLDevice device, DLDataType dtype,
                                const std::vector<int64_t>& shape, std::uintptr_t align = 1) {
  if (t == nullptr) invalid(std::string(name) + " is NULL");
  if (t->device.device_type != device.device_type || t->device.device_id != device.device_id)
    unsupported(std::string(name) + ": expected a tensor on " + device_name(device) + ", got one on " +
                device_name(t->device));
  if (!same_dtype(t->dtype, dtype))
    invalid(std::string(name) + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(t->dtype));
  if (t->ndim != static_cast<int32_t>(shape.size()))
    invalid(std::string(name) + ": expected " + std::to_string(shape.size()) + "-D tensor, got " +
            std::to_string(t->ndim) + "-D " + shape_str(*t));
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0 && t->shape[i] != shape[i])
      invalid(std::string(name) + ": expected shape " + shape_str(shape) + " (-1 = any), got " + shape_str(*t));
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (t->shape[i] < 0) invalid(std::string(name) + ": negative extent in " + shape_str(*t));
  if (!is_contiguous(*t)) invalid(std::string(name) + ": must be contiguous row-major");
  if (t->data == nullptr && numel(*t) > 0) invalid(std::string(name) + ": data is NULL");
  const auto address = reinterpret_cast<std::uintptr_t>(t->data) + static_cast<std::uintptr_t>(t->byte_offset);
  if (align > 1 && address % align != 0)
    invalid(std::string(name) + ": data must be aligned to " + std::to_string(align) + " bytes");
}

// Copies an attention batch's shape and tensor pointers into a kernel problem P (members
// n_tokens, n_seqs, table_cols, pool_blocks, q, k, v, out, seq_offsets, seq_positions,
// block_table, pool), after the caller has checked the tensors.
template <class P>
void bind_attention_batch(P& p, const loom_attention_batch& b) {
  p.causal = b.causal != 0 ? 1 : 0;
  p.n_tokens = static_cast<int>(b.n_tokens);
  p.n_seqs = static_cast<int>(b.n_seqs);
  p.table_cols = static_cast<int>(b.block_table->shape[1]);
  p.pool_blocks = b.kv_pool->shape[0];
  p.q = data_of<const uint8_t>(*b.q);
  p.k = data_of<const uint8_t>(*b.k);
  p.v = data_of<const uint8_t>(*b.v);
  p.out = data_of<uint8_t>(*b.out);
  p.seq_offsets = data_of<const int32_t>(*b.seq_offsets);
  p.seq_positions = data_of<const int32_t>(*b.seq_positions);
  p.block_table = data_of<const int32_t>(*b.block_table);
  p.pool = data_of<uint8_t>(*b.kv_pool);
}

}  // namespace loomp

#endif
