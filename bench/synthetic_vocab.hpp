// A synthetic byte-level BPE-like vocabulary for the grammar benchmark (no tokenizer of that
// size ships in the repository, and nothing is downloaded). Seeded, so every run masks the same
// tokens. Its mix follows what large byte-level vocabularies (Llama 3, GPT-4o) hold:
//   all 256 single bytes; runs of spaces, tabs and newlines; all numbers of 1 to 3 digits;
//   pseudo-English words with and without a leading space and capitalised (most of it);
//   punctuation clusters, JSON-like pieces (`", "`, `":`, `{"`, `"}],` ...) and words glued to
//   quotes and code punctuation (`"name`, `name":`, `.get`, `_id(`); accented Latin and
//   Cyrillic words (2-byte UTF-8), CJK characters and pairs (3-byte), emoji (4-byte), and
//   byte-level merges that cut a character (tokens starting or ending inside a UTF-8 sequence).
// The last id is an end-of-text token without bytes.
#ifndef LOOM_BENCH_SYNTHETIC_VOCAB_HPP
#define LOOM_BENCH_SYNTHETIC_VOCAB_HPP

#include <cstdint>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

namespace loom_bench {

struct SyntheticVocab {
  std::vector<std::string> texts;
  std::vector<char> has_text;
  std::vector<int32_t> ends;
};

inline std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

inline SyntheticVocab synthetic_vocab(size_t size, uint32_t seed) {
  std::mt19937 rng(seed);
  auto pick = [&](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  SyntheticVocab v;
  std::unordered_set<std::string> seen;
  auto add = [&](const std::string& t) {
    if (v.texts.size() + 1 < size && !t.empty() && seen.insert(t).second) v.texts.push_back(t);
  };
  auto upto = [&](size_t n) { return v.texts.size() < n && v.texts.size() + 1 < size; };
  // Appends instead of `"lit" + std::string(...)`, which GCC 12 -O3 misreads under -Wrestrict.
  auto cat = [](std::string a, const std::string& b) { return a += b; };

  for (int b = 0; b < 256; ++b) add(std::string(1, static_cast<char>(b)));
  for (size_t n = 2; n <= 64; ++n) add(std::string(n, ' '));
  for (size_t n = 0; n <= 32; ++n) add(cat("\n", std::string(n, ' ')));
  for (size_t n = 1; n <= 8; ++n) {
    add(std::string(n, '\t'));
    add(cat("\n", std::string(n, '\t')));
    add(std::string(n, '\n'));
  }
  for (const char* t : {"\r\n", " \n", "\n\n\n", "  \n", ",\n", ";\n", "{\n", "}\n", "[\n", "]\n"}) add(t);
  for (int n = 0; n < 1000; ++n) {
    add(std::to_string(n));
    if (n < 100) add(cat("0", std::to_string(n)));
  }

  const std::string punct = "\"{}[]:,.()-_;!?'\\/*=+<>#&|@$%^~`";
  const std::string json = "\"{}[]:, ";
  for (char a : json)
    for (char b : json) add(std::string{a, b});
  for (const char* t : {"\", \"", "\": \"", "\":\"", "\": ", "\":", "{\"", "\"}", "\"},", "\"]", "[\"", "[{\"",
                        "\"}]", "},{", "\"},{\"", "\\\"", "\\\",", "\\n", "\\u", "\\t", "\\\\", "\": [", "\": {",
                        "\": {\"", "\"],", "}},", "]}", "}]}", "\"\n", "\",\n", "\n}", "\n]", "null", "true",
                        "false", " null", " true", " false", "\":null", "\":true", "\":false", "\": null"})
    add(t);
  while (upto(4500)) {
    std::string t;
    for (size_t i = 0, n = 2 + pick(3); i < n; ++i) t += punct[pick(punct.size())];
    add(t);
  }

  static const char* onsets[] = {"", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s",
                                 "t", "v", "w", "y", "z", "br", "ch", "cl", "cr", "dr", "fl", "gr", "pl",
                                 "pr", "sh", "sl", "sp", "st", "str", "th", "tr", "wh"};
  static const char* nuclei[] = {"a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "io", "oo", "ou", "y"};
  static const char* codas[] = {"", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck",
                                "ll", "ss", "x", "ing", "ed", "er", "ion"};
  auto word = [&]() {
    std::string w;
    for (size_t i = 0, n = 1 + pick(3); i < n; ++i) {
      w += onsets[pick(std::size(onsets))];
      w += nuclei[pick(std::size(nuclei))];
      w += codas[pick(std::size(codas))];
    }
    return w;
  };
  auto cap = [](std::string w) {
    w[0] = static_cast<char>(w[0] - 'a' + 'A');
    return w;
  };

  // Words glued to quotes and code punctuation.
  static const char* glued[] = {"\"%\"", "\"%", "%\"", "%\":", "\"%\":", "%\",", "\"%\": \"", "_%", "%_", ".%",
                                "%(", "%()", "::%", "->%", "#%", "@%", "$%", "%=", "<%", "%>", "/%", "%/", "%.",
                                "%,", "%;", "%:", "(%", "[%", "%]", "{%", "%}", "'%", "%'"};
  while (upto(12000)) {
    std::string g = glued[pick(std::size(glued))];
    const std::string w = chance(0.2) ? cap(word()) : word();
    g.replace(g.find('%'), 1, w);
    add(g);
  }

  // Non-ASCII: accented Latin and Cyrillic words, CJK characters and pairs, emoji, cut merges.
  static const uint32_t accents[] = {0xE9, 0xE8, 0xEA, 0xE0, 0xE2, 0xE7, 0xEF, 0xF4, 0xFC, 0xF6, 0xE4, 0xF1, 0xDF};
  while (upto(15000)) {
    std::string w = word();
    w.insert(pick(w.size() + 1), utf8(accents[pick(std::size(accents))]));
    add(chance(0.5) ? cat(" ", w) : w);
  }
  while (upto(17000)) {
    std::string w = chance(0.5) ? " " : "";
    for (size_t i = 0, n = 2 + pick(8); i < n; ++i) w += utf8(0x430 + static_cast<uint32_t>(pick(32)));
    add(w);
  }
  while (upto(21000)) add(utf8(0x4E00 + static_cast<uint32_t>(pick(0x5000))));
  while (upto(23000)) add(utf8(0x4E00 + static_cast<uint32_t>(pick(0x800))) + utf8(0x4E00 + static_cast<uint32_t>(pick(0x800))));
  while (upto(23300)) add(utf8(0x1F300 + static_cast<uint32_t>(pick(0x300))));
  while (upto(24800)) {
    const std::string s = utf8(0x4E00 + static_cast<uint32_t>(pick(0x800))) + utf8(0x4E00 + static_cast<uint32_t>(pick(0x800)));
    add(chance(0.5) ? s.substr(1 + pick(2)) : s.substr(0, s.size() - 1 - pick(2)));
  }

  // The rest: words, with a leading space or not, capitalised or not.
  while (v.texts.size() + 1 < size) {
    const std::string w = chance(0.15) ? cap(word()) : word();
    add(chance(0.6) ? cat(" ", w) : w);
  }
  v.has_text.assign(v.texts.size(), 1);
  v.ends.push_back(static_cast<int32_t>(v.texts.size()));
  v.texts.emplace_back("<|end_of_text|>");
  v.has_text.push_back(0);
  return v;
}

}  // namespace loom_bench

#endif
