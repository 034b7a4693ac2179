#include "server.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include <sys/socket.h>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "connection_pool.hpp"
#include "logprobs_json.hpp"
#include "loom/core/error.hpp"
#include "loom/core/request_queue.hpp"
#include "openai_request.hpp"
#include "prometheus.hpp"
#include "stream_text.hpp"

namespace loom::server {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Compares a presented key with a configured one in time independent of where they differ (the
// lengths are not secret: keys are random strings of a known shape).
bool same_key(const std::string &a, const std::string &b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = static_cast<unsigned char>(diff | (x ^ y));
  }
  return diff == 0;
}

std::string bearer(const httplib::Request &req) {
  const std::string h = req.get_header_value("Authorization");
  const std::string prefix = "Bearer ";
  return h.compare(0, prefix.size(), prefix) == 0 ? h.substr(prefix.size()) : std::string();
}

std::string base64(const void *data, size_t n) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const auto *p = static_cast<const unsigned char *>(data);
  std::string out;
  out.reserve((n + 2) / 3 * 4);
  for (size_t i = 0; i < n; i += 3) {
    const uint32_t v = uint32_t{p[i]} << 16 | (i + 1 < n ? uint32_t{p[i + 1]} << 8 : 0) | (i + 2 < n ? uint32_t{p[i + 2]} : 0);
    out += kAlphabet[v >> 18 & 63];
    out += kAlphabet[v >> 12 & 63];
    out += i + 1 < n ? kAlphabet[v >> 6 & 63] : '=';
    out += i + 2 < n ? kAlphabet[v & 63] : '=';
  }
  return out;
}

std::string dump(const json &j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void send_error(httplib::Response &res, const ApiError &e) {
  res.status = e.status;
  res.set_content(error_body(e), "application/json");
}

// One choice of a request (a prompt x one of n): what the engine produced so far. Guarded by
// its Job's mutex.
struct Choice {
  std::vector<int32_t> prompt;
  std::vector<int32_t> tokens;
  bool done = false;
  SequenceResult result;
  std::string error;
  Clock::time_point last_token;
  std::string echo;       // the prompt's text, sent before the reply's (completions' echo)
  size_t sent = 0;        // bytes of text already streamed
  size_t tokens_seen = 0; // tokens the HTTP thread has looked at
  ContinuationCache streamed_text; // the text of those tokens so far (the HTTP thread's)
  int64_t min_tokens = 0; // the request's: stop strings count only in the text after that many tokens
  std::vector<TokenLogprob> logprobs; // as they come (ServeRequest::on_logprob), when asked for
  size_t logprobs_sent = 0;           // of those, streamed
  std::unique_ptr<TokenTexts> texts;  // where those tokens begin in the text (the HTTP thread's)
  // A streamed echo with logprobs: the prompt's entries once the engine computed them
  // (ServeRequest::on_prompt_logprobs), and whether the echo chunk went out.
  std::vector<TokenLogprob> prompt_entries;
  bool prompt_scored = false;
  bool echoed = false;
  std::unique_ptr<ToolCallStream> tool_stream; // a streamed reply with tools: its content and calls so far
  // The prompt's entries as far as they are known: handed over once scored, else the result's
  // (a choice that ended; none for a one-token prompt).
  const std::vector<TokenLogprob> &known_prompt_entries() const { return prompt_scored ? prompt_entries : result.prompt_logprobs; }
};

// A request in flight: its choices and the flag that cancels them. The engine thread's
// callbacks write, the connection thread reads.
struct Job {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<Choice> choices;
  size_t finished = 0;
  std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);
  bool timed_out = false;
};

// cpp-httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, fixed when Debian built the
// library): a burst of connections overflows it and the kernel makes them wait for SYN-ACK
// retransmissions (seconds). The listening socket is listened on again with the system's
// maximum once bound.
struct HttpServer : httplib::Server {
  void widen_backlog() {
    if (svr_sock_ != INVALID_SOCKET) ::listen(svr_sock_, SOMAXCONN);
  }
};

} // namespace

struct Server::Impl {
  Runtime &runtime;
  Runtime *embedder;
  ServerSpec spec;
  std::string model_name;
  int64_t max_positions = 0;
  int64_t capacity = 0; // choices in flight at most
  HttpServer http;
  ConnectionPool *pool = nullptr; // owned by http (its task queue)
  RequestQueue queue;
  std::thread engine, listener;
  std::atomic<bool> ready{false}, draining{false}, stopped{false};
  std::atomic<int64_t> in_flight{0};
  std::mutex jobs_mutex;
  std::vector<std::weak_ptr<Job>> jobs; // for drain's cancel
  std::mutex embed_mutex;
  std::atomic<uint64_t> next_id{1};
  // Metrics.
  Histogram ttft{latency_buckets()}, itl{latency_buckets()}, duration{latency_buckets()};
  std::mutex counts_mutex;
  std::map<std::pair<std::string, int>, uint64_t> responses; // (route, status) -> count
  std::atomic<uint64_t> prompt_tokens{0}, completion_tokens{0}, rejected{0}, cancelled{0};
  std::deque<std::pair<Clock::time_point, uint64_t>> token_window; // per-second token counts, last 10 s
  std::mutex window_mutex;

  Impl(Runtime &r, Runtime *e, const ServerSpec &s) : runtime(r), embedder(e), spec(s) {
    const Manifest &m = runtime.manifest();
    model_name = spec.model_name;
    if (model_name.empty()) model_name = m.model_path.empty() ? "loom-synthetic" : m.model_path.filename().string();
    max_positions = spec.max_positions > 0 ? std::min(spec.max_positions, runtime.max_positions()) : runtime.max_positions();
    capacity = m.scheduler.max_seqs + spec.max_queue;
  }

