// The CUDA TrainingEngine (training_engine.hpp): the Llama family (RMSNorm, RoPE, grouped-query
// attention with an optional sliding window, SwiGLU, q/k/v and MLP biases, tied or separate
// head) and GPT-2 (LayerNorm, learned positions, Conv1D weights, GELU, tied head) trained on one
// GPU. A micro-batch of B sequences of n tokens runs as T = B n rows: the
// linears and the attention's products are cuBLAS GEMMs (the attention materialises its [n, n]
// probabilities per head, kept for the backward pass), everything else is kernels/cuda/train.cu.
//
// Precision: parameters, gradients, AdamW's moments and activations are float32. With bf16 on,
// the linears' GEMMs (forward and both backward products, the head included) take bfloat16
// copies of their operands and accumulate in float32, as autocast does; the attention's
// products run in TF32. Without it every GEMM is float32 (no TF32). Every step is deterministic (the kernels use no atomics, cuBLAS is
// deterministic on one stream), so a resumed run continues an interrupted one bit for bit.
//
// Memory: all parameters in one buffer (likewise gradients and moments), activations per layer
// sized for the largest micro-batch seen; with recomputation only one layer's activations are
// kept besides each layer's input.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <span>
#include <string>
#include <utility>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/reference_model.hpp"
#include "loom/kernels/model.hpp"
#include "loom/kernels/rows.hpp"
#include "loom/kernels/train.hpp"
#include "decoder_layout.hpp"
#include "pipeline_stages.hpp"
#include "training_engine.hpp"
#include "transformer_ops.hpp"

namespace loom {

namespace {

namespace kn = kernels;

void check(cudaError_t e, const char *what) {
  if (e != cudaSuccess) throw runtime_error(std::string("training on CUDA: ") + what + ": " + cudaGetErrorString(e));
}
void check_launch(int e, const char *what) { check(static_cast<cudaError_t>(e), what); }
void check(cublasStatus_t s, const char *what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw runtime_error(std::string("training on CUDA: ") + what + ": " + cublasGetStatusString(s));
}

// A device array, grown (never shrunk) by reserve; contents are not kept across a growth.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray &) = delete;
  DeviceArray &operator=(const DeviceArray &) = delete;
  DeviceArray(DeviceArray &&o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceArray &operator=(DeviceArray &&o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~DeviceArray() {
    if (ptr_) cudaFree(ptr_);
  }
  void reserve(size_t n) {
    if (n <= size_) return;
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    check(cudaMalloc(&ptr_, n * sizeof(T)), "cudaMalloc");
    size_ = n;
  }
  T *get() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  T *ptr_ = nullptr;
  size_t size_ = 0;
};

struct Param {
  std::string name;
  std::vector<int64_t> shape;
  size_t offset = 0, size = 0;
};

// One layer's saved activations (see layer_forward): the storage, for every micro-batch slot
// (pipeline stages keep several micro-batches in flight), and one slot's view of it.
struct LayerStore {
  DeviceArray<float> r1, mean1, h1, qs, ks, vs, p, a, x_mid, r2, mean2, h2, g, u, m;  // mean1/2: LayerNorm's (GPT-2)
};
struct LayerActs {
  float *r1, *mean1, *h1, *qs, *ks, *vs, *p, *a, *x_mid, *r2, *mean2, *h2, *g, *u, *m;
};
// Each activation's size per slot: a float per row, the hidden size, q's rows (the materialised
// path: its head-major copy; the fused one: q, k and v token-major, see qkv_rows), the head-major
// copies of k and v (materialised path only), the attention's [n, n] probabilities (fused: a
// log-sum-exp a row), its output, the MLP's width.
enum class ActSize { rows, hidden, q_rows, kv_copy, probs, attention, mlp, up };
struct ActField {
  DeviceArray<float> LayerStore::*store;
  float *LayerActs::*view;
  ActSize size;
};
constexpr ActField kActFields[] = {
    {&LayerStore::r1, &LayerActs::r1, ActSize::rows},          {&LayerStore::mean1, &LayerActs::mean1, ActSize::rows},
    {&LayerStore::h1, &LayerActs::h1, ActSize::hidden},        {&LayerStore::qs, &LayerActs::qs, ActSize::q_rows},
    {&LayerStore::ks, &LayerActs::ks, ActSize::kv_copy},       {&LayerStore::vs, &LayerActs::vs, ActSize::kv_copy},
    {&LayerStore::p, &LayerActs::p, ActSize::probs},           {&LayerStore::a, &LayerActs::a, ActSize::attention},
    {&LayerStore::x_mid, &LayerActs::x_mid, ActSize::hidden},  {&LayerStore::r2, &LayerActs::r2, ActSize::rows},
    {&LayerStore::mean2, &LayerActs::mean2, ActSize::rows},    {&LayerStore::h2, &LayerActs::h2, ActSize::hidden},
    {&LayerStore::g, &LayerActs::g, ActSize::mlp},             {&LayerStore::u, &LayerActs::u, ActSize::up},
    {&LayerStore::m, &LayerActs::m, ActSize::mlp},
};

class CudaTrainingEngine final : public TrainingEngine {
 public:
  CudaTrainingEngine(const ModelConfig &config, const ModelWeights &weights, const TrainEngineOptions &options);
  ~CudaTrainingEngine() override {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    if (blas_) cublasDestroy(blas_);
  }
  std::string describe() const override {
    return "cuda:" + std::to_string(device_) + (bf16_ ? " float32, bf16 GEMMs" : " float32") +
           (flash_ ? ", fused attention" : "");
  }
  void zero_grad() override {
    check(cudaMemsetAsync(grads_.get(), 0, total_ * sizeof(float), stream_), "zero the gradients");
  }
  double run(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) override;
  void reduce_stage_gradients() override;
  StageTime last_stage_time() const override { return stage_time_; }
  double clip_grad_norm(double max_norm) override;
  void optimizer_step(double lr) override;
  int64_t optimizer_steps() const override { return steps_; }
  const std::vector<TrainParam<float>> &host_params() override;
  std::vector<std::vector<float>> host_grads() override;
  void host_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v) override;
  void restore_optimizer(int64_t steps, std::vector<std::vector<float>> m, std::vector<std::vector<float>> v) override;
  void restore_params(const std::vector<TrainParam<float>> &) override {
    throw runtime_error("training on CUDA: restore_params is for adapters, which train on the CPU");
  }
  DLDevice device() const override { return {kDLCUDA, device_}; }
  std::vector<std::span<float>> grad_views() override {
    std::vector<std::span<float>> g;
    for (size_t i = 0; i < params_.size(); ++i) g.emplace_back(grad(i), params_[i].size);
    return g;
  }
  std::vector<std::span<float>> value_views() override {
    std::vector<std::span<float>> g;
    for (size_t i = 0; i < params_.size(); ++i) g.emplace_back(value(i), params_[i].size);
    return g;
  }
  std::span<float> flat_grads() override { return {grads_.get(), total_}; }
  void synchronize() override { check(cudaStreamSynchronize(stream_), "synchronize"); }
  void set_optimizer_shard(std::vector<bool> owned) override;

 private:
  using Layer = DecoderLayerParams;
  size_t find(const std::string &name) const {
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i].name == name) return i;
    return SIZE_MAX;
  }
  size_t need(const std::string &name) const {
    const size_t i = find(name);
    if (i == SIZE_MAX) throw runtime_error("training: the model has no tensor " + name);
    return i;
  }
  float *value(size_t i) const { return values_.get() + params_[i].offset; }
  float *grad(size_t i) const { return grads_.get() + params_[i].offset; }
  float *value_or_null(size_t i) const { return i == SIZE_MAX ? nullptr : value(i); }

