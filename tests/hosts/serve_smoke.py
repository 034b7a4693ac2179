# A smoke test of a running `loom serve` (stdlib only, for the GPU machine, which has no node):
#   loom serve configs/server.toml --set loom.device='"cuda"' --set server.port=18181 &
#   python3 tests/hosts/serve_smoke.py http://127.0.0.1:18181
import json, sys, time, urllib.request, threading
base = sys.argv[1]
def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
ok = True
def check(c, what):
    global ok
    print(("ok: " if c else "FAIL: ") + what); ok = ok and c
s, b = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 24, "temperature": 0})
check(s == 200 and json.loads(b)["usage"]["completion_tokens"] > 0, "greedy completion on CUDA: " + b[:200])
s, b2 = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 24, "temperature": 0})
check(json.loads(b)["choices"][0]["text"] == json.loads(b2)["choices"][0]["text"], "repeatable")
s, b = post("/v1/chat/completions", {"model": "tiny-kjv", "messages": [{"role": "user", "content": "Name a book."}], "max_tokens": 60, "seed": 1,
     "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "object", "properties": {"book": {"type": "string", "maxLength": 10}}, "required": ["book"]}}}})
j = json.loads(b); print(j["choices"][0])
if j["choices"][0]["finish_reason"] == "stop":
    check(isinstance(json.loads(j["choices"][0]["message"]["content"])["book"], str), "json_schema on CUDA logits")
s, b = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And", "max_tokens": 8, "n": 3, "temperature": 1.2, "top_p": 0.9, "seed": 5, "stream": True})
check(s == 200 and b.rstrip().endswith("data: [DONE]"), "n=3 streamed with top_p")
# Log-probabilities (rows copied from the GPU before the chain) and min_tokens (-inf written into
# the GPU's logits): greedy picks the most likely token; the end token waits for min_tokens.
s, b = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 12, "temperature": 0, "logprobs": 2})
lp = json.loads(b)["choices"][0]["logprobs"] if s == 200 else None
check(lp is not None and "".join(lp["tokens"]) == json.loads(b)["choices"][0]["text"] and
      all(abs(max(t.values()) - v) < 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"])), "logprobs on CUDA: " + b[:200])
s, b = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 40, "temperature": 0, "min_tokens": 30})
check(s == 200 and json.loads(b)["usage"]["completion_tokens"] >= 30, "min_tokens on CUDA: " + b[:200])
s, b = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And", "max_tokens": 16, "seed": 3, "guided_regex": "[0-9]{2,4}"})
check(s == 200 and json.loads(b)["choices"][0]["text"].isdigit(), "guided_regex on CUDA: " + b[:200])
# Prompt log-probabilities on CUDA (one-token rows through the decode kernel, sampled rows moved
# up on the device), against transformers' (the golden file, float32 on the CPU: within bf16's
# error), whole and streamed in the echo chunk (the same lists merged); min_tokens with a stop
# string (only one ending after the first min_tokens tokens counts); tools streamed, a required
# call's arguments in pieces.
import math, os
golden = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models", "tiny-kjv-golden.json")))["cases"][0]
def log_softmax_at(row, token):
    xs = golden["logits"][row]; m = max(xs)
    return xs[token] - m - math.log(sum(math.exp(x - m) for x in xs))
req = {"model": "tiny-kjv", "prompt": golden["prompt"], "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
s, b = post("/v1/completions", req)
lp = json.loads(b)["choices"][0]["logprobs"] if s == 200 else None
ids = golden["input_ids"]
check(lp is not None and lp["token_logprobs"][0] is None and
      all(abs(lp["token_logprobs"][i] - log_softmax_at(i - 1, ids[i])) < 0.05 for i in range(1, len(ids))),
      "prompt logprobs on CUDA within 0.05 of transformers': " + str(lp and lp["token_logprobs"][:len(ids)]))
s, b = post("/v1/completions", dict(req, stream=True))
merged = []
for line in b.splitlines():
    if line.startswith("data: {"):
        for ch in json.loads(line[6:])["choices"]:
            if ch["logprobs"]: merged += ch["logprobs"]["token_logprobs"]
check(s == 200 and lp is not None and merged == lp["token_logprobs"], "streamed echo logprobs on CUDA = whole: %s" % merged[:6])
s, whole = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 40, "temperature": 0, "ignore_eos": True})
s, head = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 10, "temperature": 0, "ignore_eos": True})
whole, head = json.loads(whole)["choices"][0]["text"], json.loads(head)["choices"][0]["text"]
stop = next((c for c in "etaoh " if c in head and c in whole[len(head):]), None)
if stop:
    s, b = post("/v1/completions", {"model": "tiny-kjv", "prompt": "And God said", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                                    "stop": stop, "min_tokens": 10})
    check(s == 200 and json.loads(b)["choices"][0]["text"] == whole[:whole.find(stop, len(head))], "min_tokens holds stop strings on CUDA")
tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
s, b = post("/v1/chat/completions", {"model": "tiny-kjv", "messages": [{"role": "user", "content": "Add."}], "tools": tools, "max_tokens": 24,
                                     "min_tokens": 20, "temperature": 0, "stream": True})
pieces = [ch["delta"].get("content") for line in b.splitlines() if line.startswith("data: {")
          for ch in json.loads(line[6:])["choices"] if ch["delta"].get("content")]
check(s == 200 and len(pieces) > 1, "a reply with tools streamed in %d pieces" % len(pieces))
# tool_choice required, streamed: the call's id and name first, then its arguments in pieces that
# join to the same call as the whole response's (greedy: the same tokens).
req = {"model": "tiny-kjv", "messages": [{"role": "user", "content": "Add."}], "tools": tools, "tool_choice": "required",
       "max_tokens": 40, "temperature": 0}
s, b = post("/v1/chat/completions", req)
whole_call = (json.loads(b)["choices"][0]["message"].get("tool_calls") or [None])[0] if s == 200 else None
s, b = post("/v1/chat/completions", dict(req, stream=True))
name, args, parts = None, "", 0
for line in b.splitlines():
    if line.startswith("data: {"):
        for ch in json.loads(line[6:])["choices"]:
            for d in ch["delta"].get("tool_calls") or []:
                name = d["function"].get("name", name)
                args += d["function"]["arguments"]
                parts += 1
check(s == 200 and whole_call is not None and name == whole_call["function"]["name"]
      and args == whole_call["function"]["arguments"] and parts > 2,
      "a required call streamed in %d pieces joins to the whole response's: %s %s" % (parts, name, args))
# 32 concurrent mixed requests (own chains and the pipeline's in one batch)
res = []
def worker(i):
    body = {"model": "tiny-kjv", "prompt": "Verse %d" % i, "max_tokens": 16}
    if i % 2: body["temperature"] = 0.7
    res.append(post("/v1/completions", body)[0])
t0 = time.time(); ts = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
check(res.count(200) == 32, "32 concurrent mixed-chain requests in %.2f s" % (time.time() - t0))
with urllib.request.urlopen(base + "/metrics") as r: m = r.read().decode()
print([l for l in m.splitlines() if l.startswith("loom_kv_blocks_total") or l.startswith("loom_time_to_first_token_seconds_count")])
print("gpu smoke: " + ("all passed" if ok else "FAILED"))