  void count_tokens(uint64_t n) {
    completion_tokens.fetch_add(n, std::memory_order_relaxed);
    std::lock_guard lock(window_mutex);
    const auto now = Clock::now();
    if (token_window.empty() || now - token_window.back().first > std::chrono::seconds(1)) token_window.emplace_back(now, 0);
    token_window.back().second += n;
    while (!token_window.empty() && now - token_window.front().first > std::chrono::seconds(11)) token_window.pop_front();
  }

  double tokens_per_second() {
    std::lock_guard lock(window_mutex);
    const auto now = Clock::now();
    uint64_t n = 0;
    for (const auto &[t, c] : token_window)
      if (now - t <= std::chrono::seconds(10)) n += c;
    return static_cast<double>(n) / 10.0;
  }

  void record(const std::string &route, int status) {
    std::lock_guard lock(counts_mutex);
    ++responses[{route, status}];
  }

  // ---- auth, health, models, metrics ----

  bool authorised(const httplib::Request &req, httplib::Response &res) {
    if (req.path == "/health") return true;
    const std::string key = bearer(req);
    if (req.path.rfind("/admin/", 0) == 0) {
      if (spec.admin_key.empty()) {
        send_error(res, ApiError(403, "admin routes are off: the manifest's [server] sets no admin_key", "", "permission_error"));
        return false;
      }
      if (!same_key(key, spec.admin_key)) {
        send_error(res, ApiError(401, "admin routes need the admin key as 'Authorization: Bearer KEY'", "", "authentication_error"));
        return false;
      }
      return true;
    }
    if (spec.api_keys.empty()) return true;
    bool ok = false;
    for (const auto &k : spec.api_keys) ok = same_key(key, k) || ok; // every key compared
    if (!ok) send_error(res, ApiError(401, "missing or invalid API key ('Authorization: Bearer KEY')", "", "authentication_error"));
    return ok;
  }

  void metrics(httplib::Response &res) {
    TextWriter w;
    ServeLoad &load = queue.load();
    {
      std::lock_guard lock(counts_mutex);
      w.family("loom_http_responses_total", "counter", "HTTP responses by route and status code");
      for (const auto &[key, n] : responses)
        w.sample("loom_http_responses_total", "route=\"" + key.first + "\",code=\"" + std::to_string(key.second) + "\"",
                 static_cast<double>(n));
    }
    w.metric("loom_requests_in_flight", "gauge", "choices admitted and not yet ended", static_cast<double>(in_flight.load()));
    w.metric("loom_queue_depth", "gauge", "choices waiting for a place in the running batch",
             static_cast<double>(std::max<int64_t>(0, in_flight.load() - load.running.load())));
    w.metric("loom_requests_running", "gauge", "sequences in the running batch", static_cast<double>(load.running.load()));
    w.metric("loom_requests_rejected_total", "counter", "requests refused with 429 (queue full)", static_cast<double>(rejected.load()));
    w.metric("loom_requests_cancelled_total", "counter", "choices cancelled (client gone, timeout, drain)",
             static_cast<double>(cancelled.load()));
    w.metric("loom_prompt_tokens_total", "counter", "prompt tokens of admitted choices", static_cast<double>(prompt_tokens.load()));
    w.metric("loom_generation_tokens_total", "counter", "tokens generated", static_cast<double>(completion_tokens.load()));
    w.metric("loom_generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s", tokens_per_second());
    w.histogram("loom_time_to_first_token_seconds", "from a request's arrival to its first token", ttft);
    w.histogram("loom_inter_token_latency_seconds", "between consecutive tokens of a choice", itl);
    w.histogram("loom_request_duration_seconds", "from arrival to the last token of a generation request", duration);
    const double total = static_cast<double>(load.kv_blocks_total.load()), used = static_cast<double>(load.kv_blocks_used.load());
    w.metric("loom_kv_blocks_total", "gauge", "KV cache blocks in the pool", total);
    w.metric("loom_kv_blocks_used", "gauge", "KV cache blocks held by sequences", used);
    w.metric("loom_kv_cache_usage_ratio", "gauge", "used / total KV blocks", total > 0 ? used / total : 0.0);
    const double queried = static_cast<double>(load.prompt_tokens.load()), hit = static_cast<double>(load.cached_tokens.load());
    w.metric("loom_prefix_cache_queried_tokens_total", "counter", "prompt tokens looked up in the prefix cache", queried);
    w.metric("loom_prefix_cache_hit_tokens_total", "counter", "prompt tokens found in the prefix cache", hit);
    w.metric("loom_prefix_cache_hit_rate", "gauge", "hit / queried prompt tokens", queried > 0 ? hit / queried : 0.0);
    w.metric("loom_preemptions_total", "counter", "sequences preempted for lack of KV blocks", static_cast<double>(load.preemptions.load()));
    w.metric("loom_speculative_drafted_tokens_total", "counter", "draft tokens verified (speculative decoding)",
             static_cast<double>(load.drafted_tokens.load()));
    w.metric("loom_speculative_accepted_tokens_total", "counter", "draft tokens accepted (speculative decoding)",
             static_cast<double>(load.accepted_tokens.load()));
    w.metric("loom_engine_steps_total", "counter", "scheduler steps", static_cast<double>(load.steps.load()));
    w.metric("loom_ready", "gauge", "1 when the server takes requests", ready.load() && !draining.load() ? 1.0 : 0.0);
    for (const auto &[name, v] : runtime.metrics().snapshot()) {
      const std::string n = metric_name(name);
      if (v.type == MetricValue::Type::histogram) {
        w.metric(n + "_count", "counter", "runtime metric (observations)", static_cast<double>(v.count));
        w.metric(n + "_sum", "counter", "runtime metric (sum)", v.sum);
      } else {
        w.metric(n, v.type == MetricValue::Type::counter ? "counter" : "gauge", "runtime metric", v.value);
      }
    }
    res.set_content(w.text(), "text/plain; version=0.0.4");
  }

