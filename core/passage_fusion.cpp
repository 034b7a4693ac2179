#include "loom/core/passage_fusion.hpp"

#include <algorithm>
#include <map>
#include <string>

namespace loom {

std::vector<PassageResult> fuse_passages(const std::vector<PassageResult> &passages, int64_t top_k) {
  std::vector<std::string> slots;
  for (const auto &p : passages)
    if (std::find(slots.begin(), slots.end(), p.retriever_slot) == slots.end()) slots.push_back(p.retriever_slot);
  std::vector<PassageResult> fused;
  if (slots.size() <= 1) {
    fused = passages;
  } else {
    std::map<std::string, size_t> index;  // doc_id -> place in fused
    std::map<std::string, int64_t> rank;  // the next rank in each retriever's list
    for (const auto &p : passages) {
      const double rrf = 1.0 / (60.0 + static_cast<double>(++rank[p.retriever_slot]));
      const auto [it, fresh] = index.emplace(p.doc_id, fused.size());
      if (fresh) {
        fused.push_back(p);
        fused.back().score = 0;
        fused.back().score_kind = "rrf";
        fused.back().retriever_slot.clear();
      }
      PassageResult &f = fused[it->second];
      f.score += rrf;
      f.retriever_slot += (f.retriever_slot.empty() ? "" : ",") + p.retriever_slot;
    }
    std::stable_sort(fused.begin(), fused.end(), [](const PassageResult &a, const PassageResult &b) { return a.score > b.score; });
  }
  if (top_k >= 0 && fused.size() > static_cast<size_t>(top_k)) fused.resize(static_cast<size_t>(top_k));
  return fused;
}

}  // namespace loom
