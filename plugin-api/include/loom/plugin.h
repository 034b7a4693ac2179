/* The plugin descriptor: what a library exports and how its components are created.
 *
 * A plugin library exports exactly one symbol, loom_plugin_entry, which returns a pointer to a
 * constant descriptor. The descriptor, its strings, its component list and their vtables are
 * static data owned by the library: valid while the library is loaded, never written, and
 * readable from any thread. loom_plugin_entry must be cheap and side-effect free: the host calls
 * it while scanning directories, possibly many times, possibly from several threads.
 */
#ifndef LOOM_PLUGIN_H
#define LOOM_PLUGIN_H

#include "loom/abi.h"
#include "loom/host.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One parameter a component accepts in its manifest table. Used in arrays, which the host walks
 * with its own sizeof: this struct is frozen for ABI major 1 (struct_size must equal sizeof). The host validates the manifest
 * against this list before create(): an undeclared key, a missing required key or a value of
 * the wrong type is an error that names the manifest file, line, column and key path. */
typedef struct loom_param_desc {
  uint32_t struct_size;
  const char *key;           /* a top-level key of the component's table: letters, digits, '_', '-' */
  loom_value_type type;
  int32_t required;          /* non-zero: the manifest must set it */
  const char *default_value; /* a TOML literal ("0.9", "\"auto\"", "[1, 2]"), or NULL */
  const char *description;   /* one line, shown by `loom plugins` */
} loom_param_desc;

/* Calls shared by every kind. The first member of every kind's vtable, after struct_size.
 * This struct is frozen for ABI major 1: new lifecycle calls arrive as extensions. */
typedef struct loom_lifecycle {
  /* Creates an instance from the manifest table behind `ctx`. `host` and `ctx` stay valid until
   * destroy() returns; the instance may keep both. On failure: call host->set_error, free
   * anything partially built, leave *out_instance untouched, return non-zero. When a
   * parameter's value is what is wrong, call host->set_config_error (ABI 1.3) with its key
   * instead, so the host reports the error at that value's line and column in the manifest
   * ("file:line:col: slot.key (...)").
   * [any thread; concurrent calls create independent instances] */
  loom_status (*create)(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance);

  /* Frees the instance and everything it owns, including device memory it allocated through the
   * host. After it returns the host may unload the library. [not concurrent with any other call
   * on the same instance] */
  void (*destroy)(void *instance);

  /* Optional instance extension by versioned id ("loom.attention.paged/1"); NULL when absent.
   * The returned table is static or lives as long as the instance. May be NULL itself. */
  const void *(*get_extension)(void *instance, const char *id);

  /* Hot-swap state transfer, both optional (NULL = stateless). export_state writes the state
   * into `out` and sets *format to a static string naming its layout ("loom.sampler.rng/1").
   * import_state receives a state exported by another instance, possibly of another library
   * version: it returns LOOM_ERR_UNSUPPORTED for a format it does not read (the host then swaps
   * without state), any other error to veto the swap (the host keeps the old instance).
   * [called only at a safe point: no other call on either instance is in progress] */
  loom_status (*export_state)(void *instance, const char **format, loom_buffer *out);
  loom_status (*import_state)(void *instance, const char *format, const void *data, size_t size);
} loom_lifecycle;

/* Threading contracts an instance may declare (loom_component_desc.threading). */
typedef int32_t loom_threading;
enum {
  LOOM_THREADING_SERIAL = 0,    /* the host serialises every call on one instance */
  LOOM_THREADING_CONCURRENT = 1 /* calls on one instance may run concurrently */
};

typedef struct loom_component_desc {
  uint32_t struct_size;
  loom_kind kind;
  const char *name;        /* unique per kind across libraries: "top-p", "sdpa", "bm25" */
  const char *version;     /* semantic version "MAJOR.MINOR.PATCH" of this component */
  const char *description; /* one line */
  const loom_param_desc *params; /* may be NULL when param_count is 0 */
  uint32_t param_count;
  loom_threading threading;
  /* The kind's vtable: a loom_attention_vtable, loom_sampler_vtable, ... as `kind` says. It
   * begins with struct_size and a loom_lifecycle. */
  const void *vtable;
} loom_component_desc;

typedef struct loom_plugin_desc {
  uint32_t struct_size;
  uint32_t abi_major; /* LOOM_ABI_MAJOR as the plugin was compiled */
  uint32_t abi_minor;
  const char *name;    /* library name, e.g. "loom-samplers" */
  const char *version; /* semantic version of the library */
  const char *license; /* SPDX expression */
  const loom_component_desc *const *components;
  uint32_t component_count;
  /* Optional library-wide extensions by id; NULL when none. */
  const void *(*get_extension)(const char *id);
} loom_plugin_desc;

/* The one exported symbol. Returns the library's descriptor; never NULL for a working library. */
typedef const loom_plugin_desc *(*loom_plugin_entry_fn)(void);
#define LOOM_PLUGIN_ENTRY_SYMBOL "loom_plugin_entry"

#ifdef __cplusplus
}
#endif
#endif /* LOOM_PLUGIN_H */
