// libFuzzer target for the tokenizer.json reader and the byte-level BPE: a tokenizer.json text,
// then optionally a line "#--" and a text to encode. Any input must end in a tokenizer (whose
// encode/decode of the text then runs) or a loom::Error, never a crash or a hang.
#include <cstddef>
#include <cstdint>
#include <string>

#include "../../core/bpe_tokenizer.hpp"
#include "loom/core/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  std::string input(reinterpret_cast<const char *>(data), size);
  size_t split = input.find("\n#--\n");
  std::string json = input.substr(0, split);
  std::string text = split == std::string::npos ? std::string("Hello world 🙂 123") : input.substr(split + 5);
  try {
    auto tok = loom::make_bpe_tokenizer_from_json(json, "fuzz.json");
    auto ids = tok->encode(text, false);
    (void)tok->decode(ids);
    (void)tok->decode({0, 1, 2, -1, 1 << 30});
  } catch (const loom::Error &) {
  }
  return 0;
}
