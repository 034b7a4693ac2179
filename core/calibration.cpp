#include "calibration.hpp"

#include <algorithm>
#include <fstream>

#include "loom/core/error.hpp"

namespace loom {

std::vector<std::vector<int32_t>> calibration_sequences(const Manifest &manifest, const Tokenizer *tokenizer,
                                                        int64_t max_positions) {
  std::vector<std::vector<int32_t>> out;
  if (manifest.calibration_path.empty()) return out;
  const std::string where = manifest.source_name + ": model.calibration (" + manifest.calibration_path.string() + ")";
  if (tokenizer == nullptr) throw manifest_error(where + ": calibration text needs a model with a tokenizer");
  std::ifstream in(manifest.calibration_path);
  if (!in) throw manifest_error(where + ": cannot read the file");
  const auto length = static_cast<size_t>(std::max<int64_t>(2, std::min(manifest.calibration_length, max_positions)));
  const auto budget = static_cast<size_t>(manifest.calibration_tokens);
  size_t taken = 0;
  std::string line;
  while (taken < budget && std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::vector<int32_t> ids = tokenizer->encode(line, /*add_bos=*/true);
    for (size_t at = 0; at < ids.size() && taken < budget;) {
      if (out.empty() || out.back().size() == length || out.back().size() + (ids.size() - at) > length) {
        // A line starts a new sequence unless it fits whole in the current one.
        if (out.empty() || !out.back().empty()) out.emplace_back();
      }
      const size_t n = std::min({ids.size() - at, length - out.back().size(), budget - taken});
      out.back().insert(out.back().end(), ids.begin() + static_cast<std::ptrdiff_t>(at),
                        ids.begin() + static_cast<std::ptrdiff_t>(at + n));
      at += n;
      taken += n;
    }
  }
  if (taken == 0) throw manifest_error(where + ": the file holds no text");
  return out;
}

} // namespace loom
