#include "model_decoder.hpp"

#include "adapter_sites.hpp"
#include "calibration.hpp"
#include "cpu_backend.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>

#include "loom/core/chat_template.hpp"
#include "loom/core/passage_fusion.hpp"
#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/host_buffer.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/safetensors.hpp"

namespace loom {

namespace {

// A Llama-shaped config from the [run] geometry, for runs without a [model].
ModelConfig synthetic_config(const RunSpec &run) {
  ModelConfig c;
  c.architecture = Architecture::llama;
  c.architecture_name = "LlamaForCausalLM";
  c.vocab_size = run.vocab_size;
  c.hidden_size = run.hidden_size;
  c.intermediate_size = 2 * run.hidden_size;
  c.n_layers = run.n_layers;
  c.n_heads = run.n_heads;
  c.n_kv_heads = run.n_kv_heads;
  c.head_dim = run.hidden_size / run.n_heads;
  c.max_positions = int64_t{1} << 20;
  return c;
}

// Seeded random weights of every tensor the config needs: norms 1, the rest uniform in
// +-1/sqrt(fan-in).
ModelWeights synthetic_weights(const ModelConfig &config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::map<std::string, HostWeight, std::less<>> w;
  for (const auto &[name, shape] : expected_weights(config)) {
    HostWeight hw{shape, std::vector<float>(static_cast<size_t>(shape.size() == 2 ? shape[0] * shape[1] : shape[0]))};
    if (name.find("norm") != std::string::npos) {
      std::fill(hw.values.begin(), hw.values.end(), 1.0f);
    } else {
      float bound = shape.size() == 2 && name.find("embed") == std::string::npos ? 1.0f / std::sqrt(static_cast<float>(shape[1])) : 1.0f;
      std::uniform_real_distribution<float> dist(-bound, bound);
      for (float &v : hw.values) v = dist(rng);
    }
    w.emplace(name, std::move(hw));
  }
  return ModelWeights::from_map(std::move(w));
}

} // namespace

ModelDecoder::ModelDecoder(const Manifest &manifest, Pipeline &pipeline, DLDevice device, const std::atomic<bool> &cancelled,
                           VocabularySlot *vocabulary)
    : manifest_(manifest), pipeline_(pipeline), cancelled_(cancelled) {
  if (const char *v = std::getenv("LOOM_DECODE_AHEAD"); v && std::string(v) == "0") decode_ahead_ = false;
  BackendOptions options;
  options.device = device;
  options.threads = static_cast<int32_t>(manifest.threads);
  options.source_name = manifest.source_name;
  if (manifest.model_dtype == "float32") options.dtype = ComputeDtype::float32;
  else if (manifest.model_dtype == "bfloat16") options.dtype = ComputeDtype::bfloat16;
  // A tokenizer Loom cannot read (an NFC normalizer, say) matters only when text is needed.
  std::string tokenizer_error;
  if (manifest.model_path.empty()) {
    config_ = synthetic_config(manifest.run);
    if (!manifest.calibration_path.empty())
      throw manifest_error(manifest.source_name + ": model.calibration: needs a [model] path (a checkpoint with a tokenizer)");
    backend_ = make_backend(config_, synthetic_weights(config_, manifest.seed), pipeline, options);
  } else {
    config_ = load_model_config(manifest.model_path);
    try {
      tokenizer_ = Tokenizer::load(manifest.model_path);
    } catch (const Error &e) {
      tokenizer_error = " (";
      tokenizer_error += e.what();
      tokenizer_error += ")";
    }
    options.calibration = calibration_sequences(manifest, tokenizer_.get(), config_.max_positions);
    SafetensorsIndex checkpoint = SafetensorsIndex::open_model_dir(manifest.model_path);
    // "auto" keeps the checkpoint's precision: half when its weights are stored as BF16 or F16.
    for (const auto &[file, shard] : checkpoint.shards())
      for (const auto &t : shard.tensors())
        if (t.dtype == SafetensorsDtype::BF16 || t.dtype == SafetensorsDtype::F16) options.half_checkpoint = true;
    backend_ = make_backend(config_, ModelWeights::load(config_, checkpoint), pipeline, options);
    if (tokenizer_ && vocabulary) vocabulary->set_source(tokenizer_, config_.eos_token_ids);
    if (tokenizer_)
      if (const auto bos = tokenizer_->encode("", true); !bos.empty()) placeholder_ = bos.front();
  }
  const RunSpec &run = manifest.run;
  tokenizer_error_ = tokenizer_error;
  {  // RAG: a prompt that asks for the retrieved passages is made at run time (place_passages).
    const auto wants = [](const std::string &t) { return t.find("{passages}") != std::string::npos; };
    bool in_messages = false;
    for (const auto &[role, content] : run.messages) in_messages = in_messages || wants(content);
    for (const auto &p : run.prompts)
      if (wants(p.text))
        throw manifest_error(manifest.source_name + ": run.prompts: {passages} is for run.prompt or run.messages (one question)");
    if (wants(run.prompt_text) || in_messages) {
      const std::string key = in_messages ? "run.messages" : "run.prompt";
      if (run.query.empty())
        throw manifest_error(manifest.source_name + ": " + key + ": {passages} needs run.query (the question to retrieve for)");
      if (pipeline.list(LOOM_KIND_RETRIEVER).empty())
        throw manifest_error(manifest.source_name + ": " + key + ": {passages} needs a [[retriever]]");
      if (manifest.agent.enabled)
        throw manifest_error(manifest.source_name + ": " + key + ": {passages} with [agent] is not supported yet (the agent's "
                             "task is the prompt as written)");
      rag_ = true;
      rag_text_ = run.prompt_text;
      rag_messages_ = run.messages;
    }
  }
  if (!run.prompts.empty()) {
    for (size_t i = 0; i < run.prompts.size(); ++i)
      prompts_.push_back(encode_prompt(run.prompts[i].text, run.prompts[i].ids, "run.prompts[" + std::to_string(i) + "]",
                                       tokenizer_error));
  } else if (!run.messages.empty()) {
    if (!tokenizer_)
      throw manifest_error(manifest.source_name + ": run.messages: a conversation needs a model with a tokenizer" +
                           tokenizer_error);
    ChatFamily family = run.chat_template == "auto" ? detect_chat_family(manifest.model_path)
                                                    : *chat_family_from_name(run.chat_template);
    std::vector<ChatMessage> messages;
    for (const auto &[role, content] : run.messages) messages.push_back({role, content});
    std::vector<int32_t> ids;
    try {
      ids = encode_chat(*tokenizer_, render_chat(family, messages, /*add_generation_prompt=*/true));
    } catch (const Error &e) {
      throw manifest_error(manifest.source_name + ": run.messages (" + chat_family_name(family) + " template): " + e.what());
    }
    prompts_.push_back(encode_prompt({}, ids, "run.prompt", tokenizer_error));
  } else {
    prompts_.push_back(encode_prompt(run.prompt_text, run.prompt, "run.prompt", tokenizer_error));
  }
  if (!run.stop.empty() && !tokenizer_)
    throw manifest_error(manifest.source_name + ": run.stop: stop strings need a model with a tokenizer; use stop_tokens" +
                         tokenizer_error);
  stop_tokens_ = run.stop_tokens_set ? run.stop_tokens : config_.eos_token_ids;
  if (manifest.model_path.empty() && !run.stop_tokens_set) stop_tokens_.clear(); // random weights: run all steps
  if (run.n > 1) {
    // n samples per prompt: the prompts repeated, prompt-major, each sample with its own key.
    if (rag_) throw manifest_error(manifest.source_name + ": run.n: several samples with {passages} are not supported");
    if (manifest.agent.enabled) throw manifest_error(manifest.source_name + ": run.n: several samples with [agent] are not supported");
    std::vector<std::vector<int32_t>> repeated;
    for (const auto &p : prompts_) repeated.insert(repeated.end(), static_cast<size_t>(run.n), p);
    prompts_ = std::move(repeated);
  }
}

void ModelDecoder::export_quantized(const std::filesystem::path &dir) {
  auto *cpu = dynamic_cast<CpuBackend *>(backend_.get());
  if (manifest_.model_path.empty())
    throw manifest_error(manifest_.source_name + ": loom quantize needs a [model] path (a checkpoint to quantize)");
  if (cpu == nullptr)
    throw runtime_error(manifest_.source_name + ": loom quantize runs on the CPU backend (loom.device = \"cpu\")");
  cpu->export_quantized(SafetensorsIndex::open_model_dir(manifest_.model_path), dir);
}

// The backend removes its swap hooks under the step lock; agent tool calls that overran their
// time limit are waited for (their instances are the pipeline's).
ModelDecoder::~ModelDecoder() {
  for (auto &call : abandoned_calls_) call.thread.join();
}

std::vector<int32_t> ModelDecoder::encode_prompt(const std::string &text, const std::vector<int32_t> &ids,
                                                 const std::string &key, const std::string &tokenizer_error) const {
  std::vector<int32_t> out = ids;
  if (!text.empty()) {
    if (!tokenizer_)
      throw manifest_error(manifest_.source_name + ": " + key + ": text needs a model with a tokenizer (tokenizer.model or "
                           "tokenizer.json); give token ids instead" + tokenizer_error);
    out = tokenizer_->encode(text, /*add_bos=*/true);
  }
  if (out.empty()) throw manifest_error(manifest_.source_name + ": " + key + ": encodes to no tokens");
  for (int32_t token : out)
    if (token < 0 || token >= config_.vocab_size)
      throw manifest_error(manifest_.source_name + ": " + key + ": token " + std::to_string(token) +
                           " is outside the model's vocabulary of " + std::to_string(config_.vocab_size));
  return out;
}

bool ModelDecoder::generated_text(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated,
                                  std::string *text, const std::vector<std::string> *stops,
                                  std::span<const int32_t> more_stop_tokens, int64_t min_tokens,
                                  ContinuationCache *cache) const {
  // Decoded after the prompt, so that pieces keep the spacing they have in context
  // (continuation_text: the prompt's last tokens as context, the cache's checkpoint).
  // Stop tokens end the text; they are not part of it (a BPE tokenizer would write
  // "<|endoftext|>").
  auto text_of = [&](size_t n, ContinuationCache *c) { // the text of generated[0, n), stop tokens left out
    std::vector<int32_t> kept;
    kept.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const int32_t id = generated[i];
      if (!is_stop_token(id) && std::find(more_stop_tokens.begin(), more_stop_tokens.end(), id) == more_stop_tokens.end())
        kept.push_back(id);
    }
    return continuation_text(*tokenizer_, prompt, kept, c);
  };
  *text = text_of(generated.size(), cache);
  // A stop string ends the text where it begins (it is not part of the output). Before
  // min_tokens tokens none applies (vLLM's min_tokens): one counts only where it ends in the
  // text of the tokens after them.
  const std::vector<std::string> &strings = stops ? *stops : manifest_.run.stop;
  if (strings.empty()) return false;
  const auto held = static_cast<size_t>(std::max<int64_t>(min_tokens, 0));
  if (held >= generated.size() && held > 0) return false;
  // The earliest stop string ending past byte `floor` of the text.
  const auto earliest = [&](size_t floor) {
    size_t at = std::string::npos;
    for (const auto &stop : strings)
      if (!stop.empty()) at = std::min(at, text->find(stop, floor >= stop.size() ? floor - stop.size() + 1 : 0));
    return at;
  };
  size_t cut = earliest(0);
  if (cut != std::string::npos && held > 0) {
    // The first tokens' text, decoded only when a stop string is there at all, measured as the
    // part it shares with the whole: a character cut between token `held` and the next decodes
    // as U+FFFD there, so the cut character is not counted.
    const std::string first = text_of(held, nullptr);
    const size_t n = std::min(first.size(), text->size());
    size_t floor = 0;
    while (floor < n && first[floor] == (*text)[floor]) ++floor;
    cut = earliest(floor);
  }
  if (cut == std::string::npos) return false;
  text->resize(cut);
  return true;
}

