#include "loom/core/registry.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>

#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"

#ifndef LOOM_INSTALL_LIBDIR
#define LOOM_INSTALL_LIBDIR "lib"
#endif
#ifndef LOOM_INSTALL_PLUGIN_DIR
#define LOOM_INSTALL_PLUGIN_DIR ""
#endif

namespace loom {

namespace fs = std::filesystem;

Registry::Registry(std::vector<fs::path> search_paths) : search_paths_(std::move(search_paths)) {}

Registry::~Registry() {
  // The private copies were unlinked once mapped; only their directory is left.
  std::error_code ec;
  if (!shadow_dir_.empty()) fs::remove(shadow_dir_, ec);
}

fs::path Registry::builtin_plugin_dir() {
  // The module (executable or libloom) that holds this code tells where the build or the
  // installation is: <prefix>/bin/x -> <prefix>/lib/loom/plugins, <prefix>/lib/libloom.so ->
  // <prefix>/lib/loom/plugins.
  Dl_info info{};
  if (dladdr(reinterpret_cast<void *>(&Registry::builtin_plugin_dir), &info) != 0 && info.dli_fname != nullptr) {
    std::error_code ec;
    fs::path module = fs::canonical(fs::path(info.dli_fname), ec);
    if (ec) module = fs::path("/proc/self/exe");
    fs::path dir = fs::canonical(module, ec).parent_path();
    std::vector<fs::path> candidates;
    if (dir.filename() == "bin") {
      candidates.push_back(dir.parent_path() / LOOM_INSTALL_LIBDIR / "loom" / "plugins"); // e.g. lib/x86_64-linux-gnu
      candidates.push_back(dir.parent_path() / "lib" / "loom" / "plugins");
    } else {
      candidates.push_back(dir / "loom" / "plugins");
    }
    for (const auto &candidate : candidates)
      if (fs::is_directory(candidate, ec)) return candidate;
  }
  return fs::path(LOOM_INSTALL_PLUGIN_DIR);
}

std::vector<fs::path> Registry::default_search_paths(const std::vector<fs::path> &manifest_paths) {
  std::vector<fs::path> out = manifest_paths;
  if (const char *env = std::getenv("LOOM_PLUGIN_PATH")) {
    std::stringstream ss(env);
    std::string item;
    while (std::getline(ss, item, ':'))
      if (!item.empty()) out.emplace_back(item);
  }
  fs::path builtin = builtin_plugin_dir();
  if (!builtin.empty()) out.push_back(builtin);
  fs::path installed = LOOM_INSTALL_PLUGIN_DIR;
  if (!installed.empty() && installed != builtin) out.push_back(installed);
  return out;
}

void Registry::scan() {
  std::lock_guard lock(mutex_);
  for (const auto &dir : search_paths_) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<fs::path> files;
    for (const auto &entry : fs::directory_iterator(dir, ec))
      if (entry.path().extension() == ".so") files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    for (const auto &file : files) {
      try {
        open_locked(file);
      } catch (const Error &e) {
        if (std::find(diagnostics_.begin(), diagnostics_.end(), e.what()) == diagnostics_.end())
          diagnostics_.push_back(e.what());
      }
    }
  }
}

std::shared_ptr<PluginLibrary> Registry::open(const fs::path &path) {
  std::lock_guard lock(mutex_);
  return open_locked(path);
}

namespace {

// The newest library this process opened from each path, kept loaded until the process ends
// or a rebuilt file at that path replaces it, whichever registry opened it. Why: a library with
// CUDA kernels must not be unloaded and then mapped again in one process, which a registry per
// runtime would do (a CPU runtime, then a CUDA runtime): the CUDA runtime crashed looking up
// the reloaded library's kernels (cudart 13, seen in sdpa's CUDA path). A rebuilt library is
// loaded from a private copy, at another address, and the old one still goes with its last
// instance.
struct LoadedLibraries {
  std::mutex mutex;
  std::map<fs::path, std::shared_ptr<PluginLibrary>> newest;
};
LoadedLibraries &loaded_libraries() {
  static LoadedLibraries loaded; // never destroyed before the registries that use it
  return loaded;
}

} // namespace

