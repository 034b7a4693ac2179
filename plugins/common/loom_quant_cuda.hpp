// Host-side helpers for a quantizer's CUDA path, shared by the builtin quantizers (header-only,
// plugin-api only; compiled without nvcc): placing host arrays in device memory through the
// host's allocator, and turning the DLTensors of `linear` / `linear_fused` into the launch
// arguments of loom_quant_gemv.cuh, with the checks that name the offending tensor.
// Thread-safety: stateless; the host API's own rules apply to the calls made through it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "loom_device_tensor.hpp"
#include "loom_plugin_util.hpp"
#include "loom_quant_gemv_args.hpp"

namespace loomp {

// Device memory from the host's allocator holding a copy of `bytes` host bytes; the copy is done
// when it returns (it waits for the device). Throws with `component: what` on failure, freeing
// what it allocated.
inline void* upload(const loom_host_api* host, loom_host_ctx* ctx, DLDevice device, const void* src, size_t bytes,
                    const std::string& component, const std::string& what) {
  void* dst = nullptr;
  if (host->device_alloc(ctx, device, bytes, 256, &dst) != LOOM_OK)
    fail(LOOM_ERR_OUT_OF_MEMORY, component + ": cannot allocate the device " + what);
  const DLDevice cpu{kDLCPU, 0};
  if (host->memcpy(ctx, dst, device, src, cpu, bytes) != LOOM_OK || host->stream_synchronize(ctx, device) != LOOM_OK) {
    host->device_free(ctx, device, dst);
    fail(LOOM_ERR_DEVICE, component + ": cannot copy the " + what + " to the device");
  }
  return dst;
}

// A float32 (or, where allowed, bfloat16) tensor on `device`, checked by check_device_tensor,
// with the message prefixed by the component.
inline void check_float_tensor(const DLTensor* t, const std::string& component, const char* name, DLDevice device,
                               const std::vector<int64_t>& shape, bool allow_bf16) {
  const DLDataType want = allow_bf16 && t != nullptr && is_bf16(t->dtype) ? kBF16 : kF32;
  check_device_tensor(t, (component + ": " + name).c_str(), device, want, shape);
}

inline const char* tensor_data(const DLTensor* t) { return static_cast<const char*>(t->data) + t->byte_offset; }

// The input/output half of the launch arguments for a weight [out, in] on `device`; fusion may
// be NULL (plain `linear`: x activation, y stored, optional bias).
inline qgemv::Args io_args(const std::string& component, DLDevice device, int64_t out, int64_t in, const DLTensor* x,
                           const DLTensor* bias, const loom_linear_fusion* fusion, DLTensor* y) {
  qgemv::Args a;
  if (fusion != nullptr && !LOOM_HAS_FIELD(fusion, loom_linear_fusion, act_dtype))
    invalid(component + ": fusion struct_size too small");
  a.input = fusion ? static_cast<int>(fusion->input) : qgemv::input_act;
  a.output = fusion ? static_cast<int>(fusion->output) : qgemv::output_store;
  if (a.input != qgemv::input_act && a.input != qgemv::input_rms_norm)
    unsupported(component + ": unknown fusion input " + std::to_string(a.input));
  if (a.output != qgemv::output_store && a.output != qgemv::output_add && a.output != qgemv::output_swiglu &&
      a.output != qgemv::output_rope_qkv)
    unsupported(component + ": unknown fusion output " + std::to_string(a.output));
  check_float_tensor(x, component, "x", device, {-1, in}, a.input == qgemv::input_act);
  const int64_t n = x->shape[0];
  if (a.output == qgemv::output_swiglu && out % 2 != 0)
    invalid(component + ": SwiGLU needs an even number of output features, got " + std::to_string(out));
  if (a.output == qgemv::output_rope_qkv) {
    if (!LOOM_HAS_FIELD(fusion, loom_linear_fusion, rope_v)) invalid(component + ": fusion struct_size too small for RoPE");
    const int64_t heads = fusion->rope_heads, kv = fusion->rope_kv_heads, D = fusion->rope_head_dim;
    if (heads < 1 || kv < 0 || D < 2 || D % 2 != 0 || (heads + 2 * kv) * D != out)
      invalid(component + ": RoPE heads (" + std::to_string(heads) + " + 2 x " + std::to_string(kv) + ") x head_dim " +
              std::to_string(D) + " must be the " + std::to_string(out) + " output features, head_dim even");
    const DLDataType act = is_bf16(fusion->act_dtype) ? kBF16 : kF32;
    check_device_tensor(fusion->rope_q, (component + ": rope_q").c_str(), device, act, {n, heads, D});
    if (kv > 0) {
      check_device_tensor(fusion->rope_k, (component + ": rope_k").c_str(), device, act, {n, kv, D});
      check_device_tensor(fusion->rope_v, (component + ": rope_v").c_str(), device, act, {n, kv, D});
    }
    check_device_tensor(fusion->rope_cos_sin, (component + ": rope_cos_sin").c_str(), device, kF32, {-1, D / 2, 2});
    check_device_tensor(fusion->rope_positions, (component + ": rope_positions").c_str(), device, kI32, {n});
    a.cos_sin = reinterpret_cast<const float*>(tensor_data(fusion->rope_cos_sin));
    a.positions = reinterpret_cast<const int32_t*>(tensor_data(fusion->rope_positions));
    a.heads = static_cast<int>(heads);
    a.kv_heads = static_cast<int>(kv);
    a.head_dim = static_cast<int>(D);
    a.q = const_cast<char*>(tensor_data(fusion->rope_q));
    a.k = kv > 0 ? const_cast<char*>(tensor_data(fusion->rope_k)) : nullptr;
    a.v = kv > 0 ? const_cast<char*>(tensor_data(fusion->rope_v)) : nullptr;
  } else {
    const int64_t y_cols = a.output == qgemv::output_swiglu ? out / 2 : out;
    check_float_tensor(y, component, "y", device, {n, y_cols}, a.output != qgemv::output_add);
  }
  if (a.input == qgemv::input_rms_norm) {
    check_float_tensor(fusion->norm_weight, component, "norm_weight", device, {in}, false);
    a.norm_w = reinterpret_cast<const float*>(tensor_data(fusion->norm_weight));
    a.eps = fusion->norm_eps;
  }
  if (fusion != nullptr && !is_f32(fusion->act_dtype) && !is_bf16(fusion->act_dtype))
    invalid(component + ": fusion act_dtype must be float32 or bfloat16");
  if (fusion != nullptr && a.input == qgemv::input_act && !same_dtype(fusion->act_dtype, x->dtype))
    invalid(component + ": fusion act_dtype must be x's dtype");
  if (bias != nullptr) {
    check_float_tensor(bias, component, "bias", device, {out}, false);
    a.bias = reinterpret_cast<const float*>(tensor_data(bias));
  }
  if (out > INT32_MAX || in > INT32_MAX || n > INT32_MAX) invalid(component + ": tensor too large for the CUDA kernel");
  a.x = tensor_data(x);
  a.x_bf16 = is_bf16(x->dtype);
  a.stage_f32 = fusion != nullptr ? is_f32(fusion->act_dtype) : !a.x_bf16;
  if (a.output == qgemv::output_rope_qkv) {
    a.y_bf16 = is_bf16(fusion->act_dtype);
  } else {
    a.y = const_cast<char*>(tensor_data(y));
    a.y_bf16 = is_bf16(y->dtype);
  }
  a.tokens = static_cast<int>(n);
  a.out = static_cast<int>(out);
  a.in = static_cast<int>(in);
  return a;
}

// loom_quantizer_fused.max_rows for a GPU weight of `row_pieces` pieces of `per` codes: every
// fusion of ABI 1.5 (RoPE when its heads make up the output), up to what one launch stages.
inline int32_t fused_max_rows(const loom_linear_fusion* fusion, int64_t out, int row_pieces, int per) {
  if (fusion == nullptr || !LOOM_HAS_FIELD(fusion, loom_linear_fusion, act_dtype)) return 0;
  if (fusion->input > LOOM_LINEAR_INPUT_RMS_NORM || fusion->output > LOOM_LINEAR_OUTPUT_ROPE_QKV) return 0;
  if (fusion->output == LOOM_LINEAR_OUTPUT_SWIGLU && out % 2 != 0) return 0;
  if (fusion->output == LOOM_LINEAR_OUTPUT_ROPE_QKV &&
      (!LOOM_HAS_FIELD(fusion, loom_linear_fusion, rope_v) || fusion->rope_head_dim < 2 || fusion->rope_head_dim % 2 != 0 || fusion->rope_heads < 1 ||
       fusion->rope_kv_heads < 0 ||
       (static_cast<int64_t>(fusion->rope_heads) + 2 * fusion->rope_kv_heads) * fusion->rope_head_dim != out))
    return 0;
  if (!is_f32(fusion->act_dtype) && !is_bf16(fusion->act_dtype)) return 0;
  return qgemv::max_tokens(row_pieces, per, is_f32(fusion->act_dtype));
}

// The loom.quantizer.fused/1 table of a quantizer, from its traits Q: Q::kName ("int8"),
// Q::kPer (codes per piece), Q::Instance (with `host` and `ctx`), and static functions
// on_gpu(w), out(w), in(w) and linear(Instance&, w, x, fusion, y) (its CUDA product).
template <class Q>
struct FusedExtension {
  static int32_t max_rows(void*, const loom_qweight* w, const loom_linear_fusion* fusion) {
    if (w == nullptr || !Q::on_gpu(*w)) return 0;
    return fused_max_rows(fusion, Q::out(*w), static_cast<int>(Q::in(*w) / Q::kPer), Q::kPer);
  }
  static loom_status linear_fused(void* inst, const loom_qweight* w, const DLTensor* x, const loom_linear_fusion* fusion,
                                  DLTensor* y) {
    auto& self = *static_cast<typename Q::Instance*>(inst);
    return guard(self.host, self.ctx, [&] {
      const std::string name = Q::kName;
      if (w == nullptr || fusion == nullptr) invalid(name + ": weight and fusion must not be NULL");
      if (!Q::on_gpu(*w)) unsupported(name + ": fused products run on CUDA weights only");
      Q::linear(self, *w, x, fusion, y);
    });
  }
  static constexpr loom_quantizer_fused kTable = {sizeof(loom_quantizer_fused), &max_rows, &linear_fused};
  // life.get_extension
  static const void* get(void*, const char* id) {
    return id != nullptr && std::string_view(id) == LOOM_QUANTIZER_FUSED_EXTENSION ? &kTable : nullptr;
  }
};

// The prefill path's resources of one quantizer instance (qgemv::Tiled: a cuBLAS handle, its
// workspace and the dequantization scratch), made at the instance's first GPU weight (at load,
// never during a graph capture) and freed with the instance. `create`/`destroy` are the plugin's
// wrappers of qgemv::tiled_create/tiled_destroy (compiled by nvcc). Thread-safety: none; the
// builtin quantizers are LOOM_THREADING_SERIAL.
class TiledResources {
 public:
  using Create = int (*)(qgemv::Tiled&, void* workspace);
  using Destroy = void (*)(qgemv::Tiled&);
  TiledResources(Create create, Destroy destroy) : create_(create), destroy_(destroy) {}
  ~TiledResources() { release(); }
  TiledResources(const TiledResources&) = delete;
  TiledResources& operator=(const TiledResources&) = delete;

