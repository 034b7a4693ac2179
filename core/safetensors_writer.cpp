#include "loom/core/safetensors_writer.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <set>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"

namespace loom {

void write_safetensors(const std::filesystem::path &path, const std::vector<TensorToWrite> &tensors,
                       const std::map<std::string, std::string> &metadata) {
  const std::string where = path.string() + ": ";
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  // Tensors back to back (the format allows no gaps), widest elements first: each then starts
  // at a multiple of its element size, the data buffer itself starting at a multiple of 8.
  std::vector<const TensorToWrite *> order;
  for (const auto &t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorToWrite *a, const TensorToWrite *b) {
    return dtype_size(a->dtype) > dtype_size(b->dtype);
  });
  uint64_t offset = 0;
  std::vector<uint64_t> begins;
  for (const TensorToWrite *tp : order) {
    const TensorToWrite &t = *tp;
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second)
      throw runtime_error(where + "tensor name '" + t.name + "' is empty, reserved or repeated");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw runtime_error(where + t.name + ": negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.dtype) != t.bytes.size())
      throw runtime_error(where + t.name + ": " + std::to_string(t.bytes.size()) + " bytes do not match its shape and dtype");
    begins.push_back(offset);
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const auto tmp = std::filesystem::path(path.string() + ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw runtime_error(where + "cannot create " + tmp.string() + ": " + std::strerror(errno));
    unsigned char size[8];
    for (int i = 0; i < 8; ++i) size[i] = static_cast<unsigned char>((static_cast<uint64_t>(text.size()) >> (8 * i)) & 0xff);
    out.write(reinterpret_cast<const char *>(size), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const TensorToWrite *t : order)
      out.write(reinterpret_cast<const char *>(t->bytes.data()), static_cast<std::streamsize>(t->bytes.size()));
    out.flush();
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw runtime_error(where + "write failed: " + std::strerror(errno));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw runtime_error(where + "cannot rename " + tmp.string() + ": " + ec.message());
}

} // namespace loom
