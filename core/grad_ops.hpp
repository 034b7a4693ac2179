// Private to core: the operations of the supported architectures' backward passes, and the
// matrix and attention forward passes they pair with, for training on the CPU (DecoderTrainer);
// the row operations' forward passes are transformer_ops.hpp's (ops::rms_norm, layer_norm, rope,
// silu, gelu_new), shared with ReferenceModel. Templated on the scalar type: float for training,
// double for the finite-difference checks of tests/core/train_grad_test.cpp. Plain loops, written for clarity;
// shapes in comments, all arrays contiguous row-major. Forward functions overwrite their outputs;
// backward functions ADD into the gradients they produce (callers zero them), because most
// gradients have more than one contributor (a residual stream, q/k/v sharing their input, a tied
// head sharing the embedding). The matrix and attention functions take an optional thread pool;
// each element is computed by one task in the sequential order of operations, so the results
// are the same bit for bit whatever the number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <type_traits>
#include <vector>

#include "thread_pool.hpp"
#include "transformer_ops.hpp"

namespace loom::grad {

using Pool = detail::ThreadPool;

// f(i) for i in [0, n), on the pool when there is one.
template <class F>
void parallel_for(Pool *pool, int64_t n, F &&f) {
  if (pool != nullptr) {
    pool->run(n, f);
    return;
  }
  for (int64_t i = 0; i < n; ++i) f(i);
}

// ops::linear, a task per row.
template <class T>
void linear(const T *x, int64_t n, const T *W, int64_t out, int64_t in, const T *b, T *y, Pool *pool = nullptr) {
  parallel_for(pool, n, [&](int64_t r) { ops::linear(x + r * in, 1, W, out, in, b, y + r * out); });
}

// dx[n, in] += dy W; dW[out, in] += dy^T x; db[out] += column sums of dy (each when not null).
template <class T>
void linear_backward(const T *dy, const T *x, int64_t n, const T *W, int64_t out, int64_t in, T *dx, T *dW, T *db,
                     Pool *pool = nullptr) {
  if (dx)  // a task per row of dx, summing over o in order
    parallel_for(pool, n, [&](int64_t r) {
      const T *g = dy + r * out;
      for (int64_t o = 0; o < out; ++o) {
        const T go = g[o];
        if (go == T(0)) continue;
        const T *w = W + o * in;
        for (int64_t i = 0; i < in; ++i) dx[r * in + i] += go * w[i];
      }
    });
  if (dW || db)  // a task per row of dW, summing over r in order
    parallel_for(pool, out, [&](int64_t o) {
      for (int64_t r = 0; r < n; ++r) {
        const T go = dy[r * out + o];
        if (go == T(0)) continue;
        if (dW) {
          const T *xr = x + r * in;
          for (int64_t i = 0; i < in; ++i) dW[o * in + i] += go * xr[i];
        }
        if (db) db[o] += go;
      }
    });
}

// With g = w * dy: dx += r g - x r^3 (g . x) / H; dw += dy * x * r.
template <class T>
void rms_norm_backward(const T *dy, const T *x, const T *w, T r, int64_t H, T *dx, T *dw) {
  T gx = 0;
  for (int64_t i = 0; i < H; ++i) gx += w[i] * dy[i] * x[i];
  const T c = r * r * r * gx / static_cast<T>(H);
  for (int64_t i = 0; i < H; ++i) {
    dx[i] += r * w[i] * dy[i] - x[i] * c;
    dw[i] += dy[i] * x[i] * r;
  }
}

// With xh = (x - mean) r and g = w * dy: dx += r (g - mean(g) - xh mean(g xh)); dw += dy xh;
// db += dy.
template <class T>
void layer_norm_backward(const T *dy, const T *x, const T *w, T mean, T r, int64_t H, T *dx, T *dw, T *db) {
  T g_mean = 0, gx_mean = 0;
  for (int64_t i = 0; i < H; ++i) {
    const T xh = (x[i] - mean) * r, g = w[i] * dy[i];
    g_mean += g;
    gx_mean += g * xh;
  }
  g_mean /= static_cast<T>(H);
  gx_mean /= static_cast<T>(H);
  for (int64_t i = 0; i < H; ++i) {
    const T xh = (x[i] - mean) * r;
    dx[i] += r * (w[i] * dy[i] - g_mean - xh * gx_mean);
    dw[i] += dy[i] * xh;
    db[i] += dy[i];
  }
}

// The derivative of GPT-2's GELU (ops::gelu_new), 0.5 x (1 + tanh(c (x + 0.044715 x^3))) with
// c = sqrt(2 / pi).
template <class T>
T gelu_new_grad(T x) {
  const T c = std::sqrt(T(2) / std::numbers::pi_v<T>);
  const T t = std::tanh(c * (x + T(0.044715) * x * x * x));
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3) * T(0.044715) * x * x);
}

