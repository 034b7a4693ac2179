#include "loom/core/metrics.hpp"

#include <algorithm>

namespace loom {

void Metrics::count(const std::string &name, double delta) {
  std::lock_guard lock(mutex_);
  auto &m = values_[name];
  m.type = MetricValue::Type::counter;
  m.value += delta;
}

void Metrics::gauge(const std::string &name, double value) {
  std::lock_guard lock(mutex_);
  auto &m = values_[name];
  m.type = MetricValue::Type::gauge;
  m.value = value;
}

void Metrics::observe(const std::string &name, double value) {
  std::lock_guard lock(mutex_);
  auto &m = values_[name];
  m.type = MetricValue::Type::histogram;
  m.min = m.count == 0 ? value : std::min(m.min, value);
  m.max = m.count == 0 ? value : std::max(m.max, value);
  m.sum += value;
  ++m.count;
}

std::map<std::string, MetricValue> Metrics::snapshot() const {
  std::lock_guard lock(mutex_);
  return values_;
}

} // namespace loom
