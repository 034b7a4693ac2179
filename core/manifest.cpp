#include "loom/core/manifest.hpp"

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "loom/core/error.hpp"
#include "loom/core/version.hpp"
#include "toml_guard.hpp"
#include "toml_support.hpp"

namespace loom {

namespace {

struct KindInfo {
  loom_kind kind;
  const char *name;
  bool list;
};
constexpr KindInfo kKinds[] = {
    {LOOM_KIND_ATTENTION, "attention", false}, {LOOM_KIND_QUANTIZER, "quantizer", false},
    {LOOM_KIND_PARALLEL, "parallel", false},   {LOOM_KIND_SAMPLER, "sampler", true},
    {LOOM_KIND_ADAPTER, "adapter", true},      {LOOM_KIND_RETRIEVER, "retriever", true},
    {LOOM_KIND_TOOL, "tool", true},            {LOOM_KIND_DRAFTER, "drafter", false},
};

// Walks a table with a fixed schema: every key must be known and of the expected type.
class SchemaReader {
 public:
  SchemaReader(const toml::table &table, std::string path, std::string source)
      : table_(table), path_(std::move(path)), source_(std::move(source)) {}

  // Throws for any key not in `known`.
  void only(std::initializer_list<std::string_view> known) const {
    for (auto &&[key, node] : table_) {
      bool ok = false;
      for (auto k : known) ok = ok || key.str() == k;
      if (!ok) {
        std::string list;
        for (auto k : known) list += std::string(list.empty() ? "" : ", ") + std::string(k);
        throw manifest_error(detail::where(key.source(), source_) + ": " + qualified(key.str()) +
                             ": unknown key (known: " + list + ")");
      }
    }
  }

  const toml::node *get(std::string_view key, toml::node_type type, const char *expected) const {
    const toml::node *node = table_.get(key);
    if (node == nullptr) return nullptr;
    if (node->type() != type) fail(*node, key, std::string("expected ") + expected + ", got " + detail::describe_type(*node));
    return node;
  }

  [[noreturn]] void fail(const toml::node &node, std::string_view key, const std::string &what) const {
    throw manifest_error(detail::where(node.source(), source_) + ": " + qualified(key) + ": " + what);
  }

  std::string qualified(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }

  bool read_string(std::string_view key, std::string &out) const {
    if (auto n = get(key, toml::node_type::string, "a string")) { out = *n->value<std::string>(); return true; }
    return false;
  }

  bool read_int(std::string_view key, int64_t &out, int64_t min, int64_t max) const {
    auto n = get(key, toml::node_type::integer, "an integer");
    if (n == nullptr) return false;
    int64_t v = *n->value<int64_t>();
    if (v < min || v > max) fail(*n, key, "must be between " + std::to_string(min) + " and " + std::to_string(max) + ", got " + std::to_string(v));
    out = v;
    return true;
  }

  // A number (an integer is taken as one too) within [min, max].
  bool read_number(std::string_view key, double &out, double min, double max) const {
    const toml::node *n = table_.get(key);
    if (n == nullptr) return false;
    if (!n->is_floating_point() && !n->is_integer()) fail(*n, key, "expected a number, got " + detail::describe_type(*n));
    const double v = n->is_integer() ? static_cast<double>(*n->value<int64_t>()) : *n->value<double>();
    if (!(v >= min && v <= max)) fail(*n, key, "must be between " + std::to_string(min) + " and " + std::to_string(max));
    out = v;
    return true;
  }

  // A non-empty path, relative to `base_dir` unless absolute.
  bool read_path(std::string_view key, const std::filesystem::path &base_dir, std::filesystem::path &out) const {
    std::string v;
    if (!read_string(key, v)) return false;
    if (v.empty()) fail(*table_.get(key), key, "must not be empty");
    const std::filesystem::path p = v;
    out = p.is_absolute() ? p : (base_dir / p).lexically_normal();
    return true;
  }

  const toml::table &table() const { return table_; }
  const std::string &source() const { return source_; }

