// The CPU collective backend: every pair of ranks joined by one TCP connection (IPv4), and
// collectives over a group of ranks on host memory.
//
// Rendezvous: rank 0 listens on the master address's port; every other rank opens a listener on
// a free port, connects to rank 0 and says who it is; rank 0 answers each with the table of
// every rank's address and port; then each rank connects to the lower-numbered ranks and accepts
// the higher ones. Works on one host (loopback) and across hosts alike.
//
// Collectives are rooted at the group's lowest rank: it receives every member's buffer,
// reduces them in rank order and sends the result back. So every rank gets bit-identical
// results, and the same inputs give the same result on every run. A star costs the root
// O(members x bytes); the CPU backend is for correctness and CI, the GPUs' is NCCL.
//
// Ownership: a mesh owns its sockets. Thread-safety: none; one caller at a time (collectives
// of one group must be called in the same order on every member).
#ifndef LOOM_PLUGINS_PARALLEL_TCP_MESH_HPP
#define LOOM_PLUGINS_PARALLEL_TCP_MESH_HPP

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "launch_env.hpp"

namespace loomp::parallel {

enum class ElemType { F32, F64, I32, I64, U8, F16, BF16 };  // the TCP backend reduces all but F16 and BF16
enum class ReduceOp { Sum, Max, Min, Avg };
size_t elem_size(ElemType t);

class TcpMesh {
 public:
  // Connects the world described by `env` (a world of one connects nothing). Waits up to
  // timeout_s for the other ranks; a collective waits as long for its peers. Throws loomp::Fail
  // with what failed (which rank, which address).
  TcpMesh(const LaunchEnv& env, double timeout_s);
  ~TcpMesh();
  TcpMesh(const TcpMesh&) = delete;
  TcpMesh& operator=(const TcpMesh&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }

  void send(int peer, const void* data, size_t bytes);
  void recv(int peer, void* data, size_t bytes);
  // The send on a second thread while this one receives: two ranks sending to each other at once
  // never wait for each other's socket buffers to drain.
  void send_recv(int send_peer, const void* send_data, size_t send_bytes, int recv_peer, void* recv_data,
                 size_t recv_bytes);

  // `members`: the group's world ranks, ascending, this rank among them.
  void all_reduce(const std::vector<int>& members, void* data, size_t count, ElemType type, ReduceOp op);
  void broadcast(const std::vector<int>& members, void* data, size_t bytes, int root);
  // out: members.size() * bytes, member-major.
  void all_gather(const std::vector<int>& members, const void* in, size_t bytes, void* out);
  void barrier(const std::vector<int>& members);

 private:
  void connect_world(const LaunchEnv& env);
  int socket_of(int peer) const;

  int rank_ = 0, world_ = 1;
  double timeout_s_ = 300;
  std::vector<int> sockets_;  // by peer rank; -1 for this rank
  std::vector<std::byte> scratch_;
};

}  // namespace loomp::parallel

#endif
