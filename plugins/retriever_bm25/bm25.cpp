// Retriever component `bm25`: lexical search on SQLite FTS5, one in-memory database per
// instance.
//   docs: FTS5(doc_id UNINDEXED, body, metadata UNINDEXED), tokenize = 'porter unicode61'
//   ids:  doc_id -> FTS rowid, so replacing or removing a document is an index lookup
// Scores: FTS5's bm25() is smaller-is-better and negative; we report -bm25 (bigger is better).
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "filter.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "sqlite_handle.hpp"

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

struct Bm25 {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  Db db;

  Bm25(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c), db(open_memory()) {
    db.exec(kSchema);
    const std::string dir = cfg_string(h, c, "documents");
    if (!dir.empty()) add_directory(dir);
  }

  // Every *.txt and *.md file directly in `dir` (the `documents` parameter), in file-name order.
  void add_directory(const std::string& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
      invalid_param("documents", "bm25: documents directory '" + dir + "' does not exist");
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

  void put(const std::string& id, const std::string& body, const std::string& meta /* "" = none */) {
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

  bool erase(const std::string& id) {
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

  void add(const loom_document* docs, uint32_t count) {
    if (docs == nullptr && count > 0) invalid("bm25: docs is NULL");
    // Validate everything first so that a bad document adds nothing.
    std::vector<std::string> metas(count);
    for (uint32_t i = 0; i < count; ++i) {
      const loom_document& d = docs[i];
      const std::string where = "bm25: document " + std::to_string(i);
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

  void search(const loom_query& q, loom_passage_fn emit, void* user) {
    if (emit == nullptr) invalid("bm25: emit is NULL");
    if (q.top_k < 0) invalid("bm25: top_k must be >= 0");
    const CompiledFilter filter = compile_filter(q.filter ? q.filter : "");
    const std::string match = match_expression(q.text ? q.text : "");
    if (match.empty() || q.top_k == 0) return;  // nothing asked: no results
    Stmt st(db.get(), "SELECT doc_id, body, metadata, bm25(docs) AS s FROM docs WHERE docs MATCH ? AND (" +
                          filter.sql + ") ORDER BY s, rowid LIMIT ?");
    int k = 1;
    st.bind(k++, match);
    for (const auto& b : filter.binds) {
      if (const auto* s = std::get_if<std::string>(&b)) st.bind(k++, *s); else st.bind(k++, std::get<double>(b));
    }
    st.bind(k, static_cast<int64_t>(q.top_k));
    while (st.step()) {
      loom_passage p{};
      p.struct_size = sizeof(loom_passage);
      p.doc_id = st.text(0);
      p.score = -st.real(3);
      p.score_kind = LOOM_SCORE_BM25;
      p.text = st.text(1);
      p.offset_begin = -1;
      p.offset_end = -1;
      p.metadata_json = st.text(2);
      const loom_status s = emit(user, &p);
      if (s != LOOM_OK) fail(s, "bm25: search stopped by the caller");
    }
  }

  uint64_t count() {
    Stmt st(db.get(), "SELECT count(*) FROM ids");
    st.step();
    return static_cast<uint64_t>(st.integer(0));
  }

  void save(const std::string& dir) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (!fs::is_directory(dir)) fail(LOOM_ERR_IO, "bm25: cannot create directory '" + dir + "'");
    const std::string path = (fs::path(dir) / kFileName).string();
    Db file(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    copy_db(db.get(), file.get(), "saving to '" + path + "'");
  }

  void load(const std::string& dir) {
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
};

Bm25& self(void* inst) { return *static_cast<Bm25*>(inst); }

loom_status create_fn(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = std::make_unique<Bm25>(host, ctx).release();
  });
}
void destroy_fn(void* inst) { delete static_cast<Bm25*>(inst); }
loom_status add_fn(void* inst, const loom_document* docs, uint32_t count) {
  return guard(self(inst).host, self(inst).ctx, [&] { self(inst).add(docs, count); });
}
loom_status remove_fn(void* inst, const char* id) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (id == nullptr) invalid("bm25: doc_id is NULL");
    if (!self(inst).erase(id)) fail(LOOM_ERR_NOT_FOUND, std::string("bm25: no document '") + id + "'");
  });
}
loom_status count_fn(void* inst, uint64_t* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (out == nullptr) invalid("bm25: out is NULL");
    *out = self(inst).count();
  });
}
loom_status search_fn(void* inst, const loom_query* q, loom_passage_fn emit, void* user) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (q == nullptr) invalid("bm25: query is NULL");
    if (!LOOM_HAS_FIELD(q, loom_query, filter)) invalid("bm25: query struct_size too small");
    self(inst).search(*q, emit, user);
  });
}
loom_status save_fn(void* inst, const char* dir) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (dir == nullptr) invalid("bm25: directory is NULL");
    self(inst).save(dir);
  });
}
loom_status load_fn(void* inst, const char* dir) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (dir == nullptr) invalid("bm25: directory is NULL");
    self(inst).load(dir);
  });
}

constexpr loom_retriever_vtable kVtable = {
    sizeof(loom_retriever_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &add_fn, &remove_fn, &count_fn, &search_fn, &save_fn, &load_fn,
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "documents", LOOM_VALUE_PATH, 0, "\"\"",
     "optional directory whose *.txt and *.md files are indexed at start (doc_id = file name)"},
};
constexpr loom_component_desc kBm25 = {
    sizeof(loom_component_desc), LOOM_KIND_RETRIEVER, "bm25", "1.0.0",
    "Lexical BM25 retrieval on SQLite FTS5 (porter stemming), metadata filters",
    kParams, 1, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kBm25};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-retriever-bm25", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::bm25

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::bm25::kPlugin; }
