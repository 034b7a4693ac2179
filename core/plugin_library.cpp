#include "loom/core/plugin_library.hpp"

#define BOOST_DLL_USE_STD_FS 1
#include <boost/dll/shared_library.hpp>

#include <cstring>
#include <system_error>

#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

struct PluginLibrary::Handle {
  boost::dll::shared_library library;
};

namespace {

// Anything larger is not a descriptor this host could have been built against: a corrupted or
// hostile library. Checked before any field past struct_size is read.
constexpr uint32_t kMaxStructSize = 64 * 1024;
constexpr uint32_t kMaxComponents = 1024;
constexpr uint32_t kMaxParams = 256;
constexpr size_t kMaxString = 4096;

// A bounded string check: descriptor strings must be short, NUL-terminated and non-empty.
bool sane_string(const char *s, size_t max = kMaxString) {
  return s != nullptr && s[0] != '\0' && strnlen(s, max + 1) <= max;
}

bool sane_name(const char *s) {
  if (!sane_string(s, 128)) return false;
  for (const char *p = s; *p; ++p) {
    char c = *p;
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

// Parameter keys are single TOML bare keys, so that "a.b" or "x[0]" paths cannot be mistaken for them.
bool key_chars_only(const char *s) {
  for (const char *p = s; *p; ++p) {
    char c = *p;
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

// Size of the v1 vtable of each kind: the least a library built for ABI 1.x can provide.
size_t v1_vtable_size(loom_kind kind) {
  switch (kind) {
  case LOOM_KIND_ATTENTION: return sizeof(loom_attention_vtable);
  case LOOM_KIND_QUANTIZER: return sizeof(loom_quantizer_vtable);
  case LOOM_KIND_ADAPTER: return sizeof(loom_adapter_vtable);
  case LOOM_KIND_SAMPLER: return sizeof(loom_sampler_vtable);
  case LOOM_KIND_PARALLEL: return sizeof(loom_parallel_vtable);
  case LOOM_KIND_RETRIEVER: return sizeof(loom_retriever_vtable);
  case LOOM_KIND_TOOL: return sizeof(loom_tool_vtable);
  case LOOM_KIND_DRAFTER: return sizeof(loom_drafter_vtable);
  default: return 0;
  }
}

// The calls without which a component of the kind cannot do its job.
std::string missing_required_call(loom_kind kind, const void *vt) {
  auto need = [](const void *fn, const char *name) { return fn ? std::string() : std::string(name); };
  std::string m;
  switch (kind) {
  case LOOM_KIND_ATTENTION: {
    auto v = static_cast<const loom_attention_vtable *>(vt);
    m = need(reinterpret_cast<const void *>(v->prepare), "prepare");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->forward), "forward");
    break;
  }
  case LOOM_KIND_QUANTIZER: {
    auto v = static_cast<const loom_quantizer_vtable *>(vt);
    m = need(reinterpret_cast<const void *>(v->quantize), "quantize");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->linear), "linear");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->free_weight), "free_weight");
    break;
  }
  case LOOM_KIND_ADAPTER: {
    auto v = static_cast<const loom_adapter_vtable *>(vt);
    m = need(reinterpret_cast<const void *>(v->targets), "targets");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->attach), "attach");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->forward), "forward");
    break;
  }
  case LOOM_KIND_SAMPLER:
    m = need(reinterpret_cast<const void *>(static_cast<const loom_sampler_vtable *>(vt)->apply), "apply");
    break;
  case LOOM_KIND_PARALLEL: {
    auto v = static_cast<const loom_parallel_vtable *>(vt);
    m = need(reinterpret_cast<const void *>(v->topology), "topology");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->all_reduce), "all_reduce");
    break;
  }
  case LOOM_KIND_RETRIEVER: {
    auto v = static_cast<const loom_retriever_vtable *>(vt);
    m = need(reinterpret_cast<const void *>(v->search), "search");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->add), "add");
    break;
  }
  case LOOM_KIND_TOOL: {
    auto v = static_cast<const loom_tool_vtable *>(vt);
    m = need(reinterpret_cast<const void *>(v->tool_count), "tool_count");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->tool_info), "tool_info");
    if (m.empty()) m = need(reinterpret_cast<const void *>(v->call), "call");
    break;
  }
  case LOOM_KIND_DRAFTER:
    m = need(reinterpret_cast<const void *>(static_cast<const loom_drafter_vtable *>(vt)->propose), "propose");
    break;
  default: break;
  }
  return m;
}

