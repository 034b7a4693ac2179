// loom::train (loom/core/training.hpp): data, the optimizer loop, logs, checkpoints, export, plot.
#include "loom/core/training.hpp"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <numbers>
#include <numeric>
#include <sstream>

#include <nlohmann/json.hpp>

#include "data_parallel.hpp"
#include "device_select.hpp"
#include "loom/core/chat_template.hpp"
#include "loom/core/component_table.hpp"
#include "loom/core/error.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/safetensors_writer.hpp"
#include "loom/core/tokenizer.hpp"
#include "parallel_calls.hpp"
#include "pipeline_stages.hpp"
#include "tensor_shards.hpp"
#include "training_data.hpp"
#include "training_engine.hpp"
#include "transformer_ops.hpp"
#include "weight_init.hpp"

extern char **environ;

namespace loom {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double learning_rate(const TrainSpec &t, int64_t step) {
  if (t.warmup > 0 && step <= t.warmup) return t.lr * static_cast<double>(step) / static_cast<double>(t.warmup);
  if (t.schedule == "constant") return t.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, t.steps - t.warmup));
  const double progress = std::clamp(static_cast<double>(step - t.warmup) / span, 0.0, 1.0);
  if (t.schedule == "linear") return t.lr + (t.min_lr - t.lr) * progress;
  return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

std::span<const std::byte> bytes_of(const std::vector<float> &v) { return std::as_bytes(std::span<const float>(v)); }

// A model directory: the source's config and tokenizer files, the parameters as float32 or
// (rounded to nearest even) bfloat16.
void write_model_dir(const fs::path &dir, const fs::path &source, const std::vector<TrainParam<float>> &params,
                     bool bf16 = false) {
  fs::create_directories(dir);
  copy_model_files(source, dir);
  std::vector<TensorToWrite> tensors;
  std::vector<std::vector<uint16_t>> rounded;
  rounded.reserve(params.size());
  for (const auto &p : params) {
    if (!bf16) {
      tensors.push_back({p.name, SafetensorsDtype::F32, p.shape, bytes_of(p.value)});
      continue;
    }
    auto &r = rounded.emplace_back(p.value.size());
    for (size_t i = 0; i < r.size(); ++i) r[i] = ops::float_to_bf16(p.value[i]);
    tensors.push_back({p.name, SafetensorsDtype::BF16, p.shape, std::as_bytes(std::span<const uint16_t>(r))});
  }
  write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
}

// An adapter directory in the Hugging Face PEFT layout: adapter_model.safetensors (the adapter's
// parameters under PEFT's names) and adapter_config.json.
void write_adapter_dir(const fs::path &dir, const std::vector<TrainParam<float>> &params, const nlohmann::json &config) {
  fs::create_directories(dir);
  std::vector<TensorToWrite> tensors;
  for (const auto &p : params) tensors.push_back({p.name, SafetensorsDtype::F32, p.shape, bytes_of(p.value)});
  write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  std::ofstream(dir / "adapter_config.json") << config.dump(2) << "\n";
}

// adapter_config.json: PEFT's for a `lora` component, from its resolved table; for any other
// adapter component (PEFT has no bottleneck adapters) Loom's own: the component's name and its
// resolved table, which loading checks (adapter_weights.cpp).
nlohmann::json adapter_config(const ComponentSpec &spec, const Instance &adapter, const fs::path &base_model) {
  const auto table = spec.table->resolve(adapter.desc(), spec.slot);
  if (std::string(adapter.desc().name) != "lora") {
    auto params = nlohmann::json::parse(table->json("").value_or("{}"));
    for (auto it = params.begin(); it != params.end();)
      it = ComponentTable::is_reserved_key(it.key()) ? params.erase(it) : std::next(it);
    return {{"peft_type", "LOOM"},
            {"loom_component", adapter.desc().name},
            {"loom_config", params},
            {"base_model_name_or_path", base_model.string()},
            {"inference_mode", true}};
  }
  const auto targets = table->json("target_modules");
  return {{"peft_type", "LORA"},
          {"task_type", "CAUSAL_LM"},
          {"base_model_name_or_path", base_model.string()},
          {"r", table->get_int("r").value_or(8)},
          {"lora_alpha", table->get_float("alpha").value_or(16.0)},
          {"lora_dropout", table->get_float("dropout").value_or(0.0)},
          {"use_rslora", table->get_bool("use_rslora").value_or(false)},
          {"target_modules", targets ? nlohmann::json::parse(*targets) : nlohmann::json::array()},
          {"bias", "none"},
          {"fan_in_fan_out", false},
          {"inference_mode", true},
          {"modules_to_save", nullptr}};
}

