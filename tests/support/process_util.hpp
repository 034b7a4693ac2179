// Test helpers for suites that start processes: a free loopback port for a rendezvous, a
// shell command's exit code with its output, and a world of forked ranks (torchrun's variables).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>
#include <stdexcept>
#include <string>

namespace loom_test {

// A port nobody listens on now (bound, read and closed: another process could take it before
// the test does, which the kernel makes unlikely by handing out ports in turn).
inline int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("socket() failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr *>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

struct ShellResult {
  int code;         // the exit status, -1 when the shell did not exit normally
  std::string out;  // what the command wrote to the pipe
};

// Runs `cmd` through /bin/sh (popen) and collects its standard output.
inline ShellResult run_shell(const std::string &cmd) {
  FILE *p = popen(cmd.c_str(), "r");
  if (p == nullptr) throw std::runtime_error("popen failed: " + cmd);
  std::string out;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// torchrun's environment for rank `rank` of `world` meeting on 127.0.0.1:port.
inline void set_rank_env(int rank, int world, int port) {
  setenv("RANK", std::to_string(rank).c_str(), 1);
  setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
  setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
}
inline void clear_rank_env() {
  for (const char *v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) unsetenv(v);
}

// Runs body(rank) in `world` processes (rank 0 in this one, the others forked first) and
// returns each rank's failure text ("" when it passed).
inline std::vector<std::string> run_world(int world, const std::function<std::string(int)> &body) {
  const int port = free_loopback_port();
  std::vector<pid_t> children;
  std::vector<int> pipes;
  for (int r = 1; r < world; ++r) {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe() failed");
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork() failed");
    if (pid == 0) {
      ::close(fds[0]);
      set_rank_env(r, world, port);
      std::string err;
      try {
        err = body(r);
      } catch (const std::exception &e) {
        err = e.what();
      }
      if (!err.empty()) (void)!::write(fds[1], err.data(), err.size());
      ::close(fds[1]);
      _exit(err.empty() ? 0 : 1);
    }
    ::close(fds[1]);
    children.push_back(pid);
    pipes.push_back(fds[0]);
  }
  set_rank_env(0, world, port);
  std::vector<std::string> errors(static_cast<size_t>(world));
  try {
    errors[0] = body(0);
  } catch (const std::exception &e) {
    errors[0] = e.what();
  }
  clear_rank_env();
  for (size_t k = 0; k < children.size(); ++k) {
    char buf[4096];
    ssize_t n = 0;
    std::string text;
    while ((n = ::read(pipes[k], buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(n));
    ::close(pipes[k]);
    int status = 0;
    ::waitpid(children[k], &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) errors[k + 1] = text.empty() ? "rank died" : text;
  }
  return errors;
}

}  // namespace loom_test
