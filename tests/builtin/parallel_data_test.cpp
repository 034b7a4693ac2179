// libloom-parallel's `data` component: a world of real processes (fork, torchrun's environment
// variables, loopback TCP) running every collective, and the launch errors a user meets.
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <sstream>

#include "builtin_test_util.hpp"
#include "process_util.hpp"

namespace {

using loom_test::clear_rank_env;
using loom_test::run_world;
using loom_test::set_rank_env;

struct Rank {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *p;
  const loom_parallel_vtable *vt;
  explicit Rank(const std::string &extra = "", const std::string &component = "data")
      : rt(bt::runtime("[parallel]\nuse = \"" + component + "\"\ntimeout_s = 30.0\n" + extra)),
        p(&rt->pipeline().at("parallel")), vt(p->vtable<loom_parallel_vtable>()) {}
};

#define EXPECT(cond)                                                                   \
  do {                                                                                 \
    if (!(cond)) return std::string("rank ") + std::to_string(rank) + ": " #cond;      \
  } while (0)

std::string collectives(int rank, int world) {
  Rank R;
  void *h = R.p->handle();
  const auto *vt = R.vt;
  loom_parallel_topology t{};
  t.struct_size = sizeof(t);
  EXPECT(vt->topology(h, &t) == LOOM_OK);
  EXPECT(t.world_rank == rank && t.world_size == world && t.data_rank == rank && t.data_size == world);
  EXPECT(t.tensor_size == 1 && t.pipeline_size == 1 && t.local_rank == rank);

  const int n = 1000;  // more than one TCP segment
  const float sum_ranks = static_cast<float>(world * (world + 1) / 2);
  {
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>((rank + 1) * i);
    bt::Tensor<float> b({n}, v);
    EXPECT(vt->all_reduce(h, LOOM_GROUP_WORLD, b.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
    for (int i = 0; i < n; ++i) EXPECT(b.v[static_cast<size_t>(i)] == sum_ranks * static_cast<float>(i));
  }
  for (auto [op, want] : {std::pair{LOOM_REDUCE_MAX, static_cast<float>(world)}, std::pair{LOOM_REDUCE_MIN, 1.0f},
                          std::pair{LOOM_REDUCE_AVG, sum_ranks / static_cast<float>(world)}}) {
    bt::Tensor<float> b({3}, {static_cast<float>(rank + 1), static_cast<float>(rank + 1), static_cast<float>(rank + 1)});
    EXPECT(vt->all_reduce(h, LOOM_GROUP_DATA, b.dl(), op) == LOOM_OK);
    EXPECT(std::fabs(b.v[2] - want) < 1e-6f);
  }
  {
    bt::Tensor<int32_t> b({2}, {rank, 1});
    EXPECT(vt->all_reduce(h, LOOM_GROUP_WORLD, b.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
    EXPECT(b.v[0] == world * (world - 1) / 2 && b.v[1] == world);
    EXPECT(vt->all_reduce(h, LOOM_GROUP_WORLD, b.dl(), LOOM_REDUCE_AVG) == LOOM_ERR_UNSUPPORTED);
  }
  {
    // The tensor and pipeline groups of a data strategy are this rank alone.
    bt::Tensor<float> b({1}, {static_cast<float>(rank)});
    EXPECT(vt->all_reduce(h, LOOM_GROUP_TENSOR, b.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
    EXPECT(b.v[0] == static_cast<float>(rank));
    EXPECT(vt->send(h, b.dl(), (rank + 1) % world) == LOOM_ERR_INVALID_ARGUMENT);
  }
  {
    const int root = world - 1;
    bt::Tensor<float> b({4}, {static_cast<float>(rank), 0, 0, 0});
    EXPECT(vt->broadcast(h, LOOM_GROUP_WORLD, b.dl(), root) == LOOM_OK);
    EXPECT(b.v[0] == static_cast<float>(root));
    EXPECT(vt->broadcast(h, LOOM_GROUP_WORLD, b.dl(), world) == LOOM_ERR_INVALID_ARGUMENT);
  }
  {
    bt::Tensor<float> in({2}, {static_cast<float>(rank), static_cast<float>(10 * rank)});
    bt::Tensor<float> out({world, 2});
    EXPECT(vt->all_gather(h, LOOM_GROUP_WORLD, in.dl(), out.dl()) == LOOM_OK);
    for (int r = 0; r < world; ++r)
      EXPECT(out.v[static_cast<size_t>(2 * r)] == static_cast<float>(r) && out.v[static_cast<size_t>(2 * r + 1)] == static_cast<float>(10 * r));
    bt::Tensor<float> wrong({world + 1, 2});
    EXPECT(vt->all_gather(h, LOOM_GROUP_WORLD, in.dl(), wrong.dl()) == LOOM_ERR_INVALID_ARGUMENT);
  }
  {
    std::vector<float> v(static_cast<size_t>(2 * world));
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(rank) + static_cast<float>(i);
    bt::Tensor<float> in({2 * world}, v), out({2});
    EXPECT(vt->reduce_scatter(h, LOOM_GROUP_WORLD, in.dl(), out.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
    const float base = static_cast<float>(world * (world - 1) / 2);
    EXPECT(out.v[0] == base + static_cast<float>(world * 2 * rank) && out.v[1] == base + static_cast<float>(world * (2 * rank + 1)));
  }
  EXPECT(vt->barrier(h, LOOM_GROUP_WORLD) == LOOM_OK);

  const auto *ext = R.p->extension<loom_parallel_training_ext>(LOOM_PARALLEL_TRAINING_EXTENSION);
  EXPECT(ext != nullptr);
  loom_parallel_training tr{};
  tr.struct_size = sizeof(tr);
  EXPECT(ext->training(h, &tr) == LOOM_OK);
  EXPECT(tr.zero_stage == 0 && tr.bucket_bytes == 25 * 1024 * 1024 && tr.overlap_backward == 1);
  return "";
}

std::string joined(const std::vector<std::string> &errors) {
  std::ostringstream o;
  for (size_t r = 0; r < errors.size(); ++r)
    if (!errors[r].empty()) o << "[" << r << "] " << errors[r] << "\n";
  return o.str();
}

}  // namespace

TEST_CASE("data: collectives over 2 and 4 processes give every rank the reduced values", "[parallel]") {
  for (int world : {2, 4}) {
    INFO("world " << world);
    const auto errors = run_world(world, [world](int rank) { return collectives(rank, world); });
    CHECK(joined(errors).empty());
    INFO(joined(errors));
  }
}

TEST_CASE("data: without a launcher it is a world of one", "[parallel]") {
  clear_rank_env();
  Rank R("zero_stage = 1\nbucket_mb = 4.0\noverlap = false\n");
  loom_parallel_topology t{};
  t.struct_size = sizeof(t);
  REQUIRE(R.vt->topology(R.p->handle(), &t) == LOOM_OK);
  CHECK(t.world_size == 1);
  bt::Tensor<float> b({2}, {3, 4});
  REQUIRE(R.vt->all_reduce(R.p->handle(), LOOM_GROUP_WORLD, b.dl(), LOOM_REDUCE_AVG) == LOOM_OK);
  CHECK(b.v == std::vector<float>{3, 4});
  loom_parallel_training tr{};
  tr.struct_size = sizeof(tr);
  REQUIRE(R.p->extension<loom_parallel_training_ext>(LOOM_PARALLEL_TRAINING_EXTENSION)->training(R.p->handle(), &tr) == LOOM_OK);
  CHECK(tr.zero_stage == 1);
  CHECK(tr.bucket_bytes == 4 * 1024 * 1024);
  CHECK(tr.overlap_backward == 0);
}

TEST_CASE("data: launch and configuration errors name what is wrong", "[parallel]") {
  clear_rank_env();
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"data\"\nzero_stage = 3\n"), Catch::Contains("zero_stage"));
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"data\"\nbucket_mb = -1.0\n"), Catch::Contains("bucket_mb"));
  set_rank_env(2, 2, loom_test::free_loopback_port());
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"data\"\n"), Catch::Contains("RANK = 2 is outside WORLD_SIZE = 2"));
  setenv("RANK", "x", 1);
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"data\"\n"), Catch::Contains("RANK=\"x\""));
  // Rank 1 of 2 whose rank 0 never comes: a clear timeout, not a hang.
  set_rank_env(1, 2, loom_test::free_loopback_port());
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"data\"\ntimeout_s = 0.5\n"), Catch::Contains("cannot connect to rank 0"));
  // Rank 0 of 2 whose rank 1 never comes.
  set_rank_env(0, 2, loom_test::free_loopback_port());
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"data\"\ntimeout_s = 0.5\n"), Catch::Contains("timed out waiting for 1 more rank(s) of 2"));
  clear_rank_env();
}

