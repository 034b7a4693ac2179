// How much of a sequence's text so far may be streamed to a client: all of it but a tail that a
// later token could still change, namely
//   - the start of a stop string (if the stop string completes, that text is never sent), and
//   - U+FFFD replacement characters at the end (a byte-fallback tokenizer decodes a UTF-8
//     character cut between tokens as U+FFFD until its last byte arrives) or bytes of a UTF-8
//     sequence that is not complete.
// Thread-safety: pure function.
#pragma once

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/continuation_text.hpp"

namespace loom::server {

inline size_t streamable_prefix(std::string_view text, const std::vector<std::string> &stops) {
  size_t safe = text.size();
  for (const std::string &stop : stops)
    for (size_t k = std::min(stop.size() - 1, text.size()); k > 0; --k)
      if (text.substr(text.size() - k) == std::string_view(stop).substr(0, k)) {
        safe = std::min(safe, text.size() - k);
        break;
      }
  // U+FFFD is EF BF BD.
  while (safe >= 3 && text.substr(safe - 3, 3) == "\xEF\xBF\xBD") safe -= 3;
  return complete_utf8_prefix(text.substr(0, safe));
}

} // namespace loom::server
