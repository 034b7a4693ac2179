/* Umbrella header: the whole plugin ABI. A plugin includes this, or just the headers of the
 * kinds it implements. */
#ifndef LOOM_PLUGIN_API_H
#define LOOM_PLUGIN_API_H
#include "loom/abi.h"
#include "loom/host.h"
#include "loom/host_kernels.h"
#include "loom/host_vocab.h"
#include "loom/host_models.h"
#include "loom/plugin.h"
#include "loom/tensor.h"
#include "loom/attention.h"
#include "loom/quantizer.h"
#include "loom/quantizer_fused.h"
#include "loom/adapter.h"
#include "loom/sampler.h"
#include "loom/parallel.h"
#include "loom/retriever.h"
#include "loom/tool.h"
#include "loom/drafter.h"
#endif