std::string check_component(const loom_component_desc *c, uint32_t index) {
  std::string where = "component #" + std::to_string(index);
  if (c == nullptr) return where + " is NULL";
  if (c->struct_size < sizeof(loom_component_desc) || c->struct_size > kMaxStructSize)
    return where + " has an absurd struct_size " + std::to_string(c->struct_size);
  if (!sane_name(c->name)) return where + " has no valid name (lowercase letters, digits, '-', '_', '.')";
  where = "component '" + std::string(c->name) + "'";
  if (c->kind < LOOM_KIND_ATTENTION || c->kind > LOOM_KIND_DRAFTER)
    return where + " has an unknown kind " + std::to_string(c->kind);
  if (!sane_string(c->version, 64) || !parse_version(c->version))
    return where + " has no valid semantic version";
  if (c->description != nullptr && strnlen(c->description, kMaxString + 1) > kMaxString)
    return where + " has an overlong description";
  if (c->param_count > kMaxParams) return where + " declares an absurd param_count " + std::to_string(c->param_count);
  if (c->param_count > 0 && c->params == nullptr) return where + " declares parameters but params is NULL";
  for (uint32_t i = 0; i < c->param_count; ++i) {
    const loom_param_desc &p = c->params[i];
    // Array elements: the host strides by its own sizeof, so the struct is frozen for major 1.
    if (p.struct_size != sizeof(loom_param_desc))
      return where + ": parameter #" + std::to_string(i) + " has struct_size " + std::to_string(p.struct_size) +
             " (loom_param_desc is " + std::to_string(sizeof(loom_param_desc)) + " bytes in ABI 1)";
    if (!sane_string(p.key, 128) || !key_chars_only(p.key))
      return where + ": parameter #" + std::to_string(i) + " has no valid key (letters, digits, '_', '-')";
    if (ComponentTable::is_reserved_key(p.key))
      return where + ": parameter '" + p.key + "' uses a reserved key (use, library, version, name)";
    if (p.type < LOOM_VALUE_BOOL || p.type > LOOM_VALUE_PATH)
      return where + ": parameter '" + p.key + "' has an unknown type " + std::to_string(p.type);
    std::string err = check_default_literal(p.default_value, p.type);
    if (!err.empty()) return where + ": parameter '" + p.key + "': " + err;
    for (uint32_t j = 0; j < i; ++j)
      if (std::strcmp(c->params[j].key, p.key) == 0) return where + ": parameter '" + p.key + "' is declared twice";
  }
  if (c->threading != LOOM_THREADING_SERIAL && c->threading != LOOM_THREADING_CONCURRENT)
    return where + " has an unknown threading value " + std::to_string(c->threading);
  if (c->vtable == nullptr) return where + " has a NULL vtable";
  uint32_t vt_size = *static_cast<const uint32_t *>(c->vtable);
  if (vt_size < v1_vtable_size(c->kind) || vt_size > kMaxStructSize)
    return where + " has a " + kind_name(c->kind) + " vtable of absurd struct_size " + std::to_string(vt_size) +
           " (ABI 1 needs at least " + std::to_string(v1_vtable_size(c->kind)) + ")";
  // Every kind's vtable starts with struct_size then a loom_lifecycle.
  const auto *life = reinterpret_cast<const loom_lifecycle *>(static_cast<const char *>(c->vtable) +
                                                               offsetof(loom_sampler_vtable, life));
  if (life->create == nullptr || life->destroy == nullptr) return where + " has no create or destroy";
  if ((life->export_state == nullptr) != (life->import_state == nullptr))
    return where + " has export_state without import_state or the reverse";
  std::string missing = missing_required_call(c->kind, c->vtable);
  if (!missing.empty()) return where + " lacks the required call " + missing;
  return {};
}

} // namespace

