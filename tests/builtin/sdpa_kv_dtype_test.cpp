// sdpa's KV cache storage dtypes on the CPU (kv_dtype = "bf16", "int8", "fp8"): the layout it
// reports, the bytes it stores, its outputs against the float32 cache, and refusals.
//
// Over random shapes (GQA, several sequences of a paged cache behind a shuffled block table,
// prefill then decode steps), each quantized cache is checked two ways:
//  - exactly equal to a plain dequantize-then-attend reference: an f32-cache sdpa fed k and v
//    already quantized and dequantized here (per (token, kv head) row: scale = absmax / 127 or
//    / 448, codes rounded to nearest even), so any difference is in how sdpa stores or reads;
//  - within a relative L2 error of the f32-cache output: the cost of the storage itself. The
//    bounds are under 2x the largest error measured over these shapes (int8 0.55%, fp8 3.8%,
//    bf16 0.24%; each run prints its own). The exact check above already catches any change to
//    a scale; the bounds say what the storage costs and fail when it costs much more (an int8
//    scale of absmax / 254 clips half the range; one of absmax / 63.5 doubles the error).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "builtin_test_util.hpp"
#include "loom_e4m3.hpp"

namespace {

struct Shape {
  int64_t H, Hkv, D, B;
};

loom_attention_config config(const Shape &g) {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = 1;
  c.n_heads = static_cast<int32_t>(g.H);
  c.n_kv_heads = static_cast<int32_t>(g.Hkv);
  c.head_dim = static_cast<int32_t>(g.D);
  c.max_positions = 4096;
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(g.D));
  c.dtype = DLDataType{kDLFloat, 32, 1};
  c.device = DLDevice{kDLCPU, 0};
  return c;
}

int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// What loom_kv_format.hpp documents: f32/bf16 2 * B * Hkv * D elements; int8/fp8 one byte an
// element, then from a 16-byte boundary a float scale per row, the block rounded up to 16 bytes.
int64_t expected_bytes_per_block(const Shape &g, const std::string &kv) {
  const int64_t rows = 2 * g.B * g.Hkv;
  if (kv == "auto") return rows * g.D * 4;
  if (kv == "bf16") return rows * g.D * 2;
  return align16(align16(rows * g.D) + rows * 4);
}

// One (token, kv head) row stored and read back the plain way: what the cache should hold.
std::vector<float> dequantized(const float *x, int64_t D, const std::string &kv) {
  std::vector<float> out(static_cast<size_t>(D));
  float absmax = 0;
  for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::fabs(x[d]));
  for (int64_t d = 0; d < D; ++d) {
    if (kv == "bf16") {
      uint32_t u;
      std::memcpy(&u, &x[d], 4);
      u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;  // round to nearest even
      std::memcpy(&out[d], &u, 4);
    } else if (kv == "int8") {
      const float scale = absmax / 127.0f;
      const float code = scale == 0 ? 0 : std::clamp(std::nearbyint(x[d] / scale), -127.0f, 127.0f);
      out[d] = code * scale;
    } else {
      const float scale = absmax / 448.0f;
      out[d] = scale == 0 ? 0 : loomp::e4m3::decode(loomp::e4m3::encode(x[d] / scale)) * scale;
    }
  }
  return out;
}

// An sdpa instance with its own pool; every instance of a scenario shares the block table.
class Paged {
 public:
  Paged(const Shape &g, const std::string &kv, int64_t n_blocks)
      : g_(g), rt_(bt::runtime("[attention]\nuse = \"sdpa\"\nblock_size = " + std::to_string(g.B) +
                               "\nkv_dtype = \"" + kv + "\"\n")) {
    inst_ = &rt_->pipeline().at("attention");
    vt_ = inst_->vtable<loom_attention_vtable>();
    const loom_attention_config c = config(g);
    layout_.struct_size = sizeof(layout_);
    REQUIRE(vt_->prepare(inst_->handle(), &c, &layout_) == LOOM_OK);
    REQUIRE(layout_.block_size == g.B);
    REQUIRE(static_cast<int64_t>(layout_.bytes_per_block) == expected_bytes_per_block(g, kv));
    pool_ = bt::Tensor<uint8_t>({n_blocks, static_cast<int64_t>(layout_.bytes_per_block)});
  }
  std::vector<float> forward(const std::vector<int32_t> &offsets, const std::vector<int32_t> &positions,
                             bt::Tensor<int32_t> &table, std::vector<float> q, std::vector<float> k,
                             std::vector<float> v) {
    const int64_t T = offsets.back(), S = static_cast<int64_t>(positions.size());
    bt::Tensor<float> tq({T, g_.H, g_.D}, std::move(q)), tk({T, g_.Hkv, g_.D}, std::move(k)),
        tv({T, g_.Hkv, g_.D}, std::move(v)), out({T, g_.H, g_.D});
    bt::Tensor<int32_t> off({S + 1}, offsets), pos({S}, positions);
    loom_attention_batch b =
        bt::causal_batch(tq.dl(), tk.dl(), tv.dl(), out.dl(), off.dl(), pos.dl(), table.dl(), pool_.dl(), S, T);
    const loom_status st = vt_->forward(inst_->handle(), &b);
    INFO(inst_->last_error());
    REQUIRE(st == LOOM_OK);
    return out.v;
  }
  const loom_kv_layout &layout() const { return layout_; }
  const std::vector<uint8_t> &pool() const { return pool_.v; }

