#!/usr/bin/env bash
# `loom serve configs/server.toml` as a user runs it, with curl as the client: every route, a
# streamed completion read with curl -N, and SIGTERM while a stream is open: the stream must end
# with [DONE] and the process exit 0.
# usage: serve_curl_test.sh LOOM_CLI SOURCE_DIR
set -euo pipefail
loom=$1
src=$2
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
fail() { echo "serve_curl_test: FAIL: $*"; echo "--- server output:"; cat "$work/out"; exit 1; }

"$loom" serve "$src/configs/server.toml" --set server.port=0 --set loom.device='"cpu"' --set loom.threads=1 >"$work/out" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  grep -q "loom serve: ready" "$work/out" && break
  kill -0 $pid 2>/dev/null || fail "the server exited early"
  sleep 0.1
done
grep -q "loom serve: ready" "$work/out" || fail "not ready after 60 s"
port=$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$work/out")
base="http://127.0.0.1:$port"
json='-H Content-Type:application/json'

[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/health")" = 200 ] || fail "/health"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/ready")" = 200 ] || fail "/ready"
# (Bodies are read whole before grep -q: under pipefail, a grep that stops at its first match
# makes curl's later writes fail with SIGPIPE, and the pipeline with them.)
out=$(curl -sf "$base/v1/models") || fail "/v1/models"
echo "$out" | grep -q '"id":"tiny-kjv"' || fail "/v1/models: $out"

out=$(curl -sf $json "$base/v1/completions" -d '{"model":"tiny-kjv","prompt":"And God said","max_tokens":16,"temperature":0}')
echo "$out" | grep -q '"object":"text_completion"' || fail "completion: $out"
echo "$out" | grep -q '"completion_tokens":' || fail "completion usage: $out"

out=$(curl -sf $json "$base/v1/chat/completions" -d '{"model":"tiny-kjv","messages":[{"role":"user","content":"Who made the earth?"}],"max_tokens":12,"seed":1}')
echo "$out" | grep -q '"role":"assistant"' || fail "chat: $out"

out=$(curl -sfN $json "$base/v1/chat/completions" -d '{"model":"tiny-kjv","messages":[{"role":"user","content":"Hi"}],"max_tokens":12,"stream":true}')
echo "$out" | grep -q '^data: {"choices":\[{"delta":{"content":"","role":"assistant"}' || fail "stream opening: $out"
[ "$(echo "$out" | grep -c '^data: ')" -ge 3 ] || fail "stream events: $out"
echo "$out" | tail -n 2 | grep -q '^data: \[DONE\]' || fail "stream end: $out"

out=$(curl -sf $json "$base/v1/embeddings" -d '{"model":"tiny-kjv","input":["In the beginning"]}')
echo "$out" | grep -q '"object":"embedding"' || fail "embeddings: $out"

code=$(curl -s -o "$work/err" -w '%{http_code}' $json "$base/v1/completions" -d '{"model":"tiny-kjv","prompt":"x","temperature":9}')
[ "$code" = 400 ] || fail "bad temperature gave $code"
grep -q '"param":"temperature"' "$work/err" || fail "error body: $(cat "$work/err")"

metrics=$(curl -sf "$base/metrics") || fail "/metrics"
grep -q '^loom_time_to_first_token_seconds_count [1-9]' <<<"$metrics" || fail "/metrics: no first-token count"

# SIGTERM with a stream open: the stream completes, the process exits 0.
curl -sN $json "$base/v1/completions" -d '{"model":"tiny-kjv","prompt":[1,400],"max_tokens":300,"stream":true,"logit_bias":{"1":-100,"2":-100}}' >"$work/stream" &
curl_pid=$!
for _ in $(seq 1 100); do [ -s "$work/stream" ] && break; sleep 0.05; done
kill -TERM $pid
wait $curl_pid || fail "curl failed during the drain"
set +e
wait $pid
status=$?
set -e
[ $status = 0 ] || fail "exit status $status after SIGTERM"
tail -n 1 "$work/stream" | grep -q '^data: \[DONE\]' || tail -n 2 "$work/stream" | grep -q '^data: \[DONE\]' || fail "stream cut by the drain: $(tail -c 300 "$work/stream")"
grep -q "loom serve: stopped" "$work/out" || fail "no 'stopped' line"
echo "serve_curl_test: all passed"
