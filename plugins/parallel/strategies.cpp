// Parallel components over a launched world of processes (launch_env.hpp): `data` (replicas:
// every parameter on every rank, gradients all-reduced over the data group, optionally ZeRO
// stage 1), `tensor` (Megatron-style splits over groups of `size` consecutive ranks, data
// parallel across the groups) and `pipeline` (consecutive layers per stage over groups of
// `stages` ranks, data parallel across the groups). Collectives go over TCP for host buffers (tcp_mesh.hpp) and over NCCL for CUDA
// buffers (nccl_groups.hpp, in builds with CUDA).
//
// Ranks are laid out tensor-fastest: world rank = (data_rank * pipeline_size + pipeline_rank) *
// tensor_size + tensor_rank, so a tensor group is consecutive ranks (one host's GPUs).
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "launch_env.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "tcp_mesh.hpp"
#if LOOM_PARALLEL_NCCL
#include "nccl_groups.hpp"
#include "peer_all_reduce.hpp"
#endif

namespace loomp::parallel {
namespace {

enum class Kind { Data, Tensor, Pipeline };

struct Strategy {
  Kind kind;
  const loom_host_api* host;
  loom_host_ctx* ctx;
  LaunchEnv env;
  int tensor_size = 1, pipeline_size = 1, data_size = 1;
  int tensor_rank = 0, pipeline_rank = 0, data_rank = 0;
  std::vector<int64_t> stage_layers;  // pipeline: layers per stage as configured (empty: even)
  double timeout_s = 300;             // every wait's limit
  loom_parallel_training training{sizeof(loom_parallel_training), 0, 0, 1};
  std::unique_ptr<TcpMesh> mesh;
#if LOOM_PARALLEL_NCCL
  std::unique_ptr<NcclGroups> nccl;
  // One-shot sums over peer memory (peer_all_reduce.hpp) per group, made at the group's first
  // float32 sum on CUDA; null where the group's GPUs cannot map each other (NCCL then).
  bool peer_sums = true;
  std::map<std::vector<int>, std::unique_ptr<PeerAllReduce>> peer;
  PeerAllReduce* peer_for(const std::vector<int>& members, int device) {
    auto it = peer.find(members);
    if (it == peer.end()) {
      std::string why;
      nccl->prepare(members, device);  // the larger sums still go to NCCL
      it = peer.emplace(members, PeerAllReduce::create(*mesh, members, device, timeout_s, &why)).first;
      if (!it->second && !why.empty()) host->log(ctx, LOOM_LOG_INFO, ("parallel: peer all-reduce off: " + why).c_str());
    }
    return it->second.get();
  }
#endif

  Strategy(Kind k, const loom_host_api* h, loom_host_ctx* c) : kind(k), host(h), ctx(c), env(read_launch_env()) {
    const char* group_key = kind == Kind::Tensor ? "size" : kind == Kind::Pipeline ? "stages" : nullptr;
    if (group_key != nullptr) {
      const int64_t size = cfg_int(h, c, group_key);
      const int group = size == 0 ? env.world : static_cast<int>(size);
      if (size < 0 || group > env.world || env.world % group != 0)
        invalid_param(group_key, std::string(group_key) + " " + std::to_string(size) + " must divide the world of " +
                                     std::to_string(env.world) + " ranks (0: all of them)");
      (kind == Kind::Tensor ? tensor_size : pipeline_size) = group;
    }
    if (kind == Kind::Pipeline) {
      uint32_t count = 0;
      check_cfg(h->config_get_array_size(c, "stage_layers", &count), "stage_layers", "array");
      for (uint32_t i = 0; i < count; ++i) {
        const std::string key = "stage_layers[" + std::to_string(i) + "]";
        const int64_t layers = cfg_int(h, c, key.c_str());
        if (layers < 1) invalid_param("stage_layers", "stage_layers: stage " + std::to_string(i) + " gets " + std::to_string(layers) + " layers (at least 1)");
        stage_layers.push_back(layers);
      }
      if (count != 0 && static_cast<int>(count) != pipeline_size)
        invalid_param("stage_layers", "stage_layers lists " + std::to_string(count) + " stages, the pipeline has " + std::to_string(pipeline_size));
    }
    const int64_t zero = cfg_int(h, c, "zero_stage");
    if (zero != 0 && zero != 1) invalid_param("zero_stage", "zero_stage must be 0 or 1 (ZeRO stage 1 shards the optimizer state)");
    const double bucket_mb = cfg_float(h, c, "bucket_mb");
    if (!(bucket_mb > 0 && bucket_mb <= 4096)) invalid_param("bucket_mb", "bucket_mb must be in (0, 4096]");
    timeout_s = cfg_float(h, c, "timeout_s");
    if (!(timeout_s > 0 && timeout_s <= 86400)) invalid_param("timeout_s", "timeout_s must be in (0, 86400]");
    training.zero_stage = static_cast<int32_t>(zero);
    training.bucket_bytes = static_cast<int64_t>(bucket_mb * 1024 * 1024);
    training.overlap_backward = cfg_bool(h, c, "overlap") ? 1 : 0;
#if LOOM_PARALLEL_NCCL
    peer_sums = cfg_bool(h, c, "peer_all_reduce");
#endif
    data_size = env.world / (tensor_size * pipeline_size);
    tensor_rank = env.rank % tensor_size;
    pipeline_rank = (env.rank / tensor_size) % pipeline_size;
    data_rank = env.rank / (tensor_size * pipeline_size);
    mesh = std::make_unique<TcpMesh>(env, timeout_s);
#if LOOM_PARALLEL_NCCL
    nccl = std::make_unique<NcclGroups>(*mesh);
#endif
  }

