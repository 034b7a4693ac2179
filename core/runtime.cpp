#include "loom/core/runtime.hpp"

#include <chrono>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "synthetic_decoder.hpp"

namespace loom {

namespace {
DLDevice resolve_device(const std::string &name) {
  if (name == "cpu") return {kDLCPU, 0};
  if (name == "auto") return cuda_device_present() ? DLDevice{kDLCUDA, 0} : DLDevice{kDLCPU, 0};
  if (!cuda_device_present())
    throw manifest_error("loom.device: \"" + name + "\" asked for, but no CUDA device is available to this build");
  int ordinal = name.size() > 5 ? std::stoi(name.substr(5)) : 0;
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
    : manifest_(std::move(manifest)), device_(resolve_device(manifest_.device)),
      registry_(Registry::default_search_paths(manifest_.plugin_paths)) {
  registry_.scan();
  pipeline_ = std::make_unique<Pipeline>(registry_, InstanceEnvironment{device_, &metrics_, &cancelled_});
  pipeline_->build(manifest_);
}

Runtime::~Runtime() { pipeline_.reset(); }

RunResult Runtime::run(int64_t steps, const TokenCallback &on_token) {
  cancelled_.store(false);
  auto start = std::chrono::steady_clock::now();
  SyntheticDecoder decoder(manifest_, *pipeline_, cancelled_);
  RunResult result;
  decoder.retrieve(result);
  decoder.call_tools(result);
  decoder.generate(steps > 0 ? steps : manifest_.run.steps, on_token, result);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  metrics_.count("run.tokens", static_cast<double>(result.tokens.size()));
  return result;
}

SwapReport Runtime::swap(std::string_view slot, std::string_view component_toml) {
  std::shared_ptr<Instance> current = pipeline_->get(slot);
  ComponentSpec spec = parse_component_spec(current->desc().kind, slot, component_toml,
                                            "swap " + std::string(slot), manifest_.base_dir);
  SwapReport report = pipeline_->swap(spec);
  metrics_.count("pipeline.swaps", 1);
  return report;
}

} // namespace loom
