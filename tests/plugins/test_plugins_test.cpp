// The test-only plugins do what the suites that use them rely on. Loaded with dlopen and driven
// through a minimal host table of this file (not core's registry: that is tested elsewhere).
#include <catch2/catch.hpp>

#include <dlfcn.h>

#include <cstddef>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"

struct loom_buffer {
  std::string bytes;
};

namespace {

// One fake instance context: its bool and string config and its last error (with its config key).
struct FakeCtx {
  std::map<std::string, int32_t> bools;
  std::map<std::string, std::string> strings;
  std::string error;
  std::string error_key;
};
FakeCtx* fake(loom_host_ctx* ctx) { return reinterpret_cast<FakeCtx*>(ctx); }
loom_host_ctx* as_ctx(FakeCtx* c) { return reinterpret_cast<loom_host_ctx*>(c); }

loom_host_api make_host() {
  loom_host_api h{};
  h.struct_size = sizeof h;
  h.abi_major = LOOM_ABI_MAJOR;
  h.abi_minor = LOOM_ABI_MINOR;
  h.set_error = [](loom_host_ctx* ctx, const char* m) {
    fake(ctx)->error = m;
    fake(ctx)->error_key.clear();
  };
  h.set_config_error = [](loom_host_ctx* ctx, const char* key, const char* m) {
    fake(ctx)->error = m;
    fake(ctx)->error_key = key != nullptr ? key : "(null)";
  };
  h.config_get_bool = [](loom_host_ctx* ctx, const char* key, int32_t* out) -> loom_status {
    auto it = fake(ctx)->bools.find(key);
    if (it == fake(ctx)->bools.end()) return LOOM_ERR_NOT_FOUND;
    *out = it->second;
    return LOOM_OK;
  };
  h.config_get_string = [](loom_host_ctx* ctx, const char* key, const char** out) -> loom_status {
    auto it = fake(ctx)->strings.find(key);
    if (it == fake(ctx)->strings.end()) return LOOM_ERR_NOT_FOUND;
    *out = it->second.c_str();
    return LOOM_OK;
  };
  h.buffer_append = [](loom_buffer* b, const void* data, size_t size) -> loom_status {
    b->bytes.append(static_cast<const char*>(data), size);
    return LOOM_OK;
  };
  h.buffer_clear = [](loom_buffer* b) { b->bytes.clear(); };
  h.is_cancelled = [](loom_host_ctx*) -> int32_t { return 0; };
  return h;
}

struct Library {
  void* handle = nullptr;
  explicit Library(const std::string& path) { handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL); }
  ~Library() {
    if (handle != nullptr) dlclose(handle);
  }
  Library(const Library&) = delete;
  Library& operator=(const Library&) = delete;
  const loom_plugin_desc* desc() const {
    auto entry = reinterpret_cast<loom_plugin_entry_fn>(dlsym(handle, LOOM_PLUGIN_ENTRY_SYMBOL));
    REQUIRE(entry != nullptr);
    return entry();
  }
};

std::string plugin(const char* rel) { return std::string(LOOM_TEST_PLUGIN_DIR) + "/" + rel; }

// Runs one apply() over 2 rows and returns {tokens, logprobs}.
std::pair<std::vector<int32_t>, std::vector<float>> apply_once(const loom_sampler_vtable* vt, void* inst) {
  std::vector<int32_t> tokens(2, -1);
  std::vector<float> logprobs(2, -1.0f);
  loom_sampling_batch b{};
  b.struct_size = sizeof b;
  b.n_rows = 2;
  b.vocab_size = 4;
  b.tokens_out = tokens.data();
  b.logprobs_out = logprobs.data();
  REQUIRE(vt->apply(inst, &b) == LOOM_OK);
  return {tokens, logprobs};
}

}  // namespace