  void models(httplib::Response &res, const std::string &id) {
    const json model = {{"id", model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "loom"}};
    if (!id.empty()) {
      if (id != model_name) throw ApiError(404, "the model '" + id + "' does not exist (this server serves '" + model_name + "')",
                                           "model", "invalid_request_error");
      res.set_content(dump(model), "application/json");
      return;
    }
    res.set_content(dump(json{{"object", "list"}, {"data", json::array({model})}}), "application/json");
  }

  void check_model(const std::string &model) const {
    if (model != model_name)
      throw ApiError(404, "the model '" + model + "' does not exist (this server serves '" + model_name + "')", "model");
  }

  // ---- embeddings ----

  void embeddings(const httplib::Request &req, httplib::Response &res) {
    if (!embedder) throw ApiError(404, "this server computes no embeddings (the manifest has no [embedding] table)");
    EmbeddingParams p = parse_embeddings(req.body);
    check_model(p.model);
    std::vector<std::vector<float>> vectors;
    int64_t tokens = 0;
    {
      std::lock_guard lock(embed_mutex);
      try {
        vectors = embedder->embed(p.input, false);
        for (const auto &text : p.input) tokens += static_cast<int64_t>(embedder->encode_text(text, "input").size());
      } catch (const Error &e) {
        throw ApiError(400, e.what(), "input");
      }
    }
    json data = json::array();
    for (size_t i = 0; i < vectors.size(); ++i) {
      json item = {{"object", "embedding"}, {"index", i}};
      if (p.base64) item["embedding"] = base64(vectors[i].data(), vectors[i].size() * sizeof(float)); // little-endian float32s
      else item["embedding"] = vectors[i];
      data.push_back(std::move(item));
    }
    res.set_content(dump(json{{"object", "list"},
                              {"data", data},
                              {"model", model_name},
                              {"usage", {{"prompt_tokens", tokens}, {"total_tokens", tokens}}}}),
                    "application/json");
  }

  // ---- tokenizer ----

  // /tokenize: vLLM's answer (count, max_model_len, tokens) and llama.cpp's (tokens, as objects
  // with their piece under with_pieces) in one body.
  void tokenize(const httplib::Request &req, httplib::Response &res) {
    const TokenizeParams p = parse_tokenize(req.body);
    if (!p.model.empty()) check_model(p.model); // (llama.cpp's clients name none)
    if (!runtime.has_tokenizer()) throw ApiError(400, "this model has no tokenizer");
    std::vector<int32_t> ids;
    try {
      ids = p.messages.empty() ? runtime.tokenize(p.text, p.add_special) : runtime.encode_messages(p.messages, "messages");
    } catch (const Error &e) {
      throw ApiError(400, e.what(), p.messages.empty() ? "prompt" : "messages");
    }
    json tokens = json::array();
    for (int32_t id : ids) {
      if (!p.with_pieces) {
        tokens.push_back(id);
        continue;
      }
      const std::string piece = runtime.token_bytes(id).value_or("");
      tokens.push_back({{"id", id}, {"piece", piece}});
    }
    res.set_content(dump(json{{"tokens", tokens}, {"count", ids.size()}, {"max_model_len", runtime.max_positions()}}),
                    "application/json");
  }

  // /detokenize: the text of the ids, as "prompt" (vLLM) and "content" (llama.cpp).
  void detokenize(const httplib::Request &req, httplib::Response &res) {
    const DetokenizeParams p = parse_detokenize(req.body, runtime.vocab_size());
    if (!p.model.empty()) check_model(p.model);
    if (!runtime.has_tokenizer()) throw ApiError(400, "this model has no tokenizer");
    const std::string text = runtime.decode(p.ids).value_or("");
    res.set_content(dump(json{{"prompt", text}, {"content", text}}), "application/json");
  }

  // ---- generation ----

