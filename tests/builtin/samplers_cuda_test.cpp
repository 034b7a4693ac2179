// The samplers' CUDA paths against their CPU paths, component by component: the same instance
// applied to a host copy and to a device copy of random rows (vocab 1000, 32000 and 128256;
// 1, 5 and 32 rows; -inf entries, ties, rows of equal logits, rows with one finite entry) must
// give bit-identical rows (temperature, penalties, repetition-penalty, min-p, top-k) or the same
// tokens (dist, 10,000 seeded rows). top-p and dist sum weights in another order on the device:
// a row may differ only where the CPU's cumulative mass lies within rounding of the boundary,
// and such rows are counted (at most 1 in 1000). The whole chain penalties -> temperature ->
// top-k -> top-p -> min-p -> dist gives the same tokens. Through core's SamplerChain the rows
// travel as candidates (ABI 1.3) after top-k: top-k into candidates and back must give the CPU's
// rows bit for bit, and a candidate chain exactly the CPU's tokens and log-probabilities (no
// boundary exception there: the sums run in the CPU's order). Rows holding +inf logits
// ("[inf]": softmax's limit, uniform over them) give the CPU's tokens, rows and
// log-probabilities exactly, dense or as candidates. A hidden "[.bench]" case times each link
// and the chain on 32 x 128256 rows with CUDA events (device time: a long copy ahead keeps the
// GPU busy while the host queues the links, as the decoder's next step does).
// Exits 77 (CTest: skipped) when there is no CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../../plugins/samplers/philox.hpp"
#include "builtin_test_util.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/sampler_chain.hpp"

namespace {

#define CUDA_REQUIRE(expr) REQUIRE(static_cast<int>(expr) == static_cast<int>(cudaSuccess))

// Rows of one test batch: logits on the host, histories, RNG.
struct Rows {
  int64_t n = 0, vocab = 0;
  std::vector<float> x;
  std::vector<std::vector<int32_t>> hist;
  std::vector<uint64_t> key, counter;
};

enum class Kind { normal, ties, equal, one_finite, masked };

// Row r of a batch: normal logits of scale `scale` with some rows of special shape.
std::vector<float> make_row(std::mt19937 &g, int64_t vocab, Kind kind, float scale) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  std::vector<float> row(static_cast<size_t>(vocab));
  for (auto &v : row) v = nd(g);
  switch (kind) {
    case Kind::ties:  // coarse values: many ties at every boundary
      for (auto &v : row) v = std::round(v * 2.0f) / 2.0f;
      break;
    case Kind::equal:
      std::fill(row.begin(), row.end(), 0.25f);
      break;
    case Kind::one_finite: {
      const float keep = row[static_cast<size_t>(vocab / 3)];
      std::fill(row.begin(), row.end(), -INFINITY);
      row[static_cast<size_t>(vocab / 3)] = keep;
      break;
    }
    case Kind::masked:  // 30% -inf, and a few -0.0 / +0.0
      for (auto &v : row)
        if (ud(g) < 0.3f) v = -INFINITY;
      row[1] = -0.0f;
      row[2] = 0.0f;
      break;
    default:
      break;
  }
  return row;
}

Rows make_rows(int64_t n, int64_t vocab, uint32_t seed, float scale = 3.0f, bool special = true) {
  std::mt19937 g(seed);
  Rows r;
  r.n = n;
  r.vocab = vocab;
  r.x.reserve(static_cast<size_t>(n * vocab));
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  std::uniform_int_distribution<int32_t> small(0, 20);
  for (int64_t i = 0; i < n; ++i) {
    Kind kind = Kind::normal;
    if (special && n > 1) kind = static_cast<Kind>(i % 5);
    const auto row = make_row(g, vocab, kind, scale);
    r.x.insert(r.x.end(), row.begin(), row.end());
    // History: 100 tokens, many repeated (small ids) so that counts exceed 1.
    std::vector<int32_t> h;
    for (int t = 0; t < 100; ++t) h.push_back(t % 3 == 0 ? small(g) : tok(g));
    r.hist.push_back(h);
    r.key.push_back(0x9E3779B97F4A7C15ull + static_cast<uint64_t>(seed) * 1000003ull + static_cast<uint64_t>(i));
    r.counter.push_back(static_cast<uint64_t>(seed) + 17);
  }
  return r;
}

// Device memory owned by the test.
struct DeviceBuffer {
  void *ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { REQUIRE(cudaMalloc(&ptr, bytes == 0 ? 1 : bytes) == cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer &) = delete;
  DeviceBuffer &operator=(const DeviceBuffer &) = delete;
};

// One call of a link's apply() over rows on the CPU or on CUDA; returns the status and leaves
// the rewritten rows in `out` and the tokens in `tokens`.
struct Call {
  std::vector<int64_t> seq_ids;
  std::vector<const int32_t *> hist_ptr;
  std::vector<int32_t> hist_len;
  std::vector<int32_t> tokens;
  int64_t shape[2]{};
  DLTensor logits{};
  int64_t tok_shape[1]{};
  DLTensor tokens_device{};
  loom_sampling_batch b{};

