// A GPT-2 model directory for `loom train` with init = "random": tests/fixtures/models/tiny-gpt2's
// shape (64 wide, 4 heads) with `n_layer` layers and the byte-level tokenizer of
// tests/fixtures/tokenizers/gpt2-style (its 701 ids, the vocabulary rounded up to 704 so that it
// splits over tensor ranks). Header-only test support.
#pragma once

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace loom_test {

inline void write_tiny_gpt2(const std::filesystem::path &source_dir, const std::filesystem::path &dir, int n_layer) {
  std::filesystem::create_directories(dir);
  auto config = nlohmann::json::parse(std::ifstream(source_dir / "tests/fixtures/models/tiny-gpt2/config.json"));
  config["n_layer"] = n_layer;
  config["vocab_size"] = 704;
  std::ofstream(dir / "config.json") << config.dump(2);
  std::filesystem::copy_file(source_dir / "tests/fixtures/tokenizers/gpt2-style/tokenizer.json", dir / "tokenizer.json",
                             std::filesystem::copy_options::overwrite_existing);
}

}  // namespace loom_test