// config.json's initializer_range (transformers' default 0.02 when absent).
double initializer_range(const fs::path &model_dir) {
  std::ifstream in(model_dir / "config.json");
  try {
    const auto j = nlohmann::json::parse(in);
    if (j.contains("initializer_range") && j["initializer_range"].is_number()) return j["initializer_range"].get<double>();
  } catch (const nlohmann::json::exception &) {
  }
  return 0.02;
}

struct DataPosition {
  int64_t epoch = 0, position = 0;
};

// The checkpoint directory, written beside and renamed over, so an interrupted save leaves the
// previous one whole.
void save_checkpoint(const fs::path &out, const fs::path &source, const std::vector<TrainParam<float>> &params,
                     int64_t optimizer_steps, int64_t step, DataPosition data, uint64_t seed, const TrainSpec &t,
                     const nlohmann::json *adapter_config, const std::vector<std::vector<float>> &m,
                     const std::vector<std::vector<float>> &v) {
  const fs::path dir = out / "checkpoint", tmp = out / "checkpoint.tmp", old = out / "checkpoint.old";
  fs::remove_all(tmp);
  if (adapter_config) write_adapter_dir(tmp, params, *adapter_config);
  else write_model_dir(tmp, source, params);
  std::vector<TensorToWrite> moments;
  for (size_t i = 0; i < m.size(); ++i) {
    moments.push_back({params[i].name + ".exp_avg", SafetensorsDtype::F32, params[i].shape, bytes_of(m[i])});
    moments.push_back({params[i].name + ".exp_avg_sq", SafetensorsDtype::F32, params[i].shape, bytes_of(v[i])});
  }
  write_safetensors(tmp / "optimizer.safetensors", moments, {{"optimizer", "adamw"}});
  const nlohmann::json state = {{"step", step},          {"optimizer_steps", optimizer_steps},
                                {"epoch", data.epoch},   {"position", data.position},
                                {"seed", seed},          {"seq_len", t.seq_len},
                                {"batch_size", t.batch_size}, {"grad_accum", t.grad_accum},
                                {"data", t.data.string()}};
  std::ofstream(tmp / "trainer_state.json") << state.dump(2) << "\n";
  fs::remove_all(old);
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(tmp, dir);
  fs::remove_all(old);
}

