// Header-only CUDA helpers shared by the builtin CUDA plugins (compiled into each plugin; they
// include nothing of Loom but the plugin API helpers).
//
// check_cuda turns a failed CUDA runtime call into the plugin's error (LOOM_ERR_DEVICE, with the
// component's prefix); DeviceGuard makes the configured GPU current for one plugin call and
// restores the caller's device afterwards, so a plugin never leaves the host thread's CUDA state
// changed. Thread-safety: the device is per host thread; a guard lives on one thread's stack.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "loom_plugin_util.hpp"

namespace loomp {

inline void check_cuda(cudaError_t e, const char* component, const std::string& what) {
  if (e != cudaSuccess) fail(LOOM_ERR_DEVICE, std::string(component) + ": " + what + ": " + cudaGetErrorString(e));
}

class DeviceGuard {
 public:
  DeviceGuard(int device, const char* component) {
    check_cuda(cudaGetDevice(&previous_), component, "cudaGetDevice");
    if (previous_ == device) {
      previous_ = -1;
      return;
    }
    check_cuda(cudaSetDevice(device), component, "cudaSetDevice(" + std::to_string(device) + ")");
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace loomp
