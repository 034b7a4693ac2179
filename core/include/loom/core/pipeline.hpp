// loom::Pipeline: the component instances of a manifest, in slots, with their lifetimes and
// hot swaps.
//
// Instances are created in manifest order and destroyed in reverse. Work runs in steps: a driver
// holds a Step guard while it calls into instances, and swap() waits for the step in progress to
// end, so a swap always happens at a safe point between steps.
// Thread-safety: at(), list() and swap() may be called from any thread; swap() blocks until no
// Step guard is held. Calls into instances are the caller's to serialise within a step.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/instance.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/registry.hpp"

namespace loom {

struct SwapReport {
  std::string slot;
  std::string old_component, new_component; // "name version (library file)"
  bool state_transferred = false;
  std::string state_format; // when transferred
  std::string note;         // why state was not carried over, if it was not
};

class Pipeline {
 public:
  Pipeline(Registry &registry, InstanceEnvironment env);
  ~Pipeline(); // destroys instances in reverse creation order
  Pipeline(const Pipeline &) = delete;
  Pipeline &operator=(const Pipeline &) = delete;

  // Creates every component of the manifest. On failure, what was created is destroyed (in
  // reverse) and the loom::Error propagates.
  void build(const Manifest &manifest);

  // The instance in a slot ("attention", "sampler[1]", or a `name`); throws loom::Error if absent.
  Instance &at(std::string_view slot) const;
  std::shared_ptr<Instance> get(std::string_view slot) const;
  // Instances of one kind, in manifest order (a sampler chain, the retrievers, ...).
  std::vector<std::shared_ptr<Instance>> list(loom_kind kind) const;
  std::vector<std::string> slots() const;

  // A new instance of `spec` that belongs to no slot (a served request's own sampler chain): the
  // caller owns it; no activate or membership hook runs. Serialised with swaps and adds (the
  // registry may rescan). Throws loom::Error naming spec.slot.
  std::shared_ptr<Instance> create_detached(const ComponentSpec &spec);

  // Held by a driver while it runs one step.
  [[nodiscard]] std::unique_lock<std::mutex> begin_step() { return std::unique_lock(step_mutex_); }

  // Kind-specific activation of a fresh instance before it replaces `old` in a swap (attention:
  // prepare with the model's geometry; quantizer: re-quantize the weights). It may throw to veto
  // the swap; it returns an action run once the swap is committed, while `old` still lives.
  using ActivateHook = std::function<std::function<void()>(Instance &fresh, Instance &old)>;
  void set_activate_hook(loom_kind kind, ActivateHook hook);

  // Replaces the instance in `spec.slot` by a new one of the same kind, at the next safe point.
  // The new instance is created, activated and given the old one's exported state; if any of
  // that fails, the new instance is destroyed, the old one keeps serving, and loom::Error is
  // thrown. The old instance is destroyed after the swap, and its library unloaded when no other
  // instance uses it.
  SwapReport swap(const ComponentSpec &spec);
  // Membership of a list kind changing while a driver runs (adapters loaded and unloaded while
  // serving): `attach` readies a new instance (it may throw to veto the add) and returns the
  // action that commits it; `detach` runs at the safe point before an instance leaves, and must
  // not throw. A driver installs them under the step lock, as it does activate hooks.
  struct MembershipHooks {
    std::function<std::function<void()>(Instance &fresh)> attach;
    std::function<void(Instance &leaving)> detach;
  };
  void set_membership_hooks(loom_kind kind, MembershipHooks hooks);
  // Creates an instance in a new slot, spec.slot (a list kind: sampler, adapter, retriever,
  // tool; the slot must be free), and adds it at the next safe point, after the kind's others.
  // When creating or attaching fails, nothing changes and loom::Error is thrown. `first`: before
  // the kind's others instead (a sampler that must see the logits before the chain's links:
  // the agent loop's grammar).
  void add(const ComponentSpec &spec, bool first = false);
  // Takes the instance in `slot` out at the next safe point (after its kind's detach hook); it is
  // destroyed when no caller holds it any more. Throws loom::Error when the slot is empty.
  void remove(std::string_view slot);
  // How many swaps (and adds and removes) have landed so far: a driver that queued work ahead of a step (the decoder's
  // next forward pass) compares it to know whether a swap landed in between, and redoes it.
  uint64_t swaps() const { return swaps_.load(std::memory_order_acquire); }

 private:
  struct Slot {
    std::string name;
    loom_kind kind;
    std::shared_ptr<Instance> instance;
  };
  std::shared_ptr<Instance> create(const ComponentSpec &spec);

  Registry &registry_;
  InstanceEnvironment env_;
  mutable std::mutex slots_mutex_; // guards slots_ and hooks_
  std::vector<Slot> slots_;        // creation order
  std::vector<std::pair<loom_kind, ActivateHook>> hooks_;
  std::vector<std::pair<loom_kind, MembershipHooks>> membership_hooks_;
  std::mutex step_mutex_;
  std::mutex swap_mutex_; // one swap at a time
  std::atomic<uint64_t> swaps_{0};
};

} // namespace loom
