// Semantic versions of components and the version ranges manifests ask for.
// A range is a comma-separated list of comparisons that all must hold: ">=1.2, <2",
// "=1.0.3", "^1.4" (same major, at least 1.4). Thread-safety: value types.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace loom {

struct Version {
  unsigned major = 0, minor = 0, patch = 0;
  auto operator<=>(const Version &) const = default;
  std::string to_string() const;
};

// "1", "1.2" and "1.2.3" parse (missing parts are 0); anything else is nullopt.
std::optional<Version> parse_version(std::string_view text);

// Throws loom::Error (manifest) for a malformed range; an empty range matches everything.
bool version_satisfies(const Version &version, std::string_view range);
// Returns an error message for a malformed range, empty when it is well formed.
std::string check_version_range(std::string_view range);

} // namespace loom
