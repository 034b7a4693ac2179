// Command-line helpers the benchmarks share.
#pragma once

#include <sstream>
#include <string>
#include <vector>

namespace loom_bench {

// "1,32,64" -> {1, 32, 64}; std::stoi's exception for an item that is not a number.
inline std::vector<int> parse_int_list(const std::string &s) {
  std::vector<int> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoi(item));
  return out;
}

} // namespace loom_bench