  void generate(const httplib::Request &req, httplib::Response &res, bool chat) {
    const auto arrival = Clock::now();
    if (draining.load()) {
      res.set_header("Retry-After", "5");
      throw ApiError(503, "the server is shutting down", "", "server_error");
    }
    GenerationParams p = parse_generation(req.body, chat, runtime.vocab_size());
    check_model(p.model);
    if (!runtime.has_tokenizer() && (chat || !p.prompt_texts.empty()))
      throw ApiError(400, chat ? "this model has no tokenizer: use /v1/completions with token ids"
                               : "this model has no tokenizer: give the prompt as token ids", chat ? "messages" : "prompt");
    std::vector<std::vector<int32_t>> prompts;
    try {
      if (chat) prompts.push_back(runtime.encode_messages(p.messages, "messages"));
      for (size_t i = 0; i < p.prompt_texts.size(); ++i) prompts.push_back(runtime.encode_text(p.prompt_texts[i], "prompt"));
      for (auto &ids : p.prompt_ids) prompts.push_back(std::move(ids));
    } catch (const Error &e) {
      throw ApiError(400, e.what(), chat ? "messages" : "prompt");
    }
    int64_t longest = 0;
    for (const auto &ids : prompts) longest = std::max<int64_t>(longest, static_cast<int64_t>(ids.size()));
    if (longest >= max_positions)
      throw ApiError(400, "the prompt has " + std::to_string(longest) + " tokens; this model's context holds " +
                              std::to_string(max_positions), chat ? "messages" : "prompt");
    int64_t max_tokens = p.max_tokens.value_or(std::min(spec.max_tokens, max_positions - longest));
    if (longest + max_tokens > max_positions)
      throw ApiError(400, "the prompt's " + std::to_string(longest) + " tokens and max_tokens " + std::to_string(max_tokens) +
                              " exceed this model's context of " + std::to_string(max_positions) + " tokens", "max_tokens");
    std::vector<std::shared_ptr<Instance>> samplers;
    if (p.own_sampling()) {
      try {
        samplers = runtime.make_samplers(sampler_chain_tomls(p), "request");
      } catch (const Error &e) {
        throw ApiError(400, e.what(), p.format != ResponseFormat::text || !p.grammar.empty() ? p.constraint_param
                                      : p.own_sampling() && p.uses_tools()                  ? "tools"
                                                                                            : "");
      }
    }
    const int64_t n_choices = static_cast<int64_t>(prompts.size()) * p.n;
    if (in_flight.fetch_add(n_choices) + n_choices > capacity) {
      in_flight.fetch_sub(n_choices);
      rejected.fetch_add(1);
      res.set_header("Retry-After", "1");
      throw ApiError(429, "the server is at capacity (" + std::to_string(capacity) + " requests in flight); retry later", "",
                     "rate_limit_error");
    }
    auto job = std::make_shared<Job>();
    job->choices.resize(static_cast<size_t>(n_choices));
    {
      std::lock_guard lock(jobs_mutex);
      std::erase_if(jobs, [](const std::weak_ptr<Job> &j) { return j.expired(); });
      jobs.push_back(job);
    }
    std::random_device entropy;
    const uint64_t base_seed = p.seed ? *p.seed : (static_cast<uint64_t>(entropy()) << 32 | entropy());
    for (int64_t c = 0; c < n_choices; ++c) {
      Choice &choice = job->choices[static_cast<size_t>(c)];
      const size_t k = static_cast<size_t>(c / p.n);
      choice.prompt = prompts[k];
      // echo: the prompt as given (its text, or the text of its ids)
      if (p.echo) choice.echo = k < p.prompt_texts.size() ? p.prompt_texts[k] : runtime.decode(choice.prompt).value_or("");
      choice.last_token = arrival;
      prompt_tokens.fetch_add(choice.prompt.size(), std::memory_order_relaxed);
      ServeRequest r;
      r.prompt = choice.prompt;
      r.max_new_tokens = p.prompt_only() ? 1 : max_tokens; // (the prompt alone: its one token is dropped)
      r.prompt_logprobs = std::max(p.echo ? p.logprobs : -1, p.prompt_logprobs);
      r.samplers = samplers; // shared by the choices: one sampling call for their rows
      r.seed = nth_sample_seed(base_seed, c % p.n);
      r.stop = p.stop;
      r.ignore_stop_tokens = p.ignore_eos;
      r.stop_token_ids = p.stop_token_ids;
      r.min_tokens = std::min(p.min_tokens, max_tokens);
      choice.min_tokens = r.min_tokens;
      r.cancel = job->cancel;
      const size_t index = static_cast<size_t>(c);
      std::weak_ptr<Job> weak = job;
      r.logprobs = p.logprobs;
      if (p.logprobs >= 0)
        r.on_logprob = [weak, index](int64_t, const TokenLogprob &logprob) { // (on_token wakes the reader)
          if (auto j = weak.lock()) {
            std::lock_guard lock(j->mutex);
            j->choices[index].logprobs.push_back(logprob);
          }
        };
      if (p.stream && p.echo && p.logprobs >= 0) // (the echo chunk carries the prompt's entries)
        r.on_prompt_logprobs = [weak, index](const std::vector<TokenLogprob> &entries) {
          if (auto j = weak.lock()) {
            {
              std::lock_guard lock(j->mutex);
              Choice &ch = j->choices[index];
              ch.prompt_entries = entries;
              ch.prompt_scored = true;
            }
            j->changed.notify_all();
          }
        };
      r.on_token = [this, weak, index, arrival](int64_t, int32_t token) {
        auto j = weak.lock();
        if (!j) return false;
        const auto now = Clock::now();
        {
          std::lock_guard lock(j->mutex);
          Choice &ch = j->choices[index];
          if (ch.tokens.empty()) ttft.observe(std::chrono::duration<double>(now - arrival).count());
          else itl.observe(std::chrono::duration<double>(now - ch.last_token).count());
          ch.last_token = now;
          ch.tokens.push_back(token);
        }
        count_tokens(1);
        j->changed.notify_all();
        return true;
      };
      r.on_done = [this, weak, index, arrival](const SequenceResult &result, const std::string &error) {
        in_flight.fetch_sub(1);
        duration.observe(seconds_since(arrival));
        if (result.cancelled) cancelled.fetch_add(1);
        auto j = weak.lock();
        if (!j) return;
        {
          std::lock_guard lock(j->mutex);
          Choice &ch = j->choices[index];
          ch.done = true;
          ch.result = result;
          ch.error = error;
          ++j->finished;
        }
        j->changed.notify_all();
      };
      queue.submit(std::move(r));
    }
    respond(res, job, p, chat, arrival);
  }

