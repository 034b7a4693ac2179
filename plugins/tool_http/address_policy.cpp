#include "address_policy.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>
#include <stdexcept>

namespace loomp::http {
namespace {

Address v4_address(const uint8_t b[4]) {
  Address a;
  a.v4 = true;
  a.bytes[10] = a.bytes[11] = 0xff;
  std::memcpy(a.bytes.data() + 12, b, 4);
  return a;
}

// Whether the first `bits` bits of `a` equal those of `prefix` (given as bytes).
bool starts_with(const uint8_t *a, std::initializer_list<uint8_t> prefix, int bits) {
  const uint8_t *p = prefix.begin();
  for (int i = 0; i < bits; i += 8) {
    const int n = bits - i >= 8 ? 8 : bits - i;
    const uint8_t mask = static_cast<uint8_t>(0xff << (8 - n));
    if ((a[i / 8] & mask) != (p[i / 8] & mask)) return false;
  }
  return true;
}

std::string v4_reason(const uint8_t *b) {
  struct Range {
    std::initializer_list<uint8_t> prefix;
    int bits;
    const char *why;
  };
  static const Range kRanges[] = {
      {{0, 0, 0, 0}, 8, "\"this network\" (0.0.0.0/8)"},
      {{10, 0, 0, 0}, 8, "private (RFC 1918)"},
      {{100, 64, 0, 0}, 10, "shared address space (RFC 6598)"},
      {{127, 0, 0, 0}, 8, "loopback"},
      {{169, 254, 0, 0}, 16, "link-local (cloud metadata lives here)"},
      {{172, 16, 0, 0}, 12, "private (RFC 1918)"},
      {{192, 0, 0, 0}, 24, "IETF protocol assignments"},
      {{192, 0, 2, 0}, 24, "documentation"},
      {{192, 88, 99, 0}, 24, "6to4 relay"},
      {{192, 168, 0, 0}, 16, "private (RFC 1918)"},
      {{198, 18, 0, 0}, 15, "benchmarking"},
      {{198, 51, 100, 0}, 24, "documentation"},
      {{203, 0, 113, 0}, 24, "documentation"},
      {{224, 0, 0, 0}, 4, "multicast"},
      {{240, 0, 0, 0}, 4, "reserved (and broadcast)"},
  };
  for (const auto &r : kRanges)
    if (starts_with(b, r.prefix, r.bits)) return r.why;
  return "";
}

}  // namespace

std::string Address::text() const {
  char buf[INET6_ADDRSTRLEN] = {};
  if (v4) inet_ntop(AF_INET, bytes.data() + 12, buf, sizeof buf);
  else inet_ntop(AF_INET6, bytes.data(), buf, sizeof buf);
  return buf;
}

bool address_of(const sockaddr *sa, Address *out) {
  if (sa == nullptr) return false;
  if (sa->sa_family == AF_INET) {
    sockaddr_in in{};
    std::memcpy(&in, sa, sizeof in);
    *out = v4_address(reinterpret_cast<const uint8_t *>(&in.sin_addr));
    return true;
  }
  if (sa->sa_family == AF_INET6) {
    sockaddr_in6 in6{};
    std::memcpy(&in6, sa, sizeof in6);
    Address a;
    std::memcpy(a.bytes.data(), &in6.sin6_addr, 16);
    *out = a;
    return true;
  }
  return false;
}

Network parse_network(const std::string &text) {
  const size_t slash = text.find('/');
  const std::string host = text.substr(0, slash);
  Network n;
  uint8_t b[16];
  if (inet_pton(AF_INET, host.c_str(), b) == 1) {
    n.base = v4_address(b);
    n.prefix = 32;
  } else if (inet_pton(AF_INET6, host.c_str(), b) == 1) {
    std::memcpy(n.base.bytes.data(), b, 16);
    n.prefix = 128;
  } else {
    throw std::invalid_argument("'" + text + "' is not an address or a network (10.0.0.0/8, ::1/128)");
  }
  if (slash != std::string::npos) {
    const std::string bits = text.substr(slash + 1);
    size_t used = 0;
    int p = -1;
    try {
      p = std::stoi(bits, &used);
    } catch (const std::exception &) {
      used = 0;
    }
    if (bits.empty() || used != bits.size() || p < 0 || p > n.prefix)
      throw std::invalid_argument("'" + text + "': the prefix length must be 0 to " + std::to_string(n.prefix));
    n.prefix = p;
  }
  return n;
}

bool contains(const Network &network, const Address &address) {
  if (network.base.v4 != address.v4) return false;
  const int offset = address.v4 ? 96 : 0;  // an IPv4 prefix counts the last 32 bits
  const int bits = offset + network.prefix;
  for (int i = 0; i < bits; i += 8) {
    const int n = bits - i >= 8 ? 8 : bits - i;
    const uint8_t mask = static_cast<uint8_t>(0xff << (8 - n));
    if ((network.base.bytes[static_cast<size_t>(i / 8)] & mask) != (address.bytes[static_cast<size_t>(i / 8)] & mask)) return false;
  }
  return true;
}

std::string non_public_reason(const Address &address) {
  const uint8_t *b = address.bytes.data();
  if (address.v4) return v4_reason(b + 12);
  static const uint8_t zero[16] = {};
  if (std::memcmp(b, zero, 16) == 0) return "unspecified (::)";
  if (std::memcmp(b, zero, 15) == 0 && b[15] == 1) return "loopback (::1)";
  if (std::memcmp(b, zero, 10) == 0 && b[10] == 0xff && b[11] == 0xff) return "IPv4-mapped IPv6 (::ffff:0:0/96)";
  if (std::memcmp(b, zero, 12) == 0) return "IPv4-compatible IPv6 (::/96)";
  struct Range {
    std::initializer_list<uint8_t> prefix;
    int bits;
    const char *why;
  };
  static const Range kRanges[] = {
      {{0x00, 0x64, 0xff, 0x9b}, 32, "NAT64 (64:ff9b::/32, embeds an IPv4 address)"},
      {{0x01, 0x00}, 16, "discard-only (100::/64) or reserved"},
      {{0x20, 0x01, 0x00, 0x00}, 32, "Teredo (2001::/32, embeds an IPv4 address)"},
      {{0x20, 0x01, 0x0d, 0xb8}, 32, "documentation"},
      {{0x20, 0x02}, 16, "6to4 (2002::/16, embeds an IPv4 address)"},
      {{0xfc}, 7, "unique local (fc00::/7)"},
      {{0xfe, 0x80}, 10, "link-local (fe80::/10)"},
      {{0xfe, 0xc0}, 10, "site-local (fec0::/10)"},
      {{0xff}, 8, "multicast"},
  };
  for (const auto &r : kRanges)
    if (starts_with(b, r.prefix, r.bits)) return r.why;
  // Only global unicast (2000::/3) is public.
  if ((b[0] & 0xe0) != 0x20) return "not global unicast (outside 2000::/3)";
  return "";
}

}  // namespace loomp::http