 private:
  const toml::table &table_;
  std::string path_;
  std::string source_;
};

void read_loom_table(const toml::table &t, const std::string &source, Manifest &m) {
  SchemaReader r(t, "loom", source);
  r.only({"plugin_paths", "device", "seed", "threads"});
  if (auto n = r.get("plugin_paths", toml::node_type::array, "an array of strings")) {
    for (const auto &item : *n->as_array()) {
      if (!item.is_string()) r.fail(item, "plugin_paths", "expected an array of strings, found " + detail::describe_type(item));
      std::filesystem::path p = *item.value<std::string>();
      m.plugin_paths.push_back(p.is_absolute() ? p : m.base_dir / p);
    }
  }
  if (r.read_string("device", m.device)) {
    const std::string &d = m.device;
    bool ok = d == "auto" || d == "cpu" || d == "cuda";
    if (!ok && d.rfind("cuda:", 0) == 0 && d.size() > 5) {
      ok = d.find_first_not_of("0123456789", 5) == std::string::npos;
    }
    if (!ok) r.fail(*t.get("device"), "device", "expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got \"" + d + "\"");
  }
  int64_t seed = 0;
  if (r.read_int("seed", seed, 0, INT64_MAX)) m.seed = static_cast<uint64_t>(seed);
  if (auto n = r.get("threads", toml::node_type::integer, "an integer (0 = one per hardware thread)")) {
    const int64_t v = *n->value<int64_t>();
    if (v < 0) r.fail(*n, "threads", "must be 0 (one per hardware thread) or a positive count, got " + std::to_string(v));
    if (v > 1024) r.fail(*n, "threads", "at most 1024 threads, got " + std::to_string(v));
    m.threads = v;
  }
}

// A prompt's token ids (an array of integers), checked like run.prompt's.
std::vector<int32_t> read_token_ids(const SchemaReader &r, const toml::node &n, const std::string &key, bool has_model,
                                    int64_t vocab_size) {
  std::vector<int32_t> out;
  size_t i = 0;
  for (const auto &item : *n.as_array()) {
    std::string item_key = key + "[" + std::to_string(i++) + "]";
    if (!item.is_integer()) r.fail(item, item_key, "expected an integer token id, got " + detail::describe_type(item));
    int64_t v = *item.value<int64_t>();
    // Checked as int64 before narrowing: a huge id must not wrap into the vocabulary. With a
    // [model], its own vocabulary is checked when it loads.
    int64_t vocab = has_model ? INT32_MAX : vocab_size;
    if (v < 0 || v >= vocab)
      r.fail(item, item_key, "token " + std::to_string(v) + " is outside the vocabulary of " + std::to_string(vocab));
    out.push_back(static_cast<int32_t>(v));
  }
  if (out.empty()) r.fail(n, key, "must hold at least one token");
  if (out.size() > (1u << 16)) r.fail(n, key, "holds more than 65536 tokens");
  return out;
}

void read_scheduler_table(const toml::table &t, const std::string &source, SchedulerSpec &s) {
  SchemaReader r(t, "scheduler", source);
  r.only({"max_seqs", "max_batched_tokens", "chunked_prefill", "prefix_caching", "kv_blocks", "kv_cache_mib",
          "speculative_tokens", "speculative_adaptive", "speculative_max_tokens"});
  s.enabled = true;
  r.read_int("max_seqs", s.max_seqs, 1, 4096);
  r.read_int("max_batched_tokens", s.max_batched_tokens, 1, 1 << 20);
  r.read_int("kv_blocks", s.kv_blocks, 0, int64_t{1} << 30);
  r.read_int("kv_cache_mib", s.kv_cache_mib, 0, int64_t{1} << 30);
  if (auto n = r.get("chunked_prefill", toml::node_type::boolean, "true or false")) s.chunked_prefill = *n->value<bool>();
  if (auto n = r.get("prefix_caching", toml::node_type::boolean, "true or false")) s.prefix_caching = *n->value<bool>();
  r.read_int("speculative_tokens", s.speculative_tokens, 1, 64);
  r.read_int("speculative_max_tokens", s.speculative_max_tokens, 1, 64);
  if (auto n = r.get("speculative_adaptive", toml::node_type::boolean, "true or false"))
    s.speculative_adaptive = *n->value<bool>();
  if (s.speculative_tokens > s.speculative_max_tokens) {
    if (t.contains("speculative_max_tokens"))
      r.fail(*t.get("speculative_tokens"), "speculative_tokens",
             "must not exceed speculative_max_tokens (" + std::to_string(s.speculative_max_tokens) + ")");
    s.speculative_max_tokens = s.speculative_tokens;
  }
}

void read_server_table(const toml::table &t, const std::string &source, ServerSpec &s) {
  SchemaReader r(t, "server", source);
  r.only({"host", "port", "model_name", "api_keys", "admin_key", "max_queue", "max_body_bytes", "max_tokens",
          "max_positions", "request_timeout_s", "drain_timeout_s", "max_connections", "read_timeout_s"});
  s.enabled = true;
  r.read_string("host", s.host);
  r.read_int("port", s.port, 0, 65535);
  r.read_string("model_name", s.model_name);
  if (auto n = r.get("api_keys", toml::node_type::array, "an array of keys")) {
    for (const auto &item : *n->as_array()) {
      if (!item.is_string() || item.value<std::string>()->size() < 8) r.fail(item, "api_keys", "expected keys of 8 or more characters");
      s.api_keys.push_back(*item.value<std::string>());
    }
  }
  if (r.read_string("admin_key", s.admin_key) && s.admin_key.size() < 8)
    r.fail(*t.get("admin_key"), "admin_key", "expected a key of 8 or more characters");
  r.read_int("max_queue", s.max_queue, 0, 1 << 20);
  r.read_int("max_body_bytes", s.max_body_bytes, 1024, int64_t{1} << 30);
  r.read_int("max_tokens", s.max_tokens, 1, 1 << 24);
  r.read_int("max_positions", s.max_positions, 0, 1 << 24);
  r.read_number("request_timeout_s", s.request_timeout_s, 0.001, 86400.0 * 7);
  r.read_number("drain_timeout_s", s.drain_timeout_s, 0.0, 86400.0);
  r.read_int("max_connections", s.max_connections, 4, 65536);
  r.read_number("read_timeout_s", s.read_timeout_s, 0.01, 3600.0);
}

void read_embedding_table(const toml::table &t, const std::string &source, EmbeddingSpec &s) {
  SchemaReader r(t, "embedding", source);
  r.only({"pooling", "normalize", "query_prefix", "document_prefix", "max_tokens", "batch"});
  s.enabled = true;
  if (r.read_string("pooling", s.pooling) && s.pooling != "mean" && s.pooling != "last")
    r.fail(*t.get("pooling"), "pooling", "expected \"mean\" or \"last\", got \"" + s.pooling + "\"");
  if (auto n = r.get("normalize", toml::node_type::boolean, "true or false")) s.normalize = *n->value<bool>();
  r.read_string("query_prefix", s.query_prefix);
  r.read_string("document_prefix", s.document_prefix);
  r.read_int("max_tokens", s.max_tokens, 1, 1 << 20);
  r.read_int("batch", s.batch, 1, 4096);
}

void read_agent_table(const toml::table &t, const std::string &source, AgentSpec &s) {
  SchemaReader r(t, "agent", source);
  r.only({"max_steps", "max_tokens", "step_tokens", "call_timeout_s", "max_result_bytes", "tools", "format"});
  if (r.read_string("format", s.format) && s.format != "json" && s.format != "native")
    r.fail(*t.get("format"), "format", "expected \"json\" or \"native\", got \"" + s.format + "\"");
  s.enabled = true;
  r.read_int("max_steps", s.max_steps, 1, 1000);
  r.read_int("max_tokens", s.max_tokens, 1, 1 << 24);
  r.read_int("step_tokens", s.step_tokens, 1, 1 << 20);
  r.read_number("call_timeout_s", s.call_timeout_s, 0.001, 86400.0);
  r.read_int("max_result_bytes", s.max_result_bytes, 1, 1 << 30);
  if (auto n = r.get("tools", toml::node_type::array, "an array of tool names")) {
    for (const auto &item : *n->as_array()) {
      if (!item.is_string() || item.value<std::string>()->empty()) r.fail(item, "tools", "expected non-empty tool names");
      s.tools.push_back(*item.value<std::string>());
    }
  }
}

void read_train_table(const toml::table &t, const std::string &source, const std::filesystem::path &base_dir,
                      TrainSpec &s) {
  SchemaReader r(t, "train", source);
  r.only({"data", "validation_data", "validation_fraction", "seq_len", "batch_size", "grad_accum", "steps", "lr", "min_lr",
          "schedule", "warmup", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "recompute", "eval_every", "save_every",
          "out", "resume", "precision", "init", "save_dtype", "pipeline_micro_batch", "attention"});
  s.enabled = true;
  for (const char *required : {"data", "out"})
    if (!t.contains(required)) r.fail(t, required, "is required");
  r.read_path("data", base_dir, s.data);
  r.read_path("validation_data", base_dir, s.validation_data);
  r.read_path("out", base_dir, s.out);
  r.read_path("resume", base_dir, s.resume);
  r.read_number("validation_fraction", s.validation_fraction, 0.0, 0.5);
  r.read_int("seq_len", s.seq_len, 2, 1 << 20);
  r.read_int("batch_size", s.batch_size, 1, 1 << 16);
  r.read_int("grad_accum", s.grad_accum, 1, 1 << 16);
  r.read_int("pipeline_micro_batch", s.pipeline_micro_batch, 1, 1 << 16);
  r.read_int("steps", s.steps, 1, int64_t{1} << 32);
  r.read_number("lr", s.lr, 0.0, 10.0);
  r.read_number("min_lr", s.min_lr, 0.0, 10.0);
  if (r.read_string("schedule", s.schedule) && s.schedule != "cosine" && s.schedule != "linear" && s.schedule != "constant")
    r.fail(*t.get("schedule"), "schedule", "expected \"cosine\", \"linear\" or \"constant\", got \"" + s.schedule + "\"");
  r.read_int("warmup", s.warmup, 0, int64_t{1} << 32);
  r.read_number("weight_decay", s.weight_decay, 0.0, 10.0);
  r.read_number("beta1", s.beta1, 0.0, 0.999999);
  r.read_number("beta2", s.beta2, 0.0, 0.999999999);
  r.read_number("eps", s.eps, 1e-30, 1.0);
  r.read_number("grad_clip", s.grad_clip, 0.0, 1e9);
  if (auto n = r.get("recompute", toml::node_type::boolean, "true or false")) s.recompute = *n->value<bool>();
  if (r.read_string("attention", s.attention) && s.attention != "core" && s.attention != "plugin")
    r.fail(*t.get("attention"), "attention", "expected \"core\" or \"plugin\", got \"" + s.attention + "\"");
  if (r.read_string("precision", s.precision) && s.precision != "float32" && s.precision != "bf16")
    r.fail(*t.get("precision"), "precision", "expected \"float32\" or \"bf16\", got \"" + s.precision + "\"");
  if (r.read_string("init", s.init) && s.init != "pretrained" && s.init != "random")
    r.fail(*t.get("init"), "init", "expected \"pretrained\" or \"random\", got \"" + s.init + "\"");
  if (r.read_string("save_dtype", s.save_dtype) && s.save_dtype != "float32" && s.save_dtype != "bfloat16")
    r.fail(*t.get("save_dtype"), "save_dtype", "expected \"float32\" or \"bfloat16\", got \"" + s.save_dtype + "\"");
  r.read_int("eval_every", s.eval_every, 0, int64_t{1} << 32);
  r.read_int("save_every", s.save_every, 0, int64_t{1} << 32);
  if (s.min_lr > s.lr) r.fail(*t.get("min_lr"), "min_lr", "must not exceed lr");
}

void read_run_table(const toml::table &t, const std::string &source, RunSpec &run, bool has_model) {
  SchemaReader r(t, "run", source);
  r.only({"steps", "n", "prompt", "prompts", "prompt_steps", "messages", "chat_template", "stop", "stop_tokens", "query", "top_k", "filter", "tool_calls", "vocab_size", "hidden_size", "n_heads",
          "n_kv_heads", "n_layers"});
  r.read_int("steps", run.steps, 1, 1 << 20);
  r.read_int("n", run.n, 1, 64);
  r.read_int("top_k", run.top_k, 1, 1000);
  r.read_int("vocab_size", run.vocab_size, 2, 1 << 18);
  r.read_int("hidden_size", run.hidden_size, 1, 4096);
  r.read_int("n_heads", run.n_heads, 1, 256);
  r.read_int("n_kv_heads", run.n_kv_heads, 1, 256);
  r.read_int("n_layers", run.n_layers, 1, 64);
  r.read_string("query", run.query);
  r.read_string("filter", run.filter);
  if (const toml::node *text = t.get("prompt"); text != nullptr && text->is_string()) {
    run.prompt_text = *text->value<std::string>();
    if (run.prompt_text.empty()) r.fail(*text, "prompt", "must not be empty");
  } else if (auto n = r.get("prompt", toml::node_type::array, "text or an array of token ids")) {
    run.prompt = read_token_ids(r, *n, "prompt", has_model, run.vocab_size);
  }
  if (auto n = r.get("prompts", toml::node_type::array, "an array of prompts (texts or arrays of token ids)")) {
    if (t.contains("prompt") || t.contains("messages"))
      r.fail(*n, "prompts", "give one of prompts, prompt or messages, not several");
    size_t i = 0;
    for (const auto &item : *n->as_array()) {
      std::string key = "prompts[" + std::to_string(i++) + "]";
      PromptSpec p;
      if (item.is_string()) {
        p.text = *item.value<std::string>();
        if (p.text.empty()) r.fail(item, key, "must not be empty");
      } else if (item.is_array()) {
        p.ids = read_token_ids(r, item, key, has_model, run.vocab_size);
      } else {
        r.fail(item, key, "expected a text or an array of token ids, got " + detail::describe_type(item));
      }
      run.prompts.push_back(std::move(p));
    }
    if (run.prompts.empty()) r.fail(*n, "prompts", "must hold at least one prompt");
    if (run.prompts.size() > 1024) r.fail(*n, "prompts", "holds more than 1024 prompts");
  }
  if (auto n = r.get("prompt_steps", toml::node_type::array, "an array of step counts, one per prompt")) {
    size_t i = 0;
    for (const auto &item : *n->as_array()) {
      const std::string key = "prompt_steps[" + std::to_string(i++) + "]";
      if (!item.is_integer()) r.fail(item, key, "expected an integer, got " + detail::describe_type(item));
      const int64_t v = *item.value<int64_t>();
      if (v < 1 || v > (1 << 20)) r.fail(item, key, "must be between 1 and 1048576, got " + std::to_string(v));
      run.prompt_steps.push_back(v);
    }
    if (run.prompt_steps.size() != std::max<size_t>(run.prompts.size(), 1))
      r.fail(*n, "prompt_steps", "holds " + std::to_string(run.prompt_steps.size()) + " counts for " +
                                     std::to_string(std::max<size_t>(run.prompts.size(), 1)) + " prompts (one each)");
  }
  if (auto n = r.get("stop_tokens", toml::node_type::array, "an array of token ids")) {
    run.stop_tokens_set = true;
    size_t i = 0;
    for (const auto &item : *n->as_array()) {
      std::string key = "stop_tokens[" + std::to_string(i++) + "]";
      if (!item.is_integer() || *item.value<int64_t>() < 0 || *item.value<int64_t>() > INT32_MAX)
        r.fail(item, key, "expected a non-negative token id");
      run.stop_tokens.push_back(static_cast<int32_t>(*item.value<int64_t>()));
    }
  }
  if (auto n = r.get("messages", toml::node_type::array, "an array of {role, content} tables")) {
    size_t i = 0;
    for (const auto &item : *n->as_array()) {
      std::string path = "run.messages[" + std::to_string(i++) + "]";
      if (!item.is_table()) r.fail(item, "messages", "expected tables {role = \"user\", content = \"...\"}");
      SchemaReader c(*item.as_table(), path, source);
      c.only({"role", "content"});
      std::string role, content;
      if (!c.read_string("role", role) || !c.read_string("content", content))
        throw manifest_error(detail::where(item.source(), source) + ": " + path + ": needs role and content");
      if (role != "system" && role != "user" && role != "assistant")
        c.fail(*item.as_table()->get("role"), "role", "expected system, user or assistant, got '" + role + "'");
      run.messages.emplace_back(std::move(role), std::move(content));
    }
    if (run.messages.empty()) r.fail(*n, "messages", "must hold at least one message");
    if (t.contains("prompt")) r.fail(*n, "messages", "give either prompt or messages, not both");
  }
  if (r.read_string("chat_template", run.chat_template)) {
    const std::string &c = run.chat_template;
    if (c != "auto" && c != "llama3" && c != "chatml" && c != "mistral" && c != "plain")
      r.fail(*t.get("chat_template"), "chat_template", "expected auto, llama3, chatml, mistral or plain, got '" + c + "'");
  }
  if (auto n = r.get("stop", toml::node_type::array, "an array of strings")) {
    size_t i = 0;
    for (const auto &item : *n->as_array()) {
      std::string key = "stop[" + std::to_string(i++) + "]";
      if (!item.is_string() || item.value<std::string>()->empty()) r.fail(item, key, "expected a non-empty string");
      run.stop.push_back(*item.value<std::string>());
    }
  }
  if (auto n = r.get("tool_calls", toml::node_type::array, "an array of tables")) {
    size_t i = 0;
    for (const auto &item : *n->as_array()) {
      std::string path = "run.tool_calls[" + std::to_string(i++) + "]";
      if (!item.is_table()) r.fail(item, "tool_calls", "expected tables {tool = \"...\", arguments = {...}}");
      SchemaReader c(*item.as_table(), path, source);
      c.only({"tool", "arguments"});
      ToolCallSpec call;
      if (!c.read_string("tool", call.tool)) throw manifest_error(detail::where(item.source(), source) + ": " + path + ": missing key 'tool'");
      call.arguments_json = "{}";
      if (auto a = c.get("arguments", toml::node_type::table, "a table")) {
        std::ostringstream out;
        out << toml::json_formatter{*a->as_table()};
        call.arguments_json = out.str();
      }
      run.tool_calls.push_back(std::move(call));
    }
  }
  if (run.vocab_size * run.hidden_size > (int64_t{1} << 26))
    throw manifest_error(detail::where(t.source(), source) + ": run: vocab_size x hidden_size exceeds 2^26 weights,"
                         " more than the synthetic decoder is meant for");
  if (run.hidden_size % run.n_heads != 0)
    throw manifest_error(detail::where(t.source(), source) + ": run: hidden_size " + std::to_string(run.hidden_size) +
                         " is not a multiple of n_heads " + std::to_string(run.n_heads));
  if (run.n_heads % run.n_kv_heads != 0)
    throw manifest_error(detail::where(t.source(), source) + ": run: n_heads " + std::to_string(run.n_heads) +
                         " is not a multiple of n_kv_heads " + std::to_string(run.n_kv_heads));
}

ComponentSpec read_component(loom_kind kind, const std::string &slot, const std::shared_ptr<const toml::table> &document,
                             const toml::table &t, const std::string &source, const std::filesystem::path &base_dir) {
  SchemaReader r(t, slot, source);
  ComponentSpec spec;
  spec.kind = kind;
  spec.slot = slot;
  if (!r.read_string("use", spec.use))
    throw manifest_error(detail::where(t.source(), source) + ": " + slot + ": missing key 'use' (the component's name)");
  if (spec.use.empty()) r.fail(*t.get("use"), "use", "must not be empty");
  std::string library;
  if (r.read_string("library", library)) {
    std::filesystem::path p = library;
    spec.library = p.is_absolute() ? p : base_dir / p;
  }
  if (r.read_string("version", spec.version_range)) {
    std::string err = check_version_range(spec.version_range);
    if (!err.empty()) r.fail(*t.get("version"), "version", err);
  }
  std::string name;
  if (r.read_string("name", name)) {
    if (name.empty() || name.find_first_of(" \t[].=") != std::string::npos)
      r.fail(*t.get("name"), "name", "must be non-empty without spaces, brackets, dots or '='");
    spec.slot = name;
  }
  if (r.read_path("weights", base_dir, spec.weights) && kind != LOOM_KIND_ADAPTER)
    r.fail(*t.get("weights"), "weights", "only an [[adapter]] takes weights (a PEFT adapter directory)");
  if (r.read_path("index", base_dir, spec.index) && kind != LOOM_KIND_RETRIEVER)
    r.fail(*t.get("index"), "index", "only a [[retriever]] takes an index (a directory `loom index build` wrote)");
  spec.table = detail::make_component_table(document, t, source, base_dir);
  return spec;
}

// ---- --set overrides ----

struct PathSegment {
  std::string key;
  std::vector<size_t> indices;
};

std::vector<PathSegment> parse_key_path(std::string_view path, const std::string &arg) {
  std::vector<PathSegment> out;
  size_t i = 0;
  auto bad = [&](const std::string &why) { return manifest_error("--set " + arg + ": " + why); };
  while (i < path.size()) {
    PathSegment seg;
    while (i < path.size() && path[i] != '.' && path[i] != '[') seg.key += path[i++];
    if (seg.key.empty()) throw bad("empty key in path '" + std::string(path) + "'");
    while (i < path.size() && path[i] == '[') {
      size_t close = path.find(']', i);
      if (close == std::string_view::npos) throw bad("missing ']' in path");
      std::string digits(path.substr(i + 1, close - i - 1));
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 6)
        throw bad("array index '" + digits + "' is not a number");
      seg.indices.push_back(std::stoul(digits));
      i = close + 1;
    }
    out.push_back(std::move(seg));
    if (i < path.size()) {
      if (path[i] != '.') throw bad("expected '.' after ']'");
      ++i;
      if (i == path.size()) throw bad("path ends with '.'");
    }
  }
  if (out.empty()) throw bad("empty key path");
  return out;
}

void apply_override(toml::table &root, const std::string &arg) {
  size_t eq = arg.find('=');
  if (eq == std::string::npos) throw manifest_error("--set " + arg + ": expected key.path=value");
  std::string path = arg.substr(0, eq), value_text = arg.substr(eq + 1);
  auto segments = parse_key_path(path, arg);
  // The value: a TOML value when it parses as one, else a bare string ("--set attention.use=flash").
  toml::table holder;
  bool parsed = false;
  if (!detail::find_toml_hazard(value_text)) {
    try {
      holder = toml::parse("v = " + value_text, "--set " + arg);
      parsed = true;
    } catch (const toml::parse_error &) {
    }
  }
  if (!parsed) {
    holder = toml::table{};
    holder.insert("v", value_text);
  }
  if (holder.size() != 1 || !holder.contains("v")) {
    holder = toml::table{};
    holder.insert("v", value_text);
  }
  toml::node &value = *holder.get("v");

  toml::node *cursor = &root;
  for (size_t s = 0; s < segments.size(); ++s) {
    const PathSegment &seg = segments[s];
    bool last_segment = s + 1 == segments.size();
    toml::table *table = cursor->as_table();
    if (table == nullptr) throw manifest_error("--set " + arg + ": '" + seg.key + "' is not inside a table");
    if (last_segment && seg.indices.empty()) {
      table->insert_or_assign(seg.key, std::move(value));
      return;
    }
    toml::node *next = table->get(seg.key);
    if (next == nullptr) {
      if (!seg.indices.empty()) throw manifest_error("--set " + arg + ": no array '" + seg.key + "' to index");
      next = &table->insert_or_assign(seg.key, toml::table{}).first->second;
    }
    for (size_t k = 0; k < seg.indices.size(); ++k) {
      toml::array *array = next->as_array();
      if (array == nullptr) throw manifest_error("--set " + arg + ": '" + seg.key + "' is not an array");
      size_t index = seg.indices[k];
      if (index >= array->size())
        throw manifest_error("--set " + arg + ": index " + std::to_string(index) + " is out of range ('" + seg.key +
                             "' has " + std::to_string(array->size()) + " elements)");
      if (last_segment && k + 1 == seg.indices.size()) {
        array->replace(array->cbegin() + static_cast<std::ptrdiff_t>(index), std::move(value));
        return;
      }
      next = array->get(index);
    }
    cursor = next;
  }
}

Manifest build_manifest(toml::table parsed, const std::string &source, const std::filesystem::path &base_dir,
                        const std::vector<std::string> &overrides) {
  for (const auto &o : overrides) apply_override(parsed, o);
  auto document = std::make_shared<const toml::table>(std::move(parsed));
  const toml::table &root = *document;
  Manifest m;
  m.source_name = source;
  m.base_dir = base_dir;
  for (auto &&[key, node] : root) {
    std::string k(key.str());
    std::string key_where = detail::where(key.source(), source); // (clang 14 cannot capture bindings)
    auto fail = [&](const std::string &what) { throw manifest_error(key_where + ": " + k + ": " + what); };
    if (k == "loom") {
      if (!node.is_table()) fail("expected a table");
      read_loom_table(*node.as_table(), source, m);
      continue;
    }
    if (k == "model") {
      if (!node.is_table()) fail("expected a table");
      SchemaReader r(*node.as_table(), "model", source);
      r.only({"path", "dtype", "calibration", "calibration_tokens", "calibration_length"});
      std::string path;
      if (!r.read_string("path", path) || path.empty())
        fail("needs path = \"a Hugging Face model directory\"");
      if (r.read_string("dtype", m.model_dtype) && m.model_dtype != "auto" && m.model_dtype != "float32" &&
          m.model_dtype != "bfloat16")
        r.fail(*node.as_table()->get("dtype"), "dtype",
               "expected \"auto\", \"float32\" or \"bfloat16\", got \"" + m.model_dtype + "\"");
      std::filesystem::path p = path;
      m.model_path = p.is_absolute() ? p : (base_dir / p).lexically_normal();
      r.read_path("calibration", base_dir, m.calibration_path);
      r.read_int("calibration_tokens", m.calibration_tokens, 1, 1 << 20);
      r.read_int("calibration_length", m.calibration_length, 2, 1 << 20);
      continue;
    }
    if (k == "run") {
      if (!node.is_table()) fail("expected a table");
      read_run_table(*node.as_table(), source, m.run, root.contains("model"));
      continue;
    }
    if (k == "scheduler") {
      if (!node.is_table()) fail("expected a table");
      read_scheduler_table(*node.as_table(), source, m.scheduler);
      continue;
    }
    if (k == "server") {
      if (!node.is_table()) fail("expected a table");
      read_server_table(*node.as_table(), source, m.server);
      continue;
    }
    if (k == "embedding") {
      if (!node.is_table()) fail("expected a table");
      read_embedding_table(*node.as_table(), source, m.embedding);
      continue;
    }
    if (k == "agent") {
      if (!node.is_table()) fail("expected a table");
      read_agent_table(*node.as_table(), source, m.agent);
      continue;
    }
    if (k == "train") {
      if (!node.is_table()) fail("expected a table");
      if (!root.contains("model")) fail("needs a [model] to train");
      read_train_table(*node.as_table(), source, base_dir, m.train);
      continue;
    }
    loom_kind kind = kind_from_name(k);
    if (kind == 0)
      fail("unknown key (known: loom, model, run, embedding, agent, scheduler, server, train, attention, quantizer, parallel, sampler, adapter, retriever, tool, drafter)");
    if (kind_is_list(kind)) {
      if (!node.is_array_of_tables()) fail("expected an array of tables: write [[" + k + "]]");
      size_t i = 0;
      for (const auto &item : *node.as_array())
        m.components.push_back(read_component(kind, k + "[" + std::to_string(i++) + "]", document, *item.as_table(), source, base_dir));
    } else {
      if (!node.is_table()) fail("expected a table: write [" + k + "]");
      m.components.push_back(read_component(kind, k, document, *node.as_table(), source, base_dir));
    }
  }
  // TOML tables iterate by key; the pipeline is built in the order the manifest first mentions
  // each kind, and a list kind keeps its array order (items that --set added included).
  std::map<loom_kind, uint32_t> first_line;
  for (const auto &c : m.components) {
    auto [it, inserted] = first_line.emplace(c.kind, c.table->line());
    if (!inserted) it->second = std::min(it->second, c.table->line());
  }
  std::stable_sort(m.components.begin(), m.components.end(), [&](const ComponentSpec &a, const ComponentSpec &b) {
    return first_line[a.kind] < first_line[b.kind];
  });
  // Slot names must be unique: `name` keys may collide with each other or with default slots.
  for (size_t i = 0; i < m.components.size(); ++i)
    for (size_t j = i + 1; j < m.components.size(); ++j)
      if (m.components[i].slot == m.components[j].slot)
        throw manifest_error(m.components[j].table->where() + ": " + m.components[j].slot +
                             ": slot name already used by another component");
  return m;
}

std::string parse_error_message(const toml::parse_error &e, const std::string &source) {
  return detail::where(e.source(), source) + ": " + std::string(e.description());
}

// toml::parse behind the hazard scan (see toml_guard.hpp).
toml::table parse_toml(std::string_view text, const std::string &source) {
  if (auto hazard = detail::find_toml_hazard(text))
    throw manifest_error(source + ":" + std::to_string(hazard->line) + ":" + std::to_string(hazard->column) + ": " +
                         hazard->message);
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error &e) {
    throw manifest_error(parse_error_message(e, source));
  }
}

} // namespace

