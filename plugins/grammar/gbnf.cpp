// GBNF parser and pushdown matcher. See gbnf.hpp for the dialect.
#include "gbnf.hpp"

#include <algorithm>
#include <unordered_map>

namespace loomp::grammar {

bool Grammar::matches(const Elem& e, uint32_t cp) const {
  bool in = false;
  for (uint32_t i = 0; i < e.rcount; ++i) {
    const auto& r = ranges[e.rfirst + i];
    if (cp >= r.first && cp <= r.second) { in = true; break; }
  }
  return in != e.negated;
}

bool Grammar::intersects(const Elem& e, uint32_t lo, uint32_t hi) const {
  if (!e.negated) {
    for (uint32_t i = 0; i < e.rcount; ++i) {
      const auto& r = ranges[e.rfirst + i];
      if (r.first <= hi && r.second >= lo) return true;
    }
    return false;
  }
  // Negated: true unless the ranges cover [lo, hi] entirely.
  uint64_t x = lo;
  while (x <= hi) {
    bool moved = false;
    for (uint32_t i = 0; i < e.rcount; ++i) {
      const auto& r = ranges[e.rfirst + i];
      if (x >= r.first && x <= r.second) { x = static_cast<uint64_t>(r.second) + 1; moved = true; }
    }
    if (!moved) return true;
  }
  return false;
}

bool Grammar::may_match_pending(const Elem& e, uint32_t cp, uint8_t need, uint8_t len) const {
  const uint32_t shift = 6u * need;
  const uint32_t total = uint32_t{need} + len;
  const uint32_t lo = std::max<uint32_t>(cp << shift, utf8_min(total));
  const uint32_t hi = std::min<uint32_t>((cp << shift) | ((1u << shift) - 1), 0x10FFFF);
  if (lo > hi) return false;
  return (lo < 0xD800 && intersects(e, lo, std::min<uint32_t>(hi, 0xD7FF))) ||
         (hi > 0xDFFF && intersects(e, std::max<uint32_t>(lo, 0xE000), hi));
}

namespace {

bool name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

class Parser {
 public:
  Parser(std::string_view t, const Limits& l) : t_(t), lim_(l) {}

  Grammar run() {
    if (t_.size() > lim_.max_text)
      throw GrammarError("grammar: text of " + std::to_string(t_.size()) +
                         " bytes exceeds the limit of " + std::to_string(lim_.max_text));
    space(true);
    while (p_ < t_.size()) {
      const size_t at = p_;
      if (!name_char(t_[p_])) fail(p_, "expected a rule name");
      std::string name = parse_name();
      space(false);
      if (t_.substr(p_, 3) != "::=") fail(p_, "expected '::=' after rule name '" + name + "'");
      p_ += 3;
      space(true);
      const uint32_t id = rule_id(name, at, false);
      if (defined_[id]) fail(at, "rule '" + name + "' is defined twice");
      defined_[id] = true;
      auto alts = alternates(name, 0);
      rules_[id] = std::move(alts);
      space(false);
      if (p_ < t_.size() && t_[p_] != '\n' && t_[p_] != '\r')
        fail(p_, std::string("unexpected character '") + t_[p_] + "'");
      space(true);
    }
    for (size_t i = 0; i < names_.size(); ++i)
      if (!defined_[i]) fail(first_ref_[i], "undefined rule '" + names_[i] + "'");
    auto it = ids_.find("root");
    if (it == ids_.end()) throw GrammarError("grammar: no 'root' rule");
    std::vector<Grammar::Copy> copies = copy_items();
    Grammar g;
    g.names = names_;
    g.root = it->second;
    g.ranges = std::move(ranges_);
    g.alts.resize(rules_.size());
    for (size_t r = 0; r < rules_.size(); ++r)
      for (auto& alt : rules_[r]) {
        g.alts[r].push_back(static_cast<uint32_t>(g.elems.size()));
        for (auto& e : alt) g.elems.push_back(e);
        g.elems.push_back(Elem{});
      }
    for (Grammar::Copy& c : copies) {  // its rules -> their elements, END elements included
      std::vector<uint32_t> elems;
      for (uint32_t r : c.elems)
        for (uint32_t a : g.alts[r])
          for (uint32_t i = a;; ++i) {
            elems.push_back(i);
            if (g.elems[i].kind == Elem::END) break;
          }
      c.elems = std::move(elems);
    }
    g.copies = std::move(copies);
    check_left_recursion(g);
    return g;
  }

