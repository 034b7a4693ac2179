// `loom serve`'s HTTP server (hosts/server), driven in-process on a loopback port by a real HTTP
// client (cpp-httplib's): the OpenAI routes and their parameters against the runtime's own
// results, streaming, auth, admission (429), disconnects, bad requests, idle sockets, draining.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include <catch2/catch.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "loom/core/runtime.hpp"
#include "openai_request.hpp"
#include "regex_gbnf.hpp"
#include "server.hpp"
#include "stream_text.hpp"
#include "tool_calls.hpp"

using json = nlohmann::json;
using loom::Runtime;
using loom::server::Server;

namespace {

const std::string kModel = std::string(LOOM_SOURCE_DIR) + "/models/tiny-kjv";

std::string manifest(const std::string &server_extra = "", const std::string &scheduler = "max_seqs = 8\nmax_batched_tokens = 256") {
  const std::string queue = server_extra.find("max_queue") == std::string::npos ? "max_queue = 8\n" : "";
  return "[loom]\ndevice = \"cpu\"\nseed = 7\nthreads = 1\n[model]\npath = \"" + kModel +
         "\"\n[run]\nstop_tokens = [1, 2]\n[scheduler]\n" + scheduler + "\n[server]\nport = 0\nread_timeout_s = 2\n" + queue +
         server_extra +
         "\n[embedding]\npooling = \"mean\"\n[attention]\nuse = \"sdpa\"\nblock_size = 8\n"
         "[[sampler]]\nuse = \"temperature\"\nt = 0.8\n[[sampler]]\nuse = \"top-k\"\nk = 40\n[[sampler]]\nuse = \"dist\"\n";
}

// A server on a free loopback port for one test case.
struct Fixture {
  std::unique_ptr<Runtime> runtime, embedder;
  std::unique_ptr<Server> server;
  int port = 0;
  explicit Fixture(const std::string &text = manifest()) {
    runtime = Runtime::from_string(text, "server_test.toml");
    embedder = Runtime::from_string(text, "server_test.toml");
    server = std::make_unique<Server>(*runtime, embedder.get(), runtime->manifest().server);
    port = server->start();
    REQUIRE(server->wait_ready(60));
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    return c;
  }
  httplib::Result post(const std::string &path, const json &body, const httplib::Headers &headers = {}) const {
    return client().Post(path.c_str(), headers, body.dump(), "application/json");
  }
  // A request that must succeed: its body, parsed (the body in the failure message otherwise).
  json ok(const std::string &path, const json &body) const {
    auto r = post(path, body);
    REQUIRE(r);
    INFO(r->body);
    REQUIRE(r->status == 200);
    return json::parse(r->body);
  }
};

// The SSE events of a streamed body ("data: ..." lines), [DONE] last.
std::vector<std::string> events(const std::string &body) {
  std::vector<std::string> out;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    out.push_back(body.substr(at + 6, end - at - 6));
    at = end;
  }
  return out;
}

// Every choice object of a streamed body's chunks, in order ([DONE] left out).
std::vector<json> streamed_choices(const std::string &body) {
  std::vector<json> out;
  for (const std::string &e : events(body)) {
    if (e == "[DONE]") continue;
    const json chunk = json::parse(e); // (named: a range-for over a temporary's member dangles)
    for (const auto &ch : chunk["choices"]) out.push_back(ch);
  }
  return out;
}

// What a greedy [run] of the same model gives for `prompt` (the reference for temperature 0).
std::string greedy_run(const std::string &prompt, int steps) {
  auto r = Runtime::from_string("[loom]\ndevice = \"cpu\"\nthreads = 1\n[model]\npath = \"" + kModel + "\"\n[run]\nsteps = " +
                                    std::to_string(steps) + "\nprompt = \"" + prompt +
                                    "\"\nstop_tokens = [1, 2]\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n",
                                "greedy.toml");
  return r->run().text;
}

int64_t metric(const Fixture &f, const std::string &name) {
  auto res = f.client().Get("/metrics");
  REQUIRE(res);
  const std::string &b = res->body;
  const size_t at = b.find("\n" + name + " ");
  REQUIRE(at != std::string::npos);
  return static_cast<int64_t>(std::stod(b.substr(at + name.size() + 2)));
}

} // namespace

TEST_CASE("streamable_prefix holds back stop-string starts and cut characters", "[server]") {
  using loom::server::streamable_prefix;
  CHECK(streamable_prefix("hello wor", {"world"}) == 6);
  CHECK(streamable_prefix("hello", {"xyz"}) == 5);
  CHECK(streamable_prefix("ab\xEF\xBF\xBD", {}) == 2);
  CHECK(streamable_prefix("ab\xE2\x82", {}) == 2);    // a 3-byte character missing its last byte
  CHECK(streamable_prefix("ab\xE2\x82\xAC", {}) == 5); // complete
}

TEST_CASE("models, health, ready, metrics", "[server]") {
  Fixture f;
  auto c = f.client();
  auto models = c.Get("/v1/models");
  REQUIRE(models);
  CHECK(models->status == 200);
  CHECK(json::parse(models->body)["data"][0]["id"] == "tiny-kjv");
  CHECK(c.Get("/v1/models/tiny-kjv")->status == 200);
  auto missing = c.Get("/v1/models/gpt-9");
  CHECK(missing->status == 404);
  CHECK(json::parse(missing->body)["error"]["param"] == "model");
  CHECK(c.Get("/health")->status == 200);
  CHECK(c.Get("/ready")->status == 200);
  auto m = c.Get("/metrics");
  CHECK(m->status == 200);
  for (const char *name : {"loom_time_to_first_token_seconds_bucket", "loom_inter_token_latency_seconds_count", "loom_queue_depth",
                           "loom_kv_cache_usage_ratio", "loom_prefix_cache_hit_rate", "loom_generation_tokens_per_second",
                           "loom_http_responses_total"})
    CHECK(m->body.find(name) != std::string::npos);
  auto nowhere = c.Get("/v2/nothing");
  CHECK(nowhere->status == 404);
  CHECK(json::parse(nowhere->body)["error"]["message"].get<std::string>().find("/v2/nothing") != std::string::npos);
}

TEST_CASE("completions at temperature 0 are the greedy run's; streaming gives the same text", "[server]") {
  Fixture f;
  const std::string want = greedy_run("And God said", 24);
  auto res = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24}, {"temperature", 0}});
  REQUIRE(res);
  REQUIRE(res->status == 200);
  const json body = json::parse(res->body);
  CHECK(body["object"] == "text_completion");
  CHECK(body["choices"][0]["text"] == want);
  CHECK(body["usage"]["prompt_tokens"].get<int>() > 0);
  CHECK(body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"].get<int>() + body["usage"]["completion_tokens"].get<int>());
  const std::string reason = body["choices"][0]["finish_reason"];
  CHECK((reason == "stop" || reason == "length"));

  auto streamed = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24}, {"temperature", 0},
                                             {"stream", true}, {"stream_options", {{"include_usage", true}}}});
  REQUIRE(streamed);
  CHECK(streamed->status == 200);
  CHECK(streamed->get_header_value("Content-Type").find("text/event-stream") != std::string::npos);
  const auto ev = events(streamed->body);
  REQUIRE(ev.size() >= 3);
  CHECK(ev.back() == "[DONE]");
  std::string text;
  json usage;
  for (size_t i = 0; i + 1 < ev.size(); ++i) {
    const json e = json::parse(ev[i]);
    if (!e["usage"].is_null()) usage = e["usage"];
    for (const auto &ch : e["choices"]) text += ch["text"].get<std::string>();
  }
  CHECK(text == want);
  CHECK(usage["completion_tokens"] == body["usage"]["completion_tokens"]);

  // echo: the prompt's text first, streamed or not (with logprobs: below).
  auto echoed = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24}, {"temperature", 0},
                                           {"echo", true}});
  REQUIRE(echoed->status == 200);
  CHECK(json::parse(echoed->body)["choices"][0]["text"] == "And God said" + want);
  auto echo_stream = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24},
                                                {"temperature", 0}, {"echo", true}, {"stream", true}});
  std::string echo_text;
  for (const json &ch : streamed_choices(echo_stream->body)) echo_text += ch["text"].get<std::string>();
  CHECK(echo_text == "And God said" + want);
}

