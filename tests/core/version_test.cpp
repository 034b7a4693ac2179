#include <catch2/catch.hpp>

#include "loom/core/error.hpp"
#include "loom/core/version.hpp"

using loom::parse_version;
using loom::version_satisfies;

TEST_CASE("semantic versions parse strictly", "[version]") {
  CHECK(parse_version("1.2.3") == loom::Version{1, 2, 3});
  CHECK(parse_version("2") == loom::Version{2, 0, 0});
  CHECK_FALSE(parse_version(""));
  CHECK_FALSE(parse_version("1.2.3.4"));
  CHECK_FALSE(parse_version("1..2"));
  CHECK_FALSE(parse_version("v1"));
  CHECK_FALSE(parse_version("1.2."));
}

TEST_CASE("version ranges", "[version]") {
  loom::Version v{1, 4, 2};
  CHECK(version_satisfies(v, ""));
  CHECK(version_satisfies(v, ">=1.0, <2"));
  CHECK_FALSE(version_satisfies(v, ">=1.5"));
  CHECK(version_satisfies(v, "^1.4"));
  CHECK_FALSE(version_satisfies(v, "^2.0"));
  CHECK(version_satisfies(v, "~1.4"));
  CHECK_FALSE(version_satisfies(v, "~1.3"));
  CHECK(version_satisfies(v, "=1.4.2"));
  CHECK(version_satisfies(v, "1.4.2"));
  CHECK_THROWS_AS(version_satisfies(v, ">=x"), loom::Error);
  CHECK_FALSE(loom::check_version_range(">=1, <").empty());
}
