// The launch of the `lora` adapter's gathered kernels (lora_gathered.cu): plain C++, so the
// plugin's host code includes it without nvcc. One call adds to each row t of y the LoRA delta
// of the adapter entries[row_adapter[t]] (-1: none), S-LoRA / Punica's BGMV: on compute
// capability 9.0 and newer one fused kernel (a cluster of 8 blocks per row: each computes h's
// partial over an eighth of the inputs, the cluster sums them in distributed shared memory, each
// adds the delta to an eighth of the outputs; LOOM_LORA_FUSED=0 turns it off), elsewhere two
// kernels: shrink (h[t, :r] = x[t] A^T in blocks of (row, input chunk), into the workspace h)
// and expand (y[t, o] += scale * h[t] . B[o], blocks over (output chunk, row)).
#pragma once

#include <cstdint>

namespace loomp::lora {

struct GatheredEntry {
  const void *a = nullptr;  // bfloat16 [r, in] on the device; NULL: the entry leaves its rows alone
  const void *b = nullptr;  // bfloat16 [out, r]
  float scale = 0.0f;
  int32_t r = 0;
};

struct GatheredLaunch {
  const GatheredEntry *entries = nullptr;  // device [count]
  const int32_t *row_adapter = nullptr;    // device [n]
  const void *x = nullptr;                 // [n, in], bfloat16 or float32
  bool x_bf16 = true;
  int64_t in = 0;
  void *y = nullptr;                       // [n, out] with row stride y_stride, bfloat16 or float32
  bool y_bf16 = true;
  int64_t y_stride = 0, out = 0;
  float *h = nullptr;                      // device workspace [chunks(in), n, r_max]
  int32_t r_max = 0;
  int64_t n = 0;
};

// Up to this many launches' work in one pair of kernels (blockIdx.z picks the launch).
constexpr int kMaxGathered = 4;

// Returns a cudaError_t as int (0: success), on `stream` (a cudaStream_t): launches[0, count)
// in one fused kernel or one shrink and one expand (their rows n must be equal).
int lora_gathered_cuda(const GatheredLaunch *launches, int count, void *stream);

// How many chunks of the input the shrink kernel splits a row into (the workspace's first
// extent); r_max must be at most 64.
int lora_gathered_chunks(int64_t in);

}  // namespace loomp::lora
