// W4A16 on CUDA for the `int4` quantizer: the shared quantized GEMV (loom_quant_gemv.cuh) with the
// group-wise 4-bit format. A piece is 32 codes of one group (byte b of a row holds inputs 2b and
// 2b + 1 in its low and high nibble, so nibble n of a 32-bit word is input 8k + n of the word's
// eight). A code becomes (q - z) through the exponent trick: the nibble in the low mantissa bits
// of 2^23 (float32) or of 1024 (two at a time in half2), minus that power of two plus z; the
// group's scale multiplies the piece's sum.
#include "int4_cuda.hpp"

#include "loom_quant_gemv.cuh"

namespace loomp::int4q {
namespace {

struct Int4Format {
  static constexpr int kPer = kCodesPerPiece;
  // 2 x 32 codes of a row per lane and stage, in float32 and in half2 (four pieces with their
  // scales and zeros spill).
  static constexpr int kSteps = 2;
  static constexpr int kStepsHalf = 2;
  static constexpr bool kActF32 = true;
  struct Meta {
    float scale = 0.0f;
    float zero = 0.0f;
  };
  __device__ static Meta meta(const qgemv::Args& a, int row, int piece) {
    const int64_t at = static_cast<int64_t>(row) * a.groups + piece / a.group_pieces;
    return {__ldg(a.scales + at), static_cast<float>(__ldg(a.zeros + at))};
  }
  // Pairs (n, n + 4) of each word's eight nibbles: one AND-OR puts both into the low mantissa of
  // 1024, so the inputs of each eight are staged in the order 0 4 1 5 2 6 3 7.
  __device__ static constexpr int half_pos(int e) { return (e & ~7) + 2 * (e & 3) + ((e >> 2) & 1); }
  __device__ static void decode_half(uint4 p, Meta m, __half2 (&w)[kPer / 2]) {
    const uint32_t words[4] = {p.x, p.y, p.z, p.w};
    const __half2 offset = __float2half2_rn(1024.0f + m.zero);
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const uint32_t bits = ((words[k] >> (4 * n)) & 0x000F000Fu) | 0x64006400u;
        __half2 h;
        memcpy(&h, &bits, 4);
        w[4 * k + n] = __hsub2(h, offset);
      }
  }
  __device__ static void decode(uint4 p, Meta m, float (&w)[kPer]) {
    const uint32_t words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int n = 0; n < 8; ++n)
        w[8 * k + n] = __uint_as_float(((words[k] >> (4 * n)) & 0xFu) | 0x4B000000u) - (8388608.0f + m.zero);
  }
  __device__ static float piece_scale(Meta m) { return m.scale; }
  __device__ static float row_scale(const qgemv::Args&, int) { return 1.0f; }
};

}  // namespace

int w4a16_cuda(const qgemv::Args& args, const qgemv::Tiled& tiled, void* stream) {
  return qgemv::launch_any<Int4Format>(args, tiled, static_cast<cudaStream_t>(stream));
}
int tiled_create(qgemv::Tiled& tiled, void* workspace) { return qgemv::tiled_create(tiled, workspace); }
void tiled_destroy(qgemv::Tiled& tiled) { qgemv::tiled_destroy(tiled); }

}  // namespace loomp::int4q
