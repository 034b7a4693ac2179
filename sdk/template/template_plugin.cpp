// template-greedy-above: a Loom sampler plugin, written to be copied.
//
// What it does: a *filter* link of a sampler chain. Every logit below the manifest's `floor`
// becomes -INFINITY, so no later link can pick that token. The row's maximum is always kept, so
// the filter never leaves a row with nothing to choose from. Use it before a selecting link:
//
//   [[sampler]]
//   use = "template-greedy-above"
//   floor = -2.5
//
//   [[sampler]]
//   use = "greedy"
//
// What it shows:
//   - the one exported symbol, loom_plugin_entry, returning a static descriptor;
//   - a declared parameter (the host validates the manifest against it before create());
//   - the lifecycle: create() reads the config, destroy() frees, no state to hot-swap;
//   - errors: host->set_error() with a message, then a non-zero loom_status; for a bad parameter
//     value, host->set_config_error() with its key, so the host points at it in the manifest;
//   - C++ inside, C at the boundary: no exception ever leaves a function the host calls.
//
// The plugin includes only Loom's C ABI headers (plugin-api/include/loom/*.h) and never links
// against Loom itself: everything it needs from the host comes through the loom_host_api table.
#include <loom/sampler.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <new>

namespace {

// One instance per [[sampler]] table of a manifest. Owned by the host through void*.
struct GreedyAbove {
  const loom_host_api* host;  // valid until destroy() returns
  loom_host_ctx* ctx;         // identifies this instance to the host (config, errors, logs)
  float floor;
};

// Every entry point runs its body through guard(): a C++ exception must never unwind into the
// host (it is C, or C++ built with another compiler). It becomes an error status instead.
template <typename F>
loom_status guard(const loom_host_api* host, loom_host_ctx* ctx, F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    host->set_error(ctx, "template-greedy-above: out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    char message[256];  // no std::string: nothing here should allocate while failing
    std::snprintf(message, sizeof message, "template-greedy-above: %s", e.what());
    host->set_error(ctx, message);
    return LOOM_ERR_INTERNAL;
  } catch (...) {
    host->set_error(ctx, "template-greedy-above: unknown exception");
    return LOOM_ERR_INTERNAL;
  }
}

// Reports a bad value of config key `key`: a host of ABI 1.3 or later then shows the error at
// that value in the manifest ("file:line:col: sampler[0].floor (...)"). An older host may load
// this plugin too, and its table ends before set_config_error: check the table's size
// (LOOM_HAS_FIELD) before the call and fall back to set_error.
void config_error(const loom_host_api* host, loom_host_ctx* ctx, const char* key, const char* message) {
  if (LOOM_HAS_FIELD(host, loom_host_api, set_config_error) && host->set_config_error != nullptr)
    host->set_config_error(ctx, key, message);
  else
    host->set_error(ctx, message);
}

// ---- lifecycle ----

loom_status create(const loom_host_api* host, loom_host_ctx* ctx, void** out_instance) {
  return guard(host, ctx, [&]() -> loom_status {
    // Declared parameters read as their declared default when the manifest omits them, and the
    // host has already checked the type; still check the value itself.
    double floor = 0.0;
    if (loom_status st = host->config_get_float(ctx, "floor", &floor); st != LOOM_OK) {
      config_error(host, ctx, "floor", "template-greedy-above: cannot read `floor`");
      return st;
    }
    if (!std::isfinite(floor)) {
      config_error(host, ctx, "floor", "template-greedy-above: `floor` must be a finite number");
      return LOOM_ERR_INVALID_ARGUMENT;
    }
    // On failure *out_instance stays untouched; on success the host owns the pointer.
    *out_instance = new GreedyAbove{host, ctx, static_cast<float>(floor)};
    return LOOM_OK;
  });
}

void destroy(void* instance) { delete static_cast<GreedyAbove*>(instance); }

// ---- the sampler call ----

loom_status apply(void* instance, const loom_sampling_batch* batch) {
  auto* self = static_cast<GreedyAbove*>(instance);
  return guard(self->host, self->ctx, [&]() -> loom_status {
    const DLTensor* logits = batch->logits;  // [n_rows, vocab_size] float32, host-owned
    // This plugin did not set LOOM_SAMPLER_RUNS_ON_CUDA, so the host hands it CPU rows; check
    // anyway, and report precisely what is wrong rather than misreading memory.
    if (logits == nullptr || logits->device.device_type != kDLCPU) {
      self->host->set_error(self->ctx, "template-greedy-above: logits must be on the CPU");
      return LOOM_ERR_UNSUPPORTED;
    }
    if (logits->dtype.code != kDLFloat || logits->dtype.bits != 32 || logits->dtype.lanes != 1) {
      self->host->set_error(self->ctx, "template-greedy-above: logits must be float32");
      return LOOM_ERR_UNSUPPORTED;
    }
    const int64_t rows = batch->n_rows;
    const int64_t cols = batch->vocab_size;
    if (logits->ndim != 2 || logits->shape[0] != rows || logits->shape[1] != cols) {
      self->host->set_error(self->ctx, "template-greedy-above: logits are not [n_rows, vocab_size]");
      return LOOM_ERR_INVALID_ARGUMENT;
    }
    // strides == NULL means compact row-major; otherwise require exactly that layout.
    if (logits->strides != nullptr && (logits->strides[1] != 1 || logits->strides[0] != cols)) {
      self->host->set_error(self->ctx, "template-greedy-above: logits must be contiguous");
      return LOOM_ERR_UNSUPPORTED;
    }
    auto* data = reinterpret_cast<float*>(static_cast<char*>(logits->data) + logits->byte_offset);

    for (int64_t r = 0; r < rows; ++r) {
      if (self->host->is_cancelled(self->ctx)) return LOOM_ERR_CANCELLED;  // long batches
      float* row = data + r * cols;  // [vocab_size]
      int64_t best = 0;              // first index of the row's maximum: always kept
      for (int64_t c = 1; c < cols; ++c)
        if (row[c] > row[best]) best = c;
      for (int64_t c = 0; c < cols; ++c)
        if (c != best && row[c] < self->floor) row[c] = -INFINITY;
    }
    return LOOM_OK;
  });
}

// ---- the descriptor: static data, read by the host from any thread ----

const loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "floor", LOOM_VALUE_FLOAT, /*required=*/0, /*default=*/"0.0",
     "logits below this value are masked (the row's maximum is always kept)"},
};

