#include "dense_index.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <hnswlib/hnswlib.h>

#include "loom/abi.h"
#include "loom_plugin_util.hpp"

namespace loomp::dense {
namespace {

namespace fs = std::filesystem;

constexpr const char *kFormat = "loom-dense-1";
constexpr const char *kMetaFile = "dense.json", *kDocsFile = "dense_docs.jsonl", *kGraphFile = "dense.hnsw";

const char *metric_name(Metric m) { return m == Metric::cosine ? "cosine" : m == Metric::ip ? "ip" : "l2"; }

std::unique_ptr<hnswlib::SpaceInterface<float>> make_space(Metric m, int32_t dim) {
  if (m == Metric::l2) return std::make_unique<hnswlib::L2Space>(static_cast<size_t>(dim));
  return std::make_unique<hnswlib::InnerProductSpace>(static_cast<size_t>(dim));
}

// Writes `write(out)` to path.tmp, then renames it over `path`, so that a failed save leaves
// the previous file whole.
template <class F> void write_file(const fs::path &path, F &&write) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(LOOM_ERR_IO, "dense: cannot write '" + tmp.string() + "'");
    write(out);
    out.flush();
    if (!out) fail(LOOM_ERR_IO, "dense: writing '" + tmp.string() + "' failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(LOOM_ERR_IO, "dense: cannot replace '" + path.string() + "': " + ec.message());
}

// hnswlib's loadIndex trusts the file's header and links; these checks make a damaged or
// foreign file an error instead of out-of-bounds reads. The header layout is hnswlib 0.6's
// saveIndex: offsetLevel0, max_elements, cur_element_count, size_data_per_element,
// label_offset, offsetData (size_t each), maxlevel (int), enterpoint (unsigned), maxM, maxM0, M
// (size_t), mult (double), ef_construction (size_t); then each element's level-0 block, then
// each element's upper-level links (a 4-byte size, then the links).
void check_graph_file(const fs::path &path, size_t slots, int32_t dim) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(LOOM_ERR_IO, "dense: cannot read '" + path.string() + "'");
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  size_t h[6];
  int maxlevel = 0;
  unsigned enterpoint = 0;
  size_t maxM = 0, maxM0 = 0, M = 0;
  double mult = 0;
  size_t ef_c = 0;
  in.read(reinterpret_cast<char *>(h), sizeof h);
  in.read(reinterpret_cast<char *>(&maxlevel), sizeof maxlevel);
  in.read(reinterpret_cast<char *>(&enterpoint), sizeof enterpoint);
  in.read(reinterpret_cast<char *>(&maxM), sizeof maxM);
  in.read(reinterpret_cast<char *>(&maxM0), sizeof maxM0);
  in.read(reinterpret_cast<char *>(&M), sizeof M);
  in.read(reinterpret_cast<char *>(&mult), sizeof mult);
  in.read(reinterpret_cast<char *>(&ef_c), sizeof ef_c);
  const std::string bad = "dense: '" + path.string() + "' is not an index of this retriever: ";
  if (!in) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "truncated header");
  const size_t count = h[2], per_element = h[3], label_offset = h[4], offset_data = h[5];
  const size_t links0 = maxM0 * sizeof(hnswlib::tableint) + sizeof(hnswlib::linklistsizeint);
  const size_t data_size = static_cast<size_t>(dim) * sizeof(float);
  if (h[0] != 0 || count != slots || M == 0 || M > 4096 || maxM != M || maxM0 != 2 * M || offset_data != links0 ||
      label_offset != links0 + data_size || per_element != label_offset + sizeof(hnswlib::labeltype) || maxlevel < 0 ||
      maxlevel > 64 || (count > 0 && enterpoint >= count) || h[1] < count)
    fail(LOOM_ERR_INVALID_ARGUMENT, bad + "its header does not match " + std::to_string(slots) + " documents of dimension " +
                                        std::to_string(dim));
  const uint64_t header = static_cast<uint64_t>(in.tellg());
  if (file_size < header + static_cast<uint64_t>(count) * per_element)
    fail(LOOM_ERR_INVALID_ARGUMENT, bad + "truncated");
  // Level 0: every element's link count and links, and its label.
  std::vector<char> block(per_element);
  for (size_t i = 0; i < count; ++i) {
    in.read(block.data(), static_cast<std::streamsize>(per_element));
    hnswlib::linklistsizeint n = 0;
    std::memcpy(&n, block.data(), sizeof n);
    n &= 0xFFFF;  // the upper bits hold the delete mark
    if (n > maxM0) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "element " + std::to_string(i) + " has too many links");
    for (size_t j = 0; j < n; ++j) {
      hnswlib::tableint t = 0;
      std::memcpy(&t, block.data() + sizeof(hnswlib::linklistsizeint) + j * sizeof t, sizeof t);
      if (t >= count) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "element " + std::to_string(i) + " links outside the index");
    }
    hnswlib::labeltype label = 0;
    std::memcpy(&label, block.data() + label_offset, sizeof label);
    if (label >= slots) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "element " + std::to_string(i) + " has a label outside the documents");
  }
  // Upper levels.
  const size_t links = maxM * sizeof(hnswlib::tableint) + sizeof(hnswlib::linklistsizeint);
  std::vector<char> upper;
  for (size_t i = 0; i < count; ++i) {
    unsigned size = 0;
    in.read(reinterpret_cast<char *>(&size), sizeof size);
    if (!in || size % links != 0 || size / links > static_cast<unsigned>(maxlevel))
      fail(LOOM_ERR_INVALID_ARGUMENT, bad + "element " + std::to_string(i) + "'s upper links are damaged");
    upper.resize(size);
    in.read(upper.data(), size);
    if (!in) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "truncated");
    for (size_t level = 0; level < size / links; ++level) {
      hnswlib::linklistsizeint n = 0;
      std::memcpy(&n, upper.data() + level * links, sizeof n);
      if (n > maxM) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "element " + std::to_string(i) + " has too many links");
      for (size_t j = 0; j < n; ++j) {
        hnswlib::tableint t = 0;
        std::memcpy(&t, upper.data() + level * links + sizeof n + j * sizeof t, sizeof t);
        if (t >= count) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "element " + std::to_string(i) + " links outside the index");
      }
    }
  }
  if (static_cast<uint64_t>(in.tellg()) != file_size) fail(LOOM_ERR_INVALID_ARGUMENT, bad + "trailing bytes");
}

}  // namespace

