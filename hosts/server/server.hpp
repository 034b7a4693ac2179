// loom::server::Server: the OpenAI-compatible HTTP front end of `loom serve`.
//
// Routes: POST /v1/completions, /v1/chat/completions (both with SSE streaming), /v1/embeddings;
// GET /v1/models, /v1/models/{id}; GET /health (always 200 while the process serves), /ready
// (503 until the model has run a warm-up request, and while draining), /metrics (Prometheus
// text); POST /admin/swap (the admin key; swaps a component at a step boundary).
//
// One engine thread runs Runtime::serve over a RequestQueue; HTTP connection threads parse and
// check a request, submit one ServeRequest per choice (prompts x n) and then stream what the
// engine produces. Admission is bounded: at most [scheduler] max_seqs + [server] max_queue
// choices are in flight, more get 429 with Retry-After at once. A client that goes away (the
// socket closes) cancels its choices at the next step, which frees their KV blocks. drain()
// (SIGTERM in `loom serve`) refuses new work, lets in-flight requests finish (their streams
// complete) for up to drain_timeout_s, then stops.
//
// Ownership: borrows the runtimes, which must outlive the server. Thread-safety: start(),
// drain() and stop() from one controlling thread; everything else is internal.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "loom/core/manifest.hpp"
#include "loom/core/runtime.hpp"

namespace loom::server {

class Server {
 public:
  // `runtime` serves generation (batched by its [scheduler], or the scheduler's defaults);
  // `embedder` (may be null: /v1/embeddings then answers 404) computes embeddings, a second
  // runtime of the same manifest because Runtime::embed does not run while Runtime::serve does.
  Server(Runtime &runtime, Runtime *embedder, const ServerSpec &spec);
  ~Server();
  Server(const Server &) = delete;
  Server &operator=(const Server &) = delete;

  // Binds (host, port), starts the engine, the warm-up request and the listener. Returns the
  // bound port. Throws loom::Error when the address cannot be bound.
  int start();
  // Blocks until /ready would answer 200 (the warm-up request ran), or `timeout_s` passed.
  bool wait_ready(double timeout_s);
  // Stops taking work (503), waits for in-flight requests up to drain_timeout_s (then cancels
  // the rest, which end their streams properly), stops the engine and the listener.
  void drain();
  // drain() with no waiting.
  void stop();

  // For tests and /metrics: choices admitted and not yet ended; connection threads alive.
  int64_t in_flight() const;
  size_t connection_threads() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

} // namespace loom::server
