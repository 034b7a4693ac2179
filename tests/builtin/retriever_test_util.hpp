// Helpers for the retriever suites: passages collected from a search, and scratch directories.
#pragma once

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"

namespace bt {

// One passage as a search emitted it (copied: the plugin's strings live only during the call).
struct Hit {
  std::string id, text, meta;
  double score;
  loom_score_kind kind;
  int64_t begin, end;
};

// A loom_passage_fn appending to the std::vector<Hit> behind `user`.
inline loom_status collect(void *user, const loom_passage *p) {
  static_cast<std::vector<Hit> *>(user)->push_back({p->doc_id, p->text ? p->text : "",
                                                    p->metadata_json ? p->metadata_json : "", p->score, p->score_kind,
                                                    p->offset_begin, p->offset_end});
  return LOOM_OK;
}

// A fresh directory under the system's temporary directory, named loom-<suite>-<tag>-<random>.
inline std::filesystem::path temp_dir(const std::string &suite, const std::string &tag) {
  std::random_device rd;
  std::filesystem::path p = std::filesystem::temp_directory_path() / ("loom-" + suite + "-" + tag + "-" + std::to_string(rd()));
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace bt
