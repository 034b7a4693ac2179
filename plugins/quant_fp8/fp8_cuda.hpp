// The `fp8` quantizer's CUDA product (W8A8, E4M3 weights and activations), compiled by nvcc:
// activations are quantized to E4M3 codes with a dynamic scale per token (or one per call) by a
// kernel of ours, then cuBLASLt multiplies the codes on the tensor cores with the weight's and the
// activations' scales applied in its epilogue (scalar scales when both are per-tensor, outer-vector
// scales otherwise). The rows of a call go through the activation scratch in chunks, so any
// number of tokens works with a fixed scratch (no allocation while a CUDA graph is captured).
//
// Ownership: a Gemm owns its cuBLASLt handle and algorithm cache; the workspace and scratch are
// the caller's (device memory from the host's allocator), valid for the Gemm's life.
// Thread-safety: none; one Gemm per quantizer instance (the builtin quantizers are SERIAL).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace loomp::fp8q {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLASLt's workspace (Hopper's recommended size)
constexpr size_t kScratchBytes = size_t{16} << 20;    // activation codes and scales of one chunk of rows

struct Gemm;

// A cuBLASLt handle over `workspace` and `scratch`, or nullptr with `why` set.
Gemm* gemm_create(void* workspace, void* scratch, std::string& why);
void gemm_destroy(Gemm* gemm);

struct LinearArgs {
  const uint8_t* w_codes = nullptr;  // [out, in] E4M3 codes
  const float* w_scales = nullptr;   // [out] (a per-tensor scale repeated, see w_per_tensor)
  bool w_per_tensor = false;         // every w_scales entry is the same
  int out = 0, in = 0;               // in % 16 == 0, out % 16 == 0
  const void* x = nullptr;           // [tokens, in] float32 or bfloat16
  bool x_bf16 = false;
  bool act_per_tensor = false;  // one activation scale for the call (else one per token)
  int tokens = 0;
  void* y = nullptr;  // [tokens, out] float32 or bfloat16, overwritten
  bool y_bf16 = false;
  const float* bias = nullptr;  // [out] float32, or nullptr
};

// y = (x quantized) @ (W quantized)^T (+ bias), ordered on `stream`. Returns false with `why` set
// when a CUDA or cuBLASLt call fails.
bool linear(Gemm& gemm, const LinearArgs& args, void* stream, std::string& why);

}  // namespace loomp::fp8q
