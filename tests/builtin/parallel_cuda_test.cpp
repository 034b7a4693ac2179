// libloom-parallel's sums of CUDA buffers on every GPU of one host (2 to 8), over forked processes (torchrun's
// variables, one GPU each): the one-kernel sums over peer memory (peer_all_reduce.cu; buffers up
// to 256 KB) and NCCL's (larger ones, and everything with peer_all_reduce = false) give the exact
// sums, over sizes that use one to all of the kernel's blocks in an order that reuses both halves
// of its buffer, and replayed from a CUDA graph (the call's epoch lives in device memory).
// Skipped (77) with fewer than 2 GPUs. The parent process never touches CUDA before forking.
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <iostream>
#include <sstream>

#include "builtin_test_util.hpp"
#include "loom/core/host_context.hpp"
#include "process_util.hpp"

namespace {

int g_world = 2;  // the GPUs present, at most the peer sum's 8 members; set by main before any fork

// Sums world copies of x_r[i] = (r + 1) * (i mod 1000) (exact in float32) in place on `device`;
// empty when every element is right.
std::string sum_check(const loom_parallel_vtable *vt, void *h, int rank, int device, size_t count, bool in_graph) {
  const int world = g_world;
  std::vector<float> host(count);
  for (size_t i = 0; i < count; ++i) host[i] = static_cast<float>((rank + 1) * static_cast<int>(i % 1000));
  float *buffer = nullptr;
  if (cudaMalloc(&buffer, count * sizeof(float)) != cudaSuccess) return "cudaMalloc failed";
  int64_t shape = static_cast<int64_t>(count);
  DLTensor t{};
  t.data = buffer;
  t.device = {kDLCUDA, device};
  t.ndim = 1;
  t.dtype = {kDLFloat, 32, 1};
  t.shape = &shape;
  auto stream = static_cast<cudaStream_t>(loom::cuda_compute_stream(device));
  std::string err;
  const int replays = in_graph ? 3 : 1;
  cudaGraphExec_t exec = nullptr;
  if (in_graph) {  // the call captured once, replayed below
    cudaGraph_t graph = nullptr;
    cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    const loom_status s = vt->all_reduce(h, LOOM_GROUP_WORLD, &t, LOOM_REDUCE_SUM);
    cudaStreamEndCapture(stream, &graph);
    if (s != LOOM_OK || graph == nullptr || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) err = "capture failed";
    if (graph) cudaGraphDestroy(graph);
  }
  for (int k = 0; k < replays && err.empty(); ++k) {
    cudaMemcpy(buffer, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
    if (in_graph) cudaGraphLaunch(exec, stream);
    else if (vt->all_reduce(h, LOOM_GROUP_WORLD, &t, LOOM_REDUCE_SUM) != LOOM_OK) err = "all_reduce failed";
    if (cudaStreamSynchronize(stream) != cudaSuccess) err = "the sum failed on the device";
    std::vector<float> got(count);
    cudaMemcpy(got.data(), buffer, count * sizeof(float), cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < count && err.empty(); ++i) {
      const float want = static_cast<float>(world * (world + 1) / 2 * static_cast<int>(i % 1000));
      if (got[i] != want) {
        std::ostringstream o;
        o << "rank " << rank << ", " << count << " floats" << (in_graph ? " (graph)" : "") << ": element " << i << " is "
          << got[i] << ", not " << want;
        err = o.str();
      }
    }
  }
  if (exec) cudaGraphExecDestroy(exec);
  cudaFree(buffer);
  return err;
}

}  // namespace

TEST_CASE("sums of CUDA buffers over every GPU: peer memory and NCCL, plain and in a CUDA graph", "[parallel][cuda]") {
  INFO(g_world << " GPUs");
  const auto errors = loom_test::run_world(g_world, [](int rank) -> std::string {
    cudaSetDevice(rank);
    for (const char *peer : {"true", "false"}) {
      auto rt = bt::runtime(std::string("[parallel]\nuse = \"data\"\ntimeout_s = 60.0\npeer_all_reduce = ") + peer + "\n");
      auto &p = rt->pipeline().at("parallel");
      const auto *vt = p.vtable<loom_parallel_vtable>();
      // 1 float, one block's share, every block, the largest peer sum, then NCCL's sizes; twice,
      // so both halves of the exchange buffer come back.
      for (int round = 0; round < 2; ++round)
        for (const size_t count : {size_t{1}, size_t{1000}, size_t{5000}, size_t{65536}, size_t{65537}, size_t{300000}})
          if (std::string e = sum_check(vt, p.handle(), rank, rank, count, false); !e.empty())
            return std::string("peer_all_reduce = ") + peer + ": " + e;
      if (std::string e = sum_check(vt, p.handle(), rank, rank, 2048, true); !e.empty())
        return std::string("peer_all_reduce = ") + peer + ": " + e;
    }
    return "";
  });
  for (size_t r = 0; r < errors.size(); ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK(errors[r].empty());
  }
}

int main(int argc, char **argv) {
  // Counted in a child: CUDA must not be initialised in this process before run_world forks.
  const pid_t pid = ::fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    _exit(n > 100 ? 100 : n);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  const int gpus = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  if (gpus < 2) {
    std::cout << "builtin_parallel_cuda_test: skipped: " << gpus << " CUDA device(s), 2 needed\n";
    return 77;
  }
  g_world = gpus > 8 ? 8 : gpus;
  std::cout << "builtin_parallel_cuda_test: " << g_world << " GPUs\n";
  return Catch::Session().run(argc, argv);
}
