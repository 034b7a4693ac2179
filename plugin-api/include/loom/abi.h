/* Loom plugin ABI: versions, status codes, kinds and the export macro.
 *
 * Pure C99. Everything a plugin may include lives under plugin-api/; nothing here depends on
 * Loom's C++ core. Rules that every header of the ABI follows (DESIGN.md, "ABI rules"):
 *  - every struct that crosses the boundary begins with `uint32_t struct_size`, set by whoever
 *    fills the struct to sizeof() as compiled; structs only grow at the end, and a reader checks
 *    struct_size before touching a field added in a later minor version (LOOM_HAS_FIELD);
 *  - every call returns a loom_status; the details of a failure go through the host's
 *    set_error() before the call returns;
 *  - booleans are int32_t (0 = false, anything else = true);
 *  - strings are NUL-terminated UTF-8, owned by whoever passed them, and valid only for the
 *    duration of the call unless the call's comment says otherwise.
 */
#ifndef LOOM_ABI_H
#define LOOM_ABI_H

#include <stddef.h>
#include <stdint.h>

#include <dlpack/dlpack.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The host refuses a library whose abi_major differs from its own. A minor bump only appends
 * fields to structs or calls to tables; a reader of an older minor checks struct_size. */
#define LOOM_ABI_MAJOR 1
#define LOOM_ABI_MINOR 10

/* True when a struct filled by the other side is large enough to hold `field`. */
#define LOOM_HAS_FIELD(ptr, type, field) \
  ((ptr) != NULL && (ptr)->struct_size >= offsetof(type, field) + sizeof(((type *)0)->field))

#if defined(_WIN32)
#define LOOM_PLUGIN_EXPORT __declspec(dllexport)
#else
#define LOOM_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

typedef int32_t loom_status;
enum {
  LOOM_OK = 0,
  LOOM_ERR_INVALID_ARGUMENT = 1, /* a caller passed something the call cannot accept */
  LOOM_ERR_OUT_OF_MEMORY = 2,
  LOOM_ERR_UNSUPPORTED = 3,      /* valid, but this component does not do it (dtype, device, format) */
  LOOM_ERR_NOT_FOUND = 4,        /* a key, id or name that does not exist */
  LOOM_ERR_CANCELLED = 5,        /* the host's cancellation flag was seen */
  LOOM_ERR_BUFFER_TOO_SMALL = 6, /* retry with the size the call reported */
  LOOM_ERR_IO = 7,
  LOOM_ERR_DEVICE = 8,           /* a CUDA or driver error */
  LOOM_ERR_INTERNAL = 9
};

/* Component kinds (DESIGN.md, "Plugin kinds"). Values are stable; new kinds are appended. */
typedef int32_t loom_kind;
enum {
  LOOM_KIND_ATTENTION = 1,
  LOOM_KIND_QUANTIZER = 2,
  LOOM_KIND_ADAPTER = 3,
  LOOM_KIND_SAMPLER = 4,
  LOOM_KIND_PARALLEL = 5,
  LOOM_KIND_RETRIEVER = 6,
  LOOM_KIND_TOOL = 7,
  LOOM_KIND_DRAFTER = 8 /* ABI 1.9 */
};

/* Log levels for loom_host_api.log. */
typedef int32_t loom_log_level;
enum { LOOM_LOG_DEBUG = 0, LOOM_LOG_INFO = 1, LOOM_LOG_WARN = 2, LOOM_LOG_ERROR = 3 };

/* An opaque, host-owned context handed to each instance at create(). It identifies the instance
 * to the host (its manifest table, its error slot, its metrics). Valid until destroy() returns. */
typedef struct loom_host_ctx loom_host_ctx;

/* A host-owned growable byte buffer. Plugins fill it through loom_host_api.buffer_append /
 * buffer_reserve and never free it. Used wherever a plugin returns data of a size it alone
 * knows (exported state, tool results, JSON). */
typedef struct loom_buffer loom_buffer;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_ABI_H */
