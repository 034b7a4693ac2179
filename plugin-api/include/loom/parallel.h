/* Parallel kind: how weights, activations and gradients are split, and the collectives.
 *
 * An instance is one rank's view of a strategy (single, tensor, data, pipeline) over a
 * communicator it builds at create() from its config and the launcher's environment (mpirun's
 * OMPI_COMM_WORLD_* or torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
 * Collectives are ordered on the host's current stream on CUDA and complete before returning on
 * CPU. Every rank calls the same collectives in the same order.
 */
#ifndef LOOM_PARALLEL_H
#define LOOM_PARALLEL_H

#include "loom/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t loom_reduce_op;
enum { LOOM_REDUCE_SUM = 0, LOOM_REDUCE_MAX = 1, LOOM_REDUCE_MIN = 2, LOOM_REDUCE_AVG = 3 };

/* Process groups a collective runs over. */
typedef int32_t loom_group;
enum {
  LOOM_GROUP_WORLD = 0,
  LOOM_GROUP_TENSOR = 1,   /* ranks sharing one tensor-parallel shard set */
  LOOM_GROUP_DATA = 2,     /* ranks holding replicas */
  LOOM_GROUP_PIPELINE = 3  /* ranks of consecutive stages */
};

typedef struct loom_parallel_topology {
  uint32_t struct_size;
  int32_t world_rank, world_size;
  int32_t tensor_rank, tensor_size;
  int32_t data_rank, data_size;
  int32_t pipeline_rank, pipeline_size;
  int32_t local_rank; /* index of this process's GPU on its host */
} loom_parallel_topology;

/* How one named parameter is split for this rank (filled by shard()). */
typedef struct loom_shard {
  uint32_t struct_size;
  int32_t split_dim;   /* -1: replicated; else the dimension that is split */
  int64_t begin, end;  /* this rank's half-open range along split_dim */
  int32_t reduce_after; /* non-zero: the module's output needs an all-reduce over LOOM_GROUP_TENSOR
                           (row-parallel linear) */
  int32_t owner_stage; /* pipeline stage holding this parameter, where the component can tell
                          from the name and shape alone; shard() does not learn the model's layer
                          count, so the builtin `pipeline` leaves it 0 and hosts place layers
                          with stage_of_layer() */
  /* ---- ABI 1.8 (LOOM_HAS_FIELD(s, loom_shard, parts)) ----
   * A fused projection: split_dim holds `parts` equal blocks side by side (GPT-2's c_attn: q, k
   * and v), each cut to [begin, end) within its block. 0 or 1: one block (begin and end index
   * the whole dimension). */
  int32_t parts;
} loom_shard;

typedef struct loom_parallel_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  loom_status (*topology)(void *instance, loom_parallel_topology *out);
  /* Decides how a parameter of the given full shape is split. `name` is the Hugging Face
   * tensor name ("model.layers.0.self_attn.q_proj.weight"). */
  loom_status (*shard)(void *instance, const char *name, const int64_t *shape, int32_t ndim,
                       loom_shard *out);
  /* Which pipeline stage runs decoder layer `layer` of `n_layers`. */
  int32_t (*stage_of_layer)(void *instance, int32_t layer, int32_t n_layers);

  /* Collectives. Buffers are the caller's, on the pipeline's device, contiguous. */
  loom_status (*all_reduce)(void *instance, loom_group group, DLTensor *buffer, loom_reduce_op op);
  /* out holds group_size * numel(in) elements, rank-major. */
  loom_status (*all_gather)(void *instance, loom_group group, const DLTensor *in, DLTensor *out);
  /* in holds group_size * numel(out) elements; out receives this rank's reduced slice. */
  loom_status (*reduce_scatter)(void *instance, loom_group group, const DLTensor *in, DLTensor *out,
                                loom_reduce_op op);
  loom_status (*broadcast)(void *instance, loom_group group, DLTensor *buffer, int32_t root);
  /* Point to point within LOOM_GROUP_PIPELINE (activations between stages). */
  loom_status (*send)(void *instance, const DLTensor *buffer, int32_t peer);
  loom_status (*recv)(void *instance, DLTensor *buffer, int32_t peer);
  loom_status (*barrier)(void *instance, loom_group group);
  /* ---- ABI 1.8 (check struct_size: LOOM_HAS_FIELD(vt, loom_parallel_vtable, send_recv)) ----
   * Sends `send` to `send_peer` while receiving `recv` from `recv_peer` (both within
   * LOOM_GROUP_PIPELINE, either the same rank or two), the two transfers in flight together:
   * neighbouring stages that send to each other at once (an activation forward, a gradient back)
   * cannot deadlock however large the buffers. On CUDA both are ordered on the host's current
   * stream, as send and recv are. */
  loom_status (*send_recv)(void *instance, const DLTensor *send, int32_t send_peer, DLTensor *recv,
                           int32_t recv_peer);
} loom_parallel_vtable;

/* ---- ABI 1.7: extension "loom.parallel.training/1" (lifecycle get_extension) ----
 * How a strategy wants the trainer to treat gradients and optimizer state across
 * LOOM_GROUP_DATA. The trainer reads it once, after create(). */
#define LOOM_PARALLEL_TRAINING_EXTENSION "loom.parallel.training/1"

typedef struct loom_parallel_training {
  uint32_t struct_size;
  int32_t zero_stage;       /* 0: every data rank keeps the whole optimizer state; 1: ZeRO stage
                               1, each data rank keeps and updates the moments of its own share
                               of the parameters and broadcasts the updated values */
  int64_t bucket_bytes;     /* gradients are all-reduced in buckets of about this many bytes */
  int32_t overlap_backward; /* non-zero: a bucket is all-reduced as soon as the backward pass has
                               finished its gradients, while the pass goes on with earlier layers */
} loom_parallel_training;

typedef struct loom_parallel_training_ext {
  uint32_t struct_size;
  /* Fills *out (out->struct_size set by the caller). [any thread] */
  loom_status (*training)(void *instance, loom_parallel_training *out);
} loom_parallel_training_ext;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_PARALLEL_H */
