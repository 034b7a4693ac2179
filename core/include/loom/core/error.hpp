// loom::Error: the one exception type core throws. Its message is one line that names the file,
// key or library concerned; its category picks the CLI's exit code.
// Thread-safety: a value type.
#pragma once

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
  Error(ErrorCategory category, const std::string &message)
      : std::runtime_error(message), category_(category) {}
  ErrorCategory category() const noexcept { return category_; }

 private:
  ErrorCategory category_;
};

inline Error manifest_error(const std::string &m) { return Error(ErrorCategory::manifest, m); }
inline Error plugin_error(const std::string &m) { return Error(ErrorCategory::plugin, m); }
inline Error runtime_error(const std::string &m) { return Error(ErrorCategory::runtime, m); }

} // namespace loom
