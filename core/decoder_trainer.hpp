// Private to core: the first piece of the training engine ([Training]): a decoder of a supported
// architecture (the Llama family: Llama, Mistral, Qwen2, tied or separate head, q/k/v and MLP
// biases when the config has them; and GPT-2: LayerNorm, learned positions, Conv1D weights,
// GELU, tied head) whose forward pass keeps its activations and whose backward pass computes the
// gradient of the mean next-token cross-entropy for every parameter, on the CPU, with the
// operations of grad_ops.hpp; an AdamW optimizer and gradient clipping over its parameters.
//
// The scalar type is a template parameter: float to train, double for the finite-difference
// checks (tests/core/train_grad_test.cpp). Its forward pass is the same model as ReferenceModel
// (checked against it) with attention computed by the core, or, attached (attach_attention), by
// an attention component's forward and backward (attention.h; float only).
//
// Ownership: a trainer owns copies of its parameters and their gradients. Thread-safety: none.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "decoder_layout.hpp"
#include "loom/core/instance.hpp"
#include "loom/loom_plugin_api.h"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "thread_pool.hpp"

namespace loom {

template <class T>
struct TrainParam {
  std::string name;              // the checkpoint's ("model.layers.0.self_attn.q_proj.weight")
  std::vector<int64_t> shape;
  std::vector<T> value, grad;    // row-major, same size
};

template <class T>
class DecoderTrainer {
 public:
  // A pipeline stage ([Parallel]): decoder layers [first, end) (end < 0: to the last), with the
  // embedding (first stage) and the final norm and head (last stage; with a tied head it holds
  // the embedding too). The default is the whole model.
  struct Stage {
    int64_t first = 0, end = -1;
    bool embedding = true, head = true;
  };
  // Copies every weight of `stage` the config expects out of `weights` (as T). Throws
  // loom::Error for a missing tensor.
  DecoderTrainer(const ModelConfig &config, const ModelWeights &weights, Stage stage = {});
  const Stage &stage() const { return stage_; }

  const ModelConfig &config() const { return config_; }
  std::vector<TrainParam<T>> &params() { return params_; }
  TrainParam<T> &param(std::string_view name);
  void zero_grad();
  // Activation recomputation: keep only each layer's input during the forward pass and
  // recompute the rest layer by layer in the backward pass (less memory, one more forward).
  // The gradients are the same bit for bit.
  void set_recompute(bool on) { recompute_ = on; }
  // Threads for the matrix and attention loops (1: none; 0: one per hardware thread). The
  // results do not depend on it: every element is summed in the same order.
  void set_threads(int32_t threads);

  // Adapters ([PEFT]): each adapter instance is attached to the linears of the Llama family it
  // targets; after such a linear's forward it adds its delta (training mode), and its backward
  // adds into the input's gradient and its own parameters' (float only; GPT-2 is refused).
  void attach_adapters(const std::vector<std::shared_ptr<Instance>> &adapters);
  // An attention component computes each layer's attention and its gradients (its forward over
  // a scratch KV cache of the sequence, then its `backward`), prepared here for the model's
  // geometry (float only; not with tensor parallelism or a prefix adapter). Refused, by name,
  // when the component has no backward.
  void attach_attention(std::shared_ptr<Instance> attention);
  // A frozen base computes no gradients for the model's linears, biases, embedding and head
  // (only what flows to the adapters; norms' weights still get theirs, unused).
  void set_frozen_base(bool frozen) { frozen_ = frozen; }
  // QLoRA-style ([PEFT] item 2): the frozen base's layer linears (q/k/v/o and the MLP's) are
  // handed to the quantizer and their float values and gradients released; their forward runs
  // through the quantizer's linear and their backward (the input's gradient only) through its
  // dequantized weight, one linear at a time. Embedding, head and norms stay float. Needs a
  // frozen base (set_frozen_base first); float only, Llama family.
  void quantize_base(std::shared_ptr<Instance> quantizer);
  ~DecoderTrainer();
  DecoderTrainer(const DecoderTrainer &) = delete;
  DecoderTrainer &operator=(const DecoderTrainer &) = delete;