std::vector<int32_t> ModelDecoder::encode_messages(const std::vector<ChatMessage> &messages, const std::string &key) const {
  if (!tokenizer_) throw runtime_error(key + ": chat messages need a model with a tokenizer" + tokenizer_error_);
  const RunSpec &run = manifest_.run;
  ChatFamily family = run.chat_template == "auto" ? detect_chat_family(manifest_.model_path)
                                                  : *chat_family_from_name(run.chat_template);
  std::vector<int32_t> ids;
  try {
    ids = encode_chat(*tokenizer_, render_chat(family, messages, /*add_generation_prompt=*/true));
  } catch (const Error &e) {
    throw runtime_error(key + " (" + chat_family_name(family) + " template): " + e.what());
  }
  return encode_prompt({}, ids, key, tokenizer_error_);
}

std::string ModelDecoder::continuation(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated,
                                       const std::vector<std::string> &stops, bool *stopped, int64_t min_tokens,
                                       ContinuationCache *cache) const {
  if (!tokenizer_) throw runtime_error("text of generated tokens: the model has no tokenizer" + tokenizer_error_);
  std::string text;
  const bool cut = generated_text(prompt, generated, &text, &stops, {}, min_tokens, cache);
  if (stopped) *stopped = cut;
  return text;
}

