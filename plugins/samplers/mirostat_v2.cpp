// Sampler `mirostat-v2` (Basu et al. 2021, as llama.cpp's mirostat v2): a selecting sampler
// with a per-sequence target surprise mu (bits), initially 2 * tau.
//   1. p = softmax(logits); mask every token whose surprise -log2 p exceeds mu (the most
//      probable token always survives);
//   2. draw from the rest exactly as `dist` does on the masked row (same Philox draw);
//   3. observed = -log2 p'(selected), p' renormalised over the survivors (as llama.cpp);
//      mu -= eta * (observed - tau), applied when the host accept()s that token for the row's
//      sequence. Accepting a token this link did not select leaves mu unchanged.
// The masked row is left in the logits. State: mu per seq_id; fork() copies it, release()
// forgets it, and export_state/import_state carry it across a hot swap.
#include <cmath>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

constexpr const char* kStateFormat = "loom.sampler.mirostat-v2/1";  // u64 n, then n x (i64 seq, f64 mu)

struct MirostatV2 : Base {
  double tau, eta;
  std::unordered_map<int64_t, double> mu;
  struct Pending {
    int32_t token;
    double surprise;
  };
  std::unordered_map<int64_t, Pending> pending;

  MirostatV2(const loom_host_api* h, loom_host_ctx* c)
      : Base(h, c), tau(cfg_float(h, c, "tau")), eta(cfg_float(h, c, "eta")) {
    if (!(tau >= 0.0) || !std::isfinite(tau))
      invalid_param("tau", "mirostat-v2: tau must be a finite number >= 0, got " + std::to_string(tau));
    if (!(eta > 0.0) || !std::isfinite(eta))
      invalid_param("eta", "mirostat-v2: eta must be a finite number > 0, got " + std::to_string(eta));
  }

  double mu_of(int64_t seq) const {
    auto it = mu.find(seq);
    return it == mu.end() ? 2.0 * tau : it->second;
  }

  void apply(const loom_sampling_batch& b) {
    const Rows rows = cpu_rows(&b, "mirostat-v2");
    if (b.tokens_out == nullptr) invalid("mirostat-v2: tokens_out is NULL");
    if (rows.n > 0 && (b.rng_key == nullptr || b.rng_counter == nullptr))
      invalid("mirostat-v2: rng_key and rng_counter are required");
    if (rows.n > 0 && b.seq_ids == nullptr) invalid("mirostat-v2: seq_ids is required");
    float* logprobs = logprobs_of(b);
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      const int64_t best = argmax_row(x, rows.vocab, r);
      const float mx = x[best];
      const LogSoftmax log_p = log_softmax_row(x, rows.vocab, mx);
      const double log_total = log_p.lse - mx;
      // surprise_i = -log2 p_i = (max + log_total - x_i) / ln 2; masked when > mu. (A +inf max:
      // log2 n for each of the n +inf entries, +inf for the rest.)
      const double m = mu_of(b.seq_ids[r]);
      for (int64_t i = 0; i < rows.vocab; ++i) {
        if (i == best || x[i] == -INFINITY) continue;
        const double surprise = log_p.inf_max ? -log_p(x[i]) / std::log(2.0)
                                              : (static_cast<double>(mx) + log_total - x[i]) / std::log(2.0);
        if (surprise > m) x[i] = -INFINITY;
      }
      double logp = 0.0;  // renormalised over the survivors
      const int64_t chosen = draw_row(x, rows.vocab, r, b.rng_key[r], b.rng_counter[r], &logp);
      b.tokens_out[r] = static_cast<int32_t>(chosen);
      if (logprobs) logprobs[r] = static_cast<float>(logp);
      pending[b.seq_ids[r]] = Pending{static_cast<int32_t>(chosen), -logp / std::log(2.0)};
    }
  }

  void accept(int64_t seq, int32_t token) {
    auto it = pending.find(seq);
    if (it == pending.end()) return;
    if (it->second.token == token) mu[seq] = mu_of(seq) - eta * (it->second.surprise - tau);
    pending.erase(it);
  }
  void fork(int64_t src, int64_t dst) {
    auto it = mu.find(src);
    if (it != mu.end()) mu[dst] = it->second;
    else mu.erase(dst);
  }
  void release(int64_t seq) {
    if (seq == -1) {
      mu.clear();
      pending.clear();
    } else {
      mu.erase(seq);
      pending.erase(seq);
    }
  }
};

