// Byte-level BPE training: count unique pre-tokenized chunks, then merge the most frequent adjacent pair
// incrementally. Pure C++; see train.cpp for the algorithm and tie-break.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/bpe.h"

namespace fastllm::tok {

// Multiset of chunks (byte strings) with int64 counts; keys in insertion order.
class ChunkCounts {
   public:
    void add(std::string_view chunk, int64_t n = 1);
    void merge(const ChunkCounts& other);  // adds other's counts into this
    size_t size() const { return counts_.size(); }
    std::string_view key(size_t i) const { return {keys_.data() + off_[i], len_[i]}; }
    int64_t count(size_t i) const { return counts_[i]; }

   private:
    BytesMap index_;  // chunk -> i
    std::string keys_;
    std::vector<uint64_t> off_;
    std::vector<uint32_t> len_;
    std::vector<int64_t> counts_;
};

// Counts the pre-tokenized chunks of texts with pattern p, after cutting out the special tokens (they are never
// part of a chunk). Work is split among `threads` threads at line starts where both patterns are known to
// start a chunk ("x\nA": a non-space ASCII character, a newline, an ASCII letter); their counts are merged.
ChunkCounts count_chunks(const std::vector<std::string_view>& texts, Pattern p,
                         const std::vector<std::string>& specials, int threads);

// progress(done, total) is called every `every` merges and once at the end; it may throw to abort.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

// Learns up to n_merges merges over the counted chunks. Tokens 0..255 are the single bytes; merge k makes
// token 256 + k from (left, right). Stops early when no adjacent pair is left. Deterministic.
std::vector<std::pair<int32_t, int32_t>> train_bpe(const ChunkCounts& words, int64_t n_merges,
                                                   const ProgressFn& progress = nullptr, int64_t every = 100);

}  // namespace fastllm::tok
