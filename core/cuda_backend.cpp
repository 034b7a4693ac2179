#include "cuda_backend.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/reference_model.hpp"
#include "loom/kernels/gemv.hpp"
#include "loom/kernels/model.hpp"
#include "loom/kernels/rows.hpp"
#include "loom/kernels/skinny_gemm.hpp"
#include "loom/loom_plugin_api.h"
#include "cuda_adapters.hpp"
#include "tensor_shards.hpp"
#include "transformer_ops.hpp"

namespace loom {
namespace {

void cuda_check(cudaError_t e, const std::string &what) {
  if (e != cudaSuccess) throw runtime_error("CUDA backend: " + what + ": " + cudaGetErrorString(e));
}
void kernel_check(int e, const char *what) { cuda_check(static_cast<cudaError_t>(e), what); }
void cublas_check(cublasStatus_t s, const char *what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw runtime_error(std::string("CUDA backend: ") + what + ": " + cublasGetStatusString(s));
}

// Device memory owned by one object; moved, never copied.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    cuda_check(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes");
  }
  DeviceBuffer(DeviceBuffer &&o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer &operator=(DeviceBuffer &&o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }
  template <class T = void> T *get() const { return static_cast<T *>(ptr_); }
  size_t bytes() const { return bytes_; }
  explicit operator bool() const { return ptr_ != nullptr; }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
  }
  void *ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory, so that the per-step upload of token ids and positions is a true
// asynchronous copy.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes) { cuda_check(cudaMallocHost(&ptr_, bytes == 0 ? 1 : bytes), "cudaMallocHost"); }
  PinnedBuffer(PinnedBuffer &&o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  PinnedBuffer &operator=(PinnedBuffer &&o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFreeHost(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
    }
    return *this;
  }
  ~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  template <class T> T *get() const { return static_cast<T *>(ptr_); }

 private:
  void *ptr_ = nullptr;
};

// A linear's weight [out, in] in the compute dtype and its optional float32 bias [out].
// A quantizer's weight, freed through the instance that made it (so a load that fails part-way
// frees what it made by unwinding).
struct QWeightFree {
  std::shared_ptr<Instance> quantizer;
  void operator()(loom_qweight *w) const {
    quantizer->vtable<loom_quantizer_vtable>()->free_weight(quantizer->handle(), w);
  }
};

struct DeviceLinear {
  DeviceBuffer weight, bias;
  int64_t out = 0, in = 0;
  // The quantizer's weight instead of `weight`, when there is one.
  std::unique_ptr<loom_qweight, QWeightFree> qweight;
  // Instead of either: the linears whose rows make up this one, in order, when a `loom quantize`
  // checkpoint stores them quantized one by one (q, k and v; gate and up): each is multiplied on
  // its own and its columns copied into the product.
  std::vector<DeviceLinear> parts;
};

struct DeviceLayer {
  DeviceLinear qkv, o, gate_up, down; // gate_up: [2I, H] for gated MLPs, else GPT-2's c_fc [I, H]
  DeviceBuffer norm1_w, norm1_b, norm2_w, norm2_b; // float32; the _b ones for LayerNorm only
};

// A development switch: NAME=0 in the environment turns a fast path off (to compare with it).
bool env_off(const char *name) {
  const char *v = std::getenv(name);
  return v != nullptr && std::string(v) == "0";
}

// A DLTensor view of device memory whose shape array lives with it.
struct DeviceView {
  DLTensor dl{};
  int64_t shape[3]{};
  DLTensor *set(void *data, DLDevice device, DLDataType dtype, std::initializer_list<int64_t> dims) {
    int i = 0;
    for (int64_t d : dims) shape[i++] = d;
    dl.data = data;
    dl.device = device;
    dl.ndim = i;
    dl.dtype = dtype;
    dl.shape = shape;
    dl.strides = nullptr;
    dl.byte_offset = 0;
    return &dl;
  }
};

// A development tool: with LOOM_CUDA_OP_TIMES=1 in the environment, the backend records a CUDA
// event after every operation of a forward pass (the events are captured into the decode
// graphs too, so graph replays are timed as they run), waits for each step, and prints the GPU
// time per operation, summed over the run, to stderr when it is destroyed. Launch gaps count
// towards the operation that follows them. Off by default: it synchronises every step.
class OpTimes {
 public:
  OpTimes() {
    const char *env = std::getenv("LOOM_CUDA_OP_TIMES");
    enabled_ = env && std::string(env) == "1";
  }
  ~OpTimes() {
    report();
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  bool enabled() const { return enabled_; }
  // Starts a forward pass of `kind` ("decode" or "prefill").
  void begin(const char *kind, cudaStream_t stream) {
    if (!enabled_) return;
    kind_ = kind;
    names_.clear();
    mark("start", stream);
  }
  void mark(const char *name, cudaStream_t stream) {
    if (!enabled_) return;
    if (names_.size() == events_.size()) {
      cudaEvent_t e = nullptr;
      cuda_check(cudaEventCreate(&e), "cudaEventCreate");
      events_.push_back(e);
    }
    // External: inside a stream capture the record becomes a node of the graph, replayed with it.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    cuda_check(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing");
    cuda_check(cudaEventRecordWithFlags(events_[names_.size()], stream,
                                        capturing == cudaStreamCaptureStatusActive ? cudaEventRecordExternal
                                                                                   : cudaEventRecordDefault),
               "cudaEventRecord");
    names_.push_back(name);
  }
  // After the pass was launched: waits for it and adds its times.
  void end(cudaStream_t stream) {
    if (!enabled_ || names_.empty()) return;
    cuda_check(cudaStreamSynchronize(stream), "op timing");
    for (size_t i = 1; i < names_.size(); ++i) {
      float ms = 0;
      cuda_check(cudaEventElapsedTime(&ms, events_[i - 1], events_[i]), "cudaEventElapsedTime");
      totals_[kind_ + " " + names_[i]] += ms;
    }
    steps_[kind_] += 1;
  }
  // A graph replays the events recorded while it was captured: the same names, in order.
  const std::vector<std::string> &names() const { return names_; }
  void replayed(const char *kind, std::vector<std::string> names) {
    kind_ = kind;
    names_ = std::move(names);
  }

 private:
  void report() const {
    if (!enabled_ || totals_.empty()) return;
    std::vector<std::pair<double, std::string>> rows;
    for (const auto &[name, ms] : totals_) rows.emplace_back(ms, name);
    std::sort(rows.rbegin(), rows.rend());
    std::cerr << "LOOM_CUDA_OP_TIMES: GPU time per operation, summed (ms), and per step (us)\n";
    for (const auto &[ms, name] : rows) {
      const std::string kind = name.substr(0, name.find(' '));
      const double per_step = ms * 1000.0 / static_cast<double>(steps_.at(kind));
      std::cerr << "  " << name << ": " << ms << " ms, " << per_step << " us/step over " << steps_.at(kind) << " steps\n";
    }
  }
  bool enabled_ = false;
  std::string kind_;
  std::vector<cudaEvent_t> events_;
  std::vector<std::string> names_;
  std::map<std::string, double> totals_;
  std::map<std::string, int64_t> steps_;
};

class CudaBackend final : public ModelBackend {
 public:
  CudaBackend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline, const CudaBackendOptions &options);
  ~CudaBackend() override;
  void reserve(int32_t max_seqs, int64_t max_positions) override;
  DLTensor *forward(const StepBatch &batch) override;
  std::vector<float> embed(const StepBatch &batch, bool mean_pool) override;
  int32_t *token_feed(int32_t seqs) override;
  void copy_slot(int32_t src_slot, int32_t dst_slot, int64_t positions) override;
  BlockPool reserve_blocks(int32_t max_seqs, int64_t max_positions, int64_t n_blocks, uint64_t kv_bytes) override;
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>> &src_dst) override;
  DLDevice device() const override { return options_.device; }
  bool runs_adapters() const override { return true; }
  bool one_adapter_per_row() const override { return true; }
  void merge_adapter(const Instance &adapter) override {
    throw runtime_error("merge " + adapter.slot() + ": the CUDA backend applies adapters per row (gathered), not merged");
  }
  void unmerge_adapter(const Instance &adapter) override { merge_adapter(adapter); }
  std::string describe() const override {
    return "cuda:" + std::to_string(options_.device.device_id) + " " + (bf16() ? "bfloat16" : "float32") +
           (graphs_enabled_ ? " (CUDA graphs)" : "") +
           (tensor_ ? ", tensor parallel rank " + std::to_string(tensor_->rank()) + " of " + std::to_string(tensor_->size()) : "");
  }

 private:
  bool bf16() const { return options_.dtype == ComputeDtype::bfloat16; }
  kernels::Dtype kdtype() const { return bf16() ? kernels::Dtype::bf16 : kernels::Dtype::f32; }
  size_t act_bytes() const { return bf16() ? 2 : 4; }
  DLDataType act_dl() const { return bf16() ? DLDataType{kDLBfloat, 16, 1} : DLDataType{kDLFloat, 32, 1}; }
  cudaDataType act_cuda() const { return bf16() ? CUDA_R_16BF : CUDA_R_32F; }

