// Private to core: a device named in a manifest or the environment ("cpu", "cuda", "cuda:N").
// Throws a manifest error naming `source` and `key` for a bad name or an absent device.
#pragma once

#include <string>

#include "loom/core/host_context.hpp"

namespace loom {

DLDevice resolve_named_device(const std::string &name, const std::string &source, const std::string &key);

}  // namespace loom
