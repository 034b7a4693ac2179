// Times libloom-grammar's masking per generated token against a 128k-token vocabulary, the
// [Samplers] target being at most 100 us per token (cold states included).
//
// For each schema: compile it, build its token tables (timed once, as a sampler instance does
// at create()), then generate documents token by token: mask the state, write the mask into a
// 128k-float logits row (Masker::mask then Masker::write: what Masker::apply, the component's
// call per row, does), pick a random allowed token and advance, as the `json-schema`
// component's accept() does. One Masker per schema, as one sampler instance, so
// the states of a later document may be cached from an earlier one; the first visit of each
// state is counted as cold. The token choice: an end token with probability 0.3 where allowed,
// otherwise half the time any allowed token and half the time an allowed token of at most two
// bytes (so that strings and arrays close as a model's output would, instead of running on).
//
// Each schema's generation runs --runs times from the same seed with a fresh Masker, so every
// run masks the same states in the same order; a token's time is its minimum over the runs.
// On a shared or virtual machine a timed region is now and then stretched by tens of
// microseconds that are not the code's (the noise line measures it); the minimum removes that,
// and the last column keeps one run's raw maximum.
//
//   loom_grammar_bench [--docs N] [--max-tokens N] [--runs N] [--seed N] [--vocab N] [--show 1] [--save FILE]
// --show 1 prints each document (what a reader checks the token choice against); --save FILE
// writes the documents' token ids, a line per document and -1 where it stopped after a mask, so
// that another implementation can be timed on the very same documents.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "gbnf.hpp"
#include "masker.hpp"
#include "synthetic_vocab.hpp"
#include "token_index.hpp"
#include "token_tables.hpp"

using namespace loomp::grammar;
using Clock = std::chrono::steady_clock;

namespace {

struct Schema {
  const char* name;
  const char* text;
};

const Schema kSchemas[] = {
    {"person", R"({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}, "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b", 1, null]}, "child": {"$ref": "#/$defs/child"},
        "pair": {"type": "array", "items": {"type": ["integer", "null"]}, "minItems": 2, "maxItems": 2}},
      "required": ["name", "age"], "additionalProperties": false,
      "$defs": {"child": {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"const": "x"}},
                          "required": ["id"]}}})"},
    {"tool-call", R"({"type": "object", "properties": {
        "function": {"enum": ["search_web", "get_weather", "send_email", "create_event", "run_sql"]},
        "arguments": {"type": "object", "properties": {
          "query": {"type": "string"}, "limit": {"type": "integer"}, "units": {"enum": ["metric", "imperial"]},
          "filters": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "op": {"enum": ["=", "!=", "<", ">", "contains"]},
            "value": {"type": ["string", "number", "boolean", "null"]}}, "required": ["field", "op", "value"]}}},
          "required": ["query"]}},
      "required": ["function", "arguments"]})"},
    {"catalog", R"({"type": "array", "maxItems": 6, "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "title": {"type": "string"}, "price": {"type": "number"},
        "currency": {"enum": ["EUR", "USD", "JPY"]}, "stock": {"type": "integer"}, "active": {"type": "boolean"},
        "color": {"type": "string"}, "size": {"enum": ["S", "M", "L", "XL"]}, "weight_kg": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "dims": {"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"},
                 "d": {"type": "number"}}, "required": ["w", "h", "d"]}},
      "required": ["sku", "price"]}})"},
    {"any-json", R"(true)"},
    // Strings bounded by minLength/maxLength: counted repetitions, each copy of `char` a clone
    // with tables of its own (shared past the longest token), kept apart so the table shows their
    // cost: more tables to build, masks as fast as elsewhere.
    {"bounded", R"({"type": "object", "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 12}, "note": {"type": "string", "maxLength": 40},
        "words": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}}},
      "required": ["id", "note"]})"},
};

double us_since(Clock::time_point t) { return std::chrono::duration<double, std::micro>(Clock::now() - t).count(); }

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// Per generated token, in generation order.
struct Times {
  std::vector<double> mask, total, accept;
  std::vector<char> cold;
  // Keeps the smaller time of each token (another run of the same generation).
  void min_with(const Times& o) {
    for (size_t i = 0; i < mask.size(); ++i) {
      mask[i] = std::min(mask[i], o.mask[i]);
      total[i] = std::min(total[i], o.total[i]);
    }
    for (size_t i = 0; i < accept.size(); ++i) accept[i] = std::min(accept[i], o.accept[i]);
  }
  std::vector<double> cold_masks() const {
    std::vector<double> v;
    for (size_t i = 0; i < mask.size(); ++i)
      if (cold[i]) v.push_back(mask[i]);
    return v;
  }
};

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

