// Quantizer component `fp8`: FP8 E4M3 weights and activations (W8A8).
//   weights:     scale = amax / 448 per output channel (`weight_scale = "per-channel"`) or for the
//                whole matrix ("per-tensor"), an all-zero row or matrix gets scale 1;
//                code = E4M3(W / scale), round to nearest even (loom_e4m3.hpp)
//   activations: quantized at every product the same way, with a dynamic scale per token
//                (`activation_scale = "per-token"`) or one for the whole input ("per-tensor")
//   y[r, o] = (sum_i x~[r, i] w~[o, i]) * x_scale[r] * w_scale[o] (+ bias[o])
// On CUDA (compute capability 8.9 or newer) the product is cuBLASLt's E4M3 GEMM (fp8_cuda.cu);
// the CPU path decodes both operands and accumulates in float32, so the two compute the same
// quantized product and differ by summation order only.
// Export layout: "qweight" uint8 [out, in] (E4M3 bit patterns), "scales" float32 [out]
// (per-channel) or [1] (per-tensor), metadata
// {"format":"loom-fp8","bits":8,"encoding":"e4m3fn","scheme":"per-channel"|"per-tensor"}.
#ifndef LOOM_FP8_CUDA
#define LOOM_FP8_CUDA 0  // the CUDA path is built only with nvcc (CMakeLists.txt)
#endif
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/loom_plugin_api.h"
#include "loom_e4m3.hpp"
#include "loom_plugin_util.hpp"
#include "loom_quant_util.hpp"
#include "loom_quantizer_glue.hpp"
#if LOOM_FP8_CUDA
#include "fp8_cuda.hpp"
#include "loom_cuda_guard.hpp"
#include "loom_quant_cuda.hpp"
#endif

struct loom_qweight {
  int64_t out = 0, in = 0;
  bool per_tensor = false;    // one weight scale (scales has one entry)
  std::vector<uint8_t> q;     // [out, in] E4M3 codes
  std::vector<float> scales;  // [out], or [1] when per_tensor
  // A CUDA target's copies (device memory from the host's allocator), else null.
  DLDevice device{kDLCPU, 0};
  uint8_t* q_dev = nullptr;
  float* scales_dev = nullptr;  // [out] always (a per-tensor scale repeated)
};

namespace loomp::fp8q {
namespace {

constexpr DLDataType kU8{kDLUInt, 8, 1};

// The activation rule the CUDA kernel also follows: scale = amax / 448 (1 when amax is 0), NaNs
// ignored by the maximum (fmax).
float scale_for(float amax) { return amax > 0.0f ? amax / e4m3::kMax : 1.0f; }
float abs_max(const float* v, int64_t count) {
  float m = 0.0f;
  for (int64_t i = 0; i < count; ++i) m = std::fmax(m, std::fabs(v[i]));
  return m;
}

// The 256 codes' values (NaN codes decode to NaN; import refuses them in weights).
const std::array<float, 256>& decode_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[static_cast<size_t>(c)] = e4m3::decode(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}

#if LOOM_FP8_CUDA
// cuBLASLt and the activation scratch of one instance on one GPU, made at its first GPU weight
// (at load, never during a graph capture) and freed with the instance.
class GpuResources {
 public:
  ~GpuResources() { release(); }
  void ensure(const loom_host_api* host, loom_host_ctx* ctx, DLDevice device) {
    if (gemm_ != nullptr) {
      if (device.device_id != device_.device_id)
        unsupported("fp8: one instance places weights on one GPU (cuda:" + std::to_string(device_.device_id) + ")");
      return;
    }
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.device_id), "fp8",
               "compute capability");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.device_id), "fp8",
               "compute capability");
    if (major * 10 + minor < 89)
      unsupported("fp8: E4M3 products need a GPU of compute capability 8.9 or newer (Ada, Hopper); cuda:" +
                  std::to_string(device.device_id) + " is " + std::to_string(major) + "." + std::to_string(minor));
    host_ = host;
    ctx_ = ctx;
    device_ = device;
    if (host->device_alloc(ctx, device, kWorkspaceBytes, 256, &workspace_) != LOOM_OK ||
        host->device_alloc(ctx, device, kScratchBytes, 256, &scratch_) != LOOM_OK) {
      release();
      fail(LOOM_ERR_OUT_OF_MEMORY, "fp8: cannot allocate cuBLASLt's workspace and the activation scratch (48 MiB)");
    }
    std::string why;
    DeviceGuard guard(device.device_id, "fp8");
    gemm_ = gemm_create(workspace_, scratch_, why);
    if (gemm_ == nullptr) {
      release();
      fail(LOOM_ERR_DEVICE, "fp8: " + why);
    }
  }
  Gemm& gemm() { return *gemm_; }

 private:
  void release() {
    gemm_destroy(gemm_);
    gemm_ = nullptr;
    if (workspace_) host_->device_free(ctx_, device_, workspace_);
    if (scratch_) host_->device_free(ctx_, device_, scratch_);
    workspace_ = scratch_ = nullptr;
  }
  const loom_host_api* host_ = nullptr;
  loom_host_ctx* ctx_ = nullptr;
  DLDevice device_{kDLCPU, 0};
  void* workspace_ = nullptr;
  void* scratch_ = nullptr;
  Gemm* gemm_ = nullptr;
};
#endif

