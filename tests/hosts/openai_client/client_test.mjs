// Loom's server under the official openai npm client: models, completions, chat (plain and
// streamed), JSON mode with a schema, embeddings, errors, and a small load test on loopback
// (requests/s and p99 time to first token, printed).
// usage: node client_test.mjs BASE_URL API_KEY
import OpenAI from 'openai';

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });
let failures = 0;
const check = (ok, what) => {
  if (!ok) { failures++; console.log(`FAIL: ${what}`); } else { console.log(`ok: ${what}`); }
};

const models = await client.models.list();
check(models.data.length === 1 && models.data[0].id === 'tiny-kjv', 'models.list');

const completion = await client.completions.create({ model: 'tiny-kjv', prompt: 'And God said', max_tokens: 16, temperature: 0 });
check(typeof completion.choices[0].text === 'string' && completion.usage.completion_tokens > 0, 'completions.create');

const messages = [{ role: 'user', content: 'Who made the heaven and the earth?' }];
const chat = await client.chat.completions.create({ model: 'tiny-kjv', messages, max_tokens: 16, seed: 11, temperature: 0.7 });
check(chat.choices[0].message.role === 'assistant' && chat.choices[0].message.content.length > 0, 'chat.completions.create');

const stream = await client.chat.completions.create({ model: 'tiny-kjv', messages, max_tokens: 16, seed: 11, temperature: 0.7,
                                                      stream: true, stream_options: { include_usage: true } });
let streamed = '', finish = null, usage = null, chunks = 0;
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    if (c.delta?.content) streamed += c.delta.content;
    if (c.finish_reason) finish = c.finish_reason;
  }
}
check(streamed === chat.choices[0].message.content, `streamed chat equals the same seed's plain chat (${JSON.stringify(streamed)})`);
check(chunks >= 3 && finish === chat.choices[0].finish_reason, 'stream chunks and finish_reason');
check(usage && usage.completion_tokens === chat.usage.completion_tokens, 'stream usage');

// Log-probabilities: plain, and streamed through the client's own stream helper, which merges
// the chunks' logprobs.content.
const lpBody = { model: 'tiny-kjv', messages, max_tokens: 10, temperature: 0, logprobs: true, top_logprobs: 2 };
const lp = await client.chat.completions.create(lpBody);
const lpContent = lp.choices[0].logprobs?.content ?? [];
check(lpContent.length > 0 && lpContent.every((t) => typeof t.token === 'string' && t.logprob <= 0 && Array.isArray(t.bytes) &&
                                                    t.top_logprobs.length === 2 && t.top_logprobs[0].logprob === t.logprob),
      `chat logprobs (${lpContent.length} tokens, 2 alternatives each, greedy: the token is the first)`);
const merged = await client.chat.completions.stream(lpBody).finalChatCompletion();
check(JSON.stringify(merged.choices[0].logprobs?.content) === JSON.stringify(lpContent) &&
      merged.choices[0].message.content === lp.choices[0].message.content,
      'streamed logprobs, merged by the client, equal the plain reply\'s');
const clp = await client.completions.create({ model: 'tiny-kjv', prompt: 'And God said', max_tokens: 8, temperature: 0, logprobs: 3 });
const l = clp.choices[0].logprobs;
check(l && l.tokens.join('') === clp.choices[0].text && l.token_logprobs.length === l.tokens.length &&
      l.text_offset[0] === 0 && Object.keys(l.top_logprobs[0]).length >= 3, 'completions logprobs (tokens make up the text)');

const schema = { type: 'object', properties: { book: { type: 'string', maxLength: 16 }, chapter: { type: 'integer' } },
                 required: ['book', 'chapter'], additionalProperties: false };
let parsed = 0;
for (let seed = 0; seed < 4; seed++) {
  const json = await client.chat.completions.create({
    model: 'tiny-kjv', messages: [{ role: 'user', content: 'Name a book and a chapter.' }], max_tokens: 60, seed,
    response_format: { type: 'json_schema', json_schema: { name: 'ref', schema, strict: true } } });
  if (json.choices[0].finish_reason !== 'stop') continue;
  const value = JSON.parse(json.choices[0].message.content);
  if (typeof value.book === 'string' && value.book.length <= 16 && Number.isInteger(value.chapter)) parsed++;
}
check(parsed >= 1, `JSON mode: ${parsed} of 4 outputs parse and match the schema (the others ran out of tokens)`);

const tools = [{ type: 'function', function: { name: 'lookup_verse', description: 'finds a verse',
                 parameters: { type: 'object', properties: { book: { type: 'string', maxLength: 12 } }, required: ['book'] } } }];
