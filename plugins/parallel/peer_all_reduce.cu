#include "peer_all_reduce.hpp"

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "loom_plugin_util.hpp"

namespace loomp::parallel {
namespace {

// An exchange buffer: flags [kMaxBlocks][kMaxMembers] (epochs raised by the peers), then two
// halves of kMaxBytes for the copies.
constexpr size_t kFlagBytes = 4096, kBufferBytes = kFlagBytes + 2 * PeerAllReduce::kMaxBytes;
static_assert(PeerAllReduce::kMaxBlocks * PeerAllReduce::kMaxMembers * sizeof(unsigned long long) <= kFlagBytes);
constexpr int kThreads = 256;

struct Members {
  char* base[PeerAllReduce::kMaxMembers];  // every member's buffer, mapped here
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(LOOM_ERR_DEVICE, std::string("parallel (peer all-reduce): ") + what + ": " + cudaGetErrorString(e));
}

__device__ unsigned long long* flag_of(char* base, int block, int member) {
  return reinterpret_cast<unsigned long long*>(base) + block * PeerAllReduce::kMaxMembers + member;
}
__device__ float* half_of(char* base, unsigned long long epoch) {
  return reinterpret_cast<float*>(base + kFlagBytes + (epoch & 1) * PeerAllReduce::kMaxBytes);
}

__global__ void peer_all_reduce_kernel(float* data, size_t count, Members m, int index, int members,
                                       unsigned long long* epochs, long long wait_cycles) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const size_t per = (count + gridDim.x - 1) / gridDim.x, begin = per * b, end = min(count, begin + per);
  __shared__ unsigned long long epoch;
  if (tid == 0) epoch = epochs[b] + 1;
  __syncthreads();
  float* mine = half_of(m.base[index], epoch);
  for (size_t i = begin + tid; i < end; i += blockDim.x) mine[i] = data[i];
  __syncthreads();
  if (tid < members && tid != index) {
    // Thread p tells member p that this block's copy is there (the fence orders the block's
    // copy, which the barrier made visible to this thread, before the flag), then waits for
    // member p's flag here.
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(flag_of(m.base[tid], b, index)) = epoch;
    const volatile unsigned long long* theirs = flag_of(m.base[index], b, tid);
    const long long start = clock64();
    while (*theirs < epoch)
      if (clock64() - start > wait_cycles) __trap();  // a member that never came: an error, not a hang
    __threadfence_system();
  }
  __syncthreads();
  for (size_t i = begin + tid; i < end; i += blockDim.x) {
    float sum = 0.0f;  // in rank order on every member: the same bits everywhere
    for (int p = 0; p < members; ++p) sum += __ldcv(half_of(m.base[p], epoch) + i);
    data[i] = sum;
  }
  if (tid == 0) epochs[b] = epoch;
}

// Every member's `bytes` from `in`, member-major (an all-gather over the mesh).
std::vector<char> gather(TcpMesh& mesh, const std::vector<int>& members, const void* in, size_t bytes) {
  std::vector<char> out(bytes * members.size());
  mesh.all_gather(members, in, bytes, out.data());
  return out;
}

}  // namespace

