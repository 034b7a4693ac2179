// Command-line helpers the benchmarks share.
#pragma once

#include <sstream>
#include <string>
#include <vector>

namespace loom_bench {

// "bf16,int8" -> {"bf16", "int8"}.
inline std::vector<std::string> parse_word_list(const std::string &s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(item);
  return out;
}

// "1,32,64" -> {1, 32, 64}; std::stoi's exception for an item that is not a number.
inline std::vector<int> parse_int_list(const std::string &s) {
  std::vector<int> out;
  for (const std::string &item : parse_word_list(s)) out.push_back(std::stoi(item));
  return out;
}

} // namespace loom_bench