  // Streams (SSE) or sends the response once every choice ended, through a chunked content
  // provider either way, so that a client that goes away is noticed while it waits.
  void respond(httplib::Response &res, std::shared_ptr<Job> job, const GenerationParams &p, bool chat,
               Clock::time_point arrival) {
    const std::string id = std::string(chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id.fetch_add(1));
    const int64_t created = static_cast<int64_t>(std::time(nullptr));
    const double timeout = spec.request_timeout_s;
    // Most failures come at a request's first step (a constraint the matcher refuses, a chain
    // whose parameters fail, a request the engine refuses). The status line goes out before the
    // body, so wait a little (kStatusWait, within the request's timeout) until every choice has
    // its first token or has ended: a choice that failed by then gets a real status (400 for the
    // request's own error, 500 for the engine's) instead of 200 and an error body. The wait is
    // short because a client's going away is not noticed during it (the provider below notices
    // it); a request queued longer answers a later failure in its body, as before.
    {
      constexpr double kStatusWait = 2.0;
      std::unique_lock lock(job->mutex);
      const double wait = std::max(0.0, std::min(kStatusWait, timeout - seconds_since(arrival)));
      job->changed.wait_for(lock, std::chrono::duration<double>(wait), [&] {
        return std::all_of(job->choices.begin(), job->choices.end(), [](const Choice &c) { return c.done || !c.tokens.empty(); });
      });
      for (const Choice &c : job->choices)
        if (c.done && !c.error.empty()) {
          job->cancel->store(true); // the other choices end at the next step
          const bool own = c.result.request_error;
          send_error(res, ApiError(own ? 400 : 500, "generation failed: " + c.error, own && p.constrained() ? p.constraint_param : "",
                                   own ? "invalid_request_error" : "server_error"));
          return;
        }
    }
    auto params = std::make_shared<GenerationParams>(p);
    auto started = std::make_shared<bool>(false);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        p.stream ? "text/event-stream" : "application/json",
        [this, job, params, chat, id, created, timeout, arrival, started](size_t, httplib::DataSink &sink) {
          const GenerationParams &gp = *params;
          // The tool calls of each choice's reply (none without tools).
          std::vector<std::vector<ToolCall>> calls(job->choices.size());
          // The id of choice i's call number k (the same streamed or not).
          const auto call_id = [&](size_t i, size_t k) { return id + "-call-" + std::to_string(i) + "-" + std::to_string(k); };
          // Choice i's call k as it first goes out: number, id, type, name and arguments (so far).
          const auto call_json = [&](size_t i, size_t k, const std::string &name, const std::string &arguments) {
            return json{{"index", k}, {"id", call_id(i, k)}, {"type", "function"},
                        {"function", {{"name", name}, {"arguments", arguments}}}};
          };
          // Choice i's calls.
          const auto tool_calls_json = [&](size_t i, std::span<const ToolCall> all) {
            json out = json::array();
            for (size_t k = 0; k < all.size(); ++k) out.push_back(call_json(i, k, all[k].name, all[k].arguments_json));
            return out;
          };
          // A reply with tools streams its content as it comes and each call as OpenAI does: its
          // id, type and name first, then its arguments in pieces (ToolCallStream); the delta of
          // choice i for `piece` (empty: nothing new).
          const auto tool_stream_delta = [&](size_t i, const ToolCallStream::Piece &piece) {
            json delta = json::object();
            if (!piece.content.empty()) delta["content"] = piece.content;
            if (piece.calls.empty()) return delta;
            json out = json::array();
            for (const ToolCallStream::CallDelta &d : piece.calls)
              out.push_back(d.name ? call_json(i, d.index, *d.name, d.arguments)
                                   : json{{"index", d.index}, {"function", {{"arguments", d.arguments}}}});
            delta["tool_calls"] = std::move(out);
            return delta;
          };
          const auto tool_stream_of = [&](Choice &c) -> ToolCallStream & {
            if (!c.tool_stream)
              c.tool_stream = std::make_unique<ToolCallStream>(
                  gp.callable_tools(), gp.reply_is_call(),
                  gp.parallel_tool_calls ? SIZE_MAX : 1);
            return *c.tool_stream;
          };
          const auto finish_reason = [&](const Choice &c) -> json {
            if (!c.error.empty()) return "error";
            if (!calls[static_cast<size_t>(&c - job->choices.data())].empty()) return "tool_calls";
            if (c.result.stopped) return "stop";
            return "length"; // max_tokens, or cut short by a timeout or a drain
          };
          const auto chunk = [&](json choices) {
            json j = {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                      {"model", model_name}, {"choices", std::move(choices)}};
            if (gp.include_usage) j["usage"] = nullptr;
            return "data: " + dump(j) + "\n\n";
          };
          const auto write = [&](const std::string &s) { return sink.write(s.data(), s.size()); };
          // Where a choice's tokens begin in its text, measured as far as `tokens` goes.
          const auto texts_of = [&](Choice &c, const std::vector<TokenLogprob> &tokens) -> TokenTexts & {
            if (!c.texts) c.texts = std::make_unique<TokenTexts>(runtime, c.prompt);
            c.texts->extend(tokens);
            return *c.texts;
          };
          // A choice's `logprobs` (null when not asked for): the entries from c.logprobs_sent on
          // of the tokens that begin within the first `text_bytes` bytes of `text` (with `whole`,
          // that also end there), which are then counted as sent.
          const auto logprobs_json = [&](Choice &c, const std::vector<TokenLogprob> &tokens, const std::string &text,
                                         size_t text_bytes, bool whole) -> json {
            if (gp.logprobs < 0) return nullptr;
            const TokenTexts &t = texts_of(c, tokens);
            const size_t begin = c.logprobs_sent, end = std::max(begin, t.within(text_bytes, whole));
            c.logprobs_sent = end;
            return chat ? chat_logprobs(runtime, tokens, t, text, begin, end) : completion_logprobs(runtime, tokens, t, text, begin, end);
          };
          if (gp.stream && chat && !*started) {
            json first = json::array();
            for (size_t i = 0; i < job->choices.size(); ++i)
              first.push_back({{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                               {"finish_reason", nullptr}});
            if (!write(chunk(first))) {
              job->cancel->store(true);
              return false;
            }
          }
          // Completions' echo: the prompt's text before the reply's. With logprobs it carries the
          // prompt's entries, so each choice's echo goes out once the engine has scored its prompt
          // (the reply's offsets then count the echo's characters, as in a whole response);
          // without, every echo goes out at once.
          const bool echo_entries = gp.stream && gp.echo && gp.logprobs >= 0;
          // (It reads the choice's prompt and echo, which do not change, and `entries`: callable
          // without the job's lock, which the engine's callbacks wait for.)
          const auto echo_chunk_entry = [&](size_t i, std::span<const TokenLogprob> entries, json reply_logprobs,
                                            const std::string &reply) {
            const Choice &c = job->choices[i];
            return json{{"index", i}, {"text", c.echo + reply},
                        {"logprobs", with_prompt_logprobs(runtime, c.prompt, entries, static_cast<size_t>(gp.logprobs), c.echo,
                                                          std::move(reply_logprobs))},
                        {"finish_reason", nullptr}};
          };
          if (gp.stream && gp.echo && !echo_entries && !*started) {
            json first = json::array();
            for (size_t i = 0; i < job->choices.size(); ++i)
              first.push_back({{"index", i}, {"text", job->choices[i].echo}, {"logprobs", nullptr}, {"finish_reason", nullptr}});
            if (!write(chunk(first))) {
              job->cancel->store(true);
              return false;
            }
          }
          *started = true;
          auto last_check = Clock::now();
          std::unique_lock lock(job->mutex);
          while (job->finished < job->choices.size()) {
            // The client and the clock, every 20 ms however often tokens wake us.
            if (Clock::now() - last_check >= std::chrono::milliseconds(20)) {
              last_check = Clock::now();
              if (!sink.is_writable()) { // the client went away: its choices end at the next step
                job->cancel->store(true);
                return false;
              }
              if (seconds_since(arrival) > timeout && !job->timed_out) {
                job->timed_out = true;
                job->cancel->store(true);
              }
            }
            // Stream what is new, then wait for more (checking the client and the clock): echoes
            // whose prompts are scored (or that have tokens, or ended), then the replies' text.
            // (A choice's echo is marked sent once written, so that its reply's text waits a turn:
            // one entry a choice per chunk.)
            json entries = json::array();
            std::vector<std::pair<size_t, std::vector<TokenLogprob>>> echoes; // their JSON is made unlocked
            if (echo_entries)
              for (size_t i = 0; i < job->choices.size(); ++i) {
                const Choice &c = job->choices[i];
                if (!c.echoed && (c.prompt_scored || !c.tokens.empty() || c.done)) echoes.emplace_back(i, c.known_prompt_entries());
              }
            if (gp.stream && !gp.prompt_only()) {
              for (size_t i = 0; i < job->choices.size(); ++i) {
                Choice &c = job->choices[i];
                if (c.done || c.tokens.size() == c.tokens_seen || (echo_entries && !c.echoed)) continue;
                c.tokens_seen = c.tokens.size();
                // (stop_token_ids end the reply and stay out of its text, as the engine writes it)
                std::vector<int32_t> shown = c.tokens;
                std::erase_if(shown, [&](int32_t t) {
                  return std::find(gp.stop_token_ids.begin(), gp.stop_token_ids.end(), t) != gp.stop_token_ids.end();
                });
                const std::string text = runtime.continuation(c.prompt, shown, gp.stop, nullptr, c.min_tokens, &c.streamed_text);
                const size_t safe = streamable_prefix(text, gp.stop);
                if (gp.uses_tools()) {
                  const ToolCallStream::Piece piece = tool_stream_of(c).update(text, safe);
                  json delta = tool_stream_delta(i, piece);
                  if (delta.empty()) continue;
                  c.sent = piece.content_end;
                  entries.push_back({{"index", i}, {"delta", std::move(delta)}, {"logprobs", logprobs_json(c, c.logprobs, text, c.sent, true)},
                                     {"finish_reason", nullptr}});
                  continue;
                }
                if (safe <= c.sent) continue;
                const std::string delta = text.substr(c.sent, safe - c.sent);
                c.sent = safe;
                // The log-probabilities of the tokens whose text this chunk completes.
                json logprobs = logprobs_json(c, c.logprobs, text, safe, true);
                if (gp.echo) offsets_after_echo(logprobs, c.echo);
                entries.push_back(chat ? json{{"index", i}, {"delta", {{"content", delta}}}, {"logprobs", logprobs}, {"finish_reason", nullptr}}
                                       : json{{"index", i}, {"text", delta}, {"logprobs", logprobs}, {"finish_reason", nullptr}});
              }
            }
            if (!entries.empty() || !echoes.empty()) {
              lock.unlock();
              json all = json::array();
              for (const auto &[i, prompt_entries] : echoes) all.push_back(echo_chunk_entry(i, prompt_entries, nullptr, ""));
              for (json &e : entries) all.push_back(std::move(e));
              const bool ok = write(chunk(std::move(all)));
              lock.lock();
              for (const auto &echo : echoes) job->choices[echo.first].echoed = true;
              if (!ok) {
                job->cancel->store(true);
                return false;
              }
              continue;
            }
            job->changed.wait_for(lock, std::chrono::milliseconds(20));
          }
          // Every choice ended: the rest of each text (or its tool calls), the finish reasons, usage.
          if (gp.prompt_only()) // the token the engine had to generate is not part of the reply
            for (Choice &c : job->choices) {
              c.result.tokens.clear();
              c.result.text.clear();
              c.result.logprobs.clear();
              c.result.stopped = false;
            }
          if (gp.uses_tools())
            for (size_t i = 0; i < job->choices.size(); ++i) {
              calls[i] = parse_tool_calls(job->choices[i].result.text, gp.callable_tools());
              if (!gp.parallel_tool_calls && calls[i].size() > 1) calls[i].resize(1);
            }
          int64_t prompt_n = 0, completion_n = 0;
          for (size_t i = 0; i < job->choices.size(); ++i) {
            const Choice &c = job->choices[i];
            completion_n += static_cast<int64_t>(c.result.tokens.size());
            if (i % static_cast<size_t>(gp.n) == 0) prompt_n += static_cast<int64_t>(c.prompt.size());
          }
          const json usage = {{"prompt_tokens", prompt_n}, {"completion_tokens", completion_n}, {"total_tokens", prompt_n + completion_n}};
          std::string out;
          std::string failure;
          for (const Choice &c : job->choices)
            if (!c.error.empty() && failure.empty()) failure = c.error;
          if (gp.stream) {
            json last = json::array();
            for (size_t i = 0; i < job->choices.size(); ++i) {
              Choice &c = job->choices[i];
              const std::string &text = c.result.text;
              const std::string rest = text.size() > c.sent ? text.substr(c.sent) : std::string();
              json delta = rest.empty() ? json::object() : json{{"content", rest}};
              if (gp.uses_tools()) delta = tool_stream_delta(i, tool_stream_of(c).finish(text));
              json logprobs = logprobs_json(c, c.result.logprobs, text, text.size(), false);
              if (echo_entries && !c.echoed) { // ended before its echo went out: the echo leads the last chunk
                json entry = echo_chunk_entry(i, c.known_prompt_entries(), std::move(logprobs), rest);
                entry["finish_reason"] = finish_reason(c);
                last.push_back(std::move(entry));
                continue;
              }
              if (gp.echo) offsets_after_echo(logprobs, c.echo);
              last.push_back(chat ? json{{"index", i}, {"delta", delta}, {"logprobs", logprobs}, {"finish_reason", finish_reason(c)}}
                                  : json{{"index", i}, {"text", rest}, {"logprobs", logprobs}, {"finish_reason", finish_reason(c)}});
            }
            out += chunk(std::move(last));
            if (!failure.empty())
              out += "data: " + error_body(ApiError(500, "generation failed: " + failure, "", "server_error")) + "\n\n";
            if (gp.include_usage) {
              json u = {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                        {"model", model_name}, {"choices", json::array()}, {"usage", usage}};
              out += "data: " + dump(u) + "\n\n";
            }
            out += "data: [DONE]\n\n";
          } else {
            json choices = json::array();
            json chat_prompt_logprobs; // vLLM's chat puts the prompt's at the top level: one prompt
            for (size_t i = 0; i < job->choices.size(); ++i) {
              Choice &c = job->choices[i];
              json message = {{"role", "assistant"}, {"content", c.result.text}};
              if (!calls[i].empty()) {
                const std::string content = reply_content(c.result.text, calls[i]);
                message = {{"role", "assistant"}, {"content", content.empty() ? json(nullptr) : json(content)},
                           {"tool_calls", tool_calls_json(i, calls[i])}};
              }
              json logprobs = logprobs_json(c, c.result.logprobs, c.result.text, c.result.text.size(), false);
              // The prompt's entries, each with the alternatives its field asked for (echo's logprobs
              // and prompt_logprobs may ask for different counts; the engine computed the larger).
              if (!chat && gp.echo && gp.logprobs >= 0) // the prompt's tokens first (null for the first)
                logprobs = with_prompt_logprobs(runtime, c.prompt, c.result.prompt_logprobs, static_cast<size_t>(gp.logprobs),
                                                c.echo, std::move(logprobs));
              choices.push_back(chat ? json{{"index", i}, {"message", message}, {"logprobs", logprobs}, {"finish_reason", finish_reason(c)}}
                                     : json{{"index", i}, {"text", c.echo + c.result.text}, {"logprobs", logprobs},
                                            {"finish_reason", finish_reason(c)}});
              // vLLM's prompt_logprobs: per choice for completions, once at the top level for chat.
              if (gp.prompt_logprobs >= 0 && (!chat || i == 0)) {
                json entries = vllm_prompt_logprobs(runtime, c.prompt, c.result.prompt_logprobs, static_cast<size_t>(gp.prompt_logprobs));
                if (chat) chat_prompt_logprobs = std::move(entries);
                else choices.back()["prompt_logprobs"] = std::move(entries);
              }
            }
            json body = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", created},
                         {"model", model_name}, {"choices", choices}, {"usage", usage}};
            if (!chat_prompt_logprobs.is_null()) body["prompt_logprobs"] = std::move(chat_prompt_logprobs); // (as vLLM's chat)
            if (!failure.empty()) body = json::parse(error_body(ApiError(500, "generation failed: " + failure, "", "server_error")));
            out = dump(body);
          }
          lock.unlock();
          if (write(out)) sink.done();
          return true;
        });
  }

  // ---- lifecycle ----

  void run_engine() {
    while (true) {
      try {
        runtime.serve(queue, max_positions);
        return;
      } catch (const std::exception &e) {
        // A failure of the engine itself (not of one request): the requests it held are lost;
        // fail them so that no client waits forever, and serve on.
        std::fprintf(stderr, "loom serve: engine: %s\n", e.what());
        std::vector<std::shared_ptr<Job>> live;
        {
          std::lock_guard lock(jobs_mutex);
          for (auto &w : jobs)
            if (auto j = w.lock()) live.push_back(j);
        }
        for (auto &j : live) {
          std::lock_guard lock(j->mutex);
          for (Choice &c : j->choices)
            if (!c.done) {
              c.done = true;
              c.error = std::string("engine failure: ") + e.what();
              ++j->finished;
              in_flight.fetch_sub(1);
            }
          j->changed.notify_all();
        }
        if (stopped.load()) return;
      }
    }
  }

  void cancel_all() {
    std::lock_guard lock(jobs_mutex);
    for (auto &w : jobs)
      if (auto j = w.lock()) j->cancel->store(true);
  }
};

