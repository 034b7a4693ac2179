// loom::Metrics: counters, gauges and histograms that plugins and the core report.
// Names are "kind.slot.name" ("sampler.sampler[0].masked_tokens").
// Thread-safety: every method may be called from any thread.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace loom {

struct MetricValue {
  enum class Type { counter, gauge, histogram } type = Type::counter;
  double value = 0;                 // counter total or last gauge value
  uint64_t count = 0;               // histogram observations
  double sum = 0, min = 0, max = 0; // histogram summary
};

class Metrics {
 public:
  void count(const std::string &name, double delta);
  void gauge(const std::string &name, double value);
  void observe(const std::string &name, double value);
  std::map<std::string, MetricValue> snapshot() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, MetricValue> values_;
};

} // namespace loom
