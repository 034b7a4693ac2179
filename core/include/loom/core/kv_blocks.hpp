// loom::KvBlockManager: which blocks of the paged KV cache each sequence uses, with prefix caching
// and copy-on-write. Pure host bookkeeping: it never touches KV memory; the caller copies blocks
// (BlockCopy) and runs the forward passes that fill them.
//
// Blocks are indices [0, n_blocks) into every layer's KV pool; block b holds `block_size`
// consecutive positions of one sequence, and position p of a sequence lives in
// table(seq)[p / block_size] at slot p % block_size.
//
// Prefix caching: a FULL block whose positions have been computed (computed()) is entered in a
// cache keyed by (the sequence's domain, the identity of the prefix before it, its own block_size
// tokens). A domain names what else the KV depends on besides the tokens (the adapter a request
// runs with, the pipeline's swap generation): sequences of different domains never share blocks. A prefix
// identity is a node id that is never reused, so the key is exact: a lookup compares every token
// and the parent, so hash collisions cannot give a false hit, and when a cached block is evicted
// its id dies with it, so its cached descendants can no longer be reached (they age out of the
// LRU like any unreferenced block). A cached block that nobody references is evictable: it counts
// as free and is handed out, least recently used first, once the free list is empty.
//
// Copy-on-write: blocks may be shared (prefix hits, fork()). grow() makes every block the caller
// is about to write private to the writer first: a block others still reference is copied
// (BlockCopy); a cached block only the writer references is taken out of the cache and written
// in place (the writer recomputes the same tokens there; computed() enters it again).
//
// Ownership: the manager owns its tables and cache; table() returns a reference into them that
// stays valid until the next non-const call. Thread-safety: one thread at a time (the scheduler's);
// no method is safe to call concurrently with another.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace loom {

struct KvBlockOptions {
  int64_t n_blocks = 0;
  int32_t block_size = 16; // positions per block
  bool prefix_caching = true;
};

// Copy-on-write: the caller copies block src into dst (all layers) before the next forward pass.
// A list of copies must be applied in its order: a block freed by one sequence may become the
// destination of a later copy in the same step.
struct BlockCopy {
  int32_t src, dst;
};

struct KvBlockStats {
  int64_t queried_tokens = 0; // tokens offered to begin()
  int64_t hit_tokens = 0;     // tokens begin() found cached (what it returned)
  int64_t evictions = 0;      // cached blocks dropped from the cache to be reused
  int64_t cow_copies = 0;     // BlockCopy entries grow() produced
  double hit_rate() const { return queried_tokens > 0 ? double(hit_tokens) / double(queried_tokens) : 0.0; }
};

class KvBlockManager {
 public:
  // Throws loom::Error on n_blocks < 1 (or beyond int32 block ids) or block_size < 1.
  explicit KvBlockManager(KvBlockOptions options);

  int32_t block_size() const { return block_size_; }
  int64_t total_blocks() const { return int64_t(blocks_.size()); }
  // Blocks grow() could hand out now: unreferenced ones, cached (evictable) ones included.
  int64_t free_blocks() const { return int64_t(free_.size() + lru_.size()); }

  // Starts sequence `seq` (not live) whose tokens will be `tokens` (a prompt, or prompt + generated
  // for a resumed one). With prefix caching, takes references on the longest run of cached full
  // blocks whose tokens equal tokens' prefix, and returns how many leading tokens are computed:
  // the hit, capped at tokens.size() - 1 so the caller computes at least one token (its logits).
  // When the cap cuts into a hit block, the caller's first write there goes through grow()'s
  // copy-on-write. Counts tokens.size() as queried and the return value as hits.
  // `domain`: see above (0 for a pipeline that computes every sequence alike).
  int64_t begin(int64_t seq, const std::vector<int32_t> &tokens, uint64_t domain = 0);

  // Blocks grow(seq, n_tokens, written_from) would take (new blocks + copy-on-write copies), for
  // admission decisions. The two-argument form writes from the seq's computed count (what begin()
  // returned, then the last computed()).
  int64_t blocks_needed(int64_t seq, int64_t n_tokens) const;
  int64_t blocks_needed(int64_t seq, int64_t n_tokens, int64_t written_from) const;

