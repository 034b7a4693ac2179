// Safetensors reader (Hugging Face layout): single files and sharded checkpoints.
//
// File format: an 8-byte little-endian uint64 N, then N bytes of UTF-8 JSON (the header), then the
// data buffer. The header is an object: an optional "__metadata__" object of string values, and
// one entry per tensor, {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, with
// offsets relative to the start of the data buffer.
//
// Validation (every failure is a loom::Error (runtime) with a one-line message
// "path: [tensor 'name': ]cause"; no input makes the reader crash or read out of bounds):
//  - the file holds the 8-byte length; 0 < N <= file size - 8; N <= 100 MiB (the cap of the
//    reference implementation, so a hostile length never makes us allocate or parse gigabytes);
//  - the header is NUL-free valid UTF-8, nested at most 3 levels deep (checked by a scan before
//    any JSON parsing, so the parser's work is bounded), valid JSON, and an object;
//  - duplicate keys at any level (a duplicate tensor name, a repeated "dtype") are errors: JSON
//    parsers silently keep one of them;
//  - "__metadata__" is an object of strings; every other entry is an object with exactly the keys
//    dtype, shape and data_offsets; dtype is one of SafetensorsDtype; shape has at most 8
//    non-negative integer dims; data_offsets are two non-negative integers below 2^63; names are
//    non-empty;
//  - begin <= end <= data size and end - begin == numel * dtype_size, both products
//    overflow-checked;
//  - coverage: like the reference implementation (safetensors' `validate`), the tensors, sorted by
//    offset, must tile the data buffer exactly: no overlap, no gap between tensors and no trailing
//    bytes after the last one. Zero-sized tensors are allowed anywhere on that tiling.
//
// Alignment: SafetensorsTensor::data points into the file mapping and has only the alignment the
// file gives it (begin is arbitrary and the data buffer starts at 8 + N). Callers that need
// aligned values copy or convert (std::memcpy), never dereference it as float* etc., unless they
// checked the address first (the CPU backend uses aligned tensors in place, copies the others).
//
// Lifetime: the validation above runs once, at open(); a consumer that keeps reading tensors
// in place afterwards relies on the file staying as it was (see mapped_file.hpp: truncating it
// raises SIGBUS on the next read of a page past the new end, rewriting it in place changes the
// values read). Offsets are never re-read from the file after open(), so a modified file can
// change tensor values but never make Loom read outside the mapping.
//
// Thread-safety: SafetensorsFile and SafetensorsIndex are immutable after open(); const methods
// may run concurrently. Copies share the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <dlpack/dlpack.h>

#include "loom/core/mapped_file.hpp"

namespace loom {

enum class SafetensorsDtype {
  F64, F32, F16, BF16, F8_E4M3, F8_E5M2,
  I64, I32, I16, I8,
  U64, U32, U16, U8,
  BOOL,
};

// Bytes per element (F8 and BOOL: 1).
size_t dtype_size(SafetensorsDtype dtype) noexcept;
// The header's spelling: "F32", "BF16", "F8_E4M3", ...
const char *dtype_name(SafetensorsDtype dtype) noexcept;
// The dtype of a header spelling, or nullopt when unknown (case-sensitive, like the format).
std::optional<SafetensorsDtype> parse_dtype(std::string_view name) noexcept;
// The DLPack dtype of a stored dtype, and back; nullopt for the F8 and BOOL types, which Loom
// hands to no plugin.
std::optional<DLDataType> dl_dtype(SafetensorsDtype dtype) noexcept;
std::optional<SafetensorsDtype> safetensors_dtype(const DLDataType &dtype) noexcept;

struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<int64_t> shape; // [] is a scalar (numel 1)
  uint64_t begin = 0;         // offsets relative to the data buffer, [begin, end)
  uint64_t end = 0;
  const std::byte *data = nullptr; // absolute: data buffer + begin; unaligned (see above);
                                   // valid while the owning SafetensorsFile (or a copy) lives
  uint64_t numel = 0;
  uint64_t nbytes = 0; // == end - begin
};

class SafetensorsFile {
 public:
  // Header length cap, as in the reference implementation.
  static constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;
  static constexpr int kMaxJsonDepth = 3;
  static constexpr size_t kMaxDims = 8;