  // The mean cross-entropy of predicting tokens[t + 1] after tokens[0..t], over t < n - 1 (at
  // least two tokens). With `backward`, its gradient times `grad_scale` is added into every
  // parameter's grad (a scale of 1 / sequences averages a batch of sequences).
  double loss(const std::vector<int32_t> &tokens, bool backward, double grad_scale = 1.0);
  // Data parallel training ([Parallel]): called during each backward pass after layer l's
  // gradients are complete for this sequence (the parameters named "layers.<l>."), from the last
  // layer down, then with -1 once every gradient is (embeddings, head, shared adapter
  // parameters). Empty: none.
  void set_layer_hook(std::function<void(int64_t)> hook) { layer_done_ = std::move(hook); }
  // Tensor parallelism ([Parallel], Llama family, no adapters): the trainer was built with one
  // rank's config and weights (tensor_shards.hpp: its heads, its share of the MLP's width and of
  // the vocabulary, which starts at vocab_begin of vocab_full); `reduce` sums a buffer over the
  // tensor group (with `max`: takes the maximum). The forward pass sums the row-parallel outputs
  // (o, down) and the embedding, the loss is the vocabulary-parallel cross-entropy, the backward
  // pass sums the column-parallel inputs' gradients.
  struct TensorGroup {
    int64_t vocab_begin = 0, vocab_full = 0;
    std::function<void(T *, size_t, bool max)> reduce;
    // Whether this rank adds the row-parallel linears' biases (GPT-2's c_proj), which the sum
    // over the group must count once: tensor rank 0's.
    bool row_bias = true;
  };
  void set_tensor_group(TensorGroup group);
  // Pipeline stages: one micro-batch's forward pass through this stage, from the token ids on
  // the first stage, else from x_in (the previous stage's output, [n, hidden]); its activations
  // stay under `id` until stage_backward(id) (or drop(id)). Returns the stage's output for the
  // next stage; the last stage returns nothing and sets *loss to the mean cross-entropy and, with
  // `backward`, keeps its logits' gradient times grad_scale. tokens are needed on the first and
  // last stages.
  std::vector<T> stage_forward(int64_t id, const std::vector<int32_t> &tokens, const std::vector<T> *x_in, bool backward,
                               double grad_scale, double *loss);
  // Its backward pass from d_out (the next stage's input gradient; null on the last stage): adds
  // every gradient, drops the activations and returns the gradient of the stage's input (empty on
  // the first stage).
  std::vector<T> stage_backward(int64_t id, const std::vector<T> *d_out);
  void drop(int64_t id);
  // Logits [n, vocab] after each position (the forward pass alone).
  std::vector<T> logits(const std::vector<int32_t> &tokens);