// Reads a checkpoint's optimizer and data state into `opt`; returns (step, position). The
// manifest must describe the same data order (seed, sequence length, batch), else the resumed run
// would not continue the interrupted one.
std::pair<int64_t, DataPosition> load_checkpoint(const fs::path &dir, const std::string &source_name,
                                                 TrainingEngine &engine, uint64_t seed, const TrainSpec &t, bool adapter,
                                                 const TensorShards *shards) {
  std::ifstream in(dir / "trainer_state.json");
  if (!in) throw runtime_error(source_name + ": train.resume: " + (dir / "trainer_state.json").string() + " not found");
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception &e) {
    throw runtime_error((dir / "trainer_state.json").string() + ": " + e.what());
  }
  auto field = [&](const char *key) {
    if (!state.contains(key) || !state[key].is_number_integer())
      throw runtime_error((dir / "trainer_state.json").string() + ": \"" + std::string(key) + "\" missing or not an integer");
    return state[key].get<int64_t>();
  };
  auto same = [&](const char *key, int64_t want, const char *manifest_key) {
    if (field(key) != want)
      throw runtime_error(source_name + ": train.resume: the checkpoint was made with " + manifest_key + " = " +
                          std::to_string(field(key)) + ", the manifest says " + std::to_string(want) +
                          "; a resumed run must keep the data order");
  };
  same("seed", static_cast<int64_t>(seed), "loom.seed");
  same("seq_len", t.seq_len, "train.seq_len");
  same("batch_size", t.batch_size, "train.batch_size");
  same("grad_accum", t.grad_accum, "train.grad_accum");
  const SafetensorsFile file = SafetensorsFile::open(dir / "optimizer.safetensors");
  std::vector<std::vector<float>> m, v;
  for (const auto &p : engine.host_params()) {
    for (const char *suffix : {".exp_avg", ".exp_avg_sq"}) {
      // (Tensor parallel: the whole model's moments, cut like the parameter; pipeline stages
      // read their own parameters' only.)
      const SafetensorsTensor *st = file.find(p.name + suffix);
      const size_t whole = shards ? shards->whole_size(p.name, p.value.size()) : p.value.size();
      if (st == nullptr || st->dtype != SafetensorsDtype::F32 || st->numel != whole)
        throw runtime_error((dir / "optimizer.safetensors").string() + ": " + p.name + suffix +
                            " missing or not float32 of the parameter's shape");
      std::vector<float> values(whole);
      std::memcpy(values.data(), st->data, st->nbytes);
      if (shards) values = shards->slice(p.name, values);
      (std::strcmp(suffix, ".exp_avg") == 0 ? m : v).push_back(std::move(values));
    }
  }
  engine.restore_optimizer(field("optimizer_steps"), std::move(m), std::move(v));
  if (adapter) {  // the adapter's values (the base model came from [model] path)
    const fs::path adapter_file = dir / "adapter_model.safetensors";
    const SafetensorsFile weights = SafetensorsFile::open(adapter_file);
    std::vector<TrainParam<float>> values = engine.host_params();
    for (auto &p : values) {
      const SafetensorsTensor *st = weights.find(p.name);
      if (st == nullptr || st->dtype != SafetensorsDtype::F32 || st->numel != p.value.size())
        throw runtime_error(adapter_file.string() + ": " + p.name + " missing or not float32 of the parameter's shape");
      std::memcpy(p.value.data(), st->data, st->nbytes);
    }
    engine.restore_params(values);
  }
  return {field("step"), DataPosition{field("epoch"), field("position")}};
}

// The log's entries, in order (a line that is not a JSON object with an integer "step" is
// skipped: a line cut short by an interrupted run).
std::vector<nlohmann::json> read_log(const fs::path &log) {
  std::vector<nlohmann::json> entries;
  std::ifstream in(log);
  std::string line;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      if (j.is_object() && j.contains("step") && j["step"].is_number_integer()) entries.push_back(std::move(j));
    } catch (const nlohmann::json::exception &) {
    }
  }
  return entries;
}

// The log's entries up to `step` (a resumed run rewrites what the interrupted one logged later).
void truncate_log(const fs::path &log, int64_t step) {
  const auto entries = read_log(log);
  std::ofstream out(log, std::ios::trunc);
  for (const auto &j : entries)
    if (j["step"].get<int64_t>() <= step) out << j.dump() << "\n";
}

