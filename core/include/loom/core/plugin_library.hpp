// loom::PluginLibrary: one opened plugin library whose descriptor passed every check.
//
// Opened with local symbol visibility (RTLD_LOCAL | RTLD_NOW) through Boost.DLL. The library
// stays loaded while any std::shared_ptr<PluginLibrary> lives: every instance created from one of
// its components holds such a pointer, so no call ever reaches an unloaded library.
// Thread-safety: immutable after open(); const methods may run concurrently.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "loom/core/version.hpp"
#include "loom/plugin.h"

namespace loom {

class PluginLibrary {
 public:
  // Opens and checks a library. `load_path` is the file actually opened (a private copy when a
  // rebuilt library is reloaded); `path` is the one the user named. Throws loom::Error (plugin)
  // with a one-line message naming the file and the cause.
  static std::shared_ptr<PluginLibrary> open(const std::filesystem::path &path,
                                             const std::filesystem::path &load_path);
  ~PluginLibrary();
  PluginLibrary(const PluginLibrary &) = delete;
  PluginLibrary &operator=(const PluginLibrary &) = delete;

  const std::filesystem::path &path() const { return path_; }
  const loom_plugin_desc &descriptor() const { return *desc_; }
  std::string name() const { return desc_->name; }
  std::string version() const { return desc_->version; }
  const std::vector<const loom_component_desc *> &components() const { return components_; }
  Version component_version(const loom_component_desc &c) const;
  // Identity of the file when it was opened, to notice a rebuilt library at the same path.
  std::filesystem::file_time_type opened_mtime() const { return mtime_; }
  uintmax_t opened_size() const { return size_; }

 private:
  PluginLibrary() = default;
  struct Handle;
  std::unique_ptr<Handle> handle_;
  std::filesystem::path path_;
  const loom_plugin_desc *desc_ = nullptr;
  std::vector<const loom_component_desc *> components_;
  std::filesystem::file_time_type mtime_{};
  uintmax_t size_ = 0;
};

// Checks a descriptor as the host reads it; returns an error message or "" when it is sound.
// Exposed for the descriptor-validation tests.
std::string check_plugin_descriptor(const loom_plugin_desc *desc);

} // namespace loom
