// `loom serve MANIFEST`: the manifest's pipeline behind an OpenAI-compatible HTTP server
// (hosts/server). SIGTERM or SIGINT drains: new requests get 503, in-flight ones finish (their
// streams complete) for up to [server] drain_timeout_s, then the process exits 0.
#include <csignal>
#include <iostream>
#include <pthread.h>

#include "commands.hpp"
#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"
#include "server.hpp"

namespace loom::cli {

namespace {

const char *kServeUsage = R"(usage: loom serve MANIFEST [--set KEY.PATH=VALUE]...

Serves the manifest's model over HTTP (its [server] table: host, port, api_keys, admin_key,
max_queue, ...; requests are batched by its [scheduler] table, which is required):
  POST /v1/completions, /v1/chat/completions   (stream: true for server-sent events)
  POST /v1/embeddings                          (with an [embedding] table)
  GET  /v1/models, /health, /ready, /metrics   (Prometheus text)
  POST /admin/swap                             (admin key: {"slot": ..., "component": TOML})
SIGTERM or SIGINT drains in-flight requests, then exits 0.
)";

} // namespace

int cmd_serve(const std::vector<std::string> &args) {
  return guarded(kServeUsage, [&] {
    ManifestArgs a = parse_manifest_args(args, false);
    if (a.help) {
      std::cout << kServeUsage;
      return 0;
    }
    // Blocked before any thread starts (every thread inherits the mask); this thread waits for them.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    auto runtime = Runtime::from_file(a.manifest, a.overrides);
    ServerSpec spec = runtime->manifest().server;
    // Embeddings run on a runtime of their own (Runtime::embed does not run while serve() does).
    std::unique_ptr<Runtime> embedder;
    if (runtime->manifest().embedding.enabled) embedder = Runtime::from_file(a.manifest, a.overrides);
    server::Server server(*runtime, embedder.get(), spec);
    const int port = server.start();
    std::cout << "loom serve: " << runtime->backend_description() << "; listening on http://" << spec.host << ":" << port
              << std::endl;
    if (!server.wait_ready(600)) throw Error(ErrorCategory::runtime, "the warm-up request did not finish in 600 s");
    std::cout << "loom serve: ready" << std::endl;
    int received = 0;
    sigwait(&signals, &received);
    std::cout << "loom serve: " << (received == SIGTERM ? "SIGTERM" : "SIGINT") << ": draining" << std::endl;
    server.drain();
    std::cout << "loom serve: stopped" << std::endl;
    return 0;
  });
}

} // namespace loom::cli
