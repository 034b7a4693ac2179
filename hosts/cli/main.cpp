// loom: the command-line host. Exit codes:
//   0 success, 1 a failure while running, 2 bad command-line use, 3 an invalid manifest,
//   4 a plugin that cannot be found, loaded or created.
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "loom/abi.h"

namespace {

const char *kUsage = R"(usage: loom <command> [options]

Loom: an LLM runtime assembled from plugins by TOML manifests.

commands:
  plugins [--json] [--path DIR]...   list plugin libraries and their components
  validate MANIFEST [--set K=V]...   check a manifest against the installed plugins
  run MANIFEST [--set K=V]...        build the pipeline and run the manifest's [run] section
  quantize MANIFEST --out DIR        write the [model] quantized by its [quantizer], to load later
  train MANIFEST [--steps N]         train the [model] on the [train] data (CPU), with checkpoints
  index build|query MANIFEST ...     ingest a folder into the manifest's retrievers and save their
                                     indexes; query the saved indexes
  serve MANIFEST [--set K=V]...      serve the model over HTTP: OpenAI-compatible completions,
                                     chat, embeddings, with /health, /ready and /metrics
  version                            print Loom's version and plugin ABI

`loom <command> --help` describes a command.

exit codes:
  0 success   1 runtime failure   2 usage error   3 invalid manifest   4 plugin error

environment:
  LOOM_PLUGIN_PATH   colon-separated directories searched for plugins before the builtin ones
  LOOM_DEBUG         when set, plugins' debug log lines are printed
)";

} // namespace

int main(int argc, char **argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  std::string command = args.front();
  args.erase(args.begin());
  if (command == "--help" || command == "-h" || command == "help") {
    std::cout << kUsage;
    return 0;
  }
  if (command == "version" || command == "--version") {
    std::cout << "loom " << LOOM_VERSION << " (plugin ABI " << LOOM_ABI_MAJOR << "." << LOOM_ABI_MINOR << ")\n";
    return 0;
  }
  if (command == "plugins") return loom::cli::cmd_plugins(args);
  if (command == "validate") return loom::cli::cmd_validate(args);
  if (command == "run") return loom::cli::cmd_run(args);
  if (command == "quantize") return loom::cli::cmd_quantize(args);
  if (command == "train") return loom::cli::cmd_train(args);
  if (command == "index") return loom::cli::cmd_index(args);
  if (command == "serve") return loom::cli::cmd_serve(args);
  std::cerr << "loom: unknown command '" << command << "'\n\n" << kUsage;
  return 2;
}
