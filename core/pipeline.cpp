#include "loom/core/pipeline.hpp"

#include "loom/core/error.hpp"
#include "loom/core/host_buffer.hpp"

namespace loom {

Pipeline::Pipeline(Registry &registry, InstanceEnvironment env) : registry_(registry), env_(env) {}

Pipeline::~Pipeline() {
  std::lock_guard lock(slots_mutex_);
  while (!slots_.empty()) slots_.pop_back();
}

std::shared_ptr<Instance> Pipeline::create(const ComponentSpec &spec) {
  ComponentRef ref = registry_.find(spec.kind, spec.use, spec.version_range, spec.library);
  return std::shared_ptr<Instance>(Instance::create(ref, spec, env_));
}

std::shared_ptr<Instance> Pipeline::create_detached(const ComponentSpec &spec) {
  std::lock_guard swap_lock(swap_mutex_);
  if (spec.library.empty()) registry_.scan();
  return create(spec);
}

void Pipeline::build(const Manifest &manifest) {
  std::vector<Slot> built;
  try {
    for (const auto &spec : manifest.components) built.push_back({spec.slot, spec.kind, create(spec)});
  } catch (...) {
    while (!built.empty()) built.pop_back();
    throw;
  }
  std::lock_guard lock(slots_mutex_);
  for (auto &s : built) slots_.push_back(std::move(s));
}

std::shared_ptr<Instance> Pipeline::get(std::string_view slot) const {
  std::lock_guard lock(slots_mutex_);
  for (const auto &s : slots_)
    if (s.name == slot) return s.instance;
  std::string known;
  for (const auto &s : slots_) known += (known.empty() ? "" : ", ") + s.name;
  throw runtime_error("no component in slot '" + std::string(slot) + "' (slots: " + (known.empty() ? "none" : known) + ")",
                      LOOM_ERR_NOT_FOUND);
}

Instance &Pipeline::at(std::string_view slot) const { return *get(slot); }

std::vector<std::shared_ptr<Instance>> Pipeline::list(loom_kind kind) const {
  std::lock_guard lock(slots_mutex_);
  std::vector<std::shared_ptr<Instance>> out;
  for (const auto &s : slots_)
    if (s.kind == kind) out.push_back(s.instance);
  return out;
}

std::vector<std::string> Pipeline::slots() const {
  std::lock_guard lock(slots_mutex_);
  std::vector<std::string> out;
  for (const auto &s : slots_) out.push_back(s.name);
  return out;
}

namespace {

// A driver's hook per kind: set (replacing the kind's), and looked up (a copy: empty when none).
template <class H> void set_for_kind(std::vector<std::pair<loom_kind, H>> &hooks, loom_kind kind, H hook) {
  for (auto &h : hooks)
    if (h.first == kind) {
      h.second = std::move(hook);
      return;
    }
  hooks.emplace_back(kind, std::move(hook));
}
template <class H> H for_kind(const std::vector<std::pair<loom_kind, H>> &hooks, loom_kind kind) {
  for (const auto &h : hooks)
    if (h.first == kind) return h.second;
  return {};
}

} // namespace

void Pipeline::set_activate_hook(loom_kind kind, ActivateHook hook) {
  std::lock_guard lock(slots_mutex_);
  set_for_kind(hooks_, kind, std::move(hook));
}

namespace {
std::string describe(const Instance &i) {
  return std::string(i.desc().name) + " " + i.desc().version + " (" + i.library().path().filename().string() + ")";
}
} // namespace

void Pipeline::set_membership_hooks(loom_kind kind, MembershipHooks hooks) {
  std::lock_guard lock(slots_mutex_);
  set_for_kind(membership_hooks_, kind, std::move(hooks));
}

void Pipeline::add(const ComponentSpec &spec, bool first) {
  std::lock_guard swap_lock(swap_mutex_);
  if (!kind_is_list(spec.kind))
    throw runtime_error("add " + spec.slot + ": only list kinds (sampler, adapter, retriever, tool) take new slots; a " +
                        std::string(kind_name(spec.kind)) + " is swapped");
  {
    std::lock_guard lock(slots_mutex_);
    for (const auto &s : slots_)
      if (s.name == spec.slot) throw runtime_error("add " + spec.slot + ": the slot is taken (by " + describe(*s.instance) + ")");
  }
  if (spec.library.empty()) registry_.scan();
  std::shared_ptr<Instance> fresh = create(spec);
  auto step = begin_step();
  MembershipHooks hooks;
  {
    std::lock_guard lock(slots_mutex_);
    hooks = for_kind(membership_hooks_, spec.kind);
  }
  std::function<void()> commit;
  if (hooks.attach) commit = hooks.attach(*fresh); // may veto: `fresh` is destroyed on unwind
  {
    std::lock_guard lock(slots_mutex_);
    // After the last instance of its kind (or before the first), so that list() keeps the
    // others' order.
    auto at = slots_.end();
    for (auto it = slots_.begin(); it != slots_.end(); ++it)
      if (it->kind == spec.kind) {
        at = first ? it : std::next(it);
        if (first) break;
      }
    slots_.insert(at, Slot{spec.slot, spec.kind, fresh});
  }
  swaps_.fetch_add(1, std::memory_order_release);
  if (commit) commit();
}

void Pipeline::remove(std::string_view slot) {
  std::lock_guard swap_lock(swap_mutex_);
  std::shared_ptr<Instance> leaving = get(slot);
  auto step = begin_step();
  MembershipHooks hooks;
  {
    std::lock_guard lock(slots_mutex_);
    hooks = for_kind(membership_hooks_, leaving->desc().kind);
  }
  if (hooks.detach) hooks.detach(*leaving);
  {
    std::lock_guard lock(slots_mutex_);
    std::erase_if(slots_, [&](const Slot &s) { return s.name == slot; });
  }
  swaps_.fetch_add(1, std::memory_order_release);
}


SwapReport Pipeline::swap(const ComponentSpec &spec) {
  std::lock_guard swap_lock(swap_mutex_);
  std::shared_ptr<Instance> old = get(spec.slot);
  if (old->desc().kind != spec.kind)
    throw runtime_error("swap " + spec.slot + ": slot holds a " + kind_name(old->desc().kind) + ", not a " + kind_name(spec.kind));
  // Pick up libraries that appeared or were rebuilt since the last scan.
  if (spec.library.empty()) registry_.scan();

  // Everything that can fail happens before the safe point, except state transfer and
  // activation, which need the old instance quiet.
  std::shared_ptr<Instance> fresh = create(spec);

  SwapReport report;
  report.slot = spec.slot;
  report.old_component = describe(*old);
  report.new_component = describe(*fresh);

  auto step = begin_step(); // the safe point: no step is running from here on
  // The hook is looked up at the safe point: a driver installs and removes hooks under the
  // step lock, so the one found here matches the driver's state.
  ActivateHook hook;
  {
    std::lock_guard lock(slots_mutex_);
    hook = for_kind(hooks_, spec.kind);
  }
  const loom_lifecycle &from = old->lifecycle();
  const loom_lifecycle &to = fresh->lifecycle();
  if (from.export_state != nullptr) {
    HostBuffer state;
    const char *format = nullptr;
    old->check(from.export_state(old->handle(), &format, state.abi()), "export_state");
    std::string format_name = format ? format : "";
    if (to.import_state == nullptr) {
      report.note = "the new component keeps no state; " + format_name + " state dropped";
    } else {
      loom_status s = to.import_state(fresh->handle(), format ? format : "", state.view().data(), state.view().size());
      if (s == LOOM_ERR_UNSUPPORTED) {
        report.note = "the new component does not read state format '" + format_name + "'; state dropped";
        (void)fresh->last_error();
      } else {
        fresh->check(s, "import_state"); // vetoes the swap: `fresh` is destroyed on unwind
        report.state_transferred = true;
        report.state_format = format_name;
      }
    }
  } else {
    report.note = "the old component keeps no state";
  }
  std::function<void()> commit;
  if (hook) commit = hook(*fresh, *old);
  {
    std::lock_guard lock(slots_mutex_);
    for (auto &s : slots_)
      if (s.name == spec.slot) s.instance = fresh;
  }
  swaps_.fetch_add(1, std::memory_order_release);
  if (commit) commit();
  old.reset(); // destroyed here unless a caller still holds it; its library goes with the last user
  return report;
}

} // namespace loom
