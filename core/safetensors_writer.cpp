#include "loom/core/safetensors_writer.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
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
  uint64_t offset = 0;
  std::vector<uint64_t> begins;
  for (const auto &t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second)
      throw runtime_error(where + "tensor name '" + t.name + "' is empty, reserved or repeated");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw runtime_error(where + t.name + ": negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.dtype) != t.bytes.size())
      throw runtime_error(where + t.name + ": " + std::to_string(t.bytes.size()) + " bytes do not match its shape and dtype");
    offset = (offset + 7) / 8 * 8;
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
    uint64_t at = 0;
    static const char zeros[8] = {};
    for (size_t i = 0; i < tensors.size(); ++i) {
      out.write(zeros, static_cast<std::streamsize>(begins[i] - at));
      out.write(reinterpret_cast<const char *>(tensors[i].bytes.data()), static_cast<std::streamsize>(tensors[i].bytes.size()));
      at = begins[i] + tensors[i].bytes.size();
    }
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
