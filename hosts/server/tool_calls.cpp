#include "tool_calls.hpp"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string_view>

#include <nlohmann/json.hpp>

#include "json_duplicates.hpp"
#include "json_guard.hpp"

namespace loom::server {

namespace {

using json = nlohmann::ordered_json;

std::string dump(const json &j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

const ToolDef *find_tool(const std::vector<ToolDef> &tools, const std::string &name) {
  for (const auto &t : tools)
    if (t.name == name) return &t;
  return nullptr;
}

// One call object ({"name", "arguments"} or {"name", "parameters"}) naming a known tool. An
// object with a key written twice is none (which value was meant is unknown; the parser would
// keep the last, a stream has sent the first).
bool read_call(const std::string &text, const std::vector<ToolDef> &tools, std::vector<ToolCall> &out) {
  if (loom::detail::json_too_deep(text, 64)) return false;
  loom::detail::DuplicateKey repeated;
  const json j = json::parse(text, loom::detail::duplicate_key_finder<json>(repeated), false);
  if (repeated.found || j.is_discarded() || !j.is_object() || !j.contains("name") || !j["name"].is_string()) return false;
  const std::string name = j["name"].get<std::string>();
  if (!find_tool(tools, name)) return false;
  json arguments = json::object();
  if (j.contains("arguments")) arguments = j["arguments"];
  else if (j.contains("parameters")) arguments = j["parameters"];
  if (arguments.is_string()) { // some models write the arguments as a JSON string, as the API does
    arguments = json::parse(arguments.get<std::string>(), nullptr, false);
    if (arguments.is_discarded()) return false;
  }
  if (!arguments.is_object()) return false;
  out.push_back({name, dump(arguments)});
  return true;
}

std::string trim(const std::string &s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

} // namespace

std::string tool_system_prompt(const std::vector<ToolDef> &tools) {
  std::string text =
      "You may call functions to answer. To call one, reply with only\n"
      "<tool_call>{\"name\": FUNCTION_NAME, \"arguments\": {ARGUMENTS}}</tool_call>\n"
      "(one such line per call). The functions:\n";
  for (const auto &t : tools) {
    json f = {{"name", t.name}, {"description", t.description}, {"parameters", json::parse(t.parameters_json)}};
    text += dump(f) + "\n";
  }
  return text;
}

std::string render_tool_calls(const std::vector<ToolCall> &calls) {
  std::string text;
  for (const auto &c : calls) {
    json args = json::parse(c.arguments_json, nullptr, false);
    if (args.is_discarded()) args = c.arguments_json;
    if (!text.empty()) text += '\n';
    text.append("<tool_call>").append(dump(json{{"name", c.name}, {"arguments", args}})).append("</tool_call>");
  }
  return text;
}

std::string render_tool_result(const std::string &content) {
  return std::string("<tool_response>\n").append(content).append("\n</tool_response>");
}

std::string tool_call_schema(const std::vector<ToolDef> &tools) {
  json branches = json::array();
  for (const auto &t : tools) {
    json parameters = json::parse(t.parameters_json);
    if (parameters.empty()) parameters = {{"type", "object"}, {"properties", json::object()}};
    branches.push_back({{"type", "object"},
                        {"properties", {{"name", {{"const", t.name}}}, {"arguments", parameters}}},
                        {"required", {"name", "arguments"}}});
  }
  return dump(branches.size() == 1 ? branches[0] : json{{"anyOf", branches}});
}

namespace {
const std::string kOpenTag = "<tool_call>", kCloseTag = "</tool_call>";
} // namespace

std::vector<ToolCall> parse_tool_calls(const std::string &text, const std::vector<ToolDef> &tools) {
  std::vector<ToolCall> calls;
  size_t at = 0;
  while ((at = text.find(kOpenTag, at)) != std::string::npos) {
    const size_t begin = at + kOpenTag.size();
    const size_t end = text.find(kCloseTag, begin);
    read_call(trim(text.substr(begin, end == std::string::npos ? std::string::npos : end - begin)), tools, calls);
    if (end == std::string::npos) break;
    at = end + kCloseTag.size();
  }
  if (calls.empty()) read_call(trim(text), tools, calls);
  return calls;
}

namespace {

// The end of text[0, end) without its trailing whitespace.
size_t before_trailing_space(const std::string &text, size_t end) {
  while (end > 0 && std::string_view(" \t\r\n").find(text[end - 1]) != std::string_view::npos) --end;
  return end;
}

} // namespace

std::string reply_content(const std::string &text, const std::vector<ToolCall> &calls) {
  if (calls.empty()) return text;
  const size_t tag = text.find(kOpenTag);
  return tag == std::string::npos ? std::string() : text.substr(0, before_trailing_space(text, tag));
}

namespace {

// One complete JSON token at a time from a text that may end anywhere (a reply so far).
class JsonTokens {
 public:
  enum class Status { ok, incomplete, bad };
  // scanned: when an earlier, shorter text ended inside a string token starting at `from`, the
  // offset its scan for the closing quote reached then (string_scanned()), so that a growing
  // string is not read again from its quote; 0 (or any offset not past `from`) otherwise.
  JsonTokens(std::string_view text, size_t from, size_t scanned) : t_(text), at_(from), from_(from), scanned_(scanned) {}
  // The next token (whitespace skipped) in `token`; incomplete: the text ends inside it or
  // before it (a number is complete only once something follows it).
  Status next(std::string_view &token) {
    while (at_ < t_.size() && std::string_view(" \t\r\n").find(t_[at_]) != std::string_view::npos) ++at_;
    if (at_ == t_.size()) return Status::incomplete;
    const size_t from = at_;
    const char c = t_[at_];
    if (std::string_view("{}[]:,").find(c) != std::string_view::npos) {
      ++at_;
    } else if (c == '"') {
      size_t i = from == from_ && scanned_ > from ? scanned_ : at_ + 1;
      while (i < t_.size() && t_[i] != '"') i += t_[i] == '\\' ? 2 : 1;
      if (i >= t_.size()) {
        scanned_ = i;  // (past the end when the text ends in a backslash: the next byte is escaped)
        return Status::incomplete;
      }
      at_ = i + 1;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      size_t i = at_;
      while (i < t_.size() && std::string_view("0123456789+-.eE").find(t_[i]) != std::string_view::npos) ++i;
      if (i == t_.size()) return Status::incomplete;
      at_ = i;
    } else {
      for (const std::string_view literal : {"true", "false", "null"}) {
        const std::string_view rest = t_.substr(at_, literal.size());
        if (rest == literal) {
          at_ += literal.size();
          token = t_.substr(from, at_ - from);
          return Status::ok;
        }
        if (rest.size() < literal.size() && literal.starts_with(rest)) return Status::incomplete;
      }
      return Status::bad;
    }
    token = t_.substr(from, at_ - from);
    return Status::ok;
  }
  // Where the next token starts (after the last one returned; after next() said incomplete,
  // whitespace skipped).
  size_t position() const { return at_; }
  // After next() said incomplete inside a string: where its scan for the closing quote stopped.
  size_t string_scanned() const { return scanned_; }

 private:
  std::string_view t_;
  size_t at_ = 0, from_ = 0;
  size_t scanned_ = 0;
};

// A string or number token written as the whole response's dump() writes it (each parsed on
// its own, as the whole parse does); false where it is not valid JSON.
bool compact_token(std::string_view token, std::string &out) {
  if (std::string_view("{}[]:,").find(token[0]) != std::string_view::npos || token[0] == 't' || token[0] == 'f' ||
      token[0] == 'n') {
    out.append(token);
    return true;
  }
  const json j = json::parse(token, nullptr, false);
  if (j.is_discarded()) return false;
  out += dump(j);
  return true;
}

// The raw bytes [from, end) of an open string (`raw` from its opening quote) that are whole
// characters: `end` is the last boundary (an escape once complete, a surrogate pair once both
// halves are, a UTF-8 character once all its bytes are).
size_t whole_characters(std::string_view raw, size_t from) {
  size_t end = from, i = from;
  while (i < raw.size()) {
    if (raw[i] == '\\') {
      if (i + 1 >= raw.size()) break;
      if (raw[i + 1] != 'u') {
        i += 2;
      } else {
        if (i + 6 > raw.size()) break;
        const unsigned long unit = std::strtoul(std::string(raw.substr(i + 2, 4)).c_str(), nullptr, 16);
        i += 6;
        if (unit >= 0xD800 && unit <= 0xDBFF) {  // a high surrogate: its low half too
          if (i + 6 > raw.size()) break;
          i += 6;
        }
      }
    } else {  // a UTF-8 character: as many bytes as its first announces
      const auto lead = static_cast<unsigned char>(raw[i]);
      const size_t bytes = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
      if (i + bytes > raw.size()) break;
      i += bytes;
    }
    end = i;
  }
  return end;
}

constexpr size_t kBareAt = std::string::npos - 1; // open_at_ of a reply that is one bare call object

} // namespace

// What the open call object written so far tells: its "name" (complete, and before
// "arguments") and, where "arguments" follows the name and holds an object, that object's
// compact text so far. Kept between updates (the text up to `safe` is final), so that each
// update lexes only what is new: a complete token once, an open string from where its last scan
// stopped, and only the new bytes of the arguments are handed out (take_new).
struct ToolCallStream::Scanner {
  enum class Phase { brace, key, colon, value, skip, comma, args, done };
  Phase phase = Phase::brace;
  size_t pos = 0;  // where the next token starts in the body
  std::string key; // the key whose value comes next
  std::optional<std::string> name;
  std::string open;        // arguments: the containers open ('{' or '[')
  bool value_next = false; // ... and whether the next token is a value (after ':', or in an array)
  int skip_depth = 0;      // another key's container value, skipped
  std::string compact;     // arguments: the compact text of their complete tokens
  // A string value of the arguments still open: its quote's offset in the body, the raw bytes
  // of it written so far, and their compact text (from its opening quote).
  size_t string_at = std::string::npos, string_cut = 0;
  std::string string_compact;
  // When the body so far ends inside a string token (a key, a skipped value, an argument) at
  // pos: where its scan for the closing quote stopped.
  size_t lexed = 0;

  // Appends to `out` the arguments' bytes past the first `sent` (compact, then the open string's
  // compact text). A string value's pieces join to the dump of the whole string, so the arguments
  // only grow; a string that turns out invalid ends the scan (phase done) with compact short of
  // what was sent, and nothing more goes out.
  void take_new(size_t sent, std::string &out) const {
    const std::string_view partial = string_at == std::string::npos ? std::string_view() : std::string_view(string_compact);
    if (compact.size() + partial.size() <= sent) return;
    if (sent < compact.size()) {
      out.append(compact, sent);
      out.append(partial);
    } else {
      out.append(partial.substr(sent - compact.size()));
    }
  }

  void advance(std::string_view body) {
    using S = JsonTokens::Status;
    JsonTokens tokens(body, pos, lexed);
    std::string_view t;
    while (phase != Phase::done) {
      const S status = tokens.next(t);
      if (status == S::bad) phase = Phase::done;
      if (status != S::ok) {
        const size_t at = tokens.position();
        if (status == S::incomplete && at < body.size() && body[at] == '"') {
          pos = at;
          lexed = tokens.string_scanned();
          if (phase == Phase::args && value_next) open_string(body, at);
        }
        return;
      }
      string_at = std::string::npos;
      take(t);
      pos = tokens.position();
    }
  }

 private:
  // A string token's value; none for any other token.
  static std::optional<std::string> string_token(std::string_view t) {
    if (t[0] != '"') return std::nullopt;
    const json j = json::parse(t, nullptr, false);
    if (!j.is_string()) return std::nullopt;
    return j.get<std::string>();
  }
  void take(std::string_view t) {
    switch (phase) {
      case Phase::brace:
        phase = t == "{" ? Phase::key : Phase::done;
        return;
      case Phase::key:
        if (std::optional<std::string> k = string_token(t)) {
          key = std::move(*k);
          phase = Phase::colon;
        } else {
          phase = Phase::done;
        }
        return;
      case Phase::colon:
        phase = t == ":" ? Phase::value : Phase::done;
        return;
      case Phase::value:
        if (key == "name" && !name) {
          name = string_token(t);
          phase = name ? Phase::comma : Phase::done;
        } else if (key == "arguments" && name) {
          if (t != "{") {
            phase = Phase::done;  // arguments as a string, an array, ...: whole at the close
            return;
          }
          compact.assign(1, '{');
          open.assign(1, '{');
          value_next = false;
          phase = Phase::args;
        } else if (t == "{" || t == "[") {
          skip_depth = 1;
          phase = Phase::skip;
        } else {
          phase = Phase::comma;
        }
        return;
      case Phase::skip:
        if (t == "{" || t == "[") ++skip_depth;
        else if (t == "}" || t == "]") --skip_depth;
        if (skip_depth == 0) phase = Phase::comma;
        return;
      case Phase::comma:
        phase = t == "," ? Phase::key : Phase::done;
        return;
      case Phase::args:
        if (!compact_token(t, compact)) {
          phase = Phase::done;
          return;
        }
        if (t == "{" || t == "[") {
          open.push_back(t[0]);
          if (open.size() > 64) phase = Phase::done;  // (read_call refuses such depth)
        } else if (t == "}" || t == "]") {
          open.pop_back();
          if (open.empty()) phase = Phase::done;  // nothing after the arguments is streamed
        }
        value_next = !open.empty() && (open.back() == '[' ? t == "[" || t == "," : t == ":");
        return;
      case Phase::done:
        return;
    }
  }

  // The open string value at body offset `at`: its whole characters not yet written, parsed
  // and dumped on their own (escaping is per character, so the pieces join to the dump of the
  // whole string).
  void open_string(std::string_view body, size_t at) {
    if (string_at != at) {
      string_at = at;
      string_cut = 1;
      string_compact.assign(1, '"');
    }
    const std::string_view raw = body.substr(at);
    const size_t end = whole_characters(raw, string_cut);
    if (end == string_cut) return;
    const json j = json::parse(std::string(1, '"').append(raw.substr(string_cut, end - string_cut)).append(1, '"'), nullptr, false);
    if (!j.is_string()) return;  // not a valid string so far: nothing more of it
    const std::string piece = dump(j);
    string_compact.append(piece, 1, piece.size() - 2);
    string_cut = end;
  }
};

ToolCallStream::ToolCallStream(std::vector<ToolDef> tools, bool reply_is_call, size_t max_calls)
    : tools_(std::move(tools)), reply_is_call_(reply_is_call), max_calls_(max_calls) {}
ToolCallStream::~ToolCallStream() = default;

ToolCallStream::CallDelta &ToolCallStream::delta_for(Piece &piece, size_t index) {
  for (CallDelta &d : piece.calls)
    if (d.index == index) return d;
  piece.calls.push_back({index, std::nullopt, {}});
  return piece.calls.back();
}

void ToolCallStream::send_whole(const ToolCall &call, Piece &piece) {
  if (next_index_ >= max_calls_) return;
  CallDelta &d = delta_for(piece, next_index_++);
  d.name = call.name;
  d.arguments = call.arguments_json;
}

void ToolCallStream::send_content(const std::string &text, size_t content_end, Piece &piece) {
  if (content_end > content_sent_) {
    piece.content = text.substr(content_sent_, content_end - content_sent_);
    content_sent_ = content_end;
  }
  piece.content_end = content_sent_;
}

void ToolCallStream::stream_body(const std::string &text, size_t at, size_t begin, size_t end, bool closed, Piece &piece) {
  const std::string_view body(text.data() + begin, end - begin);
  if (closed) {
    std::vector<ToolCall> one;
    const bool ok = read_call(trim(std::string(body)), tools_, one);
    if (at == scan_at_) scan_.reset();
    if (at == open_at_) {
      // The rest of a call whose name went out (nothing, if the whole call reads otherwise).
      // (read_call refuses a key written twice, so its name is the one that went out.)
      if (ok && one[0].arguments_json.starts_with(args_sent_) && one[0].arguments_json.size() > args_sent_.size())
        delta_for(piece, next_index_ - 1).arguments += one[0].arguments_json.substr(args_sent_.size());
      open_at_ = std::string::npos;
      args_sent_.clear();
    } else if (ok) {
      send_whole(one[0], piece);
    }
    return;
  }
  if (!scan_ || scan_at_ != at) {  // a block not scanned before
    scan_ = std::make_unique<Scanner>();
    scan_at_ = at;
  }
  scan_->advance(body);
  if (at != open_at_) {
    if (!scan_->name || !find_tool(tools_, *scan_->name) || next_index_ >= max_calls_) return;
    open_at_ = at;
    args_sent_.clear();
    delta_for(piece, next_index_++).name = *scan_->name;
  }
  std::string arguments;  // what is new of them
  scan_->take_new(args_sent_.size(), arguments);
  if (!arguments.empty()) {
    delta_for(piece, next_index_ - 1).arguments += arguments;
    args_sent_ += arguments;
  }
}

void ToolCallStream::blocks(const std::string &text, size_t safe, bool at_end, Piece &piece) {
  while (true) {
    const size_t at = text.find(kOpenTag, cursor_);
    if (at == std::string::npos || at + kOpenTag.size() > safe) return;
    const size_t begin = at + kOpenTag.size();
    const size_t close = text.find(kCloseTag, begin);
    if (close != std::string::npos && close + kCloseTag.size() <= safe) {
      stream_body(text, at, begin, close, true, piece);
      cursor_ = close + kCloseTag.size();
      continue;
    }
    // An open block (at the end, read to the end as parse_tool_calls does).
    stream_body(text, at, begin, at_end ? text.size() : std::min(safe, close), at_end, piece);
    if (at_end) cursor_ = text.size();
    return;
  }
}

namespace {
// Where a reply's text begins: after whitespace, a byte-order mark and whitespace (a whole reply
// is trimmed, then the JSON parser skips one mark before a bare call object, so this does too);
// npos when there is none yet.
size_t reply_start(const std::string &text) {
  const std::string_view bom = "\xEF\xBB\xBF", space = " \t\r\n";
  const size_t lead = std::min(text.find_first_not_of(space), text.size());
  const std::string_view rest = std::string_view(text).substr(lead);
  if (rest.size() < bom.size() && bom.starts_with(rest)) return std::string::npos;  // maybe a mark yet
  return text.find_first_not_of(space, rest.starts_with(bom) ? lead + bom.size() : lead);
}
} // namespace

ToolCallStream::Piece ToolCallStream::update(const std::string &text, size_t safe) {
  safe = std::min(safe, text.size());
  Piece piece;
  piece.content_end = content_sent_;
  const size_t first = reply_start(text);
  if (first == std::string::npos || first >= safe) return piece;
  if (text[first] == '{') {  // maybe one bare call object: held, or streamed where it must be one
    if (reply_is_call_ && text.find(kOpenTag) == std::string::npos) stream_body(text, kBareAt, first, safe, false, piece);
    return piece;
  }
  const size_t tag = text.find(kOpenTag);
  if (tag == std::string::npos || tag + kOpenTag.size() > safe) {
    // Plain text so far: all of it but a tail that may begin the tag, and whitespace before that.
    size_t end = safe;
    for (size_t keep = std::min(kOpenTag.size() - 1, safe); keep > 0; --keep)
      if (text.compare(safe - keep, keep, kOpenTag, 0, keep) == 0) {
        end = safe - keep;
        break;
      }
    if (tag != std::string::npos) end = std::min(end, tag);
    send_content(text, before_trailing_space(text, end), piece);
    return piece;
  }
  send_content(text, before_trailing_space(text, tag), piece);
  blocks(text, safe, false, piece);
  return piece;
}

ToolCallStream::Piece ToolCallStream::finish(const std::string &text) {
  Piece piece;
  const std::vector<ToolCall> calls = parse_tool_calls(text, tools_);
  const size_t first = reply_start(text);
  if (open_at_ == kBareAt) {
    stream_body(text, kBareAt, first, text.size(), true, piece);
  } else {
    blocks(text, text.size(), true, piece);
    if (next_index_ == 0)  // one bare call object (parse_tool_calls' reading when no block holds one)
      for (const ToolCall &c : calls) send_whole(c, piece);
  }
  const size_t content_end = calls.empty() ? text.size() : reply_content(text, calls).size();
  send_content(text, std::max(content_end, content_sent_), piece);
  return piece;
}

} // namespace loom::server
