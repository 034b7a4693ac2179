#include "int4_math.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace loomp::int4q {
namespace {

// One group's scale, zero point and codes; clip > 0 first limits the range to [-clip, clip].
void quantize_group(const float* v, int64_t n, bool zero_point, float clip, float& scale, uint8_t& zero,
                    uint8_t* codes) {
  auto at = [&](int64_t i) { return clip > 0.0f ? std::clamp(v[i], -clip, clip) : v[i]; };
  if (zero_point) {
    // The range always holds 0 (as GPTQ's does): a group of one sign would otherwise need a
    // zero point outside [0, 15], and its codes would saturate.
    float lo = 0.0f, hi = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      lo = std::min(lo, at(i));
      hi = std::max(hi, at(i));
    }
    scale = hi > lo ? (hi - lo) / 15.0f : 1.0f;  // (an all-zero group: any scale)
    zero = static_cast<uint8_t>(std::clamp(std::nearbyint(-lo / scale), 0.0f, 15.0f));
    for (int64_t i = 0; i < n; ++i)
      codes[i] = static_cast<uint8_t>(std::clamp(std::nearbyint(v[i] / scale) + zero, 0.0f, 15.0f));
  } else {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(at(i)));
    scale = amax > 0.0f ? amax / 7.0f : 1.0f;
    zero = 8;
    for (int64_t i = 0; i < n; ++i)
      codes[i] = static_cast<uint8_t>(std::clamp(std::nearbyint(v[i] / scale), -8.0f, 7.0f) + 8.0f);
  }
}

// A group quantized (quantize_group) and read back: out[i] is the value the product uses for v[i].
void roundtrip_group(const float* v, int64_t n, bool zero_point, float clip, float* out, uint8_t* codes) {
  float s = 0;
  uint8_t z = 0;
  quantize_group(v, n, zero_point, clip, s, z, codes);
  for (int64_t i = 0; i < n; ++i) out[i] = (static_cast<float>(codes[i]) - static_cast<float>(z)) * s;
}

// Row o of W diag(a) quantized and read back, a divided out again: the row the product sees.
void roundtrip_row(const float* w, int64_t in, int64_t group, bool zero_point, const float* a, float* out,
                   std::vector<float>& scaled, std::vector<uint8_t>& codes) {
  scaled.resize(static_cast<size_t>(in));
  codes.resize(static_cast<size_t>(group));
  for (int64_t i = 0; i < in; ++i) scaled[static_cast<size_t>(i)] = a ? w[i] * a[i] : w[i];
  for (int64_t g0 = 0; g0 < in; g0 += group) {
    roundtrip_group(scaled.data() + g0, group, zero_point, 0.0f, out + g0, codes.data());
    if (a)
      for (int64_t i = g0; i < g0 + group; ++i) out[i] /= a[i];
  }
}

// The Gram matrix x'^T x' [m, m] of columns [c0, c0 + m) of x [n, in], where x' = x / a per
// column when a is not null.
std::vector<double> gram(const float* x, int64_t n, int64_t in, int64_t c0, int64_t m, const float* a) {
  std::vector<double> g(static_cast<size_t>(m * m), 0.0);
  std::vector<float> xs(static_cast<size_t>(m));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < m; ++i) xs[static_cast<size_t>(i)] = a ? x[r * in + c0 + i] / a[c0 + i] : x[r * in + c0 + i];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) g[static_cast<size_t>(i * m + j)] += static_cast<double>(xs[static_cast<size_t>(i)]) * xs[static_cast<size_t>(j)];
  }
  return g;
}

// total += d^T M d, for M [m, m].
void add_quadratic(const double* M, const float* d, int64_t m, double& total) {
  for (int64_t i = 0; i < m; ++i) {
    double md = 0.0;
    for (int64_t j = 0; j < m; ++j) md += M[i * m + j] * d[j];
    total += d[i] * md;
  }
}

}  // namespace

Int4Weight sized_weight(int64_t out, int64_t in, int64_t group, bool zero_point) {
  Int4Weight q;
  q.out = out;
  q.in = in;
  q.group = group;
  q.zero_point = zero_point;
  q.packed.assign(static_cast<size_t>(out * in / 2), 0);
  q.scales.resize(static_cast<size_t>(out * q.groups()));
  q.zeros.resize(static_cast<size_t>(out * q.groups()));
  return q;
}

