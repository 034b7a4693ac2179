/* Broken plugin libraries, one per LOOM_TEST_BAD_* definition (CMakeLists.txt builds each), for
 * the registry's refusal paths. A host must refuse each one with a message and keep running:
 *  NOT_A_PLUGIN   a shared library with an exported function but no loom_plugin_entry
 *  WRONG_ABI      a descriptor with abi_major 99
 *  NULL_DESC      loom_plugin_entry returns NULL
 *  ABSURD_SIZES   a descriptor whose struct_size is 0xFFFFFFF0
 *  HUGE_COUNT     component_count 1 << 30 with a NULL component list
 *  BAD_COMPONENT  three bad components: kind 42, a NULL vtable, a NULL name */
#include <stddef.h>

#include "loom/sampler.h"

#if defined(LOOM_TEST_BAD_NOT_A_PLUGIN)

LOOM_PLUGIN_EXPORT int loom_test_not_a_plugin(int x);
LOOM_PLUGIN_EXPORT int loom_test_not_a_plugin(int x) { return x + 1; }

#else

/* A minimal, well-formed sampler vtable for the components of the descriptors below, so that
 * only the defect under test is wrong. */
static loom_status bad_create(const loom_host_api *host, loom_host_ctx *ctx, void **out_instance) {
  (void)out_instance;
  host->set_error(ctx, "bad plugin: never instantiated");
  return LOOM_ERR_UNSUPPORTED;
}
static void bad_destroy(void *instance) { (void)instance; }
static loom_status bad_apply(void *instance, const loom_sampling_batch *batch) {
  (void)instance;
  (void)batch;
  return LOOM_ERR_INTERNAL;
}
static const loom_sampler_vtable bad_vtable = {
    sizeof(loom_sampler_vtable), {bad_create, bad_destroy, NULL, NULL, NULL}, 0, bad_apply,
    NULL, NULL, NULL,
};
static const loom_component_desc ok_component = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "bad-library-sampler", "1.0.0",
    "a well-formed component inside a broken library", NULL, 0, LOOM_THREADING_SERIAL, &bad_vtable,
};

#if defined(LOOM_TEST_BAD_WRONG_ABI)
static const loom_component_desc *const components[] = {&ok_component};
static const loom_plugin_desc desc = {
    sizeof(loom_plugin_desc), 99, 0, "loom-test-wrong-abi", "1.0.0", "Apache-2.0", components, 1, NULL,
};
#define DESC (&desc)

#elif defined(LOOM_TEST_BAD_NULL_DESC)
#define DESC NULL

#elif defined(LOOM_TEST_BAD_ABSURD_SIZES)
static const loom_component_desc *const components[] = {&ok_component};
static const loom_plugin_desc desc = {
    0xFFFFFFF0u, LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-test-absurd-sizes", "1.0.0", "Apache-2.0",
    components, 1, NULL,
};
#define DESC (&desc)

#elif defined(LOOM_TEST_BAD_HUGE_COUNT)
static const loom_plugin_desc desc = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-test-huge-count", "1.0.0",
    "Apache-2.0", NULL, 1u << 30, NULL,
};
#define DESC (&desc)

#elif defined(LOOM_TEST_BAD_BAD_COMPONENT)
static const loom_component_desc unknown_kind = {
    sizeof(loom_component_desc), 42, "unknown-kind", "1.0.0", "kind 42 does not exist", NULL, 0,
    LOOM_THREADING_SERIAL, &bad_vtable,
};
static const loom_component_desc null_vtable = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "null-vtable", "1.0.0", "no vtable", NULL, 0,
    LOOM_THREADING_SERIAL, NULL,
};
static const loom_component_desc null_name = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, NULL, "1.0.0", "no name", NULL, 0,
    LOOM_THREADING_SERIAL, &bad_vtable,
};
static const loom_component_desc *const components[] = {&unknown_kind, &null_vtable, &null_name};
static const loom_plugin_desc desc = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-test-bad-component", "1.0.0",
    "Apache-2.0", components, 3, NULL,
};
#define DESC (&desc)

#else
#error "define one LOOM_TEST_BAD_* (see the comment at the top)"
#endif

#if !defined(LOOM_TEST_BAD_WRONG_ABI) && !defined(LOOM_TEST_BAD_ABSURD_SIZES)
/* Unused by these variants; referenced so that -Wunused does not fire. */
const loom_component_desc *loom_test_bad_unused(void);
const loom_component_desc *loom_test_bad_unused(void) { return &ok_component; }
#endif

LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void);
LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return DESC; }

#endif
