// CPU reference versions of the row kernels (see rows.hpp for the numerics contract).
#include "loom/kernels/rows.hpp"

#include <cmath>
#include <limits>

namespace loom::kernels {

bool softmax_rows_cpu(float* x, int64_t rows, int64_t cols) {
  if (rows <= 0) return true;
  if (cols <= 0) return false;
  bool all_rows_ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * cols;  // [cols]
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < cols; ++c)
      if (row[c] > max) max = row[c];
    if (max == -std::numeric_limits<float>::infinity()) {
      // All -inf (or NaN): no distribution. Zeros keep the row harmless to readers.
      for (int64_t c = 0; c < cols; ++c) row[c] = 0.0f;
      all_rows_ok = false;
      continue;
    }
    // Accumulate in double: a 128k-entry row summed in float loses ~1e-4 relative precision.
    double sum = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const float e = std::exp(row[c] - max);  // exp(-inf) == 0 exactly
      row[c] = e;
      sum += static_cast<double>(e);
    }
    const float inv = static_cast<float>(1.0 / sum);  // sum >= 1: the max contributes exp(0)
    for (int64_t c = 0; c < cols; ++c) row[c] *= inv;
  }
  return all_rows_ok;
}

void argmax_rows_cpu(const float* x, int64_t rows, int64_t cols, int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    if (cols <= 0) {
      out[r] = -1;
      continue;
    }
    const float* row = x + r * cols;  // [cols]
    float best = -std::numeric_limits<float>::infinity();
    int64_t best_index = 0;
    for (int64_t c = 0; c < cols; ++c) {
      if (row[c] > best) {  // strict: the first index of the maximum wins; NaN never does
        best = row[c];
        best_index = c;
      }
    }
    out[r] = static_cast<int32_t>(best_index);
  }
}

}  // namespace loom::kernels