  DeviceBuffer upload_matrix(const std::vector<float> &values);
  DeviceBuffer upload_f32(const std::vector<float> &values);
  // A linear's weight in the compute dtype, or, with a quantizer, as the quantizer places it on
  // the GPU (module: the name it sees; q/k/v and gate/up are one fused module each here).
  DeviceLinear upload_linear(const std::string &module, const std::vector<float> &w, int64_t out, int64_t in,
                             const std::vector<float> &bias);
  // y = x W^T through the quantizer: written as y_type (beta 0) or added into float32 y (beta 1).
  void quantized_gemm(const DeviceLinear &w, const void *x, int32_t tokens, void *y, cudaDataType y_type, float beta);
  // The quantizer's fused product (loom.quantizer.fused/1) of w, when it offers input/output for
  // w at T rows and w has no bias: runs it and returns true; else false and nothing ran.
  bool fused_gemm(const DeviceLinear &w, const void *x, int32_t T, loom_linear_input input, loom_linear_output output,
                  const DeviceBuffer *norm_w, void *y, DLDataType y_type);
  void mlp_up(DeviceLayer &layer, int32_t T);
  // [PEFT] adapters through their gathered extension (cuda_adapters.hpp); null without adapters
  // (and then nothing changes). With a site anywhere, steps take the unfused paths.
  std::unique_ptr<CudaAdapters> adapters_;
  int32_t *d_row_adapter_ = nullptr; // [T] in the step metadata: each row's group entry (-1: none)
  bool adapters_on() const { return adapters_ && adapters_->on(); }
  // Some row of the step in flight runs with an adapter: then the unfused paths and the
  // adapters' launches; else the step is the base model's, fast paths and all (its decode graph
  // is a graph of its own).
  bool step_adapters_ = false;
  void install_adapter_hooks();
  // Everything that holds the groups' device memory is done, then `change` runs and the groups
  // are made again for the current capacity (graphs captured them: they go).
  void change_adapters(const std::function<void()> &change);
  void adapt(int32_t layer, CudaAdapters::Module m, const void *x, void *y, DLDataType y_type, int64_t y_stride,
             int64_t col0, int32_t T) {
    if (step_adapters_) adapters_->apply(layer, m, x, act_dl(), y, y_type, y_stride, col0, T, d_row_adapter_);
  }
  std::shared_ptr<Instance> quantizer_;   // the pipeline's quantizer, when it has one
  const TensorShards *tensor_ = nullptr;  // tensor parallel: options_.tensor when its group has several ranks
  // Tensor parallel: a row-parallel product adds its partial sum into the residual stream x
  // scaled by 1 / the group's size (cuBLAS's beta, the GEMV's resid_scale: exact for powers of
  // two, no kernel of its own), and the group's x is summed after it: the residual once, every
  // rank's partial sum once. (Adapters and quantizers, whose products add unscaled, are refused
  // under tensor parallelism.)
  float residual_keep() const { return tensor_ ? 1.0f / static_cast<float>(tensor_->size()) : 1.0f; }
  void after_row_parallel(float *x, int64_t count) {
    if (tensor_) tensor_->all_reduce_device(x, static_cast<size_t>(count), options_.device);
  }
  const loom_quantizer_fused *quant_fused_ = nullptr; // its fused products, when it offers them
  DeviceBuffer quant_out_;                // float32 [T, hidden]: products added into the residual
  DeviceBuffer part_out_;                 // float32 [T, part_cols_]: one part's product (DeviceLinear::parts)
  int64_t part_cols_ = 0;                 // the widest part; 0: no linear has parts
  void ensure_capacity(int32_t tokens, int32_t seqs);
  // Grows both halves of the step metadata to `entries` int32s each, keeping the first `keep`
  // of half `keep_half` (a fed step's tokens).
  void grow_meta(size_t entries, size_t keep, int keep_half);
  size_t meta_entries(int32_t tokens, int32_t seqs) const {
    return (adapters_on() ? 3 : 2) * static_cast<size_t>(tokens) + (static_cast<size_t>(seqs) + 1) +
           2 * static_cast<size_t>(seqs) + static_cast<size_t>(seqs) * static_cast<size_t>(blocks_per_seq_);
  }
  loom_kv_layout prepare_attention(Instance &attention) const;
  // Sizes the KV cache: slot mode (max_seqs slots of max_positions), or paged mode (a pool of
  // n_blocks blocks, or as many as kv_bytes holds when n_blocks is 0; kv_bytes 0: 85% of the
  // free memory, less 1 GiB for activations).
  void size_cache(int32_t max_seqs, int64_t max_positions, bool paged, int64_t n_blocks, uint64_t kv_bytes);
  void install_hook();
  // y[T, out] = x[T, in] W^T (+ beta * y), float32 accumulation.
  void gemm(const DeviceLinear &w, const void *x, int32_t tokens, void *y, cudaDataType y_type, float beta);
  // Split-K products for steps of a few dozen tokens, whose q/k/v, o and down outputs have too
  // few tiles to fill the GPU: the product is computed in parts along its inputs (one strided
  // batched cuBLAS call, float32 parts) and the kernel that reads it next sums the parts (the
  // RoPE split, the next norm), instead of cuBLAS's own split-K adding its parts in a kernel of
  // its own and the norm reading the residual after it. split_for gives the number of parts
  // for a linear at `tokens` tokens (0: the plain gemm); LOOM_CUDA_SPLIT_K=0 turns it off,
  // LOOM_CUDA_SPLIT_K=Q,O,D forces the counts for q/k/v, o and down (for comparisons).
  enum SplitSite { split_qkv, split_o, split_down };
  int split_for(const DeviceLinear &w, int32_t tokens, SplitSite site) const;
  kernels::SplitParts gemm_split(const DeviceLinear &w, const void *x, int32_t tokens, int parts);
  // kSplitRuleParts: the most parts split_for's rule gives; forced counts go up to kSplitMaxParts.
  static constexpr int32_t kSplitMaxTokens = 256, kSplitRuleParts = 4, kSplitMaxParts = 8;
  bool split_k_ = false;
  int split_buffer_parts_ = kSplitRuleParts; // the most parts a product may take (or a larger forced count)
  int split_forced_[3] = {-1, -1, -1};
  int sm_count_ = 0;
  DeviceBuffer split_parts_; // float32 [split_buffer_parts_, min(T, kSplitMaxTokens), the widest output]
  // The whole model over the uploaded batch; `attention` is the pipeline's attention instance.
  void run_model(Instance &attention, int32_t tokens, int32_t seqs);
  struct AttentionCall;
  void attend(Instance &attention, AttentionCall &call, int32_t tokens, int32_t seqs, int32_t layer);
  // embed: the first GEMV also looks up the embeddings (no embed kernel ran).
  void run_layers_gemv(Instance &attention, AttentionCall &call, int32_t tokens, bool embed);
  void invalidate_graphs();

  ModelConfig config_;
  Pipeline &pipeline_;
  CudaBackendOptions options_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer cublas_workspace_;

  // Weights.
  DeviceBuffer embedding_, positions_; // [vocab, H], GPT-2's [max_positions, H]; compute dtype
  DeviceBuffer final_w_, final_b_;
  std::vector<DeviceLayer> layers_;
  DeviceLinear lm_head_; // its weight is empty when tied (the embedding is used)
  const void *lm_head_weight_ = nullptr;
  std::vector<double> inv_freq_;

  // KV cache and rotary table, sized by reserve().
  int32_t max_seqs_ = 0;
  int64_t max_positions_ = 0;
  int64_t blocks_per_seq_ = 0;
  int64_t pool_blocks_ = 0; // blocks in each layer's pool
  bool paged_ = false;      // reserve_blocks(): sequences name their blocks in the step batch
  bool shared_blocks_ = false; // this step's StepBatch::shared_blocks (part of a decode graph's key)
  std::pair<int64_t, uint64_t> pool_request_{-1, 0}; // reserve_blocks()'s (n_blocks, kv_bytes) of that pool
  loom_kv_layout layout_{};
  std::vector<DeviceBuffer> kv_pools_; // per layer [pool_blocks, bytes_per_block]
  DeviceBuffer cos_sin_;               // [max_positions, D/2, 2] float32
  const Instance *prepared_attention_ = nullptr;
  bool hook_installed_ = false;

  // Activations for up to capacity_tokens_ tokens / capacity_seqs_ sequences.
  int32_t capacity_tokens_ = 0, capacity_seqs_ = 0;
  DeviceBuffer x_, h_, qkv_, q_, k_, v_, attn_, gate_up_, inter_, final_h_, logits_;
  // Per-step int32 metadata: tokens [T], positions [T], seq_offsets [S+1], seq_positions [S],
  // last_rows [S], block_table [S, blocks_per_seq]; one upload per step. The tokens come first,
  // so that a decode step fed from the device (token_feed) uploads the rest only. Two halves,
  // on the host and on the device, used by alternate steps: a step's upload runs on its own
  // stream while the step before it still computes from the other half (decode graphs are made
  // per half), and the host can queue a step without waiting for the device.
  DeviceBuffer meta_[2];
  PinnedBuffer meta_host_;   // 2 x meta_capacity_ entries
  size_t meta_capacity_ = 0; // int32 entries per half
  int staging_half_ = 0;     // the half of the last forward()
  cudaStream_t upload_stream_ = nullptr;
  cudaEvent_t staged_[2]{}; // the half's upload is done (on upload_stream_)
  cudaEvent_t used_[2]{};   // the forward that read the half is done (on stream_)
  int32_t *d_tokens_ = nullptr, *d_positions_ = nullptr, *d_offsets_ = nullptr, *d_seq_positions_ = nullptr,
          *d_last_rows_ = nullptr, *d_block_table_ = nullptr;
  DeviceView logits_view_;

  // Decode graphs by batch size, made for the buffers and attention instance of the moment.
  struct Graph {
    cudaGraphExec_t exec = nullptr;
  };
  std::map<int32_t, Graph> graphs_; // by 2 x (2 x batch size + metadata half) + whether rows use adapters
  std::map<int32_t, std::vector<std::string>> graph_op_names_; // by graph key, with LOOM_CUDA_OP_TIMES
  OpTimes op_times_;
  std::shared_ptr<Instance> graphs_attention_; // held, so that its address cannot be reused
  bool graphs_enabled_ = true;
  // embed(): the forward pass stops before the final norm and copies every token's residual
  // stream (and the bias the final norm would have added) to the host, where embed() pools.
  bool embedding_pass_ = false;
  std::vector<float> embed_x_, embed_bias_;
  // Decode steps of at most this many tokens use the fused GEMVs (0: never; bfloat16 only;
  // LOOM_CUDA_GEMV=0 turns them off, for comparisons). programmatic_: the GEMVs, the skinny GEMM,
  // the norms and the RoPE split are launched as programmatic dependent launches (compute
  // capability 9.0 and newer; LOOM_CUDA_PDL=0 turns it off for them; the flash plugin decides
  // for its own kernels).
  int32_t gemv_tokens_ = 0;
  bool programmatic_ = false;
  // Steps of up to skinny_gemm_max_tokens() tokens run the gate/up projection and SwiGLU as one
  // skinny tensor-core GEMM (loom/kernels/skinny_gemm.hpp) instead of cuBLAS and a SwiGLU
  // kernel, when this is set: bfloat16, a device the kernel supports, every layer's gate/up
  // without bias and of a shape it takes (LOOM_CUDA_SKINNY=0 turns it off, for comparisons).
  // The other linears stay on cuBLAS: at T = 64 on the H100 the skinny kernel was slower for
  // q/k/v, o and down (their outputs have too few tiles for the GPU without splitting K) and no
  // faster for the LM head (BENCHMARKS.md).
  bool skinny_swiglu_ = false;
  // inter[T, I] = SwiGLU(x W_gate_up^T) by the skinny GEMM.
  void skinny_swiglu(const DeviceLinear &gate_up, const void *x, int32_t tokens, void *inter);
  // The weights of a linear on the device (the tied LM head's are the embedding's).
  const void *weight_of(const DeviceLinear &w) const { return &w == &lm_head_ ? lm_head_weight_ : w.weight.get(); }
};

// float32 -> bfloat16, round to nearest even (the device kernel's rounding too).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40); // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