std::optional<std::string> ModelDecoder::decode(const std::vector<int32_t> &ids) const {
  if (!tokenizer_) return std::nullopt;
  return tokenizer_->decode(ids);
}

void ModelDecoder::all_reduce(DLTensor *logits) {
  auto parallel = pipeline_.list(LOOM_KIND_PARALLEL);
  if (parallel.empty()) return;
  // Every rank holds the same replicated logits; averaging keeps them and checks the collective.
  auto &p = *parallel.front();
  p.check(p.vtable<loom_parallel_vtable>()->all_reduce(p.handle(), LOOM_GROUP_WORLD, logits, LOOM_REDUCE_AVG), "all_reduce");
}

void ModelDecoder::SamplingRows::add(int64_t seq, std::span<const int32_t> tokens, uint64_t seed, uint64_t step) {
  seq_ids.push_back(seq);
  history.push_back(tokens.data());
  history_len.push_back(static_cast<int32_t>(tokens.size()));
  keys.push_back(seed);
  counters.push_back(step);
}

loom_sampling_batch ModelDecoder::SamplingRows::batch(DLTensor *logits, int64_t vocab, int32_t *tokens_out) {
  loom_sampling_batch b{};
  b.struct_size = sizeof(b);
  b.n_rows = static_cast<int32_t>(seq_ids.size());
  b.vocab_size = static_cast<int32_t>(vocab);
  b.logits = logits;
  b.seq_ids = seq_ids.data();
  b.history = history.data();
  b.history_len = history_len.data();
  b.rng_key = keys.data();
  b.rng_counter = counters.data();
  b.tokens_out = tokens_out;
  return b;
}

