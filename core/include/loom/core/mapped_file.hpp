// loom::MappedFile: a read-only memory mapping of one whole file (POSIX mmap, MAP_PRIVATE).
//
// Ownership: the object owns the mapping and unmaps it in its destructor; it is move-only, and
// pointers into data() stay valid (moves do not move the mapping) until the owning object is
// destroyed. Share one mapping by holding it in a std::shared_ptr<const MappedFile>.
// An empty file maps fine: size() == 0 and data() == nullptr.
// The file must not change while it is mapped; model files are treated as immutable, as
// llama.cpp treats its mmapped GGUF files. What happens otherwise (the caveat of every mapped
// model file):
//  - truncated by anyone (another process, `> file`, a download tool rewriting it) while mapped:
//    the next read of a page past the new end raises SIGBUS and kills the process. Loom does not
//    catch it: a handler could not tell which read failed nor make the weights valid again.
//  - rewritten in place: MAP_PRIVATE only isolates pages the process itself writes (never, here);
//    on Linux, pages not yet read, or dropped from the page cache, show the new bytes, so a
//    running model silently computes with a mix of old and new weights.
//  - replaced by rename (write a new file, then rename it over the old path, as `cp` to a new
//    name + `mv`, git and most package managers do) or deleted: safe; the mapping keeps the old
//    inode and its data until it is unmapped.
// Consumers that keep a mapping for the life of a model (ModelWeights, the CPU backend's
// in-place weights) inherit this; the validation of the safetensors header is done once at open.
// Errors: open() throws loom::Error (runtime) with the one-line message "path: cause".
// Thread-safety: immutable after open(); const methods may run concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

namespace loom {

class MappedFile {
 public:
  // Maps the whole regular file at `path` read-only. Refuses directories and other non-regular
  // files.
  static MappedFile open(const std::filesystem::path &path);

  MappedFile() = default; // an empty mapping of no file
  ~MappedFile();
  MappedFile(MappedFile &&other) noexcept;
  MappedFile &operator=(MappedFile &&other) noexcept;
  MappedFile(const MappedFile &) = delete;
  MappedFile &operator=(const MappedFile &) = delete;

  const std::byte *data() const noexcept { return data_; }
  uint64_t size() const noexcept { return size_; }
  std::span<const std::byte> bytes() const noexcept { return {data_, static_cast<size_t>(size_)}; }
  const std::filesystem::path &path() const noexcept { return path_; }

 private:
  void release() noexcept;

  const std::byte *data_ = nullptr;
  uint64_t size_ = 0;
  std::filesystem::path path_;
};

} // namespace loom
