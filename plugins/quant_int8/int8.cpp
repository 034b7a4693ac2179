// Quantizer component `int8`: per-output-channel symmetric int8.
//   scale[o] = max_i |W[o, i]| / 127   (an all-zero row gets scale 1)
//   q[o, i]  = round(W[o, i] / scale[o]) in [-127, 127]
//   W~[o, i] = q[o, i] * scale[o],  so |W - W~| <= scale[o] / 2
// Weights live in host memory (CPU path) and, for a CUDA target, also in device memory from the
// host's allocator, where the product is int8_cuda.cu's W8A16 kernel (bf16 or f32 activations),
// with the fusions of loom.quantizer.fused/1 (RMSNorm prologue, residual add, SwiGLU).
// Export layout: "qweight" int8 [out, in], "scales" float32 [out], metadata
// {"format":"loom-int8","bits":8,"scheme":"per-channel-symmetric"}.
#ifndef LOOM_INT8_CUDA
#define LOOM_INT8_CUDA 0  // the CUDA path is built only with nvcc (CMakeLists.txt)
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "loom_quant_util.hpp"
#include "loom_quantizer_glue.hpp"
#if LOOM_INT8_CUDA
#include "int8_cuda.hpp"
#include "loom_cuda_guard.hpp"
#include "loom_quant_cuda.hpp"
#endif

struct loom_qweight {
  int64_t out = 0, in = 0;
  std::vector<int8_t> q;      // [out, in]
  std::vector<float> scales;  // [out]
  // A CUDA target's copies (device memory from the host's allocator), else null.
  DLDevice device{kDLCPU, 0};
  int8_t* q_dev = nullptr;
  float* scales_dev = nullptr;
};

