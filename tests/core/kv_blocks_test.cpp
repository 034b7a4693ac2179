// KvBlockManager (core/kv_blocks.cpp): accounting, all-or-nothing grow, prefix hits and their
// caps, copy-on-write after hits and forks, LRU eviction, no stale hits after eviction, and a
// randomized check of thousands of operations against a model of the pool's contents.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "kv_pool_model.hpp"
#include "loom/core/error.hpp"
#include "loom/core/kv_blocks.hpp"

using loom::BlockCopy;
using loom::KvBlockManager;
using loom::KvBlockOptions;

namespace {

std::vector<int32_t> iota_tokens(int32_t n, int32_t first = 100) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), first);
  return t;
}

// begin + grow + computed over all of `tokens`, as a finished prefill would.
void prefill(KvBlockManager &m, int64_t seq, const std::vector<int32_t> &tokens) {
  const int64_t from = m.begin(seq, tokens);
  std::vector<BlockCopy> copies;
  REQUIRE(m.grow(seq, int64_t(tokens.size()), from, copies));
  m.computed(seq, tokens, int64_t(tokens.size()));
}

} // namespace

TEST_CASE("KvBlockManager rejects bad options", "[kv_blocks]") {
  CHECK_THROWS_AS(KvBlockManager(KvBlockOptions{0, 16, true}), loom::Error);
  CHECK_THROWS_AS(KvBlockManager(KvBlockOptions{8, 0, true}), loom::Error);
  CHECK_NOTHROW(KvBlockManager(KvBlockOptions{1, 1, false}));
}

TEST_CASE("KvBlockManager accounts for allocated and freed blocks", "[kv_blocks]") {
  KvBlockManager m({8, 4, false});
  CHECK(m.total_blocks() == 8);
  CHECK(m.block_size() == 4);
  CHECK(m.free_blocks() == 8);
  const auto t = iota_tokens(10);
  CHECK(m.begin(1, t) == 0);
  CHECK(m.live(1));
  CHECK(m.blocks_needed(1, 10) == 3);
  std::vector<BlockCopy> copies;
  REQUIRE(m.grow(1, 10, 0, copies));
  CHECK(m.table(1).size() == 3);
  CHECK(m.free_blocks() == 5);
  REQUIRE(m.grow(1, 12, 10, copies)); // still within the third block
  CHECK(m.table(1).size() == 3);
  REQUIRE(m.grow(1, 13, 12, copies));
  CHECK(m.table(1).size() == 4);
  CHECK(copies.empty());
  const std::set<int32_t> distinct(m.table(1).begin(), m.table(1).end());
  CHECK(distinct.size() == 4);
  CHECK(m.free_blocks() == 4);
  m.release(1);
  CHECK_FALSE(m.live(1));
  CHECK(m.free_blocks() == 8);

  SECTION("misuse throws and names the sequence") {
    CHECK_THROWS_WITH(m.table(1), Catch::Contains("sequence 1"));
    CHECK_THROWS_AS(m.release(1), loom::Error);
    CHECK_THROWS_AS(m.grow(7, 4, 0, copies), loom::Error);
    CHECK_THROWS_AS(m.computed(7, t, 1), loom::Error);
    m.begin(2, t);
    CHECK_THROWS_WITH(m.begin(2, t), Catch::Contains("sequence 2"));
    CHECK_THROWS_AS(m.grow(2, 4, 5, copies), loom::Error);   // written_from beyond n_tokens
    CHECK_THROWS_AS(m.computed(2, t, 4), loom::Error);       // no blocks cover position 3
    CHECK_THROWS_AS(m.fork(2, 2), loom::Error);
    CHECK_THROWS_AS(m.fork(9, 3), loom::Error);
  }
}

TEST_CASE("KvBlockManager grow that does not fit changes nothing", "[kv_blocks]") {
  KvBlockManager m({4, 4, true});
  prefill(m, 1, iota_tokens(12)); // 3 blocks
  const auto t2 = iota_tokens(8, 500);
  m.begin(2, t2);
  CHECK(m.blocks_needed(2, 8) == 2);
  std::vector<BlockCopy> copies{{7, 7}};
  CHECK_FALSE(m.grow(2, 8, 0, copies));
  CHECK(m.table(2).empty());
  CHECK(m.free_blocks() == 1);
  CHECK(copies.size() == 1); // untouched
  REQUIRE(m.grow(2, 4, 0, copies));
  CHECK(m.free_blocks() == 0);
}