struct Fp8 {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  bool weight_per_tensor = false;
  bool act_per_tensor = false;
#if LOOM_FP8_CUDA
  GpuResources gpu;
#endif
  Fp8(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    const std::string w = cfg_string(h, c, "weight_scale");
    if (w != "per-channel" && w != "per-tensor")
      invalid_param("weight_scale", "weight_scale must be \"per-channel\" or \"per-tensor\", got \"" + w + "\"");
    weight_per_tensor = w == "per-tensor";
    const std::string a = cfg_string(h, c, "activation_scale");
    if (a != "per-token" && a != "per-tensor")
      invalid_param("activation_scale", "activation_scale must be \"per-token\" or \"per-tensor\", got \"" + a + "\"");
    act_per_tensor = a == "per-tensor";
  }
};

void check_target(DLDevice d) { check_target_device(d, LOOM_FP8_CUDA != 0, "fp8"); }

// Frees a weight's device copies (through the host that allocated them).
void free_device(const Fp8& self, loom_qweight& w) { free_device_copies(self.host, self.ctx, w.device, w.q_dev, w.scales_dev); }

// Copies the codes and the scales (one per output row) to the target GPU. The host copies stay
// for export_weight and dequantize.
void place(Fp8& self, loom_qweight& w, DLDevice target) {
  if (target.device_type != kDLCUDA) return;
#if LOOM_FP8_CUDA
  if (w.in % 16 != 0 || w.out % 16 != 0)
    unsupported("fp8: on CUDA, in_features and out_features must be multiples of 16 (cuBLASLt's E4M3 layouts), got [" +
                std::to_string(w.out) + ", " + std::to_string(w.in) + "]");
  self.gpu.ensure(self.host, self.ctx, target);
  w.device = target;
  const std::vector<float> row_scales =
      w.per_tensor ? std::vector<float>(static_cast<size_t>(w.out), w.scales[0]) : w.scales;
  try {
    w.q_dev = static_cast<uint8_t*>(upload(self.host, self.ctx, target, w.q.data(), w.q.size(), "fp8", "codes"));
    w.scales_dev = static_cast<float*>(
        upload(self.host, self.ctx, target, row_scales.data(), row_scales.size() * sizeof(float), "fp8", "scales"));
  } catch (...) {
    free_device(self, w);
    throw;
  }
#else
  (void)self;
  (void)w;
#endif
}

