// Byte-level BPE encoder/decoder with tiktoken semantics (and HF merge-priority semantics for tokenizer.json
// files written by other trainers). Pure C++; bound in csrc/bindings.cpp, wrapped by fastllm/tokenizer.py.
// Algorithm, complexity and performance notes: see the top of bpe.cpp.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/pretokenize.h"

namespace fastllm::tok {

// 64-bit hash of a byte string (8 bytes per step, multiply-xorshift mixing; not cryptographic).
uint64_t hash_bytes(const char* p, size_t n);

// Open-addressing (linear probing) map from byte strings to int32 values; keys live in one arena.
class BytesMap {
   public:
    BytesMap() { rehash(16); }
    // Inserts key -> value; returns false (and changes nothing) when key is present.
    bool insert(std::string_view key, int32_t value);
    int32_t find(std::string_view key) const { return find(key, hash_bytes(key.data(), key.size())); }
    int32_t find(std::string_view key, uint64_t h) const;  // -1 when absent
    size_t size() const { return n_; }

   private:
    struct Slot {
        uint64_t head;  // the key's first 8 bytes (zero padded): most keys compare without touching arena_
        uint32_t len;   // kEmpty for an empty slot
        uint32_t off;   // key offset in arena_
        int32_t value;
        uint32_t tag;   // high 32 bits of the hash
    };
    static uint64_t head_of(std::string_view key) {
        uint64_t h = 0;
        std::memcpy(&h, key.data(), key.size() < 8 ? key.size() : 8);
        return h;
    }
    static constexpr uint32_t kEmpty = 0xffffffffu;
    void rehash(size_t cap);
    std::vector<Slot> slots_;
    std::string arena_;
    size_t mask_ = 0, n_ = 0;
};

// Open-addressing map from an ordered pair of token ids to the merge it makes: (priority, result id).
class PairMap {
   public:
    struct Merge {
        int32_t prio;    // lower merges first (tiktoken: the result's rank; HF: the merge's line number)
        int32_t result;  // id of the merged token
    };
    PairMap() { rehash(16); }
    static uint64_t key(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }
    // Inserts unless present (the first insertion wins); returns whether it inserted.
    bool insert(int32_t a, int32_t b, Merge m);
    const Merge* find(int32_t a, int32_t b) const {
        const uint64_t k = key(a, b);
        const size_t h = mix(k);
        // one-bit filter (128 KiB, stays in L2): most pairs probed while encoding are not merges
        if (!(filter_[(h >> 40) & kFilterMask >> 6] >> (h >> 34 & 63) & 1)) return nullptr;
        for (size_t i = h & mask_;; i = (i + 1) & mask_) {
            const Slot& s = slots_[i];
            if (s.key == k) return &s.m;
            if (s.key == kEmpty) return nullptr;
        }
    }
    size_t size() const { return n_; }
    template <typename F>
    void for_each(F f) const {
        for (const Slot& s : slots_)
            if (s.key != kEmpty) f((int32_t)(s.key >> 32), (int32_t)(uint32_t)s.key, s.m);
    }

   private:
    struct Slot {
        uint64_t key;
        Merge m;
    };
    static constexpr uint64_t kEmpty = ~0ull;
    static constexpr size_t kFilterMask = (1u << 20) - 1;  // bits
    static size_t mix(uint64_t k) {
        k *= 0x9E3779B97F4A7C15ull;
        return (size_t)(k ^ (k >> 29));
    }
    void rehash(size_t cap);
    std::vector<uint64_t> filter_ = std::vector<uint64_t>((kFilterMask + 1) / 64, 0);
    std::vector<Slot> slots_;
    size_t mask_ = 0, n_ = 0;
};

// Open-addressing map from an ordered pair of ints to a dense index 0, 1, 2, ... given in order of first
// insertion (the caller keeps per-index data in plain vectors). Used for the trainer's pair table and for the
// edges of the tries in Encoder::from_ranks (edge (node, byte) -> child node).
class PairIndex {
   public:
    PairIndex() { rehash(1 << 16); }
    // index of (a, b); when absent: a new index if create, else -1
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
    size_t size() const { return n_; }

   private:
    static constexpr uint64_t kEmpty = ~0ull;
    static size_t mix(uint64_t k) {
        k *= 0x9E3779B97F4A7C15ull;
        return (size_t)(k ^ (k >> 29));
    }
    void rehash(size_t cap);
    std::vector<uint64_t> keys_;
    std::vector<int32_t> vals_;
    size_t mask_ = 0, n_ = 0;
};

// Per-thread memo of chunk -> ids for chunks that are not a single token (most chunks of a text repeat).
// Bounded: cleared when full.
class ChunkCache {
   public:
    const int32_t* find(std::string_view chunk, uint64_t h, uint32_t& n) const;
    void insert(std::string_view chunk, uint64_t h, const int32_t* ids, uint32_t n);
    void clear();
    uint64_t owner = 0;  // Encoder::uid() this cache belongs to
    uint64_t epoch = 0;  // clear_thread_caches() count when filled