CudaBackend::CudaBackend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline,
                         const CudaBackendOptions &options)
    : config_(config), pipeline_(pipeline), options_(options), graphs_enabled_(options.graphs) {
  if (options.tensor && options.tensor->size() > 1) {
    tensor_ = options.tensor.get();
    for (loom_kind kind : {LOOM_KIND_ADAPTER, LOOM_KIND_QUANTIZER})
      if (!pipeline.list(kind).empty())
        throw runtime_error(options.source_name + ": tensor parallel inference with adapters or a quantizer is not supported yet");
  }
  if (auto list = pipeline_.list(LOOM_KIND_ADAPTER); !list.empty() && !pipeline_.list(LOOM_KIND_QUANTIZER).empty())
    throw runtime_error(options_.source_name + ": " + list.front()->slot() + " (" + list.front()->desc().name +
                        "): adapters over a quantized base run on the CPU backend only; use loom.device = \"cpu\"");
  if (auto list = pipeline_.list(LOOM_KIND_QUANTIZER); !list.empty()) {
    quantizer_ = list.front();
    const auto *ext = quantizer_->extension<loom_quantizer_fused>(LOOM_QUANTIZER_FUSED_EXTENSION);
    if (ext && LOOM_HAS_FIELD(ext, loom_quantizer_fused, linear_fused) && ext->max_rows && ext->linear_fused &&
        !env_off("LOOM_CUDA_QUANT_FUSED"))
      quant_fused_ = ext;
  }
  // A `loom quantize` checkpoint: its quantized linears are imported by the pipeline's quantizer.
  const QuantizedCheckpoint *checkpoint = weights.quantized();
  if (checkpoint && !quantizer_)
    throw runtime_error(options_.source_name + ": [model] path holds weights quantized by '" + checkpoint->quantizer +
                        "' (" + checkpoint->source + "); add [quantizer] use = \"" + checkpoint->quantizer + "\" to load them");
  cuda_check(cudaSetDevice(options_.device.device_id), "cudaSetDevice");
  stream_ = static_cast<cudaStream_t>(cuda_compute_stream(options_.device.device_id));
  if (stream_ == nullptr) throw runtime_error("CUDA backend: no compute stream for device " + std::to_string(options_.device.device_id));
  cublas_check(cublasCreate(&cublas_), "cublasCreate");
  cublas_check(cublasSetStream(cublas_, stream_), "cublasSetStream");
  // A workspace of our own: cuBLAS must not allocate while a graph is being captured.
  cublas_workspace_ = DeviceBuffer(size_t{32} << 20);
  cublas_check(cublasSetWorkspace(cublas_, cublas_workspace_.get(), cublas_workspace_.bytes()), "cublasSetWorkspace");

  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int64_t qkv_out = (c.n_heads + 2 * c.n_kv_heads) * D;
  const bool gpt2 = c.architecture == Architecture::gpt2;
  auto take = [&](const std::string &name) { return weights.take(name).values; };
  auto maybe = [&](const std::string &name) { return weights.contains(name) ? take(name) : std::vector<float>{}; };
  auto stored_quantized = [&](const std::string &module) -> const QuantizedModule * {
    if (!checkpoint) return nullptr;
    const auto it = checkpoint->modules.find(module);
    return it == checkpoint->modules.end() ? nullptr : &it->second;
  };
  auto import_linear = [&](const std::string &module, const QuantizedModule &m) {
    DeviceLinear l;
    l.out = m.shape[0];
    l.in = m.shape[1];
    l.qweight = {import_quantized_module(*quantizer_, m, module, checkpoint->quantizer, options_.device, options_.source_name),
                 QWeightFree{quantizer_}};
    return l;
  };
  if (checkpoint && gpt2)
    throw runtime_error(options_.source_name + ": [model] path: GPT-2 checkpoints quantized by loom quantize are not supported");
  const bool tied = c.tie_word_embeddings || gpt2;
  std::vector<float> embedding = take(gpt2 ? "wte.weight" : "model.embed_tokens.weight");
  embedding_ = upload_matrix(embedding);
  // A tied head under a quantizer is its own quantized copy; lookups keep reading embedding_.
  if (quantizer_ && tied)
    lm_head_ = stored_quantized("lm_head") ? import_linear("lm_head", *stored_quantized("lm_head"))
                                           : upload_linear("lm_head", embedding, c.vocab_size, H, {});
  embedding = {};
  if (gpt2) positions_ = upload_matrix(take("wpe.weight"));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    DeviceLayer layer;
    if (gpt2) {
      // Conv1D weights are [in, out]: transpose into [out, in]; c_attn's columns are q | k | v,
      // which is already the fused layout.
      auto transpose = [](const HostWeight &w) {
        const int64_t in = w.shape[0], out = w.shape[1];
        std::vector<float> t(static_cast<size_t>(in * out));
        for (int64_t i = 0; i < in; ++i)
          for (int64_t o = 0; o < out; ++o) t[static_cast<size_t>(o * in + i)] = w.values[static_cast<size_t>(i * out + o)];
        return t;
      };
      std::string p = "h." + std::to_string(l) + ".";
      layer.qkv = upload_linear(p + "attn.c_attn", transpose(weights.at(p + "attn.c_attn.weight")), qkv_out, H,
                                take(p + "attn.c_attn.bias"));
      layer.o = upload_linear(p + "attn.c_proj", transpose(weights.at(p + "attn.c_proj.weight")), H, H,
                              take(p + "attn.c_proj.bias"));
      layer.gate_up = upload_linear(p + "mlp.c_fc", transpose(weights.at(p + "mlp.c_fc.weight")), I, H,
                                    take(p + "mlp.c_fc.bias"));
      layer.down = upload_linear(p + "mlp.c_proj", transpose(weights.at(p + "mlp.c_proj.weight")), H, I,
                                 take(p + "mlp.c_proj.bias"));
      layer.norm1_w = upload_f32(take(p + "ln_1.weight"));
      layer.norm1_b = upload_f32(take(p + "ln_1.bias"));
      layer.norm2_w = upload_f32(take(p + "ln_2.weight"));
      layer.norm2_b = upload_f32(take(p + "ln_2.bias"));
    } else {
      std::string p = "model.layers." + std::to_string(l) + ".";
      // Row-wise concatenation of [out_i, in] matrices (and their biases) into one.
      auto concat = [&](std::initializer_list<std::string> names, bool biases) {
        std::vector<float> all;
        for (const auto &n : names) {
          auto v = biases ? maybe(p + n + ".bias") : take(p + n + ".weight");
          all.insert(all.end(), v.begin(), v.end());
        }
        return all;
      };
      // The linear [out, in] made of the rows of `names`: their float weights concatenated and
      // uploaded (quantized by the pipeline's quantizer, if any), or, when the checkpoint stores
      // them quantized, each imported as it is (one part each).
      auto linear_of = [&](const std::string &fused, std::initializer_list<std::string> names, int64_t out, int64_t in,
                           std::vector<float> bias) {
        size_t quantized = 0;
        for (const auto &n : names) quantized += stored_quantized(p + n) != nullptr;
        if (quantized == 0) return upload_linear(p + fused, concat(names, false), out, in, bias);
        std::string list;
        for (const auto &n : names) list += (list.empty() ? "" : ", ") + p + n;
        if (quantized != names.size())
          throw runtime_error(options_.source_name + ": [model] path stores some of " + list +
                              " quantized and some not; the CUDA backend loads them together");
        DeviceLinear lin;
        if (names.size() == 1) {
          lin = import_linear(p + *names.begin(), *stored_quantized(p + *names.begin()));
        } else {
          for (const auto &n : names) lin.parts.push_back(import_linear(p + n, *stored_quantized(p + n)));
          lin.in = in;
          for (const DeviceLinear &part : lin.parts) {
            if (part.in != in)
              throw runtime_error(options_.source_name + ": [model] path: " + list + " must all take " + std::to_string(in) + " inputs");
            lin.out += part.out;
            part_cols_ = std::max(part_cols_, part.out);
          }
        }
        if (lin.out != out || lin.in != in)
          throw runtime_error(options_.source_name + ": [model] path: " + list + " quantized as [" + std::to_string(lin.out) +
                              ", " + std::to_string(lin.in) + "], the model needs [" + std::to_string(out) + ", " +
                              std::to_string(in) + "]");
        if (!bias.empty()) lin.bias = upload_f32(bias);
        return lin;
      };
      auto qkv_bias = concat({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, true);
      if (!qkv_bias.empty() && static_cast<int64_t>(qkv_bias.size()) != qkv_out)
        throw runtime_error(options_.source_name + ": layer " + std::to_string(l) +
                            ": q/k/v biases must be present for all three projections or none");
      layer.qkv = linear_of("self_attn.qkv_proj", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, qkv_out, H,
                            qkv_bias);
      layer.o = linear_of("self_attn.o_proj", {"self_attn.o_proj"}, H, c.n_heads * D, maybe(p + "self_attn.o_proj.bias"));
      auto gu_bias = concat({"mlp.gate_proj", "mlp.up_proj"}, true);
      layer.gate_up = linear_of("mlp.gate_up_proj", {"mlp.gate_proj", "mlp.up_proj"}, 2 * I, H, gu_bias);
      if (layer.gate_up.bias)
        throw runtime_error(options_.source_name + ": MLP biases (mlp_bias) are not supported by the CUDA backend yet");
      layer.down = linear_of("mlp.down_proj", {"mlp.down_proj"}, H, I, maybe(p + "mlp.down_proj.bias"));
      layer.norm1_w = upload_f32(take(p + "input_layernorm.weight"));
      layer.norm2_w = upload_f32(take(p + "post_attention_layernorm.weight"));
    }
    layers_.push_back(std::move(layer));
  }
  final_w_ = upload_f32(take(gpt2 ? "ln_f.weight" : "model.norm.weight"));
  if (gpt2) final_b_ = upload_f32(take("ln_f.bias"));
  if (tied) {
    lm_head_.out = c.vocab_size;
    lm_head_.in = H;
    lm_head_weight_ = embedding_.get();
  } else {
    lm_head_ = stored_quantized("lm_head") ? import_linear("lm_head", *stored_quantized("lm_head"))
                                           : upload_linear("lm_head", take("lm_head.weight"), c.vocab_size, H, {});
    lm_head_weight_ = lm_head_.weight.get();
  }
  if (!gpt2) inv_freq_ = rope_inv_freq(c);
  cuda_check(cudaStreamSynchronize(stream_), "weight upload");
  if (bf16() && !quantizer_ && !env_off("LOOM_CUDA_GEMV"))
    gemv_tokens_ = std::min({kernels::gemv_max_tokens(static_cast<int32_t>(H)),
                             kernels::gemv_max_tokens(static_cast<int32_t>(c.n_heads * D)),
                             kernels::gemv_max_tokens(static_cast<int32_t>(I))});
  // LOOM_CUDA_GEMV_TOKENS=N: the GEMVs take steps of at most N tokens, the rest the cuBLAS path
  // (for comparisons at a few tokens, such as speculative verification passes: BENCHMARKS.md).
  if (const char *cap = std::getenv("LOOM_CUDA_GEMV_TOKENS"); cap != nullptr && *cap != '\0')
    gemv_tokens_ = std::min(gemv_tokens_, static_cast<int32_t>(std::clamp(std::atol(cap), 0L, 64L)));
  int major = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, options_.device.device_id),
             "cudaDeviceGetAttribute");
  programmatic_ = major >= 9 && !env_off("LOOM_CUDA_PDL");
  cuda_check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, options_.device.device_id),
             "cudaDeviceGetAttribute");
  // (a quantizer's linears never split: gemm_split multiplies the bf16 weights)
  split_k_ = !tensor_ && !quantizer_ && !env_off("LOOM_CUDA_SPLIT_K");
  if (const char *forced = std::getenv("LOOM_CUDA_SPLIT_K"); split_k_ && forced != nullptr && std::strchr(forced, ',')) {
    std::istringstream in(forced);
    std::string count;
    for (int &f : split_forced_)
      if (std::getline(in, count, ',')) f = std::clamp(std::atoi(count.c_str()), 0, kSplitMaxParts);
    for (int f : split_forced_) split_buffer_parts_ = std::max(split_buffer_parts_, f);
  }
  if (bf16() && major >= 8 && !gpt2 && !quantizer_ && !env_off("LOOM_CUDA_SKINNY") && kernels::skinny_gemm_supported())
    skinny_swiglu_ = std::all_of(layers_.begin(), layers_.end(), [](const DeviceLayer &layer) {
      return !layer.gate_up.bias && kernels::skinny_gemm_takes(static_cast<int32_t>(layer.gate_up.in),
                                                               static_cast<int32_t>(layer.gate_up.out),
                                                               kernels::SkinnyEpilogue::swiglu);
    });
  // Adapters: their sites now (a refusal fails the construction), their groups with the first
  // activations; their hooks with the others, last.
  if (!quantizer_) { // (GPT-2's adapters are refused by name when they attach)
    adapters_ = std::make_unique<CudaAdapters>(c, options_.device, act_dl(), options_.source_name);
    for (auto &a : pipeline_.list(LOOM_KIND_ADAPTER)) adapters_->commit(a, adapters_->attach(*a));
  }
  // The quantizer's weights live on the GPU as it made them: no swap while this backend lives
  // (installed last: a constructor that throws leaves no hook behind).
  if (quantizer_)
    pipeline_.set_activate_hook(LOOM_KIND_QUANTIZER, [](Instance &fresh, Instance &) -> std::function<void()> {
      throw runtime_error("swap " + fresh.slot() + ": the CUDA backend cannot swap its quantizer while it runs; "
                          "swap it between runs or on the CPU");
    });
  if (adapters_) install_adapter_hooks();
  if (tensor_) {
    // The group's NCCL communicator is made by its first collective: here, not inside a graph.
    DeviceBuffer probe(sizeof(float));
    cuda_check(cudaMemsetAsync(probe.get(), 0, sizeof(float), stream_), "cudaMemsetAsync");
    after_row_parallel(probe.get<float>(), 1);
    cuda_check(cudaStreamSynchronize(stream_), "tensor parallel warm-up");
  }
}

