// Tool component `http_get`: offers one tool, "http_get", that fetches a URL over http or https
// with the guards of fetch.hpp (allow-listed hosts, no private or loopback addresses unless an
// allowed network holds them, the connection pinned to the checked address, every redirect
// re-checked, timeouts, a size cap). A refused or failed fetch, or an HTTP error status, is a
// tool error (is_error = 1) whose content says why, so the model can react; the body is
// returned as text with invalid UTF-8 replaced, and the caller treats it as untrusted.
// Concurrent calls are safe (one curl handle each; the policy is read-only after create).
#include <curl/curl.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "fetch.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "loom_tool_glue.hpp"

namespace loomp::http {
namespace {

constexpr const char *kToolDescription =
    "Fetches a web page or file by URL (http or https, GET) and returns its text. Only allow-listed hosts; "
    "large responses are cut off.";
constexpr const char *kToolSchema =
    R"({"type":"object","properties":{"url":{"type":"string","description":"an http:// or https:// URL"}},"required":["url"],"additionalProperties":false})";

// Valid UTF-8 stays; any other byte becomes U+FFFD, so that the text handed on is well formed.
std::string valid_utf8(const std::string &in) {
  std::string out;
  out.reserve(in.size());
  const auto *s = reinterpret_cast<const unsigned char *>(in.data());
  size_t i = 0;
  while (i < in.size()) {
    const unsigned char c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = n > 0 && i + n <= in.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (s[i + k] & 0xc0) == 0x80;
    if (ok && n == 2) ok = c >= 0xc2;                                           // overlong
    if (ok && n == 3) ok = !(c == 0xe0 && s[i + 1] < 0xa0) && !(c == 0xed && s[i + 1] >= 0xa0);  // overlong, surrogates
    if (ok && n == 4) ok = !(c == 0xf0 && s[i + 1] < 0x90) && !(c == 0xf4 && s[i + 1] >= 0x90) && c <= 0xf4;
    if (ok) {
      out.append(in, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

struct HttpGet {
  static constexpr const char *kName = "http_get", *kDescription = kToolDescription, *kInputSchema = kToolSchema;
  const loom_host_api *host;
  loom_host_ctx *ctx;
  FetchPolicy policy;

  HttpGet(const loom_host_api *h, loom_host_ctx *c) : host(h), ctx(c) {
    static std::once_flag curl_ready;
    std::call_once(curl_ready, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
    for (std::string name : cfg_string_array(h, c, "allowed_hosts")) {
      for (char &ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (name.empty() || name.find_first_of("/:@ ") != std::string::npos || (name.find('*') != std::string::npos && name != "*" &&
                                                                                (name.rfind("*.", 0) != 0 || name.find('*', 1) != std::string::npos)))
        invalid_param("allowed_hosts", "http_get: allowed_hosts entry '" + name +
                                           "' must be a host name, \"*.example.com\" (its subdomains) or \"*\" (any host)");
      policy.allowed_hosts.push_back(name);
    }
    if (policy.allowed_hosts.empty())
      invalid_param("allowed_hosts", "http_get: allowed_hosts is empty: name the hosts the tool may fetch (\"*\" for any)");
    for (const std::string &n : cfg_string_array(h, c, "allowed_networks")) {
      try {
        policy.allowed_networks.push_back(parse_network(n));
      } catch (const std::invalid_argument &e) {
        invalid_param("allowed_networks", std::string("http_get: allowed_networks: ") + e.what());
      }
    }
    const auto seconds = [&](const char *key, double lo, double hi) {
      const double v = cfg_float(h, c, key);
      if (!(v >= lo && v <= hi))
        invalid_param(key, "http_get: " + std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
      return static_cast<long>(v * 1000.0);
    };
    policy.timeout_ms = seconds("timeout_s", 0.001, 3600);
    policy.connect_timeout_ms = seconds("connect_timeout_s", 0.001, 3600);
    const int64_t max_bytes = cfg_int(h, c, "max_bytes");
    if (max_bytes < 1 || max_bytes > (int64_t{1} << 30)) invalid_param("max_bytes", "http_get: max_bytes must be in [1, 2^30]");
    policy.max_bytes = static_cast<uint64_t>(max_bytes);
    const int64_t redirects = cfg_int(h, c, "max_redirects");
    if (redirects < 0 || redirects > 20) invalid_param("max_redirects", "http_get: max_redirects must be in [0, 20]");
    policy.max_redirects = static_cast<int>(redirects);
  }

  // {content, is_error}
  std::pair<std::string, bool> run(const char *arguments_json) const {
    if (arguments_json == nullptr) return {"error: arguments are missing", true};
    const nlohmann::json args = nlohmann::json::parse(arguments_json, nullptr, false);
    if (args.is_discarded() || !args.is_object()) return {"error: arguments must be a JSON object", true};
    const auto url = args.find("url");
    if (url == args.end() || !url->is_string()) return {"error: \"url\" (a string) is required", true};
    for (const auto &[key, value] : args.items())
      if (key != "url") return {"error: unknown argument \"" + key + "\"", true};
    const FetchResult r = fetch(url->get<std::string>(), policy, [this] { return host->is_cancelled(ctx) != 0; });
    if (r.refused) return {"error: refused: " + r.message, true};
    if (r.failed) return {"error: fetch failed: " + r.message, true};
    std::string head = "HTTP " + std::to_string(r.status) + " " + r.final_url;
    if (!r.content_type.empty()) head += " (" + r.content_type + ")";
    std::string text = head + "\n\n" + valid_utf8(r.body);
    if (r.truncated) text += "\n[cut off at " + std::to_string(policy.max_bytes) + " bytes]";
    return {text, r.status >= 400};
  }
};

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "allowed_hosts", LOOM_VALUE_ARRAY, 1, nullptr,
     "host names the tool may fetch: exact names, \"*.example.com\" (subdomains) or \"*\" (any)"},
    {sizeof(loom_param_desc), "allowed_networks", LOOM_VALUE_ARRAY, 0, "[]",
     "non-public networks that may be reached anyway (CIDR: \"10.1.0.0/16\", \"127.0.0.1\"); default none"},
    {sizeof(loom_param_desc), "timeout_s", LOOM_VALUE_FLOAT, 0, "15.0", "the whole fetch's time limit, per hop"},
    {sizeof(loom_param_desc), "connect_timeout_s", LOOM_VALUE_FLOAT, 0, "5.0", "the connection's time limit"},
    {sizeof(loom_param_desc), "max_bytes", LOOM_VALUE_INT, 0, "1048576", "body bytes kept; the rest is cut off"},
    {sizeof(loom_param_desc), "max_redirects", LOOM_VALUE_INT, 0, "5", "redirects followed, each re-checked"},
};
constexpr loom_component_desc kHttpGet = {
    sizeof(loom_component_desc), LOOM_KIND_TOOL, "http_get", "1.0.0",
    "HTTP(S) GET with an allow-list, SSRF guards (no private addresses, pinned connections, re-checked redirects) and limits",
    kParams, 6, LOOM_THREADING_CONCURRENT, &SingleToolGlue<HttpGet>::kVtable};
const loom_component_desc *const kComponents[] = {&kHttpGet};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-tool-http", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::http

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &loomp::http::kPlugin; }