   private:
    struct Slot {
        uint64_t hash;
        uint32_t key_off, key_len, ids_off, ids_len;
    };
    // grows from kMinSlots (doubling at half full) to kMaxSlots, then starts over empty
    static constexpr size_t kMinSlots = 1 << 12, kMaxSlots = 1 << 18, kMaxChunk = 256;
    void grow();
    std::vector<Slot> slots_;  // allocated on first insert; key_len == UINT32_MAX marks empty
    size_t mask_ = 0;
    std::string keys_;
    std::vector<int32_t> ids_;
    size_t n_ = 0;
};

// Empties every thread's chunk caches (lazily, on their next use); for cold-cache benchmarks.
void clear_thread_caches();

class Encoder {
   public:
    // tiktoken semantics: tokens[i] has rank ranks[i] (= its id). A chunk that is a token encodes as that
    // token; otherwise adjacent parts are merged, lowest rank of the concatenation first (leftmost on ties).
    // All 256 single bytes must be tokens. Throws std::invalid_argument on duplicate ranks or bytes.
    static Encoder from_ranks(const std::vector<std::string>& tokens, const std::vector<int32_t>& ranks);
    // Merge-priority semantics (HF BPE): vocab tokens with their ids, merges[k] = (left id, right id) has
    // priority k; the result is the token whose bytes are the concatenation (must be in the vocab).
    // whole_chunk_lookup = HF's ignore_merges. Single bytes missing from the vocab are dropped when encoding.
    static Encoder from_merges(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids,
                               const std::vector<std::pair<int32_t, int32_t>>& merges, bool whole_chunk_lookup);
    // Special tokens: never produced by BPE, only by the special-token split in encode(). Throws on clashes.
    void add_special(const std::string& bytes, int32_t id);
    // HF added tokens' lstrip / rstrip: the whitespace a special token takes with it (see split_specials).
    void set_strip(int32_t id, bool lstrip, bool rstrip);

    // SentencePiece-style BPE (HF tokenizer.json with Metaspace / byte_fallback: Llama 2, Mistral, TinyLlama).
    // Its tokens are given as their text with U+2581 written as a space. BPE starts from characters instead of
    // bytes: a character that is not a token becomes byte_ids[b] for each of its UTF-8 bytes when all of them
    // are >= 0 (byte fallback; those ids decode to the byte and are never merged), else unk_id (one for a run of
    // such characters if fuse_unk; none if unk_id < 0). encode() reads U+2581 in text as a space, and puts a
    // space before each stretch of ordinary text between special tokens as `prefix` says (HF: the Prepend
    // normalizer = every; Metaspace prepend_scheme always/first = unless it starts with a space, first: only
    // the stretch at the start of the text).
    enum class Prefix { none, first, always, every };
    void set_sentencepiece(const std::vector<int32_t>& byte_ids, int32_t unk_id, bool fuse_unk, Prefix prefix);
    bool sentencepiece() const { return sp_; }

    // Appends the ids of one pre-tokenized chunk to out.
    void encode_chunk(std::string_view chunk, std::vector<int32_t>& out, ChunkCache& cache) const;
    // Appends the ids of a sequence of chunks (uses this thread's cache).
    void encode_chunks(const std::vector<std::string_view>& chunks, std::vector<int32_t>& out) const;
    // tiktoken's encode: split text on the allowed special tokens (bytes, id), pre-tokenize each stretch of
    // ordinary text with pattern p and encode its chunks. Appends to out.
    // starts (if given) gets each token's first byte in text (HF's offset mapping, start only): the whitespace a
    // special token takes belongs to it, a SentencePiece prefix space to the text after it.
    void encode(std::string_view text, Pattern p, const std::vector<std::pair<std::string, int32_t>>& allowed,
                std::vector<int32_t>& out, std::vector<int64_t>* starts = nullptr) const;
    // encode() of many texts, in parallel over texts with `threads` OpenMP threads.
    void encode_batch(const std::vector<std::string_view>& texts, Pattern p,
                      const std::vector<std::pair<std::string, int32_t>>& allowed,
                      std::vector<std::vector<int32_t>>& outs, int threads) const;
    // The per-thread cache for this encoder (thread_local, a few encoders per thread).
    ChunkCache& thread_cache() const;

    // Concatenated bytes of ids; throws std::invalid_argument naming the first id out of range or unassigned.
    void decode(const int64_t* ids, size_t n, std::string& out) const;
    bool valid_id(int64_t id) const {
        return id >= 0 && id < (int64_t)len_.size() && len_[(size_t)id] != kNone;
    }
    std::string_view token_bytes(int32_t id) const { return {arena_.data() + off_[id], len_[id]}; }
    bool is_special(int32_t id) const { return special_[id]; }
    int32_t n_vocab() const { return (int32_t)len_.size(); }  // max id + 1
    int32_t n_tokens() const { return n_tokens_; }            // assigned ids (regular + special)
    const PairMap& pairs() const { return pairs_; }
    const std::vector<std::pair<std::string, int32_t>>& specials() const { return specials_; }
    bool whole_chunk_lookup() const { return whole_lookup_; }
    uint64_t uid() const { return uid_; }

