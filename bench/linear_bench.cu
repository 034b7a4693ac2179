// The decode step's linears at batch sizes of a served step, three ways: cuBLAS's cublasGemmEx
// with its default algorithm (the backend's path), cuBLASLt with each algorithm its heuristic
// offers timed and the fastest kept, and Loom's skinny tensor-core GEMM (loom/kernels/
// skinny_gemm.hpp) at each K split. bench/gemm_shapes_torch.py times PyTorch's matmul on the
// same shapes in the same device command (the peer).
//
// usage: loom_linear_bench [--tokens 16,32,64,128] [--reps 30]
//
// Each case is 16 calls (the model's 16 layers), each on its own copy of the weight so that the
// weights come from memory, captured in one CUDA graph; the median of the replays / 16 is the
// time of one call. One JSON line per case: {"shape","tokens","method","us","gbps"}.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench_args.hpp"
#include "cuda_check.hpp"
#include "graph_timing.hpp"
#include "loom/kernels/skinny_gemm.hpp"

namespace {

#define CHECK_BLAS(x)                                                        \
  do {                                                                       \
    cublasStatus_t s_ = (x);                                                 \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                       \
      std::fprintf(stderr, "%s:%d: cuBLAS status %d\n", __FILE__, __LINE__, \
                   static_cast<int>(s_));                                    \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

constexpr int kLayers = 16;

struct Shape {
  const char *name;
  int in, out;
  bool f32_add; // the output projections add float32 into the residual stream
  loom::kernels::SkinnyEpilogue skinny;
};

// The 1B-shape model's layer linears (Llama 3.2 1B: hidden 2048, 8 KV heads of 64, MLP 8192).
const Shape kShapes[] = {
    {"qkv", 2048, 3072, false, loom::kernels::SkinnyEpilogue::store_bf16},
    {"o", 2048, 2048, true, loom::kernels::SkinnyEpilogue::add_f32},
    {"gate_up", 2048, 16384, false, loom::kernels::SkinnyEpilogue::swiglu},
    {"down", 8192, 2048, true, loom::kernels::SkinnyEpilogue::add_f32},
};

__global__ void fill_bf16(__nv_bfloat16 *p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16((static_cast<float>(h & 0xFFFF) / 65536.0f - 0.5f) * 0.05f);
  }
}

// Median microseconds of one call: `calls(stream)` enqueues kLayers calls, captured once after
// one run outside the graph (first-use costs).
float graph_us(cudaStream_t stream, int reps, const std::function<void(cudaStream_t)> &calls) {
  calls(stream);
  return static_cast<float>(1000.0 * loom_bench::graph_median_ms(stream, 3, reps, calls) / kLayers);
}

void report(const Shape &s, int tokens, const std::string &method, float us) {
  const double bytes = 2.0 * s.in * s.out;
  std::printf("{\"shape\": \"%s\", \"tokens\": %d, \"method\": \"%s\", \"us\": %.2f, \"gbps\": %.0f}\n", s.name, tokens,
              method.c_str(), us, bytes / us / 1e3);
  std::fflush(stdout);
}

} // namespace