loom_status accept_fn(void* inst, int64_t seq, int32_t token) {
  auto* m = static_cast<MirostatV2*>(inst);
  return guard(m->host, m->ctx, [&] { m->accept(seq, token); });
}
loom_status fork_fn(void* inst, int64_t src, int64_t dst) {
  auto* m = static_cast<MirostatV2*>(inst);
  return guard(m->host, m->ctx, [&] { m->fork(src, dst); });
}
void release_fn(void* inst, int64_t seq) {
  auto* m = static_cast<MirostatV2*>(inst);
  (void)guard(m->host, m->ctx, [&] { m->release(seq); });
}
loom_status export_fn(void* inst, const char** format, loom_buffer* out) {
  auto* m = static_cast<MirostatV2*>(inst);
  return guard(m->host, m->ctx, [&] {
    if (format == nullptr || out == nullptr) invalid("mirostat-v2: export_state: NULL argument");
    std::vector<unsigned char> bytes(sizeof(uint64_t) + m->mu.size() * (sizeof(int64_t) + sizeof(double)));
    unsigned char* p = bytes.data();
    const uint64_t n = m->mu.size();
    std::memcpy(p, &n, sizeof n);
    p += sizeof n;
    for (const auto& [seq, v] : m->mu) {
      std::memcpy(p, &seq, sizeof seq);
      p += sizeof seq;
      std::memcpy(p, &v, sizeof v);
      p += sizeof v;
    }
    const loom_status s = m->host->buffer_append(out, bytes.data(), bytes.size());
    if (s != LOOM_OK) fail(s, "mirostat-v2: export_state: buffer_append failed");
    *format = kStateFormat;
  });
}
loom_status import_fn(void* inst, const char* format, const void* data, size_t size) {
  auto* m = static_cast<MirostatV2*>(inst);
  return guard(m->host, m->ctx, [&] {
    if (format == nullptr || std::strcmp(format, kStateFormat) != 0)
      unsupported(std::string("mirostat-v2: cannot read state format '") + (format ? format : "") + "'");
    const auto* p = static_cast<const unsigned char*>(data);
    uint64_t n = 0;
    if (size < sizeof n || p == nullptr) invalid("mirostat-v2: import_state: truncated state");
    std::memcpy(&n, p, sizeof n);
    const size_t rec = sizeof(int64_t) + sizeof(double);
    if ((size - sizeof n) / rec != n || (size - sizeof n) % rec != 0)
      invalid("mirostat-v2: import_state: state size does not match its entry count");
    p += sizeof n;
    std::unordered_map<int64_t, double> mu;
    for (uint64_t i = 0; i < n; ++i) {
      int64_t seq = 0;
      double v = 0.0;
      std::memcpy(&seq, p, sizeof seq);
      std::memcpy(&v, p + sizeof seq, sizeof v);
      p += rec;
      if (!std::isfinite(v)) invalid("mirostat-v2: import_state: non-finite mu");
      mu[seq] = v;
    }
    m->mu = std::move(mu);
    m->pending.clear();
  });
}

constexpr loom_sampler_vtable make_mirostat_vtable() {
  loom_sampler_vtable v = make_vtable<MirostatV2>(LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_USES_RNG);
  v.life.export_state = &export_fn;
  v.life.import_state = &import_fn;
  v.accept = &accept_fn;
  v.fork = &fork_fn;
  v.release = &release_fn;
  return v;
}
constexpr loom_sampler_vtable kVtable = make_mirostat_vtable();
constexpr loom_param_desc kParams[] = {
    param("tau", LOOM_VALUE_FLOAT, "5.0", "target surprise in bits (>= 0); mu starts at 2 * tau"),
    param("eta", LOOM_VALUE_FLOAT, "0.1", "learning rate of mu (> 0)"),
};

}  // namespace

const loom_component_desc mirostat_v2_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "mirostat-v2", "1.0.0",
    "Mirostat 2.0: truncates by surprise > mu, samples with Philox, adapts mu toward tau per sequence",
    kParams, 2, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