  Call(const Rows &r, void *data, DLDevice dev, int32_t *device_tokens = nullptr)
      : seq_ids(static_cast<size_t>(r.n)), hist_len(static_cast<size_t>(r.n)), tokens(static_cast<size_t>(r.n), -1) {
    for (int64_t i = 0; i < r.n; ++i) {
      seq_ids[static_cast<size_t>(i)] = i;
      hist_ptr.push_back(r.hist[static_cast<size_t>(i)].data());
      hist_len[static_cast<size_t>(i)] = static_cast<int32_t>(r.hist[static_cast<size_t>(i)].size());
    }
    shape[0] = r.n;
    shape[1] = r.vocab;
    logits = DLTensor{data, dev, 2, DLDataType{kDLFloat, 32, 1}, shape, nullptr, 0};
    b.struct_size = sizeof(b);
    b.n_rows = static_cast<int32_t>(r.n);
    b.vocab_size = static_cast<int32_t>(r.vocab);
    b.logits = &logits;
    b.seq_ids = seq_ids.data();
    b.history = hist_ptr.data();
    b.history_len = hist_len.data();
    b.rng_key = r.key.data();
    b.rng_counter = r.counter.data();
    b.tokens_out = tokens.data();
    b.logprobs_out = nullptr;
    if (device_tokens != nullptr) {
      tok_shape[0] = r.n;
      tokens_device = DLTensor{device_tokens, dev, 1, DLDataType{kDLInt, 32, 1}, tok_shape, nullptr, 0};
      b.tokens_device = &tokens_device;
    }
  }
};

void apply_ok(loom::Instance &in, const loom_sampling_batch &b) {
  const loom_status s = in.vtable<loom_sampler_vtable>()->apply(in.handle(), &b);
  INFO(in.desc().name << ": " << in.last_error());
  REQUIRE(s == LOOM_OK);
}

// The link applied on the CPU and on CUDA to the same rows: rows (and tokens) of both.
struct Both {
  std::vector<float> cpu, gpu;
  std::vector<int32_t> cpu_tokens, gpu_tokens;
};
Both run_both(loom::Instance &in, const Rows &r, bool device_tokens = false) {
  Both out;
  out.cpu = r.x;
  Call cc(r, out.cpu.data(), DLDevice{kDLCPU, 0});
  apply_ok(in, cc.b);
  out.cpu_tokens = cc.tokens;
  DeviceBuffer d(r.x.size() * sizeof(float)), t(static_cast<size_t>(r.n) * sizeof(int32_t));
  CUDA_REQUIRE(cudaMemcpy(d.ptr, r.x.data(), r.x.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_REQUIRE(cudaMemset(t.ptr, 0xff, static_cast<size_t>(r.n) * sizeof(int32_t)));
  Call gc(r, d.ptr, DLDevice{kDLCUDA, 0}, device_tokens ? static_cast<int32_t *>(t.ptr) : nullptr);
  apply_ok(in, gc.b);
  CUDA_REQUIRE(cudaDeviceSynchronize());
  CUDA_REQUIRE(cudaGetLastError());
  out.gpu.resize(r.x.size());
  CUDA_REQUIRE(cudaMemcpy(out.gpu.data(), d.ptr, r.x.size() * sizeof(float), cudaMemcpyDeviceToHost));
  out.gpu_tokens = gc.tokens;
  if (device_tokens) {
    for (int32_t tok : gc.tokens) REQUIRE(tok == -1);  // written on the device instead
    CUDA_REQUIRE(cudaMemcpy(out.gpu_tokens.data(), t.ptr, static_cast<size_t>(r.n) * sizeof(int32_t),
                            cudaMemcpyDeviceToHost));
  }
  return out;
}

// Rows that differ bit for bit (-inf positions included).
std::vector<int64_t> differing_rows(const std::vector<float> &a, const std::vector<float> &b, int64_t vocab) {
  std::vector<int64_t> rows;
  for (size_t r = 0; r * static_cast<size_t>(vocab) < a.size(); ++r)
    if (std::memcmp(a.data() + r * vocab, b.data() + r * vocab, static_cast<size_t>(vocab) * sizeof(float)) != 0)
      rows.push_back(static_cast<int64_t>(r));
  return rows;
}

// The order top-p keeps tokens in, the weights exp(x - max) in double and their prefix sums.
struct Nucleus {
  std::vector<int32_t> order;
  std::vector<double> cum;  // cum[n] = weight of the first n tokens of `order`
  double total = 0.0;
};
Nucleus nucleus_of(const float *x, int64_t vocab) {
  Nucleus nu;
  float mx = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, x[i]);
  std::vector<double> w(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) {
    w[static_cast<size_t>(i)] = x[i] == -INFINITY ? 0.0 : std::exp(static_cast<double>(x[i]) - mx);
    nu.total += w[static_cast<size_t>(i)];
  }
  nu.order.resize(static_cast<size_t>(vocab));
  std::iota(nu.order.begin(), nu.order.end(), 0);
  std::stable_sort(nu.order.begin(), nu.order.end(), [&](int32_t a, int32_t b) { return w[a] > w[b]; });
  nu.cum.assign(1, 0.0);
  for (int32_t i : nu.order) nu.cum.push_back(nu.cum.back() + w[static_cast<size_t>(i)]);
  return nu;
}

int64_t kept(const float *x, int64_t vocab) {
  int64_t n = 0;
  for (int64_t i = 0; i < vocab; ++i) n += x[i] != -INFINITY;
  return n;
}

// A top-p row where CPU and CUDA differ: both must keep a prefix of the same order, and the
// shorter prefix's mass must lie within rounding of p * total (an exact boundary).
bool top_p_boundary(const float *in, const float *cpu, const float *gpu, int64_t vocab, double p) {
  const Nucleus nu = nucleus_of(in, vocab);
  const double target = p * nu.total;
  for (const float *row : {cpu, gpu}) {
    const int64_t n = kept(row, vocab);
    for (int64_t i = 0; i < vocab; ++i) {
      const int32_t id = nu.order[static_cast<size_t>(i)];
      const bool should = i < n;
      if ((row[id] != -INFINITY) != should && in[id] != -INFINITY) return false;
    }
  }
  const int64_t lo = std::min(kept(cpu, vocab), kept(gpu, vocab));
  const int64_t hi = std::max(kept(cpu, vocab), kept(gpu, vocab));
  if (hi - lo > 1) return false;
  return std::abs(nu.cum[static_cast<size_t>(lo)] - target) <= 1e-9 * nu.total;
}

// A dist row where CPU and CUDA drew different tokens: u * total must lie within rounding of
// the cumulative weight (in id order) at the boundary between the two tokens.
bool dist_boundary(const float *x, int64_t vocab, uint64_t key, uint64_t counter, int32_t a, int32_t b) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, x[i]);
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i)
    if (x[i] != -INFINITY) total += std::exp(static_cast<double>(x[i]) - mx);
  const double target = static_cast<double>(loomp::philox::uniform01(key, counter)) * total;
  const int32_t lo = std::min(a, b);
  double cum = 0.0;
  for (int64_t i = 0; i <= lo; ++i)
    if (x[i] != -INFINITY) cum += std::exp(static_cast<double>(x[i]) - mx);
  return std::abs(cum - target) <= 1e-9 * total;
}