int32_t *ModelDecoder::sample(DLTensor *logits, const std::vector<int32_t> &rows,
                              const std::vector<std::span<const int32_t>> &row_history, uint64_t step,
                              std::vector<int32_t> &tokens, bool ahead, const std::vector<uint64_t> *row_steps,
                              const std::vector<std::shared_ptr<Instance>> *own_chain, const std::vector<uint64_t> *row_keys) {
  auto chain = own_chain && !own_chain->empty() ? *own_chain : pipeline_.list(LOOM_KIND_SAMPLER);
  if (chain.empty()) throw runtime_error(manifest_.source_name + ": the pipeline has no [[sampler]]: add one such as greedy");
  const size_t n = rows.size();
  if (logits->ndim != 2 || logits->shape[0] != static_cast<int64_t>(n) || logits->shape[1] != config_.vocab_size)
    throw runtime_error(manifest_.source_name + ": the model backend returned logits of the wrong shape");
  // Logits on the GPU stay there when every link can read them there; otherwise the chain gets
  // a host copy of the rows.
  std::vector<float> host_rows;
  DLTensor host_view{};
  int64_t host_shape[2]{};
  const bool chain_on_device = std::all_of(chain.begin(), chain.end(), [](const std::shared_ptr<Instance> &s) {
    return (s->vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_RUNS_ON_CUDA) != 0;
  });
  if (logits->device.device_type != kDLCPU && !chain_on_device) {
    host_rows.resize(n * static_cast<size_t>(config_.vocab_size));
    std::string error;
    if (device_memcpy(host_rows.data(), DLDevice{kDLCPU, 0}, logits->data, logits->device, host_rows.size() * sizeof(float),
                      error) != LOOM_OK)
      throw runtime_error(manifest_.source_name + ": copying logits to the host for the sampler chain: " + error);
    host_shape[0] = static_cast<int64_t>(n);
    host_shape[1] = config_.vocab_size;
    host_view = *logits;
    host_view.data = host_rows.data();
    host_view.device = {kDLCPU, 0};
    host_view.shape = host_shape;
    host_view.byte_offset = 0;
    logits = &host_view;
  }
  tokens.assign(n, -1);
  SamplingRows sampling;
  for (size_t r = 0; r < n; ++r)
    sampling.add(rows[r], row_history[r], row_keys ? (*row_keys)[r] : manifest_.seed, row_steps ? (*row_steps)[r] : step);
  loom_sampling_batch b = sampling.batch(logits, config_.vocab_size, tokens.data());
  int32_t *feed = nullptr;
  if (ahead && decode_ahead_ && logits->device.device_type != kDLCPU && chain_on_device && n > 0 &&
      (chain.back()->vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_DEVICE_TOKENS) != 0)
    feed = backend_->token_feed(static_cast<int32_t>(n));
  int64_t feed_shape[1] = {static_cast<int64_t>(n)};
  DLTensor feed_view{};
  if (feed) {
    feed_view.data = feed;
    feed_view.device = logits->device;
    feed_view.ndim = 1;
    feed_view.dtype = DLDataType{kDLInt, 32, 1};
    feed_view.shape = feed_shape;
    b.tokens_device = &feed_view;
  }
  apply_chain(chain, b, "selecting samplers (greedy, dist) must come last");
  // A link that may write on the device and wrote nothing here left the tokens there.
  return feed && std::all_of(tokens.begin(), tokens.end(), [](int32_t t) { return t == -1; }) ? feed : nullptr;
}

void ModelDecoder::accept_tokens(const std::vector<int32_t> &rows, const std::vector<int32_t> &tokens,
                                 const std::vector<std::shared_ptr<Instance>> *own_chain) {
  auto chain = own_chain && !own_chain->empty() ? *own_chain : pipeline_.list(LOOM_KIND_SAMPLER);
  const size_t n = rows.size();
  for (int32_t token : tokens)
    if (token < 0 || token >= config_.vocab_size)
      throw runtime_error(chain.back()->slot() + " (" + chain.back()->desc().name + "): the sampler chain selected no valid token"
                          " (got " + std::to_string(token) + "); end the chain with a selecting sampler such as greedy or dist");
  for (auto &s : chain)
    if (auto accept = s->vtable<loom_sampler_vtable>()->accept)
      for (size_t r = 0; r < n; ++r) s->check(accept(s->handle(), rows[r], tokens[r]), "accept");
}

size_t ModelDecoder::start_run(int64_t steps, RunResult &result) const {
  const size_t n = prompts_.size();
  result.sequences.assign(n, SequenceResult{});
  size_t longest = 0;
  for (size_t i = 0; i < n; ++i) {
    result.sequences[i].prompt = prompts_[i];
    longest = std::max(longest, prompts_[i].size());
  }
  if (static_cast<int64_t>(longest) + steps > config_.max_positions || steps > INT32_MAX)
    throw runtime_error(manifest_.source_name + ": run.steps: the " + (n > 1 ? "longest " : "") + "prompt's " +
                        std::to_string(longest) + " tokens and " + std::to_string(steps) + " steps exceed the model's " +
                        std::to_string(config_.max_positions) + " positions");
  return longest;
}