  // A group's world ranks, ascending.
  std::vector<int> members(loom_group g) const {
    std::vector<int> m;
    const int base_data = data_rank * pipeline_size * tensor_size;
    switch (g) {
      case LOOM_GROUP_WORLD:
        for (int r = 0; r < env.world; ++r) m.push_back(r);
        break;
      case LOOM_GROUP_TENSOR:
        for (int t = 0; t < tensor_size; ++t) m.push_back(base_data + pipeline_rank * tensor_size + t);
        break;
      case LOOM_GROUP_DATA:
        for (int d = 0; d < data_size; ++d) m.push_back((d * pipeline_size + pipeline_rank) * tensor_size + tensor_rank);
        break;
      case LOOM_GROUP_PIPELINE:
        for (int p = 0; p < pipeline_size; ++p) m.push_back(base_data + p * tensor_size + tensor_rank);
        break;
      default:
        invalid("parallel: unknown group " + std::to_string(g));
    }
    return m;
  }
};
Strategy& self(void* inst) { return *static_cast<Strategy*>(inst); }

ElemType elem_type(const DLTensor& t) {
  if (t.dtype.lanes != 1) unsupported("parallel: vector dtypes (lanes != 1)");
  if (t.dtype.code == kDLFloat && t.dtype.bits == 32) return ElemType::F32;
  if (t.dtype.code == kDLFloat && t.dtype.bits == 64) return ElemType::F64;
  if (t.dtype.code == kDLFloat && t.dtype.bits == 16) return ElemType::F16;
  if (t.dtype.code == kDLBfloat && t.dtype.bits == 16) return ElemType::BF16;
  if (t.dtype.code == kDLInt && t.dtype.bits == 32) return ElemType::I32;
  if (t.dtype.code == kDLInt && t.dtype.bits == 64) return ElemType::I64;
  if (t.dtype.code == kDLUInt && t.dtype.bits == 8) return ElemType::U8;
  unsupported("parallel: dtype code " + std::to_string(t.dtype.code) + " bits " + std::to_string(t.dtype.bits));
}
ReduceOp reduce_op(loom_reduce_op op) {
  switch (op) {
    case LOOM_REDUCE_SUM: return ReduceOp::Sum;
    case LOOM_REDUCE_MAX: return ReduceOp::Max;
    case LOOM_REDUCE_MIN: return ReduceOp::Min;
    case LOOM_REDUCE_AVG: return ReduceOp::Avg;
    default: invalid("parallel: unknown reduce op " + std::to_string(op));
  }
}
void check_buffer(const DLTensor* t, const char* name) {
  if (t == nullptr) invalid(std::string("parallel: ") + name + " is NULL");
  if (t->ndim < 0) invalid(std::string("parallel: ") + name + " has a negative ndim");
  if (!is_contiguous(*t)) invalid(std::string("parallel: ") + name + " must be contiguous");
  if (t->data == nullptr && numel(*t) > 0) invalid(std::string("parallel: ") + name + " data is NULL");
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDA)
    unsupported(std::string("parallel: ") + name + " is on a device that is neither the CPU nor CUDA");
#if !LOOM_PARALLEL_NCCL
  if (t->device.device_type == kDLCUDA) unsupported("parallel: CUDA buffers need a build with CUDA and NCCL");
#endif
}
size_t count_of(const DLTensor& t) { return static_cast<size_t>(numel(t)); }
[[maybe_unused]] bool on_cuda(const DLTensor& t) { return t.device.device_type == kDLCUDA; }
[[maybe_unused]] void* stream_of(Strategy& S, const DLTensor& t) { return S.host->current_stream(S.ctx, t.device); }

template <class F>
loom_status call(void* inst, F&& f) {
  return guard(self(inst).host, self(inst).ctx, [&] { f(self(inst)); });
}

loom_status topology_fn(void* inst, loom_parallel_topology* out) {
  return call(inst, [&](Strategy& S) {
    if (out == nullptr) invalid("parallel: out is NULL");
    if (out->struct_size < sizeof(loom_parallel_topology)) invalid("parallel: topology struct_size too small");
    *out = loom_parallel_topology{sizeof(loom_parallel_topology), S.env.rank, S.env.world, S.tensor_rank, S.tensor_size,
                                  S.data_rank, S.data_size, S.pipeline_rank, S.pipeline_size, S.env.local_rank};
  });
}

bool ends_with(const std::string& s, const char* suffix) {
  const std::string x(suffix);
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}

// Megatron's split of a Hugging Face parameter: the dimension cut into tensor_size parts (-1:
// replicated), whether the module's output is then a partial sum, and how many fused blocks the
// dimension holds (each cut alike).
struct Split {
  int32_t dim = -1, reduce_after = 0, parts = 1;
};
Split megatron_split(const std::string& name) {
  // The Llama family: nn.Linear weights are [out, in].
  for (const char* column : {"q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                             "q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias"})
    if (ends_with(name, column)) return {0, 0, 1};
  if (ends_with(name, "o_proj.weight") || ends_with(name, "down_proj.weight")) return {1, 1, 1};
  if (ends_with(name, "embed_tokens.weight") || ends_with(name, "lm_head.weight")) return {0, 0, 1};  // the vocabulary
  // GPT-2: Conv1D weights are [in, out]; c_attn's outputs are q, k and v side by side.
  if (ends_with(name, "attn.c_attn.weight")) return {1, 0, 3};
  if (ends_with(name, "attn.c_attn.bias")) return {0, 0, 3};
  if (ends_with(name, "mlp.c_fc.weight")) return {1, 0, 1};
  if (ends_with(name, "mlp.c_fc.bias")) return {0, 0, 1};
  if (ends_with(name, "c_proj.weight")) return {0, 1, 1};  // attn.c_proj and mlp.c_proj: row-parallel
  if (name == "wte.weight") return {0, 0, 1};
  return {};  // norms, biases of row-parallel linears (added once, after the sum), GPT-2's wpe
}

loom_status shard_fn(void* inst, const char* name, const int64_t* shape, int32_t ndim, loom_shard* out) {
  return call(inst, [&](Strategy& S) {
    if (name == nullptr || out == nullptr) invalid("parallel: name and out must not be NULL");
    if (ndim < 0 || (ndim > 0 && shape == nullptr)) invalid("parallel: bad shape for '" + std::string(name) + "'");
    if (out->struct_size < sizeof(loom_shard)) invalid("parallel: shard struct_size too small");
    *out = loom_shard{sizeof(loom_shard), -1, 0, ndim > 0 ? shape[0] : 1, 0, 0, 1};  // replicated
    if (S.tensor_size == 1) return;
    const Split split = megatron_split(name);
    const int32_t dim = split.dim;
    if (dim < 0) return;
    if (dim >= ndim) invalid("tensor: '" + std::string(name) + "' has no dimension " + std::to_string(dim));
    const int64_t extent = shape[dim];
    if (extent % (split.parts * S.tensor_size) != 0)
      invalid("tensor: dimension " + std::to_string(dim) + " of '" + name + "' (" + std::to_string(extent) +
              (split.parts > 1 ? ", " + std::to_string(split.parts) + " fused blocks" : std::string()) +
              ") does not divide by the tensor group's " + std::to_string(S.tensor_size) + " ranks");
    const int64_t part = extent / split.parts / S.tensor_size;
    *out = loom_shard{sizeof(loom_shard), dim, S.tensor_rank * part, (S.tensor_rank + 1) * part, split.reduce_after, 0,
                      split.parts};
  });
}
// Consecutive layers per stage: as stage_layers says (-1 for a layer beyond their sum, or for
// every layer when they do not add up to n_layers), else as even as the count allows (the first
// stages take one fewer).
int32_t stage_of_layer_fn(void* inst, int32_t layer, int32_t n_layers) {
  const Strategy& S = self(inst);
  if (S.pipeline_size <= 1 || n_layers <= 0 || layer < 0) return 0;
  if (!S.stage_layers.empty()) {
    int64_t end = 0, total = 0;
    for (const int64_t l : S.stage_layers) total += l;
    if (total != n_layers) return -1;
    for (size_t s = 0; s < S.stage_layers.size(); ++s)
      if (layer < (end += S.stage_layers[s])) return static_cast<int32_t>(s);
    return -1;
  }
  return static_cast<int32_t>(std::min<int64_t>(S.pipeline_size - 1, static_cast<int64_t>(layer) * S.pipeline_size / n_layers));
}

loom_status all_reduce_fn(void* inst, loom_group g, DLTensor* buf, loom_reduce_op op) {
  return call(inst, [&](Strategy& S) {
    check_buffer(buf, "buffer");
    const auto m = S.members(g);
    const ElemType type = elem_type(*buf);
    const ReduceOp r = reduce_op(op);
#if LOOM_PARALLEL_NCCL
    if (on_cuda(*buf)) {
      // Small float32 sums between GPUs of one host: one kernel over peer memory, not NCCL's ring.
      if (S.peer_sums && type == ElemType::F32 && r == ReduceOp::Sum && m.size() > 1)
        if (PeerAllReduce* p = S.peer_for(m, buf->device.device_id); p && count_of(*buf) * 4 <= PeerAllReduce::kMaxBytes)
          return p->all_reduce(data_of<float>(*buf), count_of(*buf), stream_of(S, *buf));
      return S.nccl->all_reduce(m, data_of<std::byte>(*buf), count_of(*buf), type, r, buf->device.device_id, stream_of(S, *buf));
    }
#endif
    if ((type == ElemType::I32 || type == ElemType::I64 || type == ElemType::U8) && r == ReduceOp::Avg)
      unsupported("parallel: AVG of integers");
    S.mesh->all_reduce(m, data_of<std::byte>(*buf), count_of(*buf), type, r);
  });
}

void check_pair(const DLTensor* in, const DLTensor* out, size_t group, bool gather) {
  check_buffer(in, "in");
  check_buffer(out, "out");
  if (elem_type(*in) != elem_type(*out)) invalid("parallel: in and out dtypes differ");
  if (in->device.device_type != out->device.device_type || in->device.device_id != out->device.device_id)
    invalid("parallel: in and out are on different devices");
  const size_t want = gather ? count_of(*in) * group : count_of(*out) * group;
  const size_t have = gather ? count_of(*out) : count_of(*in);
  if (want != have)
    invalid(std::string("parallel: ") + (gather ? "all_gather: out" : "reduce_scatter: in") + " holds " +
            std::to_string(have) + " elements, the group of " + std::to_string(group) + " needs " + std::to_string(want));
}

loom_status all_gather_fn(void* inst, loom_group g, const DLTensor* in, DLTensor* out) {
  return call(inst, [&](Strategy& S) {
    const auto m = S.members(g);
    check_pair(in, out, m.size(), true);
    const size_t bytes = count_of(*in) * elem_size(elem_type(*in));
#if LOOM_PARALLEL_NCCL
    if (on_cuda(*in)) return S.nccl->all_gather(m, data_of<std::byte>(*in), bytes, data_of<std::byte>(*out), in->device.device_id, stream_of(S, *in));
#endif
    S.mesh->all_gather(m, data_of<std::byte>(*in), bytes, data_of<std::byte>(*out));
  });
}

loom_status reduce_scatter_fn(void* inst, loom_group g, const DLTensor* in, DLTensor* out, loom_reduce_op op) {
  return call(inst, [&](Strategy& S) {
    const auto m = S.members(g);
    check_pair(in, out, m.size(), false);
    const ElemType type = elem_type(*in);
    const size_t count = count_of(*out), esize = elem_size(type);
#if LOOM_PARALLEL_NCCL
    if (on_cuda(*in))
      return S.nccl->reduce_scatter(m, data_of<std::byte>(*in), data_of<std::byte>(*out), count, type, reduce_op(op), in->device.device_id, stream_of(S, *in));
#endif
    std::vector<std::byte> all(count * esize * m.size());
    if (!all.empty()) std::copy_n(static_cast<const std::byte*>(data_of<std::byte>(*in)), all.size(), all.data());
    S.mesh->all_reduce(m, all.data(), count * m.size(), type, reduce_op(op));
    const size_t index = static_cast<size_t>(std::find(m.begin(), m.end(), S.env.rank) - m.begin());
    if (count > 0) std::copy_n(all.data() + index * count * esize, count * esize, static_cast<std::byte*>(data_of<std::byte>(*out)));
  });
}

loom_status broadcast_fn(void* inst, loom_group g, DLTensor* buf, int32_t root) {
  return call(inst, [&](Strategy& S) {
    check_buffer(buf, "buffer");
    const auto m = S.members(g);
    if (std::find(m.begin(), m.end(), root) == m.end())
      invalid("parallel: broadcast root " + std::to_string(root) + " is not a member of group " + std::to_string(g));
    const size_t bytes = count_of(*buf) * elem_size(elem_type(*buf));
#if LOOM_PARALLEL_NCCL
    if (on_cuda(*buf)) return S.nccl->broadcast(m, data_of<std::byte>(*buf), bytes, root, buf->device.device_id, stream_of(S, *buf));
#endif
    S.mesh->broadcast(m, data_of<std::byte>(*buf), bytes, root);
  });
}

void check_peer(const Strategy& S, int32_t peer) {
  const auto m = S.members(LOOM_GROUP_PIPELINE);
  if (peer == S.env.rank || std::find(m.begin(), m.end(), peer) == m.end())
    invalid("parallel: peer " + std::to_string(peer) + " is not another rank of this pipeline group");
}

// Point to point within the pipeline group: send (`sending`) or receive buf.
loom_status point_to_point(void* inst, DLTensor* buf, int32_t peer, bool sending) {
  return call(inst, [&](Strategy& S) {
    check_buffer(buf, "buffer");
    check_peer(S, peer);
    const size_t bytes = count_of(*buf) * elem_size(elem_type(*buf));
    std::byte* data = data_of<std::byte>(*buf);
#if LOOM_PARALLEL_NCCL
    if (on_cuda(*buf)) {
      if (sending) return S.nccl->send(peer, data, bytes, buf->device.device_id, stream_of(S, *buf));
      return S.nccl->recv(peer, data, bytes, buf->device.device_id, stream_of(S, *buf));
    }
#endif
    if (sending) S.mesh->send(peer, data, bytes);
    else S.mesh->recv(peer, data, bytes);
  });
}
loom_status send_fn(void* inst, const DLTensor* buf, int32_t peer) {
  return point_to_point(inst, const_cast<DLTensor*>(buf), peer, true);  // read only when sending
}
loom_status recv_fn(void* inst, DLTensor* buf, int32_t peer) { return point_to_point(inst, buf, peer, false); }

loom_status send_recv_fn(void* inst, const DLTensor* send, int32_t send_peer, DLTensor* recv, int32_t recv_peer) {
  return call(inst, [&](Strategy& S) {
    check_buffer(send, "send");
    check_buffer(recv, "recv");
    check_peer(S, send_peer);
    check_peer(S, recv_peer);
    if (send->device.device_type != recv->device.device_type || send->device.device_id != recv->device.device_id)
      invalid("parallel: send_recv's buffers are on different devices");
    const size_t send_bytes = count_of(*send) * elem_size(elem_type(*send));
    const size_t recv_bytes = count_of(*recv) * elem_size(elem_type(*recv));
    std::byte* out = data_of<std::byte>(*const_cast<DLTensor*>(send));  // read only
    std::byte* in = data_of<std::byte>(*recv);
#if LOOM_PARALLEL_NCCL
    if (on_cuda(*send))
      return S.nccl->send_recv(send_peer, out, send_bytes, recv_peer, in, recv_bytes, send->device.device_id,
                               stream_of(S, *send));
#endif
    S.mesh->send_recv(send_peer, out, send_bytes, recv_peer, in, recv_bytes);
  });
}

loom_status barrier_fn(void* inst, loom_group g) {
  return call(inst, [&](Strategy& S) { S.mesh->barrier(S.members(g)); });
}

loom_status training_fn(void* inst, loom_parallel_training* out) {
  return call(inst, [&](Strategy& S) {
    if (out == nullptr || out->struct_size < sizeof(loom_parallel_training)) invalid("parallel: training: bad out");
    *out = S.training;
  });
}
constexpr loom_parallel_training_ext kTraining = {sizeof(loom_parallel_training_ext), &training_fn};
const void* get_extension_fn(void*, const char* id) {
  return id != nullptr && std::string(id) == LOOM_PARALLEL_TRAINING_EXTENSION ? &kTraining : nullptr;
}

template <Kind K>
loom_status create_fn(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = new Strategy(K, host, ctx);
  });
}

template <Kind K>
constexpr loom_parallel_vtable kVtable = {
    sizeof(loom_parallel_vtable),
    {&create_fn<K>, &destroy_instance<Strategy>, &get_extension_fn, nullptr, nullptr},
    &topology_fn, &shard_fn, &stage_of_layer_fn, &all_reduce_fn, &all_gather_fn,
    &reduce_scatter_fn, &broadcast_fn, &send_fn, &recv_fn, &barrier_fn, &send_recv_fn,
};

const loom_param_desc kDataParams[] = {
    {sizeof(loom_param_desc), "zero_stage", LOOM_VALUE_INT, 0, "0",
     "1: ZeRO stage 1, each rank keeps the optimizer state of its share of the parameters"},
    {sizeof(loom_param_desc), "bucket_mb", LOOM_VALUE_FLOAT, 0, "25.0", "gradients are all-reduced in buckets of this size"},
    {sizeof(loom_param_desc), "overlap", LOOM_VALUE_BOOL, 0, "true",
     "all-reduce a bucket while the backward pass goes on with earlier layers (CPU engine)"},
    {sizeof(loom_param_desc), "timeout_s", LOOM_VALUE_FLOAT, 0, "300.0",
     "how long a rank waits for the others at start and in each collective"},
    {sizeof(loom_param_desc), "peer_all_reduce", LOOM_VALUE_BOOL, 0, "true",
     "float32 sums of up to 256 KB between GPUs of one host in one kernel over peer memory (false: NCCL for all)"},
};

const loom_param_desc kTensorParams[] = {
    {sizeof(loom_param_desc), "size", LOOM_VALUE_INT, 0, "0",
     "ranks per tensor group (consecutive ranks; 0: the whole world); the groups are data parallel"},
    kDataParams[0], kDataParams[1], kDataParams[2], kDataParams[3], kDataParams[4],
};

constexpr loom_component_desc kData = {
    sizeof(loom_component_desc), LOOM_KIND_PARALLEL, "data", "1.0.0",
    "Data parallel: replicas on every rank, gradients all-reduced in buckets, optional ZeRO stage 1",
    kDataParams, sizeof(kDataParams) / sizeof(kDataParams[0]), LOOM_THREADING_SERIAL, &kVtable<Kind::Data>};
constexpr loom_component_desc kTensor = {
    sizeof(loom_component_desc), LOOM_KIND_PARALLEL, "tensor", "1.0.0",
    "Tensor parallel (Megatron): column/row-split attention and MLP, vocabulary-split embedding and head; x data",
    kTensorParams, sizeof(kTensorParams) / sizeof(kTensorParams[0]), LOOM_THREADING_SERIAL, &kVtable<Kind::Tensor>};
const loom_param_desc kPipelineParams[] = {
    {sizeof(loom_param_desc), "stages", LOOM_VALUE_INT, 0, "0",
     "ranks per pipeline (consecutive ranks, one stage each; 0: the whole world); the pipelines are data parallel"},
    {sizeof(loom_param_desc), "stage_layers", LOOM_VALUE_ARRAY, 0, "[]",
     "decoder layers per stage, in order, adding up to the model's (e.g. [8, 4] to leave the last stage room for the "
     "head); empty: as even as the count allows"},
    kDataParams[0], kDataParams[1], kDataParams[2], kDataParams[3], kDataParams[4],
};
constexpr loom_component_desc kPipeline = {
    sizeof(loom_component_desc), LOOM_KIND_PARALLEL, "pipeline", "1.0.0",
    "Pipeline parallel: consecutive layers per stage, 1F1B over the micro-batches; x data",
    kPipelineParams, sizeof(kPipelineParams) / sizeof(kPipelineParams[0]), LOOM_THREADING_SERIAL, &kVtable<Kind::Pipeline>};
const loom_component_desc* const kComponents[] = {&kData, &kTensor, &kPipeline};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-parallel", "1.0.0",
    "Apache-2.0", kComponents, 3, nullptr};

}  // namespace
}  // namespace loomp::parallel

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::parallel::kPlugin; }