struct Shape {
  int64_t rows, vocab;
};
const Shape kShapes[] = {{1, 1000}, {5, 1000}, {32, 1000}, {1, 32000}, {5, 32000},
                         {32, 32000}, {1, 128256}, {5, 128256}, {32, 128256}};

// Every shape through one link; exact links must match bit for bit.
void check_exact(const std::string &toml) {
  auto rt = bt::runtime(toml);
  auto &in = rt->pipeline().at("sampler[0]");
  REQUIRE((in.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_RUNS_ON_CUDA) != 0);
  uint32_t seed = 1;
  for (const Shape &s : kShapes) {
    const Rows r = make_rows(s.rows, s.vocab, seed++);
    const Both both = run_both(in, r);
    INFO(toml << " rows " << s.rows << " vocab " << s.vocab);
    CHECK(differing_rows(both.cpu, both.gpu, s.vocab).empty());
  }
}

} // namespace

TEST_CASE("temperature on CUDA rewrites rows exactly as on the CPU", "[samplers][cuda]") {
  check_exact("[[sampler]]\nuse = \"temperature\"\nt = 0.7\n");
  check_exact("[[sampler]]\nuse = \"temperature\"\nt = 1.3\n");
}

TEST_CASE("penalties and repetition-penalty on CUDA match the CPU's float formula", "[samplers][cuda]") {
  check_exact("[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 1.1\nfrequency_penalty = 0.3\n"
              "presence_penalty = 0.2\nlast_n = 64\n");
  check_exact("[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 1.3\nlast_n = 0\n");
  check_exact("[[sampler]]\nuse = \"repetition-penalty\"\npenalty = 1.2\nfrequency = 0.1\npresence = 0.5\nlast_n = -1\n");
  check_exact("[[sampler]]\nuse = \"repetition-penalty\"\npenalty = 0.9\nlast_n = 16\n");
}

TEST_CASE("min-p on CUDA masks exactly the CPU's tokens", "[samplers][cuda]") {
  check_exact("[[sampler]]\nuse = \"min-p\"\np = 0.05\n");
  check_exact("[[sampler]]\nuse = \"min-p\"\np = 0.5\n");
  check_exact("[[sampler]]\nuse = \"min-p\"\np = 1.0\n");
}

TEST_CASE("top-k on CUDA keeps exactly the CPU's k best (ties to the lower id)", "[samplers][cuda]") {
  for (int k : {1, 2, 40, 100, 999, 5000})
    check_exact("[[sampler]]\nuse = \"top-k\"\nk = " + std::to_string(k) + "\n");
}