TEST_CASE("echo with logprobs lists the prompt's tokens first, transformers' log-probabilities; max_tokens 0 scores the prompt alone; vLLM's prompt_logprobs",
          "[server][logprobs]") {
  Fixture f;
  std::ifstream in(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/models/tiny-kjv-golden.json");
  REQUIRE(in);
  const json golden = json::parse(in)["cases"][0];
  REQUIRE(golden["prompt"] == "And God said");
  const std::vector<int32_t> ids = golden["input_ids"].get<std::vector<int32_t>>(); // BOS first, as the server encodes it
  const auto log_softmax_at = [&](size_t row, int32_t token) {
    const std::vector<double> logits = golden["logits"][row].get<std::vector<double>>();
    const double top = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (double v : logits) sum += std::exp(v - top);
    return logits[static_cast<size_t>(token)] - top - std::log(sum);
  };
  for (const int max_tokens : {5, 0}) {
    INFO("max_tokens " << max_tokens);
    auto res = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", max_tokens},
                                          {"temperature", 0}, {"echo", true}, {"logprobs", 3}});
    REQUIRE(res);
    INFO(res->body);
    REQUIRE(res->status == 200);
    const json body = json::parse(res->body);
    const json &choice = body["choices"][0];
    const json &lp = choice["logprobs"];
    const std::string text = choice["text"];
    REQUIRE(text.rfind("And God said", 0) == 0);
    const size_t generated = body["usage"]["completion_tokens"].get<size_t>();
    CHECK(generated == static_cast<size_t>(max_tokens));
    if (max_tokens == 0) {
      CHECK(text == "And God said");
      CHECK(choice["finish_reason"] == "length");
    }
    const size_t n = lp["tokens"].size();
    REQUIRE(n == ids.size() + generated);
    REQUIRE(lp["token_logprobs"].size() == n);
    REQUIRE(lp["top_logprobs"].size() == n);
    REQUIRE(lp["text_offset"].size() == n);
    CHECK(lp["token_logprobs"][0].is_null()); // nothing before the first token
    CHECK(lp["top_logprobs"][0].is_null());
    std::string joined;
    for (size_t i = 0; i < n; ++i) {
      INFO("token " << i);
      CHECK(lp["text_offset"][i] == joined.size());
      joined += lp["tokens"][i].get<std::string>();
      if (i == 0) continue;
      CHECK(lp["top_logprobs"][i].size() <= 4); // 3 alternatives and the token itself
      if (i < ids.size()) // a prompt token: transformers' log-probability of it after the ones before
        CHECK(lp["token_logprobs"][i].get<double>() == Approx(log_softmax_at(i - 1, ids[i])).margin(2e-4));
    }
    CHECK(joined == text);
    // Streamed (two choices): each choice's echo chunk carries the prompt's entries, the reply's
    // chunks its tokens' with offsets past the echo; merged, each choice's text and lists are
    // the whole response's.
    auto streamed = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", max_tokens},
                                               {"temperature", 0}, {"echo", true}, {"logprobs", 3}, {"n", 2}, {"stream", true}});
    REQUIRE(streamed);
    REQUIRE(streamed->status == 200);
    std::vector<std::string> texts(2);
    std::vector<json> merged(2, json{{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
                                     {"text_offset", json::array()}});
    std::vector<int> first_chunk_entries(2, -1);
    for (const json &ch : streamed_choices(streamed->body)) {
      const size_t i = ch["index"];
      REQUIRE(i < 2);
      if (first_chunk_entries[i] < 0) {
        CHECK(ch["text"].get<std::string>().rfind("And God said", 0) == 0); // the echo leads
        first_chunk_entries[i] = static_cast<int>(ch["logprobs"]["tokens"].size());
      }
      texts[i] += ch["text"].get<std::string>();
      if (ch["logprobs"].is_null()) continue;
      for (const char *key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
        for (const json &v : ch["logprobs"][key]) merged[i][key].push_back(v);
    }
    for (size_t i = 0; i < 2; ++i) {
      INFO("streamed choice " << i);
      CHECK(first_chunk_entries[i] >= static_cast<int>(ids.size())); // the prompt's entries came with the echo
      CHECK(texts[i] == text);
      CHECK(merged[i]["tokens"] == lp["tokens"]);
      CHECK(merged[i]["text_offset"] == lp["text_offset"]);
      CHECK(merged[i]["top_logprobs"] == lp["top_logprobs"]);
      REQUIRE(merged[i]["token_logprobs"].size() == n);
      for (size_t k = 1; k < n; ++k) CHECK(merged[i]["token_logprobs"][k].get<double>() == lp["token_logprobs"][k].get<double>());
    }
  }
  // vLLM's prompt_logprobs: per prompt token after the first, its id's entry (logprob, rank,
  // decoded_token) and the alternatives', in each choice.
  auto res = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 2},
                                        {"temperature", 0}, {"prompt_logprobs", 2}, {"n", 2}});
  REQUIRE(res);
  INFO(res->body);
  REQUIRE(res->status == 200);
  const json scored = json::parse(res->body);
  for (const json &choice : scored["choices"]) {
    const json &pl = choice["prompt_logprobs"];
    REQUIRE(pl.size() == ids.size());
    CHECK(pl[0].is_null());
    for (size_t i = 1; i < ids.size(); ++i) {
      INFO("prompt token " << i);
      const json &own = pl[i][std::to_string(ids[i])];
      CHECK(own["logprob"].get<double>() == Approx(log_softmax_at(i - 1, ids[i])).margin(2e-4));
      CHECK(own["rank"].get<int64_t>() >= 1);
      CHECK(pl[i].size() <= 3);
      std::set<int64_t> ranks;
      for (const auto &[id, e] : pl[i].items()) ranks.insert(e["rank"].get<int64_t>());
      CHECK(ranks.count(1) == 1); // the two alternatives (the prompt's token may be one of them)
      CHECK(ranks.count(2) == 1);
    }
  }
  auto chat = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", json::array({{{"role", "user"}, {"content", "hi"}}})},
                                              {"max_tokens", 2}, {"prompt_logprobs", 0}});
  REQUIRE(chat);
  INFO(chat->body);
  REQUIRE(chat->status == 200);
  const json chat_body = json::parse(chat->body);
  const json &chat_pl = chat_body["prompt_logprobs"]; // (vLLM's chat: at the top level, one prompt)
  CHECK_FALSE(chat_body["choices"][0].contains("prompt_logprobs"));
  CHECK(chat_pl.size() > 2);
  for (size_t i = 1; i < chat_pl.size(); ++i) CHECK(chat_pl[i].size() == 1); // just the prompt's own token
  // Refused: max_tokens 0 without echo; prompt_logprobs streamed or out of range.
  auto zero = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "x"}, {"max_tokens", 0}});
  CHECK(zero->status == 400);
  CHECK(json::parse(zero->body)["error"]["param"] == "max_tokens");
  auto streamed = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "x"}, {"prompt_logprobs", 1}, {"stream", true}});
  CHECK(streamed->status == 400);
  CHECK(json::parse(streamed->body)["error"]["param"] == "stream");
  auto many = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "x"}, {"prompt_logprobs", 21}});
  CHECK(many->status == 400);
  CHECK(json::parse(many->body)["error"]["param"] == "prompt_logprobs");
}

TEST_CASE("chat completions: non-streamed and streamed agree; seeds reproduce; n choices", "[server]") {
  Fixture f;
  const json messages = json::array({{{"role", "system"}, {"content", "You speak as the King James Bible."}},
                                     {{"role", "user"}, {"content", "hi"}}});
  json req = {{"model", "tiny-kjv"}, {"messages", messages}, {"max_tokens", 20}, {"temperature", 0.9}, {"seed", 1234}};
  auto a = f.post("/v1/chat/completions", req), b = f.post("/v1/chat/completions", req);
  REQUIRE(a->status == 200);
  const json ja = json::parse(a->body), jb = json::parse(b->body);
  CHECK(ja["object"] == "chat.completion");
  CHECK(ja["choices"][0]["message"]["role"] == "assistant");
  CHECK(ja["choices"][0]["message"]["content"] == jb["choices"][0]["message"]["content"]);
  CHECK(!ja["choices"][0]["message"]["content"].get<std::string>().empty());
  req["stream"] = true;
  auto s = f.post("/v1/chat/completions", req);
  const auto ev = events(s->body);
  REQUIRE(ev.size() >= 3);
  CHECK(json::parse(ev[0])["choices"][0]["delta"]["role"] == "assistant");
  std::string text;
  std::string finish;
  for (size_t i = 0; i + 1 < ev.size(); ++i) {
    const json e = json::parse(ev[i]); // (named: a range-for over a temporary's member dangles)
    for (const auto &ch : e["choices"]) {
      if (ch["delta"].contains("content")) text += ch["delta"]["content"].get<std::string>();
      if (!ch["finish_reason"].is_null()) finish = ch["finish_reason"].get<std::string>();
    }
  }
  CHECK(text == ja["choices"][0]["message"]["content"]);
  CHECK(finish == ja["choices"][0]["finish_reason"]);

  json many = {{"model", "tiny-kjv"}, {"messages", messages}, {"max_tokens", 16}, {"n", 4}, {"seed", 99}, {"temperature", 1.5}};
  auto n = f.post("/v1/chat/completions", many);
  const json jn = json::parse(n->body);
  REQUIRE(jn["choices"].size() == 4);
  std::set<std::string> distinct;
  for (size_t i = 0; i < 4; ++i) {
    CHECK(jn["choices"][i]["index"] == i);
    distinct.insert(jn["choices"][i]["message"]["content"].get<std::string>());
  }
  CHECK(distinct.size() > 1); // each choice samples with its own seed
}

TEST_CASE("stop strings, logit_bias and max_tokens act on the output", "[server]") {
  Fixture f;
  const std::string full = greedy_run("And God said", 32);
  REQUIRE(full.size() > 8);
  // A stop string taken from the middle of the greedy text: the output ends right before it.
  const std::string stop = full.substr(full.size() / 2, 3);
  auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 32}, {"temperature", 0}, {"stop", stop}});
  const json j = json::parse(r->body);
  CHECK(j["choices"][0]["text"] == full.substr(0, full.find(stop)));
  CHECK(j["choices"][0]["finish_reason"] == "stop");
  auto rs = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 32}, {"temperature", 0}, {"stop", json::array({stop})}, {"stream", true}});
  std::string text;
  for (const auto &e : events(rs->body)) {
    if (e == "[DONE]") continue;
    const json event = json::parse(e);
    for (const auto &ch : event["choices"]) text += ch["text"].get<std::string>();
  }
  CHECK(text == full.substr(0, full.find(stop))); // the stop string's start was never streamed

  // logit_bias +100 on one token makes greedy pick it; -100 bans a token.
  const std::vector<int32_t> prompt = {1, 400, 500};
  auto forced = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", prompt}, {"max_tokens", 1}, {"temperature", 0},
                                           {"logit_bias", {{"77", 100}}}});
  const json jf = json::parse(forced->body);
  CHECK(jf["usage"]["completion_tokens"] == 1);
  CHECK(jf["choices"][0]["text"] == f.runtime->continuation(prompt, {77}, {}));
  auto plain = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", prompt}, {"max_tokens", 1}, {"temperature", 0}});
  const std::string greedy_first = json::parse(plain->body)["choices"][0]["text"];
  // Every token that reads as the greedy one's text is banned (byte fallback spells text twice).
  json ban = json::object();
  for (int32_t t = 0; t < f.runtime->vocab_size(); ++t)
    if (f.runtime->continuation(prompt, {t}, {}) == greedy_first) ban[std::to_string(t)] = -100;
  REQUIRE(!ban.empty());
  auto banned = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", prompt}, {"max_tokens", 1}, {"temperature", 0},
                                           {"logit_bias", ban}});
  CHECK(json::parse(banned->body)["choices"][0]["text"] != greedy_first);
  auto long_out = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", prompt}, {"max_tokens", 5}, {"temperature", 0},
                                             {"logit_bias", {{"1", -100}, {"2", -100}}}});
  const json jl = json::parse(long_out->body);
  CHECK(jl["usage"]["completion_tokens"] == 5); // the stop tokens are banned: it runs to max_tokens
  CHECK(jl["choices"][0]["finish_reason"] == "length");
}

TEST_CASE("response_format: JSON schema and JSON object outputs parse", "[server]") {
  Fixture f;
  const json schema = {{"type", "object"},
                       {"properties", {{"name", {{"type", "string"}, {"maxLength", 12}}}, {"age", {{"type", "integer"}}}}},
                       {"required", {"name", "age"}}};
  for (int seed = 0; seed < 3; ++seed) {
    auto r = f.post("/v1/chat/completions",
                    {{"model", "tiny-kjv"},
                     {"messages", {{{"role", "user"}, {"content", "Give a name and an age as JSON."}}}},
                     {"max_tokens", 80}, {"seed", seed},
                     {"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "person"}, {"schema", schema}}}}}});
    REQUIRE(r->status == 200);
    const json j = json::parse(r->body);
    INFO(j.dump());
    if (j["choices"][0]["finish_reason"] != "stop") continue; // ran out of tokens inside a number
    const json out = json::parse(j["choices"][0]["message"]["content"].get<std::string>());
    CHECK(out["name"].is_string());
    CHECK(out["name"].get<std::string>().size() <= 12);
    CHECK(out["age"].is_number_integer());
  }
  auto bad = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", {{{"role", "user"}, {"content", "x"}}}},
                                             {"response_format", {{"type", "json_schema"}, {"json_schema", {{"schema", {{"type", "object"}, {"patternProperties", json::object()}}}}}}}});
  CHECK(bad->status == 400);
  CHECK(json::parse(bad->body)["error"]["param"] == "response_format");
  auto obj = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "{"}, {"max_tokens", 48}, {"seed", 3},
                                        {"response_format", {{"type", "json_object"}}}});
  REQUIRE(obj->status == 200);
  const std::string text = json::parse(obj->body)["choices"][0]["text"];
  REQUIRE(!text.empty());
  CHECK(text[0] == '{');
}