DenseIndex::DenseIndex(IndexOptions options) : options_(options) {
  if (options_.dim > 0) set_dim(options_.dim);
}

DenseIndex::~DenseIndex() = default;

void DenseIndex::set_dim(int32_t dim) {
  dim_ = dim;
  space_ = make_space(options_.metric, dim);
  graph_ = std::make_unique<hnswlib::HierarchicalNSW<float>>(space_.get(), 1024, options_.m, options_.ef_construction);
  graph_->setEf(options_.ef_search);
}

std::vector<float> DenseIndex::prepared(const float *v) const {
  std::vector<float> out(v, v + dim_);
  if (options_.metric == Metric::cosine) {
    double norm = 0;
    for (float x : out) norm += static_cast<double>(x) * x;
    const float inv = static_cast<float>(1.0 / std::sqrt(norm));
    for (float &x : out) x *= inv;
  }
  return out;
}

void DenseIndex::add(std::vector<NewDocument> docs) {
  if (docs.empty()) return;
  const size_t needed = graph_->cur_element_count + docs.size();
  if (needed > graph_->max_elements_) graph_->resizeIndex(std::max(needed, graph_->max_elements_ * 2));
  // Slots first (retiring the slots of replaced documents), then the graph insertions.
  const size_t first = docs_.size();
  docs_.reserve(first + docs.size());
  for (auto &d : docs) {
    if (const auto it = id_to_slot_.find(d.id); it != id_to_slot_.end()) {
      graph_->markDelete(it->second);
      docs_[it->second].alive = false;
      id_to_slot_.erase(it);
    }
    StoredDocument stored;
    stored.metadata_value = d.metadata.empty() ? nlohmann::json() : nlohmann::json::parse(d.metadata);
    stored.id = std::move(d.id);
    stored.text = std::move(d.text);
    stored.metadata = std::move(d.metadata);
    id_to_slot_.emplace(stored.id, docs_.size());
    docs_.push_back(std::move(stored));
  }
  // One thread: hnswlib 0.6's concurrent addPoint can read a neighbour's upper-level links
  // while they are being allocated (found under ASan), so insertions are not parallel.
  for (size_t i = 0; i < docs.size(); ++i) {
    const std::vector<float> v = prepared(docs[i].embedding.data());
    graph_->addPoint(v.data(), first + i);
  }
}