TEST_CASE("top-p on CUDA keeps the CPU's nucleus except at exact boundaries", "[samplers][cuda]") {
  int64_t rows = 0, boundary = 0;
  for (double p : {0.5, 0.9, 0.95, 0.999}) {
    for (int min_keep : {1, 50}) {
      auto rt = bt::runtime("[[sampler]]\nuse = \"top-p\"\np = " + std::to_string(p) +
                            "\nmin_keep = " + std::to_string(min_keep) + "\n");
      auto &in = rt->pipeline().at("sampler[0]");
      REQUIRE((in.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_RUNS_ON_CUDA) != 0);
      uint32_t seed = 100;
      for (const Shape &s : kShapes) {
        for (float scale : {1.0f, 3.0f}) {
          const Rows r = make_rows(s.rows, s.vocab, seed++, scale);
          const Both both = run_both(in, r);
          rows += s.rows;
          for (int64_t row : differing_rows(both.cpu, both.gpu, s.vocab)) {
            INFO("p " << p << " min_keep " << min_keep << " rows " << s.rows << " vocab " << s.vocab << " row " << row);
            const size_t at = static_cast<size_t>(row * s.vocab);
            REQUIRE(top_p_boundary(r.x.data() + at, both.cpu.data() + at, both.gpu.data() + at, s.vocab, p));
            ++boundary;
          }
        }
      }
    }
  }
  // Many rows of a realistic shape as well.
  auto rt = bt::runtime("[[sampler]]\nuse = \"top-p\"\np = 0.95\n");
  auto &in = rt->pipeline().at("sampler[0]");
  for (uint32_t batch = 0; batch < 8; ++batch) {
    const Rows r = make_rows(125, 32000, 900 + batch, 2.0f + 0.5f * static_cast<float>(batch), false);
    const Both both = run_both(in, r);
    rows += r.n;
    for (int64_t row : differing_rows(both.cpu, both.gpu, r.vocab)) {
      const size_t at = static_cast<size_t>(row * r.vocab);
      REQUIRE(top_p_boundary(r.x.data() + at, both.cpu.data() + at, both.gpu.data() + at, r.vocab, 0.95));
      ++boundary;
    }
  }
  std::printf("top-p: %lld rows, %lld exact-boundary differences\n", static_cast<long long>(rows),
              static_cast<long long>(boundary));
  CHECK(boundary * 1000 <= rows);
}

TEST_CASE("dist on CUDA draws the CPU's tokens for 10,000 seeded rows", "[samplers][cuda]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"dist\"\n");
  auto &in = rt->pipeline().at("sampler[0]");
  const auto flags = in.vtable<loom_sampler_vtable>()->flags;
  REQUIRE((flags & LOOM_SAMPLER_RUNS_ON_CUDA) != 0);
  REQUIRE((flags & LOOM_SAMPLER_DEVICE_TOKENS) != 0);
  int64_t rows = 0, boundary = 0;
  uint32_t seed = 5000;
  auto check_rows = [&](const Rows &r, bool device_tokens) {
    const Both both = run_both(in, r, device_tokens);
    for (int64_t i = 0; i < r.n; ++i) {
      const int32_t a = both.cpu_tokens[static_cast<size_t>(i)], b = both.gpu_tokens[static_cast<size_t>(i)];
      ++rows;
      if (a == b) continue;
      INFO("vocab " << r.vocab << " row " << i << " cpu " << a << " cuda " << b);
      REQUIRE(b >= 0);
      REQUIRE(dist_boundary(r.x.data() + i * r.vocab, r.vocab, r.key[static_cast<size_t>(i)],
                            r.counter[static_cast<size_t>(i)], a, b));
      ++boundary;
    }
  };
  for (const Shape &s : kShapes) {
    check_rows(make_rows(s.rows, s.vocab, seed), (seed & 1) != 0);
    ++seed;
  }
  const int64_t vocabs[] = {1000, 4097, 32000, 128256};
  while (rows < 10000) {
    const int64_t vocab = vocabs[seed % 4];
    const int64_t n = vocab > 100000 ? 64 : 500;
    check_rows(make_rows(n, vocab, seed, 1.0f + static_cast<float>(seed % 5), (seed & 2) != 0), (seed & 1) != 0);
    ++seed;
  }
  std::printf("dist: %lld rows, %lld exact-boundary differences\n", static_cast<long long>(rows),
              static_cast<long long>(boundary));
  CHECK(boundary * 1000 <= rows);
}

TEST_CASE("the chain penalties -> temperature -> top-k -> top-p -> min-p -> dist gives the CPU's tokens",
          "[samplers][cuda]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 1.1\nlast_n = 64\n"
                        "[[sampler]]\nuse = \"temperature\"\nt = 0.8\n"
                        "[[sampler]]\nuse = \"top-k\"\nk = 40\n"
                        "[[sampler]]\nuse = \"top-p\"\np = 0.95\n"
                        "[[sampler]]\nuse = \"min-p\"\np = 0.05\n"
                        "[[sampler]]\nuse = \"dist\"\n");
  auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
  REQUIRE(chain.size() == 6);
  int64_t rows = 0, differ = 0;
  for (const Shape &s : kShapes) {
    for (uint32_t step = 0; step < 4; ++step) {
      const Rows r = make_rows(s.rows, s.vocab, 7000 + step + static_cast<uint32_t>(s.vocab), 2.5f, false);
      std::vector<float> cpu = r.x;
      Call cc(r, cpu.data(), DLDevice{kDLCPU, 0});
      DeviceBuffer d(r.x.size() * sizeof(float)), t(static_cast<size_t>(r.n) * sizeof(int32_t));
      CUDA_REQUIRE(cudaMemcpy(d.ptr, r.x.data(), r.x.size() * sizeof(float), cudaMemcpyHostToDevice));
      Call gc(r, d.ptr, DLDevice{kDLCUDA, 0}, static_cast<int32_t *>(t.ptr));
      for (auto &link : chain) {
        apply_ok(*link, cc.b);
        apply_ok(*link, gc.b);
      }
      CUDA_REQUIRE(cudaDeviceSynchronize());
      std::vector<int32_t> gpu(static_cast<size_t>(r.n));
      CUDA_REQUIRE(cudaMemcpy(gpu.data(), t.ptr, gpu.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < gpu.size(); ++i) {
        ++rows;
        differ += gpu[i] != cc.tokens[i];
      }
    }
  }
  std::printf("chain: %lld rows, %lld differences\n", static_cast<long long>(rows), static_cast<long long>(differ));
  CHECK(differ * 1000 <= rows);
}