namespace {

// A 4-rank world as tensor groups of 2: rank r is tensor rank r % 2 of data replica r / 2.
std::string tensor_layout(int rank) {
  Rank R("size = 2\n", "tensor");
  void *h = R.p->handle();
  loom_parallel_topology t{};
  t.struct_size = sizeof(t);
  EXPECT(R.vt->topology(h, &t) == LOOM_OK);
  EXPECT(t.tensor_size == 2 && t.tensor_rank == rank % 2 && t.data_size == 2 && t.data_rank == rank / 2);
  const auto cut = [&](const char *name, std::vector<int64_t> shape) {
    loom_shard s{};
    s.struct_size = sizeof(s);
    const loom_status st = R.vt->shard(h, name, shape.data(), static_cast<int32_t>(shape.size()), &s);
    return std::pair{st, s};
  };
  const int64_t part = rank % 2;
  auto [st, q] = cut("model.layers.3.self_attn.q_proj.weight", {64, 32});
  EXPECT(st == LOOM_OK && q.split_dim == 0 && q.begin == 32 * part && q.end == 32 * (part + 1) && q.reduce_after == 0);
  auto [st2, o] = cut("model.layers.3.self_attn.o_proj.weight", {32, 64});
  EXPECT(st2 == LOOM_OK && o.split_dim == 1 && o.begin == 32 * part && o.reduce_after == 1);
  auto [st3, down] = cut("model.layers.0.mlp.down_proj.weight", {32, 96});
  EXPECT(st3 == LOOM_OK && down.split_dim == 1 && down.end - down.begin == 48);
  auto [st4, embed] = cut("model.embed_tokens.weight", {1000, 32});
  EXPECT(st4 == LOOM_OK && embed.split_dim == 0 && embed.begin == 500 * part);
  auto [st5, norm] = cut("model.layers.0.input_layernorm.weight", {32});
  EXPECT(st5 == LOOM_OK && norm.split_dim == -1);
  EXPECT(cut("model.layers.0.mlp.up_proj.weight", {33, 32}).first == LOOM_ERR_INVALID_ARGUMENT);  // 33 rows
  // GPT-2's Conv1D weights are [in, out]; c_attn holds q, k and v side by side (ABI 1.8 parts).
  auto [st6, qkv] = cut("h.0.attn.c_attn.weight", {32, 96});
  EXPECT(st6 == LOOM_OK && qkv.split_dim == 1 && qkv.parts == 3 && qkv.begin == 16 * part && qkv.end == 16 * (part + 1));
  auto [st7, qkv_b] = cut("h.0.attn.c_attn.bias", {96});
  EXPECT(st7 == LOOM_OK && qkv_b.split_dim == 0 && qkv_b.parts == 3 && qkv_b.begin == 16 * part);
  auto [st8, proj] = cut("h.0.attn.c_proj.weight", {32, 32});
  EXPECT(st8 == LOOM_OK && proj.split_dim == 0 && proj.reduce_after == 1 && proj.parts == 1);
  auto [st9, proj_b] = cut("h.0.mlp.c_proj.bias", {32});
  EXPECT(st9 == LOOM_OK && proj_b.split_dim == -1);  // added once, after the sum
  auto [st10, fc] = cut("h.0.mlp.c_fc.weight", {32, 128});
  EXPECT(st10 == LOOM_OK && fc.split_dim == 1 && fc.begin == 64 * part);
  EXPECT(cut("h.0.attn.c_attn.weight", {32, 93}).first == LOOM_ERR_INVALID_ARGUMENT);  // 3 blocks of 31
  // The tensor group is {0, 1} or {2, 3}; the data group {r % 2, r % 2 + 2}.
  bt::Tensor<float> b({1}, {static_cast<float>(1 << rank)});
  EXPECT(R.vt->all_reduce(h, LOOM_GROUP_TENSOR, b.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
  EXPECT(b.v[0] == static_cast<float>(rank < 2 ? 1 + 2 : 4 + 8));
  bt::Tensor<float> d({1}, {static_cast<float>(1 << rank)});
  EXPECT(R.vt->all_reduce(h, LOOM_GROUP_DATA, d.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
  EXPECT(d.v[0] == static_cast<float>(rank % 2 == 0 ? 1 + 4 : 2 + 8));
  return "";
}

}  // namespace

TEST_CASE("tensor: Megatron splits per rank and tensor x data groups over 4 processes", "[parallel]") {
  const auto errors = run_world(4, tensor_layout);
  CHECK(joined(errors).empty());
  INFO(joined(errors));
}

TEST_CASE("tensor: a size that does not divide the world is refused at its key", "[parallel]") {
  set_rank_env(0, 1, loom_test::free_loopback_port());
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"tensor\"\nsize = 3\n"), Catch::Contains("size"));
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"tensor\"\nsize = 3\n"), Catch::Contains("must divide the world of 1"));
  clear_rank_env();
}

