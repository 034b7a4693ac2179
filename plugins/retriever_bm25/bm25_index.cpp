#include "bm25_index.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <variant>

#include <nlohmann/json.hpp>

#include "filter.hpp"
#include "loom_plugin_util.hpp"

namespace loomp::bm25 {
namespace {

namespace fs = std::filesystem;

constexpr const char* kSchema =
    "CREATE VIRTUAL TABLE docs USING fts5(doc_id UNINDEXED, body, metadata UNINDEXED, "
    "tokenize = 'porter unicode61');"
    "CREATE TABLE ids(doc_id TEXT PRIMARY KEY, rid INTEGER NOT NULL);";
constexpr const char* kFileName = "bm25.sqlite";

Db open_memory() { return Db(":memory:", SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_MEMORY); }

// Copies the whole database `from` into `to` with SQLite's online backup API.
void copy_db(sqlite3* from, sqlite3* to, const std::string& what) {
  sqlite3_backup* b = sqlite3_backup_init(to, "main", from, "main");
  if (b == nullptr) fail(LOOM_ERR_IO, "bm25: " + what + ": " + sqlite3_errmsg(to));
  const int rc = sqlite3_backup_step(b, -1);
  sqlite3_backup_finish(b);
  if (rc != SQLITE_DONE) fail(LOOM_ERR_IO, "bm25: " + what + ": " + sqlite3_errstr(rc));
}

// "a b-c \"d" -> "\"a\" OR \"b-c\" OR \"\"\"d\"": each whitespace-separated term becomes an
// FTS5 string (double quotes doubled), so no user text is read as FTS5 query syntax.
std::string match_expression(const std::string& text) {
  std::istringstream in(text);
  std::string term, out;
  while (in >> term) {
    std::string q = "\"";
    for (char c : term) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    q += "\"";
    out += (out.empty() ? "" : " OR ") + q;
  }
  return out;
}

}  // namespace

Bm25Index::Bm25Index() : db(open_memory()) { db.exec(kSchema); }

// In file-name order.
void Bm25Index::add_directory(const std::string& dir, const char* param) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    invalid_param(param, "bm25: documents directory '" + dir + "' does not exist");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto ext = e.path().extension();
    if (e.is_regular_file() && (ext == ".txt" || ext == ".md")) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end(), [](const fs::path& a, const fs::path& b) { return a.filename() < b.filename(); });
  Transaction tx(db);
  for (const auto& p : files) {
    std::ifstream f(p, std::ios::binary);
    if (!f) fail(LOOM_ERR_IO, "bm25: cannot read '" + p.string() + "'");
    std::ostringstream body;
    body << f.rdbuf();
    put(p.filename().string(), body.str(), nlohmann::json{{"path", p.string()}}.dump());
  }
  tx.commit();
}

void Bm25Index::put(const std::string& id, const std::string& body, const std::string& meta /* "" = none */) {
  erase(id);
  Stmt ins(db.get(), "INSERT INTO docs(doc_id, body, metadata) VALUES (?, ?, ?)");
  ins.bind(1, id);
  ins.bind(2, body);
  if (meta.empty()) ins.bind_null(3); else ins.bind(3, meta);
  ins.step();
  Stmt map(db.get(), "INSERT INTO ids(doc_id, rid) VALUES (?, ?)");
  map.bind(1, id);
  map.bind(2, static_cast<int64_t>(sqlite3_last_insert_rowid(db.get())));
  map.step();
}

bool Bm25Index::erase(const std::string& id) {
  Stmt find(db.get(), "SELECT rid FROM ids WHERE doc_id = ?");
  find.bind(1, id);
  if (!find.step()) return false;
  const int64_t rid = find.integer(0);
  Stmt del(db.get(), "DELETE FROM docs WHERE rowid = ?");
  del.bind(1, rid);
  del.step();
  Stmt unmap(db.get(), "DELETE FROM ids WHERE doc_id = ?");
  unmap.bind(1, id);
  unmap.step();
  return true;
}

void Bm25Index::add(const loom_document* docs, uint32_t count, const std::string& who) {
  if (docs == nullptr && count > 0) invalid(who + ": docs is NULL");
  // Validate everything first so that a bad document adds nothing.
  std::vector<std::string> metas(count);
  for (uint32_t i = 0; i < count; ++i) {
    const loom_document& d = docs[i];
    const std::string where = who + ": document " + std::to_string(i);
    if (!LOOM_HAS_FIELD(&d, loom_document, metadata_json)) invalid(where + ": struct_size too small");
    if (d.doc_id == nullptr || d.doc_id[0] == '\0') invalid(where + ": doc_id is empty");
    if (d.text == nullptr) invalid(where + " ('" + d.doc_id + "'): text is NULL");
    if (d.metadata_json != nullptr) {
      nlohmann::json m = nlohmann::json::parse(d.metadata_json, nullptr, false);
      if (m.is_discarded() || !m.is_object())
        invalid(where + " ('" + d.doc_id + "'): metadata_json must be a JSON object");
      metas[i] = m.dump();
    }
  }
  Transaction tx(db);
  for (uint32_t i = 0; i < count; ++i) put(docs[i].doc_id, docs[i].text, metas[i]);
  tx.commit();
}

std::vector<Bm25Hit> Bm25Index::search(const std::string& text, int32_t top_k, const std::string& filter_text) {
  const CompiledFilter filter = compile_filter(filter_text);
  const std::string match = match_expression(text);
  std::vector<Bm25Hit> hits;
  if (match.empty() || top_k <= 0) return hits;  // nothing asked: no results
  Stmt st(db.get(), "SELECT doc_id, body, metadata, bm25(docs) AS s FROM docs WHERE docs MATCH ? AND (" +
                        filter.sql + ") ORDER BY s, rowid LIMIT ?");
  int k = 1;
  st.bind(k++, match);
  for (const auto& b : filter.binds) {
    if (const auto* s = std::get_if<std::string>(&b)) st.bind(k++, *s); else st.bind(k++, std::get<double>(b));
  }
  st.bind(k, static_cast<int64_t>(top_k));
  while (st.step()) {
    const char* meta = st.text(2);
    hits.push_back({st.text(0), st.text(1), meta ? meta : "", -st.real(3)});
  }
  return hits;
}

uint64_t Bm25Index::count() {
  Stmt st(db.get(), "SELECT count(*) FROM ids");
  st.step();
  return static_cast<uint64_t>(st.integer(0));
}

void Bm25Index::save(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir)) fail(LOOM_ERR_IO, "bm25: cannot create directory '" + dir + "'");
  const std::string path = (fs::path(dir) / kFileName).string();
  Db file(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
  copy_db(db.get(), file.get(), "saving to '" + path + "'");
}

void Bm25Index::load(const std::string& dir) {
  const std::string path = (fs::path(dir) / kFileName).string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail(LOOM_ERR_NOT_FOUND, "bm25: no index at '" + path + "'");
  Db file(path, SQLITE_OPEN_READONLY);
  Db fresh = open_memory();
  copy_db(file.get(), fresh.get(), "loading '" + path + "'");
  // Refuse a file that is not one of ours before replacing the live index.
  Stmt check(fresh.get(), "SELECT count(*) FROM sqlite_master WHERE name IN ('docs', 'ids')");
  check.step();
  if (check.integer(0) != 2) invalid("bm25: '" + path + "' is not a bm25 index (tables docs and ids missing)");
  db = std::move(fresh);
}

}  // namespace loomp::bm25
