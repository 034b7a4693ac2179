// plugins/common/loom_e4m3.hpp: FP8 E4M3 (e4m3fn) decode checked on all 256 codes against the
// format's definition evaluated here in double; encode checked against decode: every finite code
// round-trips, values between two neighbouring codes go to the nearer one and midpoints to the
// code with an even mantissa, magnitudes from 448 up saturate, and NaN stays NaN.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "loom_e4m3.hpp"

namespace e4m3 = loomp::e4m3;

namespace {

// The value of a code by the definition: bias 7, subnormals at exponent 0, S.1111.111 NaN.
double by_definition(int code) {
  const int sign = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::nan("");
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return sign ? -mag : mag;
}

// Positive finite codes 0x00..0x7E in increasing order of value (the encoding is monotonic).
std::vector<int> positive_codes() {
  std::vector<int> c;
  for (int i = 0; i <= 0x7E; ++i) c.push_back(i);
  return c;
}

} // namespace

TEST_CASE("E4M3 decode matches the format's definition on all 256 codes", "[e4m3]") {
  for (int code = 0; code < 256; ++code) {
    INFO("code 0x" << std::hex << code);
    const double want = by_definition(code);
    const float got = e4m3::decode(static_cast<uint8_t>(code));
    if (std::isnan(want)) {
      CHECK(std::isnan(got));
    } else {
      CHECK(static_cast<double>(got) == want);
      CHECK(std::signbit(got) == (code >= 0x80));
    }
  }
  CHECK(e4m3::decode(0x7E) == 448.0f);
  CHECK(e4m3::decode(0xFE) == -448.0f);
  CHECK(e4m3::decode(0x01) == std::ldexp(1.0f, -9));
  CHECK(e4m3::decode(0x08) == std::ldexp(1.0f, -6));
  CHECK(e4m3::decode(0x38) == 1.0f);
  CHECK(std::isnan(e4m3::decode(0x7F)));
  CHECK(std::isnan(e4m3::decode(0xFF)));
}

TEST_CASE("E4M3 pairs decode to halves of the codes' values times 2^-8, exactly", "[e4m3]") {
  // A binary16 value from its bits (no infinities or NaNs expected here).
  auto half_value = [](uint32_t h) {
    const int e = static_cast<int>((h >> 10) & 0x1F), m = static_cast<int>(h & 0x3FF);
    REQUIRE(e != 31);
    const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
    return (h & 0x8000) != 0 ? -v : v;
  };
  for (uint32_t pair = 0; pair < 0x10000; ++pair) {
    const auto c0 = static_cast<uint8_t>(pair & 0xFF), c1 = static_cast<uint8_t>(pair >> 8);
    // Bits above the pair are ignored.
    const uint32_t bits = loomp::e4m3::decode2_half_bits_scaled(pair | 0xABCD0000u);
    for (const auto &[code, half] : {std::pair{c0, bits & 0xFFFFu}, std::pair{c1, bits >> 16}}) {
      if ((code & 0x7F) == 0x7F) {  // NaN codes: +-480 * 2^-8, documented
        CHECK(half_value(half) == ((code & 0x80) != 0 ? -480.0 : 480.0) / 256.0);
        continue;
      }
      INFO("code " << static_cast<int>(code));
      CHECK(half_value(half) == static_cast<double>(loomp::e4m3::decode(code)) / 256.0);
      CHECK(((half & 0x8000u) != 0) == ((code & 0x80) != 0));  // -0 keeps its sign
    }
  }
}

TEST_CASE("E4M3 encode round-trips every finite code", "[e4m3]") {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;  // NaN
    INFO("code 0x" << std::hex << code);
    CHECK(static_cast<int>(e4m3::encode(e4m3::decode(static_cast<uint8_t>(code)))) == code);
  }
}