  // Makes seq's table cover positions [0, n_tokens) (it never shrinks), and makes every block that
  // positions [written_from, n_tokens) fall in private to seq: a block others reference gets a
  // fresh copy (appended to `copies`; the table now names the copy). Takes fresh blocks from the
  // free list first, then evicts least recently used cached unreferenced blocks. Returns false and
  // changes nothing when there are not enough blocks. Throws on an unknown seq or
  // written_from outside [0, n_tokens].
  bool grow(int64_t seq, int64_t n_tokens, int64_t written_from, std::vector<BlockCopy> &copies);

  // Positions [0, n_computed) of seq now hold the KV of tokens[0, n_computed) (tokens: the seq's
  // full token list). Every full block among them becomes reusable by later sequences with the
  // same token prefix. A block whose exact prefix another block already caches stays private.
  // Throws when n_computed exceeds tokens.size() or the table's coverage.
  void computed(int64_t seq, const std::vector<int32_t> &tokens, int64_t n_computed);

  const std::vector<int32_t> &table(int64_t seq) const;

  // Gives `dst` (not live) new references to all of src's blocks (n > 1 samples, beam search);
  // the first write into a shared block copies it (grow's written_from).
  void fork(int64_t src, int64_t dst);

  // Ends seq: drops its references. Its cached full blocks stay reusable (evictable) while prefix
  // caching is on, tail blocks first in eviction order (a prefix is worth more than its
  // continuation); its other blocks return to the free list.
  void release(int64_t seq);

  // Undoes a begin() whose admission failed: release() that also takes back the stats begin()
  // counted, so a request retried every step is queried once.
  void cancel(int64_t seq);

  // Sliding-window attention: no later query of seq reads a key before `position`, so seq drops
  // its references to the computed blocks wholly before it (they return to the pool, or stay
  // cached while prefix caching is on) and their table entries become kDropped. The table keeps
  // its length: position p still maps to entry p / block_size. Returns how many were dropped.
  int64_t drop_before(int64_t seq, int64_t position);
  static constexpr int32_t kDropped = -1;

  bool live(int64_t seq) const { return seqs_.count(seq) != 0; }
  KvBlockStats stats() const { return stats_; }

 private:
  struct CacheKey {
    uint64_t domain = 0; // the sequence's domain (begin)
    uint64_t parent = 0; // node id of the prefix before the block; 0: the block starts the sequence
    std::vector<int32_t> tokens;
    bool operator==(const CacheKey &o) const { return domain == o.domain && parent == o.parent && tokens == o.tokens; }
  };
  struct CacheKeyHash {
    std::size_t operator()(const CacheKey &k) const;
  };
  struct Block {
    int32_t refs = 0;
    bool cached = false;   // its key is in cache_ (and maps to this block)
    uint64_t node = 0;     // prefix identity of the tokens through this block; 0: none
    CacheKey key;          // meaningful while node != 0
    bool in_lru = false;
    std::list<int32_t>::iterator lru_pos;
  };
  struct Sequence {
    std::vector<int32_t> table;
    std::vector<uint64_t> nodes; // nodes[i]: prefix identity through table[i], for the known prefix
    int64_t computed = 0;        // positions the caller said hold their KV
    int64_t queried = 0, hit = 0; // what begin() counted, for cancel()
    int64_t dropped = 0;          // table[0, dropped) are kDropped (drop_before)
    uint64_t domain = 0;          // begin()'s
  };

  Sequence &sequence(int64_t seq, const char *what);
  const Sequence &sequence(int64_t seq, const char *what) const;
  int32_t allocate();
  void unref(int32_t block);
  void uncache(int32_t block);
  // Copy-on-write copies grow() would make for table blocks [first_block, end_block).
  int64_t copies_needed(const Sequence &s, int64_t first_block, int64_t end_block) const;

  int32_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;   // unreferenced, uncached; a stack (lowest ids handed out first)
  std::list<int32_t> lru_;      // unreferenced, cached; front = least recently used
  std::unordered_map<CacheKey, int32_t, CacheKeyHash> cache_;
  std::unordered_map<int64_t, Sequence> seqs_;
  uint64_t next_node_ = 1;
  KvBlockStats stats_;
};

} // namespace loom