// gnuplot on the log's curves; returns the PNG's path, or empty when gnuplot is not installed.
fs::path plot_losses(const fs::path &out, const fs::path &log) {
  std::vector<std::pair<int64_t, double>> train, val;
  for (const auto &j : read_log(log)) {
    if (j.contains("loss")) train.emplace_back(j["step"].get<int64_t>(), j["loss"].get<double>());
    if (j.contains("val_loss")) val.emplace_back(j["step"].get<int64_t>(), j["val_loss"].get<double>());
  }
  const fs::path train_dat = out / "loss_train.dat", val_dat = out / "loss_val.dat", script = out / "loss.gp",
                 png = out / "loss.png";
  {
    std::ofstream t(train_dat), v(val_dat), g(script);
    for (auto [s, l] : train) t << s << " " << std::setprecision(9) << l << "\n";
    for (auto [s, l] : val) v << s << " " << std::setprecision(9) << l << "\n";
    g << "set terminal pngcairo size 960,540\nset output '" << png.string() << "'\n"
      << "set xlabel 'step'\nset ylabel 'loss (nats/token)'\nset grid\nset key top right\n"
      << "plot '" << train_dat.string() << "' using 1:2 with lines title 'train'";
    if (!val.empty()) g << ", '" << val_dat.string() << "' using 1:2 with linespoints pt 7 title 'validation'";
    g << "\n";
  }
  // No shell: gnuplot is found on PATH and given the script's path.
  std::string gnuplot = "gnuplot", arg = script.string();
  char *argv[] = {gnuplot.data(), arg.data(), nullptr};
  pid_t pid = 0;
  if (posix_spawnp(&pid, "gnuplot", nullptr, nullptr, argv, environ) != 0) return {};
  int status = 0;
  if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0 || !fs::exists(png)) return {};
  for (const auto &f : {train_dat, val_dat, script}) fs::remove(f);
  return png;
}

std::string duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  std::ostringstream o;
  if (s >= 3600) o << s / 3600 << "h";
  if (s >= 60) o << std::setw(s >= 3600 ? 2 : 1) << std::setfill('0') << (s / 60) % 60 << "m";
  o << std::setw(s >= 60 ? 2 : 1) << std::setfill('0') << s % 60 << "s";
  return o.str();
}

}  // namespace

