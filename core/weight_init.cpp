// random_initial_weights (weight_init.hpp).
#include "weight_init.hpp"

#include <cmath>
#include <numbers>
#include <string>

namespace loom {

namespace {

class Normal {
 public:
  explicit Normal(uint64_t seed) : state_(seed) {}
  double next() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    // Two uniforms in (0, 1], the first never 0 so that its log is finite.
    const double u1 = (static_cast<double>(bits() >> 11) + 1.0) * 0x1.0p-53;
    const double u2 = static_cast<double>(bits() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1)), a = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(a);
    have_spare_ = true;
    return r * std::cos(a);
  }

 private:
  uint64_t bits() {  // splitmix64
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t state_;
  double spare_ = 0;
  bool have_spare_ = false;
};

bool ends_with(const std::string &s, const std::string &suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

ModelWeights random_initial_weights(const ModelConfig &config, uint64_t seed, double std) {
  Normal normal(seed);
  std::map<std::string, HostWeight, std::less<>> weights;
  const bool gpt2 = config.architecture == Architecture::gpt2;
  for (const auto &[name, shape] : expected_weights(config)) {  // in name order: the same draws every time
    HostWeight w;
    w.shape = shape;
    size_t n = 1;
    for (const int64_t d : shape) n *= static_cast<size_t>(d);
    if (ends_with(name, ".bias")) {
      w.values.assign(n, 0.0f);
    } else if (shape.size() == 1) {  // the norms' weights
      w.values.assign(n, 1.0f);
    } else {
      const double s = gpt2 && ends_with(name, "c_proj.weight") ? std / std::sqrt(2.0 * static_cast<double>(config.n_layers)) : std;
      w.values.resize(n);
      for (float &v : w.values) v = static_cast<float>(normal.next() * s);
    }
    weights.emplace(name, std::move(w));
  }
  return ModelWeights::from_map(std::move(weights));
}

}  // namespace loom