const loom_sampler_vtable kVtable = {
    sizeof(loom_sampler_vtable),
    // create, destroy, get_extension, export_state, import_state: stateless, so a hot swap
    // needs no state transfer and the last three are NULL.
    {create, destroy, nullptr, nullptr, nullptr},
    /*flags=*/0,  // a filter: it neither selects nor reads history or randomness
    apply,
    /*accept=*/nullptr,  // no per-sequence state
    /*fork=*/nullptr,
    /*release=*/nullptr,
};

const loom_component_desc kComponent = {
    sizeof(loom_component_desc),
    LOOM_KIND_SAMPLER,
    "template-greedy-above",  // what a manifest's `use =` names
    "0.1.0",
    "masks logits below `floor` (template plugin)",
    kParams,
    sizeof(kParams) / sizeof(kParams[0]),
    LOOM_THREADING_SERIAL,  // the host serialises calls on one instance
    &kVtable,
};

const loom_component_desc* const kComponents[] = {&kComponent};

const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc),
    LOOM_ABI_MAJOR,  // the ABI this library was compiled against; the host checks it
    LOOM_ABI_MINOR,
    "loom-template",
    "0.1.0",
    "Apache-2.0",
    kComponents,
    sizeof(kComponents) / sizeof(kComponents[0]),
    /*get_extension=*/nullptr,
};

}  // namespace

// The one exported symbol. Cheap and side-effect free: the host may call it often.
extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &kPlugin; }
