// Which addresses the http_get tool may connect to. Every address a host name resolves to is
// classified; anything but a public unicast address is refused unless an allowed network
// (CIDR from the manifest) contains it. Addresses are compared as numbers, never as text, so
// every spelling of an address (decimal, octal, hex, short forms, IPv6 forms) meets the same
// rule.
//
// Thread-safety: pure functions over values.
#ifndef LOOM_PLUGINS_HTTP_ADDRESS_POLICY_HPP
#define LOOM_PLUGINS_HTTP_ADDRESS_POLICY_HPP

#include <array>
#include <cstdint>
#include <string>
#include <vector>

struct sockaddr;

namespace loomp::http {

// An address as 16 bytes: IPv4 as ::ffff:a.b.c.d (v4 = true), so one CIDR type covers both.
struct Address {
  std::array<uint8_t, 16> bytes{};
  bool v4 = false;
  std::string text() const;  // 127.0.0.1, ::1
};

struct Network {
  Address base;
  int prefix = 0;  // bits of base that must match (of 32 for IPv4, of 128 for IPv6)
};

// From a socket address (AF_INET or AF_INET6); false for another family.
bool address_of(const sockaddr *sa, Address *out);
// "10.0.0.0/8", "127.0.0.1" (a /32), "fd00::/8"; throws std::invalid_argument naming the text.
Network parse_network(const std::string &text);
bool contains(const Network &network, const Address &address);
// Empty for a public unicast address; otherwise why it is not public ("loopback",
// "private (RFC 1918)", "link-local", "IPv4-mapped IPv6", ...).
std::string non_public_reason(const Address &address);

}  // namespace loomp::http

#endif
