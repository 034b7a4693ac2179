// Sampler `logit-bias`: adds a fixed bias to the logits of chosen token ids (OpenAI's
// logit_bias), and bans tokens outright.
//   bias = [{ token = 13, value = -2.5 }, { token = 42, value = 1.0 }]   logit[token] += value
//   ban  = [7, 9]                                                        logit[token] = -inf
// A value of -inf (TOML `-inf`) bans the token too; NaN and +inf are refused. A token listed
// twice in `bias` is refused (the intent is ambiguous). Ids must be >= 0 at create() and below
// the vocabulary size at apply() (the vocabulary is not known before).
#include <algorithm>
#include <cmath>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

struct LogitBias : Base {
  std::vector<std::pair<int32_t, float>> entries;  // bans are stored with value -inf
  int64_t max_token = -1;

  LogitBias(const loom_host_api* h, loom_host_ctx* c) : Base(h, c) {
    std::unordered_set<int32_t> seen;
    const auto check_id = [](int64_t id, const std::string& where) {
      if (id < 0 || id > INT32_MAX)
        invalid_param(where, "logit-bias: " + where + " must be a token id >= 0, got " + std::to_string(id));
      return static_cast<int32_t>(id);
    };
    uint32_t n = 0;
    check_cfg(h->config_get_array_size(c, "bias", &n), "bias", "array");
    for (uint32_t i = 0; i < n; ++i) {
      const std::string e = "bias[" + std::to_string(i) + "]";
      if (h->config_type(c, e.c_str()) != LOOM_VALUE_TABLE)
        invalid_param(e, "logit-bias: " + e + " must be a table { token = <id>, value = <bias> }");
      const std::string tk = e + ".token", vk = e + ".value";
      const loom_value_type tt = h->config_type(c, tk.c_str()), vt = h->config_type(c, vk.c_str());
      // A missing member is reported at its table, a wrong one at itself.
      if (tt != LOOM_VALUE_INT)
        invalid_param(tt == LOOM_VALUE_NONE ? e : tk,
                      "logit-bias: " + tk + (tt == LOOM_VALUE_NONE ? " is missing" : " must be an integer"));
      if (vt != LOOM_VALUE_FLOAT && vt != LOOM_VALUE_INT)
        invalid_param(vt == LOOM_VALUE_NONE ? e : vk,
                      "logit-bias: " + vk + (vt == LOOM_VALUE_NONE ? " is missing" : " must be a number"));
      const int32_t tok = check_id(cfg_int(h, c, tk.c_str()), tk);
      const double v = cfg_float(h, c, vk.c_str());
      if (std::isnan(v) || v == INFINITY)
        invalid_param(vk, "logit-bias: " + vk + " must be a finite number or -inf (ban), got " + std::to_string(v));
      if (!seen.insert(tok).second)
        invalid_param(tk, "logit-bias: " + tk + ": token " + std::to_string(tok) + " is listed more than once");
      entries.emplace_back(tok, static_cast<float>(v));
    }
    check_cfg(h->config_get_array_size(c, "ban", &n), "ban", "array");
    for (uint32_t i = 0; i < n; ++i) {
      const std::string e = "ban[" + std::to_string(i) + "]";
      if (h->config_type(c, e.c_str()) != LOOM_VALUE_INT)
        invalid_param(e, "logit-bias: " + e + " must be an integer token id");
      entries.emplace_back(check_id(cfg_int(h, c, e.c_str()), e), -INFINITY);
    }
    for (const auto& [tok, v] : entries) max_token = std::max<int64_t>(max_token, tok);
  }

  void apply(const loom_sampling_batch& b) {
    const Rows rows = cpu_rows(&b, "logit-bias");
    if (rows.n > 0 && max_token >= rows.vocab) {
      std::string m = "logit-bias: token id " + std::to_string(max_token);
      m += " in bias/ban is outside the vocabulary (vocab_size " + std::to_string(rows.vocab) + ")";
      invalid(m);
    }
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      for (const auto& [tok, v] : entries) x[tok] = v == -INFINITY ? -INFINITY : x[tok] + v;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<LogitBias>(0);
constexpr loom_param_desc kParams[] = {
    param("bias", LOOM_VALUE_ARRAY, "[]",
          "array of { token = <id>, value = <float> } tables: value is added to logit[token] (-inf bans)"),
    param("ban", LOOM_VALUE_ARRAY, "[]", "array of token ids whose logits are set to -inf"),
};

}  // namespace

const loom_component_desc logit_bias_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "logit-bias", "1.0.0",
    "Adds a fixed bias to the logits of listed token ids and bans others", kParams, 2,
    LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
