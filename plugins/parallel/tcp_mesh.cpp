#include "tcp_mesh.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <thread>

#include "loom_plugin_util.hpp"

namespace loomp::parallel {

size_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::F32: case ElemType::I32: return 4;
    case ElemType::F64: case ElemType::I64: return 8;
    case ElemType::U8: return 1;
    case ElemType::F16: case ElemType::BF16: return 2;
  }
  return 1;
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kMagic = 0x4c4f4f4d;  // "LOOM"
constexpr uint32_t kProtocol = 1;

[[noreturn]] void io_fail(const std::string& what) { fail(LOOM_ERR_IO, "parallel (tcp): " + what); }
std::string errno_text() { return std::strerror(errno); }

// A socket closed when the owner goes out of scope unless released.
struct Fd {
  int fd = -1;
  explicit Fd(int f = -1) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int release() { return std::exchange(fd, -1); }
};

void set_options(int fd, double timeout_s) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout_s);
  tv.tv_usec = static_cast<suseconds_t>((timeout_s - static_cast<double>(tv.tv_sec)) * 1e6);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

void send_all(int fd, const void* data, size_t n, const std::string& peer) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) io_fail("timed out sending to " + peer);
    if (k <= 0) io_fail("sending to " + peer + ": " + errno_text() + " (did it fail?)");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void recv_all(int fd, void* data, size_t n, const std::string& peer) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) io_fail("timed out waiting for " + peer);
    if (k == 0) io_fail(peer + " closed its connection (did it fail?)");
    if (k < 0) io_fail("receiving from " + peer + ": " + errno_text());
    p += k;
    n -= static_cast<size_t>(k);
  }
}

std::string rank_name(int r) { return "rank " + std::to_string(r); }

// A listener on every interface; port 0 picks a free one. Returns the socket and its port.
std::pair<int, int> listen_on(int port, int backlog) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.fd < 0) io_fail("socket: " + errno_text());
  const int one = 1;
  setsockopt(fd.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::bind(fd.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    io_fail("cannot listen on port " + std::to_string(port) + ": " + errno_text() +
            (port != 0 ? " (another run on MASTER_PORT? choose another)" : ""));
  if (::listen(fd.fd, backlog) != 0) io_fail("listen: " + errno_text());
  socklen_t len = sizeof(addr);
  getsockname(fd.fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return {fd.release(), ntohs(addr.sin_port)};
}

int accept_before(int listener, Clock::time_point deadline, const std::string& waiting_for) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) io_fail("timed out waiting for " + waiting_for + " to connect");
    pollfd p{listener, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (r < 0 && errno != EINTR) io_fail("poll: " + errno_text());
    if (r <= 0) continue;
    const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno != EINTR && errno != ECONNABORTED) io_fail("accept: " + errno_text());
  }
}

// Connects to addr:port (IPv4, network order), retrying until the deadline (the peer may not
// listen yet).
int connect_before(uint32_t addr_be, int port, Clock::time_point deadline, const std::string& peer) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = addr_be;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  for (;;) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (fd.fd < 0) io_fail("socket: " + errno_text());
    if (::connect(fd.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd.release();
    if (Clock::now() >= deadline) {
      char text[INET_ADDRSTRLEN] = {};
      inet_ntop(AF_INET, &addr.sin_addr, text, sizeof(text));
      io_fail("cannot connect to " + peer + " at " + text + ":" + std::to_string(port) + ": " + errno_text());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

uint32_t resolve_ipv4(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr)
    invalid("parallel: MASTER_ADDR \"" + host + "\" does not resolve to an IPv4 address: " + gai_strerror(rc));
  const uint32_t a = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr.s_addr;
  ::freeaddrinfo(res);
  return a;
}

// The first message on every connection: who is calling.
struct Hello {
  uint32_t magic, protocol, rank, world, port;
};
void send_hello(int fd, int rank, int world, int port, const std::string& peer) {
  const std::array<uint32_t, 5> h{htonl(kMagic), htonl(kProtocol), htonl(static_cast<uint32_t>(rank)),
                                  htonl(static_cast<uint32_t>(world)), htonl(static_cast<uint32_t>(port))};
  send_all(fd, h.data(), sizeof(h), peer);
}
Hello recv_hello(int fd, int world) {
  std::array<uint32_t, 5> h{};
  recv_all(fd, h.data(), sizeof(h), "a connecting rank");
  const Hello r{ntohl(h[0]), ntohl(h[1]), ntohl(h[2]), ntohl(h[3]), ntohl(h[4])};
  if (r.magic != kMagic) io_fail("a connection on the rendezvous port is not a Loom rank");
  if (r.protocol != kProtocol) io_fail("a rank speaks rendezvous protocol " + std::to_string(r.protocol));
  if (static_cast<int>(r.world) != world)
    invalid("parallel: rank " + std::to_string(r.rank) + " was launched with a world of " + std::to_string(r.world) +
            ", this rank with " + std::to_string(world));
  if (static_cast<int>(r.rank) >= world) invalid("parallel: a rank " + std::to_string(r.rank) + " outside the world connected");
  return r;
}

template <class T>
void reduce_typed(T* acc, const T* in, size_t n, ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      for (size_t i = 0; i < n; ++i) acc[i] += in[i];
      break;
    case ReduceOp::Max:
      for (size_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], in[i]);
      break;
    case ReduceOp::Min:
      for (size_t i = 0; i < n; ++i) acc[i] = std::min(acc[i], in[i]);
      break;
  }
}
template <class T>
void divide_typed(T* acc, size_t n, size_t by) {
  for (size_t i = 0; i < n; ++i) acc[i] = static_cast<T>(acc[i] / static_cast<T>(by));
}