  // Sizes the buffers for micro-batches of B sequences of n tokens, keeping `slots` of them
  // in flight (their activations and stage inputs and outputs; 1 without pipeline stages).
  void prepare(int64_t B, int64_t n, int64_t slots = 1);
  // A slot's activations of layer l (recomputation: one shared slot), and its residual stream
  // before local layer l (l = the stage's layer count: after the last).
  LayerActs acts(size_t l, int64_t slot);
  size_t act_floats(ActSize size) const;  // one slot's floats (B_ x n_ rows)
  float *x_at(size_t l, int64_t slot) const { return xs_[l].get() + slot * T_ * config_.hidden_size; }
  // Every sequence of `batch` checked (ids in the vocabulary, one length); returns the length.
  int64_t check_batch(std::span<const std::vector<int32_t>> batch) const;
  void upload_positions();  // GPT-2's position ids and their backward order for B_ x n_
  // The embedding of T_ tokens into x0; its backward from dx (the first stage's input gradient).
  void embed_forward(const std::vector<int32_t> &tokens, float *x0);
  void embed_backward(const std::vector<int32_t> &tokens, const float *dx, std::vector<int32_t> &index);
  // The final norm, head and cross-entropy of x_final's T_ rows against the tokens' next ones
  // (row_loss: each row's loss); with `backward` the logits' gradient, weighted, stays in logits_
  // for head_backward, which writes the gradient of x_final into dx_.
  void head_forward(const float *x_final, std::span<const std::vector<int32_t>> sequences, float *row_loss, bool backward,
                    double grad_scale);
  void head_backward(const float *x_final);
  // Pipeline parallel: run() over this stage's part of the model (PipelineStages::run_1f1b).
  double run_stages(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale);
  // The index of the embedding copy the first and last stages both hold (SIZE_MAX: none).
  size_t tied_copy() const;
  void allocate_moments();  // zeroed, on the first step or restore
  // A GEMM operand: float32, and in bf16 mode its rounded copy; ld in elements (column-major).
  struct Operand {
    const float *f32;
    const uint16_t *bf16;
    int64_t ld;
  };
  // C = op(A) op(B) + beta C (column-major, cuBLAS's convention): float32, or bfloat16 operands
  // with float32 accumulation in bf16 mode.
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const Operand &A, const Operand &B, float beta, float *C,
            int64_t ldc);
  // A parameter as an operand (bf16 mode: from the copy rounded once after each update).
  Operand weight(size_t w, int64_t ld);
  // An activation of n floats as an operand (bf16 mode: rounded into `slot`).
  Operand activation(const float *x, int64_t n, int64_t ld, DeviceArray<uint16_t> &slot);
  void batched(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *A, int64_t lda, int64_t sa,
               const float *B, int64_t ldb, int64_t sb, float *C, int64_t ldc, int64_t sc, int64_t count);
  // y[T, out] = x[T, in] W^T (+ b), beta 1 adds into y.
  void linear(const float *x, size_t w, size_t b, int64_t out, int64_t in, float *y, float beta = 0.0f);
  // dx[T, in] (= or +=, beta) dy W; dW += dy^T x; db += column sums of dy.
  void linear_backward(const float *dy, const float *x, size_t w, size_t b, int64_t out, int64_t in, float *dx,
                       float dx_beta);
  // GPT-2's Conv1D (W stored [in, out]) and its backward, as linear's.
  void conv1d(const float *x, size_t w, size_t b, int64_t in, int64_t out, float *y, float beta = 0.0f);
  void conv1d_backward(const float *dy, const float *x, size_t w, size_t b, int64_t in, int64_t out, float *dx,
                       float dx_beta);
  // Where a layer's q/k/v rows go: the fused path keeps them token-major in the layer's activations
  // (GPT-2: c_attn's [T, 3H] output; the Llama family: [T, Hq D], then k and v [T, Hkv D]); the
  // materialised one in the shared scratch (its head-major copies are what it keeps).
  struct QkvRows {
    float *q, *k, *v;
    int64_t q_stride, kv_stride;
  };
  QkvRows qkv_rows(const LayerActs &A);
  kn::FlashAttentionShape flash_shape() const {
    const ModelConfig &c = config_;
    return {static_cast<int32_t>(B_), static_cast<int32_t>(n_), static_cast<int32_t>(c.n_heads),
            static_cast<int32_t>(c.n_kv_heads), static_cast<int32_t>(c.head_dim), static_cast<int32_t>(c.sliding_window),
            1.0f / std::sqrt(static_cast<float>(c.head_dim))};
  }
  void attention_forward(const LayerActs &A, const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride);
  void attention_backward(const LayerActs &A, const float *da, float *dq, int64_t q_stride, float *dk, float *dv,
                          int64_t kv_stride);
  // dst [T, H] = x (the residual stream), plus the bias b (SIZE_MAX: none) of the product that a
  // GEMM with beta 1 then adds: one pass instead of a copy and a bias pass.
  void residual_with_bias(const float *x, size_t b, float *dst);
  void layer_forward(size_t l, const LayerActs &A, const float *x_in, float *x_out);
  void layer_backward(size_t l, const LayerActs &A, const float *x_in, float *dx);

  ModelConfig config_;
  DecoderTrainer<float>::Stage stage_;         // this rank's layers (the whole model without stages)
  const PipelineStages *pipeline_ = nullptr;   // pipeline parallel: this rank's stage (of several)
  int64_t micro_ = 1;                          // sequences per pipeline micro-batch
  int device_ = 0;
  bool bf16_ = false, recompute_ = false;
  // bf16 mode, head dims the kernels take: attention through the fused kernels
  // (flash_attention_forward_cuda / _backward_cuda), keeping each row's log-sum-exp instead of the
  // [n, n] probabilities; LOOM_TRAIN_FLASH=0 keeps the materialised path (for comparisons).
  // flash_wanted_: so configured; flash_: for the micro-batch prepared (a shape the kernels refuse
  // takes the materialised path).
  bool flash_ = false, flash_wanted_ = false;
  AdamWOptions adamw_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::vector<Param> params_;
  size_t total_ = 0, decayed_ = 0;  // all floats of the flat buffers; the first decayed_ are matrices
  DeviceArray<float> values_, grads_, moment1_, moment2_;  // AdamW's m and v
  // Where each parameter's moments start in moment1_/moment2_: its offset in the flat buffers,
  // or with a ZeRO-1 shard (sharded_) a place in compact arrays for the parameters this rank
  // owns and SIZE_MAX for the others.
  std::vector<size_t> moment_at_;
  size_t moment_total_ = 0;
  bool sharded_ = false;
  int64_t steps_ = 0;
  std::vector<Layer> layers_;
  bool gpt2_ = false;
  size_t embed_ = SIZE_MAX, final_norm_ = SIZE_MAX, head_ = SIZE_MAX;  // SIZE_MAX: another stage's
  size_t positions_ = SIZE_MAX, final_norm_b_ = SIZE_MAX;  // GPT-2's wpe and ln_f bias
  std::vector<double> inv_freq_;
  std::vector<TrainParam<float>> host_;

  // Sized by prepare for B sequences of n tokens.
  int64_t B_ = 0, n_ = 0, T_ = 0, rope_n_ = 0;
  std::vector<LayerStore> stores_;     // one per layer, or one shared with recomputation
  std::vector<DeviceArray<float>> xs_;  // the residual stream before each layer, and after the last
  DeviceArray<float> column_scratch_, qkv_, mean_final_, cos_sin_, q_, k_, v_, dp_, os_, dos_, dks_, dvs_, da_, dq_, dk_, dv_, dm_, dg_, du_, dh_, dx_,
      dw_rows_, h_final_, r_final_, logits_, row_loss_;
  DeviceArray<int32_t> tokens_, targets_, emb_index_, positions_index_, position_ids_;
  DeviceArray<double> norm_scratch_, norm_;
  DeviceArray<uint16_t> rounded_x_, rounded_dy_, weights_bf16_;  // bf16 mode's operand copies
  bool weights_stale_ = true;                                     // weights_bf16_ predates the last update
  // Pipeline stages: events around each pass (reused from run to run) and the last run's times.
  std::vector<cudaEvent_t> events_;
  StageTime stage_time_;
};

