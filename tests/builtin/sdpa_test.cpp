// libloom-attention-sdpa: paged forward against a dense attention computed here, over several
// sequences, GQA, a second call that reads the cache of the first, and a sliding window.
#include <catch2/catch.hpp>

#include <cmath>

#include "builtin_test_util.hpp"

namespace {

constexpr int64_t H = 4, Hkv = 2, D = 8, B = 4, N = 16, M = 3;

loom_attention_config config(int32_t window) {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = 1;
  c.n_heads = H;
  c.n_kv_heads = Hkv;
  c.head_dim = D;
  c.max_positions = 64;
  c.sliding_window = window;
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(D));
  c.dtype = DLDataType{kDLFloat, 32, 1};
  c.device = DLDevice{kDLCPU, 0};
  return c;
}

// Keys/values of every position of one sequence, [pos][Hkv * D], kept by the test.
struct History {
  std::vector<std::vector<float>> k, v;
};

// Dense causal attention of one query token [H * D] at position p over hist (positions <= p).
std::vector<float> dense(const float *q, const History &hist, int64_t p, int64_t window) {
  std::vector<float> out(H * D, 0.0f);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t kvh = h / (H / Hkv);
    std::vector<double> w;
    std::vector<int64_t> js;
    for (int64_t j = 0; j <= p; ++j) {
      if (window > 0 && j <= p - window) continue;
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += q[h * D + d] * hist.k[j][kvh * D + d];
      w.push_back(dot / std::sqrt(static_cast<double>(D)));
      js.push_back(j);
    }
    double mx = -1e300, sum = 0;
    for (double x : w) mx = std::max(mx, x);
    for (double &x : w) sum += (x = std::exp(x - mx));
    for (size_t i = 0; i < js.size(); ++i)
      for (int64_t d = 0; d < D; ++d)
        out[h * D + d] += static_cast<float>(w[i] / sum) * hist.v[js[i]][kvh * D + d];
  }
  return out;
}

struct Harness {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *attn;
  const loom_attention_vtable *vt;
  bt::Tensor<uint8_t> pool{{N, 2 * B * Hkv * D * 4}};
  bt::Tensor<int32_t> table{{3, M}, {3, 7, 11, 0, 9, 2, 12, 5, 1}}; // scattered on purpose
  std::vector<History> hist = std::vector<History>(3);
  std::vector<int32_t> positions{0, 0, 0};
  int64_t window;

  explicit Harness(int32_t w) : rt(bt::runtime("[attention]\nuse = \"sdpa\"\nblock_size = 4\n")), window(w) {
    attn = &rt->pipeline().at("attention");
    vt = attn->vtable<loom_attention_vtable>();
    const loom_attention_config c = config(w);
    loom_kv_layout layout{};
    layout.struct_size = sizeof(layout);
    REQUIRE(vt->prepare(attn->handle(), &c, &layout) == LOOM_OK);
    CHECK(layout.block_size == B);
    CHECK(layout.bytes_per_block == static_cast<uint64_t>(2 * B * Hkv * D * 4));
    CHECK(layout.cache_dtype.code == kDLFloat);
    CHECK(layout.cache_dtype.bits == 32);
  }

