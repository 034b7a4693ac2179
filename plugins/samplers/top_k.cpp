// Sampler `top-k`: keeps exactly the k largest logits of each row (ties broken by lower token
// id, so the kept set is deterministic) and masks the rest with -inf. k = 0 disables it; a
// negative k is a configuration error. CPU or CUDA (a radix select on the order of
// (logit desc, id asc): the same kept set). On CUDA, when the host offers candidate rows (ABI
// 1.3) and k <= 1024, the kept tokens become the rows' candidates, in that order, and the dense
// rows are left as they were. It reads the dense rows through a scale a temperature link deferred
// (ABI 1.4), and pays that scale first where it keeps the rows dense.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct TopK : Base {
  int64_t k;
  DeviceScratch scratch;
  TopK(const loom_host_api* h, loom_host_ctx* c) : Base(h, c), k(cfg_int(h, c, "k")), scratch(h, c) {
    if (k < 0) invalid_param("k", "top-k: k must be >= 0 (0 disables the filter), got " + std::to_string(k));
  }

  void apply(const loom_sampling_batch& b) {
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b)) {
      const DeviceRows d = device_rows(b, host, ctx, "top-k");
      if (k == 0 || b.n_rows == 0) return;
      const auto cand = candidate_rows(b, "top-k");
      if (cand && b.candidates->active != 0) {  // already in order: the first k
        check_cuda(cuda::candidates_truncate(*cand, b.n_rows, k, d.stream), "top-k");
        return;
      }
      if (k >= b.vocab_size) return;
      if (cand && cuda::candidates_top_k_fits(b.n_rows, b.vocab_size, k, cand->capacity)) {
        // (Its own layout key for must_zero: the dense path keeps other regions zero.)
        void* s = scratch.get(b.logits->device, cuda::candidates_top_k_scratch_bytes(b.n_rows, b.vocab_size, k), "top-k");
        float* owed = owed_scale(b);
        check_cuda(cuda::candidates_top_k(d.data, b.n_rows, b.vocab_size, owed != nullptr ? *owed : 1.0f, k, *cand, s, scratch.must_zero(b.n_rows, -(b.vocab_size + (k << 32))),
                                          d.stream),
                   "top-k");
        b.candidates->active = 1;  // the rows are now the k best of each, as candidates (scaled)
        return;
      }
      pay_owed_scale(b, d.data, d.stream, "top-k");
      void* s = scratch.get(b.logits->device, cuda::select_scratch_bytes(b.n_rows, b.vocab_size, false), "top-k");
      check_cuda(cuda::top_k(d.data, b.n_rows, b.vocab_size, k, s, scratch.must_zero(b.n_rows, b.vocab_size), d.stream), "top-k");
      return;
    }
#endif
    const Rows rows = cpu_rows(&b, "top-k");
    if (k == 0 || k >= rows.vocab) return;  // disabled, or keeps everything
    std::vector<int32_t> idx(static_cast<size_t>(rows.vocab));
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      argmax_row(x, rows.vocab, r);  // rejects NaN (it would break the ordering) and dead rows
      std::iota(idx.begin(), idx.end(), 0);
      // Partition so idx[0, k) are the k best by (logit desc, id asc): O(vocab), no full sort.
      std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), [x](int32_t a, int32_t c) {
        return x[a] > x[c] || (x[a] == x[c] && a < c);
      });
      for (auto it = idx.begin() + k; it != idx.end(); ++it) x[*it] = -INFINITY;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<TopK>(kRunsOnCuda | kReadsCandidates | kDenseScale);
constexpr loom_param_desc kParams[] = {
    param("k", LOOM_VALUE_INT, "40", "number of highest logits kept, >= 0; 0 disables the filter"),
};

}  // namespace

const loom_component_desc top_k_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "top-k", "1.0.0",
    "Keeps the k highest logits of each row", kParams, 1, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