CudaTrainingEngine::CudaTrainingEngine(const ModelConfig &config, const ModelWeights &weights,
                                       const TrainEngineOptions &options)
    : config_(config), device_(options.device), bf16_(options.bf16), recompute_(options.recompute),
      adamw_(options.adamw), gpt2_(config.architecture == Architecture::gpt2) {
  if (!options.adapters.empty())
    throw runtime_error("training on CUDA: adapters train on the CPU for now (loom.device = \"cpu\")");
  if (options.tensor != nullptr) throw runtime_error("training on CUDA: tensor parallel training runs on the CPU engine so far");
  if (options.pipeline != nullptr && options.pipeline->stages() > 1) {
    pipeline_ = options.pipeline;
    stage_ = pipeline_->trainer_stage();
    micro_ = std::max<int64_t>(1, options.pipeline_micro_batch);
  }
  check(cudaSetDevice(device_), "cudaSetDevice");
  // The device's compute stream (device.cpp), where the parallel component also queues its NCCL
  // transfers: a stage's sends and receives are ordered with its passes without a wait.
  stream_ = static_cast<cudaStream_t>(cuda_compute_stream(device_));
  if (stream_ == nullptr) throw runtime_error("training on CUDA: no compute stream for device " + std::to_string(device_));
  check(cublasCreate(&blas_), "cublasCreate");
  check(cublasSetStream(blas_, stream_), "cublasSetStream");
  // Float32 GEMMs in float32 (no TF32), so that the float32 mode matches the CPU trainer.
  check(cublasSetMathMode(blas_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
  const char *flash_env = std::getenv("LOOM_TRAIN_FLASH");
  flash_wanted_ = bf16_ && kn::flash_attention_takes(static_cast<int32_t>(config_.head_dim)) &&
                  !(flash_env != nullptr && std::string(flash_env) == "0");
  flash_ = flash_wanted_;

  const bool tied = gpt2_ || config_.tie_word_embeddings;
  for (const auto &[name, shape] : expected_weights(config_)) {  // the CPU trainer's order
    if (!stage_holds(name, stage_.first, stage_.end, stage_.embedding, stage_.head, tied)) continue;
    Param p;
    p.name = name;
    p.shape = shape;
    p.size = static_cast<size_t>(std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>()));
    params_.push_back(std::move(p));
  }
  // The layout of the flat buffers: the matrices (decayed by AdamW) first, then the vectors
  // (norms, biases), so that one AdamW launch covers the model, with decay below decayed_.
  for (const bool matrices : {true, false}) {
    for (Param &p : params_) {
      if ((p.shape.size() >= 2) != matrices) continue;
      p.offset = total_;
      total_ += (p.size + 63) / 64 * 64;  // 256-byte aligned starts (the padding stays zero)
    }
    if (matrices) decayed_ = total_;
  }
  for (const auto &p : params_) moment_at_.push_back(p.offset);
  moment_total_ = total_;
  values_.reserve(total_);
  grads_.reserve(total_);
  check(cudaMemsetAsync(values_.get(), 0, total_ * sizeof(float), stream_), "cudaMemset");
  for (const auto &p : params_) {
    const HostWeight &w = weights.at(p.name);
    check(cudaMemcpyAsync(values_.get() + p.offset, w.values.data(), p.size * sizeof(float), cudaMemcpyHostToDevice,
                          stream_),
          "upload the weights");
  }
  check(cudaStreamSynchronize(stream_), "upload the weights");
  zero_grad();

  layers_ = decoder_layer_params(config_, [&](const std::string &name) { return find(name); },
                                 [&](const std::string &name) { return need(name); }, stage_.first, stage_.end);
  if (stage_.embedding || (stage_.head && tied)) embed_ = need(gpt2_ ? "wte.weight" : "model.embed_tokens.weight");
  if (stage_.head) {
    head_ = tied ? embed_ : need("lm_head.weight");
    final_norm_ = need(gpt2_ ? "ln_f.weight" : "model.norm.weight");
    if (gpt2_) final_norm_b_ = need("ln_f.bias");
  }
  if (gpt2_ && stage_.embedding) positions_ = need("wpe.weight");
  if (!gpt2_) inv_freq_ = rope_inv_freq(config_);
  norm_scratch_.reserve(kn::kSumSquaresScratch);
  norm_.reserve(1);
}

void CudaTrainingEngine::prepare(int64_t B, int64_t n, int64_t slots) {
  const ModelConfig &c = config_;
  const int64_t T = B * n, H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads,
                I = c.intermediate_size, V = c.vocab_size;
  B_ = B;
  n_ = n;
  T_ = T;
  // (a micro-batch of more sequence heads than the kernels' grid holds takes the materialised path)
  flash_ = flash_wanted_ && kn::flash_attention_takes(flash_shape());
  if (!gpt2_ && n != rope_n_) {  // the rotary table for positions 0..n-1
    const std::vector<float> table = ops::rope_cos_sin_table(inv_freq_, n, D);
    cos_sin_.reserve(table.size());
    check(cudaMemcpyAsync(cos_sin_.get(), table.data(), table.size() * sizeof(float), cudaMemcpyHostToDevice, stream_),
          "upload the rotary table");
    check(cudaStreamSynchronize(stream_), "upload the rotary table");
    rope_n_ = n;
  }
  const size_t t = static_cast<size_t>(T), heads = static_cast<size_t>(B * Hq);
  const size_t per_head = heads * static_cast<size_t>(n * D), probs = heads * static_cast<size_t>(n * n);
  stores_.resize(recompute_ ? 1 : layers_.size());
  const auto stored = static_cast<size_t>(recompute_ ? 1 : slots);  // recomputation: one scratch slot
  for (auto &S : stores_)
    for (const ActField &f : kActFields) (S.*f.store).reserve(act_floats(f.size) * stored);
  xs_.resize(layers_.size() + 1);
  for (auto &x : xs_) x.reserve(t * H * static_cast<size_t>(slots));
  // q/k/v and their gradients: GPT-2's in one [T, 3H] buffer (c_attn's output on the materialised
  // path; the fused one keeps q/k/v in the layer's activations, qkv_rows, and this buffer holds
  // their gradients), the Llama family's apart (RoPE rotates q and k in place).
  da_.reserve(t * Hq * D);
  if (gpt2_) {
    qkv_.reserve(t * 3 * H);
  } else {
    // (the fused path keeps q/k/v in the layer's activations: qkv_rows)
    q_.reserve(flash_ ? 0 : t * Hq * D);
    for (auto *b : {&k_, &v_}) b->reserve(flash_ ? 0 : t * Hkv * D);
    dq_.reserve(t * Hq * D);
    for (auto *b : {&dk_, &dv_}) b->reserve(t * Hkv * D);
    du_.reserve(t * I);
  }
  mean_final_.reserve(t);
  // column_sum_cuda's partials: the widest summed rows are the biases of the q/k/v, MLP and
  // c_attn products.
  const size_t widest = static_cast<size_t>(std::max({3 * H, I, (Hq + 2 * Hkv) * D, H}));
  column_scratch_.reserve((t + kn::kColumnSumChunk - 1) / kn::kColumnSumChunk * widest);
  dp_.reserve(flash_ ? heads * static_cast<size_t>(n) : probs);  // fused: each row's sum of dO o
  for (auto *b : {&os_, &dos_, &dks_, &dvs_}) b->reserve(flash_ ? 0 : per_head);  // the materialised path's copies
  for (auto *b : {&dm_, &dg_}) b->reserve(t * I);
  for (auto *b : {&dh_, &dx_, &dw_rows_, &h_final_}) b->reserve(t * H);
  r_final_.reserve(t);
  if (stage_.head) logits_.reserve(t * V);
  row_loss_.reserve(t);
  tokens_.reserve(t);
  targets_.reserve(t);
  emb_index_.reserve(3 * t + 1);
  positions_index_.reserve(t + 2 * static_cast<size_t>(n) + 1);
  position_ids_.reserve(t);
}

void CudaTrainingEngine::gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const Operand &A, const Operand &B,
                              float beta, float *C, int64_t ldc) {
  const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const float alpha = 1.0f;
  if (!bf16_) {
    check(cublasSgemm(blas_, oa, ob, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, A.f32,
                      static_cast<int>(A.ld), B.f32, static_cast<int>(B.ld), &beta, C, static_cast<int>(ldc)),
          "cublasSgemm");
    return;
  }
  check(cublasGemmEx(blas_, oa, ob, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, A.bf16,
                     CUDA_R_16BF, static_cast<int>(A.ld), B.bf16, CUDA_R_16BF, static_cast<int>(B.ld), &beta, C, CUDA_R_32F,
                     static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

size_t CudaTrainingEngine::act_floats(ActSize size) const {
  const ModelConfig &c = config_;
  const auto t = static_cast<size_t>(T_), heads = static_cast<size_t>(B_ * c.n_heads), n = static_cast<size_t>(n_);
  switch (size) {
    case ActSize::rows: return t;
    case ActSize::hidden: return t * static_cast<size_t>(c.hidden_size);
    case ActSize::q_rows: return (flash_ ? t * static_cast<size_t>(c.n_heads + 2 * c.n_kv_heads) : heads * n) * c.head_dim;
    case ActSize::kv_copy: return flash_ ? 0 : heads * n * static_cast<size_t>(c.head_dim);
    case ActSize::probs: return flash_ ? heads * n : heads * n * n;  // fused: each row's log-sum-exp
    case ActSize::attention: return t * static_cast<size_t>(c.n_heads * c.head_dim);
    case ActSize::mlp: return t * static_cast<size_t>(c.intermediate_size);
    case ActSize::up: return gpt2_ ? 0 : t * static_cast<size_t>(c.intermediate_size);  // GPT-2's MLP has no up projection
  }
  return 0;
}

LayerActs CudaTrainingEngine::acts(size_t l, int64_t slot) {
  LayerStore &S = stores_[recompute_ ? 0 : l];
  const auto at = static_cast<size_t>(recompute_ ? 0 : slot);
  LayerActs A{};
  for (const ActField &f : kActFields) A.*f.view = (S.*f.store).get() + at * act_floats(f.size);
  return A;
}

CudaTrainingEngine::Operand CudaTrainingEngine::weight(size_t w, int64_t ld) {
  Operand o{value(w), nullptr, ld};
  if (!bf16_) return o;
  if (weights_stale_) {  // once after each update: every parameter, rounded in one launch
    weights_bf16_.reserve(total_);
    check_launch(kn::f32_to_bf16_cuda(values_.get(), static_cast<int64_t>(total_), weights_bf16_.get(), stream_),
                 "round the weights to bfloat16");
    weights_stale_ = false;
  }
  o.bf16 = weights_bf16_.get() + params_[w].offset;
  return o;
}

CudaTrainingEngine::Operand CudaTrainingEngine::activation(const float *x, int64_t n, int64_t ld,
                                                           DeviceArray<uint16_t> &slot) {
  Operand o{x, nullptr, ld};
  if (!bf16_) return o;
  slot.reserve(static_cast<size_t>(n));
  check_launch(kn::f32_to_bf16_cuda(x, n, slot.get(), stream_), "round GEMM operands to bfloat16");
  o.bf16 = slot.get();
  return o;
}

void CudaTrainingEngine::batched(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *A,
                                 int64_t lda, int64_t sa, const float *B, int64_t ldb, int64_t sb, float *C, int64_t ldc,
                                 int64_t sc, int64_t count) {
  const float beta = 0.0f;
  // bf16 mode: the attention's products on TF32 tensor cores (10 mantissa bits, more than the
  // linears' bfloat16 operands keep), without copies of the [n, n] probabilities.
  if (bf16_) check(cublasSetMathMode(blas_, CUBLAS_TF32_TENSOR_OP_MATH), "cublasSetMathMode");
  const cublasStatus_t status = cublasSgemmStridedBatched(blas_, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(m),
                                  static_cast<int>(n), static_cast<int>(k), &alpha, A, static_cast<int>(lda), sa, B,
                                  static_cast<int>(ldb), sb, &beta, C, static_cast<int>(ldc), sc, static_cast<int>(count));
  if (bf16_) check(cublasSetMathMode(blas_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
  check(status, "cublasSgemmStridedBatched");
}

// Row-major y[T, out] = x[T, in] W[out, in]^T is, column-major, y^T = W^T' x^T: op(A) = T on W.
void CudaTrainingEngine::linear(const float *x, size_t w, size_t b, int64_t out, int64_t in, float *y, float beta) {
  gemm(true, false, out, T_, in, weight(w, in), activation(x, T_ * in, in, rounded_x_), beta, y, out);
  if (b != SIZE_MAX) check_launch(kn::bias_add_cuda(y, value(b), T_, static_cast<int32_t>(out), stream_), "bias");
}

void CudaTrainingEngine::linear_backward(const float *dy, const float *x, size_t w, size_t b, int64_t out, int64_t in,
                                         float *dx, float dx_beta) {
  const Operand d = activation(dy, T_ * out, out, rounded_dy_);  // rounded once for both products
  if (dx) gemm(false, false, in, T_, out, weight(w, in), d, dx_beta, dx, in);                       // dx = dy W
  gemm(false, true, in, out, T_, activation(x, T_ * in, in, rounded_x_), d, 1.0f, grad(w), in);  // dW += dy^T x
  if (b != SIZE_MAX)
    check_launch(kn::column_sum_cuda(dy, static_cast<int32_t>(T_), static_cast<int32_t>(out), grad(b), column_scratch_.get(),
                                     stream_),
                 "bias grad");
}

CudaTrainingEngine::QkvRows CudaTrainingEngine::qkv_rows(const LayerActs &A) {
  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  if (gpt2_) {
    float *rows = flash_ ? A.qs : qkv_.get();
    return {rows, rows + H, rows + 2 * H, 3 * H, 3 * H};
  }
  if (!flash_) return {q_.get(), k_.get(), v_.get(), Hq * D, Hkv * D};
  return {A.qs, A.qs + T_ * Hq * D, A.qs + T_ * (Hq + Hkv) * D, Hq * D, Hkv * D};
}

// Causal attention of the q/k/v rows (row strides in floats; q's heads first in its row) into
// A.a [T, Hq D]. The fused path reads the rows where they are (qkv_rows keeps them for the
// backward) and keeps each row's log-sum-exp in A.p; the materialised one keeps head-major copies
// and the probabilities.
void CudaTrainingEngine::attention_forward(const LayerActs &A, const float *q, int64_t q_stride, const float *k,
                                           const float *v, int64_t kv_stride) {
  const ModelConfig &c = config_;
  const int64_t D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, group = Hq / Hkv, n = n_, heads = B_ * Hq;
  const auto n32 = static_cast<int32_t>(n), D32 = static_cast<int32_t>(D), B32 = static_cast<int32_t>(B_);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (flash_) {
    check_launch(kn::flash_attention_forward_cuda(flash_shape(), q, q_stride, k, v, kv_stride, A.a, Hq * D, A.p, stream_),
                 "fused attention");
    return;
  }
  check_launch(kn::split_heads_cuda(q, q_stride, B32, n32, static_cast<int32_t>(Hq), D32, 1, A.qs, stream_), "split");
  check_launch(kn::split_heads_cuda(k, kv_stride, B32, n32, static_cast<int32_t>(Hkv), D32, static_cast<int32_t>(group),
                                    A.ks, stream_),
               "split");
  check_launch(kn::split_heads_cuda(v, kv_stride, B32, n32, static_cast<int32_t>(Hkv), D32, static_cast<int32_t>(group),
                                    A.vs, stream_),
               "split");
  // Scores[i][j] = scale q_i . k_j, row-major per head: column-major S^T = K Q^T.
  batched(true, false, n, n, D, scale, A.ks, D, n * D, A.qs, D, n * D, A.p, n, n * n, heads);
  check_launch(kn::causal_softmax_cuda(A.p, heads * n, n32, static_cast<int32_t>(c.sliding_window), stream_),
               "softmax");
  batched(false, false, D, n, n, 1.0f, A.vs, D, n * D, A.p, n, n * n, os_.get(), D, n * D, heads);  // O = P V
  check_launch(kn::merge_heads_cuda(os_.get(), B32, n32, static_cast<int32_t>(Hq), D32, 1, A.a, Hq * D, stream_),
               "merge");
}

// The backward of attention_forward from da [T, Hq D]: writes dq, dk, dv (row strides as given).
void CudaTrainingEngine::attention_backward(const LayerActs &A, const float *da, float *dq, int64_t q_stride, float *dk,
                                            float *dv, int64_t kv_stride) {
  const ModelConfig &c = config_;
  const int64_t D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, group = Hq / Hkv, n = n_, heads = B_ * Hq;
  const auto n32 = static_cast<int32_t>(n), D32 = static_cast<int32_t>(D), B32 = static_cast<int32_t>(B_);
  if (flash_) {  // from the rows the forward read (qkv_rows), dp_ as each row's sum of dO o
    const QkvRows r = qkv_rows(A);
    check_launch(kn::flash_attention_backward_cuda(flash_shape(), r.q, r.q_stride, r.k, r.v, r.kv_stride, A.a, da, Hq * D,
                                                   A.p, dp_.get(), dq, q_stride, dk, dv, kv_stride, stream_),
                 "fused attention backward");
    return;
  }
  check_launch(kn::split_heads_cuda(da, Hq * D, B32, n32, static_cast<int32_t>(Hq), D32, 1, dos_.get(), stream_), "split");
  batched(true, false, n, n, D, 1.0f, A.vs, D, n * D, dos_.get(), D, n * D, dp_.get(), n, n * n, heads);  // dP = dO V^T
  batched(false, true, D, n, n, 1.0f, dos_.get(), D, n * D, A.p, n, n * n, dvs_.get(), D, n * D, heads);  // dV = P^T dO
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  check_launch(kn::softmax_backward_cuda(A.p, dp_.get(), heads * n, n32, static_cast<int32_t>(c.sliding_window), scale,
                                         stream_),
               "softmax backward");
  batched(false, false, D, n, n, 1.0f, A.ks, D, n * D, dp_.get(), n, n * n, os_.get(), D, n * D, heads);   // dQ = dS K
  batched(false, true, D, n, n, 1.0f, A.qs, D, n * D, dp_.get(), n, n * n, dks_.get(), D, n * D, heads);  // dK = dS^T Q
  check_launch(kn::merge_heads_cuda(os_.get(), B32, n32, static_cast<int32_t>(Hq), D32, 1, dq, q_stride, stream_), "merge");
  check_launch(kn::merge_heads_cuda(dks_.get(), B32, n32, static_cast<int32_t>(Hkv), D32, static_cast<int32_t>(group), dk,
                                    kv_stride, stream_),
               "merge");
  check_launch(kn::merge_heads_cuda(dvs_.get(), B32, n32, static_cast<int32_t>(Hkv), D32, static_cast<int32_t>(group), dv,
                                    kv_stride, stream_),
               "merge");
}

void CudaTrainingEngine::residual_with_bias(const float *x, size_t b, float *dst) {
  const int64_t H = config_.hidden_size;
  if (b == SIZE_MAX)
    check(cudaMemcpyAsync(dst, x, static_cast<size_t>(T_ * H) * sizeof(float), cudaMemcpyDeviceToDevice, stream_), "copy");
  else
    check_launch(kn::bias_copy_cuda(x, value(b), T_, static_cast<int32_t>(H), dst, stream_), "bias");
}

void CudaTrainingEngine::layer_forward(size_t l, const LayerActs &A, const float *x_in, float *x_out) {
  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, I = c.intermediate_size;
  const auto T = static_cast<int32_t>(T_), H32 = static_cast<int32_t>(H);
  const Layer &L = layers_[l];
  const auto eps = static_cast<float>(c.norm_eps);
  if (gpt2_) {
    // x_mid = x_in + c_proj(attention(split(c_attn(ln_1(x_in))))); x_out = x_mid + c_proj(gelu(c_fc(ln_2(x_mid)))).
    check_launch(kn::layer_norm_forward_cuda(x_in, value(L.norm1), value(L.norm1_b), T, H32, eps, A.h1, A.mean1,
                                             A.r1, stream_),
                 "layer norm");
    const QkvRows r = qkv_rows(A);
    conv1d(A.h1, L.q, L.q_b, H, 3 * H, r.q);
    attention_forward(A, r.q, r.q_stride, r.k, r.v, r.kv_stride);
    residual_with_bias(x_in, L.o_b, A.x_mid);
    conv1d(A.a, L.o, SIZE_MAX, H, H, A.x_mid, 1.0f);
    check_launch(kn::layer_norm_forward_cuda(A.x_mid, value(L.norm2), value(L.norm2_b), T, H32, eps, A.h2,
                                             A.mean2, A.r2, stream_),
                 "layer norm");
    conv1d(A.h2, L.up, SIZE_MAX, H, I, A.g);  // c_fc's bias added by the GELU's pass
    check_launch(kn::gelu_forward_cuda(A.g, value_or_null(L.up_b), T_, static_cast<int32_t>(I), A.m, stream_), "gelu");
    residual_with_bias(A.x_mid, L.down_b, x_out);
    conv1d(A.m, L.down, SIZE_MAX, I, H, x_out, 1.0f);
    return;
  }
  check_launch(kn::rms_norm_forward_cuda(x_in, value(L.norm1), T, H32, eps, A.h1, A.r1, stream_), "rms norm");
  const QkvRows r = qkv_rows(A);
  linear(A.h1, L.q, L.q_b, Hq * D, H, r.q);
  linear(A.h1, L.k, L.k_b, Hkv * D, H, r.k);
  linear(A.h1, L.v, L.v_b, Hkv * D, H, r.v);
  const auto n32 = static_cast<int32_t>(n_), D32 = static_cast<int32_t>(D);
  check_launch(kn::rope_cuda(r.q, T, static_cast<int32_t>(Hq), D32, n32, cos_sin_.get(), false, stream_), "rope");
  check_launch(kn::rope_cuda(r.k, T, static_cast<int32_t>(Hkv), D32, n32, cos_sin_.get(), false, stream_), "rope");
  attention_forward(A, r.q, r.q_stride, r.k, r.v, r.kv_stride);
  residual_with_bias(x_in, L.o_b, A.x_mid);
  linear(A.a, L.o, SIZE_MAX, H, Hq * D, A.x_mid, 1.0f);
  check_launch(kn::rms_norm_forward_cuda(A.x_mid, value(L.norm2), T, H32, eps, A.h2, A.r2, stream_),
               "rms norm");
  linear(A.h2, L.gate, L.gate_b, I, H, A.g);
  linear(A.h2, L.up, L.up_b, I, H, A.u);
  check_launch(kn::swiglu_forward_cuda(A.g, A.u, T_ * I, A.m, stream_), "swiglu");
  residual_with_bias(A.x_mid, L.down_b, x_out);
  linear(A.m, L.down, SIZE_MAX, H, I, x_out, 1.0f);
}

// dx: the loss's gradient with respect to the layer's output on entry, its input on return.
void CudaTrainingEngine::layer_backward(size_t l, const LayerActs &A, const float *x_in, float *dx) {
  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, I = c.intermediate_size;
  const auto T = static_cast<int32_t>(T_), H32 = static_cast<int32_t>(H);
  const Layer &L = layers_[l];
  auto norm_backward = [&](const float *dy, const float *x, size_t w, size_t b, const float *mean, const float *r) {
    if (gpt2_) {
      check_launch(kn::layer_norm_backward_cuda(dy, x, value(w), mean, r, T, H32, dx, dw_rows_.get(), stream_),
                   "layer norm backward");
      check_launch(kn::column_sum_cuda(dy, T, H32, grad(b), column_scratch_.get(), stream_), "norm grad");
    } else {
      check_launch(kn::rms_norm_backward_cuda(dy, x, value(w), r, T, H32, dx, dw_rows_.get(), stream_), "rms norm backward");
    }
    check_launch(kn::column_sum_cuda(dw_rows_.get(), T, H32, grad(w), column_scratch_.get(), stream_), "norm grad");
  };
  if (gpt2_) {
    conv1d_backward(dx, A.m, L.down, L.down_b, I, H, dm_.get(), 0.0f);
    check_launch(kn::gelu_backward_cuda(dm_.get(), A.g, T_ * I, dg_.get(), stream_), "gelu backward");
    conv1d_backward(dg_.get(), A.h2, L.up, L.up_b, H, I, dh_.get(), 0.0f);
    norm_backward(dh_.get(), A.x_mid, L.norm2, L.norm2_b, A.mean2, A.r2);
    conv1d_backward(dx, A.a, L.o, L.o_b, H, H, da_.get(), 0.0f);
    attention_backward(A, da_.get(), qkv_.get(), 3 * H, qkv_.get() + H, qkv_.get() + 2 * H, 3 * H);
    conv1d_backward(qkv_.get(), A.h1, L.q, L.q_b, H, 3 * H, dh_.get(), 0.0f);
    norm_backward(dh_.get(), x_in, L.norm1, L.norm1_b, A.mean1, A.r1);
    return;
  }
  // MLP: x_out = x_mid + down(silu(gate(h2)) * up(h2)), h2 = norm2(x_mid).
  linear_backward(dx, A.m, L.down, L.down_b, H, I, dm_.get(), 0.0f);
  check_launch(kn::swiglu_backward_cuda(dm_.get(), A.g, A.u, T_ * I, dg_.get(), du_.get(), stream_),
               "swiglu backward");
  linear_backward(dg_.get(), A.h2, L.gate, L.gate_b, I, H, dh_.get(), 0.0f);
  linear_backward(du_.get(), A.h2, L.up, L.up_b, I, H, dh_.get(), 1.0f);
  norm_backward(dh_.get(), A.x_mid, L.norm2, SIZE_MAX, nullptr, A.r2);
  // Attention: x_mid = x_in + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm1(x_in).
  linear_backward(dx, A.a, L.o, L.o_b, H, Hq * D, da_.get(), 0.0f);
  attention_backward(A, da_.get(), dq_.get(), Hq * D, dk_.get(), dv_.get(), Hkv * D);
  const auto n32 = static_cast<int32_t>(n_), D32 = static_cast<int32_t>(D);
  check_launch(kn::rope_cuda(dq_.get(), T, static_cast<int32_t>(Hq), D32, n32, cos_sin_.get(), true, stream_), "rope");
  check_launch(kn::rope_cuda(dk_.get(), T, static_cast<int32_t>(Hkv), D32, n32, cos_sin_.get(), true, stream_), "rope");
  linear_backward(dq_.get(), A.h1, L.q, L.q_b, Hq * D, H, dh_.get(), 0.0f);
  linear_backward(dk_.get(), A.h1, L.k, L.k_b, Hkv * D, H, dh_.get(), 1.0f);
  linear_backward(dv_.get(), A.h1, L.v, L.v_b, Hkv * D, H, dh_.get(), 1.0f);
  norm_backward(dh_.get(), x_in, L.norm1, SIZE_MAX, nullptr, A.r1);
}

// GPT-2's Conv1D: row-major y[T, out] = x[T, in] W[in, out] (+ b): column-major y^T = W^T' x^T
// with W read as it is stored.
void CudaTrainingEngine::conv1d(const float *x, size_t w, size_t b, int64_t in, int64_t out, float *y, float beta) {
  gemm(false, false, out, T_, in, weight(w, out), activation(x, T_ * in, in, rounded_x_), beta, y, out);
  if (b != SIZE_MAX) check_launch(kn::bias_add_cuda(y, value(b), T_, static_cast<int32_t>(out), stream_), "bias");
}

void CudaTrainingEngine::conv1d_backward(const float *dy, const float *x, size_t w, size_t b, int64_t in, int64_t out,
                                         float *dx, float dx_beta) {
  const Operand d = activation(dy, T_ * out, out, rounded_dy_);
  gemm(true, false, in, T_, out, weight(w, out), d, dx_beta, dx, in);                           // dx = dy W^T
  gemm(false, true, out, in, T_, d, activation(x, T_ * in, in, rounded_x_), 1.0f, grad(w), out);  // dW += x^T dy
  if (b != SIZE_MAX)
    check_launch(kn::column_sum_cuda(dy, static_cast<int32_t>(T_), static_cast<int32_t>(out), grad(b), column_scratch_.get(),
                                     stream_),
                 "bias grad");
}

int64_t CudaTrainingEngine::check_batch(std::span<const std::vector<int32_t>> batch) const {
  const ModelConfig &c = config_;
  const auto n = static_cast<int64_t>(batch.front().size());
  if (n < 2) throw runtime_error("training: a sequence needs at least two tokens");
  if (n > c.max_positions)
    throw runtime_error("training: a sequence of " + std::to_string(n) + " tokens exceeds the model's " +
                        std::to_string(c.max_positions) + " positions");
  for (const auto &seq : batch) {
    if (static_cast<int64_t>(seq.size()) != n)
      throw runtime_error("training on CUDA: the sequences of a batch must have the same length");
    for (const int32_t id : seq)
      if (id < 0 || id >= c.vocab_size) throw runtime_error("training: token " + std::to_string(id) + " is outside the vocabulary");
  }
  return n;
}

void CudaTrainingEngine::upload_positions() {
  // Each row's position, and for the backward pass each position's rows in order (as the
  // tokens' in embed_backward: rows, run starts, positions).
  const int64_t B = B_, n = n_, T = T_;
  std::vector<int32_t> pos(static_cast<size_t>(T)), runs;
  for (int64_t t = 0; t < T; ++t) pos[static_cast<size_t>(t)] = static_cast<int32_t>(t % n);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t b = 0; b < B; ++b) runs.push_back(static_cast<int32_t>(b * n + p));
  for (int64_t p = 0; p <= n; ++p) runs.push_back(static_cast<int32_t>(p * B));
  for (int64_t p = 0; p < n; ++p) runs.push_back(static_cast<int32_t>(p));
  check(cudaMemcpyAsync(position_ids_.get(), pos.data(), pos.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "upload");
  check(cudaMemcpyAsync(positions_index_.get(), runs.data(), runs.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "upload");
  check(cudaStreamSynchronize(stream_), "upload");  // the host vectors go out of scope
}

void CudaTrainingEngine::embed_forward(const std::vector<int32_t> &tokens, float *x0) {
  check(cudaMemcpyAsync(tokens_.get(), tokens.data(), tokens.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "upload");
  check_launch(kn::embed_rows_cuda(tokens_.get(), gpt2_ ? position_ids_.get() : nullptr, static_cast<int32_t>(T_),
                                   static_cast<int32_t>(config_.hidden_size), value(embed_),
                                   gpt2_ ? value(positions_) : nullptr, kn::Dtype::f32, x0, stream_),
               "embedding");
}

void CudaTrainingEngine::embed_backward(const std::vector<int32_t> &tokens, const float *dx, std::vector<int32_t> &index) {
  // Each token's rows summed in position order (no atomics): positions sorted by token, the
  // start of each token's run, and the tokens. `index` holds them until the copy has run.
  const auto T32 = static_cast<int32_t>(T_), H32 = static_cast<int32_t>(config_.hidden_size);
  std::vector<int32_t> order(static_cast<size_t>(T_));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return tokens[static_cast<size_t>(a)] < tokens[static_cast<size_t>(b)]; });
  std::vector<int32_t> starts, unique;
  for (int32_t k = 0; k < T32; ++k) {
    const int32_t token = tokens[static_cast<size_t>(order[static_cast<size_t>(k)])];
    if (k == 0 || token != unique.back()) {
      starts.push_back(k);
      unique.push_back(token);
    }
  }
  starts.push_back(T32);
  index = std::move(order);
  index.insert(index.end(), starts.begin(), starts.end());
  index.insert(index.end(), unique.begin(), unique.end());
  check(cudaMemcpyAsync(emb_index_.get(), index.data(), index.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "upload");
  const int32_t *idx = emb_index_.get();
  check_launch(kn::embedding_backward_cuda(dx, idx, idx + T_, idx + T_ + starts.size(), static_cast<int32_t>(unique.size()),
                                           H32, grad(embed_), stream_),
               "embedding backward");
  if (gpt2_) {
    const int32_t *runs = positions_index_.get();
    check_launch(kn::embedding_backward_cuda(dx, runs, runs + T_, runs + T_ + n_ + 1, static_cast<int32_t>(n_), H32,
                                             grad(positions_), stream_),
                 "position embedding backward");
  }
}

void CudaTrainingEngine::head_forward(const float *x_final, std::span<const std::vector<int32_t>> sequences, float *row_loss,
                                      bool backward, double grad_scale) {
  const ModelConfig &c = config_;
  const auto T32 = static_cast<int32_t>(T_), H32 = static_cast<int32_t>(c.hidden_size);
  std::vector<int32_t> targets;  // each row's next token, -1 after the last
  targets.reserve(static_cast<size_t>(T_));
  for (const auto &seq : sequences)
    for (size_t t = 0; t < seq.size(); ++t) targets.push_back(t + 1 < seq.size() ? seq[t + 1] : -1);
  check(cudaMemcpyAsync(targets_.get(), targets.data(), targets.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "upload");
  const auto eps = static_cast<float>(c.norm_eps);
  if (gpt2_)
    check_launch(kn::layer_norm_forward_cuda(x_final, value(final_norm_), value(final_norm_b_), T32, H32, eps, h_final_.get(),
                                             mean_final_.get(), r_final_.get(), stream_),
                 "layer norm");
  else
    check_launch(kn::rms_norm_forward_cuda(x_final, value(final_norm_), T32, H32, eps, h_final_.get(), r_final_.get(), stream_),
                 "rms norm");
  linear(h_final_.get(), head_, SIZE_MAX, c.vocab_size, c.hidden_size, logits_.get());
  const auto weight = static_cast<float>(grad_scale / static_cast<double>(n_ - 1));
  check_launch(kn::cross_entropy_cuda(logits_.get(), targets_.get(), T32, static_cast<int32_t>(c.vocab_size), weight,
                                      backward, row_loss, stream_),
               "cross entropy");
}

void CudaTrainingEngine::head_backward(const float *x_final) {
  const ModelConfig &c = config_;
  const auto T32 = static_cast<int32_t>(T_), H32 = static_cast<int32_t>(c.hidden_size);
  check(cudaMemsetAsync(dx_.get(), 0, static_cast<size_t>(T_ * c.hidden_size) * sizeof(float), stream_), "cudaMemset");
  linear_backward(logits_.get(), h_final_.get(), head_, SIZE_MAX, c.vocab_size, c.hidden_size, dh_.get(), 0.0f);
  if (gpt2_) {
    check_launch(kn::layer_norm_backward_cuda(dh_.get(), x_final, value(final_norm_), mean_final_.get(), r_final_.get(), T32,
                                              H32, dx_.get(), dw_rows_.get(), stream_),
                 "layer norm backward");
    check_launch(kn::column_sum_cuda(dh_.get(), T32, H32, grad(final_norm_b_), column_scratch_.get(), stream_), "norm grad");
  } else {
    check_launch(kn::rms_norm_backward_cuda(dh_.get(), x_final, value(final_norm_), r_final_.get(), T32, H32, dx_.get(),
                                            dw_rows_.get(), stream_),
                 "rms norm backward");
  }
  check_launch(kn::column_sum_cuda(dw_rows_.get(), T32, H32, grad(final_norm_), column_scratch_.get(), stream_), "norm grad");
}

// The mean over each sequence's n - 1 predicted rows, summed over the sequences.
double sum_of_means(const std::vector<float> &losses, int64_t sequences, int64_t n) {
  double sum = 0;
  for (int64_t b = 0; b < sequences; ++b) {
    double seq = 0;
    for (int64_t t = 0; t < n - 1; ++t) seq += static_cast<double>(losses[static_cast<size_t>(b * n + t)]);
    sum += seq / static_cast<double>(n - 1);
  }
  return sum;
}

double CudaTrainingEngine::run(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) {
  if (batch.empty()) return 0.0;
  const int64_t n = check_batch(batch);
  check(cudaSetDevice(device_), "cudaSetDevice");
  if (pipeline_) return run_stages(batch, backward, grad_scale);
  const auto B = static_cast<int64_t>(batch.size());
  prepare(B, n);
  if (gpt2_) upload_positions();
  std::vector<int32_t> tokens, index;
  tokens.reserve(static_cast<size_t>(B * n));
  for (const auto &seq : batch) tokens.insert(tokens.end(), seq.begin(), seq.end());
  embed_forward(tokens, x_at(0, 0));
  const size_t L = layers_.size();
  for (size_t l = 0; l < L; ++l) layer_forward(l, acts(l, 0), x_at(l, 0), x_at(l + 1, 0));
  head_forward(x_at(L, 0), batch, row_loss_.get(), backward, grad_scale);
  if (backward) {
    head_backward(x_at(L, 0));
    for (size_t l = L; l-- > 0;) {
      const LayerActs A = acts(l, 0);
      if (recompute_) layer_forward(l, A, x_at(l, 0), x_at(l + 1, 0));
      layer_backward(l, A, x_at(l, 0), dx_.get());
    }
    embed_backward(tokens, dx_.get(), index);
  }
  std::vector<float> losses(static_cast<size_t>(B * n));
  check(cudaMemcpyAsync(losses.data(), row_loss_.get(), losses.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
        "download the losses");
  check(cudaStreamSynchronize(stream_), "a training step");
  return sum_of_means(losses, B, n);
}

double CudaTrainingEngine::run_stages(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) {
  // Micro-batches of k sequences. A stage keeps at most (stages - stage) micro-batches in
  // flight under 1F1B, so as many activation slots; micro-batch i uses slot i mod slots.
  const PipelineStages &P = *pipeline_;
  const auto B = static_cast<int64_t>(batch.size()), n = static_cast<int64_t>(batch.front().size());
  const int64_t k = PipelineStages::micro_batch_size(B, micro_, backward);
  const int64_t M = B / k;
  const int64_t slots = backward ? std::min<int64_t>(M, P.stages() - P.stage()) : 1;
  prepare(k, n, slots);
  if (P.last()) row_loss_.reserve(static_cast<size_t>(B * n));  // every micro-batch's, read at the end
  if (gpt2_ && P.first()) upload_positions();
  const size_t L = layers_.size();
  // Events: the run's start, then a pair around each pass (its compute, not its transfers).
  const size_t needed = 2 + 2 * static_cast<size_t>(backward ? 2 * M : M);
  while (events_.size() < needed) {
    cudaEvent_t e = nullptr;
    check(cudaEventCreate(&e), "cudaEventCreate");
    events_.push_back(e);
  }
  size_t next_event = 0;
  const std::function<void()> mark = [&] { check(cudaEventRecord(events_[next_event++], stream_), "cudaEventRecord"); };

  struct Passes final : PipelineStages::MicroBatches {
    CudaTrainingEngine &e;
    std::span<const std::vector<int32_t>> batch;
    bool training;
    double grad_scale;
    int64_t n, k, slots;
    size_t L;
    const std::function<void()> &mark;
    std::vector<std::vector<int32_t>> index;  // the embedding backward's, kept until the run ends
    Passes(CudaTrainingEngine &engine, std::span<const std::vector<int32_t>> b, bool bw, double scale, int64_t len,
           int64_t per, int64_t s, size_t layers, const std::function<void()> &m)
        : e(engine), batch(b), training(bw), grad_scale(scale), n(len), k(per), slots(s), L(layers), mark(m),
          index(b.size()) {}
    DLDevice device() const override { return {kDLCUDA, e.device_}; }
    size_t count(int64_t) override { return static_cast<size_t>(k * n * e.config_.hidden_size); }
    float *input(int64_t i) override { return e.x_at(0, i % slots); }
    const float *output(int64_t i) override { return e.x_at(L, i % slots); }
    float *output_grad(int64_t) override { return e.dx_.get(); }
    const float *input_grad(int64_t) override { return e.dx_.get(); }
    std::span<const std::vector<int32_t>> sequences(int64_t i) const {
      return batch.subspan(static_cast<size_t>(i * k), static_cast<size_t>(k));
    }
    std::vector<int32_t> tokens(int64_t i) const {
      std::vector<int32_t> t;
      for (const auto &seq : sequences(i)) t.insert(t.end(), seq.begin(), seq.end());
      return t;
    }
    void forward(int64_t i) override {
      const int64_t slot = i % slots;
      mark();
      if (e.stage_.embedding) e.embed_forward(tokens(i), e.x_at(0, slot));
      for (size_t l = 0; l < L; ++l) e.layer_forward(l, e.acts(l, slot), e.x_at(l, slot), e.x_at(l + 1, slot));
      if (e.stage_.head) e.head_forward(e.x_at(L, slot), sequences(i), e.row_loss_.get() + i * k * n, training, grad_scale);
      mark();
    }
    void backward(int64_t i) override {
      const int64_t slot = i % slots;
      mark();
      if (e.stage_.head) e.head_backward(e.x_at(L, slot));  // else dx_ holds the next stage's gradient
      for (size_t l = L; l-- > 0;) {
        const LayerActs A = e.acts(l, slot);
        if (e.recompute_) e.layer_forward(l, A, e.x_at(l, slot), e.x_at(l + 1, slot));
        e.layer_backward(l, A, e.x_at(l, slot), e.dx_.get());
      }
      if (e.stage_.embedding) e.embed_backward(tokens(i), e.dx_.get(), index[static_cast<size_t>(i)]);
      mark();
    }
  };
  mark();
  Passes passes(*this, batch, backward, grad_scale, n, k, slots, L, mark);
  P.run_1f1b(M, backward, passes);
  mark();
  std::vector<float> losses(P.last() ? static_cast<size_t>(B * n) : 0);  // the last stage's
  if (!losses.empty())
    check(cudaMemcpyAsync(losses.data(), row_loss_.get(), losses.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "download the losses");
  check(cudaStreamSynchronize(stream_), "a pipeline step");
  const double sum = losses.empty() ? 0.0 : sum_of_means(losses, B, n);
  // Busy: the passes' own time; wall: from the run's first queued work to its last.
  float ms = 0;
  double busy = 0;
  for (size_t e = 1; e + 2 < next_event; e += 2) {
    check(cudaEventElapsedTime(&ms, events_[e], events_[e + 1]), "cudaEventElapsedTime");
    busy += ms;
  }
  check(cudaEventElapsedTime(&ms, events_[0], events_[next_event - 1]), "cudaEventElapsedTime");
  stage_time_ = {busy / 1e3, static_cast<double>(ms) / 1e3};
  return P.broadcast(sum, P.stages() - 1);
}

size_t CudaTrainingEngine::tied_copy() const {
  if (!pipeline_ || !(gpt2_ || config_.tie_word_embeddings) || !(pipeline_->first() || pipeline_->last())) return SIZE_MAX;
  return embed_;
}

void CudaTrainingEngine::reduce_stage_gradients() {
  // A tied embedding: the first stage's (input) and the last stage's (head) gradients, exchanged
  // and added on both (IEEE addition commutes: both copies stay bit-identical).
  const size_t tied = tied_copy();
  if (tied == SIZE_MAX) return;
  const size_t count = params_[tied].size;
  column_scratch_.reserve(count);  // free between steps
  const int32_t other = pipeline_->first() ? pipeline_->stages() - 1 : 0;
  pipeline_->exchange(grad(tied), count, other, column_scratch_.get(), count, other, device());
  check_launch(kn::accumulate_cuda(grad(tied), column_scratch_.get(), static_cast<int64_t>(count), stream_), "tied gradient");
}

double CudaTrainingEngine::clip_grad_norm(double max_norm) {
  // The squares of every gradient this stage holds; a pipeline's stages sum theirs, the last
  // stage leaving out its copy of a tied embedding (the first stage's counts it).
  const auto squares = [&](size_t begin, size_t end) {
    if (end <= begin) return 0.0;
    check_launch(kn::sum_squares_cuda(grads_.get() + begin, static_cast<int64_t>(end - begin), norm_scratch_.get(),
                                      norm_.get(), stream_),
                 "gradient norm");
    double sq = 0;
    check(cudaMemcpyAsync(&sq, norm_.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_), "gradient norm");
    check(cudaStreamSynchronize(stream_), "gradient norm");
    return sq;
  };
  double sq = 0;
  const size_t tied = pipeline_ && pipeline_->last() ? tied_copy() : SIZE_MAX;
  if (tied == SIZE_MAX) {
    sq = squares(0, total_);
  } else {
    const size_t from = params_[tied].offset, to = from + params_[tied].size;
    sq = squares(0, from) + squares(to, total_);
  }
  if (pipeline_) sq = pipeline_->sum(sq);
  const double norm = std::sqrt(sq);
  if (norm > max_norm && norm > 0)
    check_launch(kn::scale_cuda(grads_.get(), static_cast<int64_t>(total_), static_cast<float>(max_norm / (norm + 1e-6)),
                                stream_),
                 "clip");
  return norm;
}

void CudaTrainingEngine::set_optimizer_shard(std::vector<bool> owned) {
  if (owned.size() != params_.size()) throw runtime_error("training on CUDA: the ZeRO ownership mask does not match the parameters");
  if (moment1_.size() != 0) throw runtime_error("training on CUDA: the optimizer state is sharded before the first step");
  sharded_ = true;
  moment_total_ = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    moment_at_[i] = owned[i] ? moment_total_ : SIZE_MAX;
    if (owned[i]) moment_total_ += params_[i].size;
  }
}

void CudaTrainingEngine::allocate_moments() {
  if (moment1_.size() != 0) return;
  moment1_.reserve(std::max<size_t>(moment_total_, 1));  // a rank owning nothing still has "moments"
  moment2_.reserve(std::max<size_t>(moment_total_, 1));
  check(cudaMemsetAsync(moment1_.get(), 0, moment_total_ * sizeof(float), stream_), "cudaMemset");
  check(cudaMemsetAsync(moment2_.get(), 0, moment_total_ * sizeof(float), stream_), "cudaMemset");
}

void CudaTrainingEngine::optimizer_step(double lr) {
  allocate_moments();
  ++steps_;
  weights_stale_ = true;
  const double b1 = adamw_.beta1, b2 = adamw_.beta2;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(steps_)), c2 = 1.0 - std::pow(b2, static_cast<double>(steps_));
  if (!sharded_) {
    // One launch for every parameter (padding between them is zero and stays zero).
    check_launch(kn::adamw_cuda(values_.get(), grads_.get(), moment1_.get(), moment2_.get(), static_cast<int64_t>(total_),
                                static_cast<int64_t>(decayed_), lr, b1, b2, adamw_.eps, adamw_.weight_decay, c1, c2, stream_),
                 "AdamW");
    return;
  }
  // ZeRO-1: a launch per parameter this rank owns (matrices, below decayed_, are decayed).
  for (size_t i = 0; i < params_.size(); ++i) {
    if (moment_at_[i] == SIZE_MAX) continue;
    const auto n = static_cast<int64_t>(params_[i].size);
    check_launch(kn::adamw_cuda(value(i), grad(i), moment1_.get() + moment_at_[i], moment2_.get() + moment_at_[i], n,
                                params_[i].offset < decayed_ ? n : 0, lr, b1, b2, adamw_.eps, adamw_.weight_decay, c1, c2,
                                stream_),
                 "AdamW");
  }
}

const std::vector<TrainParam<float>> &CudaTrainingEngine::host_params() {
  host_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    host_[i].name = params_[i].name;
    host_[i].shape = params_[i].shape;
    host_[i].value.resize(params_[i].size);
    check(cudaMemcpyAsync(host_[i].value.data(), value(i), params_[i].size * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "download the parameters");
  }
  check(cudaStreamSynchronize(stream_), "download the parameters");
  return host_;
}

std::vector<std::vector<float>> CudaTrainingEngine::host_grads() {
  std::vector<std::vector<float>> g;
  for (size_t i = 0; i < params_.size(); ++i) {
    g.emplace_back(params_[i].size);
    check(cudaMemcpyAsync(g.back().data(), grad(i), params_[i].size * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "download the gradients");
  }
  check(cudaStreamSynchronize(stream_), "download the gradients");
  return g;
}

void CudaTrainingEngine::host_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v) {
  m.clear();
  v.clear();
  if (moment1_.size() == 0) return;
  for (size_t i = 0; i < params_.size(); ++i) {
    const size_t at = moment_at_[i], n = at == SIZE_MAX ? 0 : params_[i].size;  // a shard: others' are empty
    m.emplace_back(n);
    v.emplace_back(n);
    if (n == 0) continue;
    check(cudaMemcpyAsync(m.back().data(), moment1_.get() + at, n * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "download the moments");
    check(cudaMemcpyAsync(v.back().data(), moment2_.get() + at, n * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "download the moments");
  }
  check(cudaStreamSynchronize(stream_), "download the moments");
}

void CudaTrainingEngine::restore_optimizer(int64_t steps, std::vector<std::vector<float>> m,
                                           std::vector<std::vector<float>> v) {
  steps_ = steps;
  if (m.empty()) return;
  if (m.size() != params_.size() || v.size() != params_.size())
    throw runtime_error("training on CUDA: the optimizer state does not match the parameters");
  allocate_moments();
  for (size_t i = 0; i < params_.size(); ++i) {
    if (m[i].size() != params_[i].size || v[i].size() != params_[i].size)
      throw runtime_error("training on CUDA: the optimizer state of " + params_[i].name + " has the wrong size");
    const size_t at = moment_at_[i];
    if (at == SIZE_MAX) continue;  // another rank's share (ZeRO-1)
    check(cudaMemcpyAsync(moment1_.get() + at, m[i].data(), params_[i].size * sizeof(float), cudaMemcpyHostToDevice, stream_),
          "upload the moments");
    check(cudaMemcpyAsync(moment2_.get() + at, v[i].data(), params_[i].size * sizeof(float), cudaMemcpyHostToDevice, stream_),
          "upload the moments");
  }
  check(cudaStreamSynchronize(stream_), "upload the moments");
}

}  // namespace

std::unique_ptr<TrainingEngine> make_cuda_training_engine(const ModelConfig &config, const ModelWeights &weights,
                                                          const TrainEngineOptions &options) {
  return std::make_unique<CudaTrainingEngine>(config, weights, options);
}

}  // namespace loom
