#include "fetch.hpp"

#include <curl/curl.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <memory>

namespace loomp::http {
namespace {

struct UrlDeleter {
  void operator()(CURLU *u) const { curl_url_cleanup(u); }
};
struct EasyDeleter {
  void operator()(CURL *c) const { curl_easy_cleanup(c); }
};
struct ListDeleter {
  void operator()(curl_slist *l) const { curl_slist_free_all(l); }
};

std::string lower(std::string s) {
  for (char &c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// One URL part as a string ("" when absent).
std::string part(CURLU *u, CURLUPart which, unsigned flags = 0) {
  char *v = nullptr;
  if (curl_url_get(u, which, &v, flags) != CURLUE_OK || v == nullptr) return "";
  std::string out(v);
  curl_free(v);
  return out;
}

bool host_allowed(const std::string &host, const std::vector<std::string> &allowed) {
  for (const auto &a : allowed) {
    if (a == "*" || a == host) return true;
    if (a.size() > 2 && a[0] == '*' && a[1] == '.') {
      const std::string suffix = a.substr(1);  // ".example.com"
      if (host.size() > suffix.size() && host.compare(host.size() - suffix.size(), suffix.size(), suffix) == 0) return true;
    }
  }
  return false;
}

// What one hop is allowed to reach, once checked.
struct Hop {
  std::string url;   // curl's normalised URL
  std::string host;  // as in the URL (IPv6 in brackets), lower case, without a trailing dot
  long port = 0;
  Address address;   // the checked address curl must connect to
  std::string refused;
};

Hop check_hop(const std::string &url, const FetchPolicy &policy) {
  Hop hop;
  std::unique_ptr<CURLU, UrlDeleter> u(curl_url());
  if (!u) {
    hop.refused = "out of memory";
    return hop;
  }
  if (const CURLUcode rc = curl_url_set(u.get(), CURLUPART_URL, url.c_str(), CURLU_NON_SUPPORT_SCHEME); rc != CURLUE_OK) {
    hop.refused = std::string("not a valid URL (") + curl_url_strerror(rc) + ")";
    return hop;
  }
  const std::string scheme = lower(part(u.get(), CURLUPART_SCHEME));
  if (scheme != "http" && scheme != "https") {
    hop.refused = "scheme '" + scheme + "' is not allowed (http and https only)";
    return hop;
  }
  if (!part(u.get(), CURLUPART_USER).empty() || !part(u.get(), CURLUPART_PASSWORD).empty()) {
    hop.refused = "URLs with a user name or password are not allowed";
    return hop;
  }
  hop.host = lower(part(u.get(), CURLUPART_HOST));
  while (!hop.host.empty() && hop.host.back() == '.') hop.host.pop_back();
  curl_url_set(u.get(), CURLUPART_HOST, hop.host.c_str(), 0);
  const std::string port = part(u.get(), CURLUPART_PORT, CURLU_DEFAULT_PORT);
  hop.port = port.empty() ? 0 : std::strtol(port.c_str(), nullptr, 10);
  hop.url = part(u.get(), CURLUPART_URL);
  if (hop.host.empty() || hop.port <= 0 || hop.url.empty()) {
    hop.refused = "the URL has no host or port";
    return hop;
  }
  if (!host_allowed(hop.host, policy.allowed_hosts)) {
    hop.refused = "host '" + hop.host + "' is not on the allow-list";
    return hop;
  }
  // Resolve, and check every address the name has: an attacker's name may resolve to one
  // public and one private address.
  std::string bare = hop.host;
  if (bare.size() > 2 && bare.front() == '[' && bare.back() == ']') bare = bare.substr(1, bare.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo *found = nullptr;
  if (const int rc = getaddrinfo(bare.c_str(), nullptr, &hints, &found); rc != 0) {
    hop.refused = "host '" + hop.host + "' does not resolve (" + gai_strerror(rc) + ")";
    return hop;
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo *)> owned(found, freeaddrinfo);
  bool first = true;
  for (const addrinfo *a = found; a != nullptr; a = a->ai_next) {
    Address address;
    if (!address_of(a->ai_addr, &address)) continue;
    const std::string reason = non_public_reason(address);
    const bool allowed = reason.empty() || std::any_of(policy.allowed_networks.begin(), policy.allowed_networks.end(),
                                                       [&](const Network &n) { return contains(n, address); });
    if (!allowed) {
      hop.refused = "host '" + hop.host + "' resolves to " + address.text() + ", " + reason + ", which is not allowed";
      return hop;
    }
    if (first) hop.address = address;
    first = false;
  }
  if (first) hop.refused = "host '" + hop.host + "' has no IPv4 or IPv6 address";
  return hop;
}

struct Transfer {
  const FetchPolicy *policy;
  const std::function<bool()> *cancelled;
  Address pinned;
  FetchResult *result;
  bool socket_refused = false;
  bool out_of_memory = false;
};

size_t on_body(char *data, size_t size, size_t n, void *user) {
  auto *t = static_cast<Transfer *>(user);
  const size_t bytes = size * n;
  const uint64_t room = t->policy->max_bytes - std::min<uint64_t>(t->policy->max_bytes, t->result->body.size());
  try {  // no exception may unwind through libcurl's C frames
    if (bytes > room) {
      t->result->body.append(data, static_cast<size_t>(room));
      t->result->truncated = true;
      return 0;  // stops the transfer (CURLE_WRITE_ERROR, expected)
    }
    t->result->body.append(data, bytes);
    return bytes;
  } catch (...) {
    t->out_of_memory = true;
    return 0;
  }
}

int on_progress(void *user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto *t = static_cast<Transfer *>(user);
  return *t->cancelled && (*t->cancelled)() ? 1 : 0;
}

// The last line of defence: a socket only to the checked address.
curl_socket_t on_open_socket(void *user, curlsocktype, curl_sockaddr *address) {
  auto *t = static_cast<Transfer *>(user);
  Address a;
  if (!address_of(&address->addr, &a) || a.bytes != t->pinned.bytes) {
    t->socket_refused = true;
    return CURL_SOCKET_BAD;
  }
  return socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);  // not inherited by child processes
}

}  // namespace

FetchResult fetch(const std::string &url, const FetchPolicy &policy, const std::function<bool()> &cancelled) {
  FetchResult result;
  std::string next = url;
  for (;;) {
    const Hop hop = check_hop(next, policy);
    if (!hop.refused.empty()) {
      result.refused = true;
      result.message = (result.redirects > 0 ? "redirect " + std::to_string(result.redirects) + " to " + next + ": " : "") +
                       hop.refused;
      return result;
    }
    result.final_url = hop.url;
    result.body.clear();
    result.truncated = false;
    std::unique_ptr<CURL, EasyDeleter> curl(curl_easy_init());
    if (!curl) {
      result.failed = true;
      result.message = "curl_easy_init failed";
      return result;
    }
    Transfer t{&policy, &cancelled, hop.address, &result};
    // A name is pinned to its checked address; a literal address needs no pin (curl does not
    // resolve it, and its CURLOPT_RESOLVE entries cannot name an IPv6 literal host).
    std::string address = hop.address.text();
    if (!hop.address.v4) address = "[" + address + "]";
    const bool literal = hop.host.front() == '[' || hop.host == hop.address.text();
    const std::string pin = hop.host + ":" + std::to_string(hop.port) + ":" + address;
    std::unique_ptr<curl_slist, ListDeleter> resolve(literal ? nullptr : curl_slist_append(nullptr, pin.c_str()));
    CURL *c = curl.get();
    curl_easy_setopt(c, CURLOPT_URL, hop.url.c_str());
    curl_easy_setopt(c, CURLOPT_RESOLVE, resolve.get());
    curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
    curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, &t);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_PROXY, "");  // no proxy from the environment: it would bypass the pin
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, policy.connect_timeout_ms);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, policy.timeout_ms);
    curl_easy_setopt(c, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(c, CURLOPT_USERAGENT, policy.user_agent.c_str());
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &t);
    const CURLcode rc = curl_easy_perform(c);
    if (t.out_of_memory) {
      result.failed = true;
      result.message = "out of memory for the response";
      return result;
    }
    if (t.socket_refused) {
      result.refused = true;
      result.message = "curl tried to connect to another address than the checked " + hop.address.text();
      return result;
    }
    if (rc != CURLE_OK && !(rc == CURLE_WRITE_ERROR && result.truncated)) {
      result.failed = true;
      result.message = rc == CURLE_ABORTED_BY_CALLBACK ? "cancelled" : std::string(curl_easy_strerror(rc));
      return result;
    }
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &result.status);
    char *type = nullptr;
    if (curl_easy_getinfo(c, CURLINFO_CONTENT_TYPE, &type) == CURLE_OK && type != nullptr) result.content_type = type;
    char *location = nullptr;
    if (result.status >= 300 && result.status < 400 && !result.truncated &&
        curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &location) == CURLE_OK && location != nullptr) {
      if (result.redirects >= policy.max_redirects) {
        result.failed = true;
        result.message = "more than " + std::to_string(policy.max_redirects) + " redirects";
        return result;
      }
      ++result.redirects;
      next = location;
      continue;
    }
    return result;
  }
}

}  // namespace loomp::http