std::vector<int64_t> ModelDecoder::step_limits(int64_t &steps) const {
  const std::vector<int64_t> &own = manifest_.run.prompt_steps;
  const size_t n = static_cast<size_t>(manifest_.run.n);  // samples per prompt (prompts_ holds each n times)
  if (own.size() * n != prompts_.size()) return std::vector<int64_t>(prompts_.size(), steps);
  steps = *std::max_element(own.begin(), own.end());
  std::vector<int64_t> limits;
  for (int64_t s : own) limits.insert(limits.end(), n, s);
  return limits;
}

void ModelDecoder::release_sequence(int64_t seq) {
  for (auto &s : pipeline_.list(LOOM_KIND_SAMPLER))
    if (auto fn = s->vtable<loom_sampler_vtable>()->release) fn(s->handle(), seq);
}

void ModelDecoder::release_draft_sequence(int64_t seq) {
  for (auto &d : pipeline_.list(LOOM_KIND_DRAFTER))
    if (auto fn = d->vtable<loom_drafter_vtable>()->release) fn(d->handle(), seq);
}

ModelDecoder::ForgetSequences::~ForgetSequences() {
  try {
    auto guard = pipeline.begin_step();
    for (auto &s : pipeline.list(LOOM_KIND_SAMPLER))
      if (auto release = s->vtable<loom_sampler_vtable>()->release) release(s->handle(), -1);
    for (auto &d : pipeline.list(LOOM_KIND_DRAFTER))
      if (auto release = d->vtable<loom_drafter_vtable>()->release) release(d->handle(), -1);
  } catch (...) { // (out of memory listing the chain): nothing to release then
  }
}

int64_t ModelDecoder::virtual_tokens(const std::optional<std::string> &choice) const {
  if (choice && choice->empty()) return 0;
  for (const auto &a : pipeline_.list(LOOM_KIND_ADAPTER)) {
    if (choice && a->slot() != *choice) continue;
    if (const int64_t n = adapter_virtual_tokens(*a); n > 0) return n;
  }
  return 0;
}

std::vector<int32_t> ModelDecoder::with_virtual_tokens(int64_t n, const std::vector<int32_t> &prompt) const {
  if (n == 0) return prompt;
  std::vector<int32_t> out(static_cast<size_t>(n), placeholder_);
  out.insert(out.end(), prompt.begin(), prompt.end());
  return out;
}