double max_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); }

void row(const char* name, const char* what, const std::vector<double>& v, const std::vector<double>& raw) {
  std::printf("| %-9s | %-26s | %6zu | %7.1f | %7.1f | %7.1f | %7.1f | %9.1f |\n", name, what, v.size(),
              quantile(v, 0.5), quantile(v, 0.9), quantile(v, 0.99), max_of(v), max_of(raw));
}

void table(const char* name, const Times& t, const Times& first_run) {
  row(name, "mask (cached or computed)", t.mask, first_run.mask);
  row(name, "mask, first visits only", t.cold_masks(), first_run.cold_masks());
  row(name, "mask + write into logits", t.total, first_run.total);
  row(name, "accept (advance the state)", t.accept, first_run.accept);
}

void append(Times& to, const Times& from) {
  to.mask.insert(to.mask.end(), from.mask.begin(), from.mask.end());
  to.total.insert(to.total.end(), from.total.begin(), from.total.end());
  to.accept.insert(to.accept.end(), from.accept.begin(), from.accept.end());
  to.cold.insert(to.cold.end(), from.cold.begin(), from.cold.end());
}

// The machine's own share of the numbers: a fixed loop of about a microsecond, timed many times.
void noise_line() {
  std::vector<double> t;
  std::vector<uint32_t> buf(2048, 1);
  volatile uint32_t sink = 0;
  for (int r = 0; r < 20000; ++r) {
    const auto a = Clock::now();
    for (uint32_t v : buf) sink = sink + v;
    t.push_back(us_since(a));
  }
  std::printf("timer noise: a fixed loop of %.1f us (median) took over 20 us in %.2f%% of 20000 runs, at most %.0f us\n",
              quantile(t, 0.5), 100.0 * static_cast<double>(std::count_if(t.begin(), t.end(), [](double x) { return x > 20; })) / 20000,
              max_of(t));
}

}  // namespace

