// Hugging Face tokenizer.json byte-level BPE tokenizers (the GPT-2 / Llama 3 / Qwen2 family)
// behind loom::Tokenizer. Private to core; Tokenizer::load builds one for a tokenizer.json.
//
// Supported (everything else is refused at load with "<path>: <key>: cause"):
// - model: type "BPE"; vocab; merges as "a b" strings or ["a", "b"] pairs (rank = index);
//   ignore_merges (true: a pre-token that is itself in the vocab maps straight to its id);
//   unk_token / fuse_unk; dropout null, byte_fallback false, continuing_subword_prefix and
//   end_of_word_suffix null or "".
// - added_tokens: the text is split on their contents first (leftmost, longest; tokens with
//   normalized=false first, then the rest, as `tokenizers` does); lstrip, rstrip and
//   single_word must be false.
// - normalizer: null, NFC (through utf8proc: canonical decomposition then composition), or a
//   Sequence of those; applied to the text between added tokens with normalized=false, before
//   the other added tokens are matched, as `tokenizers` does. Other types are refused by name.
// - pre_tokenizer: ByteLevel {add_prefix_space, use_regex (GPT-2's pattern)}, Split {pattern
//   Regex (PCRE2, UTF + UCP, bounded match work) or String, behavior "Isolated", invert false},
//   or a Sequence of those; a ByteLevel step is required.
// - decoder: ByteLevel only. post_processor: ByteLevel (no effect on ids), TemplateProcessing
//   (its single template, applied by encode when add_bos), or a Sequence of those.
// decode(ids) gives the text of every known id, added (special) tokens included -- what
// `tokenizers` gives with skip_special_tokens=False; unknown ids produce nothing. Invalid UTF-8
// in the decoded bytes becomes U+FFFD, one per maximal invalid subpart (as Rust's
// from_utf8_lossy). encode() refuses text that is not valid UTF-8.
// Thread-safety: immutable after construction; encode/decode may run concurrently.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <memory>

#include "loom/core/tokenizer.hpp"

namespace loom {

// Throws loom::Error (runtime) naming `file` and the offending key.
std::unique_ptr<Tokenizer> make_bpe_tokenizer(const std::filesystem::path &file);
// The same from tokenizer.json text in memory (`name` stands for the path in errors); the fuzzer's entry.
std::unique_ptr<Tokenizer> make_bpe_tokenizer_from_json(std::string_view json_text, const std::string &name);

} // namespace loom