// GPT-2's Conv1D: y[n, out] = x[n, in] W[in, out] + b[out].
template <class T>
void conv1d(const T *x, int64_t n, const T *W, int64_t in, int64_t out, const T *b, T *y, Pool *pool = nullptr) {  // b may be null
  parallel_for(pool, n, [&](int64_t r) {  // y's row accumulated over W's rows in order (contiguous)
    T *yr = y + r * out;
    for (int64_t o = 0; o < out; ++o) yr[o] = 0;
    for (int64_t i = 0; i < in; ++i) {
      const T xi = x[r * in + i], *w = W + i * out;
      for (int64_t o = 0; o < out; ++o) yr[o] += xi * w[o];
    }
    if (b)
      for (int64_t o = 0; o < out; ++o) yr[o] += b[o];
  });
}

// dx[n, in] += dy W^T; dW[in, out] += x^T dy; db += column sums of dy.
template <class T>
void conv1d_backward(const T *dy, const T *x, int64_t n, const T *W, int64_t in, int64_t out, T *dx, T *dW, T *db,
                     Pool *pool = nullptr) {
  parallel_for(pool, n, [&](int64_t r) {  // dx by rows
    const T *g = dy + r * out;
    for (int64_t i = 0; i < in; ++i) {
      const T *w = W + i * out;
      T acc = 0;
      for (int64_t o = 0; o < out; ++o) acc += g[o] * w[o];
      dx[r * in + i] += acc;
    }
  });
  parallel_for(pool, in, [&](int64_t i) {  // dW by rows of W, summing over r in order
    T *dw = dW + i * out;
    for (int64_t r = 0; r < n; ++r) {
      const T xi = x[r * in + i], *g = dy + r * out;
      for (int64_t o = 0; o < out; ++o) dw[o] += xi * g[o];
    }
  });
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) db[o] += dy[r * out + o];
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// m = silu(g) * u, elementwise over n values (as ReferenceModel computes it).
template <class T>
void swiglu(const T *g, const T *u, int64_t n, T *m) {
  for (int64_t i = 0; i < n; ++i) m[i] = ops::silu(g[i]) * u[i];
}

// dg += dm * u * silu'(g), du += dm * silu(g); silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
template <class T>
void swiglu_backward(const T *dm, const T *g, const T *u, int64_t n, T *dg, T *du) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid(g[i]);
    dg[i] += dm[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
    du[i] += dm[i] * ops::silu(g[i]);
  }
}

// Causal attention over one sequence of L tokens: q[L, Hq, D], k/v[L, Hkv, D] (query head h
// reads KV head h / (Hq / Hkv)); key j is visible to query i when j <= i and, with a sliding
// window W > 0, i - j < W. Writes out[L, Hq, D] and the probabilities p[Hq, L, L] (zero where
// masked) that the backward reuses.
template <class T>
void attention(const T *q, const T *k, const T *v, int64_t L, int64_t Hq, int64_t Hkv, int64_t D, int64_t window,
               T *out, T *p, Pool *pool = nullptr, int64_t prefix = 0) {
  // With `prefix` = P > 0 (prefix tuning), k and v hold P + L rows: P virtual tokens every query
  // sees, then the sequence's own; p is then [Hq, L, P + L].
  const T scale = T(1) / std::sqrt(static_cast<T>(D));
  const int64_t K = prefix + L;
  std::fill(out, out + L * Hq * D, T(0));
  std::fill(p, p + Hq * L * K, T(0));
  parallel_for(pool, Hq, [&](int64_t h) {
    const int64_t kh = h / (Hq / Hkv);
    for (int64_t i = 0; i < L; ++i) {
      T *pi = p + (h * L + i) * K;
      const int64_t first = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      auto visible = [&](auto &&fn) {
        for (int64_t j = 0; j < prefix; ++j) fn(j);
        for (int64_t j = prefix + first; j <= prefix + i; ++j) fn(j);
      };
      T max = -std::numeric_limits<T>::infinity();
      visible([&](int64_t j) {
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += q[(i * Hq + h) * D + d] * k[(j * Hkv + kh) * D + d];
        pi[j] = s * scale;
        max = std::max(max, pi[j]);
      });
      T sum = 0;
      visible([&](int64_t j) { sum += (pi[j] = std::exp(pi[j] - max)); });
      visible([&](int64_t j) {
        pi[j] /= sum;
        for (int64_t d = 0; d < D; ++d) out[(i * Hq + h) * D + d] += pi[j] * v[(j * Hkv + kh) * D + d];
      });
    }
  });
}

