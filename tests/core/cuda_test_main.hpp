// What the core's CUDA suites share: the source tree they read fixtures from, and a main that
// skips the suite (exit 77, which CTest reports as skipped) where there is no CUDA device and
// prints a backtrace on a crash.
#pragma once

#include <catch2/catch.hpp>

#include <execinfo.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "loom/core/host_context.hpp"

namespace loom_test {

// The source tree: LOOM_SOURCE_DIR in the environment (a build run on another machine, such as
// the GPU machine), else where this build was configured.
inline std::filesystem::path source_dir() {
  const char *env = std::getenv("LOOM_SOURCE_DIR");
  return env && *env ? std::filesystem::path(env) : std::filesystem::path(LOOM_SOURCE_DIR);
}

// A crash prints where it happened (Catch2 reports the signal, restores this handler and raises
// it again): frames as module(+offset), resolved with addr2line against the build.
inline void print_backtrace(int sig) {
  void *frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, 2);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

inline int run_cuda_suite(const char *name, int argc, char **argv) {
  std::signal(SIGSEGV, print_backtrace);
  std::signal(SIGABRT, print_backtrace);
  if (!loom::cuda_device_present()) {
    std::cout << name << ": skipped: no CUDA device\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}

}  // namespace loom_test
