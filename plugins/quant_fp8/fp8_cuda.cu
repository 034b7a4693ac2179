// W8A8 on CUDA for the `fp8` quantizer (see fp8_cuda.hpp): our kernels quantize the activations
// to E4M3 with the same rule as the CPU path (amax / 448, division, round to nearest even,
// saturating), cuBLASLt multiplies E4M3 by E4M3 with float32 accumulation and applies the scales.
#include "fp8_cuda.hpp"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <tuple>

namespace loomp::fp8q {

struct Gemm {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  char* scratch = nullptr;
  // Heuristic choices by (rows, out, in, y_bf16, outer-vector scales, D alignment): the query
  // costs tens of microseconds, a decode step makes dozens of products of a few shapes.
  std::map<std::tuple<int, int, int, bool, bool, int>, cublasLtMatmulAlgo_t> algos;
};

namespace {

constexpr float kE4M3Max = 448.0f;
constexpr size_t kAmaxBytes = 256;  // the per-tensor amax at the scratch's start, then scales, then codes
constexpr int kThreads = 256;

size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

__device__ __forceinline__ float load(const float* x, int64_t i) { return x[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* x, int64_t i) { return __bfloat162float(x[i]); }

// The maximum of v over the block (kThreads threads); NaNs are ignored, as fmaxf does.
__device__ float block_max(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? smem[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// max |x| over `count` values into *amax_bits (zeroed before): non-negative floats order as their
// bit patterns, so an integer atomicMax combines the blocks.
template <class T>
__global__ void __launch_bounds__(kThreads) tensor_amax(const T* x, int64_t count, unsigned* amax_bits) {
  __shared__ float smem[32];
  float m = 0.0f;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < count; i += int64_t{gridDim.x} * kThreads)
    m = fmaxf(m, fabsf(load(x, i)));
  m = block_max(m, smem);
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

// One block per row: scale = amax / 448 (1 for an all-zero row), codes = E4M3(x / scale) with
// round to nearest even and saturation at 448, as loom_e4m3.hpp encodes on the CPU. amax is the
// row's own, or *tensor_amax when it is not null.
template <class T>
__global__ void __launch_bounds__(kThreads) quantize_rows(const T* x, int in, const unsigned* tensor_amax, uint8_t* codes,
                                                          float* scales) {
  __shared__ float smem[32];
  const T* row = x + int64_t{blockIdx.x} * in;
  float amax = 0.0f;
  if (tensor_amax != nullptr) {
    amax = __uint_as_float(*tensor_amax);
  } else {
    float m = 0.0f;
    for (int i = threadIdx.x; i < in; i += kThreads) m = fmaxf(m, fabsf(load(row, i)));
    amax = block_max(m, smem);
  }
  const float scale = amax > 0.0f ? __fdiv_rn(amax, kE4M3Max) : 1.0f;
  uint8_t* out = codes + int64_t{blockIdx.x} * in;
  for (int i = threadIdx.x; i < in; i += kThreads)
    out[i] = __nv_cvt_float_to_fp8(__fdiv_rn(load(row, i), scale), __NV_SATFINITE, __NV_E4M3);
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

template <class T>
__global__ void add_bias(T* y, const float* bias, int out, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    if constexpr (sizeof(T) == 4)
      y[i] += bias[i % out];
    else
      y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + bias[i % out]);
  }
}

int grid_for(int64_t count) { return static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 1024)); }

// The largest power of two (at most 256) dividing the address.
int alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && a % static_cast<uintptr_t>(align) != 0) align /= 2;
  return align;
}

bool lt_ok(cublasStatus_t s, const char* what, std::string& why) {
  if (s == CUBLAS_STATUS_SUCCESS) return true;
  why = std::string("cuBLASLt ") + what + " failed with status " + std::to_string(static_cast<int>(s));
  return false;
}
bool cuda_ok(cudaError_t e, const char* what, std::string& why) {
  if (e == cudaSuccess) return true;
  why = std::string(what) + ": " + cudaGetErrorString(e);
  return false;
}