let called = 0;
for (let seed = 0; seed < 4; seed++) {
  const t = await client.chat.completions.create({ model: 'tiny-kjv', messages: [{ role: 'user', content: 'Find Genesis 1.' }],
                                                  tools, tool_choice: 'required', max_tokens: 60, seed });
  const msg = t.choices[0].message;
  if (t.choices[0].finish_reason === 'tool_calls' && msg.tool_calls?.[0]?.function?.name === 'lookup_verse' &&
      typeof JSON.parse(msg.tool_calls[0].function.arguments).book === 'string') called++;
}
check(called >= 1, `tools: ${called} of 4 replies are lookup_verse calls with schema-valid arguments`);

// The same calls streamed: the client's stream helper joins each call's id (the response's own)
// and name and its arguments' pieces into the call the whole response holds (same seed, same
// tokens).
let joined = 0, pieces = 0;
for (let seed = 0; seed < 4; seed++) {
  const body = { model: 'tiny-kjv', messages: [{ role: 'user', content: 'Find Genesis 1.' }], tools, tool_choice: 'required',
                 max_tokens: 60, seed };
  const whole = await client.chat.completions.create(body);
  const runner = client.chat.completions.stream(body);
  runner.on('chunk', (chunk) => { if (chunk.choices[0]?.delta?.tool_calls) pieces++; });
  const merged = await runner.finalChatCompletion();
  const a = whole.choices[0].message.tool_calls?.[0], b = merged.choices[0].message.tool_calls?.[0];
  if (whole.choices[0].finish_reason !== 'tool_calls') continue;
  if (a && b && b.id === `${merged.id}-call-0-0` && a.function.name === b.function.name &&
      a.function.arguments === b.function.arguments) joined++;
}
check(joined >= 1 && pieces > 2 * joined, `tools streamed: ${joined} calls joined by the client equal the whole responses' (${pieces} pieces)`);

const emb = await client.embeddings.create({ model: 'tiny-kjv', input: ['In the beginning', 'God created'] });
check(emb.data.length === 2 && emb.data[0].embedding.length > 0, 'embeddings.create (float)');
const emb64 = await client.embeddings.create({ model: 'tiny-kjv', input: 'In the beginning' }); // the client asks for base64
check(emb64.data[0].embedding.length === emb.data[0].embedding.length &&
      Math.abs(emb64.data[0].embedding[0] - emb.data[0].embedding[0]) < 1e-6, 'embeddings.create (base64 decoded by the client)');

try {
  await client.chat.completions.create({ model: 'tiny-kjv', messages, temperature: 5 });
  check(false, 'a bad temperature is refused');
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.param === 'temperature', 'a bad temperature is refused (BadRequestError, param)');
}
try {
  await client.chat.completions.create({ model: 'gpt-4o', messages });
  check(false, 'an unknown model is refused');
} catch (e) {
  check(e instanceof OpenAI.NotFoundError, 'an unknown model is refused (NotFoundError)');
}
const wrongKey = new OpenAI({ baseURL, apiKey: 'sk-wrong-key', maxRetries: 0 });
try {
  await wrongKey.models.list();
  check(false, 'a wrong key is refused');
} catch (e) {
  check(e instanceof OpenAI.AuthenticationError, 'a wrong key is refused (AuthenticationError)');
}

// Load: 32 concurrent streaming clients, 4 requests each.
const ttfts = [];
const t0 = performance.now();
await Promise.all(Array.from({ length: 32 }, async (_, i) => {
  for (let k = 0; k < 4; k++) {
    const start = performance.now();
    const s = await client.chat.completions.create({ model: 'tiny-kjv', messages: [{ role: 'user', content: `Verse ${i} ${k}` }],
                                                    max_tokens: 24, stream: true });
    let first = true;
    for await (const chunk of s) {
      // The first token: the first chunk with text, or the end (a reply that is a stop token).
      if (first && (chunk.choices[0]?.delta?.content || chunk.choices[0]?.finish_reason)) {
        ttfts.push(performance.now() - start);
        first = false;
      }
    }
  }
}));
const seconds = (performance.now() - t0) / 1000;
ttfts.sort((a, b) => a - b);
const p = (q) => ttfts[Math.min(ttfts.length - 1, Math.floor(q * ttfts.length))];
console.log(`load: 128 streamed chats from 32 clients in ${seconds.toFixed(2)} s: ${(128 / seconds).toFixed(1)} requests/s, ` +
            `time to first token p50 ${p(0.5).toFixed(1)} ms, p99 ${p(0.99).toFixed(1)} ms`);
check(ttfts.length === 128, 'load: every request streamed to its end');

console.log(failures === 0 ? 'openai client: all passed' : `openai client: ${failures} failed`);
process.exit(failures === 0 ? 0 : 1);