std::shared_ptr<PluginLibrary> Registry::open_locked(const fs::path &path) {
  std::error_code ec;
  fs::path canonical = fs::weakly_canonical(path, ec);
  if (ec) canonical = path;
  auto mtime = fs::last_write_time(canonical, ec);
  auto size = fs::file_size(canonical, ec);
  // The newest library opened from this path, if any.
  std::shared_ptr<PluginLibrary> previous;
  for (const auto &lib : libraries_)
    if (lib->path() == canonical) previous = lib;
  if (previous && !ec && previous->opened_mtime() == mtime && previous->opened_size() == size) return previous;
  auto &loaded = loaded_libraries();
  std::lock_guard loaded_lock(loaded.mutex);
  std::shared_ptr<PluginLibrary> &newest = loaded.newest[canonical];
  if (newest && !ec && newest->opened_mtime() == mtime && newest->opened_size() == size) {
    // Another registry of this process has it open: share it.
    if (previous)
      std::replace(libraries_.begin(), libraries_.end(), previous, newest);
    else
      libraries_.push_back(newest);
    return newest;
  }
  fs::path load_path = canonical;
  if (previous || newest) {
    // A rebuilt file at a path already open: the dynamic loader would hand back the old mapping,
    // so open a private copy of the new file instead. The copy is unlinked once mapped.
    if (shadow_dir_.empty()) {
      std::string tmpl = (fs::temp_directory_path() / "loom-plugins-XXXXXX").string();
      if (mkdtemp(tmpl.data()) == nullptr) throw plugin_error(path.string() + ": cannot create a directory for a reloaded copy");
      shadow_dir_ = tmpl;
    }
    load_path = shadow_dir_ / (canonical.stem().string() + "." + std::to_string(++shadow_count_) + ".so");
    fs::copy_file(canonical, load_path, fs::copy_options::overwrite_existing, ec);
    if (ec) throw plugin_error(path.string() + ": cannot copy the rebuilt library: " + ec.message());
  }
  std::shared_ptr<PluginLibrary> lib;
  try {
    lib = PluginLibrary::open(canonical, load_path);
  } catch (...) {
    if (load_path != canonical) fs::remove(load_path, ec);
    throw;
  }
  if (load_path != canonical) fs::remove(load_path, ec);
  newest = lib;
  // The rebuilt library replaces the old one in the index; the old one stays loaded only while
  // instances created from it live.
  if (previous)
    std::replace(libraries_.begin(), libraries_.end(), previous, lib); // keeps its search-path rank
  else
    libraries_.push_back(lib);
  return lib;
}

ComponentRef Registry::find(loom_kind kind, std::string_view name, std::string_view version_range,
                            const fs::path &library) {
  std::vector<std::shared_ptr<PluginLibrary>> candidates;
  if (!library.empty()) {
    candidates.push_back(open(library));
  } else {
    std::lock_guard lock(mutex_);
    candidates = libraries_;
  }
  ComponentRef best;
  Version best_version;
  std::vector<std::string> other_versions;
  for (const auto &lib : candidates) {
    for (const loom_component_desc *c : lib->components()) {
      if (c->kind != kind || name != c->name) continue;
      Version v = lib->component_version(*c);
      if (!version_satisfies(v, version_range)) {
        other_versions.push_back(v.to_string());
        continue;
      }
      // Higher versions win; at equal versions the earlier search path wins (a rebuilt library
      // took its predecessor's place in the list).
      if (best.component == nullptr || v > best_version) {
        best = {lib, c};
        best_version = v;
      }
    }
  }
  if (best.component != nullptr) return best;
  std::string what = std::string(kind_name(kind)) + " component '" + std::string(name) + "'";
  if (!version_range.empty()) what += " with version " + std::string(version_range);
  if (!other_versions.empty()) {
    std::string list;
    for (const auto &v : other_versions) list += (list.empty() ? "" : ", ") + v;
    throw plugin_error("no " + what + " (found versions " + list + ")");
  }
  std::string known;
  for (const auto &lib : candidates)
    for (const loom_component_desc *c : lib->components())
      if (c->kind == kind) known += std::string(known.empty() ? "" : ", ") + c->name;
  std::string where = library.empty() ? "in the plugin search path" : "in " + library.string();
  std::string failed;
  if (size_t n = diagnostics().size(); n > 0 && library.empty())
    failed = "; " + std::to_string(n) + " librar" + (n == 1 ? "y" : "ies") +
             " in the search path failed to load (`loom plugins` says why)";
  throw plugin_error("no " + what + " " + where + (known.empty() ? "" : " (available: " + known + ")") + failed);
}

std::vector<std::shared_ptr<PluginLibrary>> Registry::libraries() const {
  std::lock_guard lock(mutex_);
  return libraries_;
}

std::vector<std::string> Registry::diagnostics() const {
  std::lock_guard lock(mutex_);
  return diagnostics_;
}

} // namespace loom