// The chain over `r` on the CPU, link by link, and on CUDA through core's SamplerChain (which
// offers candidate rows to the links that read them). Rows of both after the chain, tokens of
// both (the CUDA tokens left on the device unless `logprobs`), log-probabilities when asked.
struct ChainRun {
  std::vector<float> cpu, gpu;
  std::vector<int32_t> cpu_tokens, gpu_tokens;
  std::vector<float> cpu_logprobs, gpu_logprobs;
  bool used_candidates = false;
};
ChainRun run_chain(const std::vector<std::shared_ptr<loom::Instance>> &chain, const Rows &r, bool logprobs = false) {
  ChainRun out;
  out.cpu = r.x;
  Call cc(r, out.cpu.data(), DLDevice{kDLCPU, 0});
  out.cpu_logprobs.assign(static_cast<size_t>(r.n), 0.0f);
  if (logprobs) cc.b.logprobs_out = out.cpu_logprobs.data();
  for (auto &link : chain) apply_ok(*link, cc.b);
  out.cpu_tokens = cc.tokens;
  DeviceBuffer d(r.x.size() * sizeof(float)), t(static_cast<size_t>(r.n) * sizeof(int32_t));
  CUDA_REQUIRE(cudaMemcpy(d.ptr, r.x.data(), r.x.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_REQUIRE(cudaMemset(t.ptr, 0xff, static_cast<size_t>(r.n) * sizeof(int32_t)));
  Call gc(r, d.ptr, DLDevice{kDLCUDA, 0}, static_cast<int32_t *>(t.ptr));
  out.gpu_logprobs.assign(static_cast<size_t>(r.n), 0.0f);
  if (logprobs) gc.b.logprobs_out = out.gpu_logprobs.data();
  loom::SamplerChain runner;
  try {
    runner.apply(chain, gc.b, "selecting samplers must come last");
  } catch (const std::exception &e) {
    FAIL(e.what());
  }
  out.used_candidates = runner.used_candidates();
  CUDA_REQUIRE(cudaDeviceSynchronize());
  out.gpu.resize(r.x.size());
  CUDA_REQUIRE(cudaMemcpy(out.gpu.data(), d.ptr, r.x.size() * sizeof(float), cudaMemcpyDeviceToHost));
  out.gpu_tokens = gc.tokens;
  if (std::all_of(gc.tokens.begin(), gc.tokens.end(), [](int32_t tok) { return tok == -1; }))
    CUDA_REQUIRE(cudaMemcpy(out.gpu_tokens.data(), t.ptr, static_cast<size_t>(r.n) * sizeof(int32_t),
                            cudaMemcpyDeviceToHost));
  return out;
}

TEST_CASE("top-k into candidate rows and back gives the CPU's rows bit for bit", "[samplers][cuda][candidates]") {
  // top-k leaves its rows as candidates; penalties (which does not read them) makes the host
  // turn them back into dense rows first. Every shape, every special row (ties, equal logits,
  // one finite entry, -inf and signed zeros), k from 1 to the candidates' capacity; above it
  // top-k stays dense.
  for (int64_t k : {1, 7, 40, 64, 128, 129, 1024, 1025}) {
    auto rt = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = " + std::to_string(k) +
                          "\n[[sampler]]\nuse = \"penalties\"\nfrequency_penalty = 0.5\nlast_n = 64\n");
    auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
    uint32_t seed = 300;
    for (const Shape &s : kShapes) {
      const Rows r = make_rows(s.rows, s.vocab, seed++);
      const ChainRun run = run_chain(chain, r);
      INFO("k " << k << " rows " << s.rows << " vocab " << s.vocab);
      CHECK(run.used_candidates == (k <= loom::SamplerChain::kCapacity && k < s.vocab));
      CHECK(differing_rows(run.cpu, run.gpu, s.vocab).empty());
    }
  }
  // Candidates already in order: a second top-k keeps their first k.
  auto rt = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 300\n[[sampler]]\nuse = \"top-k\"\nk = 30\n"
                        "[[sampler]]\nuse = \"penalties\"\nfrequency_penalty = 0.5\n");
  auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
  const Rows r = make_rows(32, 32000, 77);
  const ChainRun run = run_chain(chain, r);
  CHECK(run.used_candidates);
  CHECK(differing_rows(run.cpu, run.gpu, 32000).empty());
}

// Two neighbouring floats a < b near 1.75 that one float multiply by `inv` makes equal.
std::pair<float, float> neighbours_made_equal(float inv) {
  float a = 1.75f;
  for (int i = 0; i < 1000; ++i) {
    const float b = std::nextafter(a, 2.0f);
    if (a * inv == b * inv) return {a, b};
    a = b;
  }
  FAIL("no neighbouring floats that the multiply makes equal");
  return {0.0f, 0.0f};
}

