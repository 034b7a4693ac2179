#include "loom/core/vocabulary.hpp"

#include "loom/core/tokenizer.hpp"

namespace loom {

std::shared_ptr<const Vocabulary> Vocabulary::from(const Tokenizer &tokenizer, std::vector<int32_t> eos_ids) {
  auto v = std::make_shared<Vocabulary>();
  v->token_bytes.resize(static_cast<size_t>(tokenizer.vocab_size()));
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) v->token_bytes[static_cast<size_t>(id)] = tokenizer.token_bytes(id);
  v->eos_ids = std::move(eos_ids);
  return v;
}

} // namespace loom