 private:
  using Seq = std::vector<Elem>;
  std::string_view t_;
  Limits lim_;
  size_t p_ = 0;
  std::unordered_map<std::string, uint32_t> ids_;
  std::vector<std::string> names_;
  std::vector<bool> defined_;
  std::vector<size_t> first_ref_;
  std::vector<std::vector<Seq>> rules_;
  std::vector<std::pair<uint32_t, uint32_t>> ranges_;
  size_t n_elems_ = 0;
  uint32_t gen_ = 0;
  // A repetition of a rule: the item, and its copies (elems: the copy's placeholder rule).
  struct Family {
    uint32_t item;
    std::vector<Grammar::Copy> copies;
  };
  std::vector<Family> families_;

  [[noreturn]] void fail(size_t at, const std::string& msg) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < at && i < t_.size(); ++i) {
      if (t_[i] == '\n') { ++line; col = 1; } else { ++col; }
    }
    std::string m = "grammar:";
    m += std::to_string(line);
    m += ":";
    m += std::to_string(col);
    m += ": ";
    m += msg;
    throw GrammarError(m);
  }

  void count(size_t n) {
    n_elems_ += n;
    if (n_elems_ > lim_.max_elements)
      fail(p_, "grammar exceeds " + std::to_string(lim_.max_elements) + " elements");
  }

  uint32_t rule_id(const std::string& name, size_t at, bool /*reference*/) {
    auto it = ids_.find(name);
    if (it != ids_.end()) return it->second;
    if (names_.size() >= lim_.max_rules) fail(at, "more than " + std::to_string(lim_.max_rules) + " rules");
    const uint32_t id = static_cast<uint32_t>(names_.size());
    ids_.emplace(name, id);
    names_.push_back(name);
    defined_.push_back(false);
    first_ref_.push_back(at);
    rules_.emplace_back();
    return id;
  }
  uint32_t new_rule(const std::string& base, std::vector<Seq> alts) {
    std::string name = base + "_" + std::to_string(++gen_);
    while (ids_.count(name)) name = base + "_" + std::to_string(++gen_);
    const uint32_t id = rule_id(name, p_, false);
    defined_[id] = true;
    for (auto& a : alts) count(a.size() + 1);
    rules_[id] = std::move(alts);
    return id;
  }

  void space(bool newline_ok) {
    while (p_ < t_.size()) {
      const char c = t_[p_];
      if (c == ' ' || c == '\t') { ++p_; continue; }
      if (c == '#') {
        while (p_ < t_.size() && t_[p_] != '\n' && t_[p_] != '\r') ++p_;
        continue;
      }
      if ((c == '\n' || c == '\r') && newline_ok) { ++p_; continue; }
      break;
    }
  }

  std::string parse_name() {
    const size_t s = p_;
    while (p_ < t_.size() && name_char(t_[p_])) ++p_;
    return std::string(t_.substr(s, p_ - s));
  }

  uint32_t hex(size_t digits) {
    uint32_t v = 0;
    for (size_t i = 0; i < digits; ++i) {
      if (p_ >= t_.size()) fail(p_, "unexpected end of input in escape");
      const char c = t_[p_];
      uint32_t d;
      if (c >= '0' && c <= '9') d = static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') d = static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = static_cast<uint32_t>(c - 'A' + 10);
      else fail(p_, std::string("invalid hex digit '") + c + "'");
      v = v * 16 + d;
      ++p_;
    }
    if (v > 0x10FFFF) fail(p_, "code point out of range");
    return v;
  }