TEST_CASE("temperature on candidate rows keeps ties in id order", "[samplers][cuda][candidates]") {
  // Two neighbouring floats that one float multiply by 1/t makes equal: before the multiply the
  // larger (at the higher id) comes first; after it the lower id must, as on the CPU, so that a
  // following top-k of 1 keeps the lower id.
  const auto [a, b] = neighbours_made_equal(1.0f / 1.5f);
  Rows r = make_rows(1, 1000, 5, 0.1f, false);  // values far below a and b
  r.x[10] = b;                                  // the larger value at the higher id
  r.x[5] = a;
  auto rt = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 10\n[[sampler]]\nuse = \"temperature\"\nt = 1.5\n"
                        "[[sampler]]\nuse = \"top-k\"\nk = 1\n[[sampler]]\nuse = \"penalties\"\n");
  const ChainRun run = run_chain(rt->pipeline().list(LOOM_KIND_SAMPLER), r);
  CHECK(run.used_candidates);
  CHECK(run.cpu[5] != -INFINITY);
  CHECK(differing_rows(run.cpu, run.gpu, 1000).empty());
}

TEST_CASE("a deferred temperature scale gives the CPU's rows bit for bit", "[samplers][cuda][candidates]") {
  // temperature leaves its multiply owed (ABI 1.4 dense_scale) when offered candidates: top-k
  // applies it as it reads (k <= 128 in one kernel, up to 1024 by radix select, above that top-k
  // pays it and stays dense), and the host pays it before a link that does not read it
  // (penalties, greedy) and when the chain ends with it owed. Every path must leave the CPU's
  // rows and tokens.
  const std::string temp = "[[sampler]]\nuse = \"temperature\"\nt = 0.7\n";
  const std::string pen = "[[sampler]]\nuse = \"penalties\"\nfrequency_penalty = 0.5\nlast_n = 64\n";
  auto top_k = [](int64_t k) { return "[[sampler]]\nuse = \"top-k\"\nk = " + std::to_string(k) + "\n"; };
  struct Case {
    std::string toml;
    int64_t k;  // top-k's k: rows travel as candidates when k < vocab and k <= 1024 (0: no top-k)
  };
  std::vector<Case> cases;
  for (int64_t k : {1, 40, 128, 129, 1024, 1025}) cases.push_back({temp + top_k(k) + pen, k});
  cases.push_back({temp + pen + top_k(40) + pen, 40});                              // paid before penalties
  cases.push_back({temp + "[[sampler]]\nuse = \"temperature\"\nt = 1.3\n" + top_k(40) + pen, 40});  // two scales
  cases.push_back({temp, 0});                                                       // paid at the end
  cases.push_back({temp + "[[sampler]]\nuse = \"greedy\"\n", 0});                 // paid before greedy
  cases.push_back({pen + temp + top_k(40) + "[[sampler]]\nuse = \"dist\"\n", 40});
  uint32_t seed = 4100;
  for (const Case &c : cases) {
    auto rt = bt::runtime(c.toml);
    auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
    for (const Shape &s : kShapes) {
      const Rows r = make_rows(s.rows, s.vocab, seed++);
      const ChainRun run = run_chain(chain, r);
      INFO(c.toml << "rows " << s.rows << " vocab " << s.vocab);
      CHECK(run.used_candidates == (c.k > 0 && c.k <= 1024 && c.k < s.vocab));
      CHECK(run.gpu_tokens == run.cpu_tokens);
      if (c.toml.find("dist") == std::string::npos) CHECK(differing_rows(run.cpu, run.gpu, s.vocab).empty());
    }
  }
}

TEST_CASE("a deferred temperature before top-k keeps the ties its multiply makes in id order",
          "[samplers][cuda][candidates]") {
  // Two neighbouring floats that the multiply by 1/t makes equal, the larger at the higher id:
  // top-k of 1 after temperature must keep the lower id, as on the CPU (where the multiply came
  // first), though the dense rows still hold the unequal values when top-k reads them.
  const auto [a, b] = neighbours_made_equal(1.0f / 1.5f);
  Rows r = make_rows(2, 5000, 6, 0.1f, false);  // values far below a and b
  r.x[10] = b;
  r.x[5] = a;
  r.x[5000 + 4100] = b;  // the same in row 1, across a chunk boundary (chunks of 4096)
  r.x[5000 + 4095] = a;
  auto rt = bt::runtime("[[sampler]]\nuse = \"temperature\"\nt = 1.5\n[[sampler]]\nuse = \"top-k\"\nk = 1\n"
                        "[[sampler]]\nuse = \"penalties\"\n");
  const ChainRun run = run_chain(rt->pipeline().list(LOOM_KIND_SAMPLER), r);
  CHECK(run.used_candidates);
  CHECK(run.cpu[5] != -INFINITY);
  CHECK(run.cpu[5000 + 4095] != -INFINITY);
  CHECK(differing_rows(run.cpu, run.gpu, 5000).empty());
}

