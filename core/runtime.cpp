#include "loom/core/runtime.hpp"

#include <charconv>
#include <chrono>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "model_decoder.hpp"

namespace loom {

namespace {
// "auto" picks the CPU until the engine computes on CUDA: today's pipelines pass host tensors,
// and the device a plugin reads from host->device() must be where its tensors live.
DLDevice resolve_device(const std::string &name, const std::string &source) {
  if (name == "cpu" || name == "auto") return {kDLCPU, 0};
  int count = cuda_device_count();
  int ordinal = 0;
  if (name.size() > 5) {
    auto [ptr, ec] = std::from_chars(name.data() + 5, name.data() + name.size(), ordinal);
    if (ec != std::errc() || ptr != name.data() + name.size()) ordinal = -1;
  }
  if (count == 0)
    throw manifest_error(source + ": loom.device: \"" + name + "\" asked for, but no CUDA device is available to this build");
  if (ordinal < 0 || ordinal >= count)
    throw manifest_error(source + ": loom.device: \"" + name + "\" names no device (this machine has " +
                         std::to_string(count) + ")");
  return {kDLCUDA, ordinal};
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
    : manifest_(std::move(manifest)), device_(resolve_device(manifest_.device, manifest_.source_name)),
      registry_(Registry::default_search_paths(manifest_.plugin_paths)) {
  for (const auto &dir : manifest_.plugin_paths)
    if (std::error_code ec; !std::filesystem::is_directory(dir, ec))
      throw manifest_error(manifest_.source_name + ": loom.plugin_paths: '" + dir.string() + "' is not a directory");
  registry_.scan();
  pipeline_ = std::make_unique<Pipeline>(registry_, InstanceEnvironment{device_, &metrics_, &cancelled_});
  pipeline_->build(manifest_);
  decoder_ = std::make_unique<ModelDecoder>(manifest_, *pipeline_, cancelled_); // loads the model now

}

Runtime::~Runtime() {
  decoder_.reset(); // frees what it made with the pipeline's instances
  pipeline_.reset();
}

RunResult Runtime::run(int64_t steps, const TokenCallback &on_token) {
  if (device_.device_type != kDLCPU)
    throw runtime_error(manifest_.source_name + ": loom.device: `loom run`'s synthetic decoder computes on the CPU;"
                        " use device = \"cpu\" or \"auto\" until the engine runs models on CUDA");
  if (steps < 0 || steps > (int64_t{1} << 20))
    throw runtime_error(manifest_.source_name + ": a run of " + std::to_string(steps) + " steps (1 to 1048576 allowed)");
  struct ClearCancel {
    std::atomic<bool> &flag;
    ~ClearCancel() { flag.store(false); }
  } clear_at_end{cancelled_};
  auto start = std::chrono::steady_clock::now();
  RunResult result;
  decoder_->retrieve(result);
  decoder_->call_tools(result);
  decoder_->generate(steps > 0 ? steps : manifest_.run.steps, on_token, result);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  metrics_.count("run.tokens", static_cast<double>(result.tokens.size()));
  return result;
}

const std::vector<int32_t> &Runtime::prompt() const { return decoder_->prompt(); }

std::optional<std::string> Runtime::decode(const std::vector<int32_t> &ids) const { return decoder_->decode(ids); }

SwapReport Runtime::swap(std::string_view slot, std::string_view component_toml) {
  std::shared_ptr<Instance> current = pipeline_->get(slot);
  ComponentSpec spec = parse_component_spec(current->desc().kind, slot, component_toml,
                                            "swap " + std::string(slot), manifest_.base_dir);
  SwapReport report = pipeline_->swap(spec);
  metrics_.count("pipeline.swaps", 1);
  return report;
}

} // namespace loom
