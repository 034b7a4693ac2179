// ScopedEnv: an environment variable set for a test's scope, the value it had (or its absence)
// put back when the scope ends, so that a user's own setting survives the test run.
// Thread-safety: setenv/unsetenv are not; use from a test's own thread.
#pragma once

#include <cstdlib>
#include <optional>
#include <string>

class ScopedEnv {
 public:
  explicit ScopedEnv(const char *name) : name_(name) {
    if (const char *was = std::getenv(name)) was_ = was;
  }
  ScopedEnv(const ScopedEnv &) = delete;
  ScopedEnv &operator=(const ScopedEnv &) = delete;
  ~ScopedEnv() {
    if (was_) setenv(name_.c_str(), was_->c_str(), 1);
    else unsetenv(name_.c_str());
  }
  void set(const char *value) const { setenv(name_.c_str(), value, 1); }
  void unset() const { unsetenv(name_.c_str()); }

 private:
  std::string name_;
  std::optional<std::string> was_;
};