std::string check_plugin_descriptor(const loom_plugin_desc *d) {
  if (d == nullptr) return "loom_plugin_entry returned NULL";
  if (d->struct_size < offsetof(loom_plugin_desc, get_extension) || d->struct_size > kMaxStructSize)
    return "descriptor has an absurd struct_size " + std::to_string(d->struct_size);
  if (d->abi_major != LOOM_ABI_MAJOR)
    return "built for Loom plugin ABI " + std::to_string(d->abi_major) + "." + std::to_string(d->abi_minor) +
           ", but this host speaks ABI " + std::to_string(LOOM_ABI_MAJOR) + "." + std::to_string(LOOM_ABI_MINOR);
  if (!sane_name(d->name)) return "descriptor has no valid library name";
  if (!sane_string(d->version, 64) || !parse_version(d->version)) return "descriptor has no valid semantic version";
  if (!sane_string(d->license, 256)) return "descriptor has no license";
  if (d->component_count > kMaxComponents)
    return "descriptor declares an absurd component_count " + std::to_string(d->component_count);
  if (d->component_count > 0 && d->components == nullptr) return "descriptor declares components but the list is NULL";
  for (uint32_t i = 0; i < d->component_count; ++i) {
    std::string err = check_component(d->components[i], i);
    if (!err.empty()) return err;
    for (uint32_t j = 0; j < i; ++j)
      if (d->components[j]->kind == d->components[i]->kind && std::strcmp(d->components[j]->name, d->components[i]->name) == 0)
        return "component '" + std::string(d->components[i]->name) + "' is declared twice";
  }
  return {};
}

std::shared_ptr<PluginLibrary> PluginLibrary::open(const std::filesystem::path &path,
                                                   const std::filesystem::path &load_path) {
  auto fail = [&](const std::string &why) { return plugin_error(path.string() + ": " + why); };
  std::error_code ec;
  if (!std::filesystem::is_regular_file(load_path, ec)) throw fail("no such plugin library file");
  std::shared_ptr<PluginLibrary> lib(new PluginLibrary());
  lib->path_ = path;
  lib->mtime_ = std::filesystem::last_write_time(path, ec);
  lib->size_ = std::filesystem::file_size(path, ec);
  lib->handle_ = std::make_unique<Handle>();
  try {
    lib->handle_->library.load(load_path, boost::dll::load_mode::rtld_local | boost::dll::load_mode::rtld_now);
  } catch (const std::exception &e) {
    std::string what = e.what();
    size_t pos = what.find("dlerror system message: ");
    if (pos != std::string::npos) what = what.substr(pos + 24, what.size() - pos - 25);
    throw fail("cannot be loaded as a shared library: " + what);
  }
  if (!lib->handle_->library.has(LOOM_PLUGIN_ENTRY_SYMBOL))
    throw fail("not a Loom plugin: it exports no loom_plugin_entry");
  auto entry = lib->handle_->library.get<const loom_plugin_desc *()>(LOOM_PLUGIN_ENTRY_SYMBOL);
  const loom_plugin_desc *desc = entry();
  std::string err = check_plugin_descriptor(desc);
  if (!err.empty()) throw fail(err);
  lib->desc_ = desc;
  for (uint32_t i = 0; i < desc->component_count; ++i) lib->components_.push_back(desc->components[i]);
  return lib;
}

PluginLibrary::~PluginLibrary() = default;

Version PluginLibrary::component_version(const loom_component_desc &c) const {
  return parse_version(c.version).value_or(Version{});
}

} // namespace loom