std::unique_ptr<loom_qweight> quantize(const Fp8& self, const loom_quantize_request& r) {
  check_target(r.target_device);
  const DLTensor* w = r.weight;
  if (w == nullptr) invalid("fp8: weight is NULL");
  if (w->dtype.code == kDLBfloat || (w->dtype.code == kDLFloat && w->dtype.bits == 16))
    unsupported("fp8: bf16/fp16 weights are not supported yet; pass float32");
  check_f32(w, "weight", {-1, -1});
  auto qw = std::make_unique<loom_qweight>();
  qw->out = w->shape[0];
  qw->in = w->shape[1];
  qw->per_tensor = self.weight_per_tensor;
  const float* src = data_of<float>(*w);
  const int64_t count = qw->out * qw->in;
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(src[i]))
      invalid("fp8: weight row " + std::to_string(i / std::max<int64_t>(qw->in, 1)) + " holds a non-finite value");
  if (qw->per_tensor) {
    qw->scales.assign(1, scale_for(abs_max(src, count)));
  } else {
    qw->scales.resize(static_cast<size_t>(qw->out));
    for (int64_t o = 0; o < qw->out; ++o) qw->scales[static_cast<size_t>(o)] = scale_for(abs_max(src + o * qw->in, qw->in));
  }
  qw->q.resize(static_cast<size_t>(count));
  for (int64_t o = 0; o < qw->out; ++o) {
    const float s = qw->scales[qw->per_tensor ? 0 : static_cast<size_t>(o)];
    for (int64_t i = 0; i < qw->in; ++i) qw->q[static_cast<size_t>(o * qw->in + i)] = e4m3::encode_bits(src[o * qw->in + i] / s);
  }
  return qw;
}

float weight_scale(const loom_qweight& w, int64_t o) { return w.scales[w.per_tensor ? 0 : static_cast<size_t>(o)]; }

#if LOOM_FP8_CUDA
void linear_cuda(Fp8& self, const loom_qweight& w, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
  check_float_tensor(x, "fp8", "x", w.device, {-1, w.in}, true);
  const int64_t n = x->shape[0];
  check_float_tensor(y, "fp8", "y", w.device, {n, w.out}, true);
  if (bias != nullptr) check_float_tensor(bias, "fp8", "bias", w.device, {w.out}, false);
  if (n > INT32_MAX) invalid("fp8: too many rows for one product");
  LinearArgs a;
  a.w_codes = w.q_dev;
  a.w_scales = w.scales_dev;
  a.w_per_tensor = w.per_tensor;
  a.out = static_cast<int>(w.out);
  a.in = static_cast<int>(w.in);
  a.x = tensor_data(x);
  a.x_bf16 = is_bf16(x->dtype);
  a.act_per_tensor = self.act_per_tensor;
  a.tokens = static_cast<int>(n);
  a.y = const_cast<char*>(tensor_data(y));
  a.y_bf16 = is_bf16(y->dtype);
  a.bias = bias != nullptr ? reinterpret_cast<const float*>(tensor_data(bias)) : nullptr;
  DeviceGuard guard(w.device.device_id, "fp8");
  std::string why;
  if (!linear(self.gpu.gemm(), a, self.host->current_stream(self.ctx, w.device), why)) fail(LOOM_ERR_DEVICE, "fp8: " + why);
}
#endif