TEST_CASE("embeddings equal the runtime's", "[server]") {
  Fixture f;
  auto r = f.post("/v1/embeddings", {{"model", "tiny-kjv"}, {"input", {"In the beginning", "God created"}}});
  REQUIRE(r->status == 200);
  const json j = json::parse(r->body);
  REQUIRE(j["data"].size() == 2);
  auto local = Runtime::from_string(manifest(), "e.toml")->embed({"In the beginning", "God created"}, false);
  for (size_t i = 0; i < 2; ++i) {
    const auto v = j["data"][i]["embedding"].get<std::vector<float>>();
    REQUIRE(v.size() == local[i].size());
    for (size_t k = 0; k < v.size(); ++k) CHECK(v[k] == Approx(local[i][k]).margin(1e-6));
  }
  CHECK(j["usage"]["prompt_tokens"].get<int>() > 0);
  CHECK(f.post("/v1/embeddings", {{"model", "tiny-kjv"}, {"input", json::array()}})->status == 400);
}

TEST_CASE("API keys guard every route but /health; admin routes take the admin key", "[server]") {
  Fixture f(manifest("api_keys = [\"sk-test-key-1\", \"sk-test-key-2\"]\nadmin_key = \"admin-key-123\"\n"));
  auto c = f.client();
  CHECK(c.Get("/health")->status == 200);
  CHECK(c.Get("/v1/models")->status == 401);
  CHECK(c.Get("/metrics")->status == 401);
  CHECK(c.Get("/v1/models", {{"Authorization", "Bearer sk-test-key-3"}})->status == 401);
  CHECK(c.Get("/v1/models", {{"Authorization", "Bearer sk-test-key-2"}})->status == 200);
  CHECK(c.Get("/v1/models", {{"Authorization", "sk-test-key-2"}})->status == 401);
  const json swap = {{"slot", "sampler[1]"}, {"component", "use = \"top-k\"\nk = 5"}};
  CHECK(f.post("/admin/swap", swap, {{"Authorization", "Bearer sk-test-key-1"}})->status == 401);
  auto ok = f.post("/admin/swap", swap, {{"Authorization", "Bearer admin-key-123"}});
  CHECK(ok->status == 200);
  CHECK(json::parse(ok->body)["swapped"] == "sampler[1]");
  CHECK(f.post("/admin/swap", {{"slot", "sampler[9]"}, {"component", "use = \"greedy\""}}, {{"Authorization", "Bearer admin-key-123"}})->status == 404);
  CHECK(f.post("/admin/swap", {{"slot", "sampler[1]"}, {"component", "use = \"top-k\"\nk = -5"}}, {{"Authorization", "Bearer admin-key-123"}})->status == 400);
}

TEST_CASE("a full queue answers 429 with Retry-After at once", "[server]") {
  Fixture f(manifest("max_queue = 2\n", "max_seqs = 2\nmax_batched_tokens = 64"));
  // Four long requests fill the 2 running places and the 2 queue places.
  std::vector<std::thread> clients;
  std::atomic<int> ok{0};
  for (int i = 0; i < 4; ++i)
    clients.emplace_back([&] {
      auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", {1, 400}}, {"max_tokens", 200}, {"logit_bias", {{"1", -100}, {"2", -100}}}});
      if (r && r->status == 200) ++ok;
    });
  while (f.server->in_flight() < 4) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  std::vector<double> waits;
  for (int i = 0; i < 8; ++i) { // twice saturation
    const auto t0 = std::chrono::steady_clock::now();
    auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "x"}, {"max_tokens", 4}});
    waits.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    REQUIRE(r);
    CHECK(r->status == 429);
    CHECK(r->get_header_value("Retry-After") == "1");
    CHECK(json::parse(r->body)["error"]["type"] == "rate_limit_error");
  }
  std::sort(waits.begin(), waits.end());
  CHECK(waits.back() < 0.05);
  for (auto &t : clients) t.join();
  CHECK(ok == 4);
  CHECK(metric(f, "loom_requests_rejected_total") == 8);
}

TEST_CASE("a client that disconnects cancels its generation and frees its KV blocks", "[server]") {
  Fixture f;
  const int cycles = 1000;
  double worst = 0;
  for (int i = 0; i < cycles; ++i) {
    httplib::Client c = f.client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.set_header("Content-Type", "application/json");
    req.body = json{{"model", "tiny-kjv"}, {"prompt", {1, 400, 500}}, {"max_tokens", 400}, {"stream", true},
                    {"logit_bias", {{"1", -100}, {"2", -100}}}}.dump();
    int chunks = 0;
    req.content_receiver = [&](const char *, size_t, uint64_t, uint64_t) { return ++chunks < 3; }; // then hang up
    c.send(req);
    c.stop();
    const auto t0 = std::chrono::steady_clock::now();
    while (f.server->in_flight() > 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    worst = std::max(worst, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    REQUIRE(f.server->in_flight() == 0);
  }
  WARN("disconnect -> request ended: worst " << worst * 1000 << " ms over " << cycles << " cycles");
  CHECK(worst < 0.25);
  // Every KV block went back (the engine publishes after each step; idle it publishes too).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(metric(f, "loom_kv_blocks_used") == 0);
  CHECK(metric(f, "loom_requests_cancelled_total") == cycles);
}

TEST_CASE("logprobs: completions and chat, streamed or not, are the model's (transformers' at the first token)", "[server][logprobs]") {
  Fixture f;
  // transformers' logits after "And God said" (BOS first, as the server encodes it):
  // tests/fixtures/models/tiny-kjv-golden.json, made by make_default_model_golden.py.
  std::ifstream in(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/models/tiny-kjv-golden.json");
  REQUIRE(in);
  const json golden = json::parse(in)["cases"][0];
  REQUIRE(golden["prompt"] == "And God said");
  std::vector<double> ref = golden["logits"].back().get<std::vector<double>>();
  const double top = *std::max_element(ref.begin(), ref.end());
  double sum = 0;
  for (double v : ref) sum += std::exp(v - top);
  for (double &v : ref) v -= top + std::log(sum);
  const std::vector<double> sorted = [&] {
    std::vector<double> v = ref;
    std::sort(v.begin(), v.end(), std::greater<>());
    return v;
  }();
  const int32_t first = golden["greedy"][0].get<int32_t>();

  const json req = {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 12}, {"temperature", 0}, {"logprobs", 5}};
  auto res = f.post("/v1/completions", req);
  REQUIRE(res);
  REQUIRE(res->status == 200);
  const json choice = json::parse(res->body)["choices"][0];
  const json &lp = choice["logprobs"];
  const size_t n = lp["tokens"].size();
  REQUIRE(n > 0);
  REQUIRE(lp["token_logprobs"].size() == n);
  REQUIRE(lp["top_logprobs"].size() == n);
  REQUIRE(lp["text_offset"].size() == n);
  std::string joined;
  for (size_t i = 0; i < n; ++i) {
    INFO("token " << i);
    CHECK(lp["text_offset"][i] == joined.size());
    joined += lp["tokens"][i].get<std::string>();
    CHECK(lp["top_logprobs"][i].size() <= 5);
    // Greedy: the token is the most likely one, its log-probability the largest listed.
    double best = -1e30;
    for (const auto &[text, value] : lp["top_logprobs"][i].items()) best = std::max(best, value.get<double>());
    CHECK(lp["token_logprobs"][i].get<double>() == Approx(best).margin(1e-6));
  }
  CHECK(joined == choice["text"]);
  CHECK(lp["token_logprobs"][0].get<double>() == Approx(ref[static_cast<size_t>(first)]).margin(2e-4));
  std::vector<double> listed;
  for (const auto &[text, value] : lp["top_logprobs"][0].items()) listed.push_back(value.get<double>());
  std::sort(listed.begin(), listed.end(), std::greater<>());
  for (size_t k = 0; k < listed.size(); ++k) CHECK(listed[k] == Approx(sorted[k]).margin(2e-4));

  // Streamed: the chunks' entries, in order, are the same.
  json streamed_req = req;
  streamed_req["stream"] = true;
  auto s = f.post("/v1/completions", streamed_req);
  REQUIRE(s);
  json tokens = json::array(), values = json::array();
  for (const json &ch : streamed_choices(s->body)) {
    if (ch["logprobs"].is_null()) continue;
    for (const auto &t : ch["logprobs"]["tokens"]) tokens.push_back(t);
    for (const auto &v : ch["logprobs"]["token_logprobs"]) values.push_back(v);
  }
  CHECK(tokens == lp["tokens"]);
  CHECK(values == lp["token_logprobs"]);

  // Chat, non-streamed and streamed.
  json chat = {{"model", "tiny-kjv"}, {"messages", json::array({{{"role", "system"}, {"content", "You speak as the King James Bible."}},
                                                                     {{"role", "user"}, {"content", "hi"}}})},
               {"max_tokens", 10},
               {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 2}};
  auto c = f.post("/v1/chat/completions", chat);
  REQUIRE(c);
  REQUIRE(c->status == 200);
  const json message_choice = json::parse(c->body)["choices"][0];
  const json &content = message_choice["logprobs"]["content"];
  REQUIRE(content.is_array());
  INFO(c->body);
  REQUIRE(!content.empty());
  std::string chat_joined;
  for (const auto &t : content) {
    const std::string text = t["token"];
    std::vector<int> bytes(text.begin(), text.end());
    for (int &b : bytes) b &= 0xff;
    CHECK(t["bytes"].get<std::vector<int>>() == bytes);
    CHECK(t["top_logprobs"].size() == 2);
    CHECK(t["logprob"] == t["top_logprobs"][0]["logprob"]);
    chat_joined += text;
  }
  CHECK(chat_joined == message_choice["message"]["content"]);
  chat["stream"] = true;
  auto cs = f.post("/v1/chat/completions", chat);
  REQUIRE(cs);
  json chat_streamed = json::array();
  for (const json &ch : streamed_choices(cs->body))
    if (!ch["logprobs"].is_null())
      for (const auto &t : ch["logprobs"]["content"]) chat_streamed.push_back(t);
  CHECK(chat_streamed == content);

  // Without the parameter: null; with a stop string: only the tokens that begin in the text.
  auto plain = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 4}, {"temperature", 0}});
  CHECK(json::parse(plain->body)["choices"][0]["logprobs"].is_null());
  const std::string full = choice["text"];
  REQUIRE(full.size() > 6);
  json cut_req = req;
  cut_req["stop"] = full.substr(4, 3);
  auto cut = f.post("/v1/completions", cut_req);
  const json cut_choice = json::parse(cut->body)["choices"][0];
  const std::string cut_text = cut_choice["text"];
  CHECK(cut_text.size() < full.size());
  std::string cut_joined;
  for (const auto &t : cut_choice["logprobs"]["tokens"]) {
    CHECK(cut_joined.size() < std::max<size_t>(cut_text.size(), 1)); // each listed token begins in the text
    cut_joined += t.get<std::string>();
  }
  CHECK(cut_joined.substr(0, cut_text.size()) == cut_text);
}