   private:
    static constexpr uint32_t kNone = 0xffffffffu;
    void set_token(int32_t id, std::string_view bytes, bool special);
    // from_ranks / from_merges: a new Encoder with the regular tokens[i] -> ids[i] (what: "rank" or "id")
    static Encoder with_tokens(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids,
                               const char* what);
    // The parts BPE starts from: the byte tokens, or for SentencePiece the characters (see set_sentencepiece).
    void initial_parts(std::string_view chunk, std::vector<int32_t>& ids) const;
    // The text BPE sees for one stretch of ordinary text (SentencePiece: prefix space, U+2581 as a space).
    // where (if given) gets, for each byte of the result, the offset in t of the byte it comes from.
    std::string_view sp_text(std::string_view t, bool at_start, std::string& buf, std::vector<uint32_t>* where) const;
    static void sp_words(std::string_view t, std::vector<std::pair<size_t, size_t>>& chunks);
    void bpe(std::string_view chunk, std::vector<int32_t>& out) const;        // small chunks: linear scan
    void bpe_heap(std::string_view chunk, std::vector<int32_t>& out) const;   // long chunks: heap

   public:
    // Reference merge loop (bytes lookup per pair, as tiktoken's _educational.py); used by tests.
    void encode_chunk_naive(std::string_view chunk, std::vector<int32_t>& out) const;

   private:
    std::string arena_;             // token bytes
    std::vector<uint32_t> off_;     // by id
    std::vector<uint32_t> len_;     // by id; kNone = unassigned
    std::vector<uint8_t> special_;  // by id
    std::vector<uint8_t> strip_;    // by special id: 1 lstrip, 2 rstrip (set_strip)
    int32_t n_tokens_ = 0;
    BytesMap regular_;              // bytes -> id of regular tokens
    std::array<int32_t, 256> byte_id_{};
    PairMap pairs_;
    std::vector<PairMap::Merge> byte_pairs_;  // [256 * c0 + c1]: merge of the byte tokens of c0, c1 (prio
                                              // INT32_MAX: none); the first round of every chunk, no hashing
    void build_byte_pairs();
    // from_ranks: a merge (a, b) -> t, priority rank(t), for every split of every token t into tokens a, b
    void add_splits(const std::vector<std::string>& tokens, const std::vector<int32_t>& ranks);
    std::vector<std::pair<std::string, int32_t>> specials_;
    bool whole_lookup_ = true;
    uint64_t uid_ = 0;
    bool sp_ = false;  // SentencePiece-style (set_sentencepiece)
    bool sp_words_ = false;  // no token has a space after another character: text splits before each space run
    std::array<int32_t, 256> fallback_id_{};
    int32_t unk_id_ = -1;
    bool fuse_unk_ = false;
    Prefix prefix_ = Prefix::none;
};

// Length in bytes of the Unicode whitespace (Rust's char::is_whitespace, as HF tokenizers) starting at s[i] / ending
// just before s[i]; 0 if there is none.
size_t whitespace_at(std::string_view s, size_t i);
size_t whitespace_before(std::string_view s, size_t i);

// Finds allowed special tokens in text: calls ordinary(begin, end) for each stretch of ordinary text and
// special(id, begin) for each special token, leftmost occurrence first (longest on ties). strip(id) says which
// whitespace a token takes with it (HF added tokens' lstrip = 1: to its left, back to the previous token at
// most; rstrip = 2: to its right).
template <typename Ordinary, typename Special, typename Strip = uint8_t (*)(int32_t)>
void split_specials(std::string_view text, const std::vector<std::pair<std::string, int32_t>>& allowed,
                    Ordinary ordinary, Special special, Strip strip = [](int32_t) -> uint8_t { return 0; }) {
    std::vector<size_t> next(allowed.size());  // an empty token is never found (it would match everywhere)
    for (size_t k = 0; k < allowed.size(); k++)
        next[k] = allowed[k].first.empty() ? std::string_view::npos : text.find(allowed[k].first);
    size_t pos = 0;
    while (true) {
        size_t best = std::string_view::npos, bk = 0;
        for (size_t k = 0; k < allowed.size(); k++)
            if (next[k] < best || (next[k] == best && best != std::string_view::npos &&
                                   allowed[k].first.size() > allowed[bk].first.size()))
                best = next[k], bk = k;
        if (best == std::string_view::npos) break;
        size_t start = best, end = best + allowed[bk].first.size();
        const uint8_t flags = strip(allowed[bk].second);
        for (size_t w; (flags & 1) && start > pos && (w = whitespace_before(text, start)) && start - w >= pos;)
            start -= w;
        for (size_t w; (flags & 2) && (w = whitespace_at(text, end));) end += w;
        if (start > pos) ordinary(pos, start);
        special(allowed[bk].second, start);
        pos = end;
        for (size_t k = 0; k < allowed.size(); k++)
            if (next[k] != std::string_view::npos && next[k] < pos) next[k] = text.find(allowed[k].first, pos);
    }
    if (pos < text.size()) ordinary(pos, text.size());
}

}  // namespace fastllm::tok