void ModelDecoder::generate(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token,
                            RunResult &result) {
  if (beam_chain() && virtual_tokens(std::nullopt) > 0)
    throw runtime_error(manifest_.source_name + ": beam search with a prefix adapter is not supported");
  if (beam_chain()) {
    if (manifest_.run.n > 1)
      throw runtime_error(manifest_.source_name + ": run.n: beam search returns its own beams; remove run.n or the "
                          "beam-search sampler");
    if (manifest_.scheduler.enabled)
      throw runtime_error(manifest_.source_name + ": scheduler: beam search runs its own batch; remove [scheduler] or "
                          "the beam-search sampler");
    return generate_beams(steps, on_token, on_sequence_token, result);
  }
  // Speculative decoding lives in the serving loop: a [drafter] runs the prompts as requests.
  if (manifest_.scheduler.enabled || !manifest_.of_kind(LOOM_KIND_DRAFTER).empty())
    return generate_scheduled(steps, on_token, on_sequence_token, result);
  const size_t n = prompts_.size();
  const std::vector<int64_t> limits = step_limits(steps);
  // A prefix adapter's virtual tokens come first in every sequence (their positions hold its
  // keys and values; the prompt follows them).
  const int64_t virtual_n = virtual_tokens(std::nullopt);
  const size_t longest = start_run(steps + virtual_n, result) + static_cast<size_t>(virtual_n);
  ForgetSequences release_at_end{pipeline_};

  std::vector<std::vector<int32_t>> histories;
  for (const auto &p : prompts_) histories.push_back(with_virtual_tokens(virtual_n, p));
  std::vector<std::span<const int32_t>> row_history; // histories of this step's rows
  std::vector<uint64_t> row_keys;                    // run.n > 1: their sampling keys
  std::vector<int32_t> rows(n); // the sequence of each row of `logits`
  for (size_t i = 0; i < n; ++i) rows[i] = static_cast<int32_t>(i);
  DLTensor *logits = nullptr;
  StepBatch batch;
  std::chrono::steady_clock::time_point prefill_start;
  {
    auto guard = pipeline_.begin_step();
    backend_->reserve(static_cast<int32_t>(n), static_cast<int64_t>(longest) + steps); // one-time work is not prefill
    prefill_start = std::chrono::steady_clock::now();
    // Every prompt in one ragged batch; sequence i owns KV slot i.
    batch.seq_offsets.push_back(0);
    for (size_t i = 0; i < n; ++i) {
      batch.tokens.insert(batch.tokens.end(), histories[i].begin(), histories[i].end());
      batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
      batch.seq_positions.push_back(0);
      batch.seq_slots.push_back(static_cast<int32_t>(i));
    }
    logits = backend_->forward(batch);
    all_reduce(logits);
    // The prefill's time is its device's: a GPU backend returns with its work queued, which the
    // first decode step would otherwise be charged with (sampling waits for it anyway).
    if (std::string error; !device_synchronize(backend_->device(), error)) throw runtime_error(error);
  }
  auto decode_start = std::chrono::steady_clock::now();
  result.prefill_seconds = std::chrono::duration<double>(decode_start - prefill_start).count();
  std::vector<bool> stopped_by_string(n, false);
  std::vector<ContinuationCache> text_caches(n); // each sequence's text so far (the stop-string checks)
  std::vector<int32_t> sampled, next_rows;
  // The next step's batch: one token for each sequence in `seqs`. Fed: its tokens are still on
  // the device (sampled, not yet read back) and each sequence's new token goes at position
  // history size; otherwise the token is the history's last, at history size - 1.
  auto decode_batch = [&](const std::vector<int32_t> &seqs, bool fed) {
    batch.tokens.clear();
    batch.seq_offsets.assign(1, 0);
    batch.seq_positions.clear();
    batch.seq_slots.clear();
    batch.tokens_fed = fed;
    for (int32_t seq : seqs) {
      const auto &h = histories[static_cast<size_t>(seq)];
      batch.tokens.push_back(fed ? 0 : h.back());
      batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
      batch.seq_positions.push_back(static_cast<int32_t>(h.size()) - (fed ? 0 : 1));
      batch.seq_slots.push_back(seq);
    }
    return &batch;
  };
  TokenReadback readback;
  DLTensor *ahead = nullptr; // the logits of a step queued before its tokens reached the host
  uint64_t swaps_at_ahead = 0;
  for (int64_t step = 0; step < steps && !rows.empty(); ++step) {
    if (cancelled_.load()) {
      result.cancelled = true;
      break;
    }
    std::vector<int32_t> emitted_rows = rows; // the sequences that get a token at this step
    {
      auto guard = pipeline_.begin_step();
      if (ahead) {
        // Queued during the previous step for these same rows; a swap that landed since then
        // (from a callback or another thread) must see this step run with it.
        logits = ahead;
        ahead = nullptr;
        if (pipeline_.swaps() != swaps_at_ahead) {
          logits = backend_->forward(*decode_batch(rows, false));
          all_reduce(logits);
        }
      }
      const bool more = step + 1 < steps;
      row_history.clear();
      for (int32_t seq : rows) row_history.emplace_back(histories[static_cast<size_t>(seq)]);
      const bool samples = manifest_.run.n > 1;
      if (samples) {
        row_keys.clear();
        for (int32_t seq : rows) row_keys.push_back(sample_key(static_cast<size_t>(seq)));
      }
      if (int32_t *feed = sample(logits, rows, row_history, static_cast<uint64_t>(step), sampled, more, nullptr, nullptr,
                                 samples ? &row_keys : nullptr)) {
        readback.start(feed, rows.size(), backend_->device());
        // Queue the next step now, for every row of this one; the device runs it while the host
        // waits for this step's tokens and applies the stop rules.
        swaps_at_ahead = pipeline_.swaps();
        ahead = backend_->forward(*decode_batch(rows, true));
        all_reduce(ahead);
        readback.wait(sampled.data());
      }
      accept_tokens(rows, sampled);
      next_rows.clear();
      for (size_t r = 0; r < rows.size(); ++r) {
        const int32_t seq = rows[r], token = sampled[r];
        SequenceResult &out = result.sequences[static_cast<size_t>(seq)];
        histories[static_cast<size_t>(seq)].push_back(token);
        out.tokens.push_back(token);
        bool by_string = false;
        const bool done = hits_stop(prompts_[static_cast<size_t>(seq)], out, token, &by_string, nullptr, {},
                                    &text_caches[static_cast<size_t>(seq)]);
        if (by_string) stopped_by_string[static_cast<size_t>(seq)] = true;
        if (done || static_cast<int64_t>(out.tokens.size()) >= limits[static_cast<size_t>(seq)]) {
          release_sequence(seq); // the sequence leaves the batch
        } else {
          next_rows.push_back(seq);
        }
      }
      // The next step's logits: one new token for every sequence still going. A step queued
      // ahead serves when no row left; otherwise it is redone for the rows that remain.
      if (ahead && next_rows != rows) ahead = nullptr;
      if (more && !next_rows.empty() && !ahead) {
        logits = backend_->forward(*decode_batch(next_rows, false));
        all_reduce(logits);
      }
      rows.swap(next_rows);
    }
    // Callbacks run outside the step lock: a swap they make lands before the next step.
    bool go_on = true;
    for (size_t r = 0; r < emitted_rows.size() && go_on; ++r) {
      const int32_t seq = emitted_rows[r];
      const int32_t token = result.sequences[static_cast<size_t>(seq)].tokens.back();
      if (seq == 0 && on_token && !on_token(static_cast<int32_t>(step), token)) go_on = false;
      if (go_on && on_sequence_token && !on_sequence_token(seq, static_cast<int32_t>(step), token)) go_on = false;
    }
    if (!go_on) break;
  }
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - decode_start).count();
  if (tokenizer_)
    for (size_t i = 0; i < n; ++i)
      if (!stopped_by_string[i])
        generated_text(prompts_[i], result.sequences[i].tokens, &result.sequences[i].text, nullptr, {}, 0, &text_caches[i]);
  take_first_sequence(result);
}

