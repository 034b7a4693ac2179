// loom::HostBuffer: the host side of the ABI's opaque loom_buffer, a growable byte string that
// plugins fill through loom_host_api.buffer_append.
// Ownership: the HostBuffer owns its bytes; abi() hands plugins a borrowed pointer valid while
// the HostBuffer lives. Thread-safety: not synchronised; one writer at a time.
#pragma once

#include <string>
#include <string_view>

#include "loom/abi.h"

struct loom_buffer {
  std::string bytes;
};

namespace loom {

class HostBuffer {
 public:
  loom_buffer *abi() noexcept { return &buffer_; }
  std::string_view view() const noexcept { return buffer_.bytes; }
  std::string take() noexcept { return std::move(buffer_.bytes); }
  void clear() noexcept { buffer_.bytes.clear(); }

 private:
  loom_buffer buffer_;
};

} // namespace loom