TEST_CASE("vLLM's extensions: top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids", "[server]") {
  Fixture f;
  const std::string greedy = greedy_run("And God said", 24);
  const auto text_of = [&](json extra) {
    json req = {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24}, {"seed", 3}};
    req.update(extra);
    return f.ok("/v1/completions", req);
  };
  // One candidate left (top_k 1, or min_p 1: only the most likely token reaches the top's
  // probability) is greedy decoding, however hot the temperature.
  CHECK(text_of({{"temperature", 1.5}, {"top_k", 1}})["choices"][0]["text"] == greedy);
  CHECK(text_of({{"temperature", 1.5}, {"min_p", 1.0}})["choices"][0]["text"] == greedy);
  CHECK(text_of({{"temperature", 1.5}})["choices"][0]["text"] != greedy); // (so the two above were filtered)
  CHECK(text_of({{"temperature", 1.5}, {"top_k", -1}})["choices"][0]["text"] == text_of({{"temperature", 1.5}})["choices"][0]["text"]);
  // The greedy reply repeats itself; a repetition penalty changes it.
  CHECK(text_of({{"temperature", 0}, {"repetition_penalty", 1.5}})["choices"][0]["text"] != greedy);
  CHECK(text_of({{"temperature", 0}, {"repetition_penalty", 1.0}})["choices"][0]["text"] == greedy);
  // The default model ends this greedy reply with its end token after 19 tokens; ignore_eos runs on.
  const json ended = text_of({{"temperature", 0}, {"max_tokens", 40}});
  CHECK(ended["choices"][0]["finish_reason"] == "stop");
  CHECK(ended["usage"]["completion_tokens"].get<int>() < 40);
  const json on = text_of({{"temperature", 0}, {"max_tokens", 40}, {"ignore_eos", true}});
  CHECK(on["choices"][0]["finish_reason"] == "length");
  CHECK(on["usage"]["completion_tokens"] == 40);
  const std::string first = ended["choices"][0]["text"], longer = on["choices"][0]["text"];
  CHECK(longer.substr(0, first.size()) == first);
  CHECK(longer.size() > first.size());
  // min_tokens: the end token gets no probability before 30 tokens, so this greedy reply runs
  // past its 19; stop strings still apply.
  const json held = text_of({{"temperature", 0}, {"max_tokens", 40}, {"min_tokens", 30}});
  CHECK(held["usage"]["completion_tokens"].get<int>() >= 30);
  CHECK(held["choices"][0]["text"].get<std::string>().substr(0, first.size()) == first);
  // stop_token_ids: the greedy reply's third token (transformers' greedy ids for this prompt,
  // tests/fixtures/models/tiny-kjv-golden.json) ends it after three tokens, its text left out,
  // streamed or not.
  std::ifstream in(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/models/tiny-kjv-golden.json");
  const json golden = json::parse(in)["cases"][0];
  REQUIRE(golden["prompt"] == "And God said");
  const int32_t third = golden["greedy"][2];
  const json cut = text_of({{"temperature", 0}, {"stop_token_ids", {third}}});
  CHECK(cut["choices"][0]["finish_reason"] == "stop");
  CHECK(cut["usage"]["completion_tokens"] == 3);
  const std::string two = f.runtime->continuation(golden["input_ids"].get<std::vector<int32_t>>(),
                                                 {golden["greedy"][0].get<int32_t>(), golden["greedy"][1].get<int32_t>()}, {});
  CHECK(cut["choices"][0]["text"] == two);
  auto streamed = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24}, {"temperature", 0},
                                             {"stop_token_ids", {third}}, {"stream", true}});
  std::string text;
  for (const json &ch : streamed_choices(streamed->body)) text += ch["text"].get<std::string>();
  CHECK(text == two);
}

TEST_CASE("min_tokens holds stop strings back as vLLM does: only one ending after the first min_tokens tokens counts", "[server]") {
  Fixture f;
  const auto request = [](json extra) {
    json req = {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"temperature", 0}, {"ignore_eos", true}};
    req.update(extra);
    return req;
  };
  const auto text_of = [&](json extra) { return f.ok("/v1/completions", request(extra))["choices"][0]; };
  const int held = 10;
  // The greedy reply's text, and the text of its first `held` tokens (a prefix of it).
  const std::string whole = text_of({{"max_tokens", 40}})["text"], floor = text_of({{"max_tokens", held}})["text"];
  REQUIRE(whole.substr(0, floor.size()) == floor);
  // A stop string found in the first tokens' text and again after it, so that min_tokens moves the cut.
  std::string stop;
  for (const char *candidate : {"e", "t", "a", "o", "h", " "})
    if (floor.find(candidate) != std::string::npos && whole.find(candidate, floor.size()) != std::string::npos) {
      stop = candidate;
      break;
    }
  REQUIRE(!stop.empty());
  INFO("stop string '" << stop << "', first " << held << " tokens: '" << floor << "'");
  CHECK(text_of({{"max_tokens", 40}, {"stop", stop}})["text"] == whole.substr(0, whole.find(stop)));
  const std::string want = whole.substr(0, whole.find(stop, floor.size() + 1 - stop.size()));
  const json cut = text_of({{"max_tokens", 40}, {"stop", stop}, {"min_tokens", held}});
  CHECK(cut["finish_reason"] == "stop");
  CHECK(cut["text"] == want);
  // Streamed, the same text arrives.
  auto live = f.post("/v1/completions", request({{"max_tokens", 40}, {"stop", stop}, {"min_tokens", held}, {"stream", true}}));
  REQUIRE(live);
  REQUIRE(live->status == 200);
  std::string streamed;
  for (const json &ch : streamed_choices(live->body)) streamed += ch["text"].get<std::string>();
  CHECK(streamed == want);
  // A reply that ends at max_tokens keeps a stop string found only in its first tokens' text.
  std::string early;
  for (size_t len = 3; len <= floor.size() && early.empty(); ++len)
    for (size_t at = 0; at + len <= floor.size(); ++at)
      if (whole.find(floor.substr(at, len), floor.size() + 1 - len) == std::string::npos) {
        early = floor.substr(at, len);
        break;
      }
  REQUIRE(!early.empty());
  const json kept = text_of({{"max_tokens", 40}, {"stop", early}, {"min_tokens", held}});
  CHECK(kept["finish_reason"] == "length");
  CHECK(kept["text"] == whole);
  // A stop string that begins inside the first tokens' text and ends after it counts (vLLM checks
  // the text each new token completes): the floor's last character and the next one.
  if (whole.size() > floor.size()) {
    const std::string straddling = whole.substr(floor.size() - 1, 2);
    const size_t at = whole.find(straddling, floor.size() - 1);
    CHECK(text_of({{"max_tokens", 40}, {"stop", straddling}, {"min_tokens", held}})["text"] == whole.substr(0, at));
  }
}

TEST_CASE("guided decoding as vLLM and llama.cpp's server take it: guided_choice, guided_json, grammar", "[server]") {
  Fixture f;
  const auto reply = [&](json extra, int seed) {
    json req = {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 24}, {"seed", seed}};
    req.update(extra);
    return f.ok("/v1/completions", req)["choices"][0];
  };
  const std::set<std::string> choices = {"yes", "no", "the \"light\""};
  std::set<std::string> seen;
  for (int seed = 0; seed < 6; ++seed) {
    const json c = reply({{"guided_choice", json(std::vector<std::string>(choices.begin(), choices.end()))}}, seed);
    CHECK(choices.count(c["text"].get<std::string>()) == 1);
    seen.insert(c["text"].get<std::string>());
  }
  CHECK(seen.size() > 1); // sampled among them
  const json schema = {{"type", "object"}, {"properties", {{"n", {{"type", "integer"}}}}}, {"required", {"n"}}};
  int parsed = 0;
  for (const json &given : {json(schema), json(schema.dump())}) { // an object, or its text (vLLM takes both)
    for (const char *key : {"guided_json", "json_schema"}) {
      const json c = reply({{key, given}, {"max_tokens", 40}}, 1);
      if (c["finish_reason"] != "stop") continue; // ran out of tokens inside a number
      const json out = json::parse(c["text"].get<std::string>());
      CHECK(out["n"].is_number_integer());
      ++parsed;
    }
  }
  CHECK(parsed >= 1); // (the replies that ended were checked, and some did)
  for (const char *key : {"grammar", "guided_grammar"}) {
    const std::string digits = reply({{key, "root ::= [0-9]+"}, {"max_tokens", 6}}, 2)["text"];
    REQUIRE(!digits.empty());
    CHECK(digits.find_first_not_of("0123456789") == std::string::npos);
  }
  // guided_regex: the reply matches the whole expression (std::regex, ECMAScript, checks it).
  int matched = 0;
  for (const std::string re : {R"(\d{3}-\d{2})", "(yes|no)!?", "[A-Z][a-z]{2,5}", R"(\w+@\w+\.com)", "a.c", R"([^\s"]{1,4} "x")",
                               "^(?:ab)+c?$", R"([\d_]+)", "[a-c-x]{2,3}", R"([\w-]{3})"}) {
    for (int seed = 0; seed < 2; ++seed) {
      const json c = reply({{"guided_regex", re}, {"max_tokens", 40}}, seed);
      INFO(re << " -> " << c.dump());
      if (c["finish_reason"] != "stop") continue;
      CHECK(std::regex_match(c["text"].get<std::string>(), std::regex(re)));
      ++matched;
    }
  }
  CHECK(matched >= 12); // (most replies end inside 40 tokens)
  for (const std::string re : {"(a", "a{2,1}", R"((a)\1)", "(?=a)b", "a**", "[a", "a^b", R"(\b)", "", R"([\w-~])", R"([a-\d])",
                               "a{1001}"}) {
    json req = {{"model", "tiny-kjv"}, {"prompt", "x"}, {"guided_regex", re}};
    auto r = f.post("/v1/completions", req);
    INFO(re << " -> " << r->body);
    CHECK(r->status == 400);
    CHECK(json::parse(r->body)["error"]["param"] == "guided_regex");
  }
  // Refused, naming the field: a bad grammar, a bad choice list, two constraints at once.
  const auto refused = [&](json extra) {
    json req = {{"model", "tiny-kjv"}, {"prompt", "x"}};
    req.update(extra);
    auto r = f.post("/v1/completions", req);
    REQUIRE(r);
    CHECK(r->status == 400);
    return json::parse(r->body)["error"]["param"];
  };
  CHECK(refused({{"grammar", "root ::= ("}}) == "grammar");
  CHECK(refused({{"guided_choice", json::array()}}) == "guided_choice");
  CHECK(refused({{"guided_json", "{not json"}}) == "guided_json");
  CHECK(refused({{"guided_json", schema}, {"guided_choice", {"a"}}}) == "guided_choice"); // (the second one named)
  CHECK(refused({{"guided_choice", {"a"}}, {"response_format", {{"type", "json_object"}}}}) == "guided_choice");
  // A completed constraint leaves only the end token: ignore_eos and min_tokens cannot go with one.
  CHECK(refused({{"guided_choice", {"a"}}, {"ignore_eos", true}}) == "ignore_eos");
  CHECK(refused({{"grammar", "root ::= [0-9]+"}, {"min_tokens", 3}}) == "min_tokens");
  CHECK(refused({{"grammar", std::string(20000, ' ') + "root ::= \"a\""}}) == "grammar");
}

