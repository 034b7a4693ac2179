// Private to core: toml++ in header-only mode and the helpers that turn its source regions into
// "file:line:col" prefixes. Included by the few files that parse TOML, so that the rest of core
// compiles without it.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#define TOML_HEADER_ONLY 1
#define TOML_EXCEPTIONS 1
#include <toml++/toml.h>

#include "loom/core/component_table.hpp"
#include "loom/plugin.h"

namespace loom::detail {

// "file:line:col" for a node's source, or the override text for values that came from --set.
std::string where(const toml::source_region &region, const std::string &fallback);

// The loom_value_type of a node (dates and times map to NONE: no parameter accepts them).
loom_value_type value_type_of(const toml::node &node);

// Human name of a node's type for messages: "an integer", "a string", ...
std::string describe_type(const toml::node &node);

// Wraps a component's table (reserved keys included) for the spec and the host API.
// `table` lives inside `document`, which the result keeps alive.
std::shared_ptr<const ComponentTable> make_component_table(std::shared_ptr<const toml::table> document,
                                                           const toml::table &table, std::string source_name,
                                                           const std::filesystem::path &base_dir);

} // namespace loom::detail
