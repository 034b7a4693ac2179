// libloom-tool-calculator: results, precedence, functions and every error path, including
// hostile nesting that must end as a tool error rather than a crash.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "builtin_test_util.hpp"

namespace {

struct Fixture {
  std::unique_ptr<loom::Runtime> rt = bt::runtime("[[tool]]\nuse = \"calculator\"\n");
  loom::Instance &t = rt->pipeline().at("tool[0]");
  const loom_tool_vtable *vt = t.vtable<loom_tool_vtable>();

  // Runs the tool on raw arguments JSON; returns {content, is_error}.
  std::pair<std::string, bool> call_raw(const std::string &args, loom_status want = LOOM_OK) {
    loom::HostBuffer content;
    loom_tool_result r{sizeof(loom_tool_result), content.abi(), 0};
    REQUIRE(vt->call(t.handle(), "calculator", args.c_str(), &r) == want);
    return {std::string(content.view()), r.is_error != 0};
  }
  std::pair<std::string, bool> eval(const std::string &expr) {
    return call_raw(nlohmann::json{{"expression", expr}}.dump());
  }
  std::string ok(const std::string &expr) {
    auto [text, err] = eval(expr);
    INFO(expr << " -> " << text);
    CHECK_FALSE(err);
    return text;
  }
  std::string error(const std::string &expr) {
    auto [text, err] = eval(expr);
    INFO(expr << " -> " << text);
    CHECK(err);
    return text;
  }
};

} // namespace

TEST_CASE("calculator describes its one tool", "[calculator]") {
  Fixture f;
  uint32_t n = 0;
  REQUIRE(f.vt->tool_count(f.t.handle(), &n) == LOOM_OK);
  CHECK(n == 1);
  loom_tool_info info{};
  info.struct_size = sizeof(info);
  REQUIRE(f.vt->tool_info(f.t.handle(), 0, &info) == LOOM_OK);
  CHECK(std::string(info.name) == "calculator");
  const auto schema = nlohmann::json::parse(info.input_schema_json);
  CHECK(schema["properties"]["expression"]["type"] == "string");
  CHECK(schema["required"] == nlohmann::json::array({"expression"}));
  CHECK(f.vt->tool_info(f.t.handle(), 1, &info) == LOOM_ERR_NOT_FOUND);
}

TEST_CASE("calculator evaluates with the usual precedence", "[calculator]") {
  Fixture f;
  CHECK(f.ok("1 + 2 * 3") == "7");
  CHECK(f.ok("(1 + 2) * 3") == "9");
  CHECK(f.ok("2 ^ 3 ^ 2") == "512");
  CHECK(f.ok("-2 ^ 2") == "-4");
  CHECK(f.ok("2 ^ -1") == "0.5");
  CHECK(f.ok("--3") == "3");
  CHECK(f.ok("7 % 3") == "1");
  CHECK(f.ok("0.1 + 0.2") == "0.30000000000000004");
  CHECK(f.ok("1.5e3 / 4") == "375");
  CHECK(f.ok("10 - 4 - 3") == "3");
  CHECK(f.ok("sqrt(16) + abs(-2)") == "6");
  CHECK(f.ok("floor(2.7) + ceil(2.1)") == "5");
  CHECK(f.ok("min(3, 4) * max(3, 4)") == "12");
  CHECK(f.ok("ln(e)") == "1");
  CHECK(f.ok("log10(1000)") == "3");
  CHECK(f.ok("exp(0) + cos(0) + sin(0) + tan(0)") == "2");
  CHECK(f.ok("pi") == "3.141592653589793");
  CHECK(f.ok("1e21") == "1e+21");
}

TEST_CASE("calculator reports bad expressions as tool errors", "[calculator]") {
  Fixture f;
  CHECK_THAT(f.error("1 / 0"), Catch::Contains("division by zero"));
  CHECK_THAT(f.error("5 % 0"), Catch::Contains("modulo by zero"));
  CHECK_THAT(f.error("1 +"), Catch::Contains("unexpected end"));
  CHECK_THAT(f.error("2 * (3 + 4"), Catch::Contains("expected ')'"));
  CHECK_THAT(f.error("foo(2)"), Catch::Contains("unknown identifier 'foo'"));
  CHECK_THAT(f.error("sqrt(-1)"), Catch::Contains("sqrt"));
  CHECK_THAT(f.error("10 ^ 400"), Catch::Contains("non-finite"));
  CHECK_THAT(f.error("1 2"), Catch::Contains("unexpected"));
  CHECK_THAT(f.error("min(1)"), Catch::Contains("two arguments"));
  CHECK_THAT(f.error(std::string(5000, '1')), Catch::Contains("longer than"));

  // 10000 parentheses: over the length cap; 2000 fit under it and hit the nesting limit.
  const std::string deep = std::string(10000, '(') + "1" + std::string(10000, ')');
  CHECK_THAT(f.error(deep), Catch::StartsWith("error:"));
  const std::string deep2 = std::string(2000, '(') + "1" + std::string(2000, ')');
  CHECK_THAT(f.error(deep2), Catch::Contains("nested deeper"));
  CHECK_THAT(f.error(std::string(2000, '(')), Catch::Contains("nested deeper"));
  CHECK_THAT(f.error(std::string(3000, '-') + "1"), Catch::Contains("nested deeper"));
  CHECK(f.ok(std::string(30, '(') + "1" + std::string(30, ')')) == "1");
}

TEST_CASE("calculator checks its arguments JSON", "[calculator]") {
  Fixture f;
  auto [t1, e1] = f.call_raw("{not json");
  CHECK(e1);
  CHECK_THAT(t1, Catch::Contains("not valid JSON"));
  auto [t2, e2] = f.call_raw("{}");
  CHECK(e2);
  CHECK_THAT(t2, Catch::Contains("expression"));
  auto [t3, e3] = f.call_raw(R"({"expression": 42})");
  CHECK(e3);
  CHECK_THAT(t3, Catch::Contains("must be a string"));
  auto [t4, e4] = f.call_raw("[1, 2]");
  CHECK(e4);

  loom::HostBuffer content;
  loom_tool_result r{sizeof(loom_tool_result), content.abi(), 0};
  CHECK(f.vt->call(f.t.handle(), "shell", R"({"expression":"1"})", &r) == LOOM_ERR_NOT_FOUND);
  CHECK_THAT(f.t.last_error(), Catch::Contains("shell"));
}
