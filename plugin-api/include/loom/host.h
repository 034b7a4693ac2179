/* The host API table: everything a plugin may ask of the host.
 *
 * The host gives each plugin instance a pointer to one loom_host_api at create(); the table and
 * every function in it stay valid until the instance's destroy() returns. The table is
 * append-only: a plugin built against minor N reads a call added in minor N+1 only after
 * LOOM_HAS_FIELD(host, loom_host_api, call) says it is there.
 *
 * Thread-safety: every call in the table may be called from any thread, concurrently, unless its
 * comment says otherwise. Calls taking a loom_host_ctx act on that instance only.
 */
#ifndef LOOM_HOST_H
#define LOOM_HOST_H

#include "loom/abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Value types of a manifest key, for loom_param_desc and config_type(). */
typedef int32_t loom_value_type;
enum {
  LOOM_VALUE_NONE = 0, /* key absent */
  LOOM_VALUE_BOOL = 1,
  LOOM_VALUE_INT = 2,
  LOOM_VALUE_FLOAT = 3, /* an integer literal is accepted where a float is declared */
  LOOM_VALUE_STRING = 4,
  LOOM_VALUE_ARRAY = 5, /* read element-wise with "key[i]" or whole with config_get_json */
  LOOM_VALUE_TABLE = 6, /* read member-wise with "key.sub" or whole with config_get_json */
  LOOM_VALUE_PATH = 7   /* declared type only: a string naming a file or directory; the host
                           makes a relative path absolute against the manifest's directory, and
                           config_type() reports it as LOOM_VALUE_STRING */
};

typedef struct loom_host_api {
  uint32_t struct_size;
  uint32_t abi_major; /* the ABI the host speaks */
  uint32_t abi_minor;

  /* ---- logging and errors ---- */

  /* Writes one line to the host's log, prefixed with the instance's component and slot name. */
  void (*log)(loom_host_ctx *ctx, loom_log_level level, const char *message);

  /* Records why the call in progress fails. Call it before returning a status other than
   * LOOM_OK; the host copies the message and reports it with the instance's name. The last
   * message wins. When a config value is the cause, set_config_error (ABI 1.3) also names it. */
  void (*set_error)(loom_host_ctx *ctx, const char *message);

  /* ---- configuration: the instance's own manifest table ----
   * Keys are paths inside the instance's table: "k", "weights.path", "targets[2]". Declared
   * parameters absent from the manifest read as their declared default. The host validated
   * the table against the component's loom_param_desc list before create(), so a declared key
   * has its declared type. Strings and JSON returned here are owned by the host and valid
   * until destroy() returns. Each getter returns LOOM_ERR_NOT_FOUND for an absent key (no
   * default either) and LOOM_ERR_INVALID_ARGUMENT for a value of another type. */
  loom_value_type (*config_type)(loom_host_ctx *ctx, const char *key);
  loom_status (*config_get_bool)(loom_host_ctx *ctx, const char *key, int32_t *out);
  loom_status (*config_get_int)(loom_host_ctx *ctx, const char *key, int64_t *out);
  loom_status (*config_get_float)(loom_host_ctx *ctx, const char *key, double *out);
  loom_status (*config_get_string)(loom_host_ctx *ctx, const char *key, const char **out);
  /* Array length for LOOM_VALUE_ARRAY keys. */
  loom_status (*config_get_array_size)(loom_host_ctx *ctx, const char *key, uint32_t *out);
  /* Any value (the whole table when key is "" ) as JSON text. */
  loom_status (*config_get_json)(loom_host_ctx *ctx, const char *key, const char **out);

  /* ---- devices, memory and streams ----
   * Device memory comes from the host so that it is counted, pooled and freed with the
   * runtime. Plugins never call cudaMalloc themselves in the hot path. */

  /* The device the pipeline runs on (kDLCPU or kDLCUDA with its ordinal). */
  DLDevice (*device)(loom_host_ctx *ctx);
  /* Allocates `bytes` aligned to `alignment` (a power of two, 0 = 256) on `device`. The caller
   * owns the memory and returns it with device_free. */
  loom_status (*device_alloc)(loom_host_ctx *ctx, DLDevice device, size_t bytes, size_t alignment,
                              void **out);
  void (*device_free)(loom_host_ctx *ctx, DLDevice device, void *ptr);
  /* Copies bytes between any two devices, ordered on the current stream of the CUDA side. */
  loom_status (*memcpy)(loom_host_ctx *ctx, void *dst, DLDevice dst_device, const void *src,
                        DLDevice src_device, size_t bytes);
  /* The stream the caller's work is ordered on (a cudaStream_t), NULL on CPU. Valid for the
   * duration of the plugin call that is in progress. */
  void *(*current_stream)(loom_host_ctx *ctx, DLDevice device);
  /* Waits until work queued on the current stream of `device` has finished. */
  loom_status (*stream_synchronize)(loom_host_ctx *ctx, DLDevice device);

  /* ---- cancellation ---- */

  /* Non-zero once the host asked the work in progress to stop (a client went away, a timeout,
   * shutdown). Long calls poll it and return LOOM_ERR_CANCELLED. */
  int32_t (*is_cancelled)(loom_host_ctx *ctx);

  /* ---- metrics ----
   * Names are lower_snake_case; the host prefixes them with the component kind and slot.
   * Counters only grow, gauges hold the last value, histograms collect observations. */
  void (*metric_count)(loom_host_ctx *ctx, const char *name, double delta);
  void (*metric_gauge)(loom_host_ctx *ctx, const char *name, double value);
  void (*metric_observe)(loom_host_ctx *ctx, const char *name, double value);

  /* ---- buffers (see loom_buffer in abi.h) ---- */

  /* Appends bytes; LOOM_ERR_OUT_OF_MEMORY when the buffer cannot grow. */
  loom_status (*buffer_append)(loom_buffer *buffer, const void *data, size_t size);
  /* Clears the buffer (used by a call that fails midway, so nothing partial is read). */
  void (*buffer_clear)(loom_buffer *buffer);

  /* ---- extensions ----
   * Optional host capabilities by versioned string id ("loom.host.kernels/1"); NULL when the
   * host lacks it. The returned table lives as long as the host table. */
  const void *(*get_extension)(loom_host_ctx *ctx, const char *id);

  /* ---- ABI 1.3: check LOOM_HAS_FIELD(host, loom_host_api, set_config_error) first; an older
   * host lacks it (use set_error there) ---- */

  /* Records why the call in progress fails, as set_error does, and that it fails because of the
   * value of config key `key` of the instance's own manifest table (a path as the config getters
   * take it: "k", "bias[2].value"). For a failed create() the host reports the error at that
   * value's file:line:col in the manifest, labelled "slot.key", when `key` is a declared
   * parameter, or a path inside one, that the manifest sets; any other key (undeclared, absent
   * from the manifest, NULL) leaves a plain message, reported at the instance's table as
   * set_error's is. Optional for plugins: set_error alone stays correct. The host copies both
   * strings; the last set_error or set_config_error wins, key included. [any thread, as every
   * call of the table] */
  void (*set_config_error)(loom_host_ctx *ctx, const char *key, const char *message);
} loom_host_api;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_HOST_H */
