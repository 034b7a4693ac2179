// RAII wrappers over the SQLite C API for the bm25 retriever: a connection and a prepared
// statement, with errors turned into loomp::Fail carrying SQLite's message.
#ifndef LOOM_PLUGINS_BM25_SQLITE_HANDLE_HPP
#define LOOM_PLUGINS_BM25_SQLITE_HANDLE_HPP

#include <sqlite3.h>

#include <string>
#include <string_view>

#include "loom_plugin_util.hpp"

namespace loomp::bm25 {

class Db {
 public:
  Db() = default;
  explicit Db(const std::string& path, int flags) {
    if (sqlite3_open_v2(path.c_str(), &db_, flags, nullptr) != SQLITE_OK) {
      const std::string msg = db_ ? sqlite3_errmsg(db_) : "out of memory";
      sqlite3_close(db_);
      db_ = nullptr;
      fail(LOOM_ERR_IO, "bm25: cannot open '" + path + "': " + msg);
    }
  }
  Db(Db&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  Db& operator=(Db&& o) noexcept {
    if (this != &o) {
      sqlite3_close(db_);
      db_ = o.db_;
      o.db_ = nullptr;
    }
    return *this;
  }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db() { sqlite3_close(db_); }

  sqlite3* get() const { return db_; }
  void exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      const std::string msg = err ? err : sqlite3_errmsg(db_);
      sqlite3_free(err);
      fail(LOOM_ERR_INTERNAL, std::string("bm25: SQLite: ") + msg);
    }
  }

 private:
  sqlite3* db_ = nullptr;
};

class Stmt {
 public:
  Stmt(sqlite3* db, std::string_view sql) : db_(db) {
    if (sqlite3_prepare_v2(db, sql.data(), static_cast<int>(sql.size()), &st_, nullptr) != SQLITE_OK)
      fail(LOOM_ERR_INTERNAL, std::string("bm25: SQLite prepare: ") + sqlite3_errmsg(db));
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt() { sqlite3_finalize(st_); }

  void bind(int i, const std::string& s) { check(sqlite3_bind_text(st_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT)); }
  void bind(int i, double v) { check(sqlite3_bind_double(st_, i, v)); }
  void bind(int i, int64_t v) { check(sqlite3_bind_int64(st_, i, v)); }
  void bind_null(int i) { check(sqlite3_bind_null(st_, i)); }
  // True while a row is available; false when done.
  bool step() {
    const int rc = sqlite3_step(st_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    fail(LOOM_ERR_INTERNAL, std::string("bm25: SQLite: ") + sqlite3_errmsg(db_));
  }
  const char* text(int col) const { return reinterpret_cast<const char*>(sqlite3_column_text(st_, col)); }
  double real(int col) const { return sqlite3_column_double(st_, col); }
  int64_t integer(int col) const { return sqlite3_column_int64(st_, col); }

 private:
  void check(int rc) {
    if (rc != SQLITE_OK) fail(LOOM_ERR_INTERNAL, std::string("bm25: SQLite bind: ") + sqlite3_errmsg(db_));
  }
  sqlite3* db_;
  sqlite3_stmt* st_ = nullptr;
};

// Begins a transaction and rolls it back unless commit() is reached.
class Transaction {
 public:
  explicit Transaction(Db& db) : db_(db) { db_.exec("BEGIN"); }
  void commit() {
    db_.exec("COMMIT");
    done_ = true;
  }
  ~Transaction() {
    if (!done_) sqlite3_exec(db_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

 private:
  Db& db_;
  bool done_ = false;
};

}  // namespace loomp::bm25

#endif
