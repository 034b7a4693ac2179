// The `int4` quantizer's CUDA product (W4A16), compiled by nvcc: loom_quant_gemv.cuh's kernel over
// group-wise 4-bit codes (32 codes a 16-byte piece, a float32 scale and a uint8 zero point a group).
#pragma once

#include <cstdint>

#include "loom_quant_gemv_args.hpp"

namespace loomp::int4q {

constexpr int kCodesPerPiece = 32;

// Any number of tokens: the GEMV (launches of up to qgemv::max_tokens), or from
// qgemv::kTiledMinTokens bfloat16 rows the dequantize + cuBLAS path when `tiled` is set up.
// Returns a cudaError_t (cudaErrorUnknown for a cuBLAS failure). The group size must be a
// multiple of kCodesPerPiece (a piece lies in one group).
int w4a16_cuda(const qgemv::Args& args, const qgemv::Tiled& tiled, void* stream);
int tiled_create(qgemv::Tiled& tiled, void* workspace);
void tiled_destroy(qgemv::Tiled& tiled);

}  // namespace loomp::int4q
