// TokenIndex: the vocabulary's texts and trie.
#include "token_index.hpp"

#include <algorithm>
#include <string_view>

namespace loomp::grammar {

namespace {

std::vector<int32_t> sorted_unique(std::vector<int32_t> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

}  // namespace

TokenIndex::TokenIndex(std::vector<std::string> texts, std::vector<char> has_text, std::vector<int32_t> ends)
    : texts_(std::move(texts)), has_(std::move(has_text)), ends_(sorted_unique(std::move(ends))) {
  has_.resize(texts_.size(), 0);
  std::vector<std::string_view> keys;
  std::vector<int32_t> ids;
  for (size_t i = 0; i < texts_.size(); ++i)
    if (has_[i] && !texts_[i].empty() && !is_end(static_cast<int32_t>(i))) {
      keys.emplace_back(texts_[i]);
      ids.push_back(static_cast<int32_t>(i));
    }
  trie_ = ByteTrie(keys, ids);
}

bool TokenIndex::is_end(int32_t id) const { return std::binary_search(ends_.begin(), ends_.end(), id); }

bool TokenIndex::same(const std::vector<std::string>& texts, const std::vector<char>& has_text,
                      const std::vector<int32_t>& ends) const {
  std::vector<char> h = has_text;
  h.resize(texts.size(), 0);
  return texts == texts_ && h == has_ && sorted_unique(ends) == ends_;
}

}  // namespace loomp::grammar