int main(int argc, char **argv) {
  std::vector<int> token_counts = {16, 32, 64, 128};
  int reps = 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--tokens") {
      token_counts = loom_bench::parse_int_list(argv[i + 1]);
    } else if (flag == "--reps") {
      reps = std::stoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: loom_linear_bench [--tokens 16,32,64,128] [--reps 30]\n");
      return 2;
    }
  }
  if (token_counts.empty() || reps < 1) return 2;
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cublasHandle_t blas;
  CHECK_BLAS(cublasCreate(&blas));
  CHECK_BLAS(cublasSetStream(blas, stream));
  cublasLtHandle_t lt;
  CHECK_BLAS(cublasLtCreate(&lt));
  const size_t workspace_bytes = size_t{32} << 20;
  void *workspace;
  CHECK_CUDA(cudaMalloc(&workspace, workspace_bytes));
  CHECK_BLAS(cublasSetWorkspace(blas, workspace, workspace_bytes));
  const int max_tokens = *std::max_element(token_counts.begin(), token_counts.end());

  for (const Shape &s : kShapes) {
    std::vector<__nv_bfloat16 *> weights(kLayers);
    for (int l = 0; l < kLayers; ++l) {
      CHECK_CUDA(cudaMalloc(&weights[static_cast<size_t>(l)], size_t{2} * s.in * s.out));
      fill_bf16<<<1024, 256, 0, stream>>>(weights[static_cast<size_t>(l)], size_t{1} * s.in * s.out, 17u + static_cast<unsigned>(l));
    }
    __nv_bfloat16 *x;
    void *y;
    CHECK_CUDA(cudaMalloc(&x, size_t{2} * max_tokens * s.in));
    fill_bf16<<<256, 256, 0, stream>>>(x, size_t{1} * max_tokens * s.in, 5u);
    CHECK_CUDA(cudaMalloc(&y, size_t{4} * max_tokens * s.out));
    CHECK_CUDA(cudaMemsetAsync(y, 0, size_t{4} * max_tokens * s.out, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    const cudaDataType y_type = s.f32_add ? CUDA_R_32F : CUDA_R_16BF;
    const float alpha = 1.0f, beta = s.f32_add ? 1.0f : 0.0f;

    for (const int T : token_counts) {
      // cublasGemmEx, default algorithm: y^T[out, T] = W^T' x^T' (the backend's call).
      report(s, T, "cublas", graph_us(stream, reps, [&](cudaStream_t) {
               for (int l = 0; l < kLayers; ++l)
                 CHECK_BLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, s.out, T, s.in, &alpha, weights[static_cast<size_t>(l)],
                                         CUDA_R_16BF, s.in, x, CUDA_R_16BF, s.in, &beta, y, y_type, s.out, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
             }));

      // cuBLASLt: every algorithm the heuristic returns, each timed; the fastest reported.
      cublasLtMatmulDesc_t desc;
      CHECK_BLAS(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
      CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)));
      CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)));
      cublasLtMatrixLayout_t la, lb, lc;
      CHECK_BLAS(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, static_cast<uint64_t>(s.in), static_cast<uint64_t>(s.out), s.in));
      CHECK_BLAS(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, static_cast<uint64_t>(s.in), static_cast<uint64_t>(T), s.in));
      CHECK_BLAS(cublasLtMatrixLayoutCreate(&lc, y_type, static_cast<uint64_t>(s.out), static_cast<uint64_t>(T), s.out));
      cublasLtMatmulPreference_t pref;
      CHECK_BLAS(cublasLtMatmulPreferenceCreate(&pref));
      CHECK_BLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                      sizeof(workspace_bytes)));
      cublasLtMatmulHeuristicResult_t found[32];
      int n_found = 0;
      CHECK_BLAS(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 32, found, &n_found));
      float best = 1e30f;
      int best_i = -1;
      for (int i = 0; i < n_found; ++i) {
        if (found[i].state != CUBLAS_STATUS_SUCCESS) continue;
        const float us = graph_us(stream, reps, [&](cudaStream_t st) {
          for (int l = 0; l < kLayers; ++l)
            CHECK_BLAS(cublasLtMatmul(lt, desc, &alpha, weights[static_cast<size_t>(l)], la, x, lb, &beta, y, lc, y, lc,
                                      &found[i].algo, workspace, workspace_bytes, st));
        });
        if (i == 0) report(s, T, "lt_heuristic_first", us);
        if (us < best) {
          best = us;
          best_i = i;
        }
      }
      report(s, T, "lt_best_of_" + std::to_string(n_found) + "_is_" + std::to_string(best_i), best);
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(lc);
      cublasLtMatmulDescDestroy(desc);

      // The skinny kernel, its own split choice (0) and forced splits.
      if (T <= loom::kernels::skinny_gemm_max_tokens() && loom::kernels::skinny_gemm_supported()) {
        for (const int splits : {0, 1, 2, 4, 5, 6, 8}) {
          loom::kernels::SkinnyGemmArgs a;
          a.tokens = T;
          a.in = s.in;
          a.out = s.out;
          a.act = x;
          a.out_ptr = y;
          a.splits = splits;
          report(s, T, "skinny_splits_" + std::to_string(splits), graph_us(stream, reps, [&](cudaStream_t st) {
                   for (int l = 0; l < kLayers; ++l) {
                     a.weight = weights[static_cast<size_t>(l)];
                     CHECK_CUDA(static_cast<cudaError_t>(loom::kernels::skinny_gemm_bf16_cuda(a, s.skinny, true, st)));
                   }
                 }));
        }
      }
    }
    for (auto *w : weights) CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
  }
  cublasLtDestroy(lt);
  cublasDestroy(blas);
  CHECK_CUDA(cudaFree(workspace));
  return 0;
}
