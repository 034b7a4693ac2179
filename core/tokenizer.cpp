#include "loom/core/tokenizer.hpp"

#include <sentencepiece_processor.h>

#include "bpe_tokenizer.hpp"
#include "loom/core/error.hpp"

namespace loom {

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::filesystem::path &file) {
    auto status = processor_.Load(file.string());
    if (!status.ok()) throw runtime_error(file.string() + ": not a sentencepiece model: " + status.ToString());
  }

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override {
    std::vector<int> ids;
    auto status = processor_.Encode(text, &ids);
    if (!status.ok()) throw runtime_error("sentencepiece: cannot encode: " + status.ToString());
    std::vector<int32_t> out;
    if (add_bos && processor_.bos_id() >= 0) out.push_back(processor_.bos_id());
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
  }

  std::string decode(const std::vector<int32_t> &ids) const override {
    std::vector<int> in;
    for (int32_t id : ids)
      if (id >= 0 && id < processor_.GetPieceSize()) in.push_back(id);
    std::string text;
    auto status = processor_.Decode(in, &text);
    if (!status.ok()) throw runtime_error("sentencepiece: cannot decode: " + status.ToString());
    return text;
  }

  int32_t vocab_size() const override { return processor_.GetPieceSize(); }

  std::string token_bytes(int32_t id) const override {
    if (id < 0 || id >= processor_.GetPieceSize() || processor_.IsControl(id) || processor_.IsUnknown(id)) return {};
    const std::string &piece = processor_.IdToPiece(id);
    if (processor_.IsByte(id) && piece.size() == 6) // "<0xAB>"
      return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
    std::string out;
    static const std::string kSpace = "\xe2\x96\x81"; // U+2581, sentencepiece's word boundary
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, kSpace.size(), kSpace) == 0) {
        out += ' ';
        i += kSpace.size();
      } else {
        out += piece[i++];
      }
    }
    return out;
  }

  std::optional<int32_t> token_id(std::string_view token) const override {
    int id = processor_.PieceToId(token);
    if (id < 0 || processor_.IdToPiece(id) != token) return std::nullopt; // unknown pieces map to <unk>
    return id;
  }

 private:
  sentencepiece::SentencePieceProcessor processor_;
};

} // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::filesystem::path &model_dir) {
  std::error_code ec;
  if (std::filesystem::is_regular_file(model_dir / "tokenizer.model", ec))
    return std::make_unique<SentencePieceTokenizer>(model_dir / "tokenizer.model");
  if (std::filesystem::is_regular_file(model_dir / "tokenizer.json", ec))
    return make_bpe_tokenizer(model_dir / "tokenizer.json"); // byte-level BPE
  return nullptr;
}

} // namespace loom
