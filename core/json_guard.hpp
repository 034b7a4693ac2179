// Private to core: a bracket-depth scan run before nlohmann::json sees untrusted text. The
// parser itself is iterative, but copying, dumping or destroying a parsed value recurses once
// per nesting level, so a file of a million '[' would overflow the stack later.
#pragma once

#include <string_view>

namespace loom::detail {

// True when `text` nests arrays or objects deeper than `max_depth` (brackets inside JSON strings
// do not count).
bool json_too_deep(std::string_view text, int max_depth);

} // namespace loom::detail