std::vector<const ComponentSpec *> Manifest::of_kind(loom_kind kind) const {
  std::vector<const ComponentSpec *> out;
  for (const auto &c : components)
    if (c.kind == kind) out.push_back(&c);
  return out;
}

Manifest parse_manifest_file(const std::filesystem::path &path, const std::vector<std::string> &overrides) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw manifest_error(path.string() + ": cannot open the manifest");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw manifest_error(path.string() + ": cannot read the manifest");
  std::error_code ec;
  auto base = std::filesystem::absolute(path, ec).parent_path();
  return parse_manifest_string(text.str(), path.string(), overrides, base.empty() ? std::filesystem::current_path() : base);
}

Manifest parse_manifest_string(std::string_view text, std::string_view source_name,
                               const std::vector<std::string> &overrides, const std::filesystem::path &base_dir) {
  std::string source(source_name);
  toml::table root = parse_toml(text, source);
  return build_manifest(std::move(root), source, base_dir.empty() ? std::filesystem::current_path() : base_dir, overrides);
}

ComponentSpec parse_component_spec(loom_kind kind, std::string_view slot, std::string_view text,
                                   std::string_view source_name, const std::filesystem::path &base_dir) {
  std::string source(source_name);
  auto document = std::make_shared<const toml::table>(parse_toml(text, source));
  ComponentSpec spec = read_component(kind, std::string(slot), document, *document, source,
                                      base_dir.empty() ? std::filesystem::current_path() : base_dir);
  spec.slot = std::string(slot); // a swap replaces a slot; it cannot rename it
  return spec;
}

const char *kind_name(loom_kind kind) {
  for (const auto &k : kKinds)
    if (k.kind == kind) return k.name;
  return "unknown";
}

loom_kind kind_from_name(std::string_view name) {
  for (const auto &k : kKinds)
    if (name == k.name) return k.kind;
  return 0;
}

bool kind_is_list(loom_kind kind) {
  for (const auto &k : kKinds)
    if (k.kind == kind) return k.list;
  return false;
}

} // namespace loom