  // One character of a literal or class: an escape or one UTF-8 encoded code point.
  uint32_t parse_char() {
    if (p_ >= t_.size()) fail(p_, "unexpected end of input");
    const auto c = static_cast<unsigned char>(t_[p_]);
    if (c == '\\') {
      ++p_;
      if (p_ >= t_.size()) fail(p_, "unexpected end of input in escape");
      const char e = t_[p_++];
      switch (e) {
        case 'n': return '\n';
        case 'r': return '\r';
        case 't': return '\t';
        case '\\': case '"': case '\'': case '[': case ']': case '-': case '^': return static_cast<uint32_t>(e);
        case 'x': return hex(2);
        case 'u': return hex(4);
        case 'U': return hex(8);
        default: fail(p_ - 1, std::string("unknown escape '\\") + e + "'");
      }
    }
    if (c < 0x80) { ++p_; return c; }
    int need = c >= 0xF0 && c <= 0xF4 ? 3 : c >= 0xE0 ? 2 : c >= 0xC2 && c <= 0xDF ? 1 : -1;
    if (c > 0xF4 || need < 0) fail(p_, "invalid UTF-8");
    uint32_t cp = c & (0x3F >> need);
    const size_t at = p_++;
    for (int i = 0; i < need; ++i) {
      if (p_ >= t_.size() || (static_cast<unsigned char>(t_[p_]) & 0xC0) != 0x80) fail(at, "invalid UTF-8");
      cp = (cp << 6) | (static_cast<unsigned char>(t_[p_++]) & 0x3F);
    }
    return cp;
  }

  Elem chars(std::vector<std::pair<uint32_t, uint32_t>> rs, bool neg) {
    Elem e;
    e.kind = Elem::CHARS;
    e.negated = neg;
    e.rfirst = static_cast<uint32_t>(ranges_.size());
    e.rcount = static_cast<uint32_t>(rs.size());
    for (auto& r : rs) ranges_.push_back(r);
    return e;
  }
  static Elem ref(uint32_t id) {
    Elem e;
    e.kind = Elem::REF;
    e.ref = id;
    return e;
  }

  uint32_t number() {
    const size_t s = p_;
    uint64_t v = 0;
    while (p_ < t_.size() && t_[p_] >= '0' && t_[p_] <= '9') {
      v = v * 10 + static_cast<uint64_t>(t_[p_] - '0');
      if (v > lim_.max_repeat) fail(s, "repetition count exceeds " + std::to_string(lim_.max_repeat));
      ++p_;
    }
    if (p_ == s) fail(p_, "expected a number");
    return static_cast<uint32_t>(v);
  }

  std::vector<Seq> alternates(const std::string& rule, int depth) {
    std::vector<Seq> alts;
    alts.push_back(sequence(rule, depth));
    while (p_ < t_.size() && t_[p_] == '|') {
      ++p_;
      space(true);
      alts.push_back(sequence(rule, depth));
    }
    return alts;
  }

  Seq sequence(const std::string& rule, int depth) {
    Seq seq;
    size_t last = SIZE_MAX;  // start of the last item, for postfix operators
    const bool nested = depth > 0;
    while (p_ < t_.size()) {
      const char c = t_[p_];
      const size_t at = p_;
      if (c == '"') {
        ++p_;
        last = seq.size();
        while (true) {
          if (p_ >= t_.size()) fail(at, "unterminated string literal");
          if (t_[p_] == '"') { ++p_; break; }
          const uint32_t cp = parse_char();
          count(1);
          seq.push_back(chars({{cp, cp}}, false));
        }
      } else if (c == '[') {
        ++p_;
        bool neg = false;
        if (p_ < t_.size() && t_[p_] == '^') { neg = true; ++p_; }
        std::vector<std::pair<uint32_t, uint32_t>> rs;
        while (true) {
          if (p_ >= t_.size()) fail(at, "unterminated character class");
          if (t_[p_] == ']') { ++p_; break; }
          const uint32_t lo = parse_char();
          uint32_t hi = lo;
          if (p_ + 1 < t_.size() && t_[p_] == '-' && t_[p_ + 1] != ']') {
            ++p_;
            hi = parse_char();
            if (hi < lo) fail(at, "character range is reversed");
          }
          rs.emplace_back(lo, hi);
          if (rs.size() > 4096) fail(at, "character class too large");
        }
        count(1);
        last = seq.size();
        seq.push_back(chars(std::move(rs), neg));
      } else if (c == '.') {
        ++p_;
        count(1);
        last = seq.size();
        seq.push_back(chars({{0, 0x10FFFF}}, false));
      } else if (name_char(c)) {
        std::string name = parse_name();
        count(1);
        last = seq.size();
        seq.push_back(ref(rule_id(name, at, true)));
      } else if (c == '(') {
        if (depth + 1 > lim_.max_nesting)
          fail(at, "parentheses nested deeper than " + std::to_string(lim_.max_nesting));
        ++p_;
        space(true);
        auto alts = alternates(rule, depth + 1);
        if (p_ >= t_.size() || t_[p_] != ')') fail(p_, "expected ')'");
        ++p_;
        count(1);
        last = seq.size();
        seq.push_back(ref(new_rule(rule, std::move(alts))));
      } else if (c == '*' || c == '+' || c == '?' || c == '{') {
        if (last == SIZE_MAX) fail(at, std::string("repetition operator '") + c + "' without a preceding item");
        ++p_;
        uint32_t lo = 0, hi = 0;
        bool unbounded = false;
        if (c == '*') { unbounded = true; }
        else if (c == '+') { lo = 1; unbounded = true; }
        else if (c == '?') { hi = 1; }
        else {
          space(nested);
          lo = number();
          space(nested);
          if (p_ < t_.size() && t_[p_] == ',') {
            ++p_;
            space(nested);
            if (p_ < t_.size() && t_[p_] == '}') unbounded = true;
            else hi = number();
          } else {
            hi = lo;
          }
          space(nested);
          if (p_ >= t_.size() || t_[p_] != '}') fail(p_, "expected '}'");
          ++p_;
          if (!unbounded && hi < lo) fail(at, "repetition {m,n} with n < m");
        }
        repeat(rule, seq, last, lo, hi, unbounded);
        last = SIZE_MAX;  // x** is an error, as in llama.cpp
      } else {
        break;
      }
      space(nested);
    }
    return seq;
  }

