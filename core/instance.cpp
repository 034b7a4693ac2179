#include "loom/core/instance.hpp"

#include "loom/core/error.hpp"
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
  inst->ctx_->device = env.device;
  inst->ctx_->metrics = env.metrics;
  inst->ctx_->cancelled = env.cancelled;
  inst->ctx_->vocabulary = env.vocabulary;
  void *handle = nullptr;
  loom_status status = inst->lifecycle().create(host_api(), inst->ctx_.get(), &handle);
  if (status != LOOM_OK || handle == nullptr) {
    std::string message = inst->ctx_->take_error();
    if (message.empty()) message = status == LOOM_OK ? "create() returned no instance" : status_name(status);
    inst->handle_ = nullptr;
    // A message that begins "<component>: <parameter> ..." is about that parameter's value:
    // point at it (file:line:col of the value, slot.key), as the manifest checks do.
    std::string where = spec.table->where(), label = spec.slot;
    const std::string prefix = std::string(ref.component->name) + ": ";
    if (message.rfind(prefix, 0) == 0) {
      const size_t end = message.find_first_of(" :", prefix.size());
      const std::string key = message.substr(prefix.size(), end == std::string::npos ? std::string::npos : end - prefix.size());
      for (uint32_t i = 0; i < ref.component->param_count; ++i)
        if (key == ref.component->params[i].key && spec.table->where(key) != spec.table->where()) {
          where = spec.table->where(key);
          label += "." + key;
          break;
        }
    }
    throw plugin_error(where + ": " + label + " (" + ref.component->name + " from " +
                       ref.library->path().filename().string() + "): create failed: " + message);
  }
  inst->handle_ = handle;
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