TEST_CASE("the chain over candidate rows draws exactly the CPU's tokens and log-probabilities",
          "[samplers][cuda][candidates]") {
  // On candidate rows top-p and dist sum in the CPU's order, so no boundary exception: every
  // token and every log-probability must be the CPU's.
  for (const char *filters : {"[[sampler]]\nuse = \"top-k\"\nk = 40\n[[sampler]]\nuse = \"top-p\"\np = 0.95\n"
                              "[[sampler]]\nuse = \"min-p\"\np = 0.05\n",
                              "[[sampler]]\nuse = \"top-k\"\nk = 1024\n[[sampler]]\nuse = \"top-p\"\np = 0.9\n"
                              "min_keep = 3\n",
                              "[[sampler]]\nuse = \"top-k\"\nk = 5\n[[sampler]]\nuse = \"min-p\"\np = 0.5\n"}) {
    auto rt = bt::runtime(std::string("[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 1.1\nlast_n = 64\n"
                                      "[[sampler]]\nuse = \"temperature\"\nt = 0.8\n") +
                          filters + "[[sampler]]\nuse = \"dist\"\n");
    auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
    int64_t rows = 0, differ = 0, lp_differ = 0;
    for (const Shape &s : kShapes)
      for (uint32_t step = 0; step < 3; ++step) {
        const Rows r = make_rows(s.rows, s.vocab, 9100 + step + static_cast<uint32_t>(s.vocab), 2.5f, step == 2);
        for (bool logprobs : {false, true}) {
          const ChainRun run = run_chain(chain, r, logprobs);
          CHECK(run.used_candidates == (s.vocab > 1024 || std::strstr(filters, "k = 1024") == nullptr));
          for (size_t i = 0; i < run.cpu_tokens.size(); ++i) {
            ++rows;
            differ += run.gpu_tokens[i] != run.cpu_tokens[i];
            if (logprobs) lp_differ += std::memcmp(&run.gpu_logprobs[i], &run.cpu_logprobs[i], sizeof(float)) != 0;
          }
        }
      }
    INFO(filters);
    CHECK(rows > 500);
    CHECK(differ == 0);
    CHECK(lp_differ == 0);
  }
}

// Rows holding +inf logits (what a temperature near 0 or a huge logit bias leaves): row i has
// 1 + i % 4 of them at random ids (spread over the chunks), about 10% -inf, the rest normal.
Rows make_inf_rows(int64_t n, int64_t vocab, uint32_t seed) {
  Rows r = make_rows(n, vocab, seed, 3.0f, false);
  std::mt19937 g(seed + 1);
  std::uniform_int_distribution<int64_t> id(0, vocab - 1);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    float *x = r.x.data() + i * vocab;
    for (int64_t j = 0; j < vocab; ++j)
      if (ud(g) < 0.1f) x[j] = -INFINITY;
    for (int64_t k = 0; k < 1 + i % 4; ++k) x[id(g)] = INFINITY;
  }
  return r;
}

const Shape kInfShapes[] = {{1, 1000}, {5, 4097}, {500, 4097}, {32, 32000}, {8, 128256}};

TEST_CASE("+inf logits: dist and the filters on CUDA give the CPU's tokens and rows exactly", "[samplers][cuda][inf]") {
  // Softmax's limit: the +inf entries share all the probability evenly (exp(inf - inf) was NaN,
  // and the draw fell through to the last finite token). The weights are 0 and 1 and their sums
  // exact integers, so no exact-boundary exception: every token and row must be the CPU's.
  auto rt = bt::runtime("[[sampler]]\nuse = \"dist\"\n");
  auto &dist = rt->pipeline().at("sampler[0]");
  uint32_t seed = 12000;
  for (const Shape &s : kInfShapes)
    for (bool device_tokens : {false, true}) {
      const Rows r = make_inf_rows(s.rows, s.vocab, seed++);
      const Both both = run_both(dist, r, device_tokens);
      INFO("dist rows " << s.rows << " vocab " << s.vocab << " device tokens " << device_tokens);
      CHECK(both.gpu_tokens == both.cpu_tokens);
      for (int64_t i = 0; i < s.rows; ++i) {
        const int32_t tok = both.gpu_tokens[static_cast<size_t>(i)];
        REQUIRE(tok >= 0);
        CHECK(r.x[static_cast<size_t>(i * s.vocab + tok)] == INFINITY);
      }
    }
  for (const char *toml : {"[[sampler]]\nuse = \"top-p\"\np = 0.5\n", "[[sampler]]\nuse = \"top-p\"\np = 0.9\nmin_keep = 3\n",
                           "[[sampler]]\nuse = \"top-p\"\np = 0.95\nmin_keep = 50\n",
                           "[[sampler]]\nuse = \"min-p\"\np = 0.05\n", "[[sampler]]\nuse = \"top-k\"\nk = 2\n",
                           "[[sampler]]\nuse = \"top-k\"\nk = 40\n"}) {
    auto frt = bt::runtime(toml);
    auto &in = frt->pipeline().at("sampler[0]");
    for (const Shape &s : kInfShapes) {
      const Rows r = make_inf_rows(s.rows, s.vocab, seed++);
      const Both both = run_both(in, r);
      INFO(toml << "rows " << s.rows << " vocab " << s.vocab);
      CHECK(differing_rows(both.cpu, both.gpu, s.vocab).empty());
    }
  }
}