// The CPU product: each input row quantized as the GPU quantizes it, both operands decoded, the
// dot product accumulated in float32 (eight partial sums, kept in vector lanes), scaled once.
void linear_cpu(const Fp8& self, const loom_qweight& w, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
  check_f32(x, "x", {-1, w.in});
  const int64_t n = x->shape[0];
  check_f32(y, "y", {n, w.out});
  if (bias != nullptr) check_f32(bias, "bias", {w.out});
  const float* xs = data_of<float>(*x);
  const float* bs = bias ? data_of<float>(*bias) : nullptr;
  float* ys = data_of<float>(*y);
  const auto& table = decode_table();
  // The inputs, quantized and decoded, and their scales.
  std::vector<float> xq(static_cast<size_t>(n * w.in)), x_scales(static_cast<size_t>(n));
  const float tensor_scale = self.act_per_tensor ? scale_for(abs_max(xs, n * w.in)) : 0.0f;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = xs + r * w.in;
    const float s = self.act_per_tensor ? tensor_scale : scale_for(abs_max(row, w.in));
    x_scales[static_cast<size_t>(r)] = s;
    for (int64_t i = 0; i < w.in; ++i) xq[static_cast<size_t>(r * w.in + i)] = table[e4m3::encode_bits(row[i] / s)];
  }
  std::vector<float> wrow(static_cast<size_t>(w.in));
  for (int64_t o = 0; o < w.out; ++o) {
    const uint8_t* q = w.q.data() + o * w.in;
    for (int64_t i = 0; i < w.in; ++i) wrow[static_cast<size_t>(i)] = table[q[i]];
    const float ws = weight_scale(w, o);
    for (int64_t r = 0; r < n; ++r) {
      const float* xr = xq.data() + r * w.in;
      float acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= w.in; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += xr[i + k] * wrow[static_cast<size_t>(i + k)];
      for (; i < w.in; ++i) acc[0] += xr[i] * wrow[static_cast<size_t>(i)];
      const float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      ys[r * w.out + o] = sum * (ws * x_scales[static_cast<size_t>(r)]) + (bs ? bs[o] : 0.0f);
    }
  }
}

void dequantize(const loom_qweight& w, DLTensor* out) {
  if (out != nullptr && !is_f32(out->dtype) && out->dtype.code == kDLFloat) unsupported("fp8: dequantize writes float32 only");
  check_f32(out, "out", {w.out, w.in});
  float* o = data_of<float>(*out);
  const auto& table = decode_table();
  for (int64_t r = 0; r < w.out; ++r)
    for (int64_t i = 0; i < w.in; ++i) o[r * w.in + i] = table[w.q[static_cast<size_t>(r * w.in + i)]] * weight_scale(w, r);
}

std::string metadata(const loom_qweight& w) {
  return std::string(R"({"format":"loom-fp8","bits":8,"encoding":"e4m3fn","scheme":")") +
         (w.per_tensor ? "per-tensor" : "per-channel") + "\"}";
}

void export_weight(const Fp8& self, const loom_qweight& w, const loom_tensor_sink* sink, loom_buffer* meta) {
  // The sink only reads; const_cast is needed because DLTensor.data is non-const.
  OwnedView qv(const_cast<uint8_t*>(w.q.data()), kU8, {w.out, w.in});
  OwnedView sv(const_cast<float*>(w.scales.data()), kF32, {static_cast<int64_t>(w.scales.size())});
  put_tensor(sink, "fp8", "qweight", &qv.t);
  put_tensor(sink, "fp8", "scales", &sv.t);
  append_metadata(self.host, meta, metadata(w), "fp8");
}