Server::Server(Runtime &runtime, Runtime *embedder, const ServerSpec &spec)
    : impl_(std::make_unique<Impl>(runtime, embedder, spec)) {
  Impl &s = *impl_;
  s.http.new_task_queue = [&s] {
    s.pool = new ConnectionPool(static_cast<size_t>(s.spec.max_connections));
    return s.pool;
  };
  s.http.set_payload_max_length(static_cast<size_t>(s.spec.max_body_bytes));
  const auto read_timeout = std::chrono::duration<double>(s.spec.read_timeout_s);
  s.http.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(read_timeout));
  s.http.set_keep_alive_timeout(static_cast<time_t>(std::max(1.0, s.spec.read_timeout_s)));
  s.http.set_pre_routing_handler([&s](const httplib::Request &req, httplib::Response &res) {
    return s.authorised(req, res) ? httplib::Server::HandlerResponse::Unhandled : httplib::Server::HandlerResponse::Handled;
  });
  // Every handler answers ApiError with its status; anything else is a bug, reported as a 500
  // with its message rather than a dropped connection.
  const auto guarded = [&s](std::string route, auto body) {
    return [&s, route, body](const httplib::Request &req, httplib::Response &res) {
      try {
        body(req, res);
      } catch (const ApiError &e) {
        send_error(res, e);
      } catch (const std::exception &e) {
        send_error(res, ApiError(500, std::string("internal error: ") + e.what(), "", "server_error"));
      }
      s.record(route, res.status);
    };
  };
  s.http.Get("/health", guarded("/health", [](const httplib::Request &, httplib::Response &res) {
               res.set_content("{\"status\":\"ok\"}", "application/json");
             }));
  s.http.Get("/ready", guarded("/ready", [&s](const httplib::Request &, httplib::Response &res) {
               const bool ok = s.ready.load() && !s.draining.load();
               res.status = ok ? 200 : 503;
               res.set_content(ok ? "{\"status\":\"ready\"}" : s.draining.load() ? "{\"status\":\"draining\"}" : "{\"status\":\"warming up\"}",
                               "application/json");
             }));
  s.http.Get("/metrics", guarded("/metrics", [&s](const httplib::Request &, httplib::Response &res) { s.metrics(res); }));
  s.http.Get("/v1/models", guarded("/v1/models", [&s](const httplib::Request &, httplib::Response &res) { s.models(res, ""); }));
  s.http.Get(R"(/v1/models/(.+))", guarded("/v1/models/{id}", [&s](const httplib::Request &req, httplib::Response &res) {
               s.models(res, req.matches[1]);
             }));
  s.http.Post("/v1/completions", guarded("/v1/completions", [&s](const httplib::Request &req, httplib::Response &res) {
                s.generate(req, res, false);
              }));
  s.http.Post("/v1/chat/completions", guarded("/v1/chat/completions", [&s](const httplib::Request &req, httplib::Response &res) {
                s.generate(req, res, true);
              }));
  s.http.Post("/v1/embeddings", guarded("/v1/embeddings", [&s](const httplib::Request &req, httplib::Response &res) {
                s.embeddings(req, res);
              }));
  s.http.Post("/tokenize", guarded("/tokenize", [&s](const httplib::Request &req, httplib::Response &res) {
                s.tokenize(req, res);
              }));
  s.http.Post("/detokenize", guarded("/detokenize", [&s](const httplib::Request &req, httplib::Response &res) {
                s.detokenize(req, res);
              }));
  s.http.Post("/admin/swap", guarded("/admin/swap", [&s](const httplib::Request &req, httplib::Response &res) {
                json j = json::parse(req.body, nullptr, false);
                if (j.is_discarded() || !j.is_object() || !j.contains("slot") || !j["slot"].is_string() ||
                    !j.contains("component") || !j["component"].is_string())
                  throw ApiError(400, "expected {\"slot\": \"sampler[0]\", \"component\": \"use = \\\"top-k\\\"\\nk = 5\"}");
                try {
                  const SwapReport report = s.runtime.swap(j["slot"].get<std::string>(), j["component"].get<std::string>());
                  res.set_content(dump(json{{"swapped", j["slot"]}, {"state_transferred", report.state_transferred},
                                            {"note", report.note}}),
                                  "application/json");
                } catch (const Error &e) {
                  throw ApiError(e.status() == LOOM_ERR_NOT_FOUND ? 404 : 400, e.what(), "slot");
                }
              }));
  // Unknown routes and methods: OpenAI-style JSON bodies too.
  s.http.set_error_handler([](const httplib::Request &req, httplib::Response &res) {
    if (!res.body.empty()) return;
    const std::string message = res.status == 404 ? "no route " + req.method + " " + req.path
                                : res.status == 413 ? "the request body is larger than the server accepts"
                                                    : "the request was refused (HTTP " + std::to_string(res.status) + ")";
    res.set_content(error_body(ApiError(res.status, message)), "application/json");
  });
}