 private:
  Shape g_;
  std::unique_ptr<loom::Runtime> rt_;
  loom::Instance *inst_ = nullptr;
  const loom_attention_vtable *vt_ = nullptr;
  loom_kv_layout layout_{};
  bt::Tensor<uint8_t> pool_{{1, 1}};
};

struct Errors {
  double against_f32 = 0;  // relative L2 over all steps
  bool exact = true;       // every output equal to the dequantize-then-attend reference
};

// Prefill of random lengths, a chunk, then decode steps, over S sequences of a shuffled pool.
// Rows are scaled by random magnitudes (0.05 to 4) so per-row scales matter; one key row is
// all zeros (scale 0).
Errors run_scenario(const Shape &g, int S, const std::string &kv, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> prefill(1, 40);
  std::vector<std::vector<int32_t>> steps;
  std::vector<int32_t> first;
  for (int s = 0; s < S; ++s) first.push_back(prefill(rng));
  steps.push_back(first);
  steps.push_back(std::vector<int32_t>(static_cast<size_t>(S), 7));
  for (int i = 0; i < 4; ++i) steps.push_back(std::vector<int32_t>(static_cast<size_t>(S), 1));
  int64_t longest = 0;
  for (int s = 0; s < S; ++s) {
    int64_t n = 0;
    for (const auto &st : steps) n += st[static_cast<size_t>(s)];
    longest = std::max(longest, n);
  }
  const int64_t M = (longest + g.B - 1) / g.B, N = S * M + 3;
  std::vector<int32_t> blocks(static_cast<size_t>(N));
  std::iota(blocks.begin(), blocks.end(), 0);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  bt::Tensor<int32_t> table({S, M}, std::vector<int32_t>(blocks.begin(), blocks.begin() + S * M));

  Paged f32(g, "auto", N), quant(g, kv, N), reference(g, "auto", N);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f), magnitude(0.05f, 4.0f);
  std::vector<int32_t> positions(static_cast<size_t>(S), 0);
  double diff2 = 0, norm2 = 0;
  Errors e;
  bool zero_row_done = false;
  for (const auto &lens : steps) {
    std::vector<int32_t> off{0};
    for (int32_t l : lens) off.push_back(off.back() + l);
    const int64_t T = off.back();
    std::vector<float> q(static_cast<size_t>(T * g.H * g.D)), k(static_cast<size_t>(T * g.Hkv * g.D)),
        v(k.size());
    for (auto &x : q) x = 2.0f * uni(rng);
    for (auto *x : {&k, &v})
      for (int64_t r = 0; r < T * g.Hkv; ++r) {
        const float m = magnitude(rng);
        for (int64_t d = 0; d < g.D; ++d) (*x)[static_cast<size_t>(r * g.D + d)] = m * uni(rng);
      }
    if (!zero_row_done) {
      std::fill(k.begin(), k.begin() + g.D, 0.0f);
      zero_row_done = true;
    }
    std::vector<float> kd(k.size()), vd(v.size());
    for (int64_t r = 0; r < T * g.Hkv; ++r) {
      const auto a = dequantized(k.data() + r * g.D, g.D, kv), b = dequantized(v.data() + r * g.D, g.D, kv);
      std::copy(a.begin(), a.end(), kd.begin() + r * g.D);
      std::copy(b.begin(), b.end(), vd.begin() + r * g.D);
    }
    const auto want = f32.forward(off, positions, table, q, k, v);
    const auto got = quant.forward(off, positions, table, q, k, v);
    const auto plain = reference.forward(off, positions, table, q, kd, vd);
    for (size_t i = 0; i < got.size(); ++i) {
      diff2 += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
      norm2 += static_cast<double>(want[i]) * want[i];
      if (got[i] != plain[i]) e.exact = false;
    }
    for (size_t s = 0; s < positions.size(); ++s) positions[s] += lens[s];
  }
  e.against_f32 = std::sqrt(diff2 / norm2);
  return e;
}

const Shape kShapes[] = {
    {4, 2, 8, 4},     // GQA 2, tiny head dim
    {4, 2, 48, 16},   // the default model's attention
    {12, 4, 64, 8},   // GQA 3
    {8, 1, 128, 32},  // MQA, head dim 128
    {6, 6, 20, 1},    // MHA, one token per block, row bytes not a multiple of 16
};

