/*
Byte-level BPE training (the algorithm of GPT-2's and HF's trainers, done incrementally).

Input: unique chunks ("words") with counts, from the pre-tokenizer (chunk counting is split among threads
by the caller and the per-thread ChunkCounts merged). Each word starts as its bytes (token b = byte b).
Repeat until n_merges: take the adjacent pair (a, b) with the highest count over all words (weighted by
word count, overlapping occurrences counted, e.g. "aaa" has (a, a) twice), make token c = 256 + k, and
rewrite every word containing it, replacing (a, b) left to right without overlap ("aaa" -> [aa, a]).
Tie-break: highest count, then smallest left id, then smallest right id.
Skipped pairs: if bytes(a)+bytes(b) is already a token (the same bytes reached by another split), the pair
is dropped for good, so every token has distinct bytes (tiktoken requires it); it stays unmerged in words.

Data structures (nothing is recounted per merge):
  - words: symbols in one flat array with next/prev links inside each word; a merge writes the new token at
    the left position and unlinks the right one;
  - pair table: (a, b) -> slot with count and `where`, the positions (of the left symbol) where the pair
    occurred (append-only, may hold stale or repeated entries: a merge sorts them, so that it sees the
    occurrences of a word left to right, and skips those whose symbols changed);
  - max-heap of (count, a, b) with lazy deletion: an entry whose count is stale is re-pushed with the
    current count when popped. Only pairs that contain the new token can gain count in a merge, and those
    are new, so they are pushed once at the end of the merge; all other counts only decrease, hence every
    live pair always has an entry whose count is >= its current one and the first popped entry that is up
    to date is the true maximum (ties resolved by the heap order above).
  - per merge, per occurrence x A B y: the counts of (x, A) and (B, y) move to (x, C) and (C, y).
Complexity: O(occurrences of the merged pair) per merge (plus sorting them), O(log P) per heap operation:
near-linear in the text, however long its chunks (rewriting every word that holds the pair instead costs
the word's length per merge: hours for a 50 MB line without spaces, which is a single chunk).
Memory: ~20 bytes per byte of the distinct chunks (symbols, links, word ids, occurrence lists).
Reference: tests/test_bpe_train.py has the straightforward version (full recount per merge) and checks
identical merges.
*/
#include "tokenizer/train.h"

#include <algorithm>
#include <queue>

#include "common.h"