TEST_CASE("swap probes select their token and carry the counter across versions", "[plugins]") {
  Library v1(plugin("swap/libloom-test-swap-v1.so")), v2(plugin("swap/libloom-test-swap-v2.so"));
  REQUIRE(v1.handle != nullptr);
  REQUIRE(v2.handle != nullptr);
  const loom_plugin_desc* d1 = v1.desc();
  const loom_plugin_desc* d2 = v2.desc();
  CHECK(std::string(d1->name) == "loom-test-swap");
  CHECK(d1->abi_major == LOOM_ABI_MAJOR);
  REQUIRE(d1->component_count == 1);
  REQUIRE(d2->component_count == 1);
  const loom_component_desc* c1 = d1->components[0];
  const loom_component_desc* c2 = d2->components[0];
  CHECK(std::string(c1->name) == "swap-probe");
  CHECK(std::string(c2->name) == "swap-probe");
  CHECK(std::string(c1->version) == "1.0.0");
  CHECK(std::string(c2->version) == "2.0.0");
  CHECK(c1->kind == LOOM_KIND_SAMPLER);
  REQUIRE(c1->param_count == 3);
  CHECK(std::string(c1->params[0].key) == "fail_import");
  auto vt1 = static_cast<const loom_sampler_vtable*>(c1->vtable);
  auto vt2 = static_cast<const loom_sampler_vtable*>(c2->vtable);
  CHECK((vt1->flags & LOOM_SAMPLER_SELECTS) != 0);

  loom_host_api host = make_host();
  FakeCtx ctx1, ctx2;
  void* a = nullptr;
  void* b = nullptr;
  REQUIRE(vt1->life.create(&host, as_ctx(&ctx1), &a) == LOOM_OK);
  REQUIRE(vt2->life.create(&host, as_ctx(&ctx2), &b) == LOOM_OK);
  apply_once(vt1, a);
  apply_once(vt1, a);
  auto [tokens, logprobs] = apply_once(vt1, a);
  CHECK(tokens == std::vector<int32_t>{1, 1});
  CHECK(logprobs == std::vector<float>{3.0f, 3.0f});

  loom_buffer state;
  const char* format = nullptr;
  REQUIRE(vt1->life.export_state(a, &format, &state) == LOOM_OK);
  REQUIRE(format != nullptr);
  CHECK(std::string(format) == "loom.test.counter/1");
  CHECK(state.bytes == std::string("\x03\0\0\0\0\0\0\0", 8));

  REQUIRE(vt2->life.import_state(b, format, state.bytes.data(), state.bytes.size()) == LOOM_OK);
  auto [tokens2, logprobs2] = apply_once(vt2, b);
  CHECK(tokens2 == std::vector<int32_t>{2, 2});
  CHECK(logprobs2 == std::vector<float>{4.0f, 4.0f});

  CHECK(vt2->life.import_state(b, format, state.bytes.data(), 7) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_FALSE(ctx2.error.empty());
  CHECK(vt2->life.import_state(b, "other/1", state.bytes.data(), 8) == LOOM_ERR_UNSUPPORTED);
  auto [tokens3, logprobs3] = apply_once(vt2, b);  // failed imports left the counter alone
  CHECK(logprobs3 == std::vector<float>{5.0f, 5.0f});

  FakeCtx refusing;
  refusing.bools["fail_import"] = 1;
  void* c = nullptr;
  REQUIRE(vt2->life.create(&host, as_ctx(&refusing), &c) == LOOM_OK);
  CHECK(vt2->life.import_state(c, format, state.bytes.data(), 8) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(refusing.error.find("fail_import") != std::string::npos);

  vt1->life.destroy(a);
  vt2->life.destroy(b);
  vt2->life.destroy(c);
}

TEST_CASE("misc: create-fails fails with its message, echo echoes", "[plugins]") {
  Library lib(plugin("misc/libloom-test-misc.so"));
  REQUIRE(lib.handle != nullptr);
  const loom_plugin_desc* d = lib.desc();
  REQUIRE(d->component_count == 4);
  // (the fourth, drafter "sampled-drafts", is exercised by core_speculative_test)
  CHECK(std::string(d->components[3]->name) == "sampled-drafts");
  CHECK(d->components[3]->kind == LOOM_KIND_DRAFTER);
  loom_host_api host = make_host();

  const loom_component_desc* fails = d->components[0];
  CHECK(std::string(fails->name) == "create-fails");
  CHECK(fails->kind == LOOM_KIND_SAMPLER);
  FakeCtx ctx;
  void* inst = reinterpret_cast<void*>(uintptr_t{1});
  auto svt = static_cast<const loom_sampler_vtable*>(fails->vtable);
  CHECK(svt->life.create(&host, as_ctx(&ctx), &inst) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(ctx.error == "create-fails: refused on purpose");
  CHECK(inst == reinterpret_cast<void*>(uintptr_t{1}));

  const loom_component_desc* echo = d->components[1];
  CHECK(std::string(echo->name) == "echo");
  REQUIRE(echo->kind == LOOM_KIND_TOOL);
  auto tvt = static_cast<const loom_tool_vtable*>(echo->vtable);
  FakeCtx ectx;
  void* t = nullptr;
  REQUIRE(tvt->life.create(&host, as_ctx(&ectx), &t) == LOOM_OK);
  uint32_t count = 0;
  REQUIRE(tvt->tool_count(t, &count) == LOOM_OK);
  CHECK(count == 1);
  loom_tool_info info{};
  REQUIRE(tvt->tool_info(t, 0, &info) == LOOM_OK);
  CHECK(std::string(info.name) == "echo");
  loom_buffer content;
  loom_tool_result result{sizeof(loom_tool_result), &content, 1};
  REQUIRE(tvt->call(t, "echo", "{\"x\": [1, 2]}", &result) == LOOM_OK);
  CHECK(content.bytes == "{\"x\": [1, 2]}");
  CHECK(result.is_error == 0);
  CHECK(tvt->call(t, "nope", "{}", &result) == LOOM_ERR_NOT_FOUND);
  tvt->life.destroy(t);
}

TEST_CASE("misc: bad-value names its key through set_config_error, and only where the host has it", "[plugins]") {
  Library lib(plugin("misc/libloom-test-misc.so"));
  REQUIRE(lib.handle != nullptr);
  const loom_component_desc* bad = lib.desc()->components[2];
  CHECK(std::string(bad->name) == "bad-value");
  auto vt = static_cast<const loom_sampler_vtable*>(bad->vtable);
  loom_host_api host = make_host();
  auto create = [&](const loom_host_api& h, const std::string& mode) {
    FakeCtx ctx;
    ctx.strings = {{"key", "level"}, {"mode", mode}};
    void* inst = nullptr;
    CHECK(vt->life.create(&h, as_ctx(&ctx), &inst) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK(inst == nullptr);
    return ctx;
  };
  FakeCtx c = create(host, "config-error");
  CHECK(c.error == "the value is refused on purpose");
  CHECK(c.error_key == "level");
  c = create(host, "null-key");
  CHECK(c.error_key == "(null)");
  c = create(host, "then-set-error");
  CHECK(c.error == "a later error about no key");
  CHECK(c.error_key.empty());

  // A host of ABI 1.2 has a table that ends before set_config_error: the plugin must fall back to
  // set_error and never read past the table.
  loom_host_api old_host = host;
  old_host.struct_size = offsetof(loom_host_api, set_config_error);
  old_host.abi_minor = 2;
  old_host.set_config_error = [](loom_host_ctx* ctx, const char*, const char*) {
    fake(ctx)->error_key = "read past an old host's table";
  };
  c = create(old_host, "config-error");
  CHECK(c.error == "the value is refused on purpose");
  CHECK(c.error_key.empty());
}

TEST_CASE("bad libraries have exactly their defect", "[plugins]") {
  {
    Library lib(plugin("bad/libnot-a-plugin.so"));
    REQUIRE(lib.handle != nullptr);
    CHECK(dlsym(lib.handle, LOOM_PLUGIN_ENTRY_SYMBOL) == nullptr);
    CHECK(dlsym(lib.handle, "loom_test_not_a_plugin") != nullptr);
  }
  {
    Library lib(plugin("bad/libwrong-abi.so"));
    REQUIRE(lib.handle != nullptr);
    CHECK(lib.desc()->abi_major == 99u);
  }
  {
    Library lib(plugin("bad/libnull-desc.so"));
    REQUIRE(lib.handle != nullptr);
    CHECK(lib.desc() == nullptr);
  }
  {
    Library lib(plugin("bad/libabsurd-sizes.so"));
    REQUIRE(lib.handle != nullptr);
    CHECK(lib.desc()->struct_size == 0xFFFFFFF0u);
  }
  {
    Library lib(plugin("bad/libhuge-count.so"));
    REQUIRE(lib.handle != nullptr);
    CHECK(lib.desc()->component_count == (1u << 30));
    CHECK(lib.desc()->components == nullptr);
  }
  {
    Library lib(plugin("bad/libbad-component.so"));
    REQUIRE(lib.handle != nullptr);
    const loom_plugin_desc* d = lib.desc();
    REQUIRE(d->component_count == 3);
    CHECK(d->components[0]->kind == 42);
    CHECK(d->components[0]->vtable != nullptr);
    CHECK(d->components[1]->vtable == nullptr);
    CHECK(d->components[2]->name == nullptr);
  }
  {
    Library lib(plugin("bad/libnot-elf.so"));
    CHECK(lib.handle == nullptr);
  }
}
