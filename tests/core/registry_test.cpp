// The registry over real library files: builtin plugins, test plugins and broken libraries.
#include <catch2/catch.hpp>

#include <filesystem>

#include "loom/core/error.hpp"
#include "loom/core/registry.hpp"

namespace fs = std::filesystem;

namespace {
const fs::path kTestPlugins = LOOM_TEST_PLUGIN_DIR;

std::string open_error(const fs::path &file) {
  loom::Registry registry({});
  try {
    registry.open(file);
  } catch (const loom::Error &e) {
    CHECK(e.category() == loom::ErrorCategory::plugin);
    return e.what();
  }
  return "";
}
} // namespace

TEST_CASE("the builtin directory holds a component of every kind", "[registry]") {
  fs::path builtin = loom::Registry::builtin_plugin_dir();
  CHECK(fs::equivalent(builtin, LOOM_BUILTIN_PLUGIN_DIR));
  loom::Registry registry({builtin});
  registry.scan();
  CHECK(registry.diagnostics().empty());
  for (loom_kind k = LOOM_KIND_ATTENTION; k <= LOOM_KIND_TOOL; ++k) {
    bool found = false;
    for (const auto &lib : registry.libraries())
      for (const auto *c : lib->components()) found = found || c->kind == k;
    INFO("kind " << k);
    CHECK(found);
  }
  auto ref = registry.find(LOOM_KIND_SAMPLER, "greedy");
  CHECK(std::string(ref.component->name) == "greedy");
  CHECK(ref.library->path().filename() == "libloom-samplers.so");
}

TEST_CASE("find picks versions and explains misses", "[registry]") {
  loom::Registry registry({kTestPlugins / "swap", LOOM_BUILTIN_PLUGIN_DIR});
  registry.scan();
  CHECK(std::string(registry.find(LOOM_KIND_SAMPLER, "swap-probe").component->version) == "2.0.0");
  CHECK(std::string(registry.find(LOOM_KIND_SAMPLER, "swap-probe", "<2").component->version) == "1.0.0");
  CHECK_THROWS_WITH(registry.find(LOOM_KIND_SAMPLER, "swap-probe", ">=3"),
                    Catch::Contains("no sampler component 'swap-probe' with version >=3 (found versions"));
  CHECK_THROWS_WITH(registry.find(LOOM_KIND_SAMPLER, "nucleus"), Catch::Contains("available: ") &&
                                                                      Catch::Contains("greedy"));
  CHECK_THROWS_WITH(registry.find(LOOM_KIND_ATTENTION, "greedy"), Catch::Contains("no attention component 'greedy'"));
  // A library named explicitly is opened even outside the search path.
  loom::Registry empty({});
  auto ref = empty.find(LOOM_KIND_SAMPLER, "swap-probe", "", kTestPlugins / "swap" / "libloom-test-swap-v1.so");
  CHECK(std::string(ref.component->version) == "1.0.0");
}

TEST_CASE("broken libraries are refused with the file and the cause", "[registry]") {
  const fs::path bad = kTestPlugins / "bad";
  CHECK(open_error(bad / "libnot-a-plugin.so").find("not a Loom plugin: it exports no loom_plugin_entry") != std::string::npos);
  CHECK(open_error(bad / "libwrong-abi.so").find("built for Loom plugin ABI 99.") != std::string::npos);
  CHECK(open_error(bad / "libnull-desc.so").find("loom_plugin_entry returned NULL") != std::string::npos);
  CHECK(open_error(bad / "libabsurd-sizes.so").find("absurd struct_size") != std::string::npos);
  CHECK(open_error(bad / "libhuge-count.so").find("absurd component_count") != std::string::npos);
  CHECK(open_error(bad / "libbad-component.so").find("libbad-component.so: component") != std::string::npos);
  CHECK(open_error(bad / "libnot-elf.so").find("cannot be loaded as a shared library") != std::string::npos);
  CHECK(open_error(bad / "libmissing.so").find("no such plugin library file") != std::string::npos);
  for (const char *name : {"libwrong-abi.so", "libnot-elf.so"}) CHECK(open_error(bad / name).find(name) != std::string::npos);
}

TEST_CASE("a scan reports broken libraries and keeps the good ones", "[registry]") {
  loom::Registry registry({kTestPlugins / "bad", LOOM_BUILTIN_PLUGIN_DIR});
  registry.scan();
  CHECK(registry.diagnostics().size() >= 7);
  CHECK_NOTHROW(registry.find(LOOM_KIND_SAMPLER, "greedy"));
  size_t reports = registry.diagnostics().size();
  registry.scan(); // a second scan adds no duplicate reports
  CHECK(registry.diagnostics().size() == reports);
}

TEST_CASE("LOOM_PLUGIN_PATH directories come before the builtin one", "[registry]") {
  setenv("LOOM_PLUGIN_PATH", (kTestPlugins.string() + "/swap::" + kTestPlugins.string() + "/misc").c_str(), 1);
  auto paths = loom::Registry::default_search_paths({"/from/manifest"});
  unsetenv("LOOM_PLUGIN_PATH");
  REQUIRE(paths.size() >= 4);
  CHECK(paths[0] == "/from/manifest");
  CHECK(paths[1] == kTestPlugins / "swap");
  CHECK(paths[2] == kTestPlugins / "misc");
  CHECK(fs::equivalent(paths[3], LOOM_BUILTIN_PLUGIN_DIR));
}
