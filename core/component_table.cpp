#include "loom/core/component_table.hpp"

#include <cstring>
#include <sstream>

#include "loom/core/error.hpp"
#include "toml_guard.hpp"
#include "toml_support.hpp"

namespace loom {

// toml++ does not copy source regions with a table, so the table is borrowed from the parsed
// document (kept alive here) until resolve() makes the owned copy that lookups read.
struct ComponentTable::Impl {
  std::shared_ptr<const toml::table> document;
  const toml::table *table = nullptr;
  toml::table owned;
  std::string source_name;
  std::string where;
  uint32_t line = 0;
  std::filesystem::path base_dir; // LOOM_VALUE_PATH parameters resolve against it
};

namespace detail {

std::string where(const toml::source_region &region, const std::string &fallback) {
  std::string path = region.path ? *region.path : fallback;
  if (path.rfind("--set ", 0) == 0 || region.begin.line == 0) return path;
  return path + ":" + std::to_string(region.begin.line) + ":" + std::to_string(region.begin.column);
}

loom_value_type value_type_of(const toml::node &node) {
  switch (node.type()) {
  case toml::node_type::boolean: return LOOM_VALUE_BOOL;
  case toml::node_type::integer: return LOOM_VALUE_INT;
  case toml::node_type::floating_point: return LOOM_VALUE_FLOAT;
  case toml::node_type::string: return LOOM_VALUE_STRING;
  case toml::node_type::array: return LOOM_VALUE_ARRAY;
  case toml::node_type::table: return LOOM_VALUE_TABLE;
  default: return LOOM_VALUE_NONE;
  }
}

std::string describe_type(const toml::node &node) {
  switch (node.type()) {
  case toml::node_type::boolean: return "a boolean";
  case toml::node_type::integer: return "an integer";
  case toml::node_type::floating_point: return "a float";
  case toml::node_type::string: return "a string";
  case toml::node_type::array: return "an array";
  case toml::node_type::table: return "a table";
  default: return "a date or time";
  }
}

std::shared_ptr<const ComponentTable> make_component_table(std::shared_ptr<const toml::table> document,
                                                           const toml::table &table, std::string source_name,
                                                           const std::filesystem::path &base_dir) {
  auto impl = std::make_unique<ComponentTable::Impl>();
  impl->document = std::move(document);
  impl->table = &table;
  impl->where = where(table.source(), source_name);
  impl->line = table.source().begin.line;
  impl->source_name = std::move(source_name);
  impl->base_dir = base_dir;
  return std::make_shared<const ComponentTable>(std::move(impl));
}

} // namespace detail

const char *value_type_name(loom_value_type type) {
  switch (type) {
  case LOOM_VALUE_BOOL: return "a boolean";
  case LOOM_VALUE_INT: return "an integer";
  case LOOM_VALUE_FLOAT: return "a number";
  case LOOM_VALUE_STRING: return "a string";
  case LOOM_VALUE_ARRAY: return "an array";
  case LOOM_VALUE_TABLE: return "a table";
  case LOOM_VALUE_PATH: return "a path";
  default: return "nothing";
  }
}

namespace {

bool fits(const toml::node &node, loom_value_type type) {
  loom_value_type actual = detail::value_type_of(node);
  return actual == type || (type == LOOM_VALUE_FLOAT && actual == LOOM_VALUE_INT) ||
         (type == LOOM_VALUE_PATH && actual == LOOM_VALUE_STRING);
}

// Parses a default literal into a node; nullptr when it does not parse.
std::unique_ptr<toml::node> parse_literal(const char *literal) {
  if (detail::find_toml_hazard(literal)) return nullptr;
  try {
    toml::table t = toml::parse(std::string("v = ") + literal);
    toml::node *n = t.get("v");
    if (n == nullptr) return nullptr;
    return std::unique_ptr<toml::node>(n->visit([](auto &v) -> toml::node * {
      return new std::remove_cvref_t<decltype(v)>(v);
    }));
  } catch (const toml::parse_error &) {
    return nullptr;
  }
}

} // namespace

std::string check_default_literal(const char *literal, loom_value_type type) {
  if (literal == nullptr) return {};
  auto node = parse_literal(literal);
  if (!node) return std::string("default '") + literal + "' is not a TOML value";
  if (!fits(*node, type))
    return std::string("default '") + literal + "' is " + detail::describe_type(*node) +
           ", but the parameter is declared as " + value_type_name(type);
  return {};
}

ComponentTable::ComponentTable(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ComponentTable::~ComponentTable() = default;

bool ComponentTable::is_reserved_key(std::string_view key) {
  return key == "use" || key == "library" || key == "version" || key == "name" || key == "weights" || key == "index";
}

std::shared_ptr<const ComponentTable> ComponentTable::resolve(const loom_component_desc &component,
                                                              std::string_view slot) const {
  const auto &table = *impl_->table;
  auto param_of = [&](std::string_view key) -> const loom_param_desc * {
    for (uint32_t i = 0; i < component.param_count; ++i)
      if (key == component.params[i].key) return &component.params[i];
    return nullptr;
  };
  for (auto &&[key, node] : table) {
    if (is_reserved_key(key.str())) continue;
    const loom_param_desc *param = param_of(key.str());
    std::string prefix = detail::where(node.source(), impl_->source_name) + ": " +
                         std::string(slot) + "." + std::string(key.str()) + ": ";
    if (param == nullptr) {
      prefix = detail::where(key.source(), impl_->source_name) + ": " + std::string(slot) + "." +
               std::string(key.str()) + ": ";
      std::string known;
      for (uint32_t i = 0; i < component.param_count; ++i)
        known += std::string(known.empty() ? "" : ", ") + component.params[i].key;
      throw manifest_error(prefix + "unknown key for component '" + component.name + "'" +
                           (known.empty() ? " (it takes no parameters)" : " (known: " + known + ")"));
    }
    if (!fits(node, param->type))
      throw manifest_error(prefix + "expected " + value_type_name(param->type) + ", got " +
                           detail::describe_type(node));
  }
  auto impl = std::make_unique<Impl>();
  impl->owned = table;
  impl->table = &impl->owned;
  impl->source_name = impl_->source_name;
  impl->where = impl_->where;
  impl->line = impl_->line;
  impl->base_dir = impl_->base_dir;
  for (uint32_t i = 0; i < component.param_count; ++i) {
    const loom_param_desc &param = component.params[i];
    if (!table.contains(param.key)) {
      if (param.required)
        throw manifest_error(where() + ": " + std::string(slot) + ": missing required key '" + param.key +
                             "' for component '" + component.name + "'");
      if (param.default_value != nullptr) {
        auto node = parse_literal(param.default_value);
        if (node) impl->owned.insert_or_assign(param.key, std::move(*node));
      }
    }
    if (param.type == LOOM_VALUE_PATH) {
      // Relative paths name files beside the manifest, wherever the process was started.
      if (auto *s = impl->owned.get_as<std::string>(param.key)) {
        std::filesystem::path p = s->get();
        if (!p.empty() && p.is_relative()) *s = (impl->base_dir / p).lexically_normal().string();
      }
    }
  }
  return std::make_shared<const ComponentTable>(std::move(impl));
}

namespace {

toml::node_view<const toml::node> find(const toml::table &table, std::string_view key) {
  if (key.empty()) return table.operator toml::node_view<const toml::node>();
  return table.at_path(key);
}

} // namespace

loom_value_type ComponentTable::type(std::string_view key) const {
  auto view = find(*impl_->table, key);
  return view ? detail::value_type_of(*view.node()) : LOOM_VALUE_NONE;
}

std::optional<bool> ComponentTable::get_bool(std::string_view key) const {
  auto view = find(*impl_->table, key);
  if (!view || !view.is_boolean()) return std::nullopt;
  return view.value<bool>();
}

std::optional<int64_t> ComponentTable::get_int(std::string_view key) const {
  auto view = find(*impl_->table, key);
  if (!view || !view.is_integer()) return std::nullopt;
  return view.value<int64_t>();
}

std::optional<double> ComponentTable::get_float(std::string_view key) const {
  auto view = find(*impl_->table, key);
  if (!view) return std::nullopt;
  if (view.is_floating_point()) return view.value<double>();
  if (view.is_integer()) return static_cast<double>(*view.value<int64_t>());
  return std::nullopt;
}

std::optional<std::string> ComponentTable::get_string(std::string_view key) const {
  auto view = find(*impl_->table, key);
  if (!view || !view.is_string()) return std::nullopt;
  return view.value<std::string>();
}

std::optional<uint32_t> ComponentTable::array_size(std::string_view key) const {
  auto view = find(*impl_->table, key);
  if (!view || !view.is_array()) return std::nullopt;
  return static_cast<uint32_t>(view.as_array()->size());
}

std::optional<std::string> ComponentTable::json(std::string_view key) const {
  std::ostringstream out;
  if (key.empty()) {
    toml::table copy = *impl_->table;
    for (const char *reserved : {"use", "library", "version", "name", "weights", "index"}) copy.erase(reserved);
    out << toml::json_formatter{copy};
    return out.str();
  }
  auto view = find(*impl_->table, key);
  if (!view) return std::nullopt;
  const toml::node &node = *view.node();
  if (node.is_table() || node.is_array()) {
    out << toml::json_formatter{node};
  } else {
    // Scalars: wrap in an array and strip the brackets, so the formatter does the escaping.
    toml::array wrapper;
    wrapper.push_back(node);
    out << toml::json_formatter{wrapper};
    std::string s = out.str();
    size_t a = s.find('['), b = s.rfind(']');
    std::string inner = s.substr(a + 1, b - a - 1);
    while (!inner.empty() && std::isspace(static_cast<unsigned char>(inner.front()))) inner.erase(0, 1);
    while (!inner.empty() && std::isspace(static_cast<unsigned char>(inner.back()))) inner.pop_back();
    return inner;
  }
  return out.str();
}

std::string ComponentTable::where() const { return impl_->where; }
std::string ComponentTable::where(std::string_view key) const {
  auto view = find(*impl_->table, key);
  if (!view || view.node()->source().begin.line == 0) return impl_->where; // absent, or a default
  return detail::where(view.node()->source(), impl_->source_name);
}
uint32_t ComponentTable::line() const { return impl_->line; }

} // namespace loom