void reduce_into(void* acc, const void* in, size_t n, ElemType t, ReduceOp op) {
  switch (t) {
    case ElemType::F16: case ElemType::BF16: unsupported("parallel (tcp): reductions of 16-bit floats (reduce in float32)");
    case ElemType::F32: reduce_typed(static_cast<float*>(acc), static_cast<const float*>(in), n, op); break;
    case ElemType::F64: reduce_typed(static_cast<double*>(acc), static_cast<const double*>(in), n, op); break;
    case ElemType::I32: reduce_typed(static_cast<int32_t*>(acc), static_cast<const int32_t*>(in), n, op); break;
    case ElemType::I64: reduce_typed(static_cast<int64_t*>(acc), static_cast<const int64_t*>(in), n, op); break;
    case ElemType::U8: reduce_typed(static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(in), n, op); break;
  }
}
void divide(void* acc, size_t n, ElemType t, size_t by) {
  switch (t) {
    case ElemType::F16: case ElemType::BF16: unsupported("parallel (tcp): reductions of 16-bit floats (reduce in float32)");
    case ElemType::F32: divide_typed(static_cast<float*>(acc), n, by); break;
    case ElemType::F64: divide_typed(static_cast<double*>(acc), n, by); break;
    case ElemType::I32: divide_typed(static_cast<int32_t*>(acc), n, by); break;
    case ElemType::I64: divide_typed(static_cast<int64_t*>(acc), n, by); break;
    case ElemType::U8: divide_typed(static_cast<uint8_t*>(acc), n, by); break;
  }
}

}  // namespace

TcpMesh::TcpMesh(const LaunchEnv& env, double timeout_s)
    : rank_(env.rank), world_(env.world), timeout_s_(timeout_s), sockets_(static_cast<size_t>(env.world), -1) {
  if (world_ > 1) connect_world(env);
}

TcpMesh::~TcpMesh() {
  for (int fd : sockets_)
    if (fd >= 0) ::close(fd);
}

void TcpMesh::connect_world(const LaunchEnv& env) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  const uint32_t master = resolve_ipv4(env.master_addr);
  struct Entry {
    uint32_t addr = 0, port = 0;  // network order / host order
  };
  std::vector<Entry> table(static_cast<size_t>(world_));
  const auto keep = [&](int peer, int fd) {
    set_options(fd, timeout_s_);
    if (sockets_[static_cast<size_t>(peer)] >= 0) {
      ::close(fd);
      invalid("parallel: two processes say they are rank " + std::to_string(peer));
    }
    sockets_[static_cast<size_t>(peer)] = fd;
  };
  if (rank_ == 0) {
    Fd listener(listen_on(env.master_port, world_).first);
    for (int k = 1; k < world_; ++k) {
      Fd fd(accept_before(listener.fd, deadline, std::to_string(world_ - k) + " more rank(s) of " + std::to_string(world_)));
      set_options(fd.fd, timeout_s_);
      const Hello h = recv_hello(fd.fd, world_);
      if (h.rank == 0) invalid("parallel: two processes say they are rank 0");
      sockaddr_in peer{};
      socklen_t len = sizeof(peer);
      getpeername(fd.fd, reinterpret_cast<sockaddr*>(&peer), &len);
      table[h.rank] = {peer.sin_addr.s_addr, h.port};
      keep(static_cast<int>(h.rank), fd.release());
    }
    std::vector<uint32_t> wire;
    for (const auto& e : table) {
      wire.push_back(e.addr);
      wire.push_back(htonl(e.port));
    }
    for (int r = 1; r < world_; ++r) send_all(socket_of(r), wire.data(), wire.size() * 4, rank_name(r));
    return;
  }
  const auto [listen_fd, port] = listen_on(0, world_);
  Fd listener(listen_fd);
  const std::string master_name = "rank 0 (MASTER_ADDR " + env.master_addr + ", MASTER_PORT " + std::to_string(env.master_port) + ")";
  Fd to_master(connect_before(master, env.master_port, deadline, master_name));
  set_options(to_master.fd, timeout_s_);
  send_hello(to_master.fd, rank_, world_, port, master_name);
  std::vector<uint32_t> wire(static_cast<size_t>(world_) * 2);
  recv_all(to_master.fd, wire.data(), wire.size() * 4, master_name);
  keep(0, to_master.release());
  for (int j = 1; j < rank_; ++j) {
    const uint32_t addr = wire[static_cast<size_t>(j) * 2];
    const int peer_port = static_cast<int>(ntohl(wire[static_cast<size_t>(j) * 2 + 1]));
    Fd fd(connect_before(addr, peer_port, deadline, rank_name(j)));
    send_hello(fd.fd, rank_, world_, port, rank_name(j));
    keep(j, fd.release());
  }
  for (int k = rank_ + 1; k < world_; ++k) {
    Fd fd(accept_before(listener.fd, deadline, "the ranks above " + std::to_string(rank_)));
    set_options(fd.fd, timeout_s_);
    const Hello h = recv_hello(fd.fd, world_);
    if (static_cast<int>(h.rank) <= rank_) invalid("parallel: rank " + std::to_string(h.rank) + " connected out of order");
    keep(static_cast<int>(h.rank), fd.release());
  }
}