int main(int argc, char** argv) {
  int docs = 16, max_tokens = 400, runs = 5, show = 0;
  const char* save = nullptr;
  uint32_t seed = 1;
  size_t vocab_size = 128000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const long v = std::strtol(argv[i + 1], nullptr, 10);
    if (!std::strcmp(argv[i], "--docs")) docs = static_cast<int>(v);
    else if (!std::strcmp(argv[i], "--max-tokens")) max_tokens = static_cast<int>(v);
    else if (!std::strcmp(argv[i], "--runs")) runs = std::max(1, static_cast<int>(v));
    else if (!std::strcmp(argv[i], "--seed")) seed = static_cast<uint32_t>(v);
    else if (!std::strcmp(argv[i], "--vocab")) vocab_size = static_cast<size_t>(v);
    else if (!std::strcmp(argv[i], "--show")) show = static_cast<int>(v);
    else if (!std::strcmp(argv[i], "--save")) save = argv[i + 1];
    else {
      std::fprintf(stderr,
                   "usage: %s [--docs N] [--max-tokens N] [--runs N] [--seed N] [--vocab N] [--show 1] [--save FILE]\n",
                   argv[0]);
      return 2;
    }
  }

  auto t0 = Clock::now();
  loom_bench::SyntheticVocab sv = loom_bench::synthetic_vocab(vocab_size, 7);
  const double synth_ms = ms_since(t0);
  t0 = Clock::now();
  auto vocab = std::make_shared<const TokenIndex>(sv.texts, sv.has_text, sv.ends);
  std::printf("vocabulary: %zu tokens (made in %.0f ms), trie of %zu nodes built in %.0f ms\n", vocab->size(),
              synth_ms, vocab->trie().nodes(), ms_since(t0));
  noise_line();

  std::printf("\n| schema | grammar elements | tables | dense | remainders | large resumes | table memory | build |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  std::vector<std::tuple<const char*, Times, Times>> results;  // name, minimum over runs, first run
  std::vector<float> logits(vocab->size());
  FILE* saved = save != nullptr ? std::fopen(save, "w") : nullptr;
  if (save != nullptr && saved == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", save);
    return 1;
  }
  for (size_t si = 0; si < std::size(kSchemas); ++si) {
    const Schema& sc = kSchemas[si];
    const Grammar g = parse_gbnf(schema_to_gbnf(sc.text));
    const Matcher m(g);
    t0 = Clock::now();
    auto tables = std::make_shared<const TokenTables>(m, vocab);
    const double build_ms = ms_since(t0);
    const TokenTables::BuildStats& bs = tables->build_stats();
    std::printf("| %s | %zu | %zu | %zu | %zu | %zu | %.1f MiB | %.0f ms |\n", sc.name, g.elems.size(), bs.elements,
                bs.dense, bs.remainders, bs.big_resumes, static_cast<double>(bs.bytes) / (1 << 20), build_ms);

    Times best, first;
    std::string all_docs;
    for (int run = 0; run < runs; ++run) {
      Masker masker(tables);
      std::mt19937 rng(seed + static_cast<uint32_t>(si));
      Times t;
      std::string docs_text;
      for (int d = 0; d < docs; ++d) {
        State s = m.initial();
        std::string doc;
        std::string ids;
        for (int k = 0; k < max_tokens; ++k) {
          std::fill(logits.begin(), logits.end(), 0.0f);
          MaskStats stats;
          auto a = Clock::now();
          const std::span<const uint64_t> mask = masker.mask(s, &stats);
          const double mask_us = us_since(a);
          std::vector<int32_t> allowed, ends, short_ones;
          for (size_t w = 0; w < mask.size(); ++w)
            for (uint64_t bits = mask[w]; bits != 0; bits &= bits - 1) {
              const auto id = static_cast<int32_t>(w * 64 + static_cast<size_t>(__builtin_ctzll(bits)));
              if (vocab->is_end(id)) {
                ends.push_back(id);
              } else {
                allowed.push_back(id);
                if (vocab->text(id).size() <= 2) short_ones.push_back(id);
              }
            }
          a = Clock::now();
          masker.write(mask, logits.data(), logits.size());
          const double write_us = us_since(a);
          t.mask.push_back(mask_us);
          t.total.push_back(mask_us + write_us);
          t.cold.push_back(stats.cached == 0);
          auto choose = [&](const std::vector<int32_t>& v) {
            return v[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng)];
          };
          if (allowed.empty() || (!ends.empty() && std::uniform_real_distribution<double>(0, 1)(rng) < 0.3)) {
            ids += " -1";
            break;
          }
          const bool any = short_ones.empty() || std::uniform_int_distribution<int>(0, 1)(rng) == 0;
          const int32_t tok = choose(any ? allowed : short_ones);
          a = Clock::now();
          if (!m.advance(s, vocab->text(tok))) {
            std::fprintf(stderr, "token %d refused after the mask allowed it\n", tok);
            return 1;
          }
          t.accept.push_back(us_since(a));
          doc += vocab->text(tok);
          ids += ' ';
          ids += std::to_string(tok);
        }
        if (saved != nullptr && run == 0) std::fprintf(saved, "%s%s\n", sc.name, ids.c_str());
        if (show && run == 0) std::printf("%s document %d: %s\n", sc.name, d, doc.c_str());
        docs_text += doc + '\0';
      }
      if (run == 0) {
        best = first = t;
        all_docs = docs_text;
      } else if (docs_text != all_docs || t.mask.size() != best.mask.size()) {
        std::fprintf(stderr, "run %d generated other documents than run 0\n", run);
        return 1;
      } else {
        best.min_with(t);
      }
    }
    results.emplace_back(sc.name, std::move(best), std::move(first));
  }

  if (saved != nullptr) std::fclose(saved);
  std::printf("\nmicroseconds per generated token: minimum of %d identical runs (last column: run 1 alone); "
              "%d documents per schema, at most %d tokens each\n\n",
              runs, docs, max_tokens);
  std::printf("| schema    | what                       | tokens |  median |     p90 |     p99 |     max | max run 1 |\n");
  std::printf("| --------- | -------------------------- | -----: | ------: | ------: | ------: | ------: | --------: |\n");
  Times all, all_first;
  for (const auto& [name, t, f] : results) {
    table(name, t, f);
    append(all, t);
    append(all_first, f);
  }
  table("all", all, all_first);
  return 0;
}
