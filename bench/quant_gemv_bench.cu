// [Quantizers] item 5, the products alone: a batch-1 decode step's 65 fused products on the 1B
// shape (16 layers of q/k/v with RMSNorm and RoPE, o adding into the residual, gate/up with
// RMSNorm and SwiGLU, down adding into the residual; the 128,256-row head with the final norm),
// each weight its own buffer so that nothing is read from L2 twice, captured in a CUDA graph as
// the engine replays a step. Rows: the host's bfloat16 GEMV (kernels/cuda/gemv.cu), the int8 and
// int4 quantizers' products (the plugins' own sources compiled in: int8's streamed one-token
// kernel, plugins/common/loom_quant_gemv_stream.cuh, int4's loom_quant_gemv.cuh) and a floor: one
// kernel per weight that only reads it (every 16-byte piece once, programmatic launches as the
// GEMVs), which no product of the same bytes and launches beats. Prints
// microseconds per kind (16 launches) and per step, GB/s of weight bytes, and the step's ratio
// to bfloat16, which is what the batch-1 decode ratio is made of besides attention and sampling.
//
// usage: loom_quant_gemv_bench [--reps N]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "graph_timing.hpp"
#include "int4_cuda.hpp"
#include "int8_cuda.hpp"
#include "loom/kernels/gemv.hpp"
#include "loom_cuda_pdl.cuh"


namespace {

namespace lk = loom::kernels;
namespace qg = loomp::qgemv;

constexpr int kH = 2048, kI = 8192, kHeads = 32, kKvHeads = 8, kD = 64, kV = 128256, kLayers = 16;

// An enqueue's status (a cudaError_t as int) through CHECK_CUDA.
#define CHECK_STATUS(x) CHECK_CUDA(static_cast<cudaError_t>(x))

// Pseudo-random bits of index i (a hash), so that codes, scales and activations are not a
// pattern the memory system could compress or a kernel could skip.
__device__ __forceinline__ uint32_t hash_bits(int64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed;
  h ^= h >> 15;
  h *= 0x85EBCA77u;
  return h ^ (h >> 13);
}
__global__ void fill_kernel(uint32_t* p, int64_t words, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = hash_bits(i, seed);
}
// count float32 values in [lo, hi).
__global__ void fill_floats_kernel(float* p, int64_t count, float lo, float hi, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = lo + (hi - lo) * static_cast<float>(hash_bits(i, seed) >> 8) * (1.0f / 16777216.0f);
}

// The floor: reads n 16-byte pieces once (a grid-stride loop, four loads in flight a thread)
// and writes one word per block, so the reads cannot be removed.
__global__ void __launch_bounds__(256) read_kernel(const uint4* __restrict__ p, int64_t n, uint32_t* sink) {
  loomp::pdl::allow_next_kernel();
  uint32_t acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = __ldcs(p + i + j * stride);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  loomp::pdl::wait_for_previous_kernel();
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;  // practically never; keeps the loads
}

struct Buffers {
  std::vector<void*> owned;
  void* make(size_t bytes) {
    void* p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, bytes));
    owned.push_back(p);
    const int64_t words = static_cast<int64_t>(bytes / 4);
    if (words > 0) fill_kernel<<<1024, 256>>>(static_cast<uint32_t*>(p), words, static_cast<uint32_t>(owned.size()) * 7919u);
    CHECK_CUDA(cudaGetLastError());
    return p;
  }
  float* floats(size_t count, float lo, float hi) {
    auto* p = static_cast<float*>(make(count * 4));
    fill_floats_kernel<<<256, 256>>>(p, static_cast<int64_t>(count), lo, hi, static_cast<uint32_t>(owned.size()));
    CHECK_CUDA(cudaGetLastError());
    return p;
  }
  ~Buffers() {
    for (void* p : owned) cudaFree(p);
  }
};

// The product kinds of a layer and the head, as the engine's batch-1 decode runs them.
enum Kind { qkv = 0, o = 1, gate_up = 2, down = 3, head = 4 };
const char* const kKindNames[] = {"qkv (norm, rope)", "o (+residual)", "gate_up (norm, swiglu)", "down (+residual)",
                                  "head (norm)"};
int out_of(Kind k) {
  switch (k) {
    case qkv: return (kHeads + 2 * kKvHeads) * kD;
    case o: return kH;
    case gate_up: return 2 * kI;
    case down: return kH;
    case head: return kV;
  }
  return 0;
}
int in_of(Kind k) { return k == down ? kI : kH; }

// Activations shared by every product (the step's data flow is not what is timed).
struct Activations {
  float* resid;
  float* norm_w;
  void* act;  // bfloat16 [kI]
  float* logits;
  void *q, *k, *v;
  float* cos_sin;
  int32_t* positions;
};

struct Format {
  const char* name;
  std::function<int(Kind, int layer, cudaStream_t)> enqueue;
  double weight_bytes = 0;  // codes + scales (+ zeros) of a step
};

}  // namespace

