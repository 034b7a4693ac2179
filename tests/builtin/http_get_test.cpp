// libloom-tool-http: the http_get tool against a local server on 127.0.0.1 (cpp-httplib). The
// server counts its requests, so a refusal is checked to have sent nothing:
//   - fetches from an allowed host and network: text, content type, relative redirects, HTTP
//     errors as tool errors, the size cap, timeouts;
//   - refusals: a host not on the allow-list; 40 spellings of loopback, private, link-local,
//     metadata, mapped and otherwise non-public addresses, other schemes and user info, with
//     every port pointing at the live server; redirects from the allowed server to loopback
//     (127.0.0.2, [::1], a decimal spelling) and past the redirect limit;
//   - arguments: unknown keys, missing url, not JSON; parameters: bad allow-list entries and
//     networks, by key.
#include <catch2/catch.hpp>

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "builtin_test_util.hpp"

namespace {

struct LocalServer {
  httplib::Server server;
  std::thread thread;
  int port = 0;
  std::atomic<int> hits{0};

  LocalServer() {
    server.set_pre_routing_handler([this](const httplib::Request &, httplib::Response &) {
      ++hits;
      return httplib::Server::HandlerResponse::Unhandled;
    });
    server.Get("/hello", [](const httplib::Request &, httplib::Response &res) { res.set_content("hello, world", "text/plain"); });
    server.Get("/big", [](const httplib::Request &, httplib::Response &res) { res.set_content(std::string(300000, 'x'), "text/plain"); });
    server.Get("/binary", [](const httplib::Request &, httplib::Response &res) {
      res.set_content(std::string("ok \xff\xfe end", 9), "application/octet-stream");
    });
    server.Get("/missing", [](const httplib::Request &, httplib::Response &res) {
      res.status = 404;
      res.set_content("no such page", "text/plain");
    });
    server.Get("/slow", [](const httplib::Request &, httplib::Response &res) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      res.set_content("late", "text/plain");
    });
    server.Get("/relative", [](const httplib::Request &, httplib::Response &res) { res.set_redirect("/hello"); });
    server.Get("/loop", [](const httplib::Request &, httplib::Response &res) { res.set_redirect("/loop"); });
    server.Get("/to", [this](const httplib::Request &req, httplib::Response &res) {
      const std::string target = req.get_param_value("host");
      res.set_redirect("http://" + target + ":" + std::to_string(port) + "/hello");
    });
    port = server.bind_to_any_port("127.0.0.1");
    thread = std::thread([this] { server.listen_after_bind(); });
    while (!server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~LocalServer() {
    server.stop();
    thread.join();
  }
  std::string url(const std::string &path) const { return "http://127.0.0.1:" + std::to_string(port) + path; }
};

struct Tool {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *inst;
  const loom_tool_vtable *vt;

