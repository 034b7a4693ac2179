#include "stdio_peer.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "loom/abi.h"
#include "loom_plugin_util.hpp"

namespace loomp::mcp {

StdioPeer::StdioPeer(const std::vector<std::string> &argv) {
  if (argv.empty() || argv[0].empty()) fail(LOOM_ERR_INVALID_ARGUMENT, "mcp: command is empty");
  int in[2], out[2];
  if (pipe2(in, O_CLOEXEC) != 0) fail(LOOM_ERR_IO, std::string("mcp: pipe: ") + std::strerror(errno));
  if (pipe2(out, O_CLOEXEC) != 0) {
    close(in[0]);
    close(in[1]);
    fail(LOOM_ERR_IO, std::string("mcp: pipe: ") + std::strerror(errno));
  }
  // A pipe to report exec's failure: closed by exec on success (O_CLOEXEC), so the parent reads
  // either the errno or end-of-file.
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) {
    for (int fd : {in[0], in[1], out[0], out[1]}) close(fd);
    fail(LOOM_ERR_IO, std::string("mcp: pipe: ") + std::strerror(errno));
  }
  std::vector<char *> args;
  for (const auto &a : argv) args.push_back(const_cast<char *>(a.c_str()));
  args.push_back(nullptr);
  pid_ = fork();
  if (pid_ < 0) {
    const int e = errno;
    for (int fd : {in[0], in[1], out[0], out[1], report[0], report[1]}) close(fd);
    fail(LOOM_ERR_IO, std::string("mcp: fork: ") + std::strerror(e));
  }
  if (pid_ == 0) {  // the child: only async-signal-safe calls until exec
    dup2(in[0], STDIN_FILENO);
    dup2(out[1], STDOUT_FILENO);
    execvp(args[0], args.data());
    const int e = errno;
    ssize_t ignored = write(report[1], &e, sizeof e);
    (void)ignored;
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  close(report[1]);
  to_child_ = in[1];
  from_child_ = out[0];
  fcntl(to_child_, F_SETFL, fcntl(to_child_, F_GETFL) | O_NONBLOCK);  // writes wait in poll, with a deadline
  int child_errno = 0;
  const ssize_t got = read(report[0], &child_errno, sizeof child_errno);
  close(report[0]);
  if (got == static_cast<ssize_t>(sizeof child_errno)) {
    waitpid(pid_, &status_, 0);
    reaped_ = true;
    close(to_child_);
    close(from_child_);
    fail(LOOM_ERR_IO, "mcp: cannot start '" + argv[0] + "': " + std::strerror(child_errno));
  }
}

StdioPeer::~StdioPeer() {
  if (to_child_ >= 0) close(to_child_);  // the server's end-of-input: MCP's shutdown
  if (from_child_ >= 0) close(from_child_);
  if (reaped_ || pid_ <= 0) return;
  for (int i = 0; i < 20; ++i) {  // up to a second to exit by itself
    if (waitpid(pid_, &status_, WNOHANG) == pid_) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid_, SIGTERM);
  for (int i = 0; i < 20; ++i) {
    if (waitpid(pid_, &status_, WNOHANG) == pid_) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, &status_, 0);
}

StdioPeer::Read StdioPeer::write_line(const std::string &line, std::chrono::steady_clock::time_point deadline,
                                      const std::function<bool()> &cancelled) {
  // A write to a server that has exited raises SIGPIPE, which would end the host: the signal is
  // blocked on this thread for the write and, when raised, taken back before unblocking (the
  // process's own disposition is left alone).
  sigset_t pipe_only, previous;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_only, &previous);
  const std::string data = line + "\n";
  size_t at = 0;
  Read outcome = Read::line;
  char buf[65536];
  while (at < data.size()) {
    if (cancelled && cancelled()) {
      outcome = Read::cancelled;
      break;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      outcome = Read::timeout;
      break;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    pollfd p[2] = {{to_child_, POLLOUT, 0}, {from_child_, POLLIN, 0}};
    const int ready = poll(p, 2, static_cast<int>(std::min<long long>(left, 50)));
    if (ready < 0 && errno != EINTR) {
      outcome = Read::closed;
      break;
    }
    if (ready <= 0) continue;
    if (p[1].revents & POLLIN) {  // drain what the child writes meanwhile
      const ssize_t n = read(from_child_, buf, sizeof buf);
      if (n > 0) pending_.append(buf, static_cast<size_t>(n));
    }
    if (p[0].revents & (POLLERR | POLLHUP)) {
      outcome = Read::closed;
      break;
    }
    if (!(p[0].revents & POLLOUT)) continue;
    const ssize_t n = write(to_child_, data.data() + at, data.size() - at);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) {
      if (errno == EPIPE) {
        const timespec none{0, 0};
        sigtimedwait(&pipe_only, nullptr, &none);
      }
      outcome = Read::closed;
      break;
    }
    at += static_cast<size_t>(n);
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  return outcome;
}

StdioPeer::Read StdioPeer::read_line(std::string *out, std::chrono::steady_clock::time_point deadline, size_t max_bytes,
                                     const std::function<bool()> &cancelled) {
  char buf[65536];
  for (;;) {
    // A whole line already buffered?
    const size_t nl = pending_.find('\n');
    if (nl != std::string::npos) {
      if (skipping_) {  // the end of an over-long line
        pending_.erase(0, nl + 1);
        skipping_ = false;
        return Read::too_long;
      }
      if (nl > max_bytes) {  // a whole line, too long
        pending_.erase(0, nl + 1);
        return Read::too_long;
      }
      *out = pending_.substr(0, nl);
      pending_.erase(0, nl + 1);
      if (!out->empty() && out->back() == '\r') out->pop_back();
      return Read::line;
    }
    if (pending_.size() > max_bytes) {  // too long already: drop it and skip to its end
      pending_.clear();
      skipping_ = true;
    }
    if (cancelled && cancelled()) return Read::cancelled;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return Read::timeout;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    pollfd p{from_child_, POLLIN, 0};
    const int ready = poll(&p, 1, static_cast<int>(std::min<long long>(left, 50)));
    if (ready < 0 && errno != EINTR) return Read::closed;
    if (ready <= 0) continue;
    const ssize_t n = read(from_child_, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return Read::closed;
    pending_.append(buf, static_cast<size_t>(n));
    if (skipping_) {  // keep only what follows the over-long line's end
      const size_t end = pending_.find('\n');
      if (end == std::string::npos) {
        pending_.clear();
      } else {
        pending_.erase(0, end + 1);
        skipping_ = false;
        return Read::too_long;
      }
    }
  }
}

std::string StdioPeer::state() {
  if (!reaped_ && pid_ > 0 && waitpid(pid_, &status_, WNOHANG) == pid_) reaped_ = true;
  if (!reaped_) return "running";
  if (WIFEXITED(status_)) return "exited with status " + std::to_string(WEXITSTATUS(status_));
  if (WIFSIGNALED(status_)) return "killed by signal " + std::to_string(WTERMSIG(status_));
  return "gone";
}

}  // namespace loomp::mcp
