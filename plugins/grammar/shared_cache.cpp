// The process-wide caches of shared_cache.hpp. Each is small and bounded: a hit compares the
// full key (a hash collision only costs a rebuild), and a full cache forgets its oldest entry.
#include "shared_cache.hpp"

#include <functional>
#include <mutex>

namespace loomp::grammar {
namespace {

// Tables are megabytes each (a 128k vocabulary: 16 KiB per broad element), so few are kept;
// instances hold their own references, so eviction never pulls one from under a sampler.
constexpr size_t kGrammars = 64;
constexpr size_t kVocabularies = 4;
constexpr size_t kTables = 16;

template <class Entry>
void remember(std::vector<Entry>& cache, Entry e, size_t max) {
  if (cache.size() >= max) cache.erase(cache.begin());
  cache.push_back(std::move(e));
}

}  // namespace

std::shared_ptr<const Compiled> compiled(const std::string& text, bool schema) {
  struct Entry {
    size_t hash;
    bool schema;
    std::string text;
    std::shared_ptr<const Compiled> c;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  const size_t h = std::hash<std::string>{}(text);
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache)
      if (e.hash == h && e.schema == schema && e.text == text) return e.c;
  }
  auto c = std::make_shared<const Compiled>(parse_gbnf(schema ? schema_to_gbnf(text) : text));
  std::lock_guard<std::mutex> lock(mu);
  remember(cache, Entry{h, schema, text, c}, kGrammars);
  return c;
}

std::shared_ptr<const TokenIndex> vocabulary(std::vector<std::string> texts, std::vector<char> has_text,
                                             std::vector<int32_t> ends) {
  static std::mutex mu;
  static std::vector<std::shared_ptr<const TokenIndex>> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& v : cache)
      if (v->same(texts, has_text, ends)) return v;
  }
  auto v = std::make_shared<const TokenIndex>(std::move(texts), std::move(has_text), std::move(ends));
  std::lock_guard<std::mutex> lock(mu);
  remember(cache, std::shared_ptr<const TokenIndex>(v), kVocabularies);
  return v;
}

std::shared_ptr<const TokenTables> tables(const std::shared_ptr<const Compiled>& c,
                                          const std::shared_ptr<const TokenIndex>& vocab) {
  struct Entry {
    std::shared_ptr<const Compiled> c;  // kept alive: the tables point at its matcher
    std::shared_ptr<const TokenIndex> vocab;
    std::shared_ptr<const TokenTables> t;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mu);  // held while building: one build per pair
  for (const Entry& e : cache)
    if (e.c == c && e.vocab == vocab) return e.t;
  auto t = std::make_shared<const TokenTables>(c->m, vocab);
  remember(cache, Entry{c, vocab, t}, kTables);
  return t;
}

}  // namespace loomp::grammar
