// loom::Instance: one live component instance, created from a manifest table.
//
// Ownership: the Instance owns the plugin's instance handle and its HostContext, and holds a
// shared reference to the library the component came from. Destruction calls the plugin's
// destroy() first and only then lets the library go, so no call reaches an unloaded library.
// Thread-safety: the Instance adds no locking. Callers serialise calls to instances whose
// component is LOOM_THREADING_SERIAL: today one driver thread calls into instances per step,
// and swaps touch instances only at the step boundary.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "loom/core/host_context.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/registry.hpp"
#include "loom/plugin.h"

namespace loom {

class VocabularySlot;

class ModelHost;

struct InstanceEnvironment {
  DLDevice device{kDLCPU, 0};
  Metrics *metrics = nullptr;
  const std::atomic<bool> *cancelled = nullptr;
  const VocabularySlot *vocabulary = nullptr; // the model's tokens, for the vocabulary extension
  const ModelHost *models = nullptr;          // models plugins may run (loom.host.models/1)
};

class Instance {
 public:
  // Validates the spec's table against the component, then calls create(). Throws loom::Error:
  // manifest for a bad table, plugin when create() fails (with the plugin's own message, at the
  // manifest value it named through set_config_error when that is a parameter the table sets).
  static std::unique_ptr<Instance> create(const ComponentRef &ref, const ComponentSpec &spec,
                                          const InstanceEnvironment &env);
  ~Instance();
  Instance(const Instance &) = delete;
  Instance &operator=(const Instance &) = delete;

  void *handle() const { return handle_; }
  template <class VT> const VT *vtable() const { return static_cast<const VT *>(desc_->vtable); }
  const loom_lifecycle &lifecycle() const;
  // The instance's extension table `id` (lifecycle get_extension), as T; nullptr when the
  // component has no get_extension or does not offer the id. Callers check its fields with
  // LOOM_HAS_FIELD.
  template <class T> const T *extension(const char *id) const {
    const loom_lifecycle &life = lifecycle();
    return life.get_extension == nullptr ? nullptr : static_cast<const T *>(life.get_extension(handle_, id));
  }
  const loom_component_desc &desc() const { return *desc_; }
  const PluginLibrary &library() const { return *library_; }
  loom_host_ctx *ctx() const { return ctx_.get(); }
  const loom_host_api *host() const { return host_api(); }
  const std::string &slot() const { return ctx_->slot; }
  // The plugin's last set_error() or set_config_error() message (cleared by reading, with its
  // key), or "" when none.
  std::string last_error() const { return ctx_->take_error(); }
  // Throws loom::Error (runtime) "slot (component): call: message" unless status is LOOM_OK.
  void check(loom_status status, const char *call) const;

 private:
  Instance() = default;
  std::shared_ptr<PluginLibrary> library_; // declared first: released last
  std::unique_ptr<loom_host_ctx> ctx_;
  const loom_component_desc *desc_ = nullptr;
  void *handle_ = nullptr;
};

const char *status_name(loom_status status);

} // namespace loom
