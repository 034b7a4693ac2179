// Ingestion for retrievers ([RAG+Tools]): the text and markdown files of a folder cut into
// overlapping chunks, each with a stable id and its place in its file, ready to be added to a
// retriever (`loom index build`).
//
// Ownership: plain values. Thread-safety: a free function, no shared state.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace loom {

struct DocumentChunk {
  std::string doc_id;          // "<path relative to the folder>#<chunk number from 0>"
  std::string text;
  std::string metadata_json;   // {"source": path, "chunk": n, "offset_begin": b, "offset_end": e}
  int64_t offset_begin = 0, offset_end = 0;  // bytes of the file
};

// Every *.txt and *.md file under `root` (recursively, in path order; a single file is taken
// alone) cut into chunks of at most `chunk_bytes` bytes. A chunk ends at the last paragraph
// break, else line break, else space in its second half, never inside a UTF-8 character; the
// next one starts `overlap_bytes` before that end (moved forward to the start of a word).
// Throws loom::Error naming the path when it is missing or unreadable, or the sizes are not
// 0 <= overlap_bytes < chunk_bytes / 2.
std::vector<DocumentChunk> chunk_documents(const std::filesystem::path &root, int64_t chunk_bytes, int64_t overlap_bytes);

// One text's chunk boundaries ([begin, end) byte ranges), as chunk_documents cuts each file.
std::vector<std::pair<int64_t, int64_t>> chunk_ranges(const std::string &text, int64_t chunk_bytes, int64_t overlap_bytes);

}  // namespace loom
