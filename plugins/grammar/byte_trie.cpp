// ByteTrie: built in one pass over the keys in sorted order.
#include "byte_trie.hpp"

#include <algorithm>

namespace loomp::grammar {

ByteTrie::ByteTrie(const std::vector<std::string_view>& keys, const std::vector<int32_t>& values) {
  std::vector<uint32_t> order(keys.size());
  for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return keys[a] < keys[b]; });
  // In sorted order a key shares with the previous one exactly the path of their common prefix,
  // so nodes are created depth first and a node's children in increasing byte order; the node a
  // key ends at never decreases, so each node's values are contiguous.
  std::vector<uint32_t> parent{0};
  std::vector<uint8_t> byte{0};
  std::vector<uint32_t> path{kRoot};  // path[d]: the node at depth d of the previous key
  std::vector<uint32_t> end_node;
  std::string_view prev;
  for (uint32_t i : order) {
    const std::string_view k = keys[i];
    size_t common = 0;
    while (common < prev.size() && common < k.size() && prev[common] == k[common]) ++common;
    path.resize(common + 1);
    for (size_t d = common; d < k.size(); ++d) {
      parent.push_back(path.back());
      byte.push_back(static_cast<uint8_t>(k[d]));
      path.push_back(static_cast<uint32_t>(parent.size() - 1));
    }
    end_node.push_back(path.back());
    prev = k;
  }
  nodes_.resize(parent.size());
  for (size_t n = 1; n < parent.size(); ++n) ++nodes_[parent[n]].n_edges;
  uint32_t at = 0;
  for (Node& n : nodes_) {
    n.first_edge = at;
    at += n.n_edges;
    n.n_edges = 0;
  }
  edges_.resize(at);
  for (size_t n = 1; n < parent.size(); ++n) {
    Node& p = nodes_[parent[n]];
    edges_[p.first_edge + p.n_edges++] = Edge{static_cast<uint32_t>(n), byte[n]};
  }
  values_.reserve(order.size());
  for (size_t j = 0; j < order.size(); ++j) {
    Node& n = nodes_[end_node[j]];
    if (n.n_values == 0) n.first_value = static_cast<uint32_t>(j);
    ++n.n_values;
    values_.push_back(values[order[j]]);
  }
}

}  // namespace loomp::grammar