void CudaBackend::change_adapters(const std::function<void()> &change) {
  cuda_check(cudaStreamSynchronize(stream_), "adapter change");
  invalidate_graphs();
  change();
  adapters_->rebuild(capacity_tokens_);
}

void CudaBackend::install_adapter_hooks() {
  pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, [this](Instance &fresh, Instance &old) -> std::function<void()> {
    auto sites = adapters_->attach(fresh);
    const Instance *old_ptr = &old;
    const std::string slot = fresh.slot();
    // At commit the slot holds `fresh` (and `old` still lives, for its groups to go first).
    return [this, sites, old_ptr, slot] { change_adapters([&] { adapters_->commit(pipeline_.get(slot), sites, old_ptr); }); };
  });
  Pipeline::MembershipHooks membership;
  membership.attach = [this](Instance &fresh) -> std::function<void()> {
    auto sites = adapters_->attach(fresh);
    const std::string slot = fresh.slot();
    return [this, sites, slot] { change_adapters([&] { adapters_->commit(pipeline_.get(slot), sites); }); };
  };
  membership.detach = [this](Instance &leaving) {
    try {
      change_adapters([&] { adapters_->remove(&leaving); });
    } catch (const std::exception &e) {
      std::cerr << "[warn] " << leaving.slot() << ": " << e.what() << "\n";
    }
  };
  pipeline_.set_membership_hooks(LOOM_KIND_ADAPTER, std::move(membership));
}

void CudaBackend::skinny_swiglu(const DeviceLinear &gate_up, const void *x, int32_t tokens, void *inter) {
  kernels::SkinnyGemmArgs a;
  a.tokens = tokens;
  a.in = static_cast<int32_t>(gate_up.in);
  a.out = static_cast<int32_t>(gate_up.out);
  a.weight = gate_up.weight.get();
  a.act = x;
  a.out_ptr = inter;
  kernel_check(kernels::skinny_gemm_bf16_cuda(a, kernels::SkinnyEpilogue::swiglu, programmatic_, stream_), "skinny gemm");
}

CudaBackend::~CudaBackend() {
  {
    auto guard = pipeline_.begin_step(); // a swap in flight either finished with the hook or sees none
    if (hook_installed_) pipeline_.set_activate_hook(LOOM_KIND_ATTENTION, {});
    if (quantizer_) pipeline_.set_activate_hook(LOOM_KIND_QUANTIZER, {});
    if (adapters_) {
      pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, {});
      pipeline_.set_membership_hooks(LOOM_KIND_ADAPTER, {});
    }
  }
  if (stream_) cudaStreamSynchronize(stream_); // (the quantizer's weights go with layers_ and lm_head_)
  invalidate_graphs();
  graphs_attention_.reset();
  for (cudaEvent_t e : staged_)
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : used_)
    if (e) cudaEventDestroy(e);
  if (upload_stream_) cudaStreamDestroy(upload_stream_);
  if (cublas_) cublasDestroy(cublas_);
}

DeviceBuffer CudaBackend::upload_f32(const std::vector<float> &values) {
  DeviceBuffer b(values.size() * sizeof(float));
  cuda_check(cudaMemcpy(b.get(), values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice), "weight upload");
  return b;
}

DeviceBuffer CudaBackend::upload_matrix(const std::vector<float> &values) {
  if (!bf16()) return upload_f32(values);
  // Converted on the device: a float32 staging copy, then one rounding kernel.
  DeviceBuffer staging = upload_f32(values);
  DeviceBuffer b(values.size() * 2);
  kernel_check(kernels::f32_to_bf16_cuda(staging.get<float>(), static_cast<int64_t>(values.size()), b.get(), stream_),
               "f32_to_bf16");
  cuda_check(cudaStreamSynchronize(stream_), "weight conversion"); // before `staging` is freed
  return b;
}

DeviceLinear CudaBackend::upload_linear(const std::string &module, const std::vector<float> &w, int64_t out, int64_t in,
                                        const std::vector<float> &bias) {
  if (static_cast<int64_t>(w.size()) != out * in)
    throw runtime_error("CUDA backend: a weight of " + std::to_string(w.size()) + " values where [" +
                        std::to_string(out) + ", " + std::to_string(in) + "] was expected");
  DeviceLinear l;
  l.out = out;
  l.in = in;
  if (quantizer_) {
    DeviceView host;
    loom_quantize_request req{};
    req.struct_size = sizeof(req);
    req.module_name = module.c_str();
    req.weight = host.set(const_cast<float *>(w.data()), DLDevice{kDLCPU, 0}, DLDataType{kDLFloat, 32, 1}, {out, in});
    req.target_device = options_.device;
    loom_qweight *q = nullptr;
    quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->quantize(quantizer_->handle(), &req, &q),
                      ("quantize " + module + " for the GPU").c_str());
    l.qweight = {q, QWeightFree{quantizer_}};
  } else {
    l.weight = upload_matrix(w);
  }
  if (!bias.empty()) l.bias = upload_f32(bias);
  return l;
}

loom_kv_layout CudaBackend::prepare_attention(Instance &attention) const {
  loom_attention_config c = attention_config_for(config_, max_positions_, act_dl(), options_.device);
  loom_kv_layout layout{};
  layout.struct_size = sizeof(layout);
  layout.window = c.sliding_window;
  attention.check(attention.vtable<loom_attention_vtable>()->prepare(attention.handle(), &c, &layout), "prepare");
  if (layout.window < 0) throw runtime_error(attention.slot() + " (" + attention.desc().name + "): prepare reported a negative window");
  if (layout.block_size <= 0 || layout.block_size > (1 << 20) || layout.bytes_per_block == 0 ||
      layout.bytes_per_block > (uint64_t{1} << 32))
    throw runtime_error(attention.slot() + " (" + attention.desc().name +
                        "): prepare reported a KV layout the CUDA backend cannot use (it needs a paged cache)");
  return layout;
}

void CudaBackend::install_hook() {
  if (hook_installed_) return;
  pipeline_.set_activate_hook(LOOM_KIND_ATTENTION, [this](Instance &fresh, Instance &) -> std::function<void()> {
    loom_kv_layout layout = prepare_attention(fresh);
    if (layout.block_size != layout_.block_size || layout.bytes_per_block != layout_.bytes_per_block ||
        layout.cache_dtype.code != layout_.cache_dtype.code || layout.cache_dtype.bits != layout_.cache_dtype.bits)
      throw runtime_error("swap " + fresh.slot() + ": " + fresh.desc().name +
                          " wants another KV layout than the cache in use; swap it between runs");
    const Instance *fresh_ptr = &fresh;
    return [this, fresh_ptr] { prepared_attention_ = fresh_ptr; };
  });
  hook_installed_ = true;
}

void CudaBackend::reserve(int32_t max_seqs, int64_t max_positions) {
  auto attention = pipeline_.list(LOOM_KIND_ATTENTION);
  if (attention.empty())
    throw runtime_error(options_.source_name + ": the pipeline has no [attention]: add one such as use = \"flash\"");
  if (!paged_ && max_seqs <= max_seqs_ && max_positions <= max_positions_ && prepared_attention_ == attention.front().get())
    return;
  size_cache(max_seqs, max_positions, false, 0, 0);
}

ModelBackend::BlockPool CudaBackend::reserve_blocks(int32_t max_seqs, int64_t max_positions, int64_t n_blocks,
                                                    uint64_t kv_bytes) {
  // The same pool again (the next run of a runtime): keep it, and the decode graphs made for it.
  auto attention = pipeline_.list(LOOM_KIND_ATTENTION);
  if (paged_ && !attention.empty() && prepared_attention_ == attention.front().get() && max_seqs <= max_seqs_ &&
      max_positions <= max_positions_ && n_blocks == pool_request_.first && kv_bytes == pool_request_.second)
    return {layout_.block_size, pool_blocks_, layout_.window};
  size_cache(max_seqs, max_positions, true, n_blocks, kv_bytes);
  pool_request_ = {n_blocks, kv_bytes};
  return {layout_.block_size, pool_blocks_, layout_.window};
}

