// Prometheus text exposition (version 0.0.4) for the server's /metrics: histograms with fixed
// buckets, and a writer that emits HELP/TYPE lines once per metric family.
// Thread-safety: Histogram is internally locked; TextWriter is used by one thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace loom::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size(), 0) {}
  void observe(double v) {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < bounds_.size(); ++i)
      if (v <= bounds_[i]) ++counts_[i];
    ++count_;
    sum_ += v;
  }
  // Appends `name`_bucket{le=...} (cumulative), _sum and _count lines.
  void write(std::string &out, const std::string &name) const {
    std::lock_guard lock(mutex_);
    char line[256];
    for (size_t i = 0; i < bounds_.size(); ++i) {
      std::snprintf(line, sizeof line, "%s_bucket{le=\"%g\"} %llu\n", name.c_str(), bounds_[i],
                    static_cast<unsigned long long>(counts_[i]));
      out += line;
    }
    std::snprintf(line, sizeof line, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name.c_str(),
                  static_cast<unsigned long long>(count_), name.c_str(), sum_, name.c_str(),
                  static_cast<unsigned long long>(count_));
    out += line;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_; // observations <= bounds_[i] (cumulative as Prometheus wants)
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Latency buckets from 1 ms to 60 s.
inline std::vector<double> latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

class TextWriter {
 public:
  void family(const std::string &name, const char *type, const char *help) {
    if (!seen_.insert(name).second) return;
    out_ += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  }
  void sample(const std::string &name, const std::string &labels, double value) {
    char v[64];
    std::snprintf(v, sizeof v, "%.17g", std::isfinite(value) ? value : 0.0);
    out_ += name + (labels.empty() ? "" : "{" + labels + "}") + " " + v + "\n";
  }
  void metric(const std::string &name, const char *type, const char *help, double value) {
    family(name, type, help);
    sample(name, "", value);
  }
  void histogram(const std::string &name, const char *help, const Histogram &h) {
    family(name, "histogram", help);
    h.write(out_, name);
  }
  std::string &text() { return out_; }

 private:
  std::set<std::string> seen_;
  std::string out_;
};

// A metric name from a runtime metric's ("sampler.sampler[0].masked_tokens"): characters
// outside [a-zA-Z0-9_] become '_'.
inline std::string metric_name(const std::string &raw) {
  std::string out = "loom_runtime_";
  for (char c : raw) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '_') ? c : '_';
  return out;
}

} // namespace loom::server