// Descriptors of one cuBLASLt call, destroyed with it.
struct Call {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Call() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// y[rows, out] = scales * (codes[rows, in] . w_codes[out, in]^T). Column-major as cuBLASLt sees
// it: D (out x rows) = A^T (out x in) B (in x rows), A the weight's codes stored in x out with
// leading dimension in ("TN", the layout its FP8 kernels take).
bool matmul(Gemm& g, const LinearArgs& a, int rows, const uint8_t* codes, const float* scales, void* y,
            cudaStream_t stream, std::string& why) {
  const bool vec = !(a.w_per_tensor && a.act_per_tensor);
  const cudaDataType y_type = a.y_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  Call c;
  if (!lt_ok(cublasLtMatmulDescCreate(&c.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate", why)) return false;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const void* a_scale = a.w_scales;
  const void* b_scale = scales;
  if (!lt_ok(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA", why) ||
      !lt_ok(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB", why) ||
      !lt_ok(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)),
             "A_SCALE_POINTER", why) ||
      !lt_ok(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)),
             "B_SCALE_POINTER", why))
    return false;
  if (vec) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    if (!lt_ok(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)),
               "A_SCALE_MODE", why) ||
        !lt_ok(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)),
               "B_SCALE_MODE", why))
      return false;
  }
  if (!lt_ok(cublasLtMatrixLayoutCreate(&c.a, CUDA_R_8F_E4M3, static_cast<uint64_t>(a.in), static_cast<uint64_t>(a.out), a.in),
             "layout A", why) ||
      !lt_ok(cublasLtMatrixLayoutCreate(&c.b, CUDA_R_8F_E4M3, static_cast<uint64_t>(a.in), static_cast<uint64_t>(rows), a.in),
             "layout B", why) ||
      !lt_ok(cublasLtMatrixLayoutCreate(&c.d, y_type, static_cast<uint64_t>(a.out), static_cast<uint64_t>(rows), a.out),
             "layout D", why))
    return false;
  const int d_align = alignment_of(y);
  const auto key = std::make_tuple(rows, a.out, a.in, a.y_bf16, vec, d_align);
  auto found = g.algos.find(key);
  if (found == g.algos.end()) {
    if (!lt_ok(cublasLtMatmulPreferenceCreate(&c.pref), "PreferenceCreate", why)) return false;
    const uint64_t ws = kWorkspaceBytes;
    const uint32_t align = static_cast<uint32_t>(d_align);
    if (!lt_ok(cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
               "workspace preference", why) ||
        !lt_ok(cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof(align)),
               "C alignment preference", why) ||
        !lt_ok(cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof(align)),
               "D alignment preference", why))
      return false;
    cublasLtMatmulHeuristicResult_t result{};
    int count = 0;
    if (!lt_ok(cublasLtMatmulAlgoGetHeuristic(g.handle, c.desc, c.a, c.b, c.d, c.d, c.pref, 1, &result, &count),
               "AlgoGetHeuristic", why))
      return false;
    if (count < 1) {
      why = "cuBLASLt offers no E4M3 kernel for " + std::to_string(rows) + " x " + std::to_string(a.in) + " by " +
            std::to_string(a.out) + (vec ? " with per-channel/per-token scales" : "") + " on this GPU";
      return false;
    }
    found = g.algos.emplace(key, result.algo).first;
  }
  const float alpha = 1.0f, beta = 0.0f;
  return lt_ok(cublasLtMatmul(g.handle, c.desc, &alpha, a.w_codes, c.a, codes, c.b, &beta, y, c.d, y, c.d, &found->second,
                              g.workspace, kWorkspaceBytes, stream),
               "Matmul", why);
}

template <class T>
bool linear_typed(Gemm& g, const LinearArgs& a, cudaStream_t stream, std::string& why) {
  const T* x = static_cast<const T*>(a.x);
  auto* amax = reinterpret_cast<unsigned*>(g.scratch);
  // Rows per chunk: their scales and codes fit the scratch.
  const size_t per_row = static_cast<size_t>(a.in) + sizeof(float);
  int chunk = static_cast<int>(std::min<size_t>((kScratchBytes - kAmaxBytes - 256) / per_row, static_cast<size_t>(a.tokens)));
  if (chunk < 1) {
    why = "a row of " + std::to_string(a.in) + " inputs does not fit the activation scratch";
    return false;
  }
  auto* scales = reinterpret_cast<float*>(g.scratch + kAmaxBytes);
  auto* codes = reinterpret_cast<uint8_t*>(g.scratch + kAmaxBytes + round_up(static_cast<size_t>(chunk) * sizeof(float), 256));
  const int64_t count = int64_t{a.tokens} * a.in;
  if (a.act_per_tensor) {
    if (!cuda_ok(cudaMemsetAsync(amax, 0, sizeof(unsigned), stream), "amax reset", why)) return false;
    tensor_amax<T><<<grid_for(count), kThreads, 0, stream>>>(x, count, amax);
    if (!cuda_ok(cudaGetLastError(), "tensor_amax launch", why)) return false;
  }
  char* y = static_cast<char*>(a.y);
  const size_t y_row = static_cast<size_t>(a.out) * (a.y_bf16 ? 2 : 4);
  for (int r0 = 0; r0 < a.tokens; r0 += chunk) {
    const int rows = std::min(chunk, a.tokens - r0);
    quantize_rows<T><<<rows, kThreads, 0, stream>>>(x + int64_t{r0} * a.in, a.in, a.act_per_tensor ? amax : nullptr, codes,
                                                     scales);
    if (!cuda_ok(cudaGetLastError(), "quantize_rows launch", why)) return false;
    if (!matmul(g, a, rows, codes, scales, y + static_cast<size_t>(r0) * y_row, stream, why)) return false;
  }
  if (a.bias != nullptr) {
    const int64_t total = int64_t{a.tokens} * a.out;
    if (a.y_bf16)
      add_bias<__nv_bfloat16><<<grid_for(total), kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(a.y), a.bias, a.out, total);
    else
      add_bias<float><<<grid_for(total), kThreads, 0, stream>>>(static_cast<float*>(a.y), a.bias, a.out, total);
    if (!cuda_ok(cudaGetLastError(), "add_bias launch", why)) return false;
  }
  return true;
}

}  // namespace

Gemm* gemm_create(void* workspace, void* scratch, std::string& why) {
  auto* g = new Gemm;
  if (!lt_ok(cublasLtCreate(&g->handle), "Create", why)) {
    delete g;
    return nullptr;
  }
  g->workspace = workspace;
  g->scratch = static_cast<char*>(scratch);
  return g;
}

void gemm_destroy(Gemm* gemm) {
  if (gemm == nullptr) return;
  if (gemm->handle) cublasLtDestroy(gemm->handle);
  delete gemm;
}

bool linear(Gemm& gemm, const LinearArgs& args, void* stream, std::string& why) {
  if (args.tokens == 0) return true;
  const auto s = static_cast<cudaStream_t>(stream);
  return args.x_bf16 ? linear_typed<__nv_bfloat16>(gemm, args, s, why) : linear_typed<float>(gemm, args, s, why);
}

}  // namespace loomp::fp8q