void CudaBackend::copy_blocks(const std::vector<std::pair<int32_t, int32_t>> &src_dst) {
  check_block_copies(src_dst, paged_, pool_blocks_, options_.source_name);
  const size_t bytes = layout_.bytes_per_block;
  for (const auto &[src, dst] : src_dst) {
    // Ordered on the stream behind the forward pass that wrote the source.
    for (auto &pool : kv_pools_)
      cuda_check(cudaMemcpyAsync(pool.get<uint8_t>() + static_cast<size_t>(dst) * bytes,
                                 pool.get<uint8_t>() + static_cast<size_t>(src) * bytes, bytes, cudaMemcpyDeviceToDevice,
                                 stream_),
                 "copy_blocks");
  }
}

void CudaBackend::size_cache(int32_t max_seqs, int64_t max_positions, bool paged, int64_t n_blocks, uint64_t kv_bytes) {
  auto attention = pipeline_.list(LOOM_KIND_ATTENTION);
  if (attention.empty())
    throw runtime_error(options_.source_name + ": the pipeline has no [attention]: add one such as use = \"flash\"");
  if (max_positions > (int64_t{1} << 24) || max_seqs > 4096 || max_seqs < 1)
    throw runtime_error(options_.source_name + ": a batch of " + std::to_string(max_seqs) + " sequences of " +
                        std::to_string(max_positions) + " positions is outside what the CUDA backend sizes");
  cuda_check(cudaStreamSynchronize(stream_), "reserve");
  invalidate_graphs(); // the cache and the tables below move
  max_seqs_ = std::max(max_seqs, max_seqs_);
  max_positions_ = std::max(max_positions, max_positions_);
  layout_ = prepare_attention(*attention.front());
  prepared_attention_ = attention.front().get();
  blocks_per_seq_ = (max_positions_ + layout_.block_size - 1) / layout_.block_size;
  size_t free_bytes = 0, total_bytes = 0;
  cuda_check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  uint64_t in_use = 0; // freed below before the new pools are made
  for (const auto &pool : kv_pools_) in_use += pool.bytes();
  uint64_t blocks = static_cast<uint64_t>(max_seqs_) * static_cast<uint64_t>(blocks_per_seq_);
  if (paged) {
    // kv_bytes 0: 85% of the free memory (the old pools' included) beyond 1 GiB of headroom.
    const uint64_t available = free_bytes + in_use, headroom = uint64_t{1} << 30;
    if (kv_bytes == 0) kv_bytes = available > headroom ? (available - headroom) / 100 * 85 : 0;
    blocks = paged_pool_blocks(layout_, config_.n_layers, max_positions_, n_blocks, kv_bytes, 0,
                               attention.front()->slot() + " (" + attention.front()->desc().name + ")");
  }
  const uint64_t pool_bytes = blocks * layout_.bytes_per_block;
  if (pool_bytes * static_cast<uint64_t>(config_.n_layers) > free_bytes + in_use)
    throw runtime_error(attention.front()->slot() + " (" + attention.front()->desc().name + "): a KV cache of " +
                        std::to_string(pool_bytes * static_cast<uint64_t>(config_.n_layers) >> 20) +
                        " MiB for " + std::to_string(max_seqs_) + " sequences of " + std::to_string(max_positions_) +
                        " positions does not fit in the GPU's free memory");
  kv_pools_.clear();
  for (int64_t l = 0; l < config_.n_layers; ++l) kv_pools_.emplace_back(pool_bytes);
  pool_blocks_ = static_cast<int64_t>(blocks);
  paged_ = paged;
  if (!inv_freq_.empty()) cos_sin_ = upload_f32(ops::rope_cos_sin_table(inv_freq_, max_positions_, config_.head_dim));
  install_hook();
}

void CudaBackend::grow_meta(size_t entries, size_t keep, int keep_half) {
  // Nothing in flight reads or stages the old buffers.
  cuda_check(cudaStreamSynchronize(stream_), "resize");
  if (upload_stream_) cuda_check(cudaStreamSynchronize(upload_stream_), "resize");
  invalidate_graphs();
  const size_t capacity = std::max(entries, meta_capacity_ * 3 / 2);
  for (int half = 0; half < 2; ++half) {
    DeviceBuffer grown(capacity * 4);
    if (keep > 0 && half == keep_half)
      cuda_check(cudaMemcpy(grown.get(), meta_[half].get(), keep * 4, cudaMemcpyDeviceToDevice), "resize");
    meta_[half] = std::move(grown);
  }
  meta_host_ = PinnedBuffer(2 * capacity * 4);
  meta_capacity_ = capacity;
}

void CudaBackend::copy_slot(int32_t src_slot, int32_t dst_slot, int64_t positions) {
  if (paged_) throw runtime_error(options_.source_name + ": copy_slot in paged mode (copy blocks instead)");
  const SlotCopy c =
      plan_slot_copy(src_slot, dst_slot, positions, max_seqs_, max_positions_, blocks_per_seq_, layout_, options_.source_name);
  if (c.bytes == 0) return;
  // Ordered on the stream behind the forward pass that wrote the source.
  for (auto &pool : kv_pools_)
    cuda_check(cudaMemcpyAsync(pool.get<uint8_t>() + c.dst_offset, pool.get<uint8_t>() + c.src_offset, c.bytes,
                               cudaMemcpyDeviceToDevice, stream_),
               "copy_slot");
}

int32_t *CudaBackend::token_feed(int32_t seqs) {
  if (seqs <= 0 || max_seqs_ <= 0) return nullptr;
  if (meta_entries(seqs, seqs) > meta_capacity_) grow_meta(meta_entries(seqs, seqs), 0, 0);
  return meta_[staging_half_ ^ 1].get<int32_t>(); // the next step's half; its tokens lead it
}

void CudaBackend::ensure_capacity(int32_t tokens, int32_t seqs) {
  if (tokens <= capacity_tokens_ && seqs <= capacity_seqs_) return;
  cuda_check(cudaStreamSynchronize(stream_), "resize");
  invalidate_graphs();
  // Grow geometrically so a run of slightly longer prompts does not reallocate every time.
  const int32_t T = std::max({tokens, capacity_tokens_ + capacity_tokens_ / 2, 16});
  const int32_t S = std::max({seqs, capacity_seqs_ + capacity_seqs_ / 2, 4});
  const ModelConfig &c = config_;
  const size_t a = act_bytes();
  const size_t qkv_cols = static_cast<size_t>((c.n_heads + 2 * c.n_kv_heads) * c.head_dim);
  const size_t t = static_cast<size_t>(T), s = static_cast<size_t>(S), H = static_cast<size_t>(c.hidden_size),
               I = static_cast<size_t>(c.intermediate_size), D = static_cast<size_t>(c.head_dim);
  x_ = DeviceBuffer(t * H * 4);
  if (quantizer_) quant_out_ = DeviceBuffer(t * H * 4);
  if (part_cols_ > 0) part_out_ = DeviceBuffer(t * static_cast<size_t>(part_cols_) * 4);
  h_ = DeviceBuffer(t * H * a);
  qkv_ = DeviceBuffer(t * qkv_cols * a);
  q_ = DeviceBuffer(t * static_cast<size_t>(c.n_heads) * D * a);
  k_ = DeviceBuffer(t * static_cast<size_t>(c.n_kv_heads) * D * a);
  v_ = DeviceBuffer(t * static_cast<size_t>(c.n_kv_heads) * D * a);
  attn_ = DeviceBuffer(t * static_cast<size_t>(c.n_heads) * D * a);
  gate_up_ = DeviceBuffer(t * 2 * I * a);
  inter_ = DeviceBuffer(t * I * a);
  final_h_ = DeviceBuffer(s * H * a);
  logits_ = DeviceBuffer(s * static_cast<size_t>(c.vocab_size) * 4);
  if (split_k_ && capacity_tokens_ < kSplitMaxTokens) // (past kSplitMaxTokens its size stays)
    split_parts_ = DeviceBuffer(static_cast<size_t>(split_buffer_parts_) * std::min<size_t>(t, kSplitMaxTokens) *
                                std::max(qkv_cols, H) * 4);
  capacity_tokens_ = T;
  capacity_seqs_ = S;
  if (adapters_) adapters_->rebuild(T);
}

void CudaBackend::invalidate_graphs() {
  for (auto &[size, g] : graphs_)
    if (g.exec) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

void CudaBackend::quantized_gemm(const DeviceLinear &w, const void *x, int32_t tokens, void *y, cudaDataType y_type,
                                 float beta) {
  const DLDevice dev = options_.device;
  const DLDataType f32{kDLFloat, 32, 1};
  DeviceView vx, vy;
  DLTensor *xt = vx.set(const_cast<void *>(x), dev, act_dl(), {tokens, w.in});
  // The quantizer overwrites y: a product added into the residual goes through quant_out_.
  DLTensor *yt = beta == 0.0f ? vy.set(y, dev, y_type == CUDA_R_32F ? f32 : act_dl(), {tokens, w.out})
                              : vy.set(quant_out_.get(), dev, f32, {tokens, w.out});
  quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->linear(quantizer_->handle(), w.qweight.get(), xt, nullptr, yt),
                    "linear");
  if (beta != 0.0f)
    kernel_check(kernels::add_f32_cuda(static_cast<float *>(y), quant_out_.get<float>(), int64_t{tokens} * w.out, stream_),
                 "add");
}

bool CudaBackend::fused_gemm(const DeviceLinear &w, const void *x, int32_t T, loom_linear_input input,
                             loom_linear_output output, const DeviceBuffer *norm_w, void *y, DLDataType y_type) {
  if (!quant_fused_ || !w.qweight || w.bias) return false;
  const DLDevice dev = options_.device;
  const DLDataType f32{kDLFloat, 32, 1};
  DeviceView vx, vy, vn;
  loom_linear_fusion f{};
  f.struct_size = sizeof(f);
  f.input = input;
  f.output = output;
  f.act_dtype = act_dl();
  if (input == LOOM_LINEAR_INPUT_RMS_NORM) {
    f.norm_weight = vn.set(norm_w->get(), dev, f32, {w.in});
    f.norm_eps = static_cast<float>(config_.norm_eps);
  }
  DeviceView vcs, vpos, vq, vk, vv;
  if (output == LOOM_LINEAR_OUTPUT_ROPE_QKV) { // y is q_/k_/v_, rotated at d_positions_
    const ModelConfig &c = config_;
    const int64_t D = c.head_dim;
    f.rope_cos_sin = vcs.set(cos_sin_.get(), dev, f32, {max_positions_, D / 2, 2});
    f.rope_positions = vpos.set(d_positions_, dev, DLDataType{kDLInt, 32, 1}, {T});
    f.rope_heads = static_cast<int32_t>(c.n_heads);
    f.rope_kv_heads = static_cast<int32_t>(c.n_kv_heads);
    f.rope_head_dim = static_cast<int32_t>(D);
    f.rope_q = vq.set(q_.get(), dev, act_dl(), {T, c.n_heads, D});
    f.rope_k = vk.set(k_.get(), dev, act_dl(), {T, c.n_kv_heads, D});
    f.rope_v = vv.set(v_.get(), dev, act_dl(), {T, c.n_kv_heads, D});
  }
  if (quant_fused_->max_rows(quantizer_->handle(), w.qweight.get(), &f) < T) return false;
  DLTensor *xt = vx.set(const_cast<void *>(x), dev, input == LOOM_LINEAR_INPUT_RMS_NORM ? f32 : act_dl(), {T, w.in});
  DLTensor *yt = output == LOOM_LINEAR_OUTPUT_ROPE_QKV
                     ? nullptr
                     : vy.set(y, dev, y_type, {T, output == LOOM_LINEAR_OUTPUT_SWIGLU ? w.out / 2 : w.out});
  quantizer_->check(quant_fused_->linear_fused(quantizer_->handle(), w.qweight.get(), xt, &f, yt), "linear_fused");
  return true;
}