TEST_CASE("KvBlockManager prefix caching hits shared full blocks", "[kv_blocks]") {
  KvBlockManager m({16, 4, true});
  const auto a = iota_tokens(14); // 3 full blocks + 2 tokens
  prefill(m, 1, a);

  SECTION("a shared prefix hits its full blocks") {
    auto b = iota_tokens(12);
    for (int32_t x : {7, 8, 9, 10}) b.push_back(x);
    CHECK(m.begin(2, b) == 12);
    CHECK(std::equal(m.table(2).begin(), m.table(2).end(), m.table(1).begin()));
    CHECK(m.table(2).size() == 3);
    const auto s = m.stats();
    CHECK(s.queried_tokens == 14 + 16);
    CHECK(s.hit_tokens == 12);
    CHECK(s.hit_rate() == Approx(12.0 / 30.0));
    std::vector<BlockCopy> copies;
    REQUIRE(m.grow(2, 16, 12, copies)); // a fresh fourth block, nothing shared written
    CHECK(copies.empty());
    CHECK(m.table(2)[3] != m.table(1)[3]);
  }
  SECTION("a prefix differing in the middle of a block hits only the blocks before it") {
    auto b = a;
    b[6] = 9999;
    CHECK(m.begin(2, b) == 4);
    CHECK(m.table(2) == std::vector<int32_t>{m.table(1)[0]});
  }
  SECTION("the partial last block is never a hit") {
    CHECK(m.begin(2, a) == 12);
  }
  SECTION("without prefix caching nothing hits") {
    KvBlockManager plain({16, 4, false});
    prefill(plain, 1, a);
    CHECK(plain.begin(2, a) == 0);
    CHECK(plain.stats().hit_rate() == 0.0);
  }
}

TEST_CASE("KvBlockManager caps a full hit at tokens - 1 and copies the block on write", "[kv_blocks]") {
  KvBlockManager m({16, 4, true});
  const auto a = iota_tokens(12); // exactly 3 full blocks
  prefill(m, 1, a);
  const std::vector<int32_t> t1 = m.table(1);

  CHECK(m.begin(2, a) == 11);
  CHECK(m.table(2) == t1);
  CHECK(m.blocks_needed(2, 12) == 1);
  std::vector<BlockCopy> copies;
  const int64_t free_before = m.free_blocks();
  REQUIRE(m.grow(2, 12, 11, copies));
  REQUIRE(copies.size() == 1);
  CHECK(copies[0].src == t1[2]);
  CHECK(copies[0].dst == m.table(2)[2]);
  CHECK(copies[0].dst != t1[2]);
  CHECK(m.table(2)[0] == t1[0]);
  CHECK(m.table(2)[1] == t1[1]);
  CHECK(m.free_blocks() == free_before - 1);
  CHECK(m.stats().cow_copies == 1);
  m.computed(2, a, 12);

  // The source stays cached for others.
  CHECK(m.begin(3, a) == 11);
  CHECK(m.table(3) == t1);

  SECTION("a cached block only the writer holds is written in place and cached again") {
    m.release(1);
    m.release(2);
    m.release(3);
    CHECK(m.begin(4, a) == 11);
    CHECK(m.table(4) == t1);
    CHECK(m.blocks_needed(4, 12) == 0);
    copies.clear();
    REQUIRE(m.grow(4, 12, 11, copies));
    CHECK(copies.empty());
    CHECK(m.table(4) == t1);
    m.computed(4, a, 12);
    m.release(4);
    CHECK(m.begin(5, a) == 11); // the block came back into the cache
    CHECK(m.table(5) == t1);
  }
}

TEST_CASE("KvBlockManager fork shares blocks and copies them on first write", "[kv_blocks]") {
  KvBlockManager m({8, 4, true});
  const auto a = iota_tokens(6); // one full block + a partial one
  prefill(m, 1, a);
  m.fork(1, 2);
  CHECK(m.table(2) == m.table(1));
  CHECK(m.free_blocks() == 6);

  std::vector<BlockCopy> copies;
  CHECK(m.blocks_needed(2, 7) == 1); // writes from position 6, inside the shared partial block
  REQUIRE(m.grow(2, 7, 6, copies));
  REQUIRE(copies.size() == 1);
  CHECK(copies[0].src == m.table(1)[1]);
  CHECK(copies[0].dst == m.table(2)[1]);
  CHECK(m.table(2)[0] == m.table(1)[0]); // the untouched full block stays shared

  copies.clear();
  REQUIRE(m.grow(1, 7, 6, copies)); // the source is the only holder now: no copy
  CHECK(copies.empty());
  CHECK(m.stats().cow_copies == 1);

  copies.clear();
  REQUIRE(m.grow(1, 7, 0, copies)); // rewriting from 0 copies the still-shared first block
  REQUIRE(copies.size() == 1);
  CHECK(m.table(1)[0] != m.table(2)[0]);
  m.release(1);
  m.release(2);
  CHECK(m.free_blocks() == 8);
}

