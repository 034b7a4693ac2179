// Private to core: training text into packed token sequences ([Training] item 3).
//
// A data file is either JSON Lines (".jsonl": one object a line with "text", a string, or
// "messages", an array of {"role", "content"} rendered with the model's chat template) or plain
// text (one document a line, empty lines skipped). Each document is encoded with the tokenizer's
// BOS and ended with the model's first end-of-sequence id; the documents are concatenated and cut
// into sequences of seq_len tokens (a shorter tail is dropped), as GPT-style pretraining packs.
// Errors: loom::Error naming the file and line. Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "loom/core/chat_template.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/tokenizer.hpp"

namespace loom {

// The token stream of a data file: its documents encoded and concatenated.
std::vector<int32_t> load_token_stream(const std::filesystem::path &path, const Tokenizer &tokenizer,
                                       const ModelConfig &config, ChatFamily chat_family);

// The stream cut into sequences of seq_len tokens.
std::vector<std::vector<int32_t>> pack_sequences(const std::vector<int32_t> &stream, int64_t seq_len);

struct TrainValSplit {
  std::vector<std::vector<int32_t>> train, validation;
};
// A seeded shuffle of the sequences, then the last `fraction` of them (at least one when the
// fraction is positive and there are two or more) held out for validation.
TrainValSplit split_sequences(std::vector<std::vector<int32_t>> sequences, double fraction, uint64_t seed);

// The order in which epoch `epoch` visits `count` training sequences: a permutation seeded by
// (seed, epoch), so that a resumed run visits the same sequences as an uninterrupted one.
std::vector<int64_t> epoch_order(int64_t count, uint64_t seed, int64_t epoch);

}  // namespace loom