std::unique_ptr<loom_qweight> import_weight(const loom_named_tensor* ts, uint32_t count, const char* meta_json,
                                            DLDevice target) {
  check_target(target);
  const nlohmann::json meta = parse_quant_metadata(meta_json, "loom-fp8", "fp8");
  if (meta.contains("bits") && meta["bits"] != 8) invalid("fp8: metadata bits must be 8");
  if (meta.contains("encoding") && meta["encoding"] != "e4m3fn") invalid("fp8: metadata encoding must be \"e4m3fn\"");
  if (!meta.contains("scheme") || !meta["scheme"].is_string() ||
      (meta["scheme"] != "per-channel" && meta["scheme"] != "per-tensor"))
    invalid("fp8: metadata scheme must be \"per-channel\" or \"per-tensor\"");
  auto w = std::make_unique<loom_qweight>();
  w->per_tensor = meta["scheme"] == "per-tensor";

  const DLTensor* q = find_named_tensor(ts, count, "qweight", "fp8");
  const DLTensor* sc = find_named_tensor(ts, count, "scales", "fp8");
  if (q->ndim != 2) invalid("fp8: tensor 'qweight' must be 2-D [out, in], got " + std::to_string(q->ndim) + "-D");
  if (!is_dtype(q->dtype, kDLUInt, 8)) invalid("fp8: tensor 'qweight' must have dtype uint8 (E4M3 bit patterns)");
  check_cpu_tensor(q, "qweight", kDLUInt, 8, {-1, -1});
  const int64_t want = w->per_tensor ? 1 : q->shape[0];
  if (!is_f32(sc->dtype)) invalid("fp8: tensor 'scales' must have dtype float32");
  if (sc->ndim != 1 || sc->shape[0] != want)
    invalid("fp8: tensor 'scales' must have shape [" + std::to_string(want) + "] (" +
            (w->per_tensor ? "per-tensor" : "qweight rows") + "), got " + shape_str(*sc));
  check_f32(sc, "scales", {want});
  w->out = q->shape[0];
  w->in = q->shape[1];
  const uint8_t* qs = data_of<uint8_t>(*q);
  w->q.assign(qs, qs + w->out * w->in);
  for (size_t i = 0; i < w->q.size(); ++i)
    if ((w->q[i] & 0x7F) == 0x7F)
      invalid("fp8: tensor 'qweight' holds a NaN code at row " + std::to_string(static_cast<int64_t>(i) / std::max<int64_t>(w->in, 1)));
  const float* ss = data_of<float>(*sc);
  w->scales.assign(ss, ss + want);
  for (float s : w->scales)
    if (!(s > 0.0f) || !std::isfinite(s)) invalid("fp8: tensor 'scales' holds a non-positive or non-finite scale");
  return w;
}

// ---- ABI glue ----
struct Traits {
  using Instance = Fp8;
  static constexpr const char* kName = "fp8";
  static std::unique_ptr<loom_qweight> quantize(Fp8& self, const loom_quantize_request& r) { return fp8q::quantize(self, r); }
  static std::unique_ptr<loom_qweight> import_weight(Fp8&, const loom_named_tensor* ts, uint32_t count, const char* meta,
                                                     DLDevice target) {
    return fp8q::import_weight(ts, count, meta, target);
  }
  static void place(Fp8& self, loom_qweight& w, DLDevice target) { fp8q::place(self, w, target); }
  static void linear(Fp8& self, const loom_qweight& w, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
#if LOOM_FP8_CUDA
    if (w.device.device_type == kDLCUDA) return linear_cuda(self, w, x, bias, y);
#endif
    linear_cpu(self, w, x, bias, y);
  }
  static void dequantize(Fp8&, const loom_qweight& w, DLTensor* out) { fp8q::dequantize(w, out); }
  static void export_weight(Fp8& self, const loom_qweight& w, const loom_tensor_sink* sink, loom_buffer* meta) {
    fp8q::export_weight(self, w, sink, meta);
  }
  static void free_device(Fp8& self, loom_qweight& w) { fp8q::free_device(self, w); }
  static const void* extension(void*, const char*) { return nullptr; }
};

constexpr loom_param_desc param(const char* key, loom_value_type type, const char* def, const char* description) {
  return loom_param_desc{sizeof(loom_param_desc), key, type, 0, def, description};
}
constexpr loom_param_desc kParams[] = {
    param("weight_scale", LOOM_VALUE_STRING, "\"per-channel\"", "\"per-channel\" (one scale per output row) or \"per-tensor\""),
    param("activation_scale", LOOM_VALUE_STRING, "\"per-token\"",
          "dynamic activation scales: \"per-token\" (one per input row) or \"per-tensor\" (one per product)"),
};
constexpr loom_component_desc kFp8 = {
    sizeof(loom_component_desc), LOOM_KIND_QUANTIZER, "fp8", "1.0.0",
    "FP8 E4M3 weights and activations with per-channel/per-tensor scales (cuBLASLt on CUDA 8.9+; the CPU decodes)",
    kParams, 2, LOOM_THREADING_SERIAL, &QuantizerGlue<Traits>::kVtable};
const loom_component_desc* const kComponents[] = {&kFp8};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-quant-fp8", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::fp8q

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::fp8q::kPlugin; }
