// Manifest parsing: schema, source positions in errors, --set overrides.
#include <catch2/catch.hpp>

#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "../../core/toml_guard.hpp"

using loom::parse_manifest_string;

namespace {
// The message of the loom::Error that parsing `text` throws ("" if it does not throw).
std::string error_of(const std::string &text, const std::vector<std::string> &overrides = {}) {
  try {
    parse_manifest_string(text, "m.toml", overrides, "/base");
  } catch (const loom::Error &e) {
    CHECK(e.category() == loom::ErrorCategory::manifest);
    return e.what();
  }
  return "";
}
} // namespace

TEST_CASE("a full manifest parses into a typed spec", "[manifest]") {
  auto m = parse_manifest_string(R"(
[loom]
plugin_paths = ["plugins", "/abs"]
device = "cpu"
seed = 9

[run]
steps = 5
prompt = [3, 4]
query = "q"
tool_calls = [{ tool = "calculator", arguments = { expression = "1+1" } }]

[attention]
use = "sdpa"
version = ">=1.0, <2"
block_size = 4

[[sampler]]
use = "top-k"
k = 3

[[sampler]]
use = "greedy"
name = "pick"
)",
                                 "m.toml", {}, "/base");
  CHECK(m.plugin_paths == std::vector<std::filesystem::path>{"/base/plugins", "/abs"});
  CHECK(m.device == "cpu");
  CHECK(m.seed == 9);
  CHECK(m.run.steps == 5);
  CHECK(m.run.prompt == std::vector<int32_t>{3, 4});
  REQUIRE(m.run.tool_calls.size() == 1);
  CHECK(m.run.tool_calls[0].tool == "calculator");
  CHECK(m.run.tool_calls[0].arguments_json.find("\"expression\"") != std::string::npos);
  REQUIRE(m.components.size() == 3);
  CHECK(m.components[0].slot == "attention");
  CHECK(m.components[0].version_range == ">=1.0, <2");
  CHECK(m.components[1].slot == "sampler[0]");
  CHECK(m.components[1].table->get_int("k") == 3);
  CHECK(m.components[2].slot == "pick");
  CHECK(m.of_kind(LOOM_KIND_SAMPLER).size() == 2);
}

TEST_CASE("errors name the file, line, column and key path", "[manifest]") {
  CHECK(error_of("[attention\nuse = 1") .rfind("m.toml:1:11:", 0) == 0);
  CHECK(error_of("[run]\nsteps = \"x\"\n") == "m.toml:2:9: run.steps: expected an integer, got a string");
  CHECK(error_of("[run]\nstep = 3\n").rfind("m.toml:2:1: run.step: unknown key", 0) == 0);
  CHECK(error_of("[samplers]\nuse = \"x\"\n").find("m.toml:1:2: samplers: unknown key") == 0);
  CHECK(error_of("[sampler]\nuse = \"greedy\"\n").find("write [[sampler]]") != std::string::npos);
  CHECK(error_of("[[attention]]\nuse = \"sdpa\"\n").find("write [attention]") != std::string::npos);
  CHECK(error_of("[attention]\nblock_size = 4\n").find("attention: missing key 'use'") != std::string::npos);
  CHECK(error_of("[attention]\nuse = \"sdpa\"\nversion = \"new\"\n").find("attention.version: malformed version range") !=
        std::string::npos);
  CHECK(error_of("[loom]\ndevice = \"tpu\"\n").find("loom.device") != std::string::npos);
  CHECK(error_of("[run]\nsteps = 0\n").find("run.steps: must be between 1") != std::string::npos);
  CHECK(error_of("[run]\nprompt = [1, -2]\n").find("run.prompt") != std::string::npos);
  CHECK(error_of("[run]\nprompt = [300]\n").find("outside the vocabulary") != std::string::npos);
  CHECK(error_of("[run]\nn_heads = 3\n").find("not a multiple of n_heads") != std::string::npos);
  CHECK(error_of("[[sampler]]\nuse = \"greedy\"\nname = \"a\"\n[[sampler]]\nuse = \"greedy\"\nname = \"a\"\n")
            .find("slot name already used") != std::string::npos);
  CHECK(error_of("[run]\ntool_calls = [{ tool = \"c\", args = {} }]\n").find("run.tool_calls[0].args: unknown key") !=
        std::string::npos);
}