TEST_CASE("data: OpenMPI's variables (mpirun) place the ranks like torchrun's", "[parallel]") {
  // run_world sets torchrun's names; each rank swaps them for mpirun's before meeting.
  const auto errors = run_world(2, [](int rank) -> std::string {
    const std::string world = std::getenv("WORLD_SIZE");
    for (const char *v : {"RANK", "WORLD_SIZE", "LOCAL_RANK"}) unsetenv(v);
    setenv("OMPI_COMM_WORLD_RANK", std::to_string(rank).c_str(), 1);
    setenv("OMPI_COMM_WORLD_SIZE", world.c_str(), 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(rank).c_str(), 1);
    Rank R;
    loom_parallel_topology t{};
    t.struct_size = sizeof(t);
    EXPECT(R.vt->topology(R.p->handle(), &t) == LOOM_OK);
    EXPECT(t.world_rank == rank && t.world_size == 2 && t.local_rank == rank);
    bt::Tensor<float> b({1}, {static_cast<float>(rank + 1)});
    EXPECT(R.vt->all_reduce(R.p->handle(), LOOM_GROUP_WORLD, b.dl(), LOOM_REDUCE_SUM) == LOOM_OK);
    EXPECT(b.v[0] == 3.0f);
    return "";
  });
  for (const char *v : {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"}) unsetenv(v);
  CHECK(joined(errors).empty());
  INFO(joined(errors));
}

namespace {

// A 4-rank world as pipelines of 2 stages: rank r is stage r % 2 of data replica r / 2.
std::string pipeline_layout(int rank) {
  Rank R("stages = 2\n", "pipeline");
  void *h = R.p->handle();
  loom_parallel_topology t{};
  t.struct_size = sizeof(t);
  EXPECT(R.vt->topology(h, &t) == LOOM_OK);
  EXPECT(t.pipeline_size == 2 && t.pipeline_rank == rank % 2 && t.data_size == 2 && t.data_rank == rank / 2 && t.tensor_size == 1);
  for (int32_t l = 0; l < 5; ++l) EXPECT(R.vt->stage_of_layer(h, l, 5) == (l < 3 ? 0 : 1));
  // Activations forward, gradients back, between the two stages of this rank's pipeline.
  const int32_t peer = rank % 2 == 0 ? rank + 1 : rank - 1;
  std::vector<float> big(100000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(rank * 1000000 + static_cast<int>(i));
  bt::Tensor<float> mine({static_cast<int64_t>(big.size())}, big), theirs({static_cast<int64_t>(big.size())});
  if (rank % 2 == 0) {
    EXPECT(R.vt->send(h, mine.dl(), peer) == LOOM_OK);
    EXPECT(R.vt->recv(h, theirs.dl(), peer) == LOOM_OK);
  } else {
    EXPECT(R.vt->recv(h, theirs.dl(), peer) == LOOM_OK);
    EXPECT(R.vt->send(h, mine.dl(), peer) == LOOM_OK);
  }
  EXPECT(theirs.v[99999] == static_cast<float>(peer * 1000000 + 99999));
  EXPECT(R.vt->send(h, mine.dl(), (rank + 2) % 4) == LOOM_ERR_INVALID_ARGUMENT);  // another pipeline's rank
  // ABI 1.8 send_recv: both stages send 32 MB to each other at once, more than loopback's
  // socket buffers hold, so a send before a receive on both sides would wait forever.
  EXPECT(LOOM_HAS_FIELD(R.vt, loom_parallel_vtable, send_recv));
  std::vector<float> large(8 << 20);
  for (size_t i = 0; i < large.size(); i += 4096) large[i] = static_cast<float>(rank * 100 + static_cast<int>(i >> 12));
  bt::Tensor<float> out({static_cast<int64_t>(large.size())}, large), in({static_cast<int64_t>(large.size())});
  EXPECT(R.vt->send_recv(h, out.dl(), peer, in.dl(), peer) == LOOM_OK);
  EXPECT(in.v[4096 * 2047] == static_cast<float>(peer * 100 + 2047));
  EXPECT(in.v[0] == static_cast<float>(peer * 100));
  EXPECT(R.vt->send_recv(h, out.dl(), peer, in.dl(), (rank + 2) % 4) == LOOM_ERR_INVALID_ARGUMENT);
  return "";
}

}  // namespace

TEST_CASE("pipeline: stages of consecutive layers, point to point between stages, pipeline x data groups", "[parallel]") {
  const auto errors = run_world(4, pipeline_layout);
  CHECK(joined(errors).empty());
  INFO(joined(errors));
}