  explicit Tool(const std::string &params) : rt(bt::runtime("[[tool]]\nuse = \"http_get\"\n" + params)) {
    inst = &rt->pipeline().at("tool[0]");
    vt = inst->vtable<loom_tool_vtable>();
  }
  struct Out {
    loom_status status;
    std::string text;
    bool is_error;
  };
  Out call(const std::string &arguments) {
    loom::HostBuffer buffer;
    loom_tool_result r{sizeof(loom_tool_result), buffer.abi(), 0};
    const loom_status s = vt->call(inst->handle(), "http_get", arguments.c_str(), &r);
    return {s, std::string(buffer.view()), r.is_error != 0};
  }
  Out get(const std::string &url) { return call(nlohmann_free_json(url)); }
  static std::string nlohmann_free_json(const std::string &url) {
    std::string quoted = "\"";
    for (char c : url) {
      if (c == '"' || c == '\\') quoted += '\\';
      quoted += c;
    }
    return "{\"url\": " + quoted + "\"}";
  }
};

const std::string kLocal = "allowed_hosts = [\"127.0.0.1\"]\nallowed_networks = [\"127.0.0.1/32\"]\n";

}  // namespace

TEST_CASE("http_get fetches from an allowed host: text, redirects, errors, caps, timeouts", "[http]") {
  LocalServer server;
  Tool tool(kLocal + "max_bytes = 100000\ntimeout_s = 0.5\n");
  auto ok = tool.get(server.url("/hello"));
  REQUIRE(ok.status == LOOM_OK);
  CHECK_FALSE(ok.is_error);
  CHECK(ok.text.rfind("HTTP 200 " + server.url("/hello") + " (text/plain)", 0) == 0);
  CHECK(ok.text.find("\n\nhello, world") != std::string::npos);
  auto relative = tool.get(server.url("/relative"));
  CHECK_FALSE(relative.is_error);
  CHECK(relative.text.find("HTTP 200 " + server.url("/hello")) == 0);
  auto missing = tool.get(server.url("/missing"));
  CHECK(missing.status == LOOM_OK);
  CHECK(missing.is_error);  // an HTTP error status is the tool's error, with the body
  CHECK(missing.text.find("HTTP 404") == 0);
  CHECK(missing.text.find("no such page") != std::string::npos);
  auto big = tool.get(server.url("/big"));
  CHECK_FALSE(big.is_error);
  CHECK(big.text.find("[cut off at 100000 bytes]") != std::string::npos);
  CHECK(big.text.size() < 100200);
  auto binary = tool.get(server.url("/binary"));
  CHECK(binary.text.find("ok \xEF\xBF\xBD\xEF\xBF\xBD end") != std::string::npos);  // invalid UTF-8 replaced
  const auto start = std::chrono::steady_clock::now();
  auto slow = tool.get(server.url("/slow"));
  CHECK(slow.is_error);
  CHECK(slow.text.find("fetch failed") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::milliseconds(1400));
  auto loop = tool.get(server.url("/loop"));
  CHECK(loop.is_error);
  CHECK(loop.text.find("more than 5 redirects") != std::string::npos);
}

TEST_CASE("http_get refuses hosts off the allow-list and 40 SSRF spellings, sending nothing", "[http][ssrf]") {
  LocalServer server;
  const std::string p = std::to_string(server.port);
  SECTION("a host not on the allow-list") {
    Tool tool("allowed_hosts = [\"docs.example.org\", \"*.example.com\"]\nallowed_networks = [\"127.0.0.1/32\"]\n");
    for (const std::string &url : std::vector<std::string>{server.url("/hello"), "http://example.org/", "http://evil.com/", "http://example.com.evil.net/",
                                  "http://notexample.com/"}) {
      INFO(url);
      auto r = tool.get(url);
      CHECK(r.status == LOOM_OK);
      CHECK(r.is_error);
      CHECK(r.text.find("is not on the allow-list") != std::string::npos);
    }
    CHECK(server.hits == 0);
  }
  SECTION("non-public addresses in every spelling, with any host allowed") {
    Tool tool("allowed_hosts = [\"*\"]\n");
    const std::vector<std::string> spellings = {
        "http://127.0.0.1:" + p + "/hello",
        "http://localhost:" + p + "/hello",
        "http://LOCALHOST:" + p + "/hello",
        "http://localhost.:" + p + "/hello",
        "http://2130706433:" + p + "/hello",                 // decimal
        "http://0x7f000001:" + p + "/hello",                 // hex
        "http://017700000001:" + p + "/hello",               // octal
        "http://0177.0.0.1:" + p + "/hello",                 // dotted octal
        "http://0x7f.0.0.1:" + p + "/hello",                 // dotted hex
        "http://0x7f.1:" + p + "/hello",
        "http://127.1:" + p + "/hello",                      // short form
        "http://127.0.1:" + p + "/hello",
        "http://127.000.000.001:" + p + "/hello",
        "http://127.255.255.254:" + p + "/hello",
        "http://[::1]:" + p + "/hello",
        "http://[0:0:0:0:0:0:0:1]:" + p + "/hello",
        "http://[::ffff:127.0.0.1]:" + p + "/hello",         // IPv4-mapped
        "http://[::ffff:7f00:1]:" + p + "/hello",
        "http://[0:0:0:0:0:ffff:127.0.0.1]:" + p + "/hello",
        "http://[::127.0.0.1]:" + p + "/hello",              // IPv4-compatible
        "http://[64:ff9b::127.0.0.1]:" + p + "/hello",       // NAT64
        "http://[2002:7f00:1::1]:" + p + "/hello",           // 6to4
        "http://0.0.0.0:" + p + "/hello",
        "http://0:" + p + "/hello",
        "http://[::]:" + p + "/hello",
        "http://10.0.0.1:" + p + "/",
        "http://172.16.0.1:" + p + "/",
        "http://192.168.0.1:" + p + "/",
        "http://169.254.169.254/latest/meta-data/",          // cloud metadata
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fe80::1]:" + p + "/",
        "http://[fc00::1]:" + p + "/",
        "http://100.64.0.1:" + p + "/",
        "http://224.0.0.1:" + p + "/",
        "http://255.255.255.255:" + p + "/",
        "http://user:pass@127.0.0.1:" + p + "/hello",        // user info
        "http://example.com@127.0.0.1:" + p + "/hello",
        "https://127.0.0.1:" + p + "/hello",
        "file:///etc/passwd",
        "ftp://127.0.0.1:" + p + "/",
        "gopher://127.0.0.1:" + p + "/",
        "dict://127.0.0.1:" + p + "/",
    };
    REQUIRE(spellings.size() >= 40);
    for (const auto &url : spellings) {
      INFO(url);
      auto r = tool.get(url);
      INFO(r.text);
      CHECK(r.status == LOOM_OK);
      CHECK(r.is_error);
      CHECK(r.text.rfind("error: refused: ", 0) == 0);
    }
    CHECK(server.hits == 0);
  }
  SECTION("redirects from an allowed server to loopback are re-checked and refused") {
    Tool tool(kLocal);
    for (const std::string target : {"127.0.0.2", "[::1]", "2130706434", "localhost", "0x7f.2"}) {
      INFO(target);
      auto r = tool.get(server.url("/to?host=" + target));
      INFO(r.text);
      CHECK(r.is_error);
      CHECK(r.text.find("error: refused: redirect 1 to") == 0);
    }
    CHECK(server.hits == 5);  // each first hop only
    auto fine = tool.get(server.url("/to?host=127.0.0.1"));
    CHECK_FALSE(fine.is_error);
  }
}