TEST_CASE("a request whose own constraint fails at its first step gets 400 naming the constraint, not 200", "[server]") {
  Fixture f;
  // Parses, but too ambiguous for the matcher (more live parse stacks than its limit): the
  // failure comes from the request's sampler chain at the first step, after admission.
  std::string ambiguous = "root ::=";
  for (int i = 0; i < 200; ++i) ambiguous += R"( ("a" | "b" | ""))";
  for (const bool stream : {false, true})
    for (const char *path : {"/v1/completions", "/v1/chat/completions"}) {
      json req = {{"model", "tiny-kjv"}, {"max_tokens", 4}, {"guided_grammar", ambiguous}, {"stream", stream}, {"n", 2}};
      if (std::string(path) == "/v1/completions") req["prompt"] = "And";
      else req["messages"] = json::array({{{"role", "user"}, {"content", "Say a or b."}}});
      auto r = f.post(path, req);
      REQUIRE(r);
      INFO(path << " stream=" << stream << " -> " << r->status << " " << r->body);
      CHECK(r->status == 400);
      const json e = json::parse(r->body)["error"];
      CHECK(e["param"] == "guided_grammar");
      CHECK(e["type"] == "invalid_request_error");
      CHECK(e["message"].get<std::string>().find("too ambiguous") != std::string::npos);
    }
  // The server serves on: the same grammar, less ambiguous, and a plain request.
  std::string fine = "root ::=";
  for (int i = 0; i < 4; ++i) fine += R"( ("a" | "b"))";
  auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And"}, {"max_tokens", 4}, {"guided_grammar", fine}});
  REQUIRE(r);
  CHECK(r->status == 200);
  CHECK(json::parse(r->body)["choices"][0]["text"].get<std::string>().size() == 4);
  r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And"}, {"max_tokens", 4}});
  REQUIRE(r);
  CHECK(r->status == 200);
}

TEST_CASE("regex_to_gbnf: random expressions convert to grammars the grammar sampler accepts, or are refused", "[server]") {
  // 3,000 random strings over regular expressions' metacharacters: each either converts to a
  // grammar that the grammar sampler compiles, or is refused with std::invalid_argument.
  auto rt = Runtime::from_string(manifest(), "regex_test.toml");
  std::mt19937 rng(11);
  const std::string alphabet = "ab()[]{}|*+?.^$\\-,0123dwsDWSn:=!\"";
  int converted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string re;
    for (int k = 1 + static_cast<int>(rng() % 12); k > 0; --k) re += alphabet[rng() % alphabet.size()];
    std::string grammar;
    try {
      grammar = loom::server::regex_to_gbnf(re);
    } catch (const std::invalid_argument &) {
      continue;
    }
    INFO(re << " -> " << grammar);
    CHECK_NOTHROW(rt->make_samplers({"use = \"grammar\"\ngrammar = " + loom::server::toml_quote(grammar)}, "regex"));
    ++converted;
  }
  CHECK(converted > 300);
}

TEST_CASE("/tokenize and /detokenize, in vLLM's and llama.cpp's shapes", "[server]") {
  Fixture f;
  const std::vector<int32_t> ids = f.runtime->encode_text("And God said", "test"); // BOS first
  auto a = f.post("/tokenize", {{"model", "tiny-kjv"}, {"prompt", "And God said"}});
  REQUIRE(a->status == 200);
  const json ja = json::parse(a->body);
  CHECK(ja["tokens"].get<std::vector<int32_t>>() == ids);
  CHECK(ja["count"] == ids.size());
  CHECK(ja["max_model_len"] == f.runtime->max_positions());
  // llama.cpp's: `content`, no special tokens unless asked, pieces on request.
  auto b = f.post("/tokenize", {{"content", "And God said"}, {"with_pieces", true}});
  REQUIRE(b->status == 200);
  const json jb = json::parse(b->body);
  REQUIRE(jb["tokens"].size() == ids.size() - 1);
  std::string joined;
  for (size_t i = 0; i < jb["tokens"].size(); ++i) {
    CHECK(jb["tokens"][i]["id"] == ids[i + 1]);
    joined += jb["tokens"][i]["piece"].get<std::string>();
  }
  CHECK(joined == " And God said"); // (sentencepiece's leading space)
  auto c = f.post("/tokenize", {{"model", "tiny-kjv"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  REQUIRE(c->status == 200);
  CHECK(json::parse(c->body)["tokens"].get<std::vector<int32_t>>() == f.runtime->encode_messages({{"user", "hi"}}, "test"));
  auto d = f.post("/detokenize", {{"model", "tiny-kjv"}, {"tokens", ids}});
  REQUIRE(d->status == 200);
  CHECK(json::parse(d->body)["prompt"] == "And God said");
  CHECK(json::parse(d->body)["content"] == "And God said");
  CHECK(f.post("/detokenize", {{"tokens", {99999999}}})->status == 400);
  CHECK(f.post("/detokenize", {{"tokens", "x"}})->status == 400);
  CHECK(f.post("/tokenize", {{"prompt", "x"}, {"content", "y"}})->status == 400);
  CHECK(f.post("/tokenize", {{"model", "other"}, {"prompt", "x"}})->status == 404);
}

TEST_CASE("bad requests get 4xx with an OpenAI error body, never a 5xx", "[server]") {
  Fixture f(manifest("max_body_bytes = 65536\n"));
  auto c = f.client();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"/v1/completions", "{"},
      {"/v1/completions", "[]"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\"}"},
      {"/v1/completions", "{\"model\": \"nope\", \"prompt\": \"x\"}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"max_tokens\": -1}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"max_tokens\": 100000}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"temperature\": \"hot\"}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"temperature\": 7}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"n\": 1000}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": [99999999]}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"logit_bias\": {\"abc\": 1}}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"max_token\": 3}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"stream_options\": {\"include_usage\": true}}"},
      {"/v1/chat/completions", "{\"model\": \"tiny-kjv\", \"messages\": []}"},
      {"/v1/chat/completions", "{\"model\": \"tiny-kjv\", \"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}"},
      {"/v1/chat/completions", "{\"model\": \"tiny-kjv\", \"messages\": [{\"role\": \"user\"}]}"},
      {"/v1/chat/completions", std::string(100, '[') + std::string(100, ']')},
      {"/v1/embeddings", "{\"model\": \"tiny-kjv\", \"input\": 5}"},
      {"/v1/completions", std::string(70000, ' ')},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"logprobs\": 21}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"top_k\": -2}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"min_p\": 1.5}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"repetition_penalty\": 0}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"ignore_eos\": \"yes\"}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"stop_token_ids\": [99999999]}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"stop_token_ids\": 5}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"max_tokens\": 4, \"min_tokens\": 5}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"min_tokens\": -1}"},
      {"/v1/completions", "{\"model\": \"tiny-kjv\", \"prompt\": \"x\", \"logprobs\": true}"},
      {"/v1/chat/completions", "{\"model\": \"tiny-kjv\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 2}"},
      {"/v1/chat/completions",
       "{\"model\": \"tiny-kjv\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": true, \"top_logprobs\": 30}"},
  };
  for (const auto &[path, body] : cases) {
    auto r = c.Post(path.c_str(), body, "application/json");
    REQUIRE(r);
    INFO(path << " " << body.substr(0, 120) << " -> " << r->status << " " << r->body);
    CHECK(r->status >= 400);
    CHECK(r->status < 500);
    const json e = json::parse(r->body, nullptr, false);
    CHECK(e.contains("error"));
  }
  // Random requests: mutations of valid bodies (fields dropped, retyped, set to extremes) and
  // random bytes. Only 2xx and 4xx.
  std::mt19937 rng(5);
  const std::vector<json> values = {nullptr, true, -1, 0, 1, 3, 1e308, -1e308, 0.5, "", "x", "tiny-kjv",
                                    json::array(), json::array({1, 2}), json::object(), json::array({"a"}), 2147483648LL};
  const std::vector<std::string> keys = {"model", "prompt", "messages", "max_tokens", "n", "stop", "temperature", "top_p",
                                         "seed", "logit_bias", "response_format", "stream", "frequency_penalty",
                                         "presence_penalty", "input", "stream_options", "logprobs", "top_logprobs", "echo", "user",
                                         "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "min_tokens",
                                         "guided_json", "guided_choice", "guided_grammar", "grammar", "json_schema",
                                         "content", "tokens", "with_pieces", "add_special", "add_special_tokens"};
  int counts[6] = {};
  for (int i = 0; i < 100000; ++i) {
    json body = {{"model", "tiny-kjv"}, {"max_tokens", 2}};
    const int route = static_cast<int>(rng() % 5);
    if (route == 0 || route == 3) body["prompt"] = "And";
    if (route == 1) body["messages"] = {{{"role", "user"}, {"content", "Hi"}}};
    if (route == 2) body["input"] = "x";
    if (route == 4) body = {{"tokens", {1, 2}}};
    for (int m = 0; m < 1 + static_cast<int>(rng() % 3); ++m) body[keys[rng() % keys.size()]] = values[rng() % values.size()];
    std::string text = body.dump();
    if (rng() % 5 == 0) text[rng() % text.size()] = static_cast<char>(rng() % 256);
    const char *path = route == 0   ? "/v1/completions"
                       : route == 1 ? "/v1/chat/completions"
                       : route == 2 ? "/v1/embeddings"
                       : route == 3 ? "/tokenize"
                                    : "/detokenize";
    auto r = c.Post(path, text, "application/json");
    REQUIRE(r);
    INFO(path << " " << text << " -> " << r->status << " " << r->body.substr(0, 300));
    REQUIRE(r->status < 500);
    ++counts[r->status / 100];
  }
  CHECK(counts[2] > 0);
  CHECK(counts[4] > 0);
}

TEST_CASE("idle sockets do not starve the workers", "[server]") {
  // Idle connections are held for read_timeout_s (30 s here, longer than the test).
  std::string text = manifest();
  text.replace(text.find("read_timeout_s = 2"), 18, "read_timeout_s = 30");
  Fixture f(text);
  std::vector<int> idle;
  for (int i = 0; i < 1000; ++i) {
    const int s = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(s >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(f.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(s, reinterpret_cast<sockaddr *>(&addr), sizeof addr) == 0);
    idle.push_back(s);
  }
  // Once the server has taken them all (each holds a connection thread), a request is served at once.
  const auto accepted_by = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (f.server->connection_threads() < 1000 && std::chrono::steady_clock::now() < accepted_by)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(f.server->connection_threads() >= 1000);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "And God said"}, {"max_tokens", 4}});
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(r);
  CHECK(r->status == 200);
  WARN("a request behind 1,000 idle connections (" << f.server->connection_threads() << " connection threads): " << took * 1000 << " ms");
  // Served, not starved; but not at once on a small machine: cpp-httplib 0.11 waits for a
  // connection's next request by polling it every ~10 ms, so 1,000 idle connections keep about
  // two cores busy (README: not yet event-driven).
  CHECK(took < 5.0);
  for (int s : idle) ::close(s);
}