std::unique_ptr<PeerAllReduce> PeerAllReduce::create(TcpMesh& mesh, const std::vector<int>& members, int device,
                                                     double timeout_s, std::string* why) {
  const auto self = std::find(members.begin(), members.end(), mesh.rank());
  if (self == members.end()) invalid("parallel (peer all-reduce): this rank is not a member of the group");
  const int index = static_cast<int>(self - members.begin()), n = static_cast<int>(members.size());
  check(cudaSetDevice(device), "cudaSetDevice");
  // One host, and every member's GPU mappable from here: each rank judges, all must agree.
  std::array<char, 256> host{};
  gethostname(host.data(), host.size() - 1);
  const auto hosts = gather(mesh, members, host.data(), host.size());
  std::array<char, 32> bus{};
  check(cudaDeviceGetPCIBusId(bus.data(), static_cast<int>(bus.size()), device), "cudaDeviceGetPCIBusId");
  const auto buses = gather(mesh, members, bus.data(), bus.size());
  std::string reason;
  if (n > kMaxMembers) reason = "more than " + std::to_string(kMaxMembers) + " members";
  for (int p = 0; p < n && reason.empty(); ++p) {
    if (std::memcmp(hosts.data() + p * host.size(), host.data(), host.size()) != 0) {
      reason = "the members are on several hosts";
      break;
    }
    if (p == index) continue;
    int peer = -1, can = 0;
    if (cudaDeviceGetByPCIBusId(&peer, buses.data() + p * bus.size()) != cudaSuccess ||
        cudaDeviceCanAccessPeer(&can, device, peer) != cudaSuccess || !can)
      reason = "GPU " + std::string(buses.data() + p * bus.size()) + " cannot be reached as a peer";
  }
  cudaGetLastError();  // a failed lookup above is an answer, not an error for later calls
  const char ok = reason.empty() ? 1 : 0;
  const auto oks = gather(mesh, members, &ok, 1);
  if (std::count(oks.begin(), oks.end(), char{1}) != n) {
    if (why) *why = reason.empty() ? "another member's GPUs cannot map each other" : reason;
    return nullptr;
  }
  std::unique_ptr<PeerAllReduce> r(new PeerAllReduce());
  r->device_ = device;
  r->index_ = index;
  r->members_ = n;
  // The wait's limit in clock64() cycles: timeout_s at the GPU's reported clock (2 GHz where it
  // cannot be read, at least 1 GHz).
  int khz = 0;
  if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device) != cudaSuccess || khz <= 0) {
    cudaGetLastError();
    khz = 2000000;
  }
  r->wait_cycles_ = static_cast<long long>(timeout_s * 1e3 * static_cast<double>(std::max(khz, 1000000)));
  check(cudaMalloc(&r->own_, kBufferBytes), "cudaMalloc");
  check(cudaMemset(r->own_, 0, kFlagBytes), "cudaMemset");
  check(cudaMalloc(reinterpret_cast<void**>(&r->epochs_), kMaxBlocks * sizeof(unsigned long long)), "cudaMalloc");
  check(cudaMemset(r->epochs_, 0, kMaxBlocks * sizeof(unsigned long long)), "cudaMemset");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cudaIpcMemHandle_t handle{};
  check(cudaIpcGetMemHandle(&handle, r->own_), "cudaIpcGetMemHandle");
  const auto handles = gather(mesh, members, &handle, sizeof(handle));
  r->mapped_.assign(static_cast<size_t>(n), nullptr);
  for (int p = 0; p < n; ++p) {
    if (p == index) {
      r->mapped_[static_cast<size_t>(p)] = r->own_;
      continue;
    }
    cudaIpcMemHandle_t theirs{};
    std::memcpy(&theirs, handles.data() + p * sizeof(handle), sizeof(handle));
    check(cudaIpcOpenMemHandle(&r->mapped_[static_cast<size_t>(p)], theirs, cudaIpcMemLazyEnablePeerAccess),
          "cudaIpcOpenMemHandle");
  }
  mesh.barrier(members);  // every mapping made (and every flag zeroed) before the first call
  return r;
}

PeerAllReduce::~PeerAllReduce() {
  cudaSetDevice(device_);
  for (int p = 0; p < members_; ++p)
    if (p != index_ && mapped_[static_cast<size_t>(p)]) cudaIpcCloseMemHandle(mapped_[static_cast<size_t>(p)]);
  if (own_) cudaFree(own_);
  if (epochs_) cudaFree(epochs_);
}

void PeerAllReduce::all_reduce(float* data, size_t count, void* stream) {
  if (count * sizeof(float) > kMaxBytes) invalid("parallel (peer all-reduce): a sum of more than 256 KB");
  if (count == 0) return;
  Members m{};
  for (int p = 0; p < members_; ++p) m.base[p] = static_cast<char*>(mapped_[static_cast<size_t>(p)]);
  // Always every block (some with nothing to copy): the blocks' epochs then advance together, so
  // a call's parity is every block's, and a half comes back only after every member has left the
  // call before (each block waits for every member's flag of the call in between).
  peer_all_reduce_kernel<<<kMaxBlocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(data, count, m, index_, members_,
                                                                                        epochs_, wait_cycles_);
  check(cudaGetLastError(), "launch");
}

}  // namespace loomp::parallel
