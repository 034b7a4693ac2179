// libFuzzer target for the manifest loader: TOML text, then optional --set overrides after a
// line "#--", one per line. Any input must end in a spec or a loom::Error, never a crash.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  std::string input(reinterpret_cast<const char *>(data), size);
  std::vector<std::string> overrides;
  size_t split = input.find("\n#--\n");
  std::string text = input.substr(0, split);
  if (split != std::string::npos) {
    size_t pos = split + 5;
    while (pos < input.size()) {
      size_t end = input.find('\n', pos);
      overrides.push_back(input.substr(pos, end == std::string::npos ? std::string::npos : end - pos));
      if (end == std::string::npos) break;
      pos = end + 1;
    }
  }
  try {
    loom::Manifest m = loom::parse_manifest_string(text, "fuzz.toml", overrides, "/fuzz");
    for (const auto &c : m.components) {
      (void)c.table->json("");
      (void)c.table->type("k");
      (void)c.table->get_int("k");
      (void)c.table->get_string("a.b[1]");
      (void)c.table->where();
    }
  } catch (const loom::Error &) {
  }
  return 0;
}
