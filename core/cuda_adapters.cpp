// CudaAdapters (cuda_adapters.hpp): the adapters' gathered groups on the CUDA backend.
#include "cuda_adapters.hpp"

#include <algorithm>

#include "adapter_sites.hpp"
#include "adapter_weights.hpp"
#include "loom/core/error.hpp"

namespace loom {

CudaAdapters::CudaAdapters(const ModelConfig &config, DLDevice device, DLDataType act, std::string source_name)
    : config_(config), device_(device), act_(act), source_name_(std::move(source_name)) {
  const int64_t H = config.hidden_size, D = config.head_dim, I = config.intermediate_size;
  const int64_t q_out = config.n_heads * D, kv_out = config.n_kv_heads * D;
  struct Shape {
    const char *name;
    int64_t in, out;
  };
  const Shape shapes[kModules] = {{"self_attn.q_proj", H, q_out}, {"self_attn.k_proj", H, kv_out}, {"self_attn.v_proj", H, kv_out},
                                  {"self_attn.o_proj", q_out, H}, {"mlp.gate_proj", H, I},         {"mlp.up_proj", H, I},
                                  {"mlp.down_proj", I, H}};
  for (int64_t l = 0; l < config.n_layers; ++l)
    for (const Shape &s : shapes)
      modules_.push_back(Site{"model.layers." + std::to_string(l) + "." + s.name, s.in, s.out, {}, nullptr});
}

CudaAdapters::~CudaAdapters() { free_groups(); }

std::vector<loom_adapter_site *> CudaAdapters::attach(Instance &adapter) const {
  const std::string who = source_name_ + ": " + adapter.slot() + " (" + adapter.desc().name + ")";
  const auto *ext = adapter_gathered(adapter);
  if (ext == nullptr)
    throw runtime_error(who + ": this adapter has no CUDA path (" + LOOM_ADAPTER_GATHERED_EXTENSION +
                        "); run it on the CPU backend (loom.device = \"cpu\")");
  if (gathered_ != nullptr && ext != gathered_)
    throw runtime_error(who + ": adapters from different libraries cannot share a batch on CUDA");
  if (config_.architecture == Architecture::gpt2)
    throw runtime_error(who + ": adapters on GPT-2 run on the CPU backend only");
  const auto *vt = adapter.vtable<loom_adapter_vtable>();
  if (vt->targets(adapter.handle(), "lm_head"))
    throw runtime_error(who + ": an adapter on the LM head is not supported on CUDA");
  std::vector<loom_adapter_site *> sites(modules_.size(), nullptr);
  bool any = false;
  for (size_t i = 0; i < modules_.size(); ++i) {
    const Site &m = modules_[i];
    if (!vt->targets(adapter.handle(), m.name.c_str())) continue;
    sites[i] = attach_adapter_site(adapter, m.name, m.in, m.out, act_, device_, LOOM_ADAPTER_SITE_LINEAR);
    any = true;
  }
  if (!any) throw runtime_error(who + ": its target modules match none of the model's linears");
  load_adapter_weights(adapter); // [[adapter]] weights = "dir", once every site exists
  return sites;
}

void CudaAdapters::commit(std::shared_ptr<Instance> adapter, std::vector<loom_adapter_site *> sites, const Instance *replacing) {
  if (gathered_ == nullptr) gathered_ = adapter_gathered(*adapter);
  auto at = std::find_if(adapters_.begin(), adapters_.end(), [&](const auto &a) { return a.get() == replacing; });
  const size_t k = replacing != nullptr && at != adapters_.end() ? static_cast<size_t>(at - adapters_.begin()) : adapters_.size();
  if (k == adapters_.size()) {
    adapters_.push_back(std::move(adapter));
    for (size_t i = 0; i < modules_.size(); ++i) modules_[i].sites.push_back(sites[i]);
  } else {
    adapters_[k] = std::move(adapter);
    for (size_t i = 0; i < modules_.size(); ++i) modules_[i].sites[k] = sites[i];
  }
  on_ = true;
}

void CudaAdapters::remove(const Instance *adapter) {
  auto at = std::find_if(adapters_.begin(), adapters_.end(), [&](const auto &a) { return a.get() == adapter; });
  if (at == adapters_.end()) return;
  const auto k = at - adapters_.begin();
  free_groups(); // their tables name the leaving adapter's device memory
  adapters_.erase(at);
  for (Site &m : modules_) m.sites.erase(m.sites.begin() + k);
  on_ = !adapters_.empty();
}

Instance *CudaAdapters::site_owner(const Site &m) const {
  const auto first = std::find_if(m.sites.begin(), m.sites.end(), [](loom_adapter_site *s) { return s != nullptr; });
  return first == m.sites.end() ? nullptr : adapters_[static_cast<size_t>(first - m.sites.begin())].get();
}

void CudaAdapters::free_groups() {
  for (Site &m : modules_) {
    if (m.group != nullptr && gathered_ != nullptr) gathered_->free_group(m.group);
    m.group = nullptr;
  }
}

void CudaAdapters::rebuild(int64_t max_rows) {
  free_groups();
  rows_ = max_rows;
  if (!on_ || max_rows < 1) return;
  std::vector<void *> handles;
  for (const auto &a : adapters_) handles.push_back(a->handle());
  for (Site &m : modules_) {
    Instance *owner = site_owner(m);
    if (owner == nullptr) continue;
    owner->check(gathered_->create_group(handles.data(), m.sites.data(), static_cast<int32_t>(m.sites.size()), max_rows, &m.group),
                ("group " + m.name).c_str());
  }
}

int32_t CudaAdapters::row_index(int32_t choice) const {
  if (choice == -2) return -1; // StepBatch::kNoAdapter
  if (choice == -1) {          // StepBatch::kEveryAdapter
    if (adapters_.size() > 1)
      throw runtime_error(source_name_ + ": a request runs with every one of " + std::to_string(adapters_.size()) +
                          " adapters; on CUDA each request chooses one (ServeRequest::adapter)");
    return adapters_.empty() ? -1 : 0;
  }
  if (choice < 0 || choice >= static_cast<int32_t>(adapters_.size()))
    throw runtime_error(source_name_ + ": a step names adapter " + std::to_string(choice) + " of " + std::to_string(adapters_.size()));
  return choice;
}

void CudaAdapters::apply(int32_t layer, const Module *ms, const int64_t *col0s, int count, const void *x, DLDataType x_type,
                         void *y, DLDataType y_type, int64_t y_stride, int32_t T, const int32_t *d_rows) {
  constexpr int kMax = 4;
  int64_t x_shape[kMax][2], y_shape[kMax][2], y_strides[2] = {y_stride, 1}, r_shape[1] = {T};
  DLTensor xt[kMax], yt[kMax];
  loom_adapter_io ios[kMax];
  const loom_adapter_io *io_ptrs[kMax];
  loom_adapter_group *groups[kMax];
  Instance *owner = nullptr; // errors are reported through a group's first instance
  const std::string *named[kMax];
  int n = 0;
  for (int i = 0; i < count && i < kMax; ++i) {
    Site &site = modules_[static_cast<size_t>(layer) * kModules + ms[i]];
    if (site.group == nullptr) continue;
    x_shape[n][0] = y_shape[n][0] = T;
    x_shape[n][1] = site.in;
    y_shape[n][1] = site.out;
    xt[n] = DLTensor{const_cast<void *>(x), device_, 2, x_type, x_shape[n], nullptr, 0};
    yt[n] = DLTensor{y, device_, 2, y_type, y_shape[n], y_strides, static_cast<uint64_t>(col0s[i]) * (y_type.bits / 8)};
    ios[n] = loom_adapter_io{};
    ios[n].struct_size = sizeof(loom_adapter_io);
    ios[n].x = &xt[n];
    ios[n].y = &yt[n];
    io_ptrs[n] = &ios[n];
    groups[n] = site.group;
    if (owner == nullptr) owner = site_owner(site);
    named[n] = &site.name;
    ++n;
  }
  if (n == 0) return;
  DLTensor rt{const_cast<int32_t *>(d_rows), device_, 1, DLDataType{kDLInt, 32, 1}, r_shape, nullptr, 0};
  // (The message is made on failure only: this runs for every module group of every step.)
  auto check = [&](loom_status status) {
    if (status == LOOM_OK) return;
    std::string what = "adapters on";
    for (int i = 0; i < n; ++i) what += (i ? ", " : " ") + *named[i];
    owner->check(status, what.c_str());
  };
  if (n > 1 && LOOM_HAS_FIELD(gathered_, loom_adapter_gathered_ext, forward_groups) && gathered_->forward_groups != nullptr) {
    check(gathered_->forward_groups(groups, io_ptrs, n, &rt));
    return;
  }
  for (int i = 0; i < n; ++i) check(gathered_->forward_group(groups[i], io_ptrs[i], &rt));
}

} // namespace loom
