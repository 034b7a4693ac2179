// Private to core: a device named in a manifest or the environment ("cpu", "cuda", "cuda:N"), as
// the runtime and loom train choose it. Throws a manifest error naming the source and key for a
// bad name or an absent device.
#pragma once

#include <string>

#include "loom/core/host_context.hpp"
#include "loom/core/manifest.hpp"

namespace loom {

DLDevice resolve_named_device(const std::string &name, const std::string &source, const std::string &key);

// The manifest's [loom] device; "auto": the LOOM_DEVICE environment variable when set, else the
// first GPU when there is one and `gpu_runs_it` (what the caller runs can run there), else the CPU.
// With a [parallel] component, "cuda" (no index) is the GPU of the process's local rank.
DLDevice resolve_manifest_device(const Manifest &m, bool gpu_runs_it);

}  // namespace loom
