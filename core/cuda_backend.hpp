// Private to core: the CUDA model backend (built only with LOOM_HAVE_CUDA).
//
// Weights live on the GPU in the compute dtype (bfloat16, or float32 for exact checks); q/k/v
// and gate/up are fused into one GEMM each; every GEMM is cuBLAS's with float32 accumulation;
// the residual stream is float32 and the output projections accumulate straight into it
// (beta = 1), so residual adds cost nothing. Norms, biases, rotary embeddings and activations
// are the fused kernels of loom/kernels/model.hpp. Attention is the pipeline's attention plugin
// over a paged KV cache in GPU memory. A decode step (one token per sequence) is captured into a
// CUDA graph per batch size on first use and replayed afterwards; graphs are made again when
// the cache moves or the attention component is swapped, and skipped for good (with a log line)
// when the attention plugin cannot be captured.
//
// Quantizer and adapter plugins have no CUDA path yet: a pipeline with one is refused here with
// an error that names it.
//
// Ownership: owns its device memory, cuBLAS handle and graphs; borrows the pipeline. All work is
// ordered on core's compute stream for the device (cuda_compute_stream). Thread-safety: one
// thread drives it, under the pipeline's step lock.
#pragma once

#include <memory>
#include <string>

#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "model_backend.hpp"

namespace loom {

class TensorShards;

struct CudaBackendOptions {
  DLDevice device{kDLCUDA, 0};
  ComputeDtype dtype = ComputeDtype::bfloat16;
  bool graphs = true;       // replay decode steps from CUDA graphs
  std::string source_name;  // the manifest, for errors
  // Tensor parallelism ([Parallel]): the config and weights are this rank's layers' slices (the
  // vocabulary whole); the row-parallel products' outputs are summed over the group by NCCL on
  // the backend's stream (inside decode graphs too). Null or one rank: the whole model.
  std::shared_ptr<const TensorShards> tensor;
};

// Uploads `weights` (consumed) and checks the pipeline's components against what the backend
// can run. Throws loom::Error.
std::unique_ptr<ModelBackend> make_cuda_backend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline,
                                                const CudaBackendOptions &options);

} // namespace loom