bool ModelDecoder::hits_stop(const std::vector<int32_t> &prompt, SequenceResult &out, int32_t token, bool *by_string,
                             const std::vector<std::string> *stops, const RequestStops &own,
                             ContinuationCache *cache) const {
  // (Before min_tokens the stop tokens had no probability; a draft cannot bring one either,
  // since drafts are kept only where the target's chain chose them.)
  bool done = static_cast<int64_t>(out.tokens.size()) >= own.min_tokens && is_stop_token(token, own);
  const std::vector<std::string> &strings = stops ? *stops : manifest_.run.stop;
  if (!done && !strings.empty() && tokenizer_ &&
      generated_text(prompt, out.tokens, &out.text, &strings, own.more_tokens, own.min_tokens, cache))
    done = *by_string = true;
  if (done) out.stopped = true;
  return done;
}

void ModelDecoder::take_first_sequence(RunResult &result) {
  const SequenceResult &first = result.sequences.front();
  result.prompt = first.prompt;
  result.tokens = first.tokens;
  result.text = first.text;
  result.stopped = first.stopped;
}

namespace {

struct PassageSink {
  RunResult *result;
  std::string slot;
};

// Receives one passage from a retriever; the passage's strings are valid during the call only.
loom_status collect_passage(void *user, const loom_passage *p) {
  try {
    auto *sink = static_cast<PassageSink *>(user);
    static const char *kinds[] = {"?", "bm25", "cosine", "inner-product", "l2", "rrf", "rerank"};
    PassageResult pr;
    pr.retriever_slot = sink->slot;
    pr.doc_id = p->doc_id ? p->doc_id : "";
    pr.score = p->score;
    pr.score_kind = p->score_kind >= 1 && p->score_kind <= 6 ? kinds[p->score_kind] : "?";
    pr.text = p->text ? p->text : "";
    sink->result->passages.push_back(std::move(pr));
    return LOOM_OK;
  } catch (...) { // never unwind through the plugin's frames
    return LOOM_ERR_OUT_OF_MEMORY;
  }
}

} // namespace

std::vector<std::vector<float>> ModelDecoder::embed(const std::vector<std::string> &texts, bool query) {
  const EmbeddingSpec &spec = manifest_.embedding;
  const std::string &source = manifest_.source_name;
  if (!spec.enabled) throw manifest_error(source + ": embeddings need an [embedding] table");
  if (!tokenizer_) throw manifest_error(source + ": [embedding]: text needs a model with a tokenizer" + tokenizer_error_);
  const int64_t limit = std::min<int64_t>(spec.max_tokens, config_.max_positions);
  const std::string &prefix = query ? spec.query_prefix : spec.document_prefix;
  std::vector<std::vector<float>> out;
  out.reserve(texts.size());
  for (size_t at = 0; at < texts.size(); at += static_cast<size_t>(spec.batch)) {
    const size_t n = std::min(texts.size() - at, static_cast<size_t>(spec.batch));
    StepBatch batch;
    batch.seq_offsets.push_back(0);
    int64_t longest = 0;
    for (size_t i = 0; i < n; ++i) {
      const std::string key = query ? std::string("[embedding] of the query")
                                    : std::string("[embedding] of text ").append(std::to_string(at + i));
      std::vector<int32_t> ids = encode_prompt(prefix + texts[at + i], {}, key, tokenizer_error_);
      if (static_cast<int64_t>(ids.size()) > limit) ids.resize(static_cast<size_t>(limit));
      longest = std::max<int64_t>(longest, static_cast<int64_t>(ids.size()));
      batch.tokens.insert(batch.tokens.end(), ids.begin(), ids.end());
      batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
      batch.seq_positions.push_back(0);
      batch.seq_slots.push_back(static_cast<int32_t>(i));
    }
    std::vector<float> pooled;
    {
      auto guard = pipeline_.begin_step();  // no swap of the attention plugin while it runs
      backend_->reserve(static_cast<int32_t>(n), longest);
      pooled = backend_->embed(batch, spec.pooling == "mean");
    }
    const size_t hidden = pooled.size() / n;
    for (size_t i = 0; i < n; ++i) {
      std::vector<float> v(pooled.begin() + static_cast<std::ptrdiff_t>(i * hidden),
                           pooled.begin() + static_cast<std::ptrdiff_t>((i + 1) * hidden));
      if (spec.normalize) {
        double norm = 0;
        for (float x : v) norm += static_cast<double>(x) * x;
        if (norm > 0)
          for (float &x : v) x = static_cast<float>(x / std::sqrt(norm));
      }
      out.push_back(std::move(v));
    }
  }
  return out;
}

