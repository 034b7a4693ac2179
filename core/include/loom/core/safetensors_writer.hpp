// loom::write_safetensors: writes tensors as one safetensors file (the format safetensors.hpp
// reads): an 8-byte little-endian header length, the JSON header ("__metadata__" of strings,
// then each tensor's dtype, shape and data offsets), padded with spaces to a multiple of 8, then
// the data: tensors back to back (the format allows no gaps), widest element type first, so each
// starts at a multiple of its element size and typed readers find it aligned.
//
// The file is written to "<path>.tmp" and renamed over `path` when complete, so a failed or
// interrupted write never leaves a truncated file under the final name. Errors: loom::Error
// (runtime) "path: cause". Thread-safety: none needed (no shared state).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "loom/core/safetensors.hpp"

namespace loom {

struct TensorToWrite {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes; // numel * dtype_size(dtype); borrowed until the call returns
};

// Names must be unique and not "__metadata__"; each tensor's bytes must match its shape.
void write_safetensors(const std::filesystem::path &path, const std::vector<TensorToWrite> &tensors,
                       const std::map<std::string, std::string> &metadata);

} // namespace loom
