// One guarded HTTP GET with libcurl, for the http_get tool.
//
// Every hop (the first URL and each redirect, followed here, never by curl) is checked:
//   1. the URL parses (curl's URL API, which also normalises numeric IPv4 spellings), its scheme
//      is http or https, it carries no user name or password;
//   2. its host is on the allow-list (exact names, "*.suffix" for subdomains, "*" for any);
//   3. the host resolves (getaddrinfo) and every address it resolves to is public unicast or
//      inside an allowed network (address_policy.hpp);
//   4. curl connects to the checked address only: CURLOPT_RESOLVE pins the name to it, and the
//      open-socket callback refuses any other address, so a second DNS answer (rebinding) cannot
//      change where the request goes; proxies from the environment are ignored for the same
//      reason.
// Limits: connect and total timeouts, a cap on the body's bytes (after decompression; the rest
// is cut off and the result says so), a number of redirects; the host's cancellation is polled.
//
// Thread-safety: fetch() is reentrant (one curl handle per call).
#ifndef LOOM_PLUGINS_HTTP_FETCH_HPP
#define LOOM_PLUGINS_HTTP_FETCH_HPP

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "address_policy.hpp"

namespace loomp::http {

struct FetchPolicy {
  std::vector<std::string> allowed_hosts;  // lower case; "*", "*.example.com" or exact names
  std::vector<Network> allowed_networks;   // non-public addresses that may be reached anyway
  long connect_timeout_ms = 5000;
  long timeout_ms = 15000;
  uint64_t max_bytes = 1 << 20;
  int max_redirects = 5;
  std::string user_agent = "loom-http-get/1.0";
};

struct FetchResult {
  bool refused = false;   // a check refused a hop (nothing was sent there)
  bool failed = false;    // the transfer failed (DNS, connection, timeout, TLS, too many redirects)
  std::string message;    // why, for refused or failed
  long status = 0;        // the last response's HTTP status
  std::string final_url;
  std::string content_type;
  std::string body;       // at most max_bytes
  bool truncated = false; // the body was longer than max_bytes
  int redirects = 0;
};

FetchResult fetch(const std::string &url, const FetchPolicy &policy, const std::function<bool()> &cancelled);

}  // namespace loomp::http

#endif