TEST_CASE("http_get: bad arguments are tool errors; bad parameters name their key", "[http]") {
  Tool tool(kLocal);
  for (const std::string args : {"{}", "{\"url\": 3}", "not json", "[1]", "{\"url\": \"http://127.0.0.1/\", \"method\": \"POST\"}"}) {
    INFO(args);
    auto r = tool.call(args);
    CHECK(r.status == LOOM_OK);
    CHECK(r.is_error);
  }
  loom::HostBuffer buffer;
  loom_tool_result result{sizeof(loom_tool_result), buffer.abi(), 0};
  CHECK(tool.vt->call(tool.inst->handle(), "http_post", "{}", &result) == LOOM_ERR_NOT_FOUND);
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\n"), Catch::Contains("allowed_hosts"));
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\nallowed_hosts = []\n"), Catch::Contains("allowed_hosts"));
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\nallowed_hosts = [\"a.com/x\"]\n"), Catch::Contains("allowed_hosts"));
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\nallowed_hosts = [\"*evil\"]\n"), Catch::Contains("allowed_hosts"));
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\nallowed_hosts = [\"*\"]\nallowed_networks = [\"10.0.0.0/33\"]\n"),
                    Catch::Contains("allowed_networks"));
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\nallowed_hosts = [\"*\"]\nallowed_networks = [\"intranet\"]\n"),
                    Catch::Contains("allowed_networks"));
  CHECK_THROWS_WITH(bt::runtime("[[tool]]\nuse = \"http_get\"\nallowed_hosts = [\"*\"]\nmax_bytes = 0\n"), Catch::Contains("max_bytes"));
}