TEST_CASE("drain: in-flight streams complete, new requests get 503", "[server]") {
  Fixture f;
  std::string body;
  std::thread client([&] {
    auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", {1, 400}}, {"max_tokens", 60}, {"stream", true},
                                        {"logit_bias", {{"1", -100}, {"2", -100}}}});
    if (r) body = r->body;
  });
  while (f.server->in_flight() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::thread drainer([&] { f.server->drain(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto late = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", "x"}, {"max_tokens", 2}});
  if (late) { // (the listener may already be closed)
    CHECK(late->status == 503);
  }
  client.join();
  drainer.join();
  const auto ev = events(body);
  REQUIRE(!ev.empty());
  CHECK(ev.back() == "[DONE]");
  int tokens = 0;
  for (const auto &e : ev)
    if (e != "[DONE]") tokens += 1;
  CHECK(tokens > 1);
}

TEST_CASE("tool calls are read from replies: <tool_call> blocks, bare objects, known tools only", "[server]") {
  using loom::server::parse_tool_calls;
  const std::vector<loom::server::ToolDef> tools = {{"add", "adds", "{}"}, {"get_weather", "weather", "{}"}};
  auto two = parse_tool_calls("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call>\n"
                              "<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Ur\\\"}\"}</tool_call>",
                              tools);
  REQUIRE(two.size() == 2);
  CHECK(two[0].name == "add");
  CHECK(json::parse(two[0].arguments_json) == json{{"a", 1}});
  CHECK(json::parse(two[1].arguments_json) == json{{"city", "Ur"}});
  auto bare = parse_tool_calls(" {\"name\": \"add\", \"parameters\": {\"b\": 2}} ", tools);
  REQUIRE(bare.size() == 1);
  CHECK(json::parse(bare[0].arguments_json) == json{{"b", 2}});
  CHECK(parse_tool_calls("{\"name\": \"rm_rf\", \"arguments\": {}}", tools).empty());
  CHECK(parse_tool_calls("In the beginning God created", tools).empty());
  CHECK(parse_tool_calls("<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>", tools).empty());
}

namespace {

// What a ToolCallStream sent for one reply, joined as a client joins OpenAI's stream.
struct StreamedTools {
  std::string content;
  std::vector<loom::server::ToolCall> calls; // each call's name and its arguments' pieces joined
  std::vector<size_t> call_at;               // the text's length when each call's name went out
  std::vector<std::vector<size_t>> args_at;  // ... and when each piece of its arguments did
  std::vector<size_t> content_at;            // ... and each content piece
};

// Feeds `reply` to a ToolCallStream a few bytes at a time (as tokens come), `safe` all of it but
// the last `unsafe` bytes, then finishes it.
StreamedTools stream_tools(const std::vector<loom::server::ToolDef> &tools, const std::string &reply, size_t step,
                           size_t unsafe, bool reply_is_call = false, size_t max_calls = SIZE_MAX) {
  loom::server::ToolCallStream s(tools, reply_is_call, max_calls);
  StreamedTools out;
  const auto take = [&](const loom::server::ToolCallStream::Piece &p, size_t at) {
    if (!p.content.empty()) out.content_at.push_back(at);
    out.content += p.content;
    for (const auto &d : p.calls) {
      if (d.name) { // a call's first delta: the next number
        REQUIRE(d.index == out.calls.size());
        out.calls.push_back({*d.name, ""});
        out.call_at.push_back(at);
        out.args_at.emplace_back();
      }
      REQUIRE(d.index < out.calls.size());
      out.calls[d.index].arguments_json += d.arguments;
      if (!d.arguments.empty()) out.args_at[d.index].push_back(at);
    }
  };
  for (size_t n = step; n < reply.size(); n += step) {
    const std::string text = reply.substr(0, n);
    take(s.update(text, text.size() > unsafe ? text.size() - unsafe : 0), n);
  }
  take(s.finish(reply), reply.size());
  return out;
}

// The calls a stream joined up to are `whole`'s, name for name and argument text for text.
void check_same_calls(const StreamedTools &got, const std::vector<loom::server::ToolCall> &whole) {
  REQUIRE(got.calls.size() == whole.size());
  for (size_t k = 0; k < whole.size(); ++k) {
    CHECK(got.calls[k].name == whole[k].name);
    CHECK(got.calls[k].arguments_json == whole[k].arguments_json);
  }
}

} // namespace

TEST_CASE("a streamed reply with tools: content as it comes, each call's name then its arguments in pieces, adding up to the whole reply's", "[server]") {
  const std::vector<loom::server::ToolDef> tools = {{"add", "adds", "{}"}, {"get_weather", "weather", "{}"}};
  using Streamed = StreamedTools;
  const auto stream = [&](const std::string &reply, size_t step, size_t unsafe, bool reply_is_call = false) {
    return stream_tools(tools, reply, step, unsafe, reply_is_call);
  };
  const std::string first = "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call>";
  const std::string second = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Ur\"}}</tool_call>";
  // Arguments that compact differently from how they are written: spaces, escapes, numbers.
  const std::string written =
      "<tool_call> {\"name\" : \"get_weather\",\n \"arguments\": { \"city\" : \"Ur \\u00e9 \\\"x\\\" \\/\", \"days\": 1.50,"
      " \"opts\": [true, null, {\"a\": -0, \"b\": 1e2}], \"e\": {} } }\n</tool_call>";
  const std::vector<std::string> replies = {
      "Let me add that.\n" + first + "\n" + second + "\ndone",
      first + second,
      written,
      "In the beginning God created the heaven and the earth. <tool_ca",  // a plain answer ending in half a tag
      "Use <tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call> now", // a block naming no tool: plain
      " {\"name\": \"add\", \"parameters\": {\"b\": 2}}",                    // one bare call object
      "{\"answer\": 42}",                                                     // a bare object that is no call
      "\xEF\xBB\xBF{\"name\": \"add\", \"arguments\": {}}",                      // a bare call after a byte-order mark
      " \n\xEF\xBB\xBF {\"name\": \"add\", \"arguments\": {}}",                 // ... after whitespace too
      "Two blocks, the second unclosed:\n\n" + first + "\n<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 2}}",
      // the arguments as "parameters", as a JSON string, and before the name: whole at the close
      "<tool_call>{\"name\": \"add\", \"parameters\": {\"a\": [1, 2]}}</tool_call>",
      "<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 3}\"}</tool_call>",
      "<tool_call>{\"arguments\": {\"a\": 4}, \"name\": \"add\"}</tool_call>",
  };
  for (const std::string &reply : replies)
    for (const size_t step : {size_t{1}, size_t{3}, size_t{7}})
      for (const size_t unsafe : {size_t{0}, size_t{2}})
        for (const bool reply_is_call : {false, true}) {
          INFO("reply '" << reply << "', " << step << " bytes a step, " << unsafe << " not yet final, reply_is_call "
                         << reply_is_call);
          const auto whole = loom::server::parse_tool_calls(reply, tools);
          const Streamed got = stream(reply, step, unsafe, reply_is_call);
          CHECK(got.content == loom::server::reply_content(reply, whole));
          check_same_calls(got, whole);
        }
  // The first reply: its content before the tag went out before the tag was complete; its first
  // call's name before its arguments were complete, and the call before the second block opened.
  const std::string reply = replies[0];
  const Streamed got = stream(reply, 1, 0);
  CHECK(got.content == "Let me add that.");
  REQUIRE(!got.content_at.empty());
  CHECK(got.content_at.front() < reply.find("<tool_call>"));
  REQUIRE(got.call_at.size() == 2);
  CHECK(got.call_at[0] < reply.find("\"arguments\""));
  REQUIRE(!got.args_at[0].empty());
  CHECK(got.args_at[0].back() <= reply.find("</tool_call>") + std::string("</tool_call>").size());
  CHECK(got.call_at[1] < reply.find(second) + second.size());
  // Arguments stream as they are written: the long ones in several pieces before their block
  // closes (each string and number once complete).
  const Streamed long_args = stream(written, 1, 0);
  REQUIRE(long_args.args_at.size() == 1);
  CHECK(long_args.args_at[0].size() >= 10);
  CHECK(long_args.args_at[0][9] < written.find("</tool_call>"));
  CHECK(long_args.calls[0].arguments_json == R"({"city":"Ur é \"x\" /","days":1.5,"opts":[true,null,{"a":0,"b":100.0}],"e":{}})");
  // A key written twice makes no call (the stream had sent the first value, a parser keeps the
  // last): the name's stays as streamed, as a cut-off call does.
  CHECK(loom::server::parse_tool_calls("<tool_call>{\"name\": \"add\", \"arguments\": {}, \"name\": \"get_weather\"}</tool_call>", tools).empty());
  CHECK(loom::server::parse_tool_calls("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"a\": 2}}</tool_call>", tools).empty());
  CHECK(loom::server::parse_tool_calls("{\"name\": \"add\", \"arguments\": {\"a\": {\"b\": 1}, \"c\": {\"b\": 2}}}", tools).size() == 1);
  // An argument of 8,000 characters streamed a byte at a time: it goes out in pieces as written
  // and joins to the whole response's call.
  std::string long_value;
  for (int i = 0; long_value.size() < 8000; ++i) long_value += "line " + std::to_string(i) + "\\n\\u00e9 ";
  const std::string long_reply = "<tool_call>{\"name\": \"add\", \"arguments\": {\"text\": \"" + long_value + "\"}}</tool_call>";
  const Streamed long_got = stream(long_reply, 1, 0);
  check_same_calls(long_got, loom::server::parse_tool_calls(long_reply, tools));
  CHECK(long_got.args_at[0].size() > 1000);
  // A long string argument streams as it is written, escapes and all, not once it closes.
  const std::string code = "<tool_call>{\"name\": \"add\", \"arguments\": {\"code\": \"def f(x):\\n    return \\\"\\u00e9\\ud834\\udd1e\\\" * x  # ü\"}}</tool_call>";
  const Streamed code_got = stream(code, 1, 0);
  REQUIRE(code_got.args_at.size() == 1);
  CHECK(code_got.args_at[0].size() >= 20);
  CHECK(code_got.args_at[0][19] < code.find("\"}}"));
  CHECK(code_got.calls[0].arguments_json == loom::server::parse_tool_calls(code, tools)[0].arguments_json);
  CHECK(code_got.calls[0].arguments_json == "{\"code\":\"def f(x):\\n    return \\\"é𝄞\\\" * x  # ü\"}");
  // tool_choice required or named: the bare call object streams as a block does; otherwise it is
  // held to the end (it may be a plain answer).
  const std::string bare = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Jerusalem\", \"days\": 3}}";
  const Streamed required = stream(bare, 1, 0, true);
  REQUIRE(required.call_at.size() == 1);
  CHECK(required.call_at[0] < bare.find("\"arguments\""));
  CHECK(required.args_at[0].size() >= 4);
  CHECK(stream(bare, 1, 0, false).call_at == std::vector<size_t>{bare.size()});
  // A plain answer streams as it comes (not all at the end).
  CHECK(stream(replies[3], 1, 0).content_at.size() > 10);
  // parallel_tool_calls false: the first call only, streamed as the whole response keeps it.
  for (const std::string &two : {replies[0], replies[1], replies[9]})
    for (const size_t step : {size_t{1}, size_t{5}}) {
      auto whole = loom::server::parse_tool_calls(two, tools);
      whole.resize(std::min<size_t>(whole.size(), 1));
      const StreamedTools first_only = stream_tools(tools, two, step, 0, false, 1);
      CHECK(first_only.content == loom::server::reply_content(two, whole));
      check_same_calls(first_only, whole);
    }
  // A call cut off inside its arguments (max_tokens) stays as far as it streamed, as OpenAI's
  // stream leaves it; the whole response has no call, and the content adds up all the same.
  const std::string cut = "Checking.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Jer";
  const Streamed cut_got = stream(cut, 1, 0);
  CHECK(loom::server::parse_tool_calls(cut, tools).empty());
  REQUIRE(cut_got.calls.size() == 1);
  CHECK(cut_got.calls[0].name == "get_weather");
  CHECK(cut_got.calls[0].arguments_json == "{\"city\":\"Je"); // a string streams before its closing quote
  CHECK(cut_got.content == loom::server::reply_content(cut, {}));
  // A string value that turns out invalid (a bad escape) after pieces of it went out: nothing
  // more of that call goes out (its later keys neither), and the whole response has no call.
  const std::string broken = "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": \"abc\\x\", \"b\": 1}}</tool_call>";
  CHECK(loom::server::parse_tool_calls(broken, tools).empty());
  for (const size_t step : {size_t{1}, size_t{4}}) {
    const Streamed broken_got = stream(broken, step, 0);
    REQUIRE(broken_got.calls.size() == 1);
    CHECK(broken_got.calls[0].arguments_json.starts_with("{\"a\":\""));
    CHECK(std::string("{\"a\":\"abc").starts_with(broken_got.calls[0].arguments_json));
  }
}

TEST_CASE("streamed tool calls over random replies: valid ones add up exactly, cut ones differ only by the cut call", "[server]") {
  const std::vector<loom::server::ToolDef> tools = {{"add", "adds", "{}"}, {"get_weather", "weather", "{}"}};
  std::mt19937 rng(20261129);
  const auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  const std::vector<std::string> words = {"a", "é", "\"q\"", "back\\slash", "tab\t", "<b>", "</b>", "{", "}", "ü€𝄞", ""};
  std::function<json(int)> value = [&](int depth) -> json {
    switch (pick(depth > 2 ? 5 : 7)) {
      case 0: return static_cast<int64_t>(rng() % 2001) - 1000;
      case 1: return static_cast<double>(rng() % 100000) / 64.0 - 700.0;
      case 2: return words[pick(words.size())];
      case 3: return pick(2) == 0;
      case 4: return nullptr;
      case 5: {
        json a = json::array();
        for (size_t i = pick(4); i > 0; --i) a.push_back(value(depth + 1));
        return a;
      }
      default: {
        json o = json::object();
        for (size_t i = pick(4); i > 0; --i) o[std::string(words[pick(words.size())]).append(std::to_string(i))] = value(depth + 1);
        return o;
      }
    }
  };
  for (int r = 0; r < 2000; ++r) {
    std::string reply = pick(2) == 0 ? "Let me look that up. " : "";
    const size_t n_calls = 1 + pick(3);
    for (size_t k = 0; k < n_calls; ++k) {
      json args = json::object();
      for (size_t i = pick(4); i > 0; --i) args[std::string(1, 'k').append(std::to_string(i))] = value(0);
      const json call = {{"name", pick(2) == 0 ? "add" : "get_weather"}, {"arguments", args}};
      const int indent = static_cast<int>(pick(3)) - 1; // compact, or spread over lines
      reply += "<tool_call>" + std::string(pick(2), '\n') + call.dump(indent, ' ', pick(2) == 0) /* ASCII only: non-ASCII escaped */ + "</tool_call>" + std::string(pick(2), '\n');
    }
    const auto whole = loom::server::parse_tool_calls(reply, tools);
    REQUIRE(whole.size() == n_calls);
    // Cut anywhere (max_tokens): the calls before the cut block add up, that one at most differs.
    const std::string cut = reply.substr(0, pick(reply.size() + 1));
    const auto cut_whole = loom::server::parse_tool_calls(cut, tools);
    for (const size_t step : {size_t{1}, size_t{1} + pick(9)}) {
      const size_t unsafe = pick(3);
      INFO("reply '" << reply << "', cut at " << cut.size() << ", " << step << " bytes a step, " << unsafe << " not yet final");
      const StreamedTools got = stream_tools(tools, reply, step, unsafe);
      CHECK(got.content == loom::server::reply_content(reply, whole));
      check_same_calls(got, whole);
      const StreamedTools cut_got = stream_tools(tools, cut, step, unsafe);
      CHECK(cut_got.content == loom::server::reply_content(cut, cut_whole));
      REQUIRE(cut_got.calls.size() >= cut_whole.size());
      CHECK(cut_got.calls.size() <= cut_whole.size() + 1);
      for (size_t k = 0; k < cut_whole.size(); ++k) {
        CHECK(cut_got.calls[k].name == cut_whole[k].name);
        CHECK(cut_got.calls[k].arguments_json == cut_whole[k].arguments_json);
      }
      if (cut_got.calls.size() > cut_whole.size()) { // the cut call: what went out begins the whole call's compact text
        const size_t k = cut_whole.size();
        CHECK(cut_got.calls[k].name == whole[k].name);
        CHECK(whole[k].arguments_json.starts_with(cut_got.calls[k].arguments_json));
      }
    }
  }
}

TEST_CASE("chat with tools: required and named choices give tool_calls that fit the schemas", "[server]") {
  Fixture f;
  const json tools = json::array(
      {{{"type", "function"},
        {"function", {{"name", "get_weather"}, {"description", "the weather in a city"},
                      {"parameters", {{"type", "object"}, {"properties", {{"city", {{"type", "string"}, {"maxLength", 16}}}}}, {"required", {"city"}}}}}}},
       {{"type", "function"},
        {"function", {{"name", "add"}, {"description", "adds two numbers"},
                      {"parameters", {{"type", "object"}, {"properties", {{"a", {{"type", "integer"}}}, {"b", {{"type", "integer"}}}}}, {"required", {"a", "b"}}}}}}}});
  const json messages = json::array({{{"role", "user"}, {"content", "What is the weather in Jerusalem?"}}});
  int calls = 0;
  for (int seed = 0; seed < 4; ++seed) {
    auto r = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", messages}, {"tools", tools}, {"tool_choice", "required"},
                                             {"max_tokens", 96}, {"seed", seed}});
    REQUIRE(r->status == 200);
    const json j = json::parse(r->body);
    INFO(j.dump());
    if (j["choices"][0]["finish_reason"] == "length") continue; // cut inside a number
    CHECK(j["choices"][0]["finish_reason"] == "tool_calls");
    const json &call = j["choices"][0]["message"]["tool_calls"][0];
    CHECK(call["type"] == "function");
    CHECK(j["choices"][0]["message"]["content"].is_null());
    const std::string name = call["function"]["name"];
    const json args = json::parse(call["function"]["arguments"].get<std::string>());
    if (name == "get_weather") CHECK(args["city"].get<std::string>().size() <= 16);
    else CHECK((name == "add" && args["a"].is_number_integer() && args["b"].is_number_integer()));
    ++calls;
  }
  CHECK(calls >= 1);
  const json named = {{"type", "function"}, {"function", {{"name", "add"}}}};
  auto r = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", messages}, {"tools", tools}, {"tool_choice", named},
                                           {"max_tokens", 96}, {"seed", 1}, {"stream", true}});
  // Streamed as OpenAI streams a call: id, type and name in its first delta, then the arguments
  // in pieces, which join to the call's JSON arguments.
  const auto join_calls = [](const std::vector<json> &choices) {
    json joined = json::array();
    for (const json &ch : choices) {
      if (!ch["delta"].contains("tool_calls")) continue;
      for (const json &d : ch["delta"]["tool_calls"]) {
        const size_t k = d["index"].get<size_t>();
        if (d.contains("id")) {
          REQUIRE(k == joined.size());
          CHECK(d["type"] == "function");
          joined.push_back({{"id", d["id"]}, {"name", d["function"]["name"]}, {"arguments", ""}, {"pieces", 0}});
        }
        REQUIRE(k < joined.size());
        joined[k]["arguments"] = joined[k]["arguments"].get<std::string>() + d["function"]["arguments"].get<std::string>();
        joined[k]["pieces"] = joined[k]["pieces"].get<int>() + 1;
      }
    }
    return joined;
  };
  // A reply made to hold two calls (guided_regex, tool_choice auto): both come back, whole and
  // streamed; with parallel_tool_calls false only the first, whole and streamed. A non-boolean
  // parallel_tool_calls is a 400 naming it.
  const std::string two_calls = R"(<tool_call>\{"name": "add", "arguments": \{"a": 1\}\}</tool_call>\n)"
                                R"(<tool_call>\{"name": "get_weather", "arguments": \{"city": "Ur"\}\}</tool_call>)";
  for (const bool parallel : {true, false}) {
    json two_req = {{"model", "tiny-kjv"}, {"messages", messages}, {"tools", tools}, {"guided_regex", two_calls},
                    {"parallel_tool_calls", parallel}, {"max_tokens", 160}};
    const json whole_two = f.ok("/v1/chat/completions", two_req);
    INFO(whole_two.dump());
    const json &got = whole_two["choices"][0]["message"]["tool_calls"];
    REQUIRE(got.size() == (parallel ? 2u : 1u));
    CHECK(got[0]["function"]["name"] == "add");
    CHECK(got[0]["function"]["arguments"] == "{\"a\":1}");
    if (parallel) CHECK(got[1]["function"]["arguments"] == "{\"city\":\"Ur\"}");
    two_req["stream"] = true;
    auto streamed_two = f.post("/v1/chat/completions", two_req);
    REQUIRE(streamed_two->status == 200);
    const json joined_two = join_calls(streamed_choices(streamed_two->body));
    REQUIRE(joined_two.size() == got.size());
    for (size_t k = 0; k < got.size(); ++k) {
      CHECK(joined_two[k]["name"] == got[k]["function"]["name"]);
      CHECK(joined_two[k]["arguments"] == got[k]["function"]["arguments"]);
    }
  }
  auto not_bool = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", messages}, {"tools", tools},
                                                  {"parallel_tool_calls", "no"}, {"max_tokens", 4}});
  REQUIRE(not_bool->status == 400);
  CHECK(json::parse(not_bool->body)["error"]["param"] == "parallel_tool_calls");
  const std::vector<json> named_choices = streamed_choices(r->body);
  REQUIRE(!named_choices.empty());
  const json named_calls = join_calls(named_choices);
  if (named_choices.back()["finish_reason"] == "tool_calls") {
    REQUIRE(named_calls.size() == 1);
    CHECK(named_calls[0]["name"] == "add");
    const json args = json::parse(named_calls[0]["arguments"].get<std::string>());
    CHECK((args["a"].is_number_integer() && args["b"].is_number_integer()));
    CHECK(named_calls[0]["pieces"].get<int>() > 2);  // not all at the end
  } else {
    CHECK(named_choices.back()["finish_reason"] == "length");
  }
  // tool_choice auto: the reply streams as it comes (it used to be held to the end), and adds up
  // to the whole response's content, call or not.
  json auto_req = {{"model", "tiny-kjv"}, {"messages", messages}, {"tools", tools}, {"max_tokens", 24}, {"min_tokens", 20}, {"temperature", 0}};
  const json whole_body = f.ok("/v1/chat/completions", auto_req);
  auto_req["stream"] = true;
  auto live = f.post("/v1/chat/completions", auto_req);
  REQUIRE(live);
  REQUIRE(live->status == 200);
  std::string content;
  int content_chunks = 0;
  const std::vector<json> live_choices = streamed_choices(live->body);
  for (const json &ch : live_choices)
    if (ch["delta"].contains("content") && ch["delta"]["content"].is_string() && !ch["delta"]["content"].get<std::string>().empty()) {
      content += ch["delta"]["content"].get<std::string>();
      ++content_chunks;
    }
  const json live_calls = join_calls(live_choices);
  const json &message = whole_body["choices"][0]["message"];
  INFO(whole_body.dump());
  CHECK(content == (message["content"].is_null() ? std::string() : message["content"].get<std::string>()));
  const json whole_calls = message.contains("tool_calls") ? message["tool_calls"] : json::array();
  REQUIRE(live_calls.size() == whole_calls.size());
  for (size_t k = 0; k < whole_calls.size(); ++k) {
    CHECK(live_calls[k]["id"] == whole_calls[k]["id"]);
    CHECK(live_calls[k]["name"] == whole_calls[k]["function"]["name"]);
    CHECK(live_calls[k]["arguments"] == whole_calls[k]["function"]["arguments"]);
  }
  if (!message.contains("tool_calls")) CHECK(content_chunks > 1);
  // A conversation that already called a tool and holds its result; tool_choice none.
  const json history = json::array(
      {{{"role", "user"}, {"content", "Add 2 and 3."}},
       {{"role", "assistant"}, {"content", nullptr},
        {"tool_calls", {{{"id", "c1"}, {"type", "function"}, {"function", {{"name", "add"}, {"arguments", "{\"a\":2,\"b\":3}"}}}}}}},
       {{"role", "tool"}, {"tool_call_id", "c1"}, {"content", "5"}}});
  auto after = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", history}, {"tools", tools}, {"tool_choice", "none"}, {"max_tokens", 8}});
  CHECK(after->status == 200);
  CHECK(json::parse(after->body)["choices"][0]["message"]["content"].is_string());
  // Bad tool definitions are 400s naming them.
  auto bad = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", messages}, {"tool_choice", "required"}});
  CHECK(bad->status == 400);
  auto bad_name = f.post("/v1/chat/completions", {{"model", "tiny-kjv"}, {"messages", messages},
                                                  {"tools", {{{"type", "function"}, {"function", {{"name", "no spaces"}}}}}}});
  CHECK(bad_name->status == 400);
  CHECK(json::parse(bad_name->body)["error"]["param"] == "tools[0].function.name");
}

