// libloom-samplers: the library descriptor listing every sampler component.
#include "sampler_common.hpp"

namespace {
using namespace loomp::samplers;
const loom_component_desc* const kComponents[] = {
    &greedy_desc, &dist_desc, &temperature_desc, &top_k_desc,
    &top_p_desc, &min_p_desc, &repetition_penalty_desc, &typical_p_desc,
    &penalties_desc, &logit_bias_desc, &no_repeat_ngram_desc, &mirostat_v2_desc,
    &beam_search_desc,
};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-samplers", "1.0.0",
    "Apache-2.0", kComponents, sizeof(kComponents) / sizeof(kComponents[0]), nullptr};
}  // namespace

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &kPlugin; }