TEST_CASE("KvBlockManager evicts the least recently used cached blocks first", "[kv_blocks]") {
  KvBlockManager m({6, 2, true});
  const std::vector<int32_t> a{1, 2, 3, 4}, b{5, 6, 7, 8};
  prefill(m, 1, a);
  prefill(m, 2, b);
  const std::vector<int32_t> ta = m.table(1), tb = m.table(2);
  m.release(1);
  m.release(2);
  CHECK(m.free_blocks() == 6);

  SECTION("released order, tail before head") {
    const auto c = iota_tokens(6, 50);
    m.begin(3, c);
    std::vector<BlockCopy> copies;
    REQUIRE(m.grow(3, 6, 0, copies)); // 2 free blocks, then a's tail
    CHECK(m.stats().evictions == 1);
    CHECK(m.table(3)[2] == ta[1]);
    CHECK(m.begin(4, {1, 2, 3, 4, 9}) == 2); // a's head is still cached, its tail is not
    CHECK(m.begin(5, {5, 6, 7, 8, 9}) == 4);
  }
  SECTION("a hit makes blocks recent again") {
    CHECK(m.begin(3, {1, 2, 3, 4, 9}) == 4);
    m.release(3); // a's blocks are now the most recently used
    const auto c = iota_tokens(6, 50);
    m.begin(4, c);
    std::vector<BlockCopy> copies;
    REQUIRE(m.grow(4, 6, 0, copies));
    CHECK(m.table(4)[2] == tb[1]);
    CHECK(m.begin(5, {1, 2, 3, 4, 9}) == 4);
    CHECK(m.begin(6, {5, 6, 7, 8, 9}) == 2);
  }
}

TEST_CASE("KvBlockManager never returns an evicted block as a stale hit", "[kv_blocks]") {
  SECTION("a refilled pool forgets the old prefix") {
    KvBlockManager m({4, 2, true});
    const std::vector<int32_t> a{1, 2, 3, 4, 5, 6};
    prefill(m, 1, a);
    m.release(1);
    prefill(m, 2, {9, 9, 9, 9, 9, 9, 9, 9}); // evicts all of a's blocks
    CHECK(m.stats().evictions == 3);
    m.release(2);
    CHECK(m.begin(3, a) == 0);
    CHECK(m.begin(4, {9, 9, 9, 9, 9, 9, 9, 9, 1}) == 8);
  }
  SECTION("a cached continuation of an evicted block cannot be reached through its reuse") {
    KvBlockManager m({3, 2, true});
    m.begin(1, {1, 2});          // p: caches [1 2] once computed
    m.begin(2, {1, 2, 3, 4});    // q: begins before p computed, so no hit
    std::vector<BlockCopy> copies;
    REQUIRE(m.grow(1, 2, 0, copies));
    REQUIRE(m.grow(2, 4, 0, copies));
    m.computed(1, {1, 2}, 2);
    m.computed(2, {1, 2, 3, 4}, 4); // q's [1 2] stays private; its [3 4] is cached after p's [1 2]
    const int32_t p_block = m.table(1)[0];
    m.release(1);
    m.begin(3, {7, 8});
    REQUIRE(m.grow(3, 2, 0, copies)); // reuses p's block for other tokens
    CHECK(m.table(3)[0] == p_block);
    m.computed(3, {7, 8}, 2);
    CHECK(m.begin(4, {7, 8, 3, 4, 5}) == 2); // not 4: q's [3 4] followed another prefix
    CHECK(m.begin(5, {1, 2, 3, 4, 5}) == 0);
  }
}

