// Parallel component `single`: the strategy of a world of one rank. Every group has one member,
// so every parameter is replicated, every layer is on stage 0, and the collectives reduce to
// their one-rank meaning: all_reduce (SUM, MAX, MIN and AVG alike) and broadcast leave the
// buffer as it is, all_gather and reduce_scatter copy in to out, and point-to-point has no peer.
#include <memory>
#include <string>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::single {
namespace {

struct Single {
  const loom_host_api* host;
  loom_host_ctx* ctx;
};
Single& self(void* inst) { return *static_cast<Single*>(inst); }

void check_group(loom_group g) {
  if (g < LOOM_GROUP_WORLD || g > LOOM_GROUP_PIPELINE) invalid("single: unknown group " + std::to_string(g));
}
void check_op(loom_reduce_op op) {
  if (op < LOOM_REDUCE_SUM || op > LOOM_REDUCE_AVG) invalid("single: unknown reduce op " + std::to_string(op));
}
void check_buffer(const DLTensor* t, const char* name) {
  if (t == nullptr) invalid(std::string("single: ") + name + " is NULL");
  if (t->ndim < 0) invalid(std::string("single: ") + name + " has a negative ndim");
  if (!is_contiguous(*t)) invalid(std::string("single: ") + name + " must be contiguous");
  if (t->data == nullptr && numel(*t) > 0) invalid(std::string("single: ") + name + " data is NULL");
}
size_t bytes_of(const DLTensor& t) {
  return static_cast<size_t>(numel(t)) * ((static_cast<size_t>(t.dtype.bits) * t.dtype.lanes + 7) / 8);
}

// in -> out for a group of one: same element count and dtype, copied through the host.
void copy_one(Single& S, const DLTensor* in, DLTensor* out, const char* op) {
  check_buffer(in, "in");
  check_buffer(out, "out");
  if (in->dtype.code != out->dtype.code || in->dtype.bits != out->dtype.bits || in->dtype.lanes != out->dtype.lanes)
    invalid(std::string("single: ") + op + ": in and out dtypes differ");
  if (numel(*in) != numel(*out))
    invalid(std::string("single: ") + op + ": out must hold as many elements as in for a group of one (in " +
            std::to_string(numel(*in)) + ", out " + std::to_string(numel(*out)) + ")");
  const size_t n = bytes_of(*in);
  if (n == 0) return;
  const loom_status s = S.host->memcpy(S.ctx, data_of<char>(*out), out->device, data_of<char>(*in), in->device, n);
  if (s != LOOM_OK) fail(s, std::string("single: ") + op + ": host memcpy failed");
}

loom_status create_fn(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = new Single{host, ctx};
  });
}
void destroy_fn(void* inst) { delete static_cast<Single*>(inst); }

loom_status topology_fn(void* inst, loom_parallel_topology* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (out == nullptr) invalid("single: out is NULL");
    if (out->struct_size < sizeof(loom_parallel_topology)) invalid("single: topology struct_size too small");
    *out = loom_parallel_topology{sizeof(loom_parallel_topology), 0, 1, 0, 1, 0, 1, 0, 1, 0};
  });
}
loom_status shard_fn(void* inst, const char* name, const int64_t* shape, int32_t ndim, loom_shard* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (name == nullptr || out == nullptr) invalid("single: name and out must not be NULL");
    if (ndim < 0 || (ndim > 0 && shape == nullptr)) invalid("single: bad shape for '" + std::string(name) + "'");
    if (out->struct_size < sizeof(loom_shard)) invalid("single: shard struct_size too small");
    // Replicated: the whole first dimension (a scalar counts as one element).
    *out = loom_shard{sizeof(loom_shard), -1, 0, ndim > 0 ? shape[0] : 1, 0, 0, 1};
  });
}
int32_t stage_of_layer_fn(void*, int32_t, int32_t) { return 0; }

loom_status all_reduce_fn(void* inst, loom_group g, DLTensor* buf, loom_reduce_op op) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    check_group(g);
    check_op(op);
    check_buffer(buf, "buffer");  // one rank: the reduction of {x} is x, for AVG too
  });
}
loom_status all_gather_fn(void* inst, loom_group g, const DLTensor* in, DLTensor* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    check_group(g);
    copy_one(self(inst), in, out, "all_gather");
  });
}
loom_status reduce_scatter_fn(void* inst, loom_group g, const DLTensor* in, DLTensor* out, loom_reduce_op op) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    check_group(g);
    check_op(op);
    copy_one(self(inst), in, out, "reduce_scatter");
  });
}
loom_status broadcast_fn(void* inst, loom_group g, DLTensor* buf, int32_t root) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    check_group(g);
    check_buffer(buf, "buffer");
    if (root != 0) invalid("single: broadcast root " + std::to_string(root) + " does not exist in a world of one");
  });
}
loom_status send_fn(void* inst, const DLTensor*, int32_t peer) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    invalid("single: send to peer " + std::to_string(peer) + ": no peer exists in a world of one rank");
  });
}
loom_status recv_fn(void* inst, DLTensor*, int32_t peer) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    invalid("single: recv from peer " + std::to_string(peer) + ": no peer exists in a world of one rank");
  });
}
loom_status send_recv_fn(void* inst, const DLTensor*, int32_t send_peer, DLTensor*, int32_t) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    invalid("single: send_recv with peer " + std::to_string(send_peer) + ": no peer exists in a world of one rank");
  });
}
loom_status barrier_fn(void* inst, loom_group g) {
  return guard(self(inst).host, self(inst).ctx, [&] { check_group(g); });
}

constexpr loom_parallel_vtable kVtable = {
    sizeof(loom_parallel_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &topology_fn, &shard_fn, &stage_of_layer_fn, &all_reduce_fn, &all_gather_fn,
    &reduce_scatter_fn, &broadcast_fn, &send_fn, &recv_fn, &barrier_fn, &send_recv_fn,
};
constexpr loom_component_desc kSingle = {
    sizeof(loom_component_desc), LOOM_KIND_PARALLEL, "single", "1.0.0",
    "One rank, no parallelism: replicated parameters and one-rank collectives",
    nullptr, 0, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kSingle};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-parallel-single", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::single

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::single::kPlugin; }