TEST_CASE("E4M3 encode rounds to the nearest code, ties to even, and saturates", "[e4m3]") {
  const std::vector<int> codes = positive_codes();
  for (size_t i = 0; i + 1 < codes.size(); ++i) {
    const float lo = e4m3::decode(static_cast<uint8_t>(codes[i]));
    const float hi = e4m3::decode(static_cast<uint8_t>(codes[i + 1]));
    const float mid = (lo + hi) / 2;  // exact: neighbours differ by a power of two well inside float
    INFO("between 0x" << std::hex << codes[i] << " and 0x" << codes[i + 1] << std::dec << " (" << lo << ", " << hi
                      << ")");
    // Just off the midpoint: the nearer code, for either sign.
    const float below = std::nextafter(mid, lo), above = std::nextafter(mid, hi);
    CHECK(static_cast<int>(e4m3::encode(below)) == codes[i]);
    CHECK(static_cast<int>(e4m3::encode(above)) == codes[i + 1]);
    CHECK(static_cast<int>(e4m3::encode(-below)) == (codes[i] | 0x80));
    CHECK(static_cast<int>(e4m3::encode(-above)) == (codes[i + 1] | 0x80));
    // A quarter of the way: still the nearer one.
    CHECK(static_cast<int>(e4m3::encode(lo + (hi - lo) / 4)) == codes[i]);
    CHECK(static_cast<int>(e4m3::encode(hi - (hi - lo) / 4)) == codes[i + 1]);
    // The midpoint: the code whose last mantissa bit is 0 (codes are consecutive integers, so
    // exactly one of the two is even).
    const int even = codes[i] % 2 == 0 ? codes[i] : codes[i + 1];
    CHECK(static_cast<int>(e4m3::encode(mid)) == even);
    CHECK(static_cast<int>(e4m3::encode(-mid)) == (even | 0x80));
  }
  // Below half the smallest subnormal: zero, keeping the sign; the half itself ties to 0.
  CHECK(e4m3::encode(std::ldexp(1.0f, -11)) == 0x00);
  CHECK(e4m3::encode(std::ldexp(1.0f, -10)) == 0x00);
  CHECK(e4m3::encode(std::nextafter(std::ldexp(1.0f, -10), 1.0f)) == 0x01);
  CHECK(e4m3::encode(-std::ldexp(1.0f, -11)) == 0x80);
  CHECK(e4m3::encode(0.0f) == 0x00);
  CHECK(e4m3::encode(-0.0f) == 0x80);
  // Saturation: 448 and anything larger (the would-be code 480 is NaN's), never NaN.
  for (float x : {448.0f, 449.0f, 463.99f, 464.0f, 480.0f, 1e6f, 3.0e38f, INFINITY}) {
    INFO(x);
    CHECK(e4m3::encode(x) == 0x7E);
    CHECK(e4m3::encode(-x) == 0xFE);
  }
  CHECK((e4m3::encode(NAN) & 0x7F) == 0x7F);
}

TEST_CASE("E4M3 round_half_even ignores the FPU rounding mode's ties", "[e4m3]") {
  CHECK(e4m3::round_half_even(0.5f) == 0.0f);
  CHECK(e4m3::round_half_even(1.5f) == 2.0f);
  CHECK(e4m3::round_half_even(2.5f) == 2.0f);
  CHECK(e4m3::round_half_even(-0.5f) == 0.0f);
  CHECK(e4m3::round_half_even(-1.5f) == -2.0f);
  CHECK(e4m3::round_half_even(-2.5f) == -2.0f);
  CHECK(e4m3::round_half_even(2.4999998f) == 2.0f);
  CHECK(e4m3::round_half_even(126.5f) == 126.0f);
  CHECK(e4m3::round_half_even(-126.5f) == -126.0f);
}

TEST_CASE("E4M3 encode_bits gives encode's code for every input", "[e4m3]") {
  // A stride over all 2^32 bit patterns (every sign, binade and NaN/infinity kind is hit), then
  // every code's midpoint with its neighbours and the values one float step either side.
  uint64_t checked = 0;
  for (uint64_t bits = 0; bits < (uint64_t{1} << 32); bits += 251) {
    const uint32_t b = static_cast<uint32_t>(bits);
    float x = 0;
    std::memcpy(&x, &b, sizeof(x));
    const uint8_t want = e4m3::encode(x), got = e4m3::encode_bits(x);
    if (want != got) FAIL("bits " << b << " value " << x << ": encode " << int(want) << ", encode_bits " << int(got));
    ++checked;
  }
  for (int c = 0; c < 0x7E; ++c) {
    const float lo = e4m3::decode(static_cast<uint8_t>(c)), hi = e4m3::decode(static_cast<uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;
    for (const float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f), lo, hi})
      for (const float s : {v, -v}) {
        INFO("value " << s);
        CHECK(e4m3::encode_bits(s) == e4m3::encode(s));
      }
  }
  CHECK(checked > 17000000);
}