void ModelDecoder::retrieve(RunResult &result) {
  const RunSpec &run = manifest_.run;
  if (run.query.empty()) return;
  std::vector<float> query_embedding;
  if (manifest_.embedding.enabled && !pipeline_.list(LOOM_KIND_RETRIEVER).empty())
    query_embedding = embed({run.query}, /*query=*/true).front();
  for (auto &r : pipeline_.list(LOOM_KIND_RETRIEVER)) {
    loom_query q{};
    q.struct_size = sizeof(q);
    q.text = run.query.c_str();
    q.embedding = query_embedding.empty() ? nullptr : query_embedding.data();
    q.embedding_dim = static_cast<int32_t>(query_embedding.size());
    q.top_k = static_cast<int32_t>(run.top_k);
    q.filter = run.filter.empty() ? nullptr : run.filter.c_str();
    PassageSink sink{&result, r->slot()};
    auto guard = pipeline_.begin_step(); // no swap of this retriever while it searches
    auto current = pipeline_.get(r->slot());
    current->check(current->vtable<loom_retriever_vtable>()->search(current->handle(), &q, collect_passage, &sink),
                   "search");
  }
}

namespace {

// Every occurrence of `key` in `text` replaced by `value`.
std::string replace_all(std::string text, const std::string &key, const std::string &value) {
  for (size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + value.size()))
    text.replace(at, key.size(), value);
  return text;
}

}  // namespace

void ModelDecoder::place_passages(RunResult &result) {
  if (!rag_) return;
  const RunSpec &run = manifest_.run;
  // The retrievers' lists (in the pipeline's order), fused by reciprocal rank when there are
  // several (passage_fusion.hpp).
  std::vector<PassageResult> fused = fuse_passages(result.passages, run.top_k);
  std::string block;
  for (size_t i = 0; i < fused.size(); ++i) {
    std::string text = fused[i].text;
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    block += "[" + std::to_string(i + 1) + "] " + text + " (" + fused[i].doc_id + ")\n";
  }
  if (fused.empty()) block = "(no passage found)\n";
  const auto fill = [&](const std::string &t) { return replace_all(replace_all(t, "{passages}", block), "{question}", run.query); };
  std::vector<int32_t> ids;
  if (!rag_messages_.empty()) {
    ChatFamily family = run.chat_template == "auto" ? detect_chat_family(manifest_.model_path)
                                                    : *chat_family_from_name(run.chat_template);
    std::vector<ChatMessage> messages;
    for (const auto &[role, content] : rag_messages_) messages.push_back({role, fill(content)});
    ids = encode_chat(*tokenizer_, render_chat(family, messages, /*add_generation_prompt=*/true));
    prompts_ = {encode_prompt({}, ids, "run.messages", tokenizer_error_)};
  } else {
    prompts_ = {encode_prompt(fill(rag_text_), {}, "run.prompt", tokenizer_error_)};
  }
  result.context = std::move(fused);
}

void ModelDecoder::call_tools(RunResult &result) {
  for (const auto &call : manifest_.run.tool_calls) {
    auto guard = pipeline_.begin_step(); // no swap of a tool while it runs
    auto tools = pipeline_.list(LOOM_KIND_TOOL);
    std::shared_ptr<Instance> owner;
    std::string available;
    for (auto &t : tools) {
      auto vt = t->vtable<loom_tool_vtable>();
      uint32_t n = 0;
      t->check(vt->tool_count(t->handle(), &n), "tool_count");
      for (uint32_t i = 0; i < n && !owner; ++i) {
        loom_tool_info info{};
        info.struct_size = sizeof(info);
        t->check(vt->tool_info(t->handle(), i, &info), "tool_info");
        if (info.name && call.tool == info.name) owner = t;
        if (info.name) available += std::string(available.empty() ? "" : ", ") + info.name;
      }
    }
    if (!owner)
      throw runtime_error(manifest_.source_name + ": run.tool_calls: no tool named '" + call.tool + "' (tools: " +
                          (available.empty() ? "none" : available) + ")");
    HostBuffer content;
    loom_tool_result r{};
    r.struct_size = sizeof(r);
    r.content = content.abi();
    owner->check(owner->vtable<loom_tool_vtable>()->call(owner->handle(), call.tool.c_str(), call.arguments_json.c_str(), &r),
                 "call");
    result.tool_results.push_back({call.tool, std::string(content.view()), r.is_error != 0});
  }
}

} // namespace loom