TEST_CASE("KvBlockManager cancel takes back what begin counted", "[kv_blocks]") {
  KvBlockManager m({8, 2, true});
  prefill(m, 1, {1, 2, 3, 4});
  m.begin(2, {1, 2, 3, 4, 5});
  m.cancel(2);
  CHECK_FALSE(m.live(2));
  CHECK(m.stats().queried_tokens == 4);
  CHECK(m.stats().hit_tokens == 0);
  CHECK(m.free_blocks() == 6);
}

namespace {

// The randomized check's reference: what each live sequence is and has computed.
struct ModelSeq {
  std::vector<int32_t> tokens;
  int64_t computed = 0;
};

void check_all(const KvBlockManager &m, const loom::test::KvPoolModel &pool, const std::map<int64_t, ModelSeq> &seqs) {
  std::set<int32_t> used;
  for (const auto &[id, s] : seqs) {
    INFO("sequence " << id);
    REQUIRE(pool.check(m.table(id), s.tokens, s.computed).empty());
    used.insert(m.table(id).begin(), m.table(id).end());
  }
  REQUIRE(m.free_blocks() == m.total_blocks() - int64_t(used.size()));
}

void run_model_check(KvBlockOptions options, uint32_t seed, int ops) {
  std::mt19937 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  KvBlockManager m(options);
  loom::test::KvPoolModel pool(options.n_blocks, options.block_size);
  std::map<int64_t, ModelSeq> seqs;
  int64_t next_id = 0;
  // A few stems over a tiny alphabet, so that prompts share prefixes (and blocks) often.
  std::vector<std::vector<int32_t>> stems(4);
  for (auto &s : stems)
    for (int i = 0; i < 40; ++i) s.push_back(int32_t(uniform(0, 2)));
  auto random_live = [&]() {
    auto it = seqs.begin();
    std::advance(it, uniform(0, int64_t(seqs.size()) - 1));
    return it;
  };

  for (int op = 0; op < ops; ++op) {
    const int64_t kind = uniform(0, 9);
    if (seqs.empty() || (kind <= 1 && seqs.size() < 8)) { // begin
      ModelSeq s;
      const auto &stem = stems[size_t(uniform(0, 3))];
      s.tokens.assign(stem.begin(), stem.begin() + uniform(1, 40));
      if (uniform(0, 3) == 0) s.tokens[size_t(uniform(0, int64_t(s.tokens.size()) - 1))] = 7;
      const int64_t id = next_id++;
      const int64_t hit = m.begin(id, s.tokens);
      REQUIRE(hit <= std::max<int64_t>(0, int64_t(s.tokens.size()) - 1));
      REQUIRE((hit % options.block_size == 0 || hit == int64_t(s.tokens.size()) - 1));
      REQUIRE(pool.check(m.table(id), s.tokens, hit).empty()); // a hit is exact, never stale
      s.computed = hit;
      seqs.emplace(id, s);
    } else if (kind <= 5) { // grow, write (a forward pass), computed
      auto it = random_live();
      ModelSeq &s = it->second;
      if (s.computed >= int64_t(s.tokens.size())) continue;
      const int64_t n = s.computed + uniform(1, int64_t(s.tokens.size()) - s.computed);
      const std::vector<int32_t> table_before = m.table(it->first);
      const int64_t free_before = m.free_blocks(), needed = m.blocks_needed(it->first, n);
      std::vector<BlockCopy> copies;
      if (!m.grow(it->first, n, s.computed, copies)) {
        REQUIRE(needed > free_before);
        REQUIRE(copies.empty());
        REQUIRE(m.table(it->first) == table_before);
        REQUIRE(m.free_blocks() == free_before);
        continue;
      }
      REQUIRE(m.free_blocks() == free_before - needed);
      pool.apply(copies);
      // Every block about to be written belongs to this sequence alone.
      const auto &table = m.table(it->first);
      for (int64_t b = s.computed / options.block_size; b * options.block_size < n; ++b)
        for (const auto &[other, os] : seqs)
          if (other != it->first) {
            const auto &ot = m.table(other);
            REQUIRE(std::find(ot.begin(), ot.end(), table[size_t(b)]) == ot.end());
          }
      pool.write(table, s.tokens, s.computed, n);
      m.computed(it->first, s.tokens, n);
      s.computed = n;
    } else if (kind == 6) { // the sequence generates a token
      random_live()->second.tokens.push_back(int32_t(uniform(0, 2)));
    } else if (kind == 7 && seqs.size() < 8) { // fork
      auto it = random_live();
      const int64_t id = next_id++;
      m.fork(it->first, id);
      ModelSeq copy = it->second;
      seqs.emplace(id, copy);
    } else { // release
      auto it = random_live();
      m.release(it->first);
      seqs.erase(it);
    }
    check_all(m, pool, seqs);
  }
  for (const auto &[id, s] : seqs) m.release(id);
  REQUIRE(m.free_blocks() == m.total_blocks());
  const auto st = m.stats();
  if (options.prefix_caching) {
    CHECK(st.hit_tokens > 0);
    CHECK(st.evictions > 0);
  }
  CHECK(st.cow_copies > 0);
}

} // namespace

