// The `loom` CLI's commands. Each returns the process exit code (see main.cpp's usage text).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace loom::cli {

int cmd_plugins(const std::vector<std::string> &args);
int cmd_validate(const std::vector<std::string> &args);
int cmd_run(const std::vector<std::string> &args);
int cmd_quantize(const std::vector<std::string> &args);
int cmd_train(const std::vector<std::string> &args);
int cmd_index(const std::vector<std::string> &args);
int cmd_serve(const std::vector<std::string> &args); // serve_command.cpp

// Options shared by the commands that read a manifest.
struct ManifestArgs {
  std::string manifest;
  std::vector<std::string> overrides;
  int64_t steps = 0;
  int64_t warmup = 0;         // loom run: untimed runs first
  bool print_tokens = false;  // loom run --tokens: token ids printed beside the text
  bool help = false;
};

// Parses MANIFEST [--set K=V]... [--steps N] [--warmup N] [--tokens]; throws loom::Error (usage).
// --warmup and --tokens are loom run's (run_flags).
ManifestArgs parse_manifest_args(const std::vector<std::string> &args, bool allow_steps, bool run_flags = false);
// Runs a command's body: a loom::Error is printed (with `usage` for usage errors) and becomes
// its category's exit code; any other exception exits 1.
int guarded(const char *usage, const std::function<int()> &body);

} // namespace loom::cli