  // Replaces seq[last, end) by `lo` copies then up to hi - lo more (or any more when unbounded).
  void repeat(const std::string& rule, Seq& seq, size_t last, uint32_t lo, uint32_t hi, bool unbounded) {
    Seq item(seq.begin() + static_cast<std::ptrdiff_t>(last), seq.end());
    seq.resize(last);
    if (item.empty()) return;  // "" repeated is still ""
    if (item.size() > 1) item = Seq{ref(new_rule(rule, {item}))};
    const Elem x = item[0];
    // A rule repeated more than once gets a placeholder rule per copy, filled by copy_items().
    const bool copies = x.kind == Elem::REF && lo + (unbounded ? 1 : hi - lo) >= 2;
    if (copies) families_.push_back(Family{x.ref, {}});
    auto copy = [&](Grammar::Copy::Kind kind, uint32_t min_after, uint32_t max_after) {
      if (!copies) return x;
      const uint32_t p = hidden_rule(names_[x.ref], {Seq{x}});
      families_.back().copies.push_back(Grammar::Copy{static_cast<uint32_t>(families_.size() - 1), kind, min_after,
                                                      max_after, {p}});
      return ref(p);
    };
    count(lo);
    for (uint32_t i = 0; i < lo; ++i)
      seq.push_back(copy(Grammar::Copy::REQUIRED, lo - i - 1, unbounded ? UINT32_MAX : hi - i - 1));
    if (unbounded) {
      // S ::= x S | (empty)
      const uint32_t s = new_rule(rule, {Seq{}, Seq{}});
      rules_[s][0] = Seq{copy(Grammar::Copy::STAR, 0, UINT32_MAX), ref(s)};
      count(2);
      seq.push_back(ref(s));
    } else if (hi > lo) {
      // O_1 ::= x | (empty);  O_k ::= x O_{k-1} | (empty)
      uint32_t prev = new_rule(rule, {Seq{copy(Grammar::Copy::OPTIONAL, 0, 0)}, Seq{}});
      for (uint32_t k = 2; k <= hi - lo; ++k)
        prev = new_rule(rule, {Seq{copy(Grammar::Copy::OPTIONAL, 0, k - 1), ref(prev)}, Seq{}});
      count(1);
      seq.push_back(ref(prev));
    }
  }

  // A rule no text can name (its name holds '#'), for the copies of repeated rules. Outside
  // the limits (copy_items() checks them before cloning): a placeholder is no more than the
  // repetition's own rules, and a grammar that fit before still fits.
  uint32_t hidden_rule(const std::string& base, std::vector<Seq> alts) {
    const auto id = static_cast<uint32_t>(names_.size());
    names_.push_back(base + "#" + std::to_string(++gen_));
    defined_.push_back(true);
    first_ref_.push_back(p_);
    rules_.push_back(std::move(alts));
    return id;
  }

