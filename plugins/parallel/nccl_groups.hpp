// The GPU collective backend: one NCCL communicator per group of ranks, made the first time the
// group runs a collective on CUDA buffers (a collective call itself, so every member makes it
// at the same point). The group's lowest rank draws the NCCL unique id and sends it to the
// others over the TCP mesh. Collectives are queued on the stream the caller passes (the host's
// current stream) and return without waiting for it.
//
// Ownership: owns its communicators; the mesh must outlive it. Thread-safety: none, like the
// mesh.
#ifndef LOOM_PLUGINS_PARALLEL_NCCL_GROUPS_HPP
#define LOOM_PLUGINS_PARALLEL_NCCL_GROUPS_HPP

#include <map>
#include <memory>
#include <vector>

#include "tcp_mesh.hpp"

namespace loomp::parallel {

class NcclGroups {
 public:
  explicit NcclGroups(TcpMesh& mesh);
  ~NcclGroups();
  NcclGroups(const NcclGroups&) = delete;
  NcclGroups& operator=(const NcclGroups&) = delete;

  void all_reduce(const std::vector<int>& members, void* data, size_t count, ElemType type, ReduceOp op, int device,
                  void* stream);
  void broadcast(const std::vector<int>& members, void* data, size_t bytes, int root, int device, void* stream);
  // out: members.size() * bytes, member-major.
  void all_gather(const std::vector<int>& members, const void* in, size_t bytes, void* out, int device, void* stream);
  // in: members.size() * count elements; out: this member's reduced count.
  void reduce_scatter(const std::vector<int>& members, const void* in, void* out, size_t count, ElemType type, ReduceOp op,
                      int device, void* stream);
  // Makes the group's communicator now and runs one all-reduce of 1 MB on it (a collective), so
  // that its first NCCL call later is not the one that pays for the communicator and its
  // connections (NCCL makes them at first use): not inside a timed step or a graph capture.
  void prepare(const std::vector<int>& members, int device);
  void send(int peer, const void* data, size_t bytes, int device, void* stream);
  void recv(int peer, void* data, size_t bytes, int device, void* stream);
  // Both in one NCCL group, so that two ranks sending to each other at once do not wait on
  // each other's receive.
  void send_recv(int send_peer, const void* send_data, size_t send_bytes, int recv_peer, void* recv_data,
                 size_t recv_bytes, int device, void* stream);

 private:
  struct Comm;
  Comm& comm(const std::vector<int>& members, int device);
  Comm& pair(int peer, int device);  // the communicator of this rank and `peer`

  TcpMesh& mesh_;
  std::map<std::vector<int>, std::unique_ptr<Comm>> comms_;
};

}  // namespace loomp::parallel

#endif
