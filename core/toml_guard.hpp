// Private to core: a pre-scan that keeps toml++ 3.3 (Debian 12's) away from undefined behaviour.
//
// toml++ 3.3.0's is_non_ascii_horizontal_whitespace() reaches __builtin_unreachable() for some
// code points (U+00A1..U+0499, U+2D6E..U+3167, U+FB26..U+FEFE but a few), and the parser asks it
// about characters outside strings and comments, and after a backslash in multi-line basic
// strings. Found by tests/fuzz/manifest_fuzz. Outside strings and comments such characters are
// invalid TOML anyway; the scan reports them before the parser sees them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace loom::detail {

struct TomlHazard {
  uint32_t line = 0, column = 0; // 1-based
  std::string message;
};

std::optional<TomlHazard> find_toml_hazard(std::string_view text);

// Exposed for tests: whether toml++ 3.3's whitespace predicate is undefined for `c`.
bool tomlpp_whitespace_predicate_undefined(char32_t c);

} // namespace loom::detail
