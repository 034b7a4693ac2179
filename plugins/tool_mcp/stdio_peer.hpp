// A child process spoken to in newline-delimited JSON over its stdin and stdout (MCP's stdio
// transport). Started with fork/execvp from an argument vector: never through a shell. Its
// stderr is the host process's.
//
// Ownership: owns the child and both pipes; the destructor closes stdin, waits briefly, then
// terminates and reaps the child. Thread-safety: one thread at a time (the MCP client locks).
#ifndef LOOM_PLUGINS_MCP_STDIO_PEER_HPP
#define LOOM_PLUGINS_MCP_STDIO_PEER_HPP

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace loomp::mcp {

class StdioPeer {
 public:
  // Throws loomp::Fail (LOOM_ERR_IO) when the program cannot be started.
  explicit StdioPeer(const std::vector<std::string> &argv);
  ~StdioPeer();
  StdioPeer(const StdioPeer &) = delete;
  StdioPeer &operator=(const StdioPeer &) = delete;

  enum class Read { line, timeout, cancelled, closed, too_long };
  // Writes one line (a newline is appended) by `deadline`: line when written, closed when the
  // child has gone, timeout or cancelled. What the child writes meanwhile is kept for
  // read_line, so a child that writes while it is being written to cannot deadlock the two.
  Read write_line(const std::string &line, std::chrono::steady_clock::time_point deadline,
                  const std::function<bool()> &cancelled);
  // The next line (without its newline) into *out, waiting until `deadline`; `cancelled` is
  // polled every 50 ms. A line longer than max_bytes is skipped to its end and reported as
  // too_long (the stream stays in step for the next line).
  Read read_line(std::string *out, std::chrono::steady_clock::time_point deadline, size_t max_bytes,
                 const std::function<bool()> &cancelled);
  // "exited with status 3", "killed by signal 9", or "running".
  std::string state();

 private:
  pid_t pid_ = -1;
  int to_child_ = -1, from_child_ = -1;
  std::string pending_;  // bytes read past the last line
  bool skipping_ = false;  // inside a line that was too long
  int status_ = 0;
  bool reaped_ = false;
};

}  // namespace loomp::mcp

#endif