  // Rules that match the empty string, by a worklist (linear): an alternative holding a
  // character class never becomes nullable, the others count their references not yet known
  // nullable.
  std::vector<char> nullable_rules() const {
    const size_t n = rules_.size();
    std::vector<char> nullable(n, 0);
    std::vector<std::pair<uint32_t, uint32_t>> alts;  // (rule, references not yet known nullable)
    std::vector<std::vector<uint32_t>> users(n);       // rule -> alternatives referencing it
    std::vector<uint32_t> queue;
    for (uint32_t r = 0; r < n; ++r)
      for (const Seq& a : rules_[r]) {
        if (std::any_of(a.begin(), a.end(), [](const Elem& e) { return e.kind == Elem::CHARS; })) continue;
        const auto ai = static_cast<uint32_t>(alts.size());
        alts.emplace_back(r, static_cast<uint32_t>(a.size()));
        for (const Elem& e : a) users[e.ref].push_back(ai);
        if (a.empty() && !nullable[r]) {
          nullable[r] = 1;
          queue.push_back(r);
        }
      }
    while (!queue.empty()) {
      const uint32_t r = queue.back();
      queue.pop_back();
      for (uint32_t ai : users[r])
        if (--alts[ai].second == 0 && !nullable[alts[ai].first]) {
          nullable[alts[ai].first] = 1;
          queue.push_back(alts[ai].first);
        }
    }
    return nullable;
  }

  // Fills the placeholders of each repetition of a rule x (repeat()) with a clone of x and of
  // the rules only x's rule reaches (each referenced once, from within), and returns the copies
  // for Grammar::copies (elems: their rules, until run() lays out the elements). A repetition
  // of a nullable x, or of one too large to clone, keeps referencing x itself.
  std::vector<Grammar::Copy> copy_items() {
    constexpr size_t kMaxCopy = 256;  // elements of x's rules, per copy
    std::vector<Grammar::Copy> out;
    if (families_.empty()) return out;
    const std::vector<char> nullable = nullable_rules();
    std::vector<uint32_t> refs(rules_.size(), 0);  // references to each rule
    for (const auto& alts : rules_)
      for (const Seq& a : alts)
        for (const Elem& e : a)
          if (e.kind == Elem::REF) ++refs[e.ref];
    const uint32_t root = ids_.at("root");
    // x's rule and the rules only it reaches, stopping past kMaxCopy elements (`elems`).
    auto closure_of = [&](uint32_t item, size_t& elems) {
      std::vector<uint32_t> closure{item};
      elems = 0;
      for (size_t i = 0; i < closure.size() && elems <= kMaxCopy; ++i)
        for (const Seq& a : rules_[closure[i]]) {
          elems += a.size() + 1;
          for (const Elem& e : a)
            if (e.kind == Elem::REF && e.ref != root && refs[e.ref] == 1 &&
                std::find(closure.begin(), closure.end(), e.ref) == closure.end())
              closure.push_back(e.ref);
        }
      return closure;
    };
    std::vector<uint32_t> family_of(rules_.size(), UINT32_MAX);  // placeholder rule -> its family
    for (uint32_t fi = 0; fi < families_.size(); ++fi)
      for (const Grammar::Copy& c : families_[fi].copies) family_of[c.elems[0]] = fi;
    std::vector<char> started(families_.size(), 0);
    // A repetition inside x is filled before x is cloned, so that the clones copy its clones
    // (x's rule may come before the inner repetition's in the text). Nesting past 64 keeps the
    // text's order: only slower masks.
    auto fill = [&](auto&& self, uint32_t fi, int depth) -> void {
      if (started[fi]) return;
      started[fi] = 1;
      Family& f = families_[fi];
      size_t elems = 0;
      std::vector<uint32_t> closure = closure_of(f.item, elems);
      bool inner = false;
      for (uint32_t r : closure)
        if (depth < 64 && r < family_of.size() && family_of[r] != UINT32_MAX && !started[family_of[r]]) {
          self(self, family_of[r], depth + 1);
          inner = true;
        }
      if (inner) closure = closure_of(f.item, elems);
      const size_t n = f.copies.size();
      if (nullable[f.item] || elems > kMaxCopy || n_elems_ + n * elems > lim_.max_elements ||
          names_.size() + n * closure.size() > lim_.max_rules) {
        std::vector<char> placeholder(rules_.size(), 0);
        for (const Grammar::Copy& c : f.copies) placeholder[c.elems[0]] = 1;
        for (auto& alts : rules_)
          for (Seq& a : alts)
            for (Elem& e : a)
              if (e.kind == Elem::REF && e.ref < placeholder.size() && placeholder[e.ref]) e.ref = f.item;
        return;
      }
      std::vector<std::vector<Seq>> originals;
      for (uint32_t r : closure) originals.push_back(rules_[r]);
      for (Grammar::Copy& c : f.copies) {
        std::vector<uint32_t> ids{c.elems[0]};  // closure[i]'s clone
        for (size_t i = 1; i < closure.size(); ++i) ids.push_back(hidden_rule(names_[closure[i]], {}));
        for (size_t i = 0; i < closure.size(); ++i) {
          std::vector<Seq> alts = originals[i];
          for (Seq& a : alts)
            for (Elem& e : a) {
              if (e.kind != Elem::REF) continue;
              const auto at = std::find(closure.begin(), closure.end(), e.ref);
              if (at != closure.end()) e.ref = ids[static_cast<size_t>(at - closure.begin())];
            }
          for (const Seq& a : alts) n_elems_ += a.size() + 1;
          rules_[ids[i]] = std::move(alts);
        }
        refs.resize(rules_.size(), 1);
        c.elems = std::move(ids);
        out.push_back(c);
      }
    };
    for (uint32_t fi = 0; fi < families_.size(); ++fi) fill(fill, fi, 0);
    return out;
  }

