#include "nccl_groups.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <string>

#include "loom_plugin_util.hpp"

namespace loomp::parallel {
namespace {

void check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail(LOOM_ERR_DEVICE, std::string("parallel (nccl): ") + what + ": " + ncclGetErrorString(r));
}
void check(cudaError_t r, const char* what) {
  if (r != cudaSuccess) fail(LOOM_ERR_DEVICE, std::string("parallel (nccl): ") + what + ": " + cudaGetErrorString(r));
}

ncclDataType_t nccl_type(ElemType t) {
  switch (t) {
    case ElemType::F32: return ncclFloat32;
    case ElemType::F64: return ncclFloat64;
    case ElemType::I32: return ncclInt32;
    case ElemType::I64: return ncclInt64;
    case ElemType::U8: return ncclUint8;
    case ElemType::F16: return ncclFloat16;
    case ElemType::BF16: return ncclBfloat16;
  }
  return ncclUint8;
}
ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
    case ReduceOp::Avg: return ncclAvg;
  }
  return ncclSum;
}
cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

struct NcclGroups::Comm {
  ncclComm_t comm = nullptr;
  int index = 0;  // this rank's position among the members
  ~Comm() {
    if (comm != nullptr) ncclCommDestroy(comm);
  }
};

NcclGroups::NcclGroups(TcpMesh& mesh) : mesh_(mesh) {}
NcclGroups::~NcclGroups() = default;

NcclGroups::Comm& NcclGroups::comm(const std::vector<int>& members, int device) {
  auto it = comms_.find(members);
  if (it != comms_.end()) return *it->second;
  const auto self = std::find(members.begin(), members.end(), mesh_.rank());
  if (self == members.end()) invalid("parallel (nccl): this rank is not a member of the group");
  check(cudaSetDevice(device), "cudaSetDevice");
  ncclUniqueId id{};
  if (mesh_.rank() == members.front()) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  mesh_.broadcast(members, &id, sizeof(id), members.front());
  auto c = std::make_unique<Comm>();
  c->index = static_cast<int>(self - members.begin());
  check(ncclCommInitRank(&c->comm, static_cast<int>(members.size()), id, c->index), "ncclCommInitRank");
  return *comms_.emplace(members, std::move(c)).first->second;
}

void NcclGroups::all_reduce(const std::vector<int>& members, void* data, size_t count, ElemType type, ReduceOp op,
                            int device, void* stream) {
  check(ncclAllReduce(data, data, count, nccl_type(type), nccl_op(op), comm(members, device).comm, as_stream(stream)),
        "ncclAllReduce");
}

void NcclGroups::broadcast(const std::vector<int>& members, void* data, size_t bytes, int root, int device, void* stream) {
  const auto r = std::find(members.begin(), members.end(), root);
  if (r == members.end()) invalid("parallel (nccl): broadcast root " + std::to_string(root) + " is not in the group");
  check(ncclBroadcast(data, data, bytes, ncclUint8, static_cast<int>(r - members.begin()), comm(members, device).comm,
                      as_stream(stream)),
        "ncclBroadcast");
}

void NcclGroups::all_gather(const std::vector<int>& members, const void* in, size_t bytes, void* out, int device,
                            void* stream) {
  check(ncclAllGather(in, out, bytes, ncclUint8, comm(members, device).comm, as_stream(stream)), "ncclAllGather");
}

void NcclGroups::reduce_scatter(const std::vector<int>& members, const void* in, void* out, size_t count, ElemType type,
                                ReduceOp op, int device, void* stream) {
  check(ncclReduceScatter(in, out, count, nccl_type(type), nccl_op(op), comm(members, device).comm, as_stream(stream)),
        "ncclReduceScatter");
}

void NcclGroups::prepare(const std::vector<int>& members, int device) {
  Comm& c = comm(members, device);
  constexpr size_t kCount = size_t{1} << 18;  // 1 MB of float32: past the small-message protocols
  void* buffer = nullptr;
  cudaStream_t stream = nullptr;
  check(cudaMalloc(&buffer, kCount * sizeof(float)), "cudaMalloc");
  check(cudaMemset(buffer, 0, kCount * sizeof(float)), "cudaMemset");
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const ncclResult_t r = ncclAllReduce(buffer, buffer, kCount, ncclFloat32, ncclSum, c.comm, stream);
  const cudaError_t synced = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  cudaFree(buffer);
  check(r, "ncclAllReduce (warm-up)");
  check(synced, "warm-up");
}

NcclGroups::Comm& NcclGroups::pair(int peer, int device) {
  return comm({std::min(peer, mesh_.rank()), std::max(peer, mesh_.rank())}, device);
}

void NcclGroups::send(int peer, const void* data, size_t bytes, int device, void* stream) {
  Comm& c = pair(peer, device);
  check(ncclSend(data, bytes, ncclUint8, c.index == 0 ? 1 : 0, c.comm, as_stream(stream)), "ncclSend");
}

void NcclGroups::recv(int peer, void* data, size_t bytes, int device, void* stream) {
  Comm& c = pair(peer, device);
  check(ncclRecv(data, bytes, ncclUint8, c.index == 0 ? 1 : 0, c.comm, as_stream(stream)), "ncclRecv");
}

void NcclGroups::send_recv(int send_peer, const void* send_data, size_t send_bytes, int recv_peer, void* recv_data,
                           size_t recv_bytes, int device, void* stream) {
  // The communicators exist before the group opens (making one is itself a collective).
  Comm& to = pair(send_peer, device);
  Comm& from = pair(recv_peer, device);
  check(ncclGroupStart(), "ncclGroupStart");
  const ncclResult_t sent = ncclSend(send_data, send_bytes, ncclUint8, to.index == 0 ? 1 : 0, to.comm, as_stream(stream));
  const ncclResult_t received =
      ncclRecv(recv_data, recv_bytes, ncclUint8, from.index == 0 ? 1 : 0, from.comm, as_stream(stream));
  const ncclResult_t ended = ncclGroupEnd();  // always closed, whatever failed inside
  check(sent, "ncclSend");
  check(received, "ncclRecv");
  check(ended, "ncclGroupEnd");
}

}  // namespace loomp::parallel
