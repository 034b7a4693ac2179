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
  // An incomplete UTF-8 sequence at the end: a lead byte with fewer continuation bytes than it
  // announces.
  size_t back = 0;
  while (back < 4 && back < safe && (static_cast<unsigned char>(text[safe - 1 - back]) & 0xC0) == 0x80) ++back;
  if (back < safe) {
    const unsigned char lead = static_cast<unsigned char>(text[safe - 1 - back]);
    const size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (need > back) safe -= back + 1;
  }
  return safe;
}

} // namespace loom::server