Server::~Server() { stop(); }

int Server::start() {
  Impl &s = *impl_;
  const int port = s.spec.port == 0 ? s.http.bind_to_any_port(s.spec.host) : (s.http.bind_to_port(s.spec.host, static_cast<int>(s.spec.port)) ? static_cast<int>(s.spec.port) : -1);
  if (port <= 0)
    throw runtime_error(s.runtime.manifest().source_name + ": [server]: cannot listen on " + s.spec.host + ":" +
                        std::to_string(s.spec.port) + " (in use, or not an address of this machine)");
  s.http.widen_backlog();
  s.engine = std::thread([&s] { s.run_engine(); });
  // Warm-up: one short request through the engine; /ready answers 200 once it ended.
  ServeRequest warm;
  warm.prompt = s.runtime.has_tokenizer() ? s.runtime.encode_text("Hello", "warm-up") : std::vector<int32_t>{0};
  warm.max_new_tokens = 1;
  warm.on_done = [&s](const SequenceResult &, const std::string &error) {
    if (!error.empty()) std::fprintf(stderr, "loom serve: warm-up request failed: %s\n", error.c_str());
    s.ready.store(true);
  };
  s.queue.submit(std::move(warm));
  s.listener = std::thread([&s] { s.http.listen_after_bind(); });
  return port;
}

bool Server::wait_ready(double timeout_s) {
  const auto until = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (!impl_->ready.load()) {
    if (Clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  while (!impl_->http.is_running() && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return impl_->http.is_running();
}

void Server::drain() {
  Impl &s = *impl_;
  s.draining.store(true);
  const auto until = Clock::now() + std::chrono::duration<double>(s.spec.drain_timeout_s);
  while (s.in_flight.load() > 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  stop();
}

void Server::stop() {
  Impl &s = *impl_;
  if (s.stopped.exchange(true)) return;
  s.draining.store(true);
  s.cancel_all(); // what is still running ends now, with what it has
  try {
    s.queue.close();
  } catch (...) {
  }
  if (s.engine.joinable()) s.engine.join();
  // Streams still being written finish (their choices have ended) before the listener stops.
  const auto until = Clock::now() + std::chrono::seconds(5);
  while (s.in_flight.load() > 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  s.http.stop();
  if (s.listener.joinable()) s.listener.join();
}

int64_t Server::in_flight() const { return impl_->in_flight.load(); }

size_t Server::connection_threads() const { return impl_->pool ? impl_->pool->threads() : 0; }

} // namespace loom::server