void CudaBackend::gemm(const DeviceLinear &w, const void *x, int32_t tokens, void *y, cudaDataType y_type, float beta) {
  if (!w.parts.empty()) { // each part's product, then its columns of y (a strided copy)
    if (beta != 0.0f) throw runtime_error("CUDA backend: a linear of parts cannot add into its output");
    const size_t elem = y_type == CUDA_R_32F ? 4 : act_bytes();
    int64_t col = 0;
    for (const DeviceLinear &part : w.parts) {
      quantized_gemm(part, x, tokens, part_out_.get(), y_type, 0.0f);
      cuda_check(cudaMemcpy2DAsync(static_cast<char *>(y) + static_cast<size_t>(col) * elem, static_cast<size_t>(w.out) * elem,
                                   part_out_.get(), static_cast<size_t>(part.out) * elem, static_cast<size_t>(part.out) * elem,
                                   static_cast<size_t>(tokens), cudaMemcpyDeviceToDevice, stream_),
                 "copy a part's columns");
      col += part.out;
    }
    return;
  }
  if (w.qweight) {
    quantized_gemm(w, x, tokens, y, y_type, beta);
    return;
  }
  // Row-major y[T, out] = x[T, in] W[out, in]^T is column-major y^T[out, T] = W^T' x^T' with
  // W read as the column-major [in, out] matrix it is, transposed.
  const float alpha = 1.0f;
  const void *weight = weight_of(w);
  cublas_check(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.out), tokens, static_cast<int>(w.in),
                            &alpha, weight, act_cuda(), static_cast<int>(w.in), x, act_cuda(), static_cast<int>(w.in),
                            &beta, y, y_type, static_cast<int>(w.out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}

int CudaBackend::split_for(const DeviceLinear &w, int32_t tokens, SplitSite site) const {
  if (!split_k_ || tokens > kSplitMaxTokens || w.qweight || !w.parts.empty() || step_adapters_) return 0;
  int parts = split_forced_[site];
  if (parts < 0) {
    // Four parts for a product no wider than its inputs (o, down), two for a wider one (q/k/v),
    // halved while the parts' tiles (taken as 64 tokens x 128 outputs) would not fit one wave of
    // the GPU's SMs or a part would have under 512 inputs. (The 1B shape on the H200, BENCHMARKS.md
    // 2026-11-29, session 28: this gives 2, 4, 4 at 32 to 128 tokens, within 1% of two parts
    // everywhere at 32 and 64 tokens and 2.7% above it at 128; eight parts, or four for q/k/v,
    // were slower.)
    const int64_t tiles = ((tokens + 63) / 64) * ((w.out + 127) / 128);
    parts = w.out <= w.in ? kSplitRuleParts : 2;
    while (parts > 1 && (tiles * parts > sm_count_ || w.in / parts < 512 || w.in % (int64_t{parts} * 8) != 0)) parts /= 2;
  }
  return parts >= 2 && w.in % (int64_t{parts} * 8) == 0 ? parts : 0;
}

kernels::SplitParts CudaBackend::gemm_split(const DeviceLinear &w, const void *x, int32_t tokens, int parts) {
  // Part p is x[:, p k : (p + 1) k] W[:, p k : (p + 1) k]^T: the strided batch of gemm's
  // column-major product over consecutive slices of the inputs, each part its own [T, out].
  const int64_t k = w.in / parts, stride = int64_t{tokens} * w.out;
  const float alpha = 1.0f, beta = 0.0f;
  float *out = split_parts_.get<float>();
  cublas_check(cublasGemmStridedBatchedEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.out), tokens,
                                          static_cast<int>(k), &alpha, weight_of(w), act_cuda(), static_cast<int>(w.in), k,
                                          x, act_cuda(), static_cast<int>(w.in), k, &beta, out, CUDA_R_32F,
                                          static_cast<int>(w.out), stride, parts, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmStridedBatchedEx");
  return kernels::SplitParts{out, parts, stride};
}

// The attention plugin's view of one forward pass; kv_pool is set per layer.
struct CudaBackend::AttentionCall {
  DeviceView vq, vk, vv, vout, voff, vpos, vtable, vpool;
  loom_attention_batch batch{};
};

void CudaBackend::attend(Instance &attention, AttentionCall &call, int32_t T, int32_t S, int32_t layer) {
  const ModelConfig &c = config_;
  const int64_t D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  const DLDevice dev = options_.device;
  const DLDataType i32{kDLInt, 32, 1};
  loom_attention_batch &b = call.batch;
  if (b.struct_size == 0) {
    b.struct_size = sizeof(b);
    b.n_seqs = S;
    b.n_tokens = T;
    b.q = call.vq.set(q_.get(), dev, act_dl(), {T, Hq, D});
    b.k = call.vk.set(k_.get(), dev, act_dl(), {T, Hkv, D});
    b.v = call.vv.set(v_.get(), dev, act_dl(), {T, Hkv, D});
    b.out = call.vout.set(attn_.get(), dev, act_dl(), {T, Hq, D});
    b.seq_offsets = call.voff.set(d_offsets_, dev, i32, {S + 1});
    b.seq_positions = call.vpos.set(d_seq_positions_, dev, i32, {S});
    b.block_table = call.vtable.set(d_block_table_, dev, i32, {S, blocks_per_seq_});
    b.causal = 1;
    b.shared_blocks = shared_blocks_ ? 1 : 0;
  }
  b.layer = layer;
  b.kv_pool = call.vpool.set(kv_pools_[static_cast<size_t>(layer)].get(), dev, DLDataType{kDLUInt, 8, 1},
                             {pool_blocks_, static_cast<int64_t>(layout_.bytes_per_block)});
  attention.check(attention.vtable<loom_attention_vtable>()->forward(attention.handle(), &b), "forward");
  op_times_.mark("attention", stream_);
}

void CudaBackend::run_model(Instance &attention, int32_t T, int32_t S) {
  const ModelConfig &c = config_;
  const int32_t H = static_cast<int32_t>(c.hidden_size), D = static_cast<int32_t>(c.head_dim),
                Hq = static_cast<int32_t>(c.n_heads), Hkv = static_cast<int32_t>(c.n_kv_heads);
  const float eps = static_cast<float>(c.norm_eps);
  const bool gpt2 = c.architecture == Architecture::gpt2;
  const auto dt = kdtype();
  float *x = x_.get<float>();
  AttentionCall call;
  const bool gemv = T == S && T <= gemv_tokens_ && !step_adapters_; // (the GEMVs hide the linears' outputs)
  // The GEMV path looks the embeddings up in its first GEMV when the rows fit its staging.
  const bool embed_in_gemv = gemv && T <= kernels::gemv_max_embed_tokens(H);
  if (!embed_in_gemv) {
    kernel_check(kernels::embed_rows_cuda(d_tokens_, d_positions_, T, H, embedding_.get(),
                                          positions_ ? positions_.get() : nullptr, dt, x, stream_),
                 "embed");
    op_times_.mark("embed", stream_);
  }
  if (gemv) {
    run_layers_gemv(attention, call, T, embed_in_gemv);
    return;
  }
  const float *pending_bias = nullptr; // the last linear's bias, added by the next norm
  kernels::SplitParts pending_parts;   // the last o or down in parts (none: count 0), added by the next norm
  // With a quantizer that fuses (loom.quantizer.fused/1), RMSNorm moves into the q/k/v and
  // gate/up products, RoPE and the q/k/v split into q/k/v's, SwiGLU into gate/up's, the residual
  // adds into o's and down's.
  const DLDataType f32{kDLFloat, 32, 1};
  const bool rms = !gpt2;
  // A product that adds into the residual x (o, down): the quantizer's fused one, in `parts`
  // parts for the next norm to sum (returned), or cuBLAS adding into x and then the adapters.
  // labels: the operation times' names of those paths (fused, split, gemm, adapters).
  auto into_residual = [&](const DeviceLinear &w, const void *in, int32_t l, CudaAdapters::Module m, int parts,
                           const char *const(&labels)[4]) {
    kernels::SplitParts out;
    if (fused_gemm(w, in, T, LOOM_LINEAR_INPUT_ACT, LOOM_LINEAR_OUTPUT_ADD, nullptr, x, f32)) {
      op_times_.mark(labels[0], stream_);
    } else if (parts > 0) {
      out = gemm_split(w, in, T, parts);
      op_times_.mark(labels[1], stream_);
    } else {
      gemm(w, in, T, x, CUDA_R_32F, residual_keep());
      op_times_.mark(labels[2], stream_);
      if (step_adapters_) {
        adapt(l, m, in, x, f32, H, 0, T);
        op_times_.mark(labels[3], stream_);
      }
    }
    after_row_parallel(x, int64_t{T} * H);
    return out;
  };
  for (int32_t l = 0; l < c.n_layers; ++l) {
    DeviceLayer &layer = layers_[static_cast<size_t>(l)];
    const bool fuse_norm1 = rms && !pending_bias && !layer.norm1_b && pending_parts.count == 0;
    kernels::SplitParts qkv_parts;
    if (fuse_norm1 && cos_sin_ &&
        fused_gemm(layer.qkv, x, T, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_ROPE_QKV, &layer.norm1_w, nullptr, act_dl())) {
      op_times_.mark("norm+qkv+rope fused", stream_);
    } else {
      if (fuse_norm1 &&
          fused_gemm(layer.qkv, x, T, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_STORE, &layer.norm1_w, qkv_.get(), act_dl())) {
        op_times_.mark("norm+qkv fused", stream_);
      } else {
        kernel_check(kernels::add_bias_norm_cuda(x, nullptr, T, H, pending_bias, layer.norm1_w.get<float>(),
                                                 layer.norm1_b ? layer.norm1_b.get<float>() : nullptr, eps, h_.get(), dt,
                                                 stream_, programmatic_, pending_parts),
                     "norm");
        op_times_.mark("norm", stream_);
        if (const int parts = split_for(layer.qkv, T, split_qkv); parts > 0) {
          qkv_parts = gemm_split(layer.qkv, h_.get(), T, parts);
          op_times_.mark("qkv gemm (split)", stream_);
        } else {
          gemm(layer.qkv, h_.get(), T, qkv_.get(), act_cuda(), 0.0f);
          op_times_.mark("qkv gemm", stream_);
        }
        if (step_adapters_) {
          const int64_t qkv_cols = (c.n_heads + 2 * c.n_kv_heads) * D, kv_cols = c.n_kv_heads * D;
          const CudaAdapters::Module ms[] = {CudaAdapters::q_proj, CudaAdapters::k_proj, CudaAdapters::v_proj};
          const int64_t cols[] = {0, c.n_heads * D, c.n_heads * D + kv_cols};
          adapters_->apply(l, ms, cols, 3, h_.get(), act_dl(), qkv_.get(), act_dl(), qkv_cols, T, d_row_adapter_);
          op_times_.mark("q/k/v adapters", stream_);
        }
      }
      kernel_check(kernels::qkv_bias_rope_split_cuda(qkv_.get(), layer.qkv.bias ? layer.qkv.bias.get<float>() : nullptr,
                                                     gpt2 ? nullptr : cos_sin_.get<float>(), d_positions_, T, Hq, Hkv, D,
                                                     q_.get(), k_.get(), v_.get(), dt, stream_, programmatic_, qkv_parts),
                   "qkv");
      op_times_.mark("bias+rope+split", stream_);
    }
    attend(attention, call, T, S, l);
    static constexpr const char *kO[] = {"o fused", "o gemm (split)", "o gemm", "o adapters"};
    pending_parts = into_residual(layer.o, attn_.get(), l, CudaAdapters::o_proj, split_for(layer.o, T, split_o), kO);
    pending_bias = layer.o.bias ? layer.o.bias.get<float>() : nullptr;
    if (rms && !pending_bias && !layer.norm2_b && pending_parts.count == 0 &&
        fused_gemm(layer.gate_up, x, T, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_SWIGLU, &layer.norm2_w,
                   inter_.get(), act_dl())) {
      op_times_.mark("norm+gate_up+swiglu fused", stream_);
    } else {
      kernel_check(kernels::add_bias_norm_cuda(x, nullptr, T, H, pending_bias, layer.norm2_w.get<float>(),
                                               layer.norm2_b ? layer.norm2_b.get<float>() : nullptr, eps, h_.get(), dt, stream_,
                                               programmatic_, pending_parts),
                   "norm");
      op_times_.mark("norm", stream_);
      mlp_up(layer, T);
    }
    // (The embedding pass reads x itself after the last layer, so its last down adds into x.)
    const bool last = l + 1 == c.n_layers;
    static constexpr const char *kDown[] = {"down fused", "down gemm (split)", "down gemm", "down adapters"};
    pending_parts = into_residual(layer.down, inter_.get(), l, CudaAdapters::down_proj,
                                  last && embedding_pass_ ? 0 : split_for(layer.down, T, split_down), kDown);
    pending_bias = layer.down.bias ? layer.down.bias.get<float>() : nullptr;
  }
  if (embedding_pass_) {
    embed_x_.resize(static_cast<size_t>(T) * static_cast<size_t>(H));
    cuda_check(cudaMemcpyAsync(embed_x_.data(), x, embed_x_.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
               "embedding copy");
    embed_bias_.assign(pending_bias ? static_cast<size_t>(H) : 0, 0.0f);
    if (pending_bias)
      cuda_check(cudaMemcpyAsync(embed_bias_.data(), pending_bias, embed_bias_.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                 stream_),
                 "embedding copy");
    cuda_check(cudaStreamSynchronize(stream_), "embedding copy");
    return;
  }
  // Only each sequence's last token needs the final norm and the head (all of them in a decode
  // step, where the fused head can normalise them itself).
  if (T == S && rms && !pending_bias && !final_b_ && pending_parts.count == 0 &&
      fused_gemm(lm_head_, x, T, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_STORE, &final_w_, logits_.get(), f32)) {
    op_times_.mark("final norm+lm_head fused", stream_);
    return;
  }
  kernel_check(kernels::add_bias_norm_cuda(x, d_last_rows_, S, H, pending_bias, final_w_.get<float>(),
                                           final_b_ ? final_b_.get<float>() : nullptr, eps, final_h_.get(), dt, stream_,
                                           programmatic_, pending_parts),
               "final norm");
  op_times_.mark("final norm", stream_);
  gemm(lm_head_, final_h_.get(), S, logits_.get(), CUDA_R_32F, 0.0f);
  op_times_.mark("lm_head gemm", stream_);
}

// The MLP's up projection and activation from h_ into inter_ (the unfused path).
void CudaBackend::mlp_up(DeviceLayer &layer, int32_t T) {
  const int32_t I = static_cast<int32_t>(config_.intermediate_size);
  const auto dt = kdtype();
  if (config_.architecture == Architecture::gpt2) {
    gemm(layer.gate_up, h_.get(), T, inter_.get(), act_cuda(), 0.0f);
    kernel_check(kernels::bias_gelu_cuda(inter_.get(), layer.gate_up.bias.get<float>(), T, I, dt, stream_), "gelu");
    op_times_.mark("activation", stream_);
  } else if (skinny_swiglu_ && T <= kernels::skinny_gemm_max_tokens() && !step_adapters_) {
    skinny_swiglu(layer.gate_up, h_.get(), T, inter_.get());
    op_times_.mark("gate_up gemm+swiglu", stream_);
  } else {
    gemm(layer.gate_up, h_.get(), T, gate_up_.get(), act_cuda(), 0.0f);
    op_times_.mark("gate_up gemm", stream_);
    if (step_adapters_) {
      const int32_t l = static_cast<int32_t>(&layer - layers_.data());
      const CudaAdapters::Module ms[] = {CudaAdapters::gate_proj, CudaAdapters::up_proj};
      const int64_t cols[] = {0, I};
      adapters_->apply(l, ms, cols, 2, h_.get(), act_dl(), gate_up_.get(), act_dl(), 2 * I, T, d_row_adapter_);
      op_times_.mark("gate/up adapters", stream_);
    }
    kernel_check(kernels::swiglu_cuda(gate_up_.get(), T, I, inter_.get(), dt, stream_), "swiglu");
    op_times_.mark("activation", stream_);
  }
}

// A decode step of a few tokens (T == S <= gemv_tokens_): every linear is a fused GEMV
// (loom/kernels/gemv.hpp) that normalises its input or adds into the residual itself, so a
// layer is four GEMVs and the attention call. Biases of the output projections are added by
// their GEMV, not by the next norm.
void CudaBackend::run_layers_gemv(Instance &attention, AttentionCall &call, int32_t T, bool embed) {
  const ModelConfig &c = config_;
  const bool gpt2 = c.architecture == Architecture::gpt2;
  const auto norm = gpt2 ? kernels::GemvPrologue::layer_norm : kernels::GemvPrologue::rms_norm;
  float *x = x_.get<float>();
  auto run = [&](const kernels::GemvArgs &args, kernels::GemvPrologue prologue, kernels::GemvEpilogue epilogue,
                 const char *name) {
    kernel_check(kernels::gemv_bf16_cuda(args, prologue, epilogue, programmatic_, stream_), name);
    op_times_.mark(name, stream_);
  };
  auto normed = [&](const DeviceLinear &w, const DeviceBuffer &norm_w, const DeviceBuffer &norm_b) {
    kernels::GemvArgs g;
    g.tokens = T;
    g.in = static_cast<int32_t>(w.in);
    g.out = static_cast<int32_t>(w.out);
    g.weight = weight_of(w);
    g.bias = w.bias ? w.bias.get<float>() : nullptr;
    g.resid = x;
    g.norm_w = norm_w.get<float>();
    g.norm_b = norm_b ? norm_b.get<float>() : nullptr;
    g.eps = static_cast<float>(c.norm_eps);
    return g;
  };
  auto residual = [&](const DeviceLinear &w, const DeviceBuffer &act) {
    kernels::GemvArgs g;
    g.tokens = T;
    g.in = static_cast<int32_t>(w.in);
    g.out = static_cast<int32_t>(w.out);
    g.weight = w.weight.get();
    g.bias = w.bias ? w.bias.get<float>() : nullptr;
    g.act = act.get();
    g.out_f32 = x;
    g.resid_scale = residual_keep();
    return g;
  };
  for (int32_t l = 0; l < c.n_layers; ++l) {
    DeviceLayer &layer = layers_[static_cast<size_t>(l)];
    kernels::GemvArgs qkv = normed(layer.qkv, layer.norm1_w, layer.norm1_b);
    qkv.cos_sin = gpt2 ? nullptr : cos_sin_.get<float>();
    qkv.positions = d_positions_;
    qkv.n_heads = static_cast<int32_t>(c.n_heads);
    qkv.n_kv_heads = static_cast<int32_t>(c.n_kv_heads);
    qkv.head_dim = static_cast<int32_t>(c.head_dim);
    qkv.q = q_.get();
    qkv.k = k_.get();
    qkv.v = v_.get();
    if (embed && l == 0) {
      qkv.tokens_ids = d_tokens_;
      qkv.embed_table = embedding_.get();
      qkv.embed_pos_table = positions_ ? positions_.get() : nullptr;
    }
    run(qkv, norm, kernels::GemvEpilogue::rope_split, "norm+qkv+rope gemv");
    attend(attention, call, T, T, l);
    run(residual(layer.o, attn_), kernels::GemvPrologue::act, kernels::GemvEpilogue::add_f32, "o gemv");
    after_row_parallel(x, int64_t{T} * c.hidden_size);
    kernels::GemvArgs up = normed(layer.gate_up, layer.norm2_w, layer.norm2_b);
    up.out_act = inter_.get();
    run(up, norm, gpt2 ? kernels::GemvEpilogue::bias_gelu : kernels::GemvEpilogue::swiglu, "norm+gate_up+act gemv");
    run(residual(layer.down, inter_), kernels::GemvPrologue::act, kernels::GemvEpilogue::add_f32, "down gemv");
    after_row_parallel(x, int64_t{T} * c.hidden_size);
  }
  kernels::GemvArgs head = normed(lm_head_, final_w_, final_b_);
  head.bias = nullptr;
  head.out_f32 = logits_.get<float>();
  run(head, norm, kernels::GemvEpilogue::store_f32, "final norm+lm_head gemv");
}

DLTensor *CudaBackend::forward(const StepBatch &batch) {
  const int32_t T = batch.n_tokens(), S = batch.n_seqs();
  const bool tables = batch.table_cols > 0;
  if (T <= 0 || S <= 0 || static_cast<int32_t>(batch.seq_offsets.size()) != S + 1 ||
      (!tables && static_cast<int32_t>(batch.seq_slots.size()) != S) || batch.seq_offsets[0] != 0 || batch.seq_offsets[S] != T)
    throw runtime_error("CUDA backend: a malformed step batch");
  if (tables != paged_)
    throw runtime_error(std::string("CUDA backend: a step batch ") +
                        (paged_ ? "without block tables in paged mode" : "with block tables outside paged mode"));
  auto attention = pipeline_.list(LOOM_KIND_ATTENTION);
  if (attention.empty() || prepared_attention_ != attention.front().get() || S > max_seqs_) {
    if (paged_)
      throw runtime_error("CUDA backend: " + std::to_string(S) + " sequences in a step, more than reserve_blocks() sized (" +
                          std::to_string(max_seqs_) + "), or the attention plugin was swapped: reserve again");
    reserve(std::max(S, max_seqs_), max_positions_);
  }
  // A fed decode step's tokens are already on the device, where the sampler wrote them.
  const bool fed = batch.tokens_fed;
  shared_blocks_ = batch.shared_blocks;
  if (fed && T != S) throw runtime_error("CUDA backend: only a decode step (one token per sequence) is fed from the device");
  ensure_capacity(T, S);
  // The int32 metadata, packed for one upload.
  const size_t M = static_cast<size_t>(blocks_per_seq_);
  const size_t need = meta_entries(T, S);
  staging_half_ ^= 1; // (a fed step's tokens are in this half: token_feed handed it out)
  const int half = staging_half_;
  if (need > meta_capacity_) grow_meta(need, fed ? static_cast<size_t>(T) : 0, half);
  if (!upload_stream_) {
    cuda_check(cudaStreamCreateWithFlags(&upload_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int i = 0; i < 2; ++i) {
      cuda_check(cudaEventCreateWithFlags(&staged_[i], cudaEventDisableTiming), "cudaEventCreate");
      cuda_check(cudaEventCreateWithFlags(&used_[i], cudaEventDisableTiming), "cudaEventCreate");
      cuda_check(cudaEventRecord(staged_[i], upload_stream_), "cudaEventRecord");
      cuda_check(cudaEventRecord(used_[i], stream_), "cudaEventRecord");
    }
  }
  // This half's previous upload must be done before its host side is rewritten (the other half
  // may still be on its way: the step before this one need not have run yet).
  cuda_check(cudaEventSynchronize(staged_[half]), "step staging");
  int32_t *h = meta_host_.get<int32_t>() + static_cast<size_t>(half) * meta_capacity_;
  size_t at = 0;
  auto place = [&](size_t n, int32_t *&device_ptr) {
    device_ptr = meta_[half].get<int32_t>() + at;
    int32_t *host = h + at;
    at += n;
    return host;
  };
  int32_t *tokens = place(static_cast<size_t>(T), d_tokens_);
  int32_t *positions = place(static_cast<size_t>(T), d_positions_);
  int32_t *offsets = place(static_cast<size_t>(S) + 1, d_offsets_);
  int32_t *seq_positions = place(static_cast<size_t>(S), d_seq_positions_);
  int32_t *last_rows = place(static_cast<size_t>(S), d_last_rows_);
  int32_t *table = place(static_cast<size_t>(S) * M, d_block_table_);
  int32_t *row_adapter = adapters_on() ? place(static_cast<size_t>(T), d_row_adapter_) : nullptr;
  step_adapters_ = false;
  if (row_adapter != nullptr) {
    if (!batch.seq_adapters.empty() && batch.seq_adapters.size() != static_cast<size_t>(S))
      throw runtime_error("CUDA backend: a step batch's adapter choices do not match its sequences");
    for (int32_t s = 0; s < S; ++s) {
      const int32_t entry =
          adapters_->row_index(batch.seq_adapters.empty() ? StepBatch::kEveryAdapter : batch.seq_adapters[static_cast<size_t>(s)]);
      step_adapters_ = step_adapters_ || entry >= 0;
      for (int32_t t = batch.seq_offsets[static_cast<size_t>(s)]; t < batch.seq_offsets[static_cast<size_t>(s) + 1]; ++t)
        row_adapter[t] = entry;
    }
  }
  for (int32_t t = 0; t < T && !fed; ++t) {
    if (batch.tokens[static_cast<size_t>(t)] < 0 || batch.tokens[static_cast<size_t>(t)] >= config_.vocab_size)
      throw runtime_error("CUDA backend: token " + std::to_string(batch.tokens[static_cast<size_t>(t)]) +
                          " is outside the vocabulary");
    tokens[t] = batch.tokens[static_cast<size_t>(t)];
  }
  for (int32_t s = 0; s <= S; ++s) offsets[s] = batch.seq_offsets[static_cast<size_t>(s)];
  for (int32_t s = 0; s < S; ++s) {
    const int32_t p0 = batch.seq_positions[static_cast<size_t>(s)], slot = tables ? 0 : batch.seq_slots[static_cast<size_t>(s)];
    const int32_t begin = offsets[s], end = offsets[s + 1];
    if (end <= begin || p0 < 0 || static_cast<int64_t>(p0) + (end - begin) > max_positions_ || slot < 0 || slot >= max_seqs_)
      throw runtime_error("CUDA backend: sequence " + std::to_string(s) + " has no tokens, runs past the " +
                          std::to_string(max_positions_) + " reserved positions, or names a slot outside the cache");
    for (int32_t t = begin; t < end; ++t) positions[t] = p0 + (t - begin);
    seq_positions[s] = p0;
    last_rows[s] = end - 1;
  }
  fill_block_table(batch, static_cast<int64_t>(M), pool_blocks_, layout_.block_size, table, options_.source_name);
  // The upload waits for the last forward that read this half (two steps back), not for the one
  // in flight, and this step waits for the upload; a fed step's tokens, written on stream_ by the
  // sampler, are not part of it.
  const size_t from = fed ? static_cast<size_t>(T) : 0;
  cuda_check(cudaStreamWaitEvent(upload_stream_, used_[half], 0), "cudaStreamWaitEvent");
  cuda_check(cudaMemcpyAsync(meta_[half].get<int32_t>() + from, h + from, (at - from) * 4, cudaMemcpyHostToDevice,
                             upload_stream_),
             "step upload");
  cuda_check(cudaEventRecord(staged_[half], upload_stream_), "cudaEventRecord");
  cuda_check(cudaStreamWaitEvent(stream_, staged_[half], 0), "cudaStreamWaitEvent");

  const bool decode = T == S;
  if (decode && graphs_enabled_ && !embedding_pass_) {
    if (graphs_attention_ != attention.front()) {
      invalidate_graphs();
      graphs_attention_ = attention.front();
    }
    const int32_t key = 2 * (2 * (2 * S + half) + (step_adapters_ ? 1 : 0)) + (shared_blocks_ ? 1 : 0);
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      // The metadata pointers depend only on (T, S) and the half: a graph made now stays valid
      // for later steps of this batch size on this half, whose data is uploaded into the same
      // places.
      cudaGraph_t graph = nullptr;
      cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
      std::string failure;
      try {
        op_times_.begin("decode", stream_);
        run_model(*attention.front(), T, S);
      } catch (const Error &e) {
        failure = e.what();
      }
      cudaError_t end = cudaStreamEndCapture(stream_, &graph);
      cudaGraphExec_t exec = nullptr;
      if (failure.empty() && end == cudaSuccess && graph &&
          cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess) {
        it = graphs_.emplace(key, Graph{exec}).first;
        graph_op_names_[key] = op_times_.names();
      } else {
        if (failure.empty()) failure = cudaGetErrorString(end != cudaSuccess ? end : cudaGetLastError());
        cudaGetLastError(); // clear the sticky capture error, if any
        graphs_enabled_ = false;
        std::cerr << "[warn] " << attention.front()->slot() << " (" << attention.front()->desc().name
                  << "): decode steps could not be captured in a CUDA graph (" << failure
                  << "); running them without graphs\n";
      }
      if (graph) cudaGraphDestroy(graph);
    }
    if (it != graphs_.end()) {
      cuda_check(cudaGraphLaunch(it->second.exec, stream_), "cudaGraphLaunch");
      cuda_check(cudaEventRecord(used_[half], stream_), "cudaEventRecord");
      if (op_times_.enabled()) {
        op_times_.replayed("decode", graph_op_names_[key]);
        op_times_.end(stream_);
      }
      return logits_view_.set(logits_.get(), options_.device, DLDataType{kDLFloat, 32, 1}, {S, config_.vocab_size});
    }
  }
  op_times_.begin(decode ? "decode" : "prefill", stream_);
  run_model(*attention.front(), T, S);
  cuda_check(cudaEventRecord(used_[half], stream_), "cudaEventRecord");
  op_times_.end(stream_);
  return logits_view_.set(logits_.get(), options_.device, DLDataType{kDLFloat, 32, 1}, {S, config_.vocab_size});
}

std::vector<float> CudaBackend::embed(const StepBatch &batch, bool mean_pool) {
  if (tensor_) throw runtime_error(options_.source_name + ": embeddings are not computed under tensor parallelism");
  embedding_pass_ = true;
  struct Reset {
    bool &flag;
    ~Reset() { flag = false; }
  } reset{embedding_pass_};
  forward(batch);
  // The final norm on the host, in float32, over the rows pooling needs.
  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size, S = batch.n_seqs();
  const bool gpt2 = c.architecture == Architecture::gpt2;
  const auto download = [&](const DeviceBuffer &b) {
    std::vector<float> v(static_cast<size_t>(H));
    cuda_check(cudaMemcpy(v.data(), b.get<float>(), v.size() * sizeof(float), cudaMemcpyDeviceToHost), "embedding weights");
    return v;
  };
  const std::vector<float> w = download(final_w_), b = gpt2 ? download(final_b_) : std::vector<float>{};
  std::vector<float> out(static_cast<size_t>(S * H), 0.0f), row(static_cast<size_t>(H)), normed(static_cast<size_t>(H));
  for (int64_t s = 0; s < S; ++s) {
    const int32_t end = batch.seq_offsets[static_cast<size_t>(s) + 1];
    const int32_t begin = mean_pool ? batch.seq_offsets[static_cast<size_t>(s)] : end - 1;
    float *o = out.data() + s * H;
    for (int32_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < H; ++i)
        row[static_cast<size_t>(i)] = embed_x_[static_cast<size_t>(t * H + i)] + (embed_bias_.empty() ? 0.0f : embed_bias_[static_cast<size_t>(i)]);
      if (gpt2) ops::layer_norm(row.data(), w.data(), b.data(), H, c.norm_eps, normed.data());
      else ops::rms_norm(row.data(), w.data(), H, c.norm_eps, normed.data());
      for (int64_t i = 0; i < H; ++i) o[i] += normed[static_cast<size_t>(i)];
    }
    for (int64_t i = 0; i < H; ++i) o[i] /= static_cast<float>(end - begin);
  }
  return out;
}

} // namespace

std::unique_ptr<ModelBackend> make_cuda_backend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline,
                                                const CudaBackendOptions &options) {
  return std::make_unique<CudaBackend>(config, std::move(weights), pipeline, options);
}

} // namespace loom
