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
  - words: symbols in one flat array, word w at [start[w], start[w] + len[w]), shrinking in place;
  - pair table: (a, b) -> slot with count and `where`, the list of words that contained it (append-only, may
    hold stale or repeated entries; a per-word stamp skips repeats and a scan skips words that no longer
    contain the pair);
  - max-heap of (count, a, b) with lazy deletion: an entry whose count is stale is re-pushed with the
    current count when popped. Only pairs that contain the new token can gain count in a merge, and those
    are new, so they are pushed once at the end of the merge; all other counts only decrease, hence every
    live pair always has an entry whose count is >= its current one and the first popped entry that is up
    to date is the true maximum (ties resolved by the heap order above).
  - per merge, for each affected word: subtract its pairs, rewrite it, add its pairs back (words are short;
    this keeps the update obviously right).
Complexity: O(sum over merges of the lengths of the words containing the merged pair) hash operations,
plus O(log P) per heap operation.
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
        else split_specials(t, sp, [&](size_t a, size_t b) { add_stretch(t.substr(a, b - a)); }, [](int32_t) {});
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

// (a, b) -> dense slot index, open addressing.
class PairSlots {
   public:
    PairSlots() { rehash(1 << 16); }
    // slot of (a, b), creating it (returned flag true) when new
    int32_t get(int32_t a, int32_t b, bool create) {
        const uint64_t k = PairMap::key(a, b);
        size_t i = mix(k) & mask_;
        for (;; i = (i + 1) & mask_) {
            if (keys_[i] == k) return vals_[i];
            if (keys_[i] == kEmpty) break;
        }
        if (!create) return -1;
        if ((n_ + 1) * 2 > keys_.size()) {
            rehash(keys_.size() * 2);
            i = mix(k) & mask_;
            while (keys_[i] != kEmpty) i = (i + 1) & mask_;
        }
        keys_[i] = k;
        vals_[i] = (int32_t)n_;
        return (int32_t)n_++;
    }

   private:
    static constexpr uint64_t kEmpty = ~0ull;
    static size_t mix(uint64_t k) {
        k *= 0x9E3779B97F4A7C15ull;
        return (size_t)(k ^ (k >> 29));
    }
    void rehash(size_t cap) {
        std::vector<uint64_t> ok;
        std::vector<int32_t> ov;
        ok.swap(keys_);
        ov.swap(vals_);
        keys_.assign(cap, kEmpty);
        vals_.assign(cap, -1);
        mask_ = cap - 1;
        for (size_t j = 0; j < ok.size(); j++) {
            if (ok[j] == kEmpty) continue;
            size_t i = mix(ok[j]) & mask_;
            while (keys_[i] != kEmpty) i = (i + 1) & mask_;
            keys_[i] = ok[j];
            vals_[i] = ov[j];
        }
    }
    std::vector<uint64_t> keys_;
    std::vector<int32_t> vals_;
    size_t mask_ = 0, n_ = 0;
};

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
    // 1. words as byte symbols
    const size_t W = words.size();
    std::vector<int32_t> sym;
    std::vector<uint64_t> start(W);
    std::vector<uint32_t> len(W);
    std::vector<int64_t> freq(W);
    size_t total = 0;
    for (size_t w = 0; w < W; w++) total += words.key(w).size();
    sym.reserve(total);
    for (size_t w = 0; w < W; w++) {
        start[w] = sym.size();
        len[w] = (uint32_t)words.key(w).size();
        freq[w] = words.count(w);
        for (unsigned char c : words.key(w)) sym.push_back(c);
    }

    // 2. initial pair counts and where-lists
    PairSlots slots;
    std::vector<int64_t> count;
    std::vector<std::vector<int32_t>> where;
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
    for (size_t w = 0; w < W; w++) {
        const int32_t* s = sym.data() + start[w];
        for (uint32_t i = 0; i + 1 < len[w]; i++) {
            const int32_t p = slot_of(s[i], s[i + 1]);
            count[p] += freq[w];
            if (where[p].empty() || where[p].back() != (int32_t)w) where[p].push_back((int32_t)w);
        }
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
    std::vector<uint32_t> stamp(W, 0);
    std::vector<int32_t> fresh;  // slots of pairs containing the new token, touched in this merge
    std::vector<uint8_t> is_fresh;
    uint32_t cur_stamp = 0;
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

        cur_stamp++;
        fresh.clear();
        std::vector<int32_t> ws;
        ws.swap(where[p]);  // (A, B) disappears from every word
        for (int32_t w : ws) {
            if (stamp[w] == cur_stamp) continue;
            stamp[w] = cur_stamp;
            int32_t* s = sym.data() + start[w];
            const uint32_t n = len[w];
            bool has = false;
            for (uint32_t i = 0; i + 1 < n && !has; i++) has = s[i] == A && s[i + 1] == B;
            if (!has) continue;
            const int64_t f = freq[w];
            for (uint32_t i = 0; i + 1 < n; i++) count[slots.get(s[i], s[i + 1], false)] -= f;
            uint32_t m = 0;
            for (uint32_t i = 0; i < n; i++) {
                if (i + 1 < n && s[i] == A && s[i + 1] == B) {
                    s[m++] = C;
                    i++;
                } else {
                    s[m++] = s[i];
                }
            }
            len[w] = m;
            for (uint32_t i = 0; i + 1 < m; i++) {
                if (s[i] == C || s[i + 1] == C) {
                    const int32_t q = slot_of(s[i], s[i + 1]);
                    count[q] += f;
                    if (where[q].empty() || where[q].back() != w) where[q].push_back(w);
                    if ((size_t)q >= is_fresh.size()) is_fresh.resize(count.size() * 2, 0);
                    if (!is_fresh[q]) is_fresh[q] = 1, fresh.push_back(q);
                } else {
                    count[slots.get(s[i], s[i + 1], false)] += f;
                }
            }
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