  void check_left_recursion(const Grammar& g) {
    const size_t n = g.alts.size();
    const std::vector<char> nullable = nullable_rules();  // rules_ holds g's rules, in order
    // Edges r -> s: s may begin r. A cycle is left recursion. Iterative DFS.
    std::vector<std::vector<uint32_t>> edges(n);
    for (size_t r = 0; r < n; ++r)
      for (uint32_t a : g.alts[r])
        for (uint32_t i = a; g.elems[i].kind == Elem::REF; ++i) {
          edges[r].push_back(g.elems[i].ref);
          if (!nullable[g.elems[i].ref]) break;
        }
    std::vector<char> color(n, 0);
    std::vector<uint32_t> parent(n, UINT32_MAX);
    for (uint32_t s = 0; s < n; ++s) {
      if (color[s]) continue;
      std::vector<std::pair<uint32_t, size_t>> st{{s, 0}};
      color[s] = 1;
      while (!st.empty()) {
        auto& [r, i] = st.back();
        if (i < edges[r].size()) {
          const uint32_t t = edges[r][i++];
          if (color[t] == 1) {
            std::string cyc = g.names[t];
            std::vector<std::string> path;
            for (uint32_t x = r; x != t && x != UINT32_MAX; x = parent[x]) path.push_back(g.names[x]);
            for (auto it = path.rbegin(); it != path.rend(); ++it) { cyc += " -> "; cyc += *it; }
            cyc += " -> ";
            cyc += g.names[t];
            throw GrammarError("grammar: left recursion is not supported: " + cyc +
                               " (rewrite it with repetition, e.g. x ::= y (\"op\" y)*)");
          }
          if (color[t] == 0) {
            color[t] = 1;
            parent[t] = r;
            st.emplace_back(t, 0);
          }
        } else {
          color[r] = 2;
          st.pop_back();
        }
      }
    }
  }
};

}  // namespace

Grammar parse_gbnf(std::string_view text, const Limits& limits) { return Parser(text, limits).run(); }

// ---- matcher ----

bool State::can_complete() const {
  if (partial_need != 0) return false;
  for (const auto& s : stacks)
    if (s.empty()) return true;
  return false;
}

Matcher::Matcher(const Grammar& g, const Limits& limits) : g_(&g), lim_(limits) {}

