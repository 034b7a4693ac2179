// An application embedding Loom from C++ through libloom's C API (loom/loom.h) with a small RAII
// wrapper: streamed generation, chat, embeddings, and a swap from another thread while a
// generation runs.
// usage: embed_cpp MANIFEST      (configs/server.toml works)
#include <atomic>
#include <cstring>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "loom/loom.h"

namespace {

void check(loom_status status, const char *what) {
  if (status != LOOM_OK) throw std::runtime_error(std::string(what) + ": " + loom_last_error());
}

class Loom {
 public:
  explicit Loom(const std::string &manifest) { check(loom_runtime_create_from_file(manifest.c_str(), nullptr, 0, &rt_), "create"); }
  ~Loom() { loom_runtime_destroy(rt_); }
  Loom(const Loom &) = delete;
  Loom &operator=(const Loom &) = delete;

  template <class OnText>
  std::string generate(const std::string &prompt, loom_generate_options options, OnText on_text) {
    char *text = nullptr;
    auto thunk = [](void *user, const char *piece, size_t n) -> int32_t {
      return (*static_cast<OnText *>(user))(std::string(piece, n)) ? 0 : 1;
    };
    check(loom_runtime_generate(rt_, prompt.c_str(), &options, thunk, &on_text, &text, nullptr), "generate");
    std::unique_ptr<char, decltype(&loom_free_string)> owned(text, loom_free_string);
    return text;
  }
  std::string chat(const std::vector<std::pair<std::string, std::string>> &conversation, loom_generate_options options) {
    std::vector<loom_chat_message> messages;
    for (const auto &[role, content] : conversation) messages.push_back({role.c_str(), content.c_str()});
    char *text = nullptr;
    check(loom_runtime_chat(rt_, messages.data(), messages.size(), &options, nullptr, nullptr, &text, nullptr), "chat");
    std::unique_ptr<char, decltype(&loom_free_string)> owned(text, loom_free_string);
    return text;
  }
  std::vector<std::vector<float>> embed(const std::vector<std::string> &texts) {
    std::vector<const char *> in;
    for (const auto &t : texts) in.push_back(t.c_str());
    size_t dim = 0;
    loom_runtime_embed(rt_, in.data(), in.size(), nullptr, 0, &dim); // asks for the size
    std::vector<float> flat(in.size() * dim);
    check(loom_runtime_embed(rt_, in.data(), in.size(), flat.data(), flat.size(), &dim), "embed");
    std::vector<std::vector<float>> out;
    for (size_t i = 0; i < in.size(); ++i) out.emplace_back(flat.begin() + static_cast<long>(i * dim), flat.begin() + static_cast<long>((i + 1) * dim));
    return out;
  }
  void swap(const std::string &slot, const std::string &component) { check(loom_runtime_swap(rt_, slot.c_str(), component.c_str()), "swap"); }

 private:
  loom_runtime *rt_ = nullptr;
};

loom_generate_options defaults() {
  loom_generate_options o{};
  o.struct_size = sizeof o;
  o.max_tokens = 48;
  return o;
}

} // namespace

int main(int argc, char **argv) {
  if (argc != 2) {
    std::cerr << "usage: embed_cpp MANIFEST\n";
    return 2;
  }
  try {
    Loom loom(argv[1]);
    // A generation with the manifest's sampler chain while another thread swaps that chain's
    // first link ten times: the swaps land between steps, the generation goes on.
    std::atomic<int> pieces{0};
    std::thread swapper([&] {
      while (pieces.load() == 0) std::this_thread::yield();
      for (int i = 0; i < 10; ++i) loom.swap("sampler[0]", "use = \"temperature\"\nt = " + std::to_string(0.6 + 0.05 * i));
    });
    loom_generate_options o = defaults();
    o.use_seed = 1;
    o.seed = 7;
    const std::string text = loom.generate("And God said", o, [&](const std::string &piece) {
      ++pieces;
      std::cout << piece << std::flush;
      return true;
    });
    swapper.join();
    std::cout << "\ngenerate: " << pieces.load() << " pieces, " << text.size() << " bytes, 10 swaps meanwhile\n";
    if (text.empty()) return 1;
    o.use_sampling = 1;
    o.temperature = 0;
    std::cout << "chat: " << loom.chat({{"user", "Who made the light?"}}, o) << "\n";
    const auto vectors = loom.embed({"In the beginning", "In the beginning"});
    std::cout << "embed: " << vectors.size() << " x " << vectors[0].size() << ", equal texts equal vectors: " << (vectors[0] == vectors[1])
              << "\n";
    if (vectors[0] != vectors[1]) return 1;
    std::cout << "embed_cpp: done\n";
    return 0;
  } catch (const std::exception &e) {
    std::cerr << "embed_cpp: " << e.what() << "\n";
    return 1;
  }
}
