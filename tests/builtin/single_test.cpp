// libloom-parallel-single: a world of one rank.
#include <catch2/catch.hpp>

#include "builtin_test_util.hpp"

namespace {
struct Fixture {
  std::unique_ptr<loom::Runtime> rt = bt::runtime("[parallel]\nuse = \"single\"\n");
  loom::Instance &p = rt->pipeline().at("parallel");
  const loom_parallel_vtable *vt = p.vtable<loom_parallel_vtable>();
};
} // namespace

TEST_CASE("single reports a world of one and replicates every parameter", "[single]") {
  Fixture f;
  loom_parallel_topology t{};
  t.struct_size = sizeof(t);
  t.world_size = 99;
  REQUIRE(f.vt->topology(f.p.handle(), &t) == LOOM_OK);
  CHECK(t.world_rank == 0);
  CHECK(t.world_size == 1);
  CHECK(t.tensor_size == 1);
  CHECK(t.data_size == 1);
  CHECK(t.pipeline_size == 1);
  CHECK(t.local_rank == 0);

  const int64_t shape[2] = {4096, 1024};
  loom_shard s{};
  s.struct_size = sizeof(s);
  s.split_dim = 5;
  REQUIRE(f.vt->shard(f.p.handle(), "model.layers.0.self_attn.q_proj.weight", shape, 2, &s) == LOOM_OK);
  CHECK(s.split_dim == -1);
  CHECK(s.begin == 0);
  CHECK(s.end == 4096);
  CHECK(s.reduce_after == 0);
  CHECK(s.owner_stage == 0);
  CHECK(f.vt->stage_of_layer(f.p.handle(), 17, 32) == 0);
}

TEST_CASE("single collectives have their one-rank meaning", "[single]") {
  Fixture f;
  bt::Tensor<float> buf({2, 3}, {1, 2, 3, 4, 5, 6});
  const auto before = buf.v;
  for (loom_reduce_op op : {LOOM_REDUCE_SUM, LOOM_REDUCE_MAX, LOOM_REDUCE_MIN, LOOM_REDUCE_AVG}) {
    REQUIRE(f.vt->all_reduce(f.p.handle(), LOOM_GROUP_WORLD, buf.dl(), op) == LOOM_OK);
    CHECK(buf.v == before);
  }
  REQUIRE(f.vt->broadcast(f.p.handle(), LOOM_GROUP_TENSOR, buf.dl(), 0) == LOOM_OK);
  CHECK(buf.v == before);
  CHECK(f.vt->broadcast(f.p.handle(), LOOM_GROUP_TENSOR, buf.dl(), 1) == LOOM_ERR_INVALID_ARGUMENT);
  REQUIRE(f.vt->barrier(f.p.handle(), LOOM_GROUP_DATA) == LOOM_OK);

  bt::Tensor<float> out({6});
  REQUIRE(f.vt->all_gather(f.p.handle(), LOOM_GROUP_WORLD, buf.dl(), out.dl()) == LOOM_OK);
  CHECK(out.v == before);
  bt::Tensor<float> out2({3, 2});
  REQUIRE(f.vt->reduce_scatter(f.p.handle(), LOOM_GROUP_WORLD, buf.dl(), out2.dl(), LOOM_REDUCE_AVG) == LOOM_OK);
  CHECK(out2.v == before);

  bt::Tensor<float> small({5});
  CHECK(f.vt->all_gather(f.p.handle(), LOOM_GROUP_WORLD, buf.dl(), small.dl()) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.p.last_error(), Catch::Contains("as many elements"));
  bt::Tensor<int32_t> other({6});
  CHECK(f.vt->reduce_scatter(f.p.handle(), LOOM_GROUP_WORLD, buf.dl(), other.dl(), LOOM_REDUCE_SUM) ==
        LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.p.last_error(), Catch::Contains("dtype"));
  CHECK(f.vt->all_reduce(f.p.handle(), 9, buf.dl(), LOOM_REDUCE_SUM) == LOOM_ERR_INVALID_ARGUMENT);
}

TEST_CASE("single has no peer for point-to-point", "[single]") {
  Fixture f;
  bt::Tensor<float> buf({4});
  CHECK(f.vt->send(f.p.handle(), buf.dl(), 1) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(f.vt->send_recv(f.p.handle(), buf.dl(), 1, buf.dl(), 1) == LOOM_ERR_INVALID_ARGUMENT);  // ABI 1.8
  CHECK_THAT(f.p.last_error(), Catch::Contains("no peer"));
  CHECK(f.vt->recv(f.p.handle(), buf.dl(), 0) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.p.last_error(), Catch::Contains("no peer"));
  CHECK_THAT(bt::build_error("[parallel]\nuse = \"single\"\ntp = 2\n"), Catch::Contains("tp"));
}