TEST_CASE("100 hot swaps under 32 streaming clients fail no request", "[server][swap]") {
  // Attention, quantizer, adapter and sampler swaps through the admin route, among them swaps
  // to a rebuilt copy of the samplers' library.
  std::string text = manifest("admin_key = \"admin-key-123\"\nmax_queue = 64\n", "max_seqs = 32\nmax_batched_tokens = 512");
  text += "[quantizer]\nuse = \"int8\"\n[[adapter]]\nuse = \"lora\"\nr = 2\n";
  Fixture f(text);
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("loom-swap-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::filesystem::path lib = dir / "libloom-samplers-rebuilt.so";
  const auto rebuild = [&] { // a new file at the same path, as a linker writes its output
    std::filesystem::copy_file(std::string(LOOM_BUILTIN_PLUGIN_DIR) + "/libloom-samplers.so", dir / "tmp.so",
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::rename(dir / "tmp.so", lib);
    std::filesystem::last_write_time(lib, std::filesystem::file_time_type::clock::now());
  };
  rebuild();

  std::atomic<int> phase{0}; // 0: no swaps, 1: swapping, 2: stop
  std::atomic<int> requests{0}, failures{0};
  std::mutex gaps_mutex;
  std::vector<double> gaps[2];
  std::vector<std::thread> clients;
  for (int i = 0; i < 32; ++i)
    clients.emplace_back([&, i] {
      while (phase.load() < 2) {
        const int at = phase.load();
        httplib::Client c = f.client();
        httplib::Request req;
        req.method = "POST";
        req.path = "/v1/chat/completions";
        req.set_header("Content-Type", "application/json");
        req.body = json{{"model", "tiny-kjv"}, {"messages", {{{"role", "user"}, {"content", "Verse " + std::to_string(i)}}}},
                        {"max_tokens", 24}, {"stream", true}}.dump();
        std::string body;
        std::vector<double> mine;
        auto last = std::chrono::steady_clock::now();
        bool first = true;
        req.content_receiver = [&](const char *data, size_t n, uint64_t, uint64_t) {
          const auto now = std::chrono::steady_clock::now();
          if (!first) mine.push_back(std::chrono::duration<double>(now - last).count());
          first = false;
          last = now;
          body.append(data, n);
          return true;
        };
        auto res = c.send(req);
        ++requests;
        if (!res || res->status != 200 || body.find("data: [DONE]") == std::string::npos || body.find("\"error\"") != std::string::npos)
          ++failures;
        std::lock_guard lock(gaps_mutex);
        gaps[at].insert(gaps[at].end(), mine.begin(), mine.end());
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  phase = 1;
  const httplib::Headers admin = {{"Authorization", "Bearer admin-key-123"}};
  int swapped = 0;
  for (int s = 0; s < 100; ++s) {
    json swap;
    switch (s % 5) {
    case 0: swap = {{"slot", "sampler[0]"}, {"component", "use = \"temperature\"\nt = " + std::to_string(0.5 + 0.01 * s)}}; break;
    case 1: swap = {{"slot", "attention"}, {"component", "use = \"sdpa\"\nblock_size = 8"}}; break;
    case 2: swap = {{"slot", "quantizer"}, {"component", "use = \"int8\""}}; break;
    case 3: swap = {{"slot", "adapter[0]"}, {"component", "use = \"lora\"\nr = 2"}}; break;
    default:
      if (s % 10 == 9) rebuild();
      swap = {{"slot", "sampler[1]"}, {"component", "use = \"top-k\"\nk = 40\nlibrary = \"" + lib.string() + "\""}};
    }
    auto r = f.post("/admin/swap", swap, admin);
    REQUIRE(r);
    INFO(swap.dump() << " -> " << r->body);
    CHECK(r->status == 200);
    swapped += r->status == 200;
  }
  const int during = requests.load();
  phase = 2;
  for (auto &t : clients) t.join();
  std::filesystem::remove_all(dir);
  CHECK(swapped == 100);
  CHECK(failures == 0);
  const auto p99 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[std::min(v.size() - 1, v.size() * 99 / 100)];
  };
  WARN("hot swap under 32 streaming clients: " << requests.load() << " requests (" << during << " before the swaps ended), "
       << failures.load() << " failed; inter-token p99 " << p99(gaps[0]) * 1000 << " ms without swaps, "
       << p99(gaps[1]) * 1000 << " ms with 100 swaps");
  CHECK(!gaps[0].empty());
  CHECK(!gaps[1].empty());
}

TEST_CASE("a request past request_timeout_s ends with what it has", "[server]") {
  Fixture f(manifest("request_timeout_s = 0.05\n"));
  const auto t0 = std::chrono::steady_clock::now();
  auto r = f.post("/v1/completions", {{"model", "tiny-kjv"}, {"prompt", {1, 400}}, {"max_tokens", 500}, {"logit_bias", {{"1", -100}, {"2", -100}}}});
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(r->status == 200);
  const json j = json::parse(r->body);
  CHECK(j["choices"][0]["finish_reason"] == "length");
  CHECK(j["usage"]["completion_tokens"].get<int>() < 500);
  CHECK(took < 1.0);
  CHECK(f.server->in_flight() == 0);
}

TEST_CASE("/ready answers 503 until the warm-up request has run", "[server]") {
  auto runtime = Runtime::from_string(manifest(), "server_test.toml");
  Server server(*runtime, nullptr, runtime->manifest().server);
  int port = 0;
  {
    // The engine cannot take a step while the step lock is held: the warm-up waits.
    auto hold = runtime->pipeline().begin_step();
    port = server.start();
    httplib::Client c("127.0.0.1", port);
    int status = 0;
    std::string body;
    for (int i = 0; i < 200 && status == 0; ++i) {
      if (auto ready = c.Get("/ready")) {
        status = ready->status;
        body = ready->body;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
    CHECK(status == 503);
    CHECK(json::parse(body)["status"] == "warming up");
    CHECK(c.Get("/health")->status == 200);
  }
  CHECK(server.wait_ready(30));
  httplib::Client c("127.0.0.1", port);
  CHECK(c.Get("/ready")->status == 200);
  CHECK(c.Post("/v1/embeddings", "{\"model\": \"tiny-kjv\", \"input\": \"x\"}", "application/json")->status == 404);
}

TEST_CASE("with a drafter, completions are those without; /metrics counts the drafts", "[server][speculative]") {
  // Prompt lookup on prompts that repeat themselves, greedy and seeded sampling: the server's
  // answers must not change, and the drafts show in /metrics.
  Fixture plain;
  std::string text = manifest();
  text.append("[drafter]\nuse = \"ngram\"\n");
  Fixture drafted(text);
  const std::vector<std::string> prompts = {"The LORD is my shepherd; I shall not want. The LORD is my shepherd;",
                                            "Let there be light: and there was light. Let there be light:", "And God said"};
  for (const std::string &p : prompts)
    for (const json &sampling : {json{{"temperature", 0}}, json{{"temperature", 0.9}, {"top_p", 0.95}, {"seed", 5}}}) {
      INFO(p << " " << sampling.dump());
      json body = {{"model", "tiny-kjv"}, {"prompt", p}, {"max_tokens", 40}};
      body.update(sampling);
      auto a = plain.post("/v1/completions", body), b = drafted.post("/v1/completions", body);
      REQUIRE(a);
      REQUIRE(b);
      REQUIRE(a->status == 200);
      REQUIRE(b->status == 200);
      CHECK(json::parse(a->body)["choices"][0]["text"] == json::parse(b->body)["choices"][0]["text"]);
    }
  CHECK(metric(drafted, "loom_speculative_drafted_tokens_total") > 0);
  CHECK(metric(drafted, "loom_speculative_accepted_tokens_total") > 0);
  CHECK(metric(plain, "loom_speculative_drafted_tokens_total") == 0);
}
