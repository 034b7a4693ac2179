// The `loom` CLI's commands. Each returns the process exit code (see main.cpp's usage text).
#pragma once

#include <string>
#include <vector>

namespace loom::cli {

int cmd_plugins(const std::vector<std::string> &args);
int cmd_validate(const std::vector<std::string> &args);
int cmd_run(const std::vector<std::string> &args);
int cmd_quantize(const std::vector<std::string> &args);
int cmd_train(const std::vector<std::string> &args);
int cmd_index(const std::vector<std::string> &args);

} // namespace loom::cli