TEST_CASE("--set overrides apply before validation", "[manifest][overrides]") {
  const std::string base = "[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"top-k\"\nk = 3\n";
  auto m = parse_manifest_string(base, "m.toml", {"sampler[0].k=7", "attention.use=flash", "run.steps=4", "loom.seed=5"});
  CHECK(m.components[1].table->get_int("k") == 7);
  CHECK(m.components[0].use == "flash"); // a bare word is a string
  CHECK(m.run.steps == 4);
  CHECK(m.seed == 5);
  auto quoted = parse_manifest_string(base, "m.toml", {"sampler[0].k=\"seven\""});
  CHECK(quoted.components[1].table->get_string("k") == "seven");
  auto list = parse_manifest_string(base, "m.toml", {"run.prompt=[5, 6]"});
  CHECK(list.run.prompt == std::vector<int32_t>{5, 6});

  CHECK(error_of(base, {"sampler[3].k=1"}).find("index 3 is out of range") != std::string::npos);
  CHECK(error_of(base, {"novalue"}).find("expected key.path=value") != std::string::npos);
  CHECK(error_of(base, {"sampler[x].k=1"}).find("is not a number") != std::string::npos);
  CHECK(error_of(base, {"attention[0].use=x"}).find("is not an array") != std::string::npos);
  CHECK(error_of(base, {"run.steps=\"many\""}).find("--set run.steps=\"many\": run.steps: expected an integer") == 0);
  CHECK(error_of(base, {"bogus.key=1"}).find("bogus: unknown key") != std::string::npos);
}

TEST_CASE("a component spec for a swap keeps its slot", "[manifest][swap]") {
  auto spec = loom::parse_component_spec(LOOM_KIND_SAMPLER, "sampler[1]", "use = \"greedy\"\nname = \"other\"\n", "swap");
  CHECK(spec.slot == "sampler[1]");
  CHECK(spec.use == "greedy");
  CHECK_THROWS_AS(loom::parse_component_spec(LOOM_KIND_SAMPLER, "s", "use = ", "swap"), loom::Error);
}

TEST_CASE("kinds are built in the order the manifest first lists them, lists in array order", "[manifest]") {
  auto m = parse_manifest_string("[[tool]]\nuse = \"t\"\n[attention]\nuse = \"a\"\n[[sampler]]\nuse = \"s0\"\n"
                                 "[quantizer]\nuse = \"q\"\n[[sampler]]\nuse = \"s1\"\n",
                                 "m.toml");
  std::vector<std::string> order;
  for (const auto &c : m.components) order.push_back(c.use);
  CHECK(order == std::vector<std::string>{"t", "a", "s0", "s1", "q"}); // by first mention of each kind
}

TEST_CASE("kind names round-trip", "[manifest]") {
  for (loom_kind k = LOOM_KIND_ATTENTION; k <= LOOM_KIND_TOOL; ++k) CHECK(loom::kind_from_name(loom::kind_name(k)) == k);
  CHECK(loom::kind_from_name("flux") == 0);
  CHECK(loom::kind_is_list(LOOM_KIND_SAMPLER));
  CHECK_FALSE(loom::kind_is_list(LOOM_KIND_ATTENTION));
}

TEST_CASE("characters that toml++ 3.3 cannot classify are refused before it parses", "[manifest][fuzz]") {
  // Found by manifest_fuzz: a value followed by U+00A1 made toml++ reach __builtin_unreachable.
  CHECK(error_of("[run]\nquery = 0.95\xc2\xa1\n") == "m.toml:2:13: a non-ASCII character outside a string or comment (U+00A1)");
  CHECK(error_of("a = \"\"\"x\\\n  \xef\xac\xb0\"\"\"\n").find("after a backslash in a multi-line string (U+FB30)") !=
        std::string::npos);
  // Found by manifest_fuzz (session 28): a quote right after a bare value opens no string for
  // toml++, which scans the value on to a terminator through the quote, here in a --set value.
  CHECK(error_of("[run]\nquery = 5'x\xef\xb9\xbf'\n").find("(U+FE7F)") != std::string::npos);
  CHECK(loom::detail::find_toml_hazard("v = 5'\x01" "CC\xef\xb9\xbf"));
  CHECK(loom::detail::find_toml_hazard("v = true\"\xc2\xa1\""));
  // ... and through --set: the value is then taken as a bare string, as any value TOML refuses.
  CHECK(error_of("[run]\nsteps = 3\n", {"run.steps=5'\x01" "C\xef\xb9\xbf"}).find("run.steps: expected an integer, got a string") !=
        std::string::npos);
  // Inside strings and comments the same characters are fine.
  CHECK(error_of("# \xc2\xa1 comment\n[run]\nquery = \"\xc2\xa1Hola! \xe2\xb5\xb0\"\n") == "");
  CHECK(error_of("[run]\nquery = '''\xc2\xa1'''\n") == "");
  CHECK(loom::detail::tomlpp_whitespace_predicate_undefined(0xA1));
  CHECK_FALSE(loom::detail::tomlpp_whitespace_predicate_undefined(0xA0));
  CHECK_FALSE(loom::detail::tomlpp_whitespace_predicate_undefined(0x3000));
  CHECK_FALSE(loom::detail::tomlpp_whitespace_predicate_undefined(0x2003));
  CHECK_FALSE(loom::detail::tomlpp_whitespace_predicate_undefined('a'));
}
