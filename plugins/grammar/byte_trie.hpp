// A trie (prefix tree) over byte strings, each string carrying an int32 value listed at the
// node where it ends. The vocabulary is one (values: token ids); so are the remainders of the
// tokens that leave an element's chain (token_tables.hpp).
#ifndef LOOM_PLUGINS_GRAMMAR_BYTE_TRIE_HPP
#define LOOM_PLUGINS_GRAMMAR_BYTE_TRIE_HPP

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace loomp::grammar {

class ByteTrie {
 public:
  // Nodes are laid out depth first (a node's subtree follows it), a node's edges are contiguous
  // and sorted by byte, and so are the values ending at a node (in key order, then input order).
  struct Node {
    uint32_t first_edge = 0, n_edges = 0;    // edge(first_edge .. +n_edges)
    uint32_t first_value = 0, n_values = 0;  // value(first_value .. +n_values)
  };
  struct Edge {
    uint32_t child = 0;
    uint8_t byte = 0;
  };
  static constexpr uint32_t kRoot = 0;

  ByteTrie() : nodes_(1) {}  // a root alone
  // keys[i] carries values[i]; keys need not be sorted or unique, and may be empty (the root).
  ByteTrie(const std::vector<std::string_view>& keys, const std::vector<int32_t>& values);

  const Node& node(uint32_t i) const { return nodes_[i]; }
  const Edge& edge(uint32_t i) const { return edges_[i]; }
  int32_t value(uint32_t i) const { return values_[i]; }
  size_t nodes() const { return nodes_.size(); }
  size_t bytes() const { return nodes_.size() * sizeof(Node) + edges_.size() * sizeof(Edge) + values_.size() * 4; }

 private:
  std::vector<Node> nodes_;
  std::vector<Edge> edges_;
  std::vector<int32_t> values_;
};

}  // namespace loomp::grammar

#endif
