/* Test plugin library "loom-test-misc":
 *  - sampler "create-fails": create() always fails with a message, to test error reporting;
 *  - tool "echo": one tool, "echo", whose result is its arguments JSON, unchanged;
 *  - sampler "bad-value": create() always fails through set_config_error (ABI 1.3) with the key
 *    its `key` parameter names, to test how the host points at a config value; `mode` varies
 *    the call ("config-error", "null-key", "then-set-error");
 *  - drafter "sampled-drafts": proposes max_draft tokens drawn from a fixed distribution over
 *    the first 8 tokens, q(t) = (t + 1) / 36, and gives that q with them where the host offers
 *    room (ABI 1.10) and `give_q` is true, to test the host's min(1, p/q) verification; with
 *    `stale_q` it writes that q on its first call only, without q_given, and on later calls sets
 *    q_given without writing q, to test that the host clears the rows it offers. */
#include <stdlib.h>
#include <string.h>

#include "loom/drafter.h"
#include "loom/sampler.h"
#include "loom/tool.h"

/* ---- create-fails ---- */

static loom_status fails_create(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance) {
  (void)out_instance;
  host->set_error(ctx, "create-fails: refused on purpose");
  return LOOM_ERR_INVALID_ARGUMENT;
}

static void fails_destroy(void *instance) { (void)instance; } /* never has an instance */

static loom_status fails_apply(void *instance, const loom_sampling_batch *batch) {
  (void)instance;
  (void)batch;
  return LOOM_ERR_INTERNAL; /* unreachable: create() never succeeds */
}

static const loom_sampler_vtable fails_vtable = {
    sizeof(loom_sampler_vtable),
    {fails_create, fails_destroy, NULL, NULL, NULL},
    0,
    fails_apply,
    NULL,
    NULL,
    NULL,
};

static const loom_component_desc fails_component = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "create-fails", "1.0.0",
    "test sampler whose create() always fails", NULL, 0, LOOM_THREADING_SERIAL, &fails_vtable,
};

/* ---- echo ---- */

typedef struct echo_tool {
  const loom_host_api *host;
  loom_host_ctx *ctx;
} echo_tool;

