// loom-drafters: the builtin drafters of speculative decoding (DESIGN.md "Speculative decoding").
#include "loom/loom_plugin_api.h"

namespace loomp::drafters {
extern const loom_component_desc ngram_desc;
extern const loom_component_desc draft_model_desc;
namespace {
const loom_component_desc* const kComponents[] = {&ngram_desc, &draft_model_desc};
const loom_plugin_desc kPlugin = {sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-drafters", "1.0.0",
                                  "Apache-2.0", kComponents, 2, nullptr};
}  // namespace
}  // namespace loomp::drafters

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::drafters::kPlugin; }