namespace fastllm::tok {

void ChunkCounts::add(std::string_view chunk, int64_t n) {
    const uint64_t h = hash_bytes(chunk.data(), chunk.size());
    int32_t i = index_.find(chunk, h);
    if (i < 0) {
        i = (int32_t)counts_.size();
        index_.insert(chunk, i);
        off_.push_back(keys_.size());
        len_.push_back((uint32_t)chunk.size());
        keys_.append(chunk.data(), chunk.size());
        counts_.push_back(0);
    }
    counts_[i] += n;
}

void ChunkCounts::merge(const ChunkCounts& other) {
    for (size_t i = 0; i < other.size(); i++) add(other.key(i), other.count(i));
}

// True when both patterns start a chunk at p whatever precedes p-2 (see train.h).
static inline bool safe_cut(std::string_view t, size_t p) {
    const unsigned char a = t[p - 2], c = t[p];
    return t[p - 1] == '\n' && a > 0x20 && a < 0x7f && ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

ChunkCounts count_chunks(const std::vector<std::string_view>& texts, Pattern p,
                         const std::vector<std::string>& specials, int threads) {
    if (threads < 1) threads = 1;
    // 1. ordinary stretches (special tokens cut out), split into pieces of about `target` bytes
    std::vector<std::pair<std::string, int32_t>> sp;
    for (auto& s : specials) sp.emplace_back(s, 0);
    size_t total = 0;
    for (auto t : texts) total += t.size();
    const size_t target = std::max<size_t>(1 << 16, total / ((size_t)threads * 8) + 1);
    std::vector<std::string_view> pieces;
    auto add_stretch = [&](std::string_view t) {
        while (t.size() > target) {
            size_t cut = 0;
            for (size_t q = target; q + 1 < t.size(); q++)
                if (safe_cut(t, q)) {
                    cut = q;
                    break;
                }
            if (!cut) break;
            pieces.push_back(t.substr(0, cut));
            t = t.substr(cut);
        }
        if (!t.empty()) pieces.push_back(t);
    };
    for (auto t : texts) {
        if (sp.empty()) add_stretch(t);
        else split_specials(t, sp, [&](size_t a, size_t b) { add_stretch(t.substr(a, b - a)); },
                            [](int32_t, size_t) {});
    }
    // 2. count per thread, then merge
    std::vector<ChunkCounts> counts((size_t)threads);
    const int64_t np = (int64_t)pieces.size();
#pragma omp parallel num_threads(threads)
    {
        ChunkCounts& mine = counts[(size_t)thread_id()];
        std::vector<std::pair<size_t, size_t>> chunks;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < np; i++) {
            chunks.clear();
            pretokenize(pieces[i], p, chunks);
            for (auto [a, b] : chunks) mine.add(pieces[i].substr(a, b - a));
        }
    }
    for (size_t t = 1; t < counts.size(); t++) counts[0].merge(counts[t]);
    return std::move(counts[0]);
}

namespace {

struct HeapEntry {
    int64_t count;
    int32_t a, b;
};
// std::priority_queue pops the "largest": higher count, then smaller a, then smaller b.
struct HeapLess {
    bool operator()(const HeapEntry& x, const HeapEntry& y) const {
        if (x.count != y.count) return x.count < y.count;
        if (x.a != y.a) return x.a > y.a;
        return x.b > y.b;
    }
};

}  // namespace

std::vector<std::pair<int32_t, int32_t>> train_bpe(const ChunkCounts& words, int64_t n_merges,
                                                   const ProgressFn& progress, int64_t every) {
    // 1. words as byte symbols in one array, linked in both directions within each word
    constexpr uint32_t kEnd = UINT32_MAX;
    const size_t W = words.size();
    size_t total = 0;
    for (size_t w = 0; w < W; w++) total += words.key(w).size();
    FASTLLM_CHECK(total < kEnd, "the distinct chunks of the training text hold ", total, " bytes (at most ",
                  kEnd - 1, ")");
    std::vector<int32_t> sym(total);      // token at each position; -1 once merged into its left neighbour
    std::vector<uint32_t> next(total), prev(total), word(total);
    std::vector<int64_t> freq(W);
    for (size_t w = 0, i = 0; w < W; w++) {
        const std::string_view k = words.key(w);
        freq[w] = words.count(w);
        for (size_t j = 0; j < k.size(); j++, i++) {
            sym[i] = (unsigned char)k[j];
            word[i] = (uint32_t)w;
            prev[i] = j > 0 ? (uint32_t)i - 1 : kEnd;
            next[i] = j + 1 < k.size() ? (uint32_t)i + 1 : kEnd;
        }
    }

    // 2. pair table: count and occurrence positions (of the left symbol) of every adjacent pair
    PairIndex slots;
    std::vector<int64_t> count;
    std::vector<std::vector<uint32_t>> where;
    std::vector<std::pair<int32_t, int32_t>> pair_of;
    auto slot_of = [&](int32_t a, int32_t b) {
        const int32_t s = slots.get(a, b, true);
        if ((size_t)s == count.size()) {
            count.push_back(0);
            where.emplace_back();
            pair_of.emplace_back(a, b);
        }
        return s;
    };
    for (uint32_t i = 0; i < total; i++)
        if (next[i] != kEnd) {
            const int32_t p = slot_of(sym[i], sym[i + 1]);
            count[p] += freq[word[i]];
            where[p].push_back(i);
        }
    std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapLess> heap;
    for (size_t p = 0; p < count.size(); p++)
        if (count[p] > 0) heap.push({count[p], pair_of[p].first, pair_of[p].second});

    // 3. token bytes, for the skip rule
    std::vector<std::string> tok(256);
    BytesMap vocab;
    for (int b = 0; b < 256; b++) {
        tok[b] = std::string(1, (char)b);
        vocab.insert(tok[b], b);
    }

    std::vector<std::pair<int32_t, int32_t>> merges;
    std::vector<int32_t> fresh;  // slots of pairs containing the new token, touched in this merge
    std::vector<uint8_t> is_fresh;
    if (every < 1) every = 1;

    while ((int64_t)merges.size() < n_merges && !heap.empty()) {
        const HeapEntry top = heap.top();
        heap.pop();
        const int32_t p = slots.get(top.a, top.b, false);
        if (count[p] != top.count) {
            if (count[p] > 0) heap.push({count[p], top.a, top.b});
            continue;
        }
        const int32_t A = top.a, B = top.b;
        std::string cat = tok[A] + tok[B];
        if (vocab.find(cat) >= 0) continue;  // skip rule (see top)
        const int32_t C = (int32_t)tok.size();
        merges.emplace_back(A, B);
        vocab.insert(cat, C);
        tok.push_back(std::move(cat));

        // 4. merge each occurrence, left to right within a word (sorted positions), moving the counts of
        //    the neighbouring pairs: (x, A) -> (x, C) on the left, (B, y) -> (C, y) on the right
        fresh.clear();
        auto add = [&](int32_t a, int32_t b, uint32_t pos, int64_t f) {  // a pair containing C appears
            const int32_t q = slot_of(a, b);
            count[q] += f;
            where[q].push_back(pos);
            if ((size_t)q >= is_fresh.size()) is_fresh.resize(count.size() * 2, 0);
            if (!is_fresh[q]) is_fresh[q] = 1, fresh.push_back(q);
        };
        std::vector<uint32_t> ws;
        ws.swap(where[p]);  // (A, B) disappears everywhere
        std::sort(ws.begin(), ws.end());
        ws.erase(std::unique(ws.begin(), ws.end()), ws.end());
        for (uint32_t i : ws) {
            const uint32_t j = next[i];
            if (sym[i] != A || j == kEnd || sym[j] != B) continue;  // stale entry
            const int64_t f = freq[word[i]];
            const uint32_t l = prev[i], r = next[j];
            if (l != kEnd) {
                count[slots.get(sym[l], A, false)] -= f;
                add(sym[l], C, l, f);
            }
            if (r != kEnd) {
                count[slots.get(B, sym[r], false)] -= f;
                add(C, sym[r], i, f);
                prev[r] = i;
            }
            count[p] -= f;
            sym[i] = C;
            sym[j] = -1;
            next[i] = r;
        }
        for (int32_t q : fresh) {
            is_fresh[q] = 0;
            if (count[q] > 0) heap.push({count[q], pair_of[q].first, pair_of[q].second});
        }
        if (progress && (int64_t)merges.size() % every == 0) progress((int64_t)merges.size(), n_merges);
    }
    if (progress) progress((int64_t)merges.size(), n_merges);
    return merges;
}

}  // namespace fastllm::tok
