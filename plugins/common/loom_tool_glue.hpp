// The tool vtable's C entry points for a builtin plugin that offers one tool (calculator,
// http_get), so that each writes its tool and not the ABI edge: NULL and struct_size checks,
// the name check, exceptions turned into statuses through guard(), the result written back.
//
// T is the instance type: constructible from (host, ctx), with `host`, `ctx` members,
// `static constexpr const char* kName, kDescription, kInputSchema` (a JSON Schema object), and
// run(arguments_json) -> {content, is_error} (a tool error is content for the model, not a
// failure of the plugin).
// Ownership: create() returns a heap instance that destroy() deletes. Thread-safety: as the
// component declares.
#ifndef LOOM_PLUGINS_COMMON_TOOL_GLUE_HPP
#define LOOM_PLUGINS_COMMON_TOOL_GLUE_HPP

#include <cstdint>
#include <cstring>
#include <string>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp {

template <class T>
struct SingleToolGlue {
  static T& self(void* inst) { return *static_cast<T*>(inst); }

  static loom_status tool_count(void* inst, uint32_t* out) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (out == nullptr) invalid(std::string(T::kName) + ": out is NULL");
      *out = 1;
    });
  }
  static loom_status tool_info(void* inst, uint32_t index, loom_tool_info* out) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (out == nullptr) invalid(std::string(T::kName) + ": out is NULL");
      if (index != 0) fail(LOOM_ERR_NOT_FOUND, std::string(T::kName) + ": tool index " + std::to_string(index) + " does not exist");
      if (out->struct_size < sizeof(loom_tool_info)) invalid(std::string(T::kName) + ": tool_info struct_size too small");
      *out = loom_tool_info{sizeof(loom_tool_info), T::kName, T::kDescription, T::kInputSchema, nullptr};
    });
  }
  static loom_status call(void* inst, const char* tool_name, const char* arguments_json, loom_tool_result* result) {
    T& t = self(inst);
    return guard(t.host, t.ctx, [&] {
      if (result == nullptr || result->content == nullptr) invalid(std::string(T::kName) + ": result or result->content is NULL");
      if (tool_name == nullptr || std::strcmp(tool_name, T::kName) != 0)
        fail(LOOM_ERR_NOT_FOUND, std::string(T::kName) + ": no tool named '" + (tool_name ? tool_name : "(null)") + "'");
      const auto [text, is_error] = t.run(arguments_json);
      write_tool_result(t.host, result, text, is_error, T::kName);
    });
  }

  static constexpr loom_tool_vtable kVtable = {
      sizeof(loom_tool_vtable),
      {&create_instance<T>, &destroy_instance<T>, nullptr, nullptr, nullptr},
      &tool_count, &tool_info, &call,
  };
};

}  // namespace loomp

#endif