// The backward of attention(): with dP = dO V^T and dS = P * (dP - rowsum(P * dP)),
// dq += scale dS K, dk += scale dS^T Q, dv += P^T dO (per query head, into its KV head). With a
// prefix, dk and dv have its P rows first, as k and v.
template <class T>
void attention_backward(const T *d_out, const T *q, const T *k, const T *v, const T *p, int64_t L, int64_t Hq, int64_t Hkv,
                        int64_t D, T *dq, T *dk, T *dv, Pool *pool = nullptr, int64_t prefix = 0) {
  const T scale = T(1) / std::sqrt(static_cast<T>(D));
  const int64_t group = Hq / Hkv, K = prefix + L;
  // A task per KV head (its query heads in order), since dk and dv sum over them.
  parallel_for(pool, Hkv, [&](int64_t kh) {
    std::vector<T> dp(static_cast<size_t>(K));
    for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
      for (int64_t i = 0; i < L; ++i) {
        const T *pi = p + (h * L + i) * K;
        const T *go = d_out + (i * Hq + h) * D;
        T dot = 0;
        for (int64_t j = 0; j <= prefix + i; ++j) {
          if (pi[j] == T(0)) {
            dp[static_cast<size_t>(j)] = 0;
            continue;
          }
          T s = 0;
          for (int64_t d = 0; d < D; ++d) s += go[d] * v[(j * Hkv + kh) * D + d];
          dp[static_cast<size_t>(j)] = s;
          dot += pi[j] * s;
          for (int64_t d = 0; d < D; ++d) dv[(j * Hkv + kh) * D + d] += pi[j] * go[d];
        }
        for (int64_t j = 0; j <= prefix + i; ++j) {
          if (pi[j] == T(0)) continue;
          const T ds = pi[j] * (dp[static_cast<size_t>(j)] - dot) * scale;
          for (int64_t d = 0; d < D; ++d) {
            dq[(i * Hq + h) * D + d] += ds * k[(j * Hkv + kh) * D + d];
            dk[(j * Hkv + kh) * D + d] += ds * q[(i * Hq + h) * D + d];
          }
        }
      }
    }
  });
}

// Mean cross-entropy of logits[n, V] against targets[n] (a target < 0 is not scored) in double;
// dlogits[n, V] is set to the gradient of that mean times `grad_scale` (zero on unscored rows).
// Returns the summed (not averaged) loss and the count of scored rows in *count.
template <class T>
double cross_entropy(const T *logits, const int32_t *targets, int64_t n, int64_t V, T *dlogits, double grad_scale,
                     int64_t *count) {
  int64_t scored = 0;
  for (int64_t r = 0; r < n; ++r) scored += targets[r] >= 0;
  *count = scored;
  double total = 0;
  for (int64_t r = 0; r < n; ++r) {
    const T *row = logits + r * V;
    T *drow = dlogits ? dlogits + r * V : nullptr;
    if (targets[r] < 0) {
      if (drow) std::fill(drow, drow + V, T(0));
      continue;
    }
    const T max = *std::max_element(row, row + V);
    double sum = 0;
    for (int64_t c = 0; c < V; ++c) sum += std::exp(static_cast<double>(row[c] - max));
    const double lse = std::log(sum) + static_cast<double>(max);
    total += lse - static_cast<double>(row[targets[r]]);
    if (drow) {
      const double w = grad_scale / static_cast<double>(scored);
      for (int64_t c = 0; c < V; ++c) drow[c] = static_cast<T>(std::exp(static_cast<double>(row[c]) - lse) * w);
      drow[targets[r]] -= static_cast<T>(w);
    }
  }
  return total;
}

}  // namespace loom::grad