TrainResult train(const Manifest &m, const TrainOptions &options) {
  const TrainSpec &t = m.train;
  if (!t.enabled) throw manifest_error(m.source_name + ": needs a [train] table");
  if (m.model_path.empty()) throw manifest_error(m.source_name + ": [train] needs a [model] path");
  const ModelConfig config = load_model_config(m.model_path);
  if (t.seq_len > config.max_positions)
    throw manifest_error(m.source_name + ": train.seq_len: " + std::to_string(t.seq_len) + " exceeds the model's " +
                         std::to_string(config.max_positions) + " positions");
  const auto tokenizer = Tokenizer::load(m.model_path);
  if (!tokenizer) throw runtime_error(m.source_name + ": [model] " + m.model_path.string() + " has no tokenizer to encode train.data");
  const ChatFamily chat = detect_chat_family(m.model_path);
  const uint64_t seed = m.seed;

  // Data.
  auto sequences = pack_sequences(load_token_stream(t.data, *tokenizer, config, chat), t.seq_len);
  TrainValSplit split;
  if (!t.validation_data.empty()) {
    split.train = std::move(sequences);
    split.validation = pack_sequences(load_token_stream(t.validation_data, *tokenizer, config, chat), t.seq_len);
  } else {
    split = split_sequences(std::move(sequences), t.validation_fraction, seed);
  }
  if (split.train.empty())
    throw runtime_error(t.data.string() + ": too little text for one training sequence of " + std::to_string(t.seq_len) + " tokens");

  // Model and optimizer, fresh or from the checkpoint, on the device the manifest names ("auto":
  // LOOM_DEVICE, else the GPU when there is one and no adapter, which trains on the CPU).
  const auto adapter_specs = m.of_kind(LOOM_KIND_ADAPTER);
  if (adapter_specs.size() > 1)
    throw manifest_error(m.source_name + ": [train] trains one adapter at a time; the manifest has " +
                         std::to_string(adapter_specs.size()));
  if (!adapter_specs.empty() && t.recompute)
    throw manifest_error(m.source_name + ": train.recompute: not with an adapter (its dropout would be drawn again)");
  const auto quantizer_specs = m.of_kind(LOOM_KIND_QUANTIZER);
  if (!quantizer_specs.empty() && adapter_specs.empty())
    throw manifest_error(m.source_name + ": [quantizer] in a training manifest: only an adapter trains over a quantized base "
                         "(QLoRA); full training keeps float weights");
  if (!adapter_specs.empty() && t.init == "random")
    throw manifest_error(m.source_name + ": train.init: \"random\" with an adapter would train it over a random base");
  // An adapter run loads the base from [model] path (its checkpoints hold the adapter only).
  const fs::path source = t.resume.empty() || !adapter_specs.empty() ? m.model_path : t.resume;
  const DLDevice device = resolve_manifest_device(m, adapter_specs.empty());
  if (t.precision == "bf16" && device.device_type != kDLCUDA)
    throw manifest_error(m.source_name + ": train.precision: \"bf16\" trains on CUDA only (the CPU trains in float32)");
  TrainEngineOptions eo;
  eo.adamw.lr = t.lr;
  eo.adamw.beta1 = t.beta1;
  eo.adamw.beta2 = t.beta2;
  eo.adamw.eps = t.eps;
  eo.adamw.weight_decay = t.weight_decay;
  eo.recompute = t.recompute;
  eo.threads = static_cast<int32_t>(m.threads);  // [loom] threads; the results do not depend on it
  eo.device = device.device_id;
  eo.bf16 = t.precision == "bf16";
  // Adapters and the parallel strategy are the pipeline's instances, built as the runtime builds
  // them (on the CPU; a parallel component meets the other ranks here).
  std::unique_ptr<Registry> registry;
  std::unique_ptr<Pipeline> pipeline;
  nlohmann::json adapter_config;
  std::shared_ptr<Instance> parallel;
  const bool plugin_attention = t.attention == "plugin";
  if (plugin_attention) {
    if (device.device_type != kDLCPU)
      throw manifest_error(m.source_name + ": train.attention: \"plugin\" trains on the CPU engine only ([loom] device = \"cpu\")");
    if (m.of_kind(LOOM_KIND_ATTENTION).empty())
      throw manifest_error(m.source_name + ": train.attention: \"plugin\" needs an [attention] component");
    if (!adapter_specs.empty())
      throw manifest_error(m.source_name + ": train.attention: \"plugin\" with an adapter is not supported yet");
  }
  if (!adapter_specs.empty() || !m.of_kind(LOOM_KIND_PARALLEL).empty() || plugin_attention) {
    registry = std::make_unique<Registry>(Registry::default_search_paths(m.plugin_paths));
    registry->scan();
    InstanceEnvironment env;
    env.device = {kDLCPU, 0};
    pipeline = std::make_unique<Pipeline>(*registry, env);
    pipeline->build(m);
    if (auto p = pipeline->list(LOOM_KIND_PARALLEL); !p.empty()) parallel = p.front();
  }
  if (!parallel) {
    // Launched as one of several ranks without a strategy, every process would train alone and
    // write the same files.
    for (const char *var : {"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"})
      if (const char *w = std::getenv(var); w != nullptr && std::string(w) != "1" && std::string(w) != "")
        throw manifest_error(m.source_name + ": launched as one of several ranks (" + var + "=" + w +
                             ") but the manifest has no [parallel] component; add [parallel] use = \"data\"");
  }
  if (parallel && device.device_type == kDLCUDA) {
    // Several ranks on one host: each on its own GPU (torchrun's and mpirun's LOCAL_RANK).
    const loom_parallel_topology topo = ParallelCalls(*parallel).topology();
    if (topo.world_size > 1) eo.device = topo.local_rank;
  }
  if (plugin_attention) eo.attention = pipeline->list(LOOM_KIND_ATTENTION).front();
  if (!adapter_specs.empty()) {
    eo.adapters = pipeline->list(LOOM_KIND_ADAPTER);
    if (!quantizer_specs.empty()) eo.quantizer = pipeline->list(LOOM_KIND_QUANTIZER).front();
    adapter_config = loom::adapter_config(*adapter_specs.front(), *eo.adapters.front(), m.model_path);
  }
  const nlohmann::json *adapter = adapter_specs.empty() ? nullptr : &adapter_config;
  const ModelWeights weights = t.resume.empty() && t.init == "random"
                                   ? random_initial_weights(config, seed, initializer_range(m.model_path))
                                   : ModelWeights::load(config, SafetensorsIndex::open_model_dir(source));
  // Tensor parallel: this rank trains its slices of the model (tensor_shards.hpp).
  std::unique_ptr<TensorShards> shards;
  std::unique_ptr<PipelineStages> stages;  // pipeline parallel: this rank's stage
  if (parallel) {
    shards = std::make_unique<TensorShards>(*parallel, config);
    if (shards->size() == 1) shards.reset();
    stages = std::make_unique<PipelineStages>(*parallel, config);
    if (stages->stages() == 1) stages.reset();
  }
  if (stages) {
    if (!adapter_specs.empty()) throw manifest_error(m.source_name + ": [parallel] pipeline parallel training of adapters is not supported yet");
    eo.pipeline = stages.get();
    eo.pipeline_micro_batch = t.pipeline_micro_batch;
    const int64_t data_ranks = std::max<int32_t>(1, ParallelCalls(*parallel).topology().data_size);
    if (t.batch_size % (data_ranks * t.pipeline_micro_batch) != 0)
      throw manifest_error(m.source_name + ": train.pipeline_micro_batch = " + std::to_string(t.pipeline_micro_batch) +
                           " does not divide each data rank's share of train.batch_size = " + std::to_string(t.batch_size) +
                           " (" + std::to_string(data_ranks) + " data rank(s))");
  }
  if (shards) {
    if (device.device_type == kDLCUDA) throw manifest_error(m.source_name + ": [parallel] tensor parallel training runs on the CPU engine so far");
    if (!adapter_specs.empty()) throw manifest_error(m.source_name + ": [parallel] tensor parallel training of adapters is not supported yet");
    eo.tensor = shards.get();
  }
  std::unique_ptr<TrainingEngine> engine =
      device.device_type == kDLCUDA ? make_cuda_training_engine(config, weights, eo)
      : shards                      ? make_cpu_training_engine(shards->local_config(), shards->local_weights(weights), eo)
                                    : make_cpu_training_engine(config, weights, eo);
  // Data parallel: this rank trains on its share of each batch; rank 0 alone writes.
  std::unique_ptr<DataParallel> dp = parallel ? std::make_unique<DataParallel>(*parallel, *engine) : nullptr;
  const bool writes = !dp || dp->writes();
  int64_t step = 0;
  DataPosition pos;
  fs::create_directories(t.out);
  const fs::path log_path = t.out / "train_log.jsonl";
  if (!t.resume.empty()) {
    std::tie(step, pos) = load_checkpoint(t.resume, m.source_name, *engine, seed, t, adapter != nullptr, shards.get());
    if (writes) truncate_log(log_path, step);
  } else if (writes) {
    std::ofstream(log_path, std::ios::trunc);
  }
  std::ofstream log;  // not open on the ranks that do not write: their lines go nowhere
  if (writes) log.open(log_path, std::ios::app);
  // Values per parameter of this rank's stage, as the whole model's (every stage takes part).
  const auto from_stages = [&](const std::vector<TrainParam<float>> &local, const std::vector<std::vector<float>> &values) {
    std::map<std::string, size_t> index;
    for (size_t i = 0; i < local.size(); ++i) index[local[i].name] = i;
    std::vector<std::vector<float>> out;
    for (const auto &[name, shape] : expected_weights(config)) {
      const int32_t owner = stages->owner(name);
      std::vector<float> v = owner == stages->stage() ? values.at(index.at(name))
                                                      : std::vector<float>(static_cast<size_t>(
                                                            std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>())));
      stages->broadcast(v, owner);
      out.push_back(std::move(v));
    }
    return out;
  };
  // The whole model's parameters (tensor parallel: gathered from the group; pipeline parallel:
  // from the stages; every rank takes part).
  const auto full_params = [&] {
    std::vector<TrainParam<float>> params = engine->host_params();
    if (stages) {
      std::vector<std::vector<float>> values;
      for (const auto &p : params) values.push_back(p.value);
      auto all = from_stages(params, values);
      std::vector<TrainParam<float>> full;
      size_t i = 0;
      for (const auto &[name, shape] : expected_weights(config)) full.push_back({name, shape, std::move(all[i++]), {}});
      return full;
    }
    if (!shards) return params;
    const auto shapes = expected_weights(config);
    for (auto &p : params) {
      p.value = shards->gather(p.name, p.value);
      p.shape = shapes.at(p.name);
    }
    return params;
  };
  const auto checkpoint = [&](int64_t at) {
    std::vector<std::vector<float>> moments, squares;
    if (dp) dp->gather_moments(moments, squares);  // every rank takes part
    else engine->host_moments(moments, squares);
    if (stages && !moments.empty()) {
      const auto &local = engine->host_params();
      moments = from_stages(local, moments);
      squares = from_stages(local, squares);
    }
    const auto params = full_params();
    if (shards)
      for (size_t i = 0; i < moments.size(); ++i) {
        moments[i] = shards->gather(params[i].name, moments[i]);
        squares[i] = shards->gather(params[i].name, squares[i]);
      }
    if (writes) save_checkpoint(t.out, m.model_path, params, engine->optimizer_steps(), at, pos, seed, t, adapter, moments, squares);
  };

  TrainResult result;
  result.train_sequences = static_cast<int64_t>(split.train.size());
  result.validation_sequences = static_cast<int64_t>(split.validation.size());
  result.device = engine->describe() + (shards ? ", tensor parallel x" + std::to_string(shards->size()) : "") +
                  (stages ? ", pipeline stage " + std::to_string(stages->stage()) + " of " + std::to_string(stages->stages()) : "") +
                  (dp && (dp->size() > 1 || (!shards && !stages)) ? ", " + dp->describe() : "");
  auto validation_loss = [&] {  // in micro-batches of batch_size sequences, shared among the data ranks
    double sum = 0;
    const std::span<const std::vector<int32_t>> all(split.validation);
    for (size_t i = 0; i < all.size(); i += static_cast<size_t>(t.batch_size)) {
      const auto chunk = all.subspan(i, std::min(all.size() - i, static_cast<size_t>(t.batch_size)));
      if (!dp) {
        sum += engine->run(chunk, false, 1.0);
        continue;
      }
      const auto mine = dp->share({chunk.begin(), chunk.end()});
      sum += engine->run(mine, false, 1.0);
    }
    return (dp ? dp->sum(sum) : sum) / static_cast<double>(split.validation.size());
  };
  double eval_seconds = 0;  // kept out of the training throughput
  auto evaluate = [&](int64_t at) {
    if (split.validation.empty()) return;
    const auto eval_start = Clock::now();
    const double v = validation_loss();
    eval_seconds += std::chrono::duration<double>(Clock::now() - eval_start).count();
    result.val_loss.emplace_back(at, v);
    log << nlohmann::json{{"step", at}, {"val_loss", v}, {"val_perplexity", std::exp(v)}}.dump() << std::endl;
  };

  std::vector<int64_t> order = epoch_order(static_cast<int64_t>(split.train.size()), seed, pos.epoch);
  const int64_t per_step = t.batch_size * t.grad_accum;
  std::vector<std::vector<int32_t>> batch;  // one micro-batch's sequences
  const double scale = 1.0 / static_cast<double>(per_step);
  const bool tty = isatty(2) != 0;
  const auto start = Clock::now();
  int64_t done_here = 0, tokens_here = 0;
  if (t.resume.empty()) evaluate(0);  // the starting point of the validation curve
  while (step < t.steps) {
    ++step;
    const double lr = learning_rate(t, step);
    engine->zero_grad();
    double loss = 0;
    TrainingEngine::StageTime stage_time;  // this step's, over its micro-batches
    for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
      batch.clear();
      for (int64_t i = 0; i < t.batch_size; ++i) {
        if (pos.position >= static_cast<int64_t>(order.size())) {
          ++pos.epoch;
          pos.position = 0;
          order = epoch_order(static_cast<int64_t>(split.train.size()), seed, pos.epoch);
        }
        batch.push_back(split.train[static_cast<size_t>(order[static_cast<size_t>(pos.position++)])]);
        tokens_here += static_cast<int64_t>(batch.back().size());
      }
      if (dp) loss += dp->run(dp->share(batch), scale, micro == t.grad_accum - 1) * scale;
      else loss += engine->run(batch, true, scale) * scale;
      stage_time.busy_s += engine->last_stage_time().busy_s;
      stage_time.wall_s += engine->last_stage_time().wall_s;
    }
    engine->reduce_stage_gradients();
    // Pipeline stages: the share of the step each stage spent waiting for its neighbours (the
    // bubble), averaged over the stages.
    double idle = 0;
    if (stages)
      idle = stages->sum(stage_time.wall_s > 0 ? 1.0 - stage_time.busy_s / stage_time.wall_s : 0.0) / stages->stages();
    if (dp) {
      dp->finish_gradients();
      loss = dp->sum(loss);
    }
    const double norm = engine->clip_grad_norm(t.grad_clip > 0 ? t.grad_clip : INFINITY);
    if (dp) dp->optimizer_step(lr);
    else engine->optimizer_step(lr);
    ++done_here;
    result.train_loss.emplace_back(step, loss);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double tok_s = static_cast<double>(tokens_here) / std::max(elapsed - eval_seconds, 1e-9);
    nlohmann::json record{{"step", step},       {"loss", loss},          {"lr", lr},
                          {"grad_norm", norm},  {"tokens", tokens_here}, {"tokens_per_s", tok_s},
                          {"elapsed_s", elapsed}};
    if (stages) record["pipeline_idle"] = idle;
    log << record.dump() << std::endl;
    if (writes && options.progress && (tty || step % std::max<int64_t>(1, t.steps / 20) == 0 || step == t.steps)) {
      const double eta = (elapsed - eval_seconds) / static_cast<double>(done_here) * static_cast<double>(t.steps - step);
      const int width = 24, filled = static_cast<int>(width * step / t.steps);
      std::ostringstream line;
      line << "step " << step << "/" << t.steps << " [" << std::string(static_cast<size_t>(filled), '#')
           << std::string(static_cast<size_t>(width - filled), '.') << "] loss " << std::fixed << std::setprecision(4) << loss
           << "  " << std::setprecision(0) << tok_s << " tok/s  ETA " << duration(eta);
      std::cerr << (tty ? "\r" : "") << line.str() << (tty ? "\033[K" : "\n") << std::flush;
    }
    if (t.eval_every > 0 && step % t.eval_every == 0) evaluate(step);
    if (t.save_every > 0 && step % t.save_every == 0) checkpoint(step);
    if (options.stop_after > 0 && done_here >= options.stop_after && step < t.steps) {
      checkpoint(step);
      if (writes && options.progress && tty) std::cerr << "\n";
      result.step = step;
      return result;
    }
  }
  if (writes && options.progress && tty) std::cerr << "\n";
  if (t.eval_every == 0 || step % t.eval_every != 0) evaluate(step);
  checkpoint(step);
  const auto final_params = adapter ? std::vector<TrainParam<float>>() : full_params();
  if (!writes) {  // rank 0 exports the model; this rank's replica is the same
    result.step = step;
    result.writer = false;
    return result;
  }
  if (adapter) {
    result.adapter_dir = t.out / "adapter";
    write_adapter_dir(result.adapter_dir, engine->host_params(), *adapter);
  } else {
    result.model_dir = t.out / "model";
    write_model_dir(result.model_dir, m.model_path, final_params, t.save_dtype == "bfloat16");
  }
  log.close();
  result.plot = plot_losses(t.out, log_path);
  result.step = step;
  return result;
}

}  // namespace loom