bool DenseIndex::remove(const std::string &id) {
  const auto it = id_to_slot_.find(id);
  if (it == id_to_slot_.end()) return false;
  graph_->markDelete(it->second);
  docs_[it->second].alive = false;
  id_to_slot_.erase(it);
  return true;
}

std::vector<Hit> DenseIndex::exact(const float *query, size_t k, const std::vector<size_t> &slots) const {
  const auto dist = space_->get_dist_func();
  void *param = space_->get_dist_func_param();
  std::vector<Hit> all;
  all.reserve(slots.size());
  for (size_t slot : slots)
    all.push_back({slot, dist(query, graph_->getDataByInternalId(graph_->label_lookup_.at(slot)), param)});
  const size_t n = std::min(k, all.size());
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(),
                    [](const Hit &a, const Hit &b) { return a.distance < b.distance || (a.distance == b.distance && a.slot < b.slot); });
  all.resize(n);
  return all;
}

std::vector<Hit> DenseIndex::search(const float *query, size_t k, const std::vector<loomp::filter::Clause> &clauses) const {
  if (k == 0 || id_to_slot_.empty() || !graph_) return {};
  const std::vector<float> q = prepared(query);
  const auto graph_search = [&](size_t want) {
    auto heap = graph_->searchKnn(q.data(), want);
    std::vector<Hit> hits(heap.size());
    for (size_t i = heap.size(); i-- > 0; heap.pop()) hits[i] = {heap.top().second, heap.top().first};
    return hits;
  };
  if (clauses.empty()) return graph_search(k);
  std::vector<size_t> allowed;
  for (const auto &[id, slot] : id_to_slot_)
    if (loomp::filter::matches(clauses, docs_[slot].metadata_value)) allowed.push_back(slot);
  std::sort(allowed.begin(), allowed.end());
  if (allowed.size() <= options_.exact_below) return exact(q.data(), k, allowed);
  // Many documents pass: search the graph for more than k and keep those that pass, widening
  // until k pass (a selective filter then ends in the exact scan above's cost at most).
  for (size_t want = k * 4;; want *= 2) {
    want = std::min(want, id_to_slot_.size());
    std::vector<Hit> kept;
    for (const Hit &h : graph_search(want))
      if (kept.size() < k && std::binary_search(allowed.begin(), allowed.end(), h.slot)) kept.push_back(h);
    if (kept.size() >= std::min(k, allowed.size())) return kept;
    if (want >= id_to_slot_.size()) return exact(q.data(), k, allowed);
  }
}

double DenseIndex::score(const Hit &hit) const {
  if (options_.metric == Metric::l2) return std::sqrt(std::max(0.0f, hit.distance));
  return 1.0 - static_cast<double>(hit.distance);  // hnswlib's inner-product distance is 1 - dot
}

void DenseIndex::save(const std::string &directory) const {
  const fs::path dir(directory);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir)) fail(LOOM_ERR_IO, "dense: cannot create directory '" + directory + "'");
  write_file(dir / kDocsFile, [&](std::ofstream &out) {
    for (const auto &d : docs_) {
      nlohmann::json line = d.alive ? nlohmann::json{{"id", d.id}, {"text", d.text}, {"metadata", d.metadata_value}}
                                    : nlohmann::json{{"deleted", true}};
      out << line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    }
  });
  if (graph_) {
    const fs::path tmp = (dir / kGraphFile).string() + ".tmp";
    graph_->saveIndex(tmp.string());
    fs::rename(tmp, dir / kGraphFile, ec);
    if (ec) fail(LOOM_ERR_IO, "dense: cannot write '" + (dir / kGraphFile).string() + "': " + ec.message());
  }
  // Written last: a directory with dense.json holds a whole index.
  write_file(dir / kMetaFile, [&](std::ofstream &out) {
    out << nlohmann::json{{"format", kFormat}, {"metric", metric_name(options_.metric)}, {"dim", dim_},
                          {"slots", docs_.size()}, {"m", options_.m}, {"ef_construction", options_.ef_construction}}
               .dump(2)
        << '\n';
  });
}

