// loom::Vocabulary: the model's tokens as the bytes each adds to a text, and its end-of-sequence
// ids, for plugins that reason about text (constrained decoding) through the host's vocabulary
// extension.
//
// VocabularySlot is made by the Runtime before the pipeline's instances exist and filled once
// the model's tokenizer is loaded; instances read it from their host context at call time.
// Ownership: a Vocabulary is immutable and shared; the bytes it hands out live as long as it
// does (the runtime's lifetime in practice). Thread-safety: the slot is guarded by a mutex;
// a Vocabulary is read-only after construction.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace loom {

class Tokenizer;

struct Vocabulary {
  std::vector<std::string> token_bytes; // by token id
  std::vector<int32_t> eos_ids;

  static std::shared_ptr<const Vocabulary> from(const Tokenizer &tokenizer, std::vector<int32_t> eos_ids);
};

// Built on first use: most pipelines never ask, and a 128k vocabulary takes a moment to map.
class VocabularySlot {
 public:
  void set_source(std::shared_ptr<const Tokenizer> tokenizer, std::vector<int32_t> eos_ids) {
    std::lock_guard lock(mutex_);
    tokenizer_ = std::move(tokenizer);
    eos_ids_ = std::move(eos_ids);
    vocabulary_.reset();
  }
  // Null while no model with a tokenizer is loaded.
  std::shared_ptr<const Vocabulary> get() const {
    std::lock_guard lock(mutex_);
    if (!vocabulary_ && tokenizer_) vocabulary_ = Vocabulary::from(*tokenizer_, eos_ids_);
    return vocabulary_;
  }

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  std::vector<int32_t> eos_ids_;
  mutable std::shared_ptr<const Vocabulary> vocabulary_;
};

} // namespace loom
