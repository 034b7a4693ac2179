// loom::Error: the one exception type core throws. Its message is one line that names the file,
// key or library concerned; its category picks the CLI's exit code.
// Thread-safety: a value type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace loom {

enum class ErrorCategory {
  manifest = 3, // malformed or invalid manifest, bad --set override
  plugin = 4,   // a plugin library or component cannot be found, loaded or created
  runtime = 1,  // a failure while running (a plugin call returned an error)
  usage = 2,    // bad command-line use
};

class Error : public std::runtime_error {
 public:
  // `status` is the loom_status behind the failure when one is known (a plugin's return value,
  // LOOM_ERR_NOT_FOUND for a missing slot), 0 otherwise.
  Error(ErrorCategory category, const std::string &message, int32_t status = 0)
      : std::runtime_error(message), category_(category), status_(status) {}
  ErrorCategory category() const noexcept { return category_; }
  int32_t status() const noexcept { return status_; }

 private:
  ErrorCategory category_;
  int32_t status_;
};

inline Error manifest_error(const std::string &m) { return Error(ErrorCategory::manifest, m); }
inline Error plugin_error(const std::string &m) { return Error(ErrorCategory::plugin, m); }
inline Error runtime_error(const std::string &m, int32_t status = 0) { return Error(ErrorCategory::runtime, m, status); }

} // namespace loom
