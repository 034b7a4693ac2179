#!/usr/bin/env bash
# `loom serve configs/server.toml` (with an API key) under the official openai npm client
# (tests/hosts/openai_client, installed by scripts/bootstrap at the version its lock file pins).
# usage: serve_openai_test.sh LOOM_CLI SOURCE_DIR
set -euo pipefail
loom=$1
src=$2
client="$src/tests/hosts/openai_client"
[ -d "$client/node_modules/openai" ] || { echo "serve_openai_test: FAIL: $client/node_modules is missing: run ./scripts/bootstrap"; exit 1; }
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
"$loom" serve "$src/configs/server.toml" --set server.port=0 --set loom.device='"cpu"' \
  --set 'server.api_keys=["sk-loom-test-key"]' >"$work/out" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  grep -q "loom serve: ready" "$work/out" && break
  kill -0 $pid 2>/dev/null || { cat "$work/out"; echo "serve_openai_test: FAIL: the server exited"; exit 1; }
  sleep 0.1
done
port=$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$work/out")
node "$client/client_test.mjs" "http://127.0.0.1:$port/v1" sk-loom-test-key || { cat "$work/out"; exit 1; }
kill -TERM $pid
wait $pid
