// A one-shot all-reduce over CUDA peer memory for small float32 sums within one host (tensor
// parallel decode: two all-reduces of a few kilobytes a layer, where NCCL's latency is most of
// the step). Each rank owns an exchange buffer that every member maps (CUDA IPC handles sent over
// the TCP mesh). One kernel per call: each block copies its share of the input into this rank's
// buffer, raises its flag in every peer's buffer, waits for every peer's flag, then sums the
// members' copies in rank order into the output (so every rank gets the same bits). Flags carry
// the call's epoch, kept per block in device memory (CUDA-graph replays advance it); copies
// alternate between two halves of the buffer by epoch parity, and a rank reaches a half again
// only after every peer has finished reading it (it waited for their flags of the call in
// between, which they raise only after their previous call's kernel ended).
//
// A peer that does not arrive within the strategy's timeout_s makes the kernel trap (an error on
// the stream, not a hang). Ownership: owns its buffer and the peers' mappings. Thread-safety: one caller, every
// member making the same calls in the same order (like any collective).
#ifndef LOOM_PLUGINS_PARALLEL_PEER_ALL_REDUCE_HPP
#define LOOM_PLUGINS_PARALLEL_PEER_ALL_REDUCE_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tcp_mesh.hpp"

namespace loomp::parallel {

class PeerAllReduce {
 public:
  static constexpr size_t kMaxBytes = size_t{256} << 10;  // larger sums go to NCCL
  static constexpr int kMaxMembers = 8, kMaxBlocks = 8;  // every call runs kMaxBlocks blocks

  // A collective over `members` (this rank among them, each on its own GPU, `device` here).
  // Returns null, with the reason in *why, when the members are not all on this host or their
  // GPUs cannot map each other's memory; every member gets the same answer.
  static std::unique_ptr<PeerAllReduce> create(TcpMesh& mesh, const std::vector<int>& members, int device,
                                               double timeout_s, std::string* why);
  ~PeerAllReduce();
  PeerAllReduce(const PeerAllReduce&) = delete;
  PeerAllReduce& operator=(const PeerAllReduce&) = delete;

  // data (count floats on this rank's GPU) becomes the members' sum; queued on `stream`.
  // count * 4 must not exceed kMaxBytes.
  void all_reduce(float* data, size_t count, void* stream);

 private:
  PeerAllReduce() = default;
  int device_ = 0, index_ = 0, members_ = 0;
  long long wait_cycles_ = 0;           // timeout_s in the GPU's clock cycles
  void* own_ = nullptr;                 // this rank's exchange buffer (cudaMalloc)
  std::vector<void*> mapped_;           // every member's buffer as mapped here (own_ for this rank)
  unsigned long long* epochs_ = nullptr;  // per-block epochs (device memory)
};

}  // namespace loomp::parallel

#endif