 private:
  using Layer = DecoderLayerParams;
  struct Acts;
  // The stage's forward pass (x_in: the previous stage's output, null on the first stage).
  void forward(const std::vector<int32_t> &tokens, Acts &acts, const std::vector<T> *x_in = nullptr);
  // Adds the gradient of the loss whose top gradient is `dtop` (the logits' on the last stage,
  // else the stage output's) into every grad; a stage without the embedding leaves its input's
  // gradient in acts.d_input.
  void backward_llama(const std::vector<int32_t> &tokens, Acts &acts, const std::vector<T> &dtop);
  void backward_gpt2(const std::vector<int32_t> &tokens, Acts &acts, const std::vector<T> &dtop);
  // One layer's forward pass on the residual stream x (updated), its activations into `layer`
  // (an Acts::PerLayer: a template, so declared through a void-free forward declaration).
  template <class PerLayer>
  void layer_forward_llama(size_t l, std::vector<T> &x, PerLayer &layer);
  template <class PerLayer>
  void layer_forward_gpt2(size_t l, std::vector<T> &x, PerLayer &layer);
  // y = x W^T + b, then the adapters attached to W; and its backward (dx, and unless frozen dW, db).
  void project(size_t w, size_t b, const T *x, int64_t n, int64_t out, int64_t in, T *y);
  void project_backward(size_t w, size_t b, const T *dy, const T *x, int64_t n, int64_t out, int64_t in, T *dx);
  // Block-site adapters (ABI 1.6) of layer l's attention (block 0) or MLP (1): `out` (the block's
  // output) gets their deltas, `kept` the output before them; and the backward: d_out's gradient
  // of the block's own output (d_out itself when nothing is attached, else d_block).
  void block_adapters(size_t l, int block, std::vector<T> &out, std::vector<T> &kept);
  const std::vector<T> &block_adapters_backward(size_t l, int block, const std::vector<T> &kept, const std::vector<T> &d_out,
                                                std::vector<T> &d_block);
  // Prefix tuning (ABI 1.6): layer l's virtual keys and values into the first prefix_tokens_
  // rows of k and v; and their gradient (those rows of dk and dv) back to the adapter.
  void prefix_forward(size_t l, std::vector<T> &k, std::vector<T> &v);
  void prefix_backward(size_t l, const std::vector<T> &dk, const std::vector<T> &dv);
  // Layer l's attention over one sequence of n tokens (k, v with P prefix rows first; p the
  // probabilities the core's backward keeps), by the core or the attached component; and its
  // backward into dq, dk, dv (out: the forward's output).
  void attend(size_t l, const T *q, const T *k, const T *v, int64_t n, int64_t Hq, int64_t Hkv, int64_t D, int64_t window,
              int64_t P, T *out, std::vector<T> &p);
  void attend_backward(size_t l, const T *d_out, const T *q, const T *k, const T *v, const T *out, const T *p, int64_t n,
                       int64_t Hq, int64_t Hkv, int64_t D, int64_t P, T *dq, T *dk, T *dv);
  size_t need(const std::string &name) const;
  T *value(size_t index) { return params_[index].value.data(); }
  T *grad(size_t index) { return params_[index].grad.data(); }
  // The index of a parameter, or SIZE_MAX when the model has none of that name (biases).
  size_t find(const std::string &name) const;

