#include "loom/core/version.hpp"

#include <charconv>
#include <vector>

#include "loom/core/error.hpp"

namespace loom {

std::string Version::to_string() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

std::optional<Version> parse_version(std::string_view text) {
  Version v;
  unsigned *parts[3] = {&v.major, &v.minor, &v.patch};
  size_t pos = 0;
  for (int i = 0; i < 3; ++i) {
    const char *begin = text.data() + pos;
    const char *end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(begin, end, *parts[i]);
    if (ec != std::errc() || ptr == begin) return std::nullopt;
    pos = static_cast<size_t>(ptr - text.data());
    if (pos == text.size()) return v;
    if (text[pos] != '.' || i == 2) return std::nullopt;
    ++pos;
  }
  return std::nullopt;
}

namespace {

struct Comparison {
  std::string op;
  Version version;
};

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Parses the range, or returns an error message in `error`.
std::vector<Comparison> parse_range(std::string_view range, std::string &error) {
  std::vector<Comparison> out;
  range = trim(range);
  if (range.empty()) return out;
  size_t start = 0;
  while (start <= range.size()) {
    size_t comma = range.find(',', start);
    std::string_view part = trim(range.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
    static constexpr std::string_view ops[] = {">=", "<=", "==", ">", "<", "=", "^", "~"};
    std::string op = "=";
    for (std::string_view candidate : ops) {
      if (part.substr(0, candidate.size()) == candidate) {
        op = std::string(candidate);
        part = trim(part.substr(candidate.size()));
        break;
      }
    }
    auto v = parse_version(part);
    if (!v) {
      error = "malformed version range '" + std::string(range) +
              "' (expected comparisons such as \">=1.2, <2\" or \"^1.4\")";
      return {};
    }
    out.push_back({op == "==" ? "=" : op, *v});
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

bool holds(const Comparison &c, const Version &v) {
  if (c.op == ">=") return v >= c.version;
  if (c.op == "<=") return v <= c.version;
  if (c.op == ">") return v > c.version;
  if (c.op == "<") return v < c.version;
  if (c.op == "^") return v.major == c.version.major && v >= c.version;
  if (c.op == "~") return v.major == c.version.major && v.minor == c.version.minor && v >= c.version;
  return v == c.version;
}

} // namespace

std::string check_version_range(std::string_view range) {
  std::string error;
  parse_range(range, error);
  return error;
}

bool version_satisfies(const Version &version, std::string_view range) {
  std::string error;
  auto comparisons = parse_range(range, error);
  if (!error.empty()) throw manifest_error(error);
  for (const auto &c : comparisons)
    if (!holds(c, version)) return false;
  return true;
}

} // namespace loom
