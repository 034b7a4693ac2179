// loom::ModelWeights: a checkpoint's tensors checked against the model's config, by canonical
// name, kept as stored in the mapped checkpoint and converted to float32 host memory on demand.
//
// Every tensor the architecture needs must be present with exactly the shape the config implies;
// a tensor the architecture does not use is an error (a checkpoint for another model), except
// known non-weight buffers (rotary inv_freq, GPT-2's attention mask buffers). Weights stored as
// F32, F16 or BF16 load; other dtypes are refused (at load(), not when first read). Names:
// Llama-family names as in the checkpoint; GPT-2 names without the optional "transformer." prefix.
//
// Storage: load() converts nothing. Each weight keeps its bytes in the checkpoint's mapping (and
// a shared_ptr to that mapping, so the object outlives the SafetensorsIndex it was loaded from);
// at() and take() convert to float32 on first use, and stored() lends the bytes as they are to a
// consumer that can use them in place (the CPU backend when the checkpoint's dtype is its compute
// dtype). A checkpoint parsed from borrowed bytes (no mapping to hold) is converted at load().
// Holding the mapping means holding the file: see mapped_file.hpp for what truncating or
// rewriting a mapped file does.
//
// A checkpoint written by `loom quantize` (QuantizedCheckpoint below) holds some linears as their
// quantizer's tensors instead of "<module>.weight"; those load as QuantizedModules, checked for
// a known module, its shape, and at least one tensor (their contents are the quantizer's to check
// when it imports them).
//
// Errors: loom::Error (runtime) "file: tensor: cause". Thread-safety: const methods (at()
// included, whose conversion happens once under std::call_once) may run concurrently; take() and
// moves need exclusive access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/mapped_file.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/safetensors.hpp"

namespace loom {

struct HostWeight {
  std::vector<int64_t> shape;
  std::vector<float> values; // row-major
};

// A weight as the checkpoint stores it: `bytes` (numel * dtype_size(dtype) of them, row-major)
// inside `*mapping`, which stays mapped while any copy of this lives. The address has only the
// alignment the file gives it (see safetensors.hpp): check before reading it as typed values.
struct StoredWeight {
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
  std::shared_ptr<const MappedFile> mapping;
};

// A linear stored quantized by `loom quantize`: the tensors its quantizer exported (named by
// suffix: "qweight", "scales", ...), the quantizer's metadata JSON, and the shape [out, in] of
// the weight it replaces. The tensors stay in the checkpoint's mapping, any dtype.
struct QuantizedModule {
  std::vector<int64_t> shape;
  std::string metadata;
  std::vector<std::pair<std::string, StoredWeight>> tensors;
};

// What a quantized checkpoint says in its "__metadata__" key "loom.quantization":
//   {"quantizer": "int4", "version": "1.0.0", "modules": {"<module>": {"shape": [out, in],
//    "metadata": {...the quantizer's...}}, ...}}
// Module names are the linears' ("model.layers.0.self_attn.q_proj", "lm_head"); their tensors are
// "<module>.<suffix>" and replace "<module>.weight" (a tied head keeps the embedding, which
// lookups read).
struct QuantizedCheckpoint {
  static constexpr const char *kMetadataKey = "loom.quantization";
  std::string quantizer, version;
  // Who quantized it, for messages: "loom quantize", or "AutoAWQ" / "GPTQ" for a Hugging Face
  // checkpoint read through config.json's quantization_config (modules in the int4 quantizer's
  // "autoawq-gemm" / "gptq" layouts).
  std::string source = "loom quantize";
  std::map<std::string, QuantizedModule, std::less<>> modules;
  // The name of the module a checkpoint tensor belongs to ("<module>.<suffix>", suffix not
  // "bias", which stays an ordinary tensor), or empty when it belongs to none.
  std::string_view module_of(std::string_view tensor) const;
};

class ModelWeights {
 public:
  static ModelWeights load(const ModelConfig &config, const SafetensorsIndex &checkpoint);
  // Weights made in memory (random initialisation); the caller provides every expected tensor.
  static ModelWeights from_map(std::map<std::string, HostWeight, std::less<>> weights);
  // As float32, converted on the first call for the name; throws loom::Error naming the tensor
  // when absent.
  const HostWeight &at(std::string_view name) const;
  bool contains(std::string_view name) const { return weights_.find(name) != weights_.end(); }
  // Moves a tensor out as float32 (for a consumer that keeps its own copy); throws when absent.
  HostWeight take(std::string_view name);
  // The tensor as stored in its mapped file; nullptr when absent or made in memory (from_map(),
  // or a checkpoint without a mapping). Valid until the tensor is taken or this object dies; the
  // StoredWeight's mapping may be copied to keep the bytes longer.
  const StoredWeight *stored(std::string_view name) const;
  size_t size() const { return weights_.size(); }
  // The quantized linears of a `loom quantize` checkpoint; nullptr for a plain one.
  const QuantizedCheckpoint *quantized() const { return quantized_.get(); }

 private:
  struct Entry {
    bool in_file = false;           // `stored` is set; `host.values` is made on first use
    StoredWeight stored;
    mutable std::once_flag converted;
    mutable HostWeight host;        // shape always; values once converted
  };
  std::map<std::string, std::unique_ptr<Entry>, std::less<>> weights_;
  std::shared_ptr<QuantizedCheckpoint> quantized_;
};

// F32, F16 or BF16 tensor bytes as float32 values; throws loom::Error for another dtype.
std::vector<float> tensor_as_float(SafetensorsDtype dtype, std::span<const std::byte> bytes);

// The names and shapes the architecture needs, for checks and for writers of checkpoints.
std::map<std::string, std::vector<int64_t>> expected_weights(const ModelConfig &config);

} // namespace loom
