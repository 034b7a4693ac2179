// loom::Registry: finds plugin libraries, checks their ABI, and indexes components by kind,
// name and version.
//
// Search order (the highest version wins; among equal versions, the first in this order): the manifest's plugin_paths, then the
// directories in LOOM_PLUGIN_PATH (colon-separated), then the builtin directory next to the
// running binary (../lib/loom/plugins from bin/, loom/plugins from lib/), then the install
// prefix's. Libraries that fail to load during a scan are reported in diagnostics(), not thrown:
// one bad file in a directory does not hide the good ones.
// Thread-safety: scan() and open() are serialised internally; lookups may run concurrently with
// each other but not with scan().
#pragma once

#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/plugin_library.hpp"

namespace loom {

struct ComponentRef {
  std::shared_ptr<PluginLibrary> library;
  const loom_component_desc *component = nullptr;
};

class Registry {
 public:
  explicit Registry(std::vector<std::filesystem::path> search_paths);
  ~Registry();
  Registry(const Registry &) = delete;
  Registry &operator=(const Registry &) = delete;

  // The default search list for a manifest's own plugin paths.
  static std::vector<std::filesystem::path> default_search_paths(
      const std::vector<std::filesystem::path> &manifest_paths = {});
  // The directory that holds the builtin plugins of this build or installation.
  static std::filesystem::path builtin_plugin_dir();

  // Opens every library in the search paths (non-recursive, files named *.so).
  void scan();

  // Opens one library by path (or returns the one already open). When the file changed on disk
  // since it was opened (a rebuilt plugin), a private copy of the new file is opened beside the
  // old one, which stays loaded while its instances live. Throws loom::Error (plugin).
  std::shared_ptr<PluginLibrary> open(const std::filesystem::path &path);

  // The highest version of component `name` of `kind` within `version_range`, from `library`
  // when it is not empty. Throws loom::Error (plugin) naming what was looked for and what exists.
  ComponentRef find(loom_kind kind, std::string_view name, std::string_view version_range = {},
                    const std::filesystem::path &library = {});

  std::vector<std::shared_ptr<PluginLibrary>> libraries() const;
  const std::vector<std::filesystem::path> &search_paths() const { return search_paths_; }
  // "path: why" for each library that failed to load during scan().
  std::vector<std::string> diagnostics() const;

 private:
  std::shared_ptr<PluginLibrary> open_locked(const std::filesystem::path &path);

  std::vector<std::filesystem::path> search_paths_;
  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<PluginLibrary>> libraries_; // scan order
  std::vector<std::string> diagnostics_;
  std::filesystem::path shadow_dir_;
  unsigned shadow_count_ = 0;
};

} // namespace loom
