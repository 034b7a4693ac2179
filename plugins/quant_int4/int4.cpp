// Quantizer component `int4`: group-wise 4-bit weights (W4A16: on the CPU codes unpacked and
// multiplied in float32; on CUDA int4_cuda.cu's kernel, with the fusions of
// loom.quantizer.fused/1), by round-to-nearest or by AWQ's activation-aware scale search over
// the calibration activations the host passes (int4_math.hpp has the arithmetic). A CUDA weight
// keeps its host copy for export_weight and dequantize.
//
// Export layout (one weight): "qweight" uint8 [out, in/2] (two codes a byte, low nibble first),
// "scales" float32 [out, in/group], "zeros" uint8 [out, in/group], and for AWQ "act_scale"
// float32 [in] (absent when its search chose no scaling); metadata {"format":"loom-int4",
// "bits":4,"group_size":G,"zero_point":bool,"method":"rtn"|"awq","act_scale":bool}. Import also
// reads AutoAWQ-GEMM and GPTQ linears (int4_hf_layouts.hpp); such a weight exports in this layout
// with "method" naming where it came from ("autoawq-gemm" or "gptq").
#ifndef LOOM_INT4_CUDA
#define LOOM_INT4_CUDA 0  // the CUDA path is built only with nvcc (CMakeLists.txt)
#endif
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "int4_hf_layouts.hpp"
#include "int4_math.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "loom_quant_util.hpp"
#include "loom_quantizer_glue.hpp"
#if LOOM_INT4_CUDA
#include "int4_cuda.hpp"
#include "loom_cuda_guard.hpp"
#include "loom_quant_cuda.hpp"
#endif

struct loom_qweight {
  loomp::int4q::Int4Weight w;
  std::string method;  // "rtn" or "awq"
  // A CUDA target's copies (device memory from the host's allocator), else null.
  DLDevice device{kDLCPU, 0};
  void* codes_dev = nullptr;
  void* scales_dev = nullptr;
  void* zeros_dev = nullptr;
  void* act_scale_dev = nullptr;
};

namespace loomp::int4q {
namespace {

constexpr DLDataType kU8{kDLUInt, 8, 1};

struct Int4 {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int64_t group = 128;
  std::string method = "rtn";
  bool zero_point = true;
  int64_t awq_grid = 20, awq_rows = 256, awq_clip = 10;
#if LOOM_INT4_CUDA
  TiledResources tiled{&tiled_create, &tiled_destroy};  // the prefill path, from the first GPU weight
#endif

  Int4(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    group = cfg_int(h, c, "group_size");
    if (group < 2 || group % 2 != 0 || group > 65536)
      invalid_param("group_size", "group_size must be an even number in [2, 65536], got " + std::to_string(group));
    method = cfg_string(h, c, "method");
    if (method != "rtn" && method != "awq")
      invalid_param("method", "method must be \"rtn\" (round to nearest) or \"awq\", got \"" + method + "\"");
    zero_point = cfg_bool(h, c, "zero_point");
    awq_grid = cfg_int(h, c, "awq_grid");
    if (awq_grid < 1 || awq_grid > 1000) invalid_param("awq_grid", "awq_grid must be in [1, 1000]");
    awq_rows = cfg_int(h, c, "awq_rows");
    if (awq_rows < 1) invalid_param("awq_rows", "awq_rows must be at least 1");
    awq_clip = cfg_int(h, c, "awq_clip");
    if (awq_clip < 0 || awq_clip > 100) invalid_param("awq_clip", "awq_clip must be in [0, 100]");
  }