TEST_CASE("KvBlockManager drops the blocks behind a sliding window", "[kv_blocks][window]") {
  for (bool caching : {false, true}) {
    INFO("prefix caching " << caching);
    KvBlockManager m(KvBlockOptions{8, 4, caching});
    const auto t = iota_tokens(14); // blocks 0-2 full, block 3 holds 2 positions
    prefill(m, 1, t);
    REQUIRE(m.free_blocks() == 4);
    // Only computed blocks wholly before the position go: block 2 ends at 12 > 11.
    CHECK(m.drop_before(1, 11) == 2);
    CHECK(m.table(1)[0] == KvBlockManager::kDropped);
    CHECK(m.table(1)[1] == KvBlockManager::kDropped);
    CHECK(m.table(1)[2] >= 0);
    CHECK(m.table(1).size() == 4);
    CHECK(m.free_blocks() == 6);  // back to the pool (cached ones are evictable, so free too)
    CHECK(m.drop_before(1, 11) == 0); // idempotent
    CHECK(m.drop_before(1, 100) == 1); // capped at the computed 14 positions: block 3 is not full of KV yet
    // Writing behind the window is refused; growing past the end works.
    std::vector<BlockCopy> copies;
    CHECK_THROWS_AS(m.grow(1, 15, 4, copies), loom::Error);
    REQUIRE(m.grow(1, 17, 14, copies));
    CHECK(copies.empty());
    CHECK(m.table(1).size() == 5);
    // A fork shares only the live blocks; releasing both gives everything back.
    m.fork(1, 2);
    CHECK(m.table(2)[0] == KvBlockManager::kDropped);
    m.release(1);
    m.release(2);
    CHECK(m.free_blocks() == 8);
    if (caching) {
      // The dropped full blocks stayed cached: a new sequence with the same prefix finds them.
      CHECK(m.begin(3, t) == 12);
      m.release(3);
    }
  }
}

TEST_CASE("KvBlockManager keeps every sequence's KV intact under random operations", "[kv_blocks][random]") {
  const std::vector<KvBlockOptions> configs{{24, 4, true}, {12, 2, true}, {40, 1, true}, {16, 3, true}, {24, 4, false}};
  uint32_t seed = 1;
  for (const KvBlockOptions &o : configs) {
    INFO("n_blocks " << o.n_blocks << " block_size " << o.block_size << " prefix_caching " << o.prefix_caching);
    for (int round = 0; round < 3; ++round) run_model_check(o, seed++, 4000);
  }
}

TEST_CASE("KvBlockManager keeps prefix domains apart", "[kv_blocks]") {
  // Two requests with the same tokens under different adapters (domains) have different KV: the
  // second must not hit the first's blocks; a third in the first's domain does, and so does a
  // fork (it keeps its source's domain when it computes more blocks).
  KvBlockManager m(KvBlockOptions{32, 4, true});
  const auto tokens = iota_tokens(13);
  REQUIRE(m.begin(0, tokens, 7) == 0);
  std::vector<BlockCopy> copies;
  REQUIRE(m.grow(0, 13, 0, copies));
  m.computed(0, tokens, 13);
  CHECK(m.begin(1, tokens, 8) == 0);
  CHECK(m.begin(2, tokens) == 0); // domain 0: a pipeline without choices
  CHECK(m.begin(3, tokens, 7) == 12);
  CHECK(m.table(3) == std::vector<int32_t>(m.table(0).begin(), m.table(0).begin() + 3));
  m.fork(0, 4);
  auto longer = tokens;
  for (int32_t t = 0; t < 7; ++t) longer.push_back(500 + t);
  REQUIRE(m.grow(4, 20, 13, copies));
  m.computed(4, longer, 20);
  CHECK(m.begin(5, longer, 7) == 19);
  CHECK(m.begin(6, longer, 9) == 0);
}
