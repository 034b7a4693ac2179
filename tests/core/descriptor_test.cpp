// The host's descriptor checks, on descriptors built in memory: every way a library can lie about
// itself gets a message, never a crash.
#include <catch2/catch.hpp>

#include "loom/core/plugin_library.hpp"
#include "loom/loom_plugin_api.h"

namespace {

loom_status apply(void *, const loom_sampling_batch *) { return LOOM_OK; }
loom_status create(const loom_host_api *, loom_host_ctx *, void **out) {
  *out = reinterpret_cast<void *>(1);
  return LOOM_OK;
}
void destroy(void *) {}

struct Fixture {
  loom_sampler_vtable vtable{};
  loom_param_desc params[2]{};
  loom_component_desc component{};
  const loom_component_desc *list[1] = {&component};
  loom_plugin_desc desc{};

  Fixture() {
    vtable.struct_size = sizeof(vtable);
    vtable.life.create = create;
    vtable.life.destroy = destroy;
    vtable.apply = apply;
    params[0] = {sizeof(loom_param_desc), "k", LOOM_VALUE_INT, 0, "40", "k"};
    params[1] = {sizeof(loom_param_desc), "p", LOOM_VALUE_FLOAT, 0, "0.5", "p"};
    component = {sizeof(component), LOOM_KIND_SAMPLER, "probe", "1.0.0", "d", params, 2, LOOM_THREADING_SERIAL, &vtable};
    desc = {sizeof(desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "probe-lib", "0.1.0", "MIT", list, 1, nullptr};
  }
  std::string check() const { return loom::check_plugin_descriptor(&desc); }
};

} // namespace

TEST_CASE("a sound descriptor passes", "[descriptor]") {
  Fixture f;
  CHECK(f.check().empty());
}

TEST_CASE("descriptor-level lies are refused", "[descriptor]") {
  CHECK(loom::check_plugin_descriptor(nullptr) == "loom_plugin_entry returned NULL");
  Fixture f;
  SECTION("absurd struct_size") {
    f.desc.struct_size = 0xFFFFFFF0u;
    CHECK(f.check().find("absurd struct_size") != std::string::npos);
  }
  SECTION("too small struct_size") {
    f.desc.struct_size = 8;
    CHECK(f.check().find("absurd struct_size") != std::string::npos);
  }
  SECTION("another ABI major names both versions") {
    f.desc.abi_major = 2;
    f.desc.abi_minor = 3;
    CHECK(f.check() == "built for Loom plugin ABI 2.3, but this host speaks ABI " + std::to_string(LOOM_ABI_MAJOR) + "." +
                           std::to_string(LOOM_ABI_MINOR));
  }
  SECTION("huge component count") {
    f.desc.component_count = 1u << 30;
    CHECK(f.check().find("absurd component_count") != std::string::npos);
  }
  SECTION("NULL component list") {
    f.desc.components = nullptr;
    CHECK(f.check().find("list is NULL") != std::string::npos);
  }
  SECTION("bad library name") {
    f.desc.name = "Bad Name";
    CHECK(f.check().find("library name") != std::string::npos);
  }
  SECTION("missing license") {
    f.desc.license = nullptr;
    CHECK(f.check().find("license") != std::string::npos);
  }
  SECTION("bad version") {
    f.desc.version = "one";
    CHECK(f.check().find("semantic version") != std::string::npos);
  }
}

TEST_CASE("component-level lies are refused", "[descriptor]") {
  Fixture f;
  SECTION("unknown kind") {
    f.component.kind = 42;
    CHECK(f.check().find("unknown kind 42") != std::string::npos);
  }
  SECTION("NULL vtable") {
    f.component.vtable = nullptr;
    CHECK(f.check().find("NULL vtable") != std::string::npos);
  }
  SECTION("NULL name") {
    f.component.name = nullptr;
    CHECK(f.check().find("no valid name") != std::string::npos);
  }
  SECTION("vtable too small for ABI 1") {
    f.vtable.struct_size = 16;
    CHECK(f.check().find("vtable of absurd struct_size 16") != std::string::npos);
  }
  SECTION("missing required call") {
    f.vtable.apply = nullptr;
    CHECK(f.check().find("lacks the required call apply") != std::string::npos);
  }
  SECTION("missing destroy") {
    f.vtable.life.destroy = nullptr;
    CHECK(f.check().find("no create or destroy") != std::string::npos);
  }
  SECTION("export without import") {
    f.vtable.life.export_state = [](void *, const char **, loom_buffer *) -> loom_status { return LOOM_OK; };
    CHECK(f.check().find("export_state without import_state") != std::string::npos);
  }
  SECTION("a default that is not of the declared type") {
    f.params[0].default_value = "\"forty\"";
    CHECK(f.check().find("parameter 'k': default '\"forty\"' is a string") != std::string::npos);
  }
  SECTION("a default that is not TOML") {
    f.params[1].default_value = "0.5.5";
    CHECK(f.check().find("is not a TOML value") != std::string::npos);
  }
  SECTION("a reserved parameter key") {
    f.params[0].key = "use";
    CHECK(f.check().find("reserved key") != std::string::npos);
  }
  SECTION("a duplicate parameter") {
    f.params[1].key = "k";
    CHECK(f.check().find("declared twice") != std::string::npos);
  }
  SECTION("an absurd param count") {
    f.component.param_count = 100000;
    CHECK(f.check().find("absurd param_count") != std::string::npos);
  }
  SECTION("an unknown parameter type") {
    f.params[0].type = 99;
    CHECK(f.check().find("unknown type 99") != std::string::npos);
  }
  SECTION("an unknown threading value") {
    f.component.threading = 7;
    CHECK(f.check().find("threading") != std::string::npos);
  }
  SECTION("a duplicate component") {
    const loom_component_desc *twice[2] = {&f.component, &f.component};
    f.desc.components = twice;
    f.desc.component_count = 2;
    CHECK(f.check().find("declared twice") != std::string::npos);
  }
}
