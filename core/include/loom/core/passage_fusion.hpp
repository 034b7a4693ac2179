// Reciprocal rank fusion of several retrievers' answers ([RAG+Tools]): what a `hybrid` search
// is in Loom. Used by the RAG stage and `loom index query`.
//
// Ownership: plain values. Thread-safety: a free function.
#pragma once

#include <cstdint>
#include <vector>

#include "loom/core/runtime.hpp"

namespace loom {

// `passages` holds each retriever's list, best first, the lists one after another (as
// RunResult::passages). With one retriever: its first top_k. With several: every doc_id once,
// scored sum over the lists of 1 / (60 + rank) (ranks from 1), best first (ties: first seen),
// score kind "rrf", retriever_slot naming every list that had it; the first top_k.
std::vector<PassageResult> fuse_passages(const std::vector<PassageResult> &passages, int64_t top_k);

}  // namespace loom
