// libFuzzer target for the safetensors reader: the input is a whole .safetensors file, validated
// in memory by SafetensorsFile::parse (exactly the checks SafetensorsFile::open runs on a mapped
// file) and, as text, by SafetensorsIndex::parse_index. Any input must end in a parsed file or a
// loom::Error, never a crash; a parsed file must satisfy the reader's invariants (checked here,
// trapping when broken), and every byte of every tensor is read so that ASan sees any range that
// escapes the input.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "loom/core/error.hpp"
#include "loom/core/safetensors.hpp"

namespace {
void require(bool ok) {
  if (!ok) __builtin_trap();
}
} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte *>(data), size);
  try {
    const loom::SafetensorsFile f = loom::SafetensorsFile::parse(bytes, "fuzz.safetensors");
    const auto buf = f.data_buffer();
    require(8 + f.header_size() + buf.size() == size);
    uint64_t expected = 0;
    unsigned sum = 0;
    for (const auto &t : f.tensors()) {
      require(!t.name.empty());
      require(t.begin == expected && t.begin <= t.end && t.end <= buf.size());
      require(t.nbytes == t.end - t.begin);
      require(t.nbytes == t.numel * loom::dtype_size(t.dtype));
      require(t.shape.size() <= loom::SafetensorsFile::kMaxDims);
      require(t.data == buf.data() + t.begin);
      require(f.find(t.name) == &t);
      for (uint64_t i = 0; i < t.nbytes; ++i) sum += std::to_integer<unsigned>(t.data[i]);
      expected = t.end;
    }
    require(expected == buf.size());
    for (const auto &[k, v] : f.metadata()) sum += static_cast<unsigned>(k.size() + v.size());
    volatile unsigned sink = sum;
    (void)sink;
  } catch (const loom::Error &) {
  }
  try {
    const auto spec = loom::SafetensorsIndex::parse_index(
        std::string_view(reinterpret_cast<const char *>(data), size), "fuzz.index.json");
    require(!spec.weight_map.empty());
    for (const auto &[name, shard] : spec.weight_map)
      require(!name.empty() && !shard.empty() && shard.find('/') == std::string::npos && shard != "..");
  } catch (const loom::Error &) {
  }
  return 0;
}