  // Maps `path` and validates it; throws loom::Error (runtime) "path: cause".
  static SafetensorsFile open(const std::filesystem::path &path);
  // Validates an existing mapping; the result shares it.
  static SafetensorsFile parse(std::shared_ptr<const MappedFile> file);
  // Validates bytes in memory (the same checks as open()). The result BORROWS `bytes`: the caller
  // keeps them alive and unchanged while the result or any copy of it lives. `name` is used in
  // error messages and as path().
  static SafetensorsFile parse(std::span<const std::byte> bytes, const std::filesystem::path &name);

  // All tensors, sorted by begin offset (then end, so zero-sized ones come first at a tie).
  const std::vector<SafetensorsTensor> &tensors() const { return tensors_; }
  // nullptr when there is no tensor of that name.
  const SafetensorsTensor *find(std::string_view name) const;
  // The "__metadata__" object (empty when absent).
  const std::map<std::string, std::string> &metadata() const { return metadata_; }
  const std::filesystem::path &path() const { return path_; }
  // The header length N and the data buffer (empty span when it has no bytes).
  uint64_t header_size() const { return header_size_; }
  std::span<const std::byte> data_buffer() const { return data_buffer_; }
  // The mapping the tensors point into, for consumers that use them in place and must keep it
  // alive (ModelWeights, the CPU backend); null when parsed from borrowed bytes, whose lifetime
  // only the caller knows.
  const std::shared_ptr<const MappedFile> &mapping() const { return mapping_; }

 private:
  SafetensorsFile() = default;

  std::shared_ptr<const MappedFile> mapping_; // null when parsing borrowed bytes
  std::filesystem::path path_;
  uint64_t header_size_ = 0;
  std::span<const std::byte> data_buffer_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_; // index into tensors_
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: the tensors of one model, in one file or sharded over several.
//
// Sharded (model.safetensors.index.json):
//   {"metadata": {...} (optional), "weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}}
// Unknown top-level keys and duplicate keys are errors. Each shard named in weight_map is opened
// once, and:
//  - shard names are plain file names inside the directory (no '/', '\\', "." or "..", not empty);
//  - every listed tensor is in the shard that the map names;
//  - no tensor is in two shards;
//  - no shard holds a tensor that the map does not list.
// Errors are loom::Error (runtime): "index-path: cause" or "shard-path: cause".
class SafetensorsIndex {
 public:
  static constexpr const char *kIndexName = "model.safetensors.index.json";
  static constexpr const char *kSingleName = "model.safetensors";
  static constexpr uint64_t kMaxIndexBytes = 100ull * 1024 * 1024;
  static constexpr int kMaxIndexJsonDepth = 8;

  // What an index file says, before any shard is opened.
  struct Spec {
    std::map<std::string, std::string> metadata;   // string values as is, others as compact JSON
    std::map<std::string, std::string, std::less<>> weight_map; // tensor name -> shard file name
  };
  // Parses and checks index JSON text (names, shapes of the JSON; no file access). `name` is used
  // in error messages. The file path of open() runs exactly this on the file's bytes.
  static Spec parse_index(std::string_view text, const std::filesystem::path &name);

  // Opens dir/model.safetensors.index.json and its shards.
  static SafetensorsIndex open(const std::filesystem::path &dir);
  // Opens a model directory: dir/model.safetensors when it exists (the file transformers prefers),
  // else dir/model.safetensors.index.json; an error when neither exists. A single file is
  // presented as an index of one shard whose weight_map lists all its tensors and whose
  // metadata is the file's "__metadata__".
  static SafetensorsIndex open_model_dir(const std::filesystem::path &dir);

  // The tensor of that name in whichever shard holds it; nullptr when none.
  const SafetensorsTensor *find(std::string_view name) const;
  // Tensor name -> shard file name (as in the index; for a single file, its file name).
  const std::map<std::string, std::string, std::less<>> &weight_map() const { return spec_.weight_map; }
  const std::map<std::string, std::string> &metadata() const { return spec_.metadata; }
  // Shard file name -> opened shard.
  const std::map<std::string, SafetensorsFile> &shards() const { return shards_; }
  bool sharded() const { return sharded_; }
  // The index file, or the single safetensors file.
  const std::filesystem::path &path() const { return path_; }

 private:
  SafetensorsIndex() = default;

  std::filesystem::path path_;
  bool sharded_ = false;
  Spec spec_;
  std::map<std::string, SafetensorsFile> shards_;
};

} // namespace loom