  void log(const std::string& line) const {
    if (host->log) host->log(ctx, LOOM_LOG_DEBUG, line.c_str());
  }
};

void check_target(DLDevice d) { check_target_device(d, LOOM_INT4_CUDA != 0, "int4"); }

void free_device(const Int4& self, loom_qweight& q) {
  free_device_copies(self.host, self.ctx, q.device, q.codes_dev, q.scales_dev, q.zeros_dev, q.act_scale_dev);
}

// Copies codes, scales, zeros and AWQ scales to the target device, when it is a GPU.
void place(Int4& self, loom_qweight& q, DLDevice target) {
  if (target.device_type != kDLCUDA) return;
#if LOOM_INT4_CUDA
  const Int4Weight& w = q.w;
  if (w.in % kCodesPerPiece != 0 || w.group % kCodesPerPiece != 0)
    unsupported("int4: on CUDA, in_features and group_size must be multiples of 32, got " + std::to_string(w.in) +
                " and " + std::to_string(w.group));
  q.device = target;
  self.tiled.ensure(self.host, self.ctx, target);
  try {
    q.codes_dev = upload(self.host, self.ctx, target, w.packed.data(), w.packed.size(), "int4", "codes");
    q.scales_dev = upload(self.host, self.ctx, target, w.scales.data(), w.scales.size() * sizeof(float), "int4", "scales");
    q.zeros_dev = upload(self.host, self.ctx, target, w.zeros.data(), w.zeros.size(), "int4", "zero points");
    if (!w.act_scale.empty())
      q.act_scale_dev =
          upload(self.host, self.ctx, target, w.act_scale.data(), w.act_scale.size() * sizeof(float), "int4", "AWQ scales");
  } catch (...) {
    free_device(self, q);
    throw;
  }
#else
  (void)self;
  (void)q;
#endif
}

#if LOOM_INT4_CUDA
// The product on the weight's GPU (plain, or fused when `fusion` is not NULL).
void linear_cuda(const Int4& self, const loom_qweight& q, const DLTensor* x, const DLTensor* bias,
                 const loom_linear_fusion* fusion, DLTensor* y) {
  const Int4Weight& w = q.w;
  qgemv::Args a = io_args("int4", q.device, w.out, w.in, x, bias, fusion, y);
  const int pieces = static_cast<int>(w.in / kCodesPerPiece);
  if (fusion != nullptr && a.tokens > fused_max_rows(fusion, w.out, pieces, kCodesPerPiece))
    unsupported("int4: this fusion takes at most max_rows rows");
  a.codes = q.codes_dev;
  a.row_pieces = pieces;
  a.scales = static_cast<const float*>(q.scales_dev);
  a.zeros = static_cast<const uint8_t*>(q.zeros_dev);
  a.groups = static_cast<int>(w.groups());
  a.group_pieces = static_cast<int>(w.group / kCodesPerPiece);
  a.act_scale = static_cast<const float*>(q.act_scale_dev);
  DeviceGuard guard(q.device.device_id, "int4");
  check_cuda(static_cast<cudaError_t>(w4a16_cuda(a, self.tiled.for_device(q.device), self.host->current_stream(self.ctx, q.device))),
             "int4", "W4A16 product");
}
#endif

std::unique_ptr<loom_qweight> quantize_request(const Int4& self, const loom_quantize_request& r) {
  check_target(r.target_device);
  const std::string module = r.module_name ? r.module_name : "?";
  const DLTensor* w = r.weight;
  if (w == nullptr) invalid("int4: " + module + ": weight is NULL");
  if (!is_f32(w->dtype)) unsupported("int4: " + module + ": weights must come as float32");
  check_f32(w, "weight", {-1, -1});
  const int64_t out = w->shape[0], in = w->shape[1];
  if (in % self.group != 0)
    invalid("int4: " + module + ": group_size " + std::to_string(self.group) + " does not divide in_features " +
            std::to_string(in) + " (choose a group_size that divides every layer's input width)");
  const float* src = data_of<float>(*w);
  for (int64_t e = 0; e < out * in; ++e)
    if (!std::isfinite(src[e])) invalid("int4: " + module + ": weight row " + std::to_string(e / in) + " holds a non-finite value");
  auto q = std::make_unique<loom_qweight>();
  q->method = self.method;
  if (self.method == "rtn") {
    q->w = int4q::quantize(src, out, in, self.group, self.zero_point, nullptr);
    return q;
  }
  const DLTensor* x = r.calibration;  // struct_size covers it (checked up to target_device)
  if (x == nullptr || x->ndim != 2 || x->shape[0] < 1)
    invalid("int4: " + module + ": method \"awq\" needs calibration activations (set model.calibration in the manifest)");
  check_f32(x, "calibration", {-1, in});
  const AwqChoice c = awq_search(src, out, in, self.group, self.zero_point, data_of<float>(*x), x->shape[0],
                                 static_cast<int>(self.awq_grid), self.awq_rows);
  const float* scale = c.alpha > 0 ? c.scale.data() : nullptr;
  std::vector<float> clip;
  if (self.awq_clip > 0)
    clip = clip_search(src, out, in, self.group, self.zero_point, scale, data_of<float>(*x), x->shape[0],
                       static_cast<int>(self.awq_clip));
  int64_t clipped = 0;
  for (float v : clip) clipped += v > 0.0f;
  char line[256];
  std::snprintf(line, sizeof line,
                "%s: awq alpha %.2f (calibration output error %.4g of round-to-nearest's), %lld of %zu groups clipped",
                module.c_str(), c.alpha, c.rtn_error > 0 ? c.error / c.rtn_error : 1.0, static_cast<long long>(clipped),
                clip.size());
  self.log(line);
  q->w = int4q::quantize(src, out, in, self.group, self.zero_point, scale, clip.empty() ? nullptr : clip.data());
  return q;
}

void linear_fn_impl(const loom_qweight& q, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
  check_f32(x, "x", {-1, q.w.in});
  const int64_t n = x->shape[0];
  check_f32(y, "y", {n, q.w.out});
  if (bias != nullptr) check_f32(bias, "bias", {q.w.out});
  linear(q.w, data_of<float>(*x), n, bias ? data_of<float>(*bias) : nullptr, data_of<float>(*y));
}

void dequantize(const loom_qweight& q, DLTensor* out) {
  if (out != nullptr && !is_f32(out->dtype)) unsupported("int4: dequantize writes float32 only");
  check_f32(out, "out", {q.w.out, q.w.in});
  float* o = data_of<float>(*out);
  for (int64_t r = 0; r < q.w.out; ++r) dequantize_row(q.w, r, o + r * q.w.in);
}

std::string metadata_of(const loom_qweight& q) {
  return nlohmann::json{{"format", "loom-int4"},       {"bits", 4},         {"group_size", q.w.group},
                        {"zero_point", q.w.zero_point}, {"method", q.method}, {"act_scale", !q.w.act_scale.empty()}}
      .dump();
}

void export_weight(const Int4& self, const loom_qweight& q, const loom_tensor_sink* sink, loom_buffer* meta) {
  const Int4Weight& w = q.w;
  // The sink only reads; const_cast because DLTensor.data is non-const.
  OwnedView qv(const_cast<uint8_t*>(w.packed.data()), kU8, {w.out, w.in / 2});
  OwnedView sv(const_cast<float*>(w.scales.data()), kF32, {w.out, w.groups()});
  OwnedView zv(const_cast<uint8_t*>(w.zeros.data()), kU8, {w.out, w.groups()});
  OwnedView av(const_cast<float*>(w.act_scale.data()), kF32, {w.in});
  put_tensor(sink, "int4", "qweight", &qv.t);
  put_tensor(sink, "int4", "scales", &sv.t);
  put_tensor(sink, "int4", "zeros", &zv.t);
  if (!w.act_scale.empty()) put_tensor(sink, "int4", "act_scale", &av.t);
  append_metadata(self.host, meta, metadata_of(q), "int4");
}

std::unique_ptr<loom_qweight> import_weight(const loom_named_tensor* ts, uint32_t count, const char* meta_json,
                                            DLDevice target) {
  check_target(target);
  const nlohmann::json meta = parse_quant_metadata(meta_json, "int4");
  if (is_hf_layout(meta)) { // a Hugging Face checkpoint's layout (AutoAWQ, GPTQ): its codes as they are
    auto q = std::make_unique<loom_qweight>();
    q->method = meta["format"].get<std::string>();
    q->w = import_hf_layout(ts, count, meta);
    return q;
  }
  check_quant_format(meta, "loom-int4", "int4");
  if (!meta.contains("bits") || meta["bits"] != 4) invalid("int4: metadata \"bits\" must be 4");
  if (!meta.contains("group_size") || !meta["group_size"].is_number_integer())
    invalid("int4: metadata has no integer \"group_size\"");
  const int64_t group = meta["group_size"].get<int64_t>();
  auto typed = [&](const char* key, bool (nlohmann::json::*is)() const noexcept, const char* what) {
    if (meta.contains(key) && !(meta[key].*is)()) invalid(std::string("int4: metadata \"") + key + "\" must be " + what);
  };
  typed("zero_point", &nlohmann::json::is_boolean, "true or false");
  typed("act_scale", &nlohmann::json::is_boolean, "true or false");
  typed("method", &nlohmann::json::is_string, "a string");
  const bool zero_point = meta.value("zero_point", true);
  const std::string method = meta.value("method", std::string("rtn"));
  if (method != "rtn" && method != "awq" && method != "autoawq-gemm" && method != "gptq")
    invalid("int4: metadata \"method\" must be \"rtn\", \"awq\", \"autoawq-gemm\" or \"gptq\"");

  const DLTensor* qt = find_named_tensor(ts, count, "qweight", "int4");
  const DLTensor* st = find_named_tensor(ts, count, "scales", "int4");
  const DLTensor* zt = find_named_tensor(ts, count, "zeros", "int4");
  const DLTensor* at = find_named_tensor(ts, count, "act_scale", "int4", /*optional=*/true);
  if (qt->ndim != 2) invalid("int4: tensor 'qweight' must be 2-D [out, in/2], got " + std::to_string(qt->ndim) + "-D");
  check_cpu_tensor(qt, "qweight", kDLUInt, 8, {-1, -1});
  const int64_t out = qt->shape[0], in = qt->shape[1] * 2;
  if (group < 2 || group % 2 != 0 || in % group != 0)
    invalid("int4: group_size " + std::to_string(group) + " does not divide in_features " + std::to_string(in) +
            " (from 'qweight' " + shape_str(*qt) + ") into even groups");
  const int64_t G = in / group;
  if (st->ndim != 2 || st->shape[0] != out || st->shape[1] != G || !is_f32(st->dtype))
    invalid("int4: tensor 'scales' must be float32 of shape [" + std::to_string(out) + ", " + std::to_string(G) +
            "] (qweight rows, in_features / group_size), got " + shape_str(*st));
  check_f32(st, "scales", {out, G});
  if (zt->ndim != 2 || zt->shape[0] != out || zt->shape[1] != G)
    invalid("int4: tensor 'zeros' must have shape [" + std::to_string(out) + ", " + std::to_string(G) + "], got " +
            shape_str(*zt));
  check_cpu_tensor(zt, "zeros", kDLUInt, 8, {out, G});
  // AWQ keeps act_scale unless its search settled on no scaling (alpha 0); metadata says which.
  const bool scaled = meta.value("act_scale", false);
  if (scaled && method != "awq") invalid("int4: metadata \"act_scale\" is true, but \"method\" is not \"awq\"");
  if (scaled != (at != nullptr))
    invalid(scaled ? "int4: metadata \"act_scale\" is true, but tensor 'act_scale' is missing"
                   : "int4: tensor 'act_scale' given, but metadata \"act_scale\" is not true");
  if (at) {
    if (at->ndim != 1 || at->shape[0] != in || !is_f32(at->dtype))
      invalid("int4: tensor 'act_scale' must be float32 of shape [" + std::to_string(in) + "], got " + shape_str(*at));
    check_f32(at, "act_scale", {in});
  }
  auto q = std::make_unique<loom_qweight>();
  q->method = method;
  Int4Weight& w = q->w;
  w.out = out;
  w.in = in;
  w.group = group;
  w.zero_point = zero_point;
  const auto* qs = data_of<uint8_t>(*qt);
  w.packed.assign(qs, qs + out * in / 2);
  const float* ss = data_of<float>(*st);
  w.scales.assign(ss, ss + out * G);
  for (float s : w.scales)
    if (!(s > 0.0f) || !std::isfinite(s)) invalid("int4: tensor 'scales' holds a non-positive or non-finite scale");
  const auto* zs = data_of<uint8_t>(*zt);
  w.zeros.assign(zs, zs + out * G);
  for (uint8_t z : w.zeros)
    if (z > 15) invalid("int4: tensor 'zeros' holds " + std::to_string(z) + ", outside the code range [0, 15]");
  if (at) {
    const float* as = data_of<float>(*at);
    w.act_scale.assign(as, as + in);
    for (float a : w.act_scale)
      if (!(a > 0.0f) || !std::isfinite(a)) invalid("int4: tensor 'act_scale' holds a non-positive or non-finite scale");
  }
  return q;
}

// ---- ABI glue ----
struct Traits {
  using Instance = Int4;
  static constexpr const char* kName = "int4";
  static std::unique_ptr<loom_qweight> quantize(Int4& self, const loom_quantize_request& r) { return quantize_request(self, r); }
  static std::unique_ptr<loom_qweight> import_weight(Int4&, const loom_named_tensor* ts, uint32_t count, const char* meta,
                                                     DLDevice target) {
    return int4q::import_weight(ts, count, meta, target);
  }
  static void place(Int4& self, loom_qweight& q, DLDevice target) { int4q::place(self, q, target); }
  static void linear(Int4& self, const loom_qweight& q, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
#if LOOM_INT4_CUDA
    if (q.device.device_type == kDLCUDA) return linear_cuda(self, q, x, bias, nullptr, y);
#else
    (void)self;
#endif
    linear_fn_impl(q, x, bias, y);
  }
  static void dequantize(Int4&, const loom_qweight& q, DLTensor* out) { int4q::dequantize(q, out); }
  static void export_weight(Int4& self, const loom_qweight& q, const loom_tensor_sink* sink, loom_buffer* meta) {
    int4q::export_weight(self, q, sink, meta);
  }
  static void free_device(Int4& self, loom_qweight& q) { int4q::free_device(self, q); }
#if LOOM_INT4_CUDA
  struct Fused {
    using Instance = Int4;
    static constexpr const char* kName = "int4";
    static constexpr int kPer = kCodesPerPiece;
    static bool on_gpu(const loom_qweight& q) { return q.device.device_type == kDLCUDA; }
    static int64_t out(const loom_qweight& q) { return q.w.out; }
    static int64_t in(const loom_qweight& q) { return q.w.in; }
    static void linear(Int4& self, const loom_qweight& q, const DLTensor* x, const loom_linear_fusion* f, DLTensor* y) {
      linear_cuda(self, q, x, nullptr, f, y);
    }
  };
  static const void* extension(void* inst, const char* id) { return FusedExtension<Fused>::get(inst, id); }
#else
  static const void* extension(void*, const char*) { return nullptr; }
#endif
};

constexpr loom_param_desc param(const char* key, loom_value_type type, const char* def, const char* description) {
  return loom_param_desc{sizeof(loom_param_desc), key, type, 0, def, description};
}
constexpr loom_param_desc kParams[] = {
    param("group_size", LOOM_VALUE_INT, "128", "inputs per group (even, dividing every layer's input width)"),
    param("method", LOOM_VALUE_STRING, "\"rtn\"",
          "\"rtn\": round to nearest; \"awq\": activation-aware scale search (needs model.calibration)"),
    param("zero_point", LOOM_VALUE_BOOL, "true", "asymmetric groups with a zero point (false: symmetric)"),
    param("awq_grid", LOOM_VALUE_INT, "20", "AWQ: alpha values tried, 0 to (grid - 1) / grid"),
    param("awq_rows", LOOM_VALUE_INT, "256", "AWQ: output rows the search measures its error on, per layer"),
    param("awq_clip", LOOM_VALUE_INT, "10",
          "AWQ: range limits tried per group, max|w| down to half of it (0: no clip search)"),
};
constexpr loom_component_desc kInt4 = {
    sizeof(loom_component_desc), LOOM_KIND_QUANTIZER, "int4", "1.0.0",
    "Group-wise 4-bit weights, round-to-nearest or AWQ scale search (CPU; W4A16 kernel on CUDA)",
    kParams, 6, LOOM_THREADING_SERIAL, &QuantizerGlue<Traits>::kVtable};
const loom_component_desc* const kComponents[] = {&kInt4};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-quant-int4", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::int4q

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::int4q::kPlugin; }
