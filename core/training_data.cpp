#include "training_data.hpp"

#include <algorithm>
#include <fstream>
#include <numeric>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "json_guard.hpp"
#include "loom/core/error.hpp"

namespace loom {

namespace {

// std::mt19937_64's shuffle through our own Fisher-Yates: std::shuffle's use of the engine is
// left to the library, and a checkpoint must resume the same order on any standard library.
template <class V>
void seeded_shuffle(V &items, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = items.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng() % i);
    std::swap(items[i - 1], items[j]);
  }
}

std::string where(const std::filesystem::path &path, size_t line) { return path.string() + ":" + std::to_string(line); }

}  // namespace

std::vector<int32_t> load_token_stream(const std::filesystem::path &path, const Tokenizer &tokenizer,
                                       const ModelConfig &config, ChatFamily chat_family) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw runtime_error(path.string() + ": cannot open the training data");
  const bool jsonl = path.extension() == ".jsonl";
  const int32_t eos = config.eos_token_ids.empty() ? -1 : config.eos_token_ids.front();
  std::vector<int32_t> stream;
  std::string line;
  size_t number = 0, documents = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    std::vector<int32_t> ids;
    if (jsonl) {
      if (detail::json_too_deep(line, 64)) throw runtime_error(where(path, number) + ": JSON nested deeper than 64 levels");
      nlohmann::json doc;
      try {
        doc = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception &e) {
        throw runtime_error(where(path, number) + ": not JSON: " + e.what());
      }
      if (!doc.is_object()) throw runtime_error(where(path, number) + ": expected an object with \"text\" or \"messages\"");
      if (doc.contains("text")) {
        if (!doc["text"].is_string()) throw runtime_error(where(path, number) + ": \"text\" must be a string");
        ids = tokenizer.encode(doc["text"].get<std::string>(), true);
      } else if (doc.contains("messages")) {
        const auto &ms = doc["messages"];
        if (!ms.is_array() || ms.empty()) throw runtime_error(where(path, number) + ": \"messages\" must be a non-empty array");
        std::vector<ChatMessage> messages;
        for (size_t i = 0; i < ms.size(); ++i) {
          const auto &m = ms[i];
          if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
              !m["content"].is_string())
            throw runtime_error(where(path, number) + ": messages[" + std::to_string(i) +
                                "] must be an object with string \"role\" and \"content\"");
          messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
        }
        try {
          ids = encode_chat(tokenizer, render_chat(chat_family, messages, false));
        } catch (const Error &e) {
          throw runtime_error(where(path, number) + ": " + e.what());
        }
      } else {
        throw runtime_error(where(path, number) + ": expected an object with \"text\" or \"messages\"");
      }
    } else {
      ids = tokenizer.encode(line, true);
    }
    if (ids.empty()) continue;
    stream.insert(stream.end(), ids.begin(), ids.end());
    if (eos >= 0) stream.push_back(eos);
    ++documents;
  }
  if (documents == 0) throw runtime_error(path.string() + ": no documents (empty lines only)");
  for (int32_t id : stream)
    if (id < 0 || id >= config.vocab_size)
      throw runtime_error(path.string() + ": token id " + std::to_string(id) + " is outside the model's vocabulary of " +
                          std::to_string(config.vocab_size));
  return stream;
}

std::vector<std::vector<int32_t>> pack_sequences(const std::vector<int32_t> &stream, int64_t seq_len) {
  std::vector<std::vector<int32_t>> out;
  const auto n = static_cast<int64_t>(stream.size());
  for (int64_t start = 0; start + seq_len <= n; start += seq_len)
    out.emplace_back(stream.begin() + start, stream.begin() + start + seq_len);
  return out;
}

TrainValSplit split_sequences(std::vector<std::vector<int32_t>> sequences, double fraction, uint64_t seed) {
  seeded_shuffle(sequences, seed);
  size_t held = static_cast<size_t>(static_cast<double>(sequences.size()) * fraction);
  if (fraction > 0 && held == 0 && sequences.size() >= 2) held = 1;
  TrainValSplit split;
  split.validation.assign(std::make_move_iterator(sequences.end() - static_cast<std::ptrdiff_t>(held)),
                          std::make_move_iterator(sequences.end()));
  sequences.resize(sequences.size() - held);
  split.train = std::move(sequences);
  return split;
}

std::vector<int64_t> epoch_order(int64_t count, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), int64_t{0});
  seeded_shuffle(order, seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch) + 1);
  return order;
}

}  // namespace loom