int TcpMesh::socket_of(int peer) const {
  if (peer < 0 || peer >= world_ || peer == rank_)
    invalid("parallel: peer " + std::to_string(peer) + " is not another rank of a world of " + std::to_string(world_));
  return sockets_[static_cast<size_t>(peer)];
}

void TcpMesh::send(int peer, const void* data, size_t bytes) { send_all(socket_of(peer), data, bytes, rank_name(peer)); }
void TcpMesh::recv(int peer, void* data, size_t bytes) { recv_all(socket_of(peer), data, bytes, rank_name(peer)); }

void TcpMesh::send_recv(int send_peer, const void* send_data, size_t send_bytes, int recv_peer, void* recv_data,
                        size_t recv_bytes) {
  const int send_fd = socket_of(send_peer), recv_fd = socket_of(recv_peer);  // throws before a thread starts
  std::exception_ptr send_error;
  std::thread sender([&] {
    try {
      send_all(send_fd, send_data, send_bytes, rank_name(send_peer));
    } catch (...) {
      send_error = std::current_exception();
    }
  });
  try {
    recv_all(recv_fd, recv_data, recv_bytes, rank_name(recv_peer));
  } catch (...) {
    sender.join();  // the send gives up too, by its own timeout or the peer's closed socket
    throw;
  }
  sender.join();
  if (send_error) std::rethrow_exception(send_error);
}

void TcpMesh::all_reduce(const std::vector<int>& members, void* data, size_t count, ElemType type, ReduceOp op) {
  if (members.size() <= 1) return;
  const size_t bytes = count * elem_size(type);
  const int root = members.front();
  if (rank_ != root) {
    send(root, data, bytes);
    recv(root, data, bytes);
    return;
  }
  scratch_.resize(bytes);
  for (size_t k = 1; k < members.size(); ++k) {
    recv(members[k], scratch_.data(), bytes);
    reduce_into(data, scratch_.data(), count, type, op);
  }
  if (op == ReduceOp::Avg) divide(data, count, type, members.size());
  for (size_t k = 1; k < members.size(); ++k) send(members[k], data, bytes);
}

void TcpMesh::broadcast(const std::vector<int>& members, void* data, size_t bytes, int root) {
  if (members.size() <= 1) return;
  if (rank_ != root) {
    recv(root, data, bytes);
    return;
  }
  for (int m : members)
    if (m != root) send(m, data, bytes);
}

void TcpMesh::all_gather(const std::vector<int>& members, const void* in, size_t bytes, void* out) {
  auto* o = static_cast<std::byte*>(out);
  const int root = members.front();
  if (rank_ != root) {
    send(root, in, bytes);
    recv(root, out, bytes * members.size());
    return;
  }
  if (bytes > 0) std::memcpy(o, in, bytes);
  for (size_t k = 1; k < members.size(); ++k) recv(members[k], o + k * bytes, bytes);
  for (size_t k = 1; k < members.size(); ++k) send(members[k], out, bytes * members.size());
}

void TcpMesh::barrier(const std::vector<int>& members) {
  int32_t token = 0;
  all_reduce(members, &token, 1, ElemType::I32, ReduceOp::Sum);
}

}  // namespace loomp::parallel