void Matcher::expand(Stack s, std::vector<Stack>& out) const {
  std::vector<Stack> work;
  work.push_back(std::move(s));
  while (!work.empty()) {
    Stack cur = std::move(work.back());
    work.pop_back();
    if (cur.empty()) { out.push_back(std::move(cur)); continue; }
    if (cur.size() > lim_.max_stack_depth)
      throw GrammarError("grammar: parse stack deeper than " + std::to_string(lim_.max_stack_depth));
    const uint32_t top = cur.back();
    const Elem& e = g_->elems[top];
    if (e.kind == Elem::CHARS) { out.push_back(std::move(cur)); continue; }
    cur.pop_back();
    if (g_->elems[top + 1].kind != Elem::END) cur.push_back(top + 1);
    const auto& alts = g_->alts[e.ref];
    for (size_t i = 0; i < alts.size(); ++i) {
      Stack n = (i + 1 == alts.size()) ? std::move(cur) : cur;
      if (g_->elems[alts[i]].kind != Elem::END) n.push_back(alts[i]);
      work.push_back(std::move(n));
    }
    if (out.size() + work.size() > 4 * lim_.max_stacks)
      throw GrammarError("grammar: more than " + std::to_string(lim_.max_stacks) +
                         " live parse stacks (the grammar is too ambiguous)");
  }
}

static void normalise(std::vector<Stack>& v, size_t max) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  if (v.size() > max)
    throw GrammarError("grammar: more than " + std::to_string(max) +
                       " live parse stacks (the grammar is too ambiguous)");
}

State Matcher::initial() const {
  State s;
  for (uint32_t a : g_->alts[g_->root]) {
    Stack st;
    if (g_->elems[a].kind != Elem::END) st.push_back(a);
    expand(std::move(st), s.stacks);
  }
  normalise(s.stacks, lim_.max_stacks);
  return s;
}

void Matcher::advance_cp(const std::vector<Stack>& in, uint32_t cp, std::vector<Stack>& out) const {
  out.clear();
  for (const auto& s : in) {
    if (s.empty()) continue;
    const uint32_t top = s.back();
    if (!g_->matches(g_->elems[top], cp)) continue;
    Stack n(s.begin(), s.end() - 1);
    if (g_->elems[top + 1].kind != Elem::END) n.push_back(top + 1);
    expand(std::move(n), out);
  }
  if (out.size() > 1) normalise(out, lim_.max_stacks);
}

bool Matcher::partial_ok(const State& s) const {
  for (const auto& st : s.stacks)
    if (!st.empty() && g_->may_match_pending(g_->elems[st.back()], s.partial_cp, s.partial_need, s.partial_len))
      return true;
  return false;
}

bool Matcher::advance_byte(const State& in, uint8_t b, State& out) const {
  if (in.partial_need == 0) {
    if (b < 0x80) {
      advance_cp(in.stacks, b, out.stacks);
      out.partial_need = out.partial_len = 0;
      out.partial_cp = 0;
      return !out.stacks.empty();
    }
    const uint8_t need = utf8_need(b);
    if (need == 0) { out.stacks.clear(); return false; }
    out.stacks = in.stacks;
    out.partial_cp = b & (0x3Fu >> need);
    out.partial_need = need;
    out.partial_len = 1;
    if (!partial_ok(out)) { out.stacks.clear(); return false; }
    return true;
  }
  if ((b & 0xC0) != 0x80) { out.stacks.clear(); return false; }
  const uint32_t cp = (in.partial_cp << 6) | (b & 0x3Fu);
  const uint8_t need = static_cast<uint8_t>(in.partial_need - 1);
  const uint8_t len = static_cast<uint8_t>(in.partial_len + 1);
  if (need == 0) {
    if (!utf8_valid(cp, len)) { out.stacks.clear(); return false; }
    advance_cp(in.stacks, cp, out.stacks);
    out.partial_need = out.partial_len = 0;
    out.partial_cp = 0;
    return !out.stacks.empty();
  }
  out.stacks = in.stacks;
  out.partial_cp = cp;
  out.partial_need = need;
  out.partial_len = len;
  if (!partial_ok(out)) { out.stacks.clear(); return false; }
  return true;
}

bool Matcher::advance(State& s, std::string_view bytes) const {
  State t;
  for (char c : bytes) {
    if (!advance_byte(s, static_cast<uint8_t>(c), t)) { s.stacks.clear(); return false; }
    std::swap(s, t);
  }
  return !s.stacks.empty();
}

}  // namespace loomp::grammar
