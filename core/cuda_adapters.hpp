// Private to core: adapters on the CUDA backend ([PEFT] serving). The adapters' own device path
// is the gathered extension (adapter.h, loom.adapter.gathered/1): per layer and module (q, k,
// v, o, gate, up, down) one group over every adapter's site there, and one call adds to each row
// the delta of the adapter that row's index names (S-LoRA / Punica's BGMV). The backend calls
// apply() after the module's GEMM, on the unfused paths (the GEMVs, the skinny gate/up GEMM and
// the quantizer's fusions do not expose the linears' outputs).
//
// Ownership: holds the adapter instances (shared with the pipeline) and the groups; the sites
// belong to their instances. Thread-safety: one thread, under the pipeline's step lock; the
// caller synchronises its stream before a change (groups' device memory may be in use).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <dlpack/dlpack.h>

#include "loom/core/instance.hpp"
#include "loom/core/model_config.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

class CudaAdapters {
 public:
  enum Module { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, kModules };

  CudaAdapters(const ModelConfig &config, DLDevice device, DLDataType act, std::string source_name);
  ~CudaAdapters();
  CudaAdapters(const CudaAdapters &) = delete;
  CudaAdapters &operator=(const CudaAdapters &) = delete;

  // Attaches `adapter` to every module it targets (throws loom::Error naming it when it has no
  // gathered extension, targets the LM head, or the model is GPT-2); returns its site per module
  // (layer * kModules + module), null where it does not apply. Nothing is committed yet.
  std::vector<loom_adapter_site *> attach(Instance &adapter) const;
  // Commits: `adapter` joins (after the others, or in place of `replacing`), or leaves. Groups
  // are rebuilt by the next rebuild().
  void commit(std::shared_ptr<Instance> adapter, std::vector<loom_adapter_site *> sites, const Instance *replacing = nullptr);
  void remove(const Instance *adapter);
  // (Re)makes every module's group for up to `max_rows` rows per step.
  void rebuild(int64_t max_rows);
  int64_t rows() const { return rows_; }
  // Whether any module has a site (then the backend takes its unfused paths).
  bool on() const { return on_; }
  // The group entry a sequence's StepBatch::seq_adapters code names (-1: none). Throws for "every
  // adapter" when there are several: on CUDA a row runs with one adapter.
  int32_t row_index(int32_t choice) const;
  // y[T, out] (row stride y_stride, starting at column col0) += each row's adapter delta of
  // module m in `layer`, x [T, in] its input; d_rows [T] int32 on the device. On the host's
  // current stream (capturable).
  void apply(int32_t layer, Module m, const void *x, DLDataType x_type, void *y, DLDataType y_type, int64_t y_stride,
             int64_t col0, int32_t T, const int32_t *d_rows) {
    apply(layer, &m, &col0, 1, x, x_type, y, y_type, y_stride, T, d_rows);
  }
  // Several modules of `layer` with the same input x, each into y from its own column: in one
  // pair of launches when the library offers forward_groups (q/k/v into the fused q/k/v
  // output, gate/up into the fused gate/up output).
  void apply(int32_t layer, const Module *ms, const int64_t *col0s, int count, const void *x, DLDataType x_type, void *y,
             DLDataType y_type, int64_t y_stride, int32_t T, const int32_t *d_rows);

 private:
  struct Site {
    std::string name;
    int64_t in = 0, out = 0;
    std::vector<loom_adapter_site *> sites; // per adapter (adapters_ order)
    loom_adapter_group *group = nullptr;
  };
  void free_groups();
  // The first adapter with a site on module m (its group reports through it), or nullptr.
  Instance *site_owner(const Site &m) const;

  ModelConfig config_;
  DLDevice device_;
  DLDataType act_;
  std::string source_name_;
  std::vector<std::shared_ptr<Instance>> adapters_; // the pipeline's adapter list order
  std::vector<Site> modules_;                       // layer * kModules + module
  const loom_adapter_gathered_ext *gathered_ = nullptr;
  int64_t rows_ = 0;
  bool on_ = false;
};

} // namespace loom
