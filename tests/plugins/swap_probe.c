/* Test plugin "swap-probe": a selecting sampler whose state survives a hot swap.
 *
 * Built twice (CMakeLists.txt): LOOM_TEST_SWAP_VERSION 1 selects token 1 in every row and is
 * component version 1.0.0; version 2 selects token 2 and is 2.0.0. Both count the apply() calls
 * their instance has seen, write the count into logprobs_out[row] (when present) so that a test
 * can see whether the count carried over a swap, and export/import it as state format
 * "loom.test.counter/1": 8 bytes, little-endian uint64.
 *
 * Param fail_import (bool, default false): import_state refuses every state, to test that the
 * host keeps the old instance when a swap is vetoed.
 * Params trace (path, default "") and label (string): when trace is set, create and destroy
 * append "create LABEL" / "destroy LABEL" lines to that file, so a test sees lifetime order. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loom/sampler.h"

#if LOOM_TEST_SWAP_VERSION == 1
#define SWAP_TOKEN 1
#define SWAP_COMPONENT_VERSION "1.0.0"
#define SWAP_LIBRARY_VERSION "1.0.0"
#elif LOOM_TEST_SWAP_VERSION == 2
#define SWAP_TOKEN 2
#define SWAP_COMPONENT_VERSION "2.0.0"
#define SWAP_LIBRARY_VERSION "2.0.0"
#else
#error "define LOOM_TEST_SWAP_VERSION as 1 or 2"
#endif

#define COUNTER_FORMAT "loom.test.counter/1"

typedef struct swap_probe {
  const loom_host_api *host;
  loom_host_ctx *ctx;
  uint64_t applies;    /* apply() calls seen, carried over swaps */
  int32_t fail_import; /* the fail_import param */
  char trace[1024];    /* the trace param, "" when unset */
  char label[64];
} swap_probe;

static void probe_trace(const swap_probe *p, const char *event) {
  if (p->trace[0] == '\0') return;
  FILE *f = fopen(p->trace, "a");
  if (f == NULL) return;
  fprintf(f, "%s %s\n", event, p->label);
  fclose(f);
}

static loom_status probe_create(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance) {
  int32_t fail_import = 0;
  loom_status st = host->config_get_bool(ctx, "fail_import", &fail_import);
  if (st == LOOM_ERR_NOT_FOUND) {
    fail_import = 0;
  } else if (st != LOOM_OK) {
    host->set_error(ctx, "swap-probe: fail_import must be a bool");
    return st;
  }
  swap_probe *p = (swap_probe *)calloc(1, sizeof *p);
  if (p == NULL) {
    host->set_error(ctx, "swap-probe: out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  }
  p->host = host;
  p->ctx = ctx;
  p->fail_import = fail_import;
  const char *text = NULL;
  if (host->config_get_string(ctx, "trace", &text) == LOOM_OK && text != NULL)
    snprintf(p->trace, sizeof p->trace, "%s", text);
  if (host->config_get_string(ctx, "label", &text) == LOOM_OK && text != NULL)
    snprintf(p->label, sizeof p->label, "%s", text);
  probe_trace(p, "create");
  *out_instance = p;
  return LOOM_OK;
}

static void probe_destroy(void *instance) {
  probe_trace((swap_probe *)instance, "destroy");
  free(instance);
}

static loom_status probe_export_state(void *instance, const char **format, loom_buffer *out) {
  swap_probe *p = (swap_probe *)instance;
  unsigned char bytes[8];
  for (int i = 0; i < 8; ++i) bytes[i] = (unsigned char)((p->applies >> (8 * i)) & 0xffu);
  loom_status st = p->host->buffer_append(out, bytes, sizeof bytes);
  if (st != LOOM_OK) {
    p->host->buffer_clear(out);
    p->host->set_error(p->ctx, "swap-probe: could not write the exported state");
    return st;
  }
  *format = COUNTER_FORMAT;
  return LOOM_OK;
}

static loom_status probe_import_state(void *instance, const char *format, const void *data, size_t size) {
  swap_probe *p = (swap_probe *)instance;
  if (p->fail_import) {
    p->host->set_error(p->ctx, "swap-probe: import refused on purpose (fail_import = true)");
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  if (format == NULL || strcmp(format, COUNTER_FORMAT) != 0) {
    p->host->set_error(p->ctx, "swap-probe: unknown state format (reads loom.test.counter/1)");
    return LOOM_ERR_UNSUPPORTED;
  }
  if (size != 8 || data == NULL) {
    p->host->set_error(p->ctx, "swap-probe: loom.test.counter/1 state must be exactly 8 bytes");
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  const unsigned char *bytes = (const unsigned char *)data;
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value |= (uint64_t)bytes[i] << (8 * i);
  p->applies = value;
  return LOOM_OK;
}

static loom_status probe_apply(void *instance, const loom_sampling_batch *batch) {
  swap_probe *p = (swap_probe *)instance;
  if (batch == NULL || batch->n_rows < 0 || (batch->n_rows > 0 && batch->tokens_out == NULL)) {
    p->host->set_error(p->ctx, "swap-probe: batch without tokens_out");
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  p->applies += 1;
  for (int32_t row = 0; row < batch->n_rows; ++row) {
    batch->tokens_out[row] = SWAP_TOKEN;
    if (batch->logprobs_out != NULL) batch->logprobs_out[row] = (float)p->applies;
  }
  return LOOM_OK;
}

static const loom_param_desc probe_params[] = {
    {sizeof(loom_param_desc), "fail_import", LOOM_VALUE_BOOL, 0, "false",
     "refuse every import_state (tests swap rollback)"},
    {sizeof(loom_param_desc), "trace", LOOM_VALUE_PATH, 0, "\"\"",
     "file that create/destroy events are appended to"},
    {sizeof(loom_param_desc), "label", LOOM_VALUE_STRING, 0, "\"\"", "name written in trace lines"},
};

static const loom_sampler_vtable probe_vtable = {
    sizeof(loom_sampler_vtable),
    {probe_create, probe_destroy, NULL, probe_export_state, probe_import_state},
    /* It never reads the logits, so it runs wherever they live. */
    LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_RUNS_ON_CUDA,
    probe_apply,
    NULL,
    NULL,
    NULL,
};

static const loom_component_desc probe_component = {
    sizeof(loom_component_desc),
    LOOM_KIND_SAMPLER,
    "swap-probe",
    SWAP_COMPONENT_VERSION,
    "test sampler: selects a fixed token and counts apply() calls across swaps",
    probe_params,
    sizeof probe_params / sizeof probe_params[0],
    LOOM_THREADING_SERIAL,
    &probe_vtable,
};

static const loom_component_desc *const probe_components[] = {&probe_component};

static const loom_plugin_desc probe_plugin = {
    sizeof(loom_plugin_desc),
    LOOM_ABI_MAJOR,
    LOOM_ABI_MINOR,
    "loom-test-swap",
    SWAP_LIBRARY_VERSION,
    "Apache-2.0",
    probe_components,
    1,
    NULL,
};

LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void);
LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &probe_plugin; }
