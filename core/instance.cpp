#include "loom/core/instance.hpp"

#include <filesystem>
#include <string_view>

#include "loom/core/error.hpp"
#include "loom/retriever.h"
#include "loom/sampler.h"

namespace loom {

const char *status_name(loom_status status) {
  switch (status) {
  case LOOM_OK: return "ok";
  case LOOM_ERR_INVALID_ARGUMENT: return "invalid argument";
  case LOOM_ERR_OUT_OF_MEMORY: return "out of memory";
  case LOOM_ERR_UNSUPPORTED: return "unsupported";
  case LOOM_ERR_NOT_FOUND: return "not found";
  case LOOM_ERR_CANCELLED: return "cancelled";
  case LOOM_ERR_BUFFER_TOO_SMALL: return "buffer too small";
  case LOOM_ERR_IO: return "I/O error";
  case LOOM_ERR_DEVICE: return "device error";
  case LOOM_ERR_INTERNAL: return "internal error";
  default: return "unknown status";
  }
}

namespace {

// True when `key` is a declared parameter of `component` or a path inside one ("bias[1].value"
// inside "bias"): parameter keys are bare TOML keys, so a path's first segment is one.
bool is_declared(const loom_component_desc &component, std::string_view key) {
  const std::string_view root = key.substr(0, key.find_first_of(".["));
  for (uint32_t i = 0; i < component.param_count; ++i)
    if (root == component.params[i].key) return true;
  return false;
}

} // namespace

std::unique_ptr<Instance> Instance::create(const ComponentRef &ref, const ComponentSpec &spec,
                                           const InstanceEnvironment &env) {
  auto config = spec.table->resolve(*ref.component, spec.slot);
  std::unique_ptr<Instance> inst(new Instance());
  inst->library_ = ref.library;
  inst->desc_ = ref.component;
  inst->ctx_ = std::make_unique<loom_host_ctx>();
  inst->ctx_->kind = kind_name(spec.kind);
  inst->ctx_->slot = spec.slot;
  inst->ctx_->component = ref.component->name;
  inst->ctx_->config = std::move(config);
  inst->ctx_->weights = spec.weights;
  inst->ctx_->device = env.device;
  inst->ctx_->metrics = env.metrics;
  inst->ctx_->cancelled = env.cancelled;
  inst->ctx_->vocabulary = env.vocabulary;
  inst->ctx_->models = env.models;
  void *handle = nullptr;
  loom_status status = inst->lifecycle().create(host_api(), inst->ctx_.get(), &handle);
  if (status != LOOM_OK || handle == nullptr) {
    std::string key;
    std::string message = inst->ctx_->take_error(&key);
    if (message.empty()) message = status == LOOM_OK ? "create() returned no instance" : status_name(status);
    inst->handle_ = nullptr;
    // A message the plugin tied to a config key (set_config_error) is about that value: point at
    // it (file:line:col of the value, slot.key), as the manifest checks do, when the key is a
    // declared parameter or a path inside one and the manifest sets it. Any other key stays a
    // plain message at the table.
    std::string where = spec.table->where(), label = spec.slot;
    if (!key.empty() && is_declared(*ref.component, key) && spec.table->where(key) != where) {
      where = spec.table->where(key);
      label += "." + key;
    }
    throw plugin_error(where + ": " + label + " (" + ref.component->name + " from " +
                       ref.library->path().filename().string() + "): create failed: " + message);
  }
  inst->handle_ = handle;
  if (!spec.index.empty()) {  // a saved index, for a retriever (the manifest allows it nowhere else)
    const auto *vt = static_cast<const loom_retriever_vtable *>(ref.component->vtable);
    const std::filesystem::path dir = spec.index / spec.slot;
    std::string message;
    if (vt->load == nullptr) message = "this retriever keeps its index in memory only";
    else if (std::error_code ec; !std::filesystem::is_directory(dir, ec))
      message = "no saved index at '" + dir.string() + "' (loom index build --out " + spec.index.string() + " first)";
    else if (const loom_status s = vt->load(handle, dir.string().c_str()); s != LOOM_OK) {
      message = inst->ctx_->take_error();
      if (message.empty()) message = status_name(s);
    }
    if (!message.empty())
      throw plugin_error(spec.table->where("index") + ": " + spec.slot + ".index (" + ref.component->name + "): " + message);
  }
  return inst;
}

Instance::~Instance() {
  if (handle_ != nullptr) lifecycle().destroy(handle_);
}

const loom_lifecycle &Instance::lifecycle() const {
  // Every kind's vtable is {uint32_t struct_size; loom_lifecycle life; ...}.
  return static_cast<const loom_sampler_vtable *>(desc_->vtable)->life;
}

void Instance::check(loom_status status, const char *call) const {
  if (status == LOOM_OK) return;
  std::string message = last_error();
  throw runtime_error(slot() + " (" + desc_->name + "): " + call + " failed: " +
                          (message.empty() ? status_name(status) : message),
                      status);
}

} // namespace loom
