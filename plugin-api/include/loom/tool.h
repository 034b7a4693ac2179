/* Tool kind: named actions with a JSON-schema'd input, run by the agent loop.
 *
 * A tool is {name, description, input JSON schema, optional output schema} and returns
 * {content, is_error}: the shapes of OpenAI function calling and of MCP's tools/list and
 * tools/call, so that either maps onto it without loss. One instance may offer several tools
 * (an MCP client offers whatever its server lists).
 */
#ifndef LOOM_TOOL_H
#define LOOM_TOOL_H

#include "loom/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_tool_info {
  uint32_t struct_size;
  const char *name;
  const char *description;
  const char *input_schema_json;  /* a JSON Schema object */
  const char *output_schema_json; /* optional, NULL */
} loom_tool_info;

typedef struct loom_tool_result {
  uint32_t struct_size;
  loom_buffer *content; /* host-owned: the plugin appends the result text (or JSON) */
  int32_t is_error;     /* set by the plugin: the tool ran and failed (bad input, HTTP 404);
                           the model sees content as the error. A failure of the plugin itself
                           is a non-OK status instead. */
} loom_tool_result;

typedef struct loom_tool_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  /* Number of tools this instance offers now (an MCP server's list may change). */
  loom_status (*tool_count)(void *instance, uint32_t *out);
  /* Fills *out for tool `index`; its strings are the instance's, valid until the next
   * tool_count call or destroy. */
  loom_status (*tool_info)(void *instance, uint32_t index, loom_tool_info *out);
  /* Runs a tool with arguments as a JSON object text. Long calls poll host->is_cancelled.
   * [CONCURRENT components: concurrent calls allowed] */
  loom_status (*call)(void *instance, const char *tool_name, const char *arguments_json,
                      loom_tool_result *result);
} loom_tool_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_TOOL_H */
