// loom::Tokenizer: text <-> token ids for a model directory.
//
// sentencepiece models (tokenizer.model) through libsentencepiece, and Hugging Face
// tokenizer.json byte-level BPE (GPT-2, Llama 3 family; see core/bpe_tokenizer.hpp for what is
// supported and what is refused). tokenizer.model wins when a directory has both.
// Thread-safety: encode/decode are const and may run concurrently. Errors: loom::Error (runtime)
// naming the file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids of `text`; with `add_bos`, the special tokens the tokenizer adds to a single
  // sequence (sentencepiece: its BOS; tokenizer.json: the post-processor's template, such as
  // Llama 3's "<|begin_of_text|> $A"), as transformers' tokenizer(text) does.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;
  // Text of `ids`. sentencepiece control tokens (BOS, EOS) produce no text; byte-level BPE writes
  // added tokens' content, as transformers' decode(skip_special_tokens=False) does.
  virtual std::string decode(const std::vector<int32_t> &ids) const = 0;
  virtual int32_t vocab_size() const = 0;
  // The bytes token `id` adds to a text it continues (constrained decoding matches grammars
  // against them): sentencepiece pieces with U+2581 as a space and byte pieces as their byte,
  // control tokens as nothing; byte-level BPE tokens mapped back to bytes, added tokens as their
  // content unless marked special (then nothing). May be a part of a UTF-8 character. Empty for
  // an id outside the vocabulary.
  virtual std::string token_bytes(int32_t id) const = 0;
  // The id of a whole token given by its text ("<|eot_id|>", "</s>"), nullopt when the
  // tokenizer has no such token.
  virtual std::optional<int32_t> token_id(std::string_view token) const = 0;

  // The tokenizer of a Hugging Face model directory, or nullptr when it has none.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path &model_dir);
};

} // namespace loom