Int4Weight quantize(const float* w, int64_t out, int64_t in, int64_t group, bool zero_point, const float* act_scale,
                    const float* clip) {
  Int4Weight q = sized_weight(out, in, group, zero_point);
  if (act_scale) q.act_scale.assign(act_scale, act_scale + in);
  std::vector<float> row(static_cast<size_t>(in));
  std::vector<uint8_t> codes(static_cast<size_t>(in));
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) row[static_cast<size_t>(i)] = act_scale ? w[o * in + i] * act_scale[i] : w[o * in + i];
    for (int64_t g = 0; g < q.groups(); ++g) {
      const size_t at = static_cast<size_t>(o * q.groups() + g);
      quantize_group(row.data() + g * group, group, zero_point, clip ? clip[at] : 0.0f, q.scales[at], q.zeros[at],
                     codes.data() + g * group);
    }
    uint8_t* dst = q.packed.data() + o * (in / 2);
    for (int64_t j = 0; j < in / 2; ++j)
      dst[j] = static_cast<uint8_t>(codes[static_cast<size_t>(2 * j)] | (codes[static_cast<size_t>(2 * j + 1)] << 4));
  }
  return q;
}

void dequantize_row(const Int4Weight& q, int64_t o, float* row) {
  for (int64_t i = 0; i < q.in; ++i) {
    const size_t at = static_cast<size_t>(o * q.groups() + i / q.group);
    const float v = (static_cast<float>(q.code(o, i)) - static_cast<float>(q.zeros[at])) * q.scales[at];
    row[i] = q.act_scale.empty() ? v : v / q.act_scale[static_cast<size_t>(i)];
  }
}

void linear(const Int4Weight& q, const float* x, int64_t n, const float* bias, float* y) {
  const int64_t in = q.in;
  // Inputs divided by the AWQ scales once; then each weight row is unpacked once into float32
  // and dotted with every input row (eight partial sums, which the compiler keeps in vector
  // lanes: float sums are not reassociated for it).
  std::vector<float> xs;
  if (!q.act_scale.empty()) {
    xs.resize(static_cast<size_t>(n * in));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < in; ++i) xs[static_cast<size_t>(r * in + i)] = x[r * in + i] / q.act_scale[static_cast<size_t>(i)];
    x = xs.data();
  }
  std::vector<float> row(static_cast<size_t>(in));
  for (int64_t o = 0; o < q.out; ++o) {
    const uint8_t* codes = q.packed.data() + o * (in / 2);
    const float* scales = q.scales.data() + o * q.groups();
    const uint8_t* zeros = q.zeros.data() + o * q.groups();
    for (int64_t g = 0; g < q.groups(); ++g) {
      const float s = scales[g], z = static_cast<float>(zeros[g]);
      for (int64_t j = g * q.group / 2; j < (g + 1) * q.group / 2; ++j) {
        row[static_cast<size_t>(2 * j)] = (static_cast<float>(codes[j] & 15) - z) * s;
        row[static_cast<size_t>(2 * j + 1)] = (static_cast<float>(codes[j] >> 4) - z) * s;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const float* xr = x + r * in;
      float acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += xr[i + k] * row[static_cast<size_t>(i + k)];
      for (; i < in; ++i) acc[0] += xr[i] * row[static_cast<size_t>(i)];
      const float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      y[r * q.out + o] = sum + (bias ? bias[o] : 0.0f);
    }
  }
}

