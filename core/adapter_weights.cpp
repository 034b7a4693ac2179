// load_adapter_weights (adapter_weights.hpp).
#include "adapter_weights.hpp"

#include <cmath>
#include <cstring>
#include <span>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "json_guard.hpp"
#include "loom/core/component_table.hpp"
#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/loom_plugin_api.h"
#include "loom/core/model_weights.hpp"

namespace loom {

namespace {

namespace fs = std::filesystem;

// adapter_config.json as a JSON object; nullopt when the directory has none (it is optional, as
// PEFT's: the tensors' names and shapes still have to fit the attached sites).
std::optional<nlohmann::json> read_adapter_config(const fs::path &file) {
  std::ifstream in(file);
  if (!in) return std::nullopt;
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (detail::json_too_deep(text, 64)) throw runtime_error(file.string() + ": nested too deeply");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception &e) {
    throw runtime_error(file.string() + ": " + e.what());
  }
  if (!j.is_object()) throw runtime_error(file.string() + ": not a JSON object");
  return j;
}

// adapter_config.json against the component's resolved table (LoRA's keys).
void check_lora_config(const Instance &adapter, const fs::path &file, const nlohmann::json &j) {
  const auto &table = *adapter.ctx()->config;
  const std::string where = adapter.slot() + " (" + adapter.desc().name + ")";
  auto mismatch = [&](const char *key, const std::string &theirs, const std::string &ours, const char *param) {
    throw runtime_error(file.string() + ": \"" + key + "\" is " + theirs + ", but " + where + " has " + param + " = " + ours);
  };
  if (j.contains("peft_type") && j["peft_type"] != "LORA")
    throw runtime_error(file.string() + ": \"peft_type\" is " + j["peft_type"].dump() + "; " + where + " loads LORA adapters");
  if (j.contains("r") && j["r"].is_number_integer() && j["r"].get<int64_t>() != table.get_int("r").value_or(8))
    mismatch("r", j["r"].dump(), std::to_string(table.get_int("r").value_or(8)), "r");
  if (j.contains("lora_alpha") && j["lora_alpha"].is_number() &&
      std::fabs(j["lora_alpha"].get<double>() - table.get_float("alpha").value_or(16.0)) > 1e-6)
    mismatch("lora_alpha", j["lora_alpha"].dump(), std::to_string(table.get_float("alpha").value_or(16.0)), "alpha");
  if (j.contains("use_rslora") && j["use_rslora"].is_boolean() &&
      j["use_rslora"].get<bool>() != table.get_bool("use_rslora").value_or(false))
    mismatch("use_rslora", j["use_rslora"].dump(), table.get_bool("use_rslora").value_or(false) ? "true" : "false",
             "use_rslora");
  if (j.contains("target_modules") && j["target_modules"].is_array()) {
    std::set<std::string> theirs, ours;
    for (const auto &m : j["target_modules"])
      if (m.is_string()) theirs.insert(m.get<std::string>());
    if (const auto ours_json = table.json("target_modules"))
      for (const auto &m : nlohmann::json::parse(*ours_json))
        if (m.is_string()) ours.insert(m.get<std::string>());
    if (theirs != ours)
      mismatch("target_modules", j["target_modules"].dump(), table.json("target_modules").value_or("[]"), "target_modules");
  }
}

// Loom's adapter_config.json of a non-LoRA component (peft_type "LOOM"): its component name and
// resolved table must be the instance's.
void check_loom_config(const Instance &adapter, const fs::path &file, const nlohmann::json &j) {
  const std::string where = adapter.slot() + " (" + adapter.desc().name + ")";
  if (j.value("peft_type", "") != "LOOM")
    throw runtime_error(file.string() + ": not an adapter_config.json of a Loom " + adapter.desc().name + " adapter (peft_type \"LOOM\")");
  if (j.value("loom_component", "") != adapter.desc().name)
    throw runtime_error(file.string() + ": \"loom_component\" is " + j["loom_component"].dump() + ", but " + where + " is " +
                        adapter.desc().name);
  const auto resolved = adapter.ctx()->config->resolve(adapter.desc(), adapter.slot());
  const auto ours = nlohmann::json::parse(resolved->json("").value_or("{}"));
  const auto &theirs = j.contains("loom_config") ? j["loom_config"] : nlohmann::json::object();
  for (const auto &[key, value] : ours.items()) {
    if (key == "seed" || ComponentTable::is_reserved_key(key)) continue;  // (seed: the initialisation's)
    if (!theirs.contains(key) || theirs[key] != value)
      throw runtime_error(file.string() + ": \"loom_config\"." + key + " is " + (theirs.contains(key) ? theirs[key].dump() : "absent") +
                          ", but " + where + " has " + key + " = " + value.dump());
  }
}

}  // namespace

void load_adapter_weights(Instance &adapter) {
  const fs::path dir = adapter.ctx()->weights;
  if (dir.empty()) return;
  const fs::path config = dir / "adapter_config.json";
  if (const auto j = read_adapter_config(config)) {
    if (std::string(adapter.desc().name) == "lora") check_lora_config(adapter, config, *j);
    else check_loom_config(adapter, config, *j);
  }
  const fs::path file = dir / "adapter_model.safetensors";
  const SafetensorsFile st = SafetensorsFile::open(file);
  const auto *vt = adapter.vtable<loom_adapter_vtable>();
  // How many parameters the attached sites hold: the file must give every one.
  size_t expected = 0;
  loom_tensor_sink counter{sizeof(loom_tensor_sink), &expected, [](void *user, const char *, DLTensor *, DLTensor *) -> loom_status {
                             ++*static_cast<size_t *>(user);
                             return LOOM_OK;
                           }};
  adapter.check(vt->parameters(adapter.handle(), &counter), "parameters");
  std::vector<std::string> names;
  std::vector<std::vector<float>> values;
  std::vector<std::vector<int64_t>> shapes;
  for (const SafetensorsTensor &t : st.tensors()) {
    try {
      values.push_back(tensor_as_float(t.dtype, std::span<const std::byte>(static_cast<const std::byte *>(t.data), t.nbytes)));
    } catch (const Error &e) {
      throw runtime_error(file.string() + ": " + t.name + ": " + e.what());
    }
    names.push_back(t.name);
    shapes.push_back(t.shape);
  }
  if (names.size() != expected)
    throw runtime_error(file.string() + ": " + std::to_string(names.size()) + " tensors for " + std::to_string(expected) +
                        " parameters of " + adapter.slot() + "'s attached modules");
  std::vector<DLTensor> tensors(names.size());
  std::vector<loom_named_tensor> named(names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    tensors[i] = DLTensor{};
    tensors[i].data = values[i].data();
    tensors[i].device = {kDLCPU, 0};
    tensors[i].ndim = static_cast<int32_t>(shapes[i].size());
    tensors[i].dtype = {kDLFloat, 32, 1};
    tensors[i].shape = shapes[i].data();
    named[i] = loom_named_tensor{sizeof(loom_named_tensor), names[i].c_str(), &tensors[i]};
  }
  const loom_status status = vt->load(adapter.handle(), named.data(), static_cast<uint32_t>(named.size()));
  if (status != LOOM_OK) {
    const std::string why = adapter.last_error();
    throw runtime_error(file.string() + ": " + adapter.slot() + " (" + adapter.desc().name + ") refused it: " +
                        (why.empty() ? status_name(status) : why));
  }
}

}  // namespace loom