  // Runs one forward with `lens[s]` new tokens per sequence and checks it against dense().
  void step(const std::vector<int32_t> &lens, uint32_t seed) {
    int32_t T = 0;
    std::vector<int32_t> off{0};
    for (int32_t l : lens) off.push_back(T += l);
    bt::Tensor<float> q({T, H, D}, bt::random_floats(T * H * D, seed));
    bt::Tensor<float> k({T, Hkv, D}, bt::random_floats(T * Hkv * D, seed + 1));
    bt::Tensor<float> v({T, Hkv, D}, bt::random_floats(T * Hkv * D, seed + 2));
    bt::Tensor<float> out({T, H, D});
    bt::Tensor<int32_t> offsets({4}, off);
    bt::Tensor<int32_t> pos({3}, positions);
    loom_attention_batch b =
        bt::causal_batch(q.dl(), k.dl(), v.dl(), out.dl(), offsets.dl(), pos.dl(), table.dl(), pool.dl(), 3, T);
    REQUIRE(vt->forward(attn->handle(), &b) == LOOM_OK);
    for (int s = 0; s < 3; ++s) {
      for (int32_t i = 0; i < lens[s]; ++i) {
        const int64_t t = off[s] + i;
        hist[s].k.emplace_back(k.v.begin() + t * Hkv * D, k.v.begin() + (t + 1) * Hkv * D);
        hist[s].v.emplace_back(v.v.begin() + t * Hkv * D, v.v.begin() + (t + 1) * Hkv * D);
      }
      for (int32_t i = 0; i < lens[s]; ++i) {
        const int64_t t = off[s] + i;
        const auto want = dense(q.v.data() + t * H * D, hist[s], positions[s] + i, window);
        for (int64_t j = 0; j < H * D; ++j) REQUIRE(out.v[t * H * D + j] == Approx(want[j]).margin(1e-5));
      }
      positions[s] += lens[s];
    }
  }
};

} // namespace

TEST_CASE("sdpa matches dense attention across calls, sequences and GQA", "[sdpa]") {
  Harness h(0);
  h.step({5, 3, 1}, 10);  // prefill: seq 0 spans two blocks
  h.step({2, 1, 4}, 20);  // continues from the cache written by the first call
  h.step({1, 1, 1}, 30);  // decode
}

TEST_CASE("sdpa honours the sliding window", "[sdpa]") {
  Harness h(3);
  h.step({6, 2, 3}, 40);
  h.step({1, 3, 2}, 50);
}

TEST_CASE("sdpa validates its inputs and names the field", "[sdpa]") {
  Harness h(0);
  bt::Tensor<float> q({2, H, D}), k({2, Hkv, D}), v({2, Hkv, D}), out({2, H, D});
  bt::Tensor<int32_t> offsets({2}, {0, 2}), pos({1}, {0}), table({1, 2}, {0, 99});
  loom_attention_batch b{};
  auto fill = [&] {
    b = bt::causal_batch(q.dl(), k.dl(), v.dl(), out.dl(), offsets.dl(), pos.dl(), table.dl(), h.pool.dl(), 1, 2);
  };
  fill();
  REQUIRE(h.vt->forward(h.attn->handle(), &b) == LOOM_OK); // 2 tokens need only block 0

  pos.v[0] = 4; // now the sequence needs logical block 1 = 99, outside the pool
  fill();
  CHECK(h.vt->forward(h.attn->handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(h.attn->last_error(), Catch::Contains("block_table[0, 1]"));

  pos.v[0] = 7; // needs 3 blocks, the table has 2 columns
  fill();
  CHECK(h.vt->forward(h.attn->handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(h.attn->last_error(), Catch::Contains("block_table"));

  pos.v[0] = 0;
  bt::Tensor<float> bad_q({2, H, D + 1});
  fill();
  b.q = bad_q.dl();
  CHECK(h.vt->forward(h.attn->handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(h.attn->last_error(), Catch::Contains("q:"));

  offsets.v = {0, 3};
  fill();
  CHECK(h.vt->forward(h.attn->handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(h.attn->last_error(), Catch::Contains("seq_offsets"));

  offsets.v = {0, 2};
  fill();
  q.t.device = DLDevice{kDLCUDA, 0};
  CHECK(h.vt->forward(h.attn->handle(), &b) == LOOM_ERR_UNSUPPORTED);
}

TEST_CASE("sdpa block_size must be a power of two", "[sdpa]") {
  CHECK_THAT(bt::build_error("[attention]\nuse = \"sdpa\"\nblock_size = 3\n"), Catch::Contains("block_size"));
  CHECK_THAT(bt::build_error("[attention]\nuse = \"sdpa\"\nblock_size = 2048\n"), Catch::Contains("block_size"));
  CHECK_THAT(bt::build_error("[attention]\nuse = \"sdpa\"\nblocksize = 16\n"), Catch::Contains("blocksize"));
  CHECK(bt::build_error("[attention]\nuse = \"sdpa\"\n").empty());
}