AwqChoice awq_search(const float* w, int64_t out, int64_t in, int64_t group, bool zero_point, const float* x,
                     int64_t n, int grid, int64_t rows) {
  std::vector<double> mean_abs(static_cast<size_t>(in), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < in; ++i) mean_abs[static_cast<size_t>(i)] += std::fabs(x[r * in + i]);
  for (double& m : mean_abs) m = std::max(m / static_cast<double>(std::max<int64_t>(n, 1)), 1e-4);
  const int64_t searched = std::clamp<int64_t>(rows, 1, out);
  // |x d|^2 summed over the rows of x, for a row difference d: directly (n * in per row), or as
  // d^T (x^T x) d with the Gram matrix made once (in * in per row), whichever costs less over
  // the whole search.
  const double din = static_cast<double>(in), dn = static_cast<double>(n), work = static_cast<double>(searched) * grid;
  const bool use_gram = din * din * (work + dn) < dn * din * work;
  const std::vector<double> xtx = use_gram ? gram(x, n, in, 0, in, nullptr) : std::vector<double>{};
  std::vector<float> exact(static_cast<size_t>(in)), approx(static_cast<size_t>(in)), scaled;
  std::vector<uint8_t> codes;
  // The squared error of x (W - W~)^T over the searched rows, for scales a (null: none).
  auto error_of = [&](const float* a) {
    double total = 0.0;
    for (int64_t k = 0; k < searched; ++k) {
      const int64_t o = k * out / searched;
      roundtrip_row(w + o * in, in, group, zero_point, a, approx.data(), scaled, codes);
      for (int64_t i = 0; i < in; ++i) exact[static_cast<size_t>(i)] = w[o * in + i] - approx[static_cast<size_t>(i)];
      if (use_gram) {
        add_quadratic(xtx.data(), exact.data(), in, total);
        continue;
      }
      for (int64_t r = 0; r < n; ++r) {
        double d = 0.0;
        for (int64_t i = 0; i < in; ++i) d += static_cast<double>(x[r * in + i]) * exact[static_cast<size_t>(i)];
        total += d * d;
      }
    }
    return total;
  };
  AwqChoice best;
  best.rtn_error = error_of(nullptr);
  best.error = best.rtn_error;
  best.scale.assign(static_cast<size_t>(in), 1.0f);
  std::vector<float> a(static_cast<size_t>(in));
  for (int k = 1; k < grid; ++k) {
    const double alpha = static_cast<double>(k) / grid;
    double lo = std::numeric_limits<double>::max(), hi = 0.0;
    for (int64_t i = 0; i < in; ++i) {
      const double v = std::pow(mean_abs[static_cast<size_t>(i)], alpha);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    const double norm = std::sqrt(lo * hi);
    for (int64_t i = 0; i < in; ++i)
      a[static_cast<size_t>(i)] = static_cast<float>(std::pow(mean_abs[static_cast<size_t>(i)], alpha) / norm);
    const double e = error_of(a.data());
    if (e < best.error) {
      best.error = e;
      best.alpha = alpha;
      best.scale = a;
    }
  }
  return best;
}

std::vector<float> clip_search(const float* w, int64_t out, int64_t in, int64_t group, bool zero_point,
                               const float* act_scale, const float* x, int64_t n, int steps) {
  const int64_t G = in / group;
  // Per group, the Gram matrix of the inputs the product sees (x / a).
  std::vector<std::vector<double>> grams;
  for (int64_t g = 0; g < G; ++g) grams.push_back(gram(x, n, in, g * group, group, act_scale));
  std::vector<float> clip(static_cast<size_t>(out * G), 0.0f), v(static_cast<size_t>(group)),
      diff(static_cast<size_t>(group));
  std::vector<uint8_t> codes(static_cast<size_t>(group));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g = 0; g < G; ++g) {
      float amax = 0.0f;
      for (int64_t i = 0; i < group; ++i) {
        const int64_t c = g * group + i;
        v[static_cast<size_t>(i)] = act_scale ? w[o * in + c] * act_scale[c] : w[o * in + c];
        amax = std::max(amax, std::fabs(v[static_cast<size_t>(i)]));
      }
      double best = std::numeric_limits<double>::max();
      float best_clip = 0.0f;
      for (int k = 0; k < steps && amax > 0.0f; ++k) {
        const float c = amax * (1.0f - 0.5f * static_cast<float>(k) / static_cast<float>(steps));
        roundtrip_group(v.data(), group, zero_point, c, diff.data(), codes.data());
        for (int64_t i = 0; i < group; ++i) diff[static_cast<size_t>(i)] = v[static_cast<size_t>(i)] - diff[static_cast<size_t>(i)];
        double e = 0.0;
        add_quadratic(grams[static_cast<size_t>(g)].data(), diff.data(), group, e);
        if (e < best) {
          best = e;
          best_clip = k == 0 ? 0.0f : c; // the full range needs no clip
        }
      }
      clip[static_cast<size_t>(o * G + g)] = best_clip;
    }
  return clip;
}

}  // namespace loomp::int4q
