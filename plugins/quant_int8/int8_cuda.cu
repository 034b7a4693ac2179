// W8A16 on CUDA for the `int8` quantizer: the shared quantized GEMVs with the int8 format (one
// token: loom_quant_gemv_stream.cuh's; more: loom_quant_gemv.cuh's). A piece is 16 signed codes; they become floats through the exponent trick
// (the byte, offset to unsigned, in the low mantissa bits of 2^23, minus 2^23 + 128: two integer
// operations and a subtraction, no conversion instruction), and the row's scale is applied once
// to the row's sum.
#include "int8_cuda.hpp"

#include "loom_quant_gemv_stream.cuh"

namespace loomp::int8q {
namespace {

struct Int8Format {
  static constexpr int kPer = kCodesPerPiece;
  // 4 x 16 codes of a row per lane and stage, in float32 and in half2 (no spills at one or two
  // tokens).
  static constexpr int kSteps = 4;
  static constexpr int kStepsHalf = 4;
  static constexpr bool kActF32 = false;
  struct Meta {};
  __device__ static Meta meta(const qgemv::Args&, int, int) { return {}; }
  __device__ static void decode(uint4 p, Meta, float (&w)[kPer]) {
    const uint32_t words[4] = {p.x ^ 0x80808080u, p.y ^ 0x80808080u, p.z ^ 0x80808080u, p.w ^ 0x80808080u};
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int b = 0; b < 4; ++b)
        w[4 * k + b] = __uint_as_float(__byte_perm(words[k], 0x4B000000u, 0x7440u + b)) - 8388736.0f;
  }
  // Pairs of consecutive codes: the byte into the low mantissa of 1024 (offset to unsigned),
  // minus 1024 + 128.
  __device__ static constexpr int half_pos(int e) { return e; }
  __device__ static void decode_half(uint4 p, Meta, __half2 (&w)[kPer / 2]) {
    const uint32_t words[4] = {p.x ^ 0x80808080u, p.y ^ 0x80808080u, p.z ^ 0x80808080u, p.w ^ 0x80808080u};
    const __half2 offset = __float2half2_rn(1152.0f);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = __byte_perm(words[k], 0x64646464u, 0x4140u), hi = __byte_perm(words[k], 0x64646464u, 0x4342u);
      __half2 a, b;
      memcpy(&a, &lo, 4);
      memcpy(&b, &hi, 4);
      w[2 * k] = __hsub2(a, offset);
      w[2 * k + 1] = __hsub2(b, offset);
    }
  }
  __device__ static float piece_scale(Meta) { return 1.0f; }
  __device__ static float row_scale(const qgemv::Args& a, int row) { return a.scales[row]; }
  // The streamed one-token kernel (loom_quant_gemv_stream.cuh) applies: no per-piece metadata.
  static constexpr bool kStreamed = true;
};

}  // namespace

int w8a16_cuda(const qgemv::Args& args, const qgemv::Tiled& tiled, void* stream) {
  return qgemv::launch_product<Int8Format>(args, tiled, static_cast<cudaStream_t>(stream));
}
int tiled_create(qgemv::Tiled& tiled, void* workspace) { return qgemv::tiled_create(tiled, workspace); }
void tiled_destroy(qgemv::Tiled& tiled) { qgemv::tiled_destroy(tiled); }

}  // namespace loomp::int8q
