// Private to core (and the hosts, which build with it): a key written twice in one JSON object.
// nlohmann::json keeps only one of the values, so a reader that must not guess which one was
// meant (a safetensors header, a tool call whose first value was already streamed) asks the
// parser to notice. Header-only over the JSON type (json or ordered_json).
#pragma once

#include <cstddef>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace loom::detail {

// The first key found twice in an object, and the keys that lead to that object from the top.
struct DuplicateKey {
  bool found = false;
  std::string key;
  std::vector<std::string> parents;
};

// A parser callback for Json::parse that records the first duplicate key into `dup` (which must
// outlive the parse) and keeps every value. Not thread-safe: one parse at a time.
template <class Json>
typename Json::parser_callback_t duplicate_key_finder(DuplicateKey &dup) {
  struct Levels {
    std::vector<std::set<std::string>> keys = std::vector<std::set<std::string>>(2);  // each open object's keys, by depth
    std::vector<std::string> last = std::vector<std::string>(2);                        // the key last read at each depth
    void reach(size_t d) {
      if (keys.size() <= d) {
        keys.resize(d + 1);
        last.resize(d + 1);
      }
    }
  };
  auto levels = std::make_shared<Levels>();  // parser_callback_t is a std::function: copyable state
  return [levels, &dup](int depth, typename Json::parse_event_t ev, Json &parsed) -> bool {
    if (ev == Json::parse_event_t::object_start) {
      const auto d = static_cast<size_t>(depth) + 1;
      levels->reach(d);
      levels->keys[d].clear();
    } else if (ev == Json::parse_event_t::key && parsed.is_string()) {
      const auto d = static_cast<size_t>(depth);
      levels->reach(d);
      const auto &k = parsed.template get_ref<const std::string &>();
      levels->last[d] = k;
      if (!levels->keys[d].insert(k).second && !dup.found) {
        dup.found = true;
        dup.key = k;
        dup.parents.assign(levels->last.begin() + 1, levels->last.begin() + static_cast<std::ptrdiff_t>(d));
      }
    }
    return true;
  };
}

} // namespace loom::detail