static loom_status echo_create(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance) {
  echo_tool *t = (echo_tool *)calloc(1, sizeof *t);
  if (t == NULL) {
    host->set_error(ctx, "echo: out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  }
  t->host = host;
  t->ctx = ctx;
  *out_instance = t;
  return LOOM_OK;
}

static void echo_destroy(void *instance) { free(instance); }

static loom_status echo_tool_count(void *instance, uint32_t *out) {
  (void)instance;
  *out = 1;
  return LOOM_OK;
}

static loom_status echo_tool_info(void *instance, uint32_t index, loom_tool_info *out) {
  echo_tool *t = (echo_tool *)instance;
  if (index != 0) {
    t->host->set_error(t->ctx, "echo: tool index out of range (there is one tool)");
    return LOOM_ERR_NOT_FOUND;
  }
  out->struct_size = sizeof(loom_tool_info);
  out->name = "echo";
  out->description = "Returns its arguments unchanged.";
  out->input_schema_json = "{\"type\":\"object\"}";
  out->output_schema_json = NULL;
  return LOOM_OK;
}

static loom_status echo_call(void *instance, const char *tool_name, const char *arguments_json,
                             loom_tool_result *result) {
  echo_tool *t = (echo_tool *)instance;
  if (tool_name == NULL || strcmp(tool_name, "echo") != 0) {
    t->host->set_error(t->ctx, "echo: unknown tool name (this instance offers \"echo\")");
    return LOOM_ERR_NOT_FOUND;
  }
  const char *args = arguments_json != NULL ? arguments_json : "";
  loom_status st = t->host->buffer_append(result->content, args, strlen(args));
  if (st != LOOM_OK) {
    t->host->buffer_clear(result->content);
    t->host->set_error(t->ctx, "echo: could not write the result");
    return st;
  }
  result->is_error = 0;
  return LOOM_OK;
}

static const loom_tool_vtable echo_vtable = {
    sizeof(loom_tool_vtable),
    {echo_create, echo_destroy, NULL, NULL, NULL},
    echo_tool_count,
    echo_tool_info,
    echo_call,
};

static const loom_component_desc echo_component = {
    sizeof(loom_component_desc), LOOM_KIND_TOOL, "echo", "1.0.0",
    "test tool: returns its arguments", NULL, 0, LOOM_THREADING_CONCURRENT, &echo_vtable,
};

/* ---- bad-value ---- */

static loom_status bad_value_create(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance) {
  const char *key = NULL, *mode = NULL;
  (void)out_instance;
  if (host->config_get_string(ctx, "key", &key) != LOOM_OK || host->config_get_string(ctx, "mode", &mode) != LOOM_OK) {
    host->set_error(ctx, "bad-value: cannot read key and mode");
    return LOOM_ERR_INTERNAL;
  }
  /* The message names no key on purpose: the host must not need it to. */
  const char *message = "the value is refused on purpose";
  if (!LOOM_HAS_FIELD(host, loom_host_api, set_config_error) || host->set_config_error == NULL) {
    host->set_error(ctx, message); /* a host older than ABI 1.3 */
  } else if (strcmp(mode, "null-key") == 0) {
    host->set_config_error(ctx, NULL, message);
  } else {
    host->set_config_error(ctx, key, message);
    if (strcmp(mode, "then-set-error") == 0) host->set_error(ctx, "a later error about no key");
  }
  return LOOM_ERR_INVALID_ARGUMENT;
}

static const loom_sampler_vtable bad_value_vtable = {
    sizeof(loom_sampler_vtable),
    {bad_value_create, fails_destroy, NULL, NULL, NULL},
    0,
    fails_apply,
    NULL,
    NULL,
    NULL,
};

static const loom_param_desc bad_value_params[] = {
    {sizeof(loom_param_desc), "level", LOOM_VALUE_INT, 0, "1", "a value to be refused"},
    {sizeof(loom_param_desc), "list", LOOM_VALUE_ARRAY, 0, "[]", "values to be refused by path"},
    {sizeof(loom_param_desc), "key", LOOM_VALUE_STRING, 0, "\"level\"", "the key handed to set_config_error"},
    {sizeof(loom_param_desc), "mode", LOOM_VALUE_STRING, 0, "\"config-error\"",
     "config-error, null-key or then-set-error"},
};

static const loom_component_desc bad_value_component = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "bad-value", "1.0.0",
    "test sampler whose create() always refuses a config value", bad_value_params, 4, LOOM_THREADING_SERIAL,
    &bad_value_vtable,
};

/* ---- sampled-drafts ---- */

typedef struct sampled_drafts {
  int32_t give_q;
  int32_t stale_q;
  int64_t calls;
} sampled_drafts;

static loom_status sampled_create(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance) {
  sampled_drafts *d = (sampled_drafts *)calloc(1, sizeof *d);
  if (d == NULL) {
    host->set_error(ctx, "sampled-drafts: out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  }
  if (host->config_get_bool(ctx, "give_q", &d->give_q) != LOOM_OK ||
      host->config_get_bool(ctx, "stale_q", &d->stale_q) != LOOM_OK) {
    free(d);
    host->set_error(ctx, "sampled-drafts: cannot read give_q or stale_q");
    return LOOM_ERR_INTERNAL;
  }
  *out_instance = d;
  return LOOM_OK;
}

static void sampled_destroy(void *instance) { free(instance); }

/* SplitMix64: the draws are a pure function of (sequence, position). */
static uint64_t sampled_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

static loom_status sampled_propose(void *instance, const loom_draft_batch *b) {
  sampled_drafts *d = (sampled_drafts *)instance;
  const int first_call = d->calls++ == 0;
  const int32_t support = b->vocab_size < 8 ? b->vocab_size : 8;
  const int32_t total = support * (support + 1) / 2;
  const int with_q = d->give_q && LOOM_HAS_FIELD(b, loom_draft_batch, q_given) && b->q_out != NULL && b->q_given != NULL;
  for (int32_t s = 0; s < b->n_seqs; ++s) {
    float *q = with_q && (!d->stale_q || first_call) ? b->q_out[s] : NULL;
    b->n_out[s] = b->max_draft[s];
    for (int32_t i = 0; i < b->max_draft[s]; ++i) {
      const uint64_t x = sampled_mix(sampled_mix((uint64_t)b->seq_ids[s]) ^ (uint64_t)(b->context_len[s] + i));
      int32_t r = (int32_t)(x % (uint64_t)total), t = 0;
      while (r >= t + 1) r -= ++t;
      b->draft_out[s * b->stride + i] = t;
      if (q != NULL)
        for (int32_t v = 0; v < b->vocab_size; ++v)
          q[(size_t)i * (size_t)b->vocab_size + (size_t)v] = v < support ? (float)(v + 1) / (float)total : 0.0f;
    }
    if (with_q && b->q_out[s] != NULL && (d->stale_q ? !first_call : q != NULL)) b->q_given[s] = 1;
  }
  return LOOM_OK;
}

static const loom_drafter_vtable sampled_vtable = {
    sizeof(loom_drafter_vtable),
    {sampled_create, sampled_destroy, NULL, NULL, NULL},
    sampled_propose,
    NULL,
};

static const loom_param_desc sampled_params[] = {
    {sizeof(loom_param_desc), "give_q", LOOM_VALUE_BOOL, 0, "true", "give q with the drafts where the host offers room"},
    {sizeof(loom_param_desc), "stale_q", LOOM_VALUE_BOOL, 0, "false",
     "write q on the first call only (q_given 0), then claim q_given without writing it"},
};

static const loom_component_desc sampled_component = {
    sizeof(loom_component_desc), LOOM_KIND_DRAFTER, "sampled-drafts", "1.0.0",
    "test drafter: drafts drawn from q(t) = (t + 1) / 36 over tokens 0-7", sampled_params, 2, LOOM_THREADING_SERIAL,
    &sampled_vtable,
};

static const loom_component_desc *const misc_components[] = {&fails_component, &echo_component,
                                                             &bad_value_component, &sampled_component};

static const loom_plugin_desc misc_plugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-test-misc", "1.0.0",
    "Apache-2.0", misc_components, 4, NULL,
};

LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void);
LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &misc_plugin; }
