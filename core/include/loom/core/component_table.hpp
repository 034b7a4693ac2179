// loom::ComponentTable: one component's table from a manifest ([attention], one [[sampler]], ...),
// with its source positions, validated against the parameters the component declares.
// The host API's config_get_* calls read from it.
// Ownership: immutable after construction and shared (std::shared_ptr<const ComponentTable>) by
// the spec and the instance created from it. Thread-safety: const methods may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loom/plugin.h"

namespace loom {

class ComponentTable {
 public:
  struct Impl;
  explicit ComponentTable(std::unique_ptr<Impl> impl);
  ~ComponentTable();
  ComponentTable(const ComponentTable &) = delete;
  ComponentTable &operator=(const ComponentTable &) = delete;

  // The keys every component table may carry besides its own parameters.
  static bool is_reserved_key(std::string_view key);

  // Checks the table against the component's declared parameters: unknown keys, missing required
  // keys and wrong types throw loom::Error (manifest) with "file:line:col: slot.key: ...".
  // Returns a copy in which absent declared parameters hold their defaults.
  std::shared_ptr<const ComponentTable> resolve(const loom_component_desc &component,
                                                std::string_view slot) const;

  // Lookups by path inside the table ("k", "a.b", "list[2]"); nullopt when absent or of another
  // type.
  loom_value_type type(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const; // ints widen
  std::optional<std::string> get_string(std::string_view key) const;
  std::optional<uint32_t> array_size(std::string_view key) const;
  // The value as JSON text; key "" is the whole table without the reserved keys.
  std::optional<std::string> json(std::string_view key) const;

  // "file:line:col" of the table itself, and its line (0 when it came from --set).
  std::string where() const;
  // "file:line:col" of the value of `key` when the manifest sets it, else where().
  std::string where(std::string_view key) const;
  uint32_t line() const;

  Impl &impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// Parses a parameter's default literal; returns an error message, empty when it fits `type`.
std::string check_default_literal(const char *literal, loom_value_type type);

const char *value_type_name(loom_value_type type);

} // namespace loom
