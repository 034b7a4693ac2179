// Private to core: a parallel component's calls as C++ (loom_parallel_vtable): its topology, its
// decisions, and its collectives over one of its groups on a flat buffer of host or device
// memory, each failure a loom::Error naming the call. DataParallel, TensorShards and
// PipelineStages speak to the component through it.
//
// Ownership: refers to the instance, which must outlive it. Thread-safety: the component's (its
// calls one at a time, and every rank making the same collectives in the same order).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "host_tensor.hpp"
#include "loom/core/error.hpp"
#include "loom/core/instance.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

class ParallelCalls {
 public:
  explicit ParallelCalls(Instance &parallel) : p_(parallel), vt_(parallel.vtable<loom_parallel_vtable>()) {}

  Instance &instance() const { return p_; }
  loom_parallel_topology topology() const {
    loom_parallel_topology t{};
    t.struct_size = sizeof(t);
    p_.check(vt_->topology(p_.handle(), &t), "topology");
    return t;
  }
  loom_shard shard(const std::string &name, const std::vector<int64_t> &shape) const {
    loom_shard s{};
    s.struct_size = sizeof(s);
    p_.check(vt_->shard(p_.handle(), name.c_str(), shape.data(), static_cast<int32_t>(shape.size()), &s), "shard");
    return s;
  }
  int32_t stage_of_layer(int64_t layer, int64_t n_layers) const {
    return vt_->stage_of_layer(p_.handle(), static_cast<int32_t>(layer), static_cast<int32_t>(n_layers));
  }

  template <class T>
  void all_reduce(loom_group group, T *data, size_t count, loom_reduce_op op = LOOM_REDUCE_SUM,
                  DLDevice device = {kDLCPU, 0}) const {
    int64_t n = static_cast<int64_t>(count);
    DLTensor t = detail::flat_view(data, n, device);
    p_.check(vt_->all_reduce(p_.handle(), group, &t, op), "all_reduce");
  }
  // `root` is a world rank.
  template <class T>
  void broadcast(loom_group group, T *data, size_t count, int32_t root, DLDevice device = {kDLCPU, 0}) const {
    int64_t n = static_cast<int64_t>(count);
    DLTensor t = detail::flat_view(data, n, device);
    p_.check(vt_->broadcast(p_.handle(), group, &t, root), "broadcast");
  }
  // out: group size x count values, member-major.
  void all_gather(loom_group group, const float *in, size_t count, float *out, size_t out_count) const {
    int64_t n = static_cast<int64_t>(count), m = static_cast<int64_t>(out_count);
    DLTensor a = detail::flat_view(in, n), b = detail::flat_view(out, m);
    p_.check(vt_->all_gather(p_.handle(), group, &a, &b), "all_gather");
  }
  void send(const float *data, size_t count, int32_t peer, DLDevice device = {kDLCPU, 0}) const {
    int64_t n = static_cast<int64_t>(count);
    DLTensor t = detail::flat_view(data, n, device);
    p_.check(vt_->send(p_.handle(), &t, peer), "send");
  }
  void recv(float *data, size_t count, int32_t peer, DLDevice device = {kDLCPU, 0}) const {
    int64_t n = static_cast<int64_t>(count);
    DLTensor t = detail::flat_view(data, n, device);
    p_.check(vt_->recv(p_.handle(), &t, peer), "recv");
  }
  // Both transfers in flight at once (ABI 1.8); a component built against an older ABI is
  // refused by name rather than risking the deadlock send then recv can cause.
  void send_recv(const float *out, size_t out_count, int32_t to, float *in, size_t in_count, int32_t from,
                 DLDevice device = {kDLCPU, 0}) const {
    if (!LOOM_HAS_FIELD(vt_, loom_parallel_vtable, send_recv) || vt_->send_recv == nullptr)
      throw runtime_error("parallel: the component predates ABI 1.8 (no send_recv), which pipeline stages need");
    int64_t a = static_cast<int64_t>(out_count), b = static_cast<int64_t>(in_count);
    DLTensor s = detail::flat_view(out, a, device), r = detail::flat_view(in, b, device);
    p_.check(vt_->send_recv(p_.handle(), &s, to, &r, from), "send_recv");
  }

 private:
  Instance &p_;
  const loom_parallel_vtable *vt_;
};

}  // namespace loom