int main(int argc, char** argv) {
  int reps = 21;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--reps") reps = std::max(3, std::atoi(argv[i + 1]));
  }
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  const bool pdl = prop.major >= 9;
  Buffers buf;
  Activations act{};
  act.resid = buf.floats(kH, -1.0f, 1.0f);
  act.norm_w = buf.floats(kH, 0.5f, 1.5f);
  act.act = buf.make(kI * 2);
  {  // bfloat16 activations in [-1, 1): the upper halves of floats
    std::vector<uint16_t> h(kI);
    for (int i = 0; i < kI; ++i) {
      const float f = static_cast<float>((i * 37) % 200 - 100) / 100.0f;
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      h[static_cast<size_t>(i)] = static_cast<uint16_t>(bits >> 16);
    }
    CHECK_CUDA(cudaMemcpy(act.act, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  }
  act.logits = static_cast<float*>(buf.make(static_cast<size_t>(kV) * 4));
  act.q = buf.make(kHeads * kD * 2);
  act.k = buf.make(kKvHeads * kD * 2);
  act.v = buf.make(kKvHeads * kD * 2);
  act.cos_sin = buf.floats(static_cast<size_t>(4096) * kD, -1.0f, 1.0f);
  act.positions = static_cast<int32_t*>(buf.make(64));
  CHECK_CUDA(cudaMemset(act.positions, 0, 64));
  uint32_t* sink = static_cast<uint32_t*>(buf.make(1 << 20));

  // Weights: [kind][layer] (the head once).
  auto layers_of = [](int k) { return k == head ? 1 : kLayers; };
  std::vector<std::vector<void*>> bf16_w(5), i8_codes(5), i4_codes(5);
  std::vector<std::vector<float*>> i8_scales(5), i4_scales(5);
  std::vector<std::vector<uint8_t*>> i4_zeros(5);
  double bf16_bytes = 0, i8_bytes = 0, i4_bytes = 0;
  for (int k = 0; k < 5; ++k)
    for (int l = 0; l < layers_of(k); ++l) {
      const size_t out = static_cast<size_t>(out_of(static_cast<Kind>(k))), in = static_cast<size_t>(in_of(static_cast<Kind>(k)));
      bf16_w[k].push_back(buf.make(out * in * 2));
      i8_codes[k].push_back(buf.make(out * in));
      i8_scales[k].push_back(buf.floats(out, 1e-3f, 2e-3f));
      i4_codes[k].push_back(buf.make(out * in / 2));
      i4_scales[k].push_back(buf.floats(out * (in / 128), 1e-2f, 2e-2f));
      i4_zeros[k].push_back(static_cast<uint8_t*>(buf.make(out * (in / 128))));
      CHECK_CUDA(cudaMemset(i4_zeros[k].back(), 8, out * (in / 128)));
      bf16_bytes += static_cast<double>(out * in * 2);
      i8_bytes += static_cast<double>(out * in + out * 4);
      i4_bytes += static_cast<double>(out * in / 2 + out * (in / 128) * 5);
    }
  CHECK_CUDA(cudaDeviceSynchronize());

  auto set_rope = [&](auto& args) {  // both argument structs name these alike
    args.q = act.q;
    args.k = act.k;
    args.v = act.v;
    args.cos_sin = act.cos_sin;
    args.positions = act.positions;
  };
  auto bf16_enqueue = [&](Kind k, int l, cudaStream_t s) {
    lk::GemvArgs a;
    a.tokens = 1;
    a.in = in_of(k);
    a.out = out_of(k);
    a.weight = bf16_w[k][static_cast<size_t>(l)];
    a.resid = act.resid;
    a.norm_w = act.norm_w;
    a.eps = 1e-5f;
    a.act = act.act;
    a.out_f32 = k == head ? act.logits : act.resid;
    a.out_act = act.act;
    a.n_heads = kHeads;
    a.n_kv_heads = kKvHeads;
    a.head_dim = kD;
    set_rope(a);
    using P = lk::GemvPrologue;
    using E = lk::GemvEpilogue;
    const P p = (k == o || k == down) ? P::act : P::rms_norm;
    const E e = k == qkv ? E::rope_split : k == gate_up ? E::swiglu : k == head ? E::store_f32 : E::add_f32;
    return lk::gemv_bf16_cuda(a, p, e, pdl, s);
  };
  auto quant_args = [&](Kind k) {
    qg::Args a;
    a.tokens = 1;
    a.in = in_of(k);
    a.out = out_of(k);
    a.input = (k == o || k == down) ? qg::input_act : qg::input_rms_norm;
    a.output = k == qkv ? qg::output_rope_qkv : k == gate_up ? qg::output_swiglu : k == head ? qg::output_store : qg::output_add;
    a.x = a.input == qg::input_act ? act.act : static_cast<const void*>(act.resid);
    a.x_bf16 = a.input == qg::input_act;
    a.norm_w = act.norm_w;
    a.eps = 1e-5f;
    a.y = k == head ? static_cast<void*>(act.logits) : k == gate_up ? act.act : static_cast<void*>(act.resid);
    a.y_bf16 = k == qkv || k == gate_up;
    a.heads = kHeads;
    a.kv_heads = kKvHeads;
    a.head_dim = kD;
    set_rope(a);
    return a;
  };
  const qg::Tiled no_tiled{};
  auto int8_enqueue = [&](Kind k, int l, cudaStream_t s) {
    qg::Args a = quant_args(k);
    a.codes = i8_codes[k][static_cast<size_t>(l)];
    a.row_pieces = a.in / 16;
    a.scales = i8_scales[k][static_cast<size_t>(l)];
    return loomp::int8q::w8a16_cuda(a, no_tiled, s);
  };
  auto int4_enqueue = [&](Kind k, int l, cudaStream_t s) {
    qg::Args a = quant_args(k);
    a.codes = i4_codes[k][static_cast<size_t>(l)];
    a.row_pieces = a.in / 32;
    a.scales = i4_scales[k][static_cast<size_t>(l)];
    a.zeros = i4_zeros[k][static_cast<size_t>(l)];
    a.groups = a.in / 128;
    a.group_pieces = 4;
    return loomp::int4q::w4a16_cuda(a, no_tiled, s);
  };
  // The floor reads the int8 codes (or int4's) with programmatic launches, one wave of blocks.
  int floor_wave = prop.multiProcessorCount * 8;
  auto floor_enqueue = [&](const std::vector<std::vector<void*>>& w, double per_weight) {
    return [&, per_weight](Kind k, int l, cudaStream_t s) {
      const int64_t n = static_cast<int64_t>(static_cast<double>(out_of(k)) * in_of(k) * per_weight) / 16;
      return static_cast<int>(loomp::pdl::launch(pdl, dim3(static_cast<unsigned>(floor_wave)), dim3(256), 0, s, read_kernel,
                                                 static_cast<const uint4*>(w[k][static_cast<size_t>(l)]), n, sink));
    };
  };
  std::vector<Format> formats = {
      {"bf16 GEMV", bf16_enqueue, bf16_bytes},
      {"int8 GEMV", int8_enqueue, i8_bytes},
      {"int4 GEMV", int4_enqueue, i4_bytes},
      {"floor, int8 bytes", floor_enqueue(i8_codes, 1.0), i8_bytes},
      {"floor, int4 bytes", floor_enqueue(i4_codes, 0.5), i4_bytes},
  };

  cudaStream_t stream = nullptr;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Median microseconds of `enqueue` captured in a graph and replayed (3 untimed replays).
  auto time_graph = [&](const std::function<void()>& enqueue) {
    return 1e3 * loom_bench::graph_median_ms(stream, 3, reps, [&](cudaStream_t) { enqueue(); });
  };

  std::printf("%s, %d SMs; one token; median of %d graph replays; GB/s of weight bytes read (codes, scales, zeros)\n",
              prop.name, prop.multiProcessorCount, reps);
  std::printf("| products | %s |\n", [&] {
    std::string s;
    for (const Format& f : formats) s += std::string(s.empty() ? "" : " | ") + f.name + " us";
    return s;
  }().c_str());
  std::printf("| --- |%s\n", [&] {
    std::string s;
    for (size_t i = 0; i < formats.size(); ++i) s += " ---: |";
    return s;
  }().c_str());
  for (int k = 0; k < 5; ++k) {
    std::printf("| %s x%d |", kKindNames[k], layers_of(k));
    for (const Format& f : formats) {
      const double us = time_graph([&] {
        for (int l = 0; l < layers_of(k); ++l) CHECK_STATUS(f.enqueue(static_cast<Kind>(k), l, stream));
      });
      std::printf(" %.1f |", us);
    }
    std::printf("\n");
  }
  std::vector<double> step(formats.size());
  for (size_t i = 0; i < formats.size(); ++i)
    step[i] = time_graph([&] {
      for (int l = 0; l < kLayers; ++l)
        for (int k = 0; k < 4; ++k) CHECK_STATUS(formats[i].enqueue(static_cast<Kind>(k), l, stream));
      CHECK_STATUS(formats[i].enqueue(head, 0, stream));
    });
  std::printf("| whole step (65 products) |");
  for (double us : step) std::printf(" %.1f |", us);
  std::printf("\n| GB/s |");
  for (size_t i = 0; i < formats.size(); ++i) std::printf(" %.0f |", formats[i].weight_bytes / (step[i] * 1e3));
  std::printf("\n| bf16 step / this step |");
  for (double us : step) std::printf(" %.2fx |", step[0] / us);
  std::printf("\n");
  cudaStreamDestroy(stream);
  return 0;
}