void check_dtype(const std::string &kv, double bound) {
  double worst = 0;
  for (size_t i = 0; i < std::size(kShapes); ++i) {
    const Shape &g = kShapes[i];
    INFO("kv_dtype " << kv << ", H=" << g.H << " Hkv=" << g.Hkv << " D=" << g.D << " B=" << g.B);
    const Errors e = run_scenario(g, 3, kv, static_cast<uint32_t>(1000 + i));
    CHECK(e.exact);
    CHECK(e.against_f32 < bound);
    worst = std::max(worst, e.against_f32);
  }
  std::printf("kv_dtype %-4s: largest relative L2 error against the f32 cache %.3e (bound %.1e)\n", kv.c_str(), worst,
              bound);
}

} // namespace

TEST_CASE("sdpa int8 KV cache: exact dequantize-then-attend, within 1% of the f32 cache", "[sdpa][kv]") {
  check_dtype("int8", 1e-2);
}

TEST_CASE("sdpa fp8 KV cache: exact dequantize-then-attend, within 6% of the f32 cache", "[sdpa][kv]") {
  check_dtype("fp8", 6e-2);
}

TEST_CASE("sdpa bf16 KV cache under float32 compute: exact round-then-attend, within 0.5%", "[sdpa][kv]") {
  check_dtype("bf16", 5e-3);
}

TEST_CASE("sdpa reports each cache dtype and stores rows and scales where it says", "[sdpa][kv]") {
  const Shape g{2, 1, 8, 2};
  auto dtype_of = [&](const std::string &kv) { return Paged(g, kv, 1).layout().cache_dtype; };
  CHECK((dtype_of("auto").code == kDLFloat && dtype_of("auto").bits == 32));
  CHECK((dtype_of("bf16").code == kDLBfloat && dtype_of("bf16").bits == 16));
  CHECK((dtype_of("int8").code == kDLInt && dtype_of("int8").bits == 8));
  CHECK((dtype_of("fp8").code == 10 && dtype_of("fp8").bits == 8));  // DLPack 1.1's kDLFloat8_e4m3fn

  // One token into slot 1 of block 0: key row r = (0 * B + 1) * Hkv + 0 = 1, value row 3.
  Paged p(g, "int8", 1);
  bt::Tensor<int32_t> table({1, 1}, {0});
  const std::vector<float> key{0.5f, -1.0f, 0.25f, 0, 0, 0, 0, 2.0f}, value(8, -3.0f);
  p.forward({0, 2}, {0}, table, std::vector<float>(2 * 2 * 8, 0.1f), [&] {
    std::vector<float> k(16, 0.0f);
    std::copy(key.begin(), key.end(), k.begin() + 8);
    return k;
  }(), [&] {
    std::vector<float> v(16, 0.0f);
    std::copy(value.begin(), value.end(), v.begin() + 8);
    return v;
  }());
  const auto &pool = p.pool();
  const int64_t scales = align16(2 * 2 * 1 * 8);
  auto scale_of = [&](int64_t row) {
    float s;
    std::memcpy(&s, pool.data() + scales + 4 * row, 4);
    return s;
  };
  CHECK(scale_of(0) == 0.0f);  // slot 0's key: all zeros
  CHECK(scale_of(1) == 2.0f / 127.0f);
  CHECK(scale_of(3) == 3.0f / 127.0f);
  const auto *codes = reinterpret_cast<const int8_t *>(pool.data());
  CHECK(codes[8 + 7] == 127);
  CHECK(codes[8 + 1] == static_cast<int8_t>(std::nearbyint(-1.0f / (2.0f / 127.0f))));  // about -63.5
  CHECK(codes[8 + 0] == 32);   // 0.5 * 63.5 = 31.75
  CHECK(codes[3 * 8 + 0] == -127);
}

TEST_CASE("sdpa refuses unknown kv_dtype values by name", "[sdpa][kv]") {
  for (const char *bad : {"\"int4\"", "\"fp16\"", "\"FP8\"", "\"\"", "8"}) {
    INFO(bad);
    CHECK_THAT(bt::build_error(std::string("[attention]\nuse = \"sdpa\"\nkv_dtype = ") + bad + "\n"),
               Catch::Contains("attention.kv_dtype"));
  }
  CHECK_THAT(bt::build_error("[attention]\nuse = \"sdpa\"\nkv_dtype = \"int4\"\n"),
             Catch::Contains("sdpa: kv_dtype must be \"auto\", \"bf16\", \"int8\" or \"fp8\", got \"int4\""));
  for (const char *ok : {"auto", "bf16", "int8", "fp8"})
    CHECK(bt::build_error(std::string("[attention]\nuse = \"sdpa\"\nkv_dtype = \"") + ok + "\"\n").empty());
}