TEST_CASE("+inf logits: chains on CUDA (candidate rows and dense) draw the CPU's tokens and log-probabilities",
          "[samplers][cuda][candidates][inf]") {
  // The last chain makes its +inf logits itself: 1/t = 1e38 overflows every |logit| above ~3.4.
  for (const char *links : {"[[sampler]]\nuse = \"temperature\"\nt = 0.8\n[[sampler]]\nuse = \"top-k\"\nk = 40\n"
                            "[[sampler]]\nuse = \"top-p\"\np = 0.9\n[[sampler]]\nuse = \"min-p\"\np = 0.05\n",
                            "[[sampler]]\nuse = \"top-p\"\np = 0.9\nmin_keep = 3\n",
                            "[[sampler]]\nuse = \"temperature\"\nt = 1e-38\n[[sampler]]\nuse = \"top-k\"\nk = 40\n"}) {
    auto rt = bt::runtime(std::string(links) + "[[sampler]]\nuse = \"dist\"\n");
    auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
    uint32_t seed = 13000;
    for (const Shape &s : kInfShapes) {
      const Rows r = make_inf_rows(s.rows, s.vocab, seed++);
      for (bool logprobs : {false, true}) {
        const ChainRun run = run_chain(chain, r, logprobs);
        INFO(links << "rows " << s.rows << " vocab " << s.vocab << " logprobs " << logprobs);
        CHECK(run.gpu_tokens == run.cpu_tokens);
        for (int64_t i = 0; i < s.rows; ++i) {
          const size_t at = static_cast<size_t>(i);
          REQUIRE(run.cpu_tokens[at] >= 0);
          CHECK(run.cpu[static_cast<size_t>(i * s.vocab + run.cpu_tokens[at])] == INFINITY);
          if (logprobs) {
            CHECK(std::memcmp(&run.gpu_logprobs[at], &run.cpu_logprobs[at], sizeof(float)) == 0);
            CHECK(run.cpu_logprobs[at] <= 0.0f);
          }
        }
      }
    }
  }
}

TEST_CASE("sampling links on 32 x 128256 rows, timed with CUDA events", "[.bench]") {
  const char *links[] = {
      "[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 1.1\nlast_n = 64\n",
      "[[sampler]]\nuse = \"temperature\"\nt = 0.8\n",
      "[[sampler]]\nuse = \"top-k\"\nk = 40\n",
      "[[sampler]]\nuse = \"top-p\"\np = 0.95\n",
      "[[sampler]]\nuse = \"min-p\"\np = 0.05\n",
      "[[sampler]]\nuse = \"dist\"\n",
      "[[sampler]]\nuse = \"greedy\"\n",
  };
  const Rows r = make_rows(32, 128256, 42, 3.0f, false);
  DeviceBuffer src(r.x.size() * sizeof(float)), d(r.x.size() * sizeof(float)), t(32 * sizeof(int32_t));
  const size_t busy_bytes = size_t{256} << 20;
  DeviceBuffer busy_a(busy_bytes), busy_b(busy_bytes);
  CUDA_REQUIRE(cudaMemcpy(src.ptr, r.x.data(), r.x.size() * sizeof(float), cudaMemcpyHostToDevice));
  auto stream = static_cast<cudaStream_t>(loom::cuda_compute_stream(0));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  // LOOM_BENCH_REPS (default 20, the first 3 warm up): fewer under a profiler.
  const char *reps_env = std::getenv("LOOM_BENCH_REPS");
  const int reps = reps_env ? std::max(1, std::atoi(reps_env)) : 20;
  auto time_links = [&](const std::string &name, const std::string &toml, bool candidates = true) {
    auto rt = bt::runtime(toml);
    auto chain = rt->pipeline().list(LOOM_KIND_SAMPLER);
    loom::SamplerChain runner(candidates);  // as the decoder runs a chain (or with dense rows throughout)
    std::vector<float> ms;
    for (int rep = 0; rep < reps; ++rep) {
      CUDA_REQUIRE(cudaMemcpyAsync(busy_b.ptr, busy_a.ptr, busy_bytes, cudaMemcpyDeviceToDevice, stream));
      CUDA_REQUIRE(cudaMemcpyAsync(d.ptr, src.ptr, r.x.size() * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      Call gc(r, d.ptr, DLDevice{kDLCUDA, 0}, static_cast<int32_t *>(t.ptr));
      cudaEventRecord(a, stream);
      runner.apply(chain, gc.b, "selecting samplers must come last");
      cudaEventRecord(b, stream);
      CUDA_REQUIRE(cudaEventSynchronize(b));
      float m = 0;
      cudaEventElapsedTime(&m, a, b);
      if (rep >= std::min(3, reps - 1)) ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    std::printf("%-16s %8.1f us%s\n", name.c_str(), 1000.0 * ms[ms.size() / 2],
                runner.used_candidates() ? " (candidate rows)" : "");
  };
  for (const char *toml : links) time_links(bt::runtime(toml)->pipeline().at("sampler[0]").desc().name, toml);
  // The chain: every link but greedy.
  std::string chain;
  for (size_t i = 0; i + 1 < sizeof(links) / sizeof(links[0]); ++i) chain += links[i];
  time_links("chain", chain);
  time_links("chain, dense", chain, false);  // the same chain on dense rows throughout
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

int main(int argc, char **argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
