// The `int8` quantizer's CUDA product (W8A16), compiled by nvcc: over per-channel int8 codes (16
// codes a piece, one float32 scale a row), one token by loom_quant_gemv_stream.cuh's streamed
// kernel, more by loom_quant_gemv.cuh's.
#pragma once

#include <cstdint>

#include "loom_quant_gemv_args.hpp"

namespace loomp::int8q {

constexpr int kCodesPerPiece = 16;

// Any number of tokens: the GEMV (launches of up to qgemv::max_tokens), or from
// qgemv::kTiledMinTokens bfloat16 rows the dequantize + cuBLAS path when `tiled` is set up.
// Returns a cudaError_t (cudaErrorUnknown for a cuBLAS failure).
int w8a16_cuda(const qgemv::Args& args, const qgemv::Tiled& tiled, void* stream);
int tiled_create(qgemv::Tiled& tiled, void* workspace);
void tiled_destroy(qgemv::Tiled& tiled);

}  // namespace loomp::int8q