  ModelConfig config_;
  Stage stage_;
  std::map<int64_t, std::unique_ptr<Acts>> in_flight_;  // stage_forward's activations by id
  std::vector<TrainParam<T>> params_;
  std::map<std::string, size_t, std::less<>> index_;
  std::vector<Layer> layers_;
  size_t embed_ = 0, final_norm_ = 0, head_ = 0;
  size_t positions_ = SIZE_MAX, final_norm_b_ = SIZE_MAX;  // GPT-2's wpe and ln_f bias
  std::vector<double> inv_freq_;
  bool recompute_ = false, frozen_ = false;
  struct Site {
    Instance *adapter;
    loom_adapter_site *site;
  };
  std::map<size_t, std::vector<Site>> sites_;  // by the linear's weight index
  std::vector<std::array<std::vector<Site>, 2>> block_sites_;  // per layer: attention's, MLP's (ABI 1.6)
  std::vector<Site> prefix_sites_;  // per layer, when a prefix adapter is attached
  int64_t prefix_tokens_ = 0;       // its virtual tokens
  std::shared_ptr<Instance> attention_;         // attach_attention's
  loom_kv_layout attention_layout_{};
  std::vector<uint8_t> attention_pool_;         // one sequence's scratch KV cache
  std::shared_ptr<Instance> quantizer_;         // quantize_base's
  std::map<size_t, loom_qweight *> qweights_;   // by the linear's weight index; the quantizer owns them
  std::vector<float> dequantized_;              // one linear's dequantized weight (backward)
  std::unique_ptr<detail::ThreadPool> pool_;  // null: the calling thread only
  std::function<void(int64_t)> layer_done_;
  TensorGroup tensor_;
  bool tensor_parallel() const { return static_cast<bool>(tensor_.reduce); }
  // A row-parallel linear's bias (GPT-2's c_proj) as this rank adds it: null on all but one
  // tensor rank, so the group's sum counts it once (its gradient is every rank's, replicated).
  const T *row_bias(size_t b) { return b == SIZE_MAX || (tensor_parallel() && !tensor_.row_bias) ? nullptr : value(b); }
  void tensor_sum(std::vector<T> &v) {
    if (tensor_parallel()) tensor_.reduce(v.data(), v.size(), false);
  }
  // The mean-loss cross-entropy over logits split by vocabulary (grad::cross_entropy's contract).
  double tensor_cross_entropy(const std::vector<T> &logits, const std::vector<int32_t> &targets, T *dlogits,
                              double grad_scale, int64_t *count);
};

// A parameter held elsewhere (an adapter plugin's): its values and gradient, `decay` for a
// matrix.
template <class T>
struct ParamView {
  T *value = nullptr;
  T *grad = nullptr;
  size_t size = 0;
  bool decay = false;
};

struct AdamWOptions {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;  // decoupled (AdamW), on matrices only: norms and biases are not decayed
};

// AdamW as torch.optim.AdamW computes it (bias-corrected moments; decay p -= lr * wd * p before
// the update), its moments in T.
template <class T>
class AdamW {
 public:
  explicit AdamW(AdamWOptions options) : options_(options) {}
  // One update of every parameter from its grad, at learning rate `lr` (a schedule's value).
  void step(std::vector<TrainParam<T>> &params, double lr);
  void step(const std::vector<ParamView<T>> &params, double lr);
  int64_t steps() const { return step_; }
  // ZeRO stage 1 ([Parallel]): only the parameters marked true are updated and have moments (the
  // others' moments are empty vectors); an empty mask means every parameter.
  void set_owned(std::vector<bool> owned) {
    owned_ = std::move(owned);
    drop_unowned();
  }
  // The moments (per parameter, empty before the first step), for checkpoints.
  const std::vector<std::vector<T>> &first_moments() const { return m_; }
  const std::vector<std::vector<T>> &second_moments() const { return v_; }
  // Continues from a checkpoint's step count and moments.
  void restore(int64_t steps, std::vector<std::vector<T>> m, std::vector<std::vector<T>> v) {
    step_ = steps;
    m_ = std::move(m);
    v_ = std::move(v);
    drop_unowned();
  }

 private:
  bool owns(size_t k) const { return owned_.empty() || (k < owned_.size() && owned_[k]); }
  void drop_unowned() {
    for (size_t k = 0; k < m_.size(); ++k)
      if (!owns(k)) std::vector<T>().swap(m_[k]), std::vector<T>().swap(v_[k]);
  }
  AdamWOptions options_;
  std::vector<bool> owned_;
  int64_t step_ = 0;
  std::vector<std::vector<T>> m_, v_;
};

// Scales every grad so that their global L2 norm is at most max_norm (when it exceeds it, as
// torch.nn.utils.clip_grad_norm_); returns the norm before clipping.
template <class T>
double clip_grad_norm(std::vector<TrainParam<T>> &params, double max_norm);
template <class T>
double clip_grad_norm(const std::vector<ParamView<T>> &params, double max_norm);
// The scaling half: scales every grad by max_norm / norm when `norm` (computed by the caller,
// e.g. over several ranks) exceeds max_norm.
template <class T>
void clip_to_norm(std::vector<TrainParam<T>> &params, double norm, double max_norm);

extern template class DecoderTrainer<float>;
extern template class DecoderTrainer<double>;
extern template class AdamW<float>;
extern template class AdamW<double>;

}  // namespace loom