namespace loomp::int8q {
namespace {

constexpr const char* kMetadata = R"({"format":"loom-int8","bits":8,"scheme":"per-channel-symmetric"})";

struct Int8 {
  const loom_host_api* host;
  loom_host_ctx* ctx;
#if LOOM_INT8_CUDA
  TiledResources tiled{&tiled_create, &tiled_destroy};  // the prefill path, from the first GPU weight
#endif
  Int8(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {}
};

void check_target(DLDevice d) { check_target_device(d, LOOM_INT8_CUDA != 0, "int8"); }

// Frees a weight's device copies (through the host that allocated them).
void free_device(const Int8& self, loom_qweight& w) { free_device_copies(self.host, self.ctx, w.device, w.q_dev, w.scales_dev); }

// Copies the codes and scales to the target device, when it is a GPU. The host copies stay for
// export_weight and dequantize.
void place(Int8& self, loom_qweight& w, DLDevice target) {
  if (target.device_type != kDLCUDA) return;
#if LOOM_INT8_CUDA
  if (w.in % kCodesPerPiece != 0)
    unsupported("int8: on CUDA, in_features must be a multiple of 16, got " + std::to_string(w.in));
  w.device = target;
  self.tiled.ensure(self.host, self.ctx, target);
  try {
    w.q_dev = static_cast<int8_t*>(upload(self.host, self.ctx, target, w.q.data(), w.q.size(), "int8", "codes"));
    w.scales_dev = static_cast<float*>(
        upload(self.host, self.ctx, target, w.scales.data(), w.scales.size() * sizeof(float), "int8", "scales"));
  } catch (...) {
    free_device(self, w);
    throw;
  }
#else
  (void)self;
  (void)w;
#endif
}

std::unique_ptr<loom_qweight> quantize(const loom_quantize_request& r) {
  check_target(r.target_device);
  const DLTensor* w = r.weight;
  if (w == nullptr) invalid("int8: weight is NULL");
  if (w->dtype.code == kDLBfloat || (w->dtype.code == kDLFloat && w->dtype.bits == 16))
    unsupported("int8: bf16/fp16 weights are not supported yet; pass float32");
  check_f32(w, "weight", {-1, -1});
  auto qw = std::make_unique<loom_qweight>();
  qw->out = w->shape[0];
  qw->in = w->shape[1];
  qw->q.resize(static_cast<size_t>(qw->out * qw->in));
  qw->scales.resize(static_cast<size_t>(qw->out));
  const float* src = data_of<float>(*w);
  for (int64_t o = 0; o < qw->out; ++o) {
    const float* row = src + o * qw->in;
    float amax = 0.0f;
    for (int64_t i = 0; i < qw->in; ++i) {
      if (!std::isfinite(row[i])) invalid("int8: weight row " + std::to_string(o) + " holds a non-finite value");
      amax = std::max(amax, std::fabs(row[i]));
    }
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    qw->scales[o] = scale;
    for (int64_t i = 0; i < qw->in; ++i) {
      const float v = std::nearbyint(row[i] / scale);
      qw->q[o * qw->in + i] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  }
  return qw;
}

#if LOOM_INT8_CUDA
// The product on the weight's GPU (plain, or fused when `fusion` is not NULL).
void linear_cuda(const Int8& self, const loom_qweight& w, const DLTensor* x, const DLTensor* bias,
                 const loom_linear_fusion* fusion, DLTensor* y) {
  qgemv::Args a = io_args("int8", w.device, w.out, w.in, x, bias, fusion, y);
  if (fusion != nullptr && a.tokens > fused_max_rows(fusion, w.out, static_cast<int>(w.in / kCodesPerPiece), kCodesPerPiece))
    unsupported("int8: this fusion takes at most max_rows rows");
  a.codes = w.q_dev;
  a.row_pieces = static_cast<int>(w.in / kCodesPerPiece);
  a.scales = w.scales_dev;
  DeviceGuard guard(w.device.device_id, "int8");
  check_cuda(static_cast<cudaError_t>(w8a16_cuda(a, self.tiled.for_device(w.device), self.host->current_stream(self.ctx, w.device))),
             "int8", "W8A16 product");
}
#endif

// y[n, out] = x[n, in] @ W~^T (+ bias): the int8 row is dequantized on the fly, the dot
// product accumulates in float and the channel scale is applied once per output.
void linear(const loom_qweight& w, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
  check_f32(x, "x", {-1, w.in});
  const int64_t n = x->shape[0];
  check_f32(y, "y", {n, w.out});
  if (bias != nullptr) check_f32(bias, "bias", {w.out});
  const float* xs = data_of<float>(*x);
  const float* bs = bias ? data_of<float>(*bias) : nullptr;
  float* ys = data_of<float>(*y);
  // Each code row is widened to float32 once and dotted with every input row; eight partial
  // sums, which the compiler keeps in vector lanes (it may not reassociate one float sum).
  std::vector<float> row(static_cast<size_t>(w.in));
  for (int64_t o = 0; o < w.out; ++o) {
    const int8_t* q = w.q.data() + o * w.in;
    for (int64_t i = 0; i < w.in; ++i) row[static_cast<size_t>(i)] = static_cast<float>(q[i]);
    for (int64_t r = 0; r < n; ++r) {
      const float* xr = xs + r * w.in;
      float acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= w.in; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += xr[i + k] * row[static_cast<size_t>(i + k)];
      for (; i < w.in; ++i) acc[0] += xr[i] * row[static_cast<size_t>(i)];
      const float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      ys[r * w.out + o] = sum * w.scales[o] + (bs ? bs[o] : 0.0f);
    }
  }
}

void dequantize(const loom_qweight& w, DLTensor* out) {
  if (out != nullptr && !is_f32(out->dtype) && out->dtype.code == kDLFloat)
    unsupported("int8: dequantize writes float32 only");
  check_f32(out, "out", {w.out, w.in});
  float* o = data_of<float>(*out);
  for (int64_t r = 0; r < w.out; ++r)
    for (int64_t i = 0; i < w.in; ++i) o[r * w.in + i] = static_cast<float>(w.q[r * w.in + i]) * w.scales[r];
}

void export_weight(const Int8& self, const loom_qweight& w, const loom_tensor_sink* sink, loom_buffer* meta) {
  // The sink only reads; const_cast is needed because DLTensor.data is non-const.
  OwnedView qv(const_cast<int8_t*>(w.q.data()), kI8, {w.out, w.in});
  OwnedView sv(const_cast<float*>(w.scales.data()), kF32, {w.out});
  put_tensor(sink, "int8", "qweight", &qv.t);
  put_tensor(sink, "int8", "scales", &sv.t);
  append_metadata(self.host, meta, kMetadata, "int8");
}

std::unique_ptr<loom_qweight> import_weight(const loom_named_tensor* ts, uint32_t count, const char* meta_json,
                                            DLDevice target) {
  check_target(target);
  const nlohmann::json meta = parse_quant_metadata(meta_json, "loom-int8", "int8");
  if (meta.contains("bits") && meta["bits"] != 8) invalid("int8: metadata bits must be 8");
  if (meta.contains("scheme") && meta["scheme"] != "per-channel-symmetric")
    invalid("int8: unknown scheme (expected per-channel-symmetric)");

  const DLTensor* q = find_named_tensor(ts, count, "qweight", "int8");
  const DLTensor* sc = find_named_tensor(ts, count, "scales", "int8");
  if (q->ndim != 2) invalid("int8: tensor 'qweight' must be 2-D [out, in], got " + std::to_string(q->ndim) + "-D");
  if (!is_dtype(q->dtype, kDLInt, 8)) invalid("int8: tensor 'qweight' must have dtype int8");
  check_cpu_tensor(q, "qweight", kDLInt, 8, {-1, -1});
  if (!is_f32(sc->dtype)) invalid("int8: tensor 'scales' must have dtype float32");
  if (sc->ndim != 1 || sc->shape[0] != q->shape[0])
    invalid("int8: tensor 'scales' must have shape [" + std::to_string(q->shape[0]) + "] (qweight rows), got " +
            shape_str(*sc));
  check_f32(sc, "scales", {q->shape[0]});
  auto w = std::make_unique<loom_qweight>();
  w->out = q->shape[0];
  w->in = q->shape[1];
  const int8_t* qs = data_of<int8_t>(*q);
  w->q.assign(qs, qs + w->out * w->in);
  for (int8_t v : w->q)
    if (v == -128) invalid("int8: tensor 'qweight' holds -128, outside the symmetric range [-127, 127]");
  const float* ss = data_of<float>(*sc);
  w->scales.assign(ss, ss + w->out);
  for (float s : w->scales)
    if (!(s > 0.0f) || !std::isfinite(s)) invalid("int8: tensor 'scales' holds a non-positive or non-finite scale");
  return w;
}

// ---- ABI glue ----
struct Traits {
  using Instance = Int8;
  static constexpr const char* kName = "int8";
  static std::unique_ptr<loom_qweight> quantize(Int8&, const loom_quantize_request& r) { return int8q::quantize(r); }
  static std::unique_ptr<loom_qweight> import_weight(Int8&, const loom_named_tensor* ts, uint32_t count, const char* meta,
                                                     DLDevice target) {
    return int8q::import_weight(ts, count, meta, target);
  }
  static void place(Int8& self, loom_qweight& w, DLDevice target) { int8q::place(self, w, target); }
  static void linear(Int8& self, const loom_qweight& w, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
#if LOOM_INT8_CUDA
    if (w.device.device_type == kDLCUDA) return linear_cuda(self, w, x, bias, nullptr, y);
#else
    (void)self;
#endif
    int8q::linear(w, x, bias, y);
  }
  static void dequantize(Int8&, const loom_qweight& w, DLTensor* out) { int8q::dequantize(w, out); }
  static void export_weight(Int8& self, const loom_qweight& w, const loom_tensor_sink* sink, loom_buffer* meta) {
    int8q::export_weight(self, w, sink, meta);
  }
  static void free_device(Int8& self, loom_qweight& w) { int8q::free_device(self, w); }
#if LOOM_INT8_CUDA
  struct Fused {
    using Instance = Int8;
    static constexpr const char* kName = "int8";
    static constexpr int kPer = kCodesPerPiece;
    static bool on_gpu(const loom_qweight& w) { return w.device.device_type == kDLCUDA; }
    static int64_t out(const loom_qweight& w) { return w.out; }
    static int64_t in(const loom_qweight& w) { return w.in; }
    static void linear(Int8& self, const loom_qweight& w, const DLTensor* x, const loom_linear_fusion* f, DLTensor* y) {
      linear_cuda(self, w, x, nullptr, f, y);
    }
  };
  static const void* extension(void* inst, const char* id) { return FusedExtension<Fused>::get(inst, id); }
#else
  static const void* extension(void*, const char*) { return nullptr; }
#endif
};

constexpr loom_component_desc kInt8 = {
    sizeof(loom_component_desc), LOOM_KIND_QUANTIZER, "int8", "1.0.0",
    "Per-output-channel symmetric int8 weights, dequantized on the fly (CPU; W8A16 kernel on CUDA)",
    nullptr, 0, LOOM_THREADING_SERIAL, &QuantizerGlue<Traits>::kVtable};
const loom_component_desc* const kComponents[] = {&kInt8};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-quant-int8", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::int8q

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::int8q::kPlugin; }