  // Sets up on `device` once; a failure leaves the prefill path off (the GEMV serves every size)
  // and is not an error.
  void ensure(const loom_host_api* host, loom_host_ctx* ctx, DLDevice device) {
    if (tried_) return;
    tried_ = true;
    host_ = host;
    ctx_ = ctx;
    device_ = device;
    if (host->device_alloc(ctx, device, static_cast<size_t>(qgemv::kTiledScratchBytes), 256, &scratch_) != LOOM_OK ||
        host->device_alloc(ctx, device, static_cast<size_t>(qgemv::kTiledWorkspaceBytes), 256, &workspace_) != LOOM_OK ||
        create_(tiled_, workspace_) != 0) {
      release();
      return;
    }
    tiled_.scratch = scratch_;
    tiled_.scratch_bytes = qgemv::kTiledScratchBytes;
  }
  // The resources for a weight on `device` (empty, so the GEMV runs, on another device).
  qgemv::Tiled for_device(DLDevice device) const {
    if (device.device_type != device_.device_type || device.device_id != device_.device_id) return {};
    return tiled_;
  }

 private:
  void release() {
    destroy_(tiled_);
    tiled_ = {};
    if (scratch_) host_->device_free(ctx_, device_, scratch_);
    if (workspace_) host_->device_free(ctx_, device_, workspace_);
    scratch_ = workspace_ = nullptr;
  }
  Create create_;
  Destroy destroy_;
  bool tried_ = false;
  const loom_host_api* host_ = nullptr;
  loom_host_ctx* ctx_ = nullptr;
  DLDevice device_{kDLCPU, 0};
  void* scratch_ = nullptr;
  void* workspace_ = nullptr;
  qgemv::Tiled tiled_;
};

}  // namespace loomp