void DenseIndex::load(const std::string &directory) {
  const fs::path dir(directory), meta_path = dir / kMetaFile;
  std::ifstream meta_in(meta_path);
  if (!meta_in) fail(LOOM_ERR_NOT_FOUND, "dense: no index at '" + meta_path.string() + "'");
  const nlohmann::json meta = nlohmann::json::parse(meta_in, nullptr, false);
  const std::string where = "dense: '" + meta_path.string() + "'";
  if (meta.is_discarded() || !meta.is_object() || meta.value("format", "") != kFormat)
    fail(LOOM_ERR_INVALID_ARGUMENT, where + " is not a dense index (format " + kFormat + ")");
  const auto dim_v = meta.find("dim"), slots_v = meta.find("slots");
  if (dim_v == meta.end() || !dim_v->is_number_integer() || slots_v == meta.end() || !slots_v->is_number_unsigned() ||
      dim_v->get<int64_t>() < 0 || dim_v->get<int64_t>() > 65536)
    fail(LOOM_ERR_INVALID_ARGUMENT, where + ": dim and slots must be integers");
  if (meta.value("metric", "") != metric_name(options_.metric))
    invalid_param("metric", where + " was built with metric \"" + meta.value("metric", "?") + "\", this retriever uses \"" +
                                metric_name(options_.metric) + "\"");
  const auto dim = static_cast<int32_t>(dim_v->get<int64_t>());
  const auto slots = slots_v->get<size_t>();
  if (options_.dim > 0 && dim != options_.dim)
    invalid_param("dim", where + " holds " + std::to_string(dim) + "-dimensional embeddings, this retriever expects " +
                             std::to_string(options_.dim));
  // Documents.
  std::vector<StoredDocument> docs;
  std::unordered_map<std::string, size_t> ids;
  {
    const fs::path path = dir / kDocsFile;
    std::ifstream in(path);
    if (!in) fail(LOOM_ERR_IO, "dense: cannot read '" + path.string() + "'");
    std::string line;
    while (std::getline(in, line)) {
      const std::string at = "dense: '" + path.string() + "' line " + std::to_string(docs.size() + 1);
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) fail(LOOM_ERR_INVALID_ARGUMENT, at + ": not a JSON object");
      StoredDocument d;
      if (j.value("deleted", false)) {
        d.alive = false;
      } else {
        const auto id = j.find("id"), text = j.find("text"), m = j.find("metadata");
        if (id == j.end() || !id->is_string() || id->get_ref<const std::string &>().empty() || text == j.end() ||
            !text->is_string() || (m != j.end() && !m->is_null() && !m->is_object()))
          fail(LOOM_ERR_INVALID_ARGUMENT, at + ": needs a string id and text and an object metadata");
        d.id = id->get<std::string>();
        d.text = text->get<std::string>();
        if (m != j.end() && m->is_object()) {
          d.metadata_value = *m;
          d.metadata = m->dump();
        }
        if (!ids.emplace(d.id, docs.size()).second) fail(LOOM_ERR_INVALID_ARGUMENT, at + ": id '" + d.id + "' appears twice");
      }
      docs.push_back(std::move(d));
    }
    if (docs.size() != slots)
      fail(LOOM_ERR_INVALID_ARGUMENT, "dense: '" + path.string() + "' has " + std::to_string(docs.size()) +
                                          " lines, " + meta_path.string() + " says " + std::to_string(slots));
  }
  // The graph.
  auto space = dim > 0 ? make_space(options_.metric, dim) : nullptr;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> graph;
  if (dim > 0) {
    const fs::path path = dir / kGraphFile;
    check_graph_file(path, slots, dim);
    try {
      graph = std::make_unique<hnswlib::HierarchicalNSW<float>>(space.get(), path.string(), false, std::max<size_t>(slots, 1024));
    } catch (const std::exception &e) {
      fail(LOOM_ERR_INVALID_ARGUMENT, "dense: '" + path.string() + "': " + e.what());
    }
    graph->setEf(options_.ef_search);
    for (size_t s = 0; s < slots; ++s) {  // the graph's deletions are the documents'
      const auto it = graph->label_lookup_.find(s);
      if (it == graph->label_lookup_.end() || graph->isMarkedDeleted(it->second) == docs[s].alive)
        fail(LOOM_ERR_INVALID_ARGUMENT, "dense: '" + path.string() + "' does not match " + kDocsFile + " at slot " + std::to_string(s));
    }
  } else if (slots > 0) {
    fail(LOOM_ERR_INVALID_ARGUMENT, where + ": documents without a dimension");
  }
  graph_.reset();  // before the space it reads
  space_ = std::move(space);
  graph_ = std::move(graph);
  dim_ = dim;
  docs_ = std::move(docs);
  id_to_slot_ = std::move(ids);
  if (dim_ == 0 && options_.dim > 0) set_dim(options_.dim);  // an empty index saved before its first document
}

}  // namespace loomp::dense
