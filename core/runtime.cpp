#include "loom/core/runtime.hpp"

#include <charconv>
#include <chrono>
#include <cstdlib>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "device_select.hpp"
#include "hosted_model.hpp"
#include "model_decoder.hpp"

namespace loom {

DLDevice resolve_named_device(const std::string &name, const std::string &source, const std::string &key) {
  if (name == "cpu") return {kDLCPU, 0};
  int count = cuda_device_count();
  int ordinal = 0;
  if (name.size() > 5) {
    auto [ptr, ec] = std::from_chars(name.data() + 5, name.data() + name.size(), ordinal);
    if (ec != std::errc() || ptr != name.data() + name.size()) ordinal = -1;
  }
  if (name != "cuda" && name.rfind("cuda:", 0) != 0)
    throw manifest_error(source + ": " + key + ": \"" + name + "\" is not a device (cpu, cuda or cuda:N)");
  if (count == 0)
    throw manifest_error(source + ": " + key + ": \"" + name + "\" asked for, but no CUDA device is available to this build");
  if (ordinal < 0 || ordinal >= count)
    throw manifest_error(source + ": " + key + ": \"" + name + "\" names no device (this machine has " +
                         std::to_string(count) + ")");
  return {kDLCUDA, ordinal};
}

namespace {
// One of several ranks on a host ([parallel]) takes the GPU of its local rank (torchrun's
// LOCAL_RANK, mpirun's OMPI_COMM_WORLD_LOCAL_RANK) when the device names no index.
DLDevice per_rank(const Manifest &m, DLDevice d, const std::string &name) {
  if (d.device_type != kDLCUDA || m.of_kind(LOOM_KIND_PARALLEL).empty() || name.find(':') != std::string::npos) return d;
  for (const char *var : {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"})
    if (const char *v = std::getenv(var); v != nullptr && *v != '\0') {
      char *end = nullptr;
      const long r = std::strtol(v, &end, 10);
      const int count = cuda_device_count();
      if (*end == '\0' && r >= 0 && count > 0) d.device_id = static_cast<int32_t>(r % count);
      break;
    }
  return d;
}
}  // namespace

DLDevice resolve_manifest_device(const Manifest &m, bool gpu_runs_it) {
  if (m.device != "auto") return per_rank(m, resolve_named_device(m.device, m.source_name, "loom.device"), m.device);
  if (const char *env = std::getenv("LOOM_DEVICE"); env && *env && std::string(env) != "auto")
    return per_rank(m, resolve_named_device(env, "LOOM_DEVICE", "environment"), env);
  return gpu_runs_it && cuda_device_count() > 0 ? per_rank(m, DLDevice{kDLCUDA, 0}, "auto") : DLDevice{kDLCPU, 0};
}

namespace {
// Clears the cancel flag when a run or a serve ends, however it ends.
struct ClearCancel {
  std::atomic<bool> &flag;
  ~ClearCancel() { flag.store(false); }
};

// "auto" picks the GPU when the pipeline surely runs there: a [model], and no quantizer or
// adapter components (a quantizer's calibration, and adapters other than LoRA or several applied
// to one row, run on the CPU only; `loom.device = "cuda"` asks for the GPU anyway).
DLDevice resolve_device(const Manifest &m) {
  return resolve_manifest_device(m, !m.model_path.empty() && m.of_kind(LOOM_KIND_QUANTIZER).empty() &&
                                        m.of_kind(LOOM_KIND_ADAPTER).empty());
}
} // namespace

std::unique_ptr<Runtime> Runtime::from_file(const std::filesystem::path &path, const std::vector<std::string> &overrides) {
  return std::make_unique<Runtime>(parse_manifest_file(path, overrides));
}

std::unique_ptr<Runtime> Runtime::from_string(std::string_view text, std::string_view source_name,
                                              const std::vector<std::string> &overrides) {
  return std::make_unique<Runtime>(parse_manifest_string(text, source_name, overrides));
}

Runtime::Runtime(Manifest manifest)
    : manifest_(std::move(manifest)), device_(resolve_device(manifest_)),
      registry_(Registry::default_search_paths(manifest_.plugin_paths)) {
  for (const auto &dir : manifest_.plugin_paths)
    if (std::error_code ec; !std::filesystem::is_directory(dir, ec))
      throw manifest_error(manifest_.source_name + ": loom.plugin_paths: '" + dir.string() + "' is not a directory");
  registry_.scan();
  ModelHostOptions hosted;
  hosted.registry = &registry_;
  hosted.device = device_;
  if (manifest_.model_dtype == "float32") hosted.dtype = ComputeDtype::float32;
  else if (manifest_.model_dtype == "bfloat16") hosted.dtype = ComputeDtype::bfloat16;
  hosted.threads = static_cast<int32_t>(manifest_.threads);
  hosted.base_dir = manifest_.base_dir;
  hosted.source_name = manifest_.source_name;
  if (const auto attention = manifest_.of_kind(LOOM_KIND_ATTENTION); !attention.empty()) hosted.attention = *attention.front();
  hosted.metrics = &metrics_;
  hosted.cancelled = &cancelled_;
  model_host_ = std::make_unique<ModelHost>(std::move(hosted));
  pipeline_ = std::make_unique<Pipeline>(registry_,
                                         InstanceEnvironment{device_, &metrics_, &cancelled_, &vocabulary_, model_host_.get()});
  pipeline_->build(manifest_);
  // Loads the model now, into the backend make_backend picks for device_.
  decoder_ = std::make_unique<ModelDecoder>(manifest_, *pipeline_, device_, cancelled_, &vocabulary_);
}

Runtime::~Runtime() {
  decoder_.reset(); // frees what it made with the pipeline's instances
  pipeline_.reset();
}

void Runtime::record_scheduler_metrics(const SchedulerStats &s) {
  metrics_.gauge("scheduler.prefix_cache_hit_rate", s.prefix_cache_hit_rate);
  metrics_.count("scheduler.prompt_tokens", static_cast<double>(s.prompt_tokens));
  metrics_.count("scheduler.cached_prompt_tokens", static_cast<double>(s.cached_tokens));
  metrics_.count("scheduler.preemptions", static_cast<double>(s.preemptions));
  metrics_.count("scheduler.steps", static_cast<double>(s.steps));
  if (s.drafted_tokens > 0 || s.drafter_failures > 0) {
    metrics_.count("speculative.drafted_tokens", static_cast<double>(s.drafted_tokens));
    metrics_.count("speculative.accepted_tokens", static_cast<double>(s.accepted_tokens));
    metrics_.count("speculative.drafter_failures", static_cast<double>(s.drafter_failures));
    metrics_.gauge("speculative.acceptance_rate", s.acceptance_rate());
  }
}

SchedulerStats Runtime::serve(RequestQueue &queue, int64_t max_positions) {
  ClearCancel clear_at_end{cancelled_};
  const SchedulerStats stats = decoder_->serve(queue, max_positions);
  record_scheduler_metrics(stats);
  return stats;
}

std::vector<std::vector<float>> Runtime::embed(const std::vector<std::string> &texts, bool query) {
  return decoder_->embed(texts, query);
}

RunResult Runtime::run(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token) {
  if (steps < 0 || steps > (int64_t{1} << 20))
    throw runtime_error(manifest_.source_name + ": a run of " + std::to_string(steps) + " steps (1 to 1048576 allowed)");
  ClearCancel clear_at_end{cancelled_};
  auto start = std::chrono::steady_clock::now();
  RunResult result;
  decoder_->retrieve(result);
  decoder_->place_passages(result);
  decoder_->call_tools(result);
  if (manifest_.agent.enabled) decoder_->run_agent(on_token, result);
  else decoder_->generate(steps > 0 ? steps : manifest_.run.steps, on_token, on_sequence_token, result);
  if (result.scheduler.used) record_scheduler_metrics(result.scheduler);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  size_t tokens = 0;
  for (const auto &s : result.sequences) tokens += s.tokens.size();
  metrics_.count("run.tokens", static_cast<double>(tokens));
  return result;
}

const std::vector<int32_t> &Runtime::prompt() const { return decoder_->prompts().front(); }

const std::vector<std::vector<int32_t>> &Runtime::prompts() const { return decoder_->prompts(); }

std::string Runtime::backend_description() const { return decoder_->backend_description(); }

void Runtime::export_quantized(const std::filesystem::path &dir) { decoder_->export_quantized(dir); }

std::optional<std::string> Runtime::decode(const std::vector<int32_t> &ids) const { return decoder_->decode(ids); }
std::optional<std::string> Runtime::token_bytes(int32_t id) const { return decoder_->token_bytes(id); }

std::vector<std::shared_ptr<Instance>> Runtime::make_samplers(const std::vector<std::string> &component_tomls,
                                                              const std::string &what) {
  std::vector<std::shared_ptr<Instance>> chain;
  for (size_t i = 0; i < component_tomls.size(); ++i) {
    const std::string slot = what + ".sampler[" + std::to_string(i) + "]";
    ComponentSpec spec = parse_component_spec(LOOM_KIND_SAMPLER, slot, component_tomls[i], slot, manifest_.base_dir);
    chain.push_back(pipeline_->create_detached(spec));
  }
  return chain;
}

std::vector<int32_t> Runtime::encode_text(const std::string &text, const std::string &key) const {
  return decoder_->encode_text(text, key);
}

std::vector<int32_t> Runtime::tokenize(std::string_view text, bool add_special) const {
  return decoder_->tokenize(text, add_special);
}

std::vector<int32_t> Runtime::encode_messages(const std::vector<std::pair<std::string, std::string>> &messages,
                                              const std::string &key) const {
  std::vector<ChatMessage> chat;
  for (const auto &[role, content] : messages) chat.push_back({role, content});
  return decoder_->encode_messages(chat, key);
}

std::string Runtime::continuation(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated,
                                  const std::vector<std::string> &stops, bool *stopped, int64_t min_tokens,
                                  ContinuationCache *cache) const {
  return decoder_->continuation(prompt, generated, stops, stopped, min_tokens, cache);
}

bool Runtime::has_tokenizer() const { return decoder_->has_tokenizer(); }
int64_t Runtime::max_positions() const { return decoder_->config().max_positions; }
int64_t Runtime::vocab_size() const { return decoder_->config().vocab_size; }

SwapReport Runtime::swap(std::string_view slot, std::string_view component_toml) {
  std::shared_ptr<Instance> current = pipeline_->get(slot);
  ComponentSpec spec = parse_component_spec(current->desc().kind, slot, component_toml,
                                            "swap " + std::string(slot), manifest_.base_dir);
  SwapReport report = pipeline_->swap(spec);
  metrics_.count("pipeline.swaps", 1);
  return report;
}

std::shared_ptr<Instance> Runtime::adapter_in(std::string_view name, const char *what) const {
  std::shared_ptr<Instance> adapter = pipeline_->get(name);
  if (adapter->desc().kind != LOOM_KIND_ADAPTER)
    throw runtime_error(std::string(what) + " " + std::string(name) + ": the slot holds a " + kind_name(adapter->desc().kind) +
                        ", not an adapter");
  return adapter;
}

void Runtime::load_adapter(std::string_view name, std::string_view component_toml) {
  const std::string slot(name);
  if (slot.empty()) throw runtime_error("load adapter: the adapter needs a name");
  if (!decoder_->runs_adapters())
    throw runtime_error("load adapter " + slot + ": the " + decoder_->backend_description() +
                        " backend runs no adapters (they run on the CPU backend for now)");
  ComponentSpec spec = parse_component_spec(LOOM_KIND_ADAPTER, slot, component_toml, "load adapter " + slot, manifest_.base_dir);
  decoder_->end_unload(slot); // a slot unloaded before may be named again
  pipeline_->add(spec);
  metrics_.count("pipeline.adapter_loads", 1);
}

void Runtime::unload_adapter(std::string_view name, double timeout_s) {
  const std::string slot(name);
  std::shared_ptr<Instance> adapter = adapter_in(name, "unload");
  decoder_->begin_unload(slot, timeout_s);
  try {
    pipeline_->remove(slot); // (the slot stays refused until a load names it again)
  } catch (...) {
    decoder_->end_unload(slot);
    throw;
  }
  metrics_.count("pipeline.adapter_unloads", 1);
}

void Runtime::merge_adapter(std::string_view name) { decoder_->merge_adapter(*adapter_in(name, "merge"), true); }

void Runtime::unmerge_adapter(std::string_view name) { decoder_->merge_adapter(*adapter_in(name, "unmerge"), false); }

} // namespace loom
