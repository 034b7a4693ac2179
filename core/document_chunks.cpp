#include "loom/core/document_chunks.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "loom/core/error.hpp"

namespace loom {

namespace {

bool continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }
bool space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

}  // namespace

std::vector<std::pair<int64_t, int64_t>> chunk_ranges(const std::string &text, int64_t chunk_bytes, int64_t overlap_bytes) {
  if (chunk_bytes < 2 || overlap_bytes < 0 || overlap_bytes >= chunk_bytes / 2)
    throw runtime_error("chunking: need 0 <= overlap (" + std::to_string(overlap_bytes) + ") < chunk size / 2 (chunk size " +
                        std::to_string(chunk_bytes) + ")");
  std::vector<std::pair<int64_t, int64_t>> out;
  const auto size = static_cast<int64_t>(text.size());
  int64_t begin = 0;
  while (begin < size) {
    int64_t end = std::min(size, begin + chunk_bytes);
    if (end < size) {
      // The last break in the second half: a blank line, else a line end, else a space.
      const std::string_view window(text.data() + begin + chunk_bytes / 2, static_cast<size_t>(end - begin - chunk_bytes / 2));
      size_t at = window.rfind("\n\n");
      if (at == std::string_view::npos) at = window.rfind('\n');
      if (at == std::string_view::npos) at = window.rfind(' ');
      if (at != std::string_view::npos) end = begin + chunk_bytes / 2 + static_cast<int64_t>(at) + 1;
      while (end > begin + 1 && continuation(text[static_cast<size_t>(end)])) --end;  // a whole UTF-8 character
    }
    out.emplace_back(begin, end);
    if (end >= size) break;
    // The next chunk: overlap bytes back, then forward to a word's start (never back to begin).
    int64_t next = std::max(begin + 1, end - overlap_bytes);
    if (next < end && next > 0 && !space(text[static_cast<size_t>(next - 1)]))
      while (next < end && !space(text[static_cast<size_t>(next - 1)])) ++next;
    while (next < end && continuation(text[static_cast<size_t>(next)])) ++next;
    begin = next;
  }
  return out;
}

std::vector<DocumentChunk> chunk_documents(const std::filesystem::path &root, int64_t chunk_bytes, int64_t overlap_bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(root, ec)) throw runtime_error(root.string() + ": no such file or folder");
  std::vector<fs::path> files;
  const auto wanted = [](const fs::path &p) { return p.extension() == ".txt" || p.extension() == ".md"; };
  if (fs::is_regular_file(root)) {
    files.push_back(root);
  } else {
    for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::skip_permission_denied, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
      if (it->is_regular_file() && wanted(it->path())) files.push_back(it->path());
    if (ec) throw runtime_error(root.string() + ": " + ec.message());
    std::sort(files.begin(), files.end());
  }
  std::vector<DocumentChunk> out;
  for (const auto &file : files) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw runtime_error(file.string() + ": cannot be read");
    std::ostringstream buffer;
    buffer << in.rdbuf();
    const std::string text = buffer.str();
    const std::string source = fs::is_regular_file(root) ? file.filename().generic_string()
                                                         : fs::relative(file, root).generic_string();
    int64_t n = 0;
    for (const auto &[begin, end] : chunk_ranges(text, chunk_bytes, overlap_bytes)) {
      DocumentChunk c;
      c.doc_id = source + "#" + std::to_string(n);
      c.text = text.substr(static_cast<size_t>(begin), static_cast<size_t>(end - begin));
      c.offset_begin = begin;
      c.offset_end = end;
      c.metadata_json = nlohmann::json{{"source", source}, {"chunk", n}, {"offset_begin", begin}, {"offset_end", end}}.dump();
      out.push_back(std::move(c));
      ++n;
    }
  }
  return out;
}

}  // namespace loom
