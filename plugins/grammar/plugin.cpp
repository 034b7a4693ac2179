// libloom-grammar: constrained decoding as sampler filters.
//   grammar      parameters grammar (GBNF text) or grammar_file (a path); exactly one
//   json-schema  parameters schema (JSON text) or schema_file (a path); exactly one
// Both mask, in each row, every token the grammar cannot accept next with -INFINITY; end tokens
// survive only where the grammar can be complete. Token texts come from the host extension
// loom.host.vocab/1 (loom/host_vocab.h), read at create() when offered, otherwise at the first
// apply()/accept(), which fail with LOOM_ERR_UNSUPPORTED while the host lacks it.
// Per-sequence parse state follows accept/fork/release. Grammars, vocabulary tries and the
// token tables built from both are shared across instances (shared_cache.hpp); each instance
// keeps the masks of the parse states it has seen (masker.hpp).
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "gbnf.hpp"
#include "masker.hpp"
#include "shared_cache.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::grammar {
namespace {

std::string read_file(const std::string& path, const char* key) {
  std::ifstream f(path, std::ios::binary);
  if (!f) invalid_param(key, std::string(key) + ": cannot open '" + path + "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  if (s.size() > Limits{}.max_text)
    invalid_param(key, std::string(key) + ": '" + path + "' is larger than " + std::to_string(Limits{}.max_text) +
                           " bytes");
  return s;
}

// Compiles the text of exactly one of `text_key` and `file_key`; an error in the grammar is
// reported at the key it came from.
std::shared_ptr<const Compiled> compile(const loom_host_api* h, loom_host_ctx* c, const char* text_key,
                                        const char* file_key, bool schema) {
  const bool t = h->config_type(c, text_key) != LOOM_VALUE_NONE;
  const bool f = h->config_type(c, file_key) != LOOM_VALUE_NONE;
  if (t == f) invalid(std::string("set exactly one of '") + text_key + "' and '" + file_key + "'");
  const char* key = t ? text_key : file_key;
  const std::string text = t ? cfg_string(h, c, text_key) : read_file(cfg_string(h, c, file_key), file_key);
  try {
    return compiled(text, schema);
  } catch (const GrammarError& e) {
    invalid_param(key, e.what());
  }
}

struct Seq {
  State st;
  bool ended = false;
};

template <bool kSchema>
struct Sampler {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  const char* name = kSchema ? "json-schema" : "grammar";
  std::shared_ptr<const Compiled> comp;
  std::shared_ptr<const TokenIndex> vocab;
  std::unique_ptr<Masker> masker;  // after comp: its tables point at comp's matcher
  std::unordered_map<int64_t, Seq> seqs;

  Sampler(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    comp = kSchema ? compile(h, c, "schema", "schema_file", true) : compile(h, c, "grammar", "grammar_file", false);
    load_vocab(false);
  }

  // Reads the vocabulary and builds (or finds) the token tables, so that the first apply()
  // already masks at full speed.
  void load_vocab(bool required) {
    if (vocab) return;
    const loom_host_vocab* v = nullptr;
    if (host->get_extension != nullptr)
      v = static_cast<const loom_host_vocab*>(host->get_extension(ctx, LOOM_HOST_VOCAB_EXTENSION));
    if (v == nullptr || !LOOM_HAS_FIELD(v, loom_host_vocab, end_tokens)) {
      if (required)
        unsupported(std::string(name) + ": the host does not offer the token vocabulary (extension " +
                    LOOM_HOST_VOCAB_EXTENSION + ")");
      return;
    }
    const int32_t n = v->vocab_size(ctx);
    if (n < 0) invalid(std::string(name) + ": host vocabulary size is negative");
    std::vector<std::string> texts(static_cast<size_t>(n));
    std::vector<char> has(static_cast<size_t>(n), 0);
    for (int32_t i = 0; i < n; ++i) {
      const char* b = nullptr;
      size_t len = 0;
      if (v->token_bytes(ctx, i, &b, &len) == LOOM_OK && (b != nullptr || len == 0)) {
        texts[static_cast<size_t>(i)].assign(b != nullptr ? b : "", len);
        has[static_cast<size_t>(i)] = len > 0;
      }
    }
    const int32_t* ends = nullptr;
    size_t n_ends = 0;
    std::vector<int32_t> end_ids;
    if (v->end_tokens(ctx, &ends, &n_ends) == LOOM_OK && ends != nullptr) end_ids.assign(ends, ends + n_ends);
    auto index = vocabulary(std::move(texts), std::move(has), std::move(end_ids));
    masker = std::make_unique<Masker>(tables(comp, index));
    vocab = std::move(index);
  }

  Seq& seq(int64_t id) {
    auto it = seqs.find(id);
    if (it == seqs.end()) it = seqs.emplace(id, Seq{comp->m.initial(), false}).first;
    return it->second;
  }

  void apply(const loom_sampling_batch& b) {
    if (b.logits->device.device_type != kDLCPU)
      unsupported(std::string(name) + ": logits must be on the CPU");
    load_vocab(true);
    if (b.n_rows > 0 && b.seq_ids == nullptr) invalid(std::string(name) + ": seq_ids is NULL");
    float* data = data_of<float>(*b.logits);
    const size_t vs = static_cast<size_t>(b.vocab_size);
    for (int32_t r = 0; r < b.n_rows; ++r) {
      float* x = data + static_cast<size_t>(r) * vs;
      Seq& s = seq(b.seq_ids[r]);
      if (s.ended) {
        masker->apply_ended(x, vs);
        continue;
      }
      try {
        masker->apply(s.st, x, vs);
      } catch (const GrammarError& e) {
        invalid(e.what());
      }
    }
  }

  void accept(int64_t id, int32_t token) {
    load_vocab(true);
    if (token < 0 || static_cast<size_t>(token) >= vocab->size())
      invalid(std::string(name) + ": token " + std::to_string(token) + " is outside the vocabulary");
    Seq& s = seq(id);
    if (s.ended) invalid(std::string(name) + ": sequence " + std::to_string(id) + " already ended");
    if (vocab->is_end(token)) {
      if (!s.st.can_complete())
        invalid(std::string(name) + ": end token " + std::to_string(token) + " before the grammar is complete");
      s.ended = true;
      return;
    }
    State t = s.st;
    bool ok = false;
    try {
      ok = vocab->has_text(token) && comp->m.advance(t, vocab->text(token));
    } catch (const GrammarError& e) {
      invalid(e.what());
    }
    if (!ok)
      invalid(std::string(name) + ": token " + std::to_string(token) + " is not allowed by the grammar here");
    s.st = std::move(t);
  }

  void fork(int64_t src, int64_t dst) {
    auto it = seqs.find(src);
    if (it == seqs.end()) { seqs.erase(dst); return; }
    Seq copy = it->second;
    seqs[dst] = std::move(copy);
  }

  void release(int64_t id) {
    if (id == -1) seqs.clear();
    else seqs.erase(id);
  }
};

template <class C>
loom_status apply_fn(void* inst, const loom_sampling_batch* b) {
  auto* c = static_cast<C*>(inst);
  return guard(c->host, c->ctx, [&] {
    if (b == nullptr) invalid("sampling batch is NULL");
    if (!LOOM_HAS_FIELD(b, loom_sampling_batch, tokens_out)) invalid("sampling batch struct_size too small");
    if (b->n_rows < 0 || b->vocab_size <= 0) invalid("bad n_rows or vocab_size");
    const DLTensor* t = b->logits;
    if (t == nullptr || !is_f32(t->dtype) || t->ndim != 2 || t->shape[0] != b->n_rows ||
        t->shape[1] != b->vocab_size || !is_contiguous(*t) || (t->data == nullptr && b->n_rows > 0))
      invalid("logits: expected contiguous float32 [n_rows, vocab_size]");
    c->apply(*b);
  });
}
template <class C>
loom_status accept_fn(void* inst, int64_t seq, int32_t token) {
  auto* c = static_cast<C*>(inst);
  return guard(c->host, c->ctx, [&] { c->accept(seq, token); });
}
template <class C>
loom_status fork_fn(void* inst, int64_t src, int64_t dst) {
  auto* c = static_cast<C*>(inst);
  return guard(c->host, c->ctx, [&] { c->fork(src, dst); });
}
template <class C>
void release_fn(void* inst, int64_t seq) {
  static_cast<C*>(inst)->release(seq);
}
template <class C>
constexpr loom_sampler_vtable make_vtable() {
  loom_sampler_vtable v{};
  v.struct_size = sizeof(loom_sampler_vtable);
  v.life.create = &create_instance<C>;
  v.life.destroy = &destroy_instance<C>;
  v.life.get_extension = nullptr;
  v.life.export_state = nullptr;  // a hot swap starts every sequence's parse afresh
  v.life.import_state = nullptr;
  v.flags = 0;
  v.apply = &apply_fn<C>;
  v.accept = &accept_fn<C>;
  v.fork = &fork_fn<C>;
  v.release = &release_fn<C>;
  return v;
}

constexpr loom_param_desc param(const char* key, loom_value_type type, const char* description) {
  return loom_param_desc{sizeof(loom_param_desc), key, type, 0, nullptr, description};
}

constexpr loom_sampler_vtable kGrammarVt = make_vtable<Sampler<false>>();
constexpr loom_sampler_vtable kSchemaVt = make_vtable<Sampler<true>>();
constexpr loom_param_desc kGrammarParams[] = {
    param("grammar", LOOM_VALUE_STRING, "GBNF grammar text (llama.cpp dialect; start rule 'root')"),
    param("grammar_file", LOOM_VALUE_PATH, "a file holding the GBNF grammar (instead of 'grammar')"),
};
constexpr loom_param_desc kSchemaParams[] = {
    param("schema", LOOM_VALUE_STRING, "JSON schema text the output must satisfy"),
    param("schema_file", LOOM_VALUE_PATH, "a file holding the JSON schema (instead of 'schema')"),
};
const loom_component_desc kGrammarDesc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "grammar", "1.0.0",
    "Masks tokens a GBNF grammar does not allow next", kGrammarParams, 2, LOOM_THREADING_SERIAL,
    &kGrammarVt};
const loom_component_desc kSchemaDesc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "json-schema", "1.0.0",
    "Masks tokens that cannot continue JSON satisfying a schema", kSchemaParams, 2,
    LOOM_THREADING_SERIAL, &kSchemaVt};
const loom_component_desc* const kComponents[] = {&kGrammarDesc, &kSchemaDesc};
const loom_plugin_desc kPlugin = {sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR,
                                  "loom-grammar", "1.0.0", "Apache-2.0", kComponents, 2, nullptr};

}  // namespace
}  // namespace loomp::grammar

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) {
  return &loomp::grammar::kPlugin;
}
