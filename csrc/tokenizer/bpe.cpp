/*
Byte-level BPE encoding, exactly as tiktoken's CoreBPE (and HF BPE by merge priority).

Per pre-tokenized chunk (see pretokenize.h; chunks never span special tokens):
  1. whole-chunk lookup: if the chunk's bytes are a token, emit it (tiktoken always; HF: ignore_merges);
  2. per-thread cache chunk -> ids (most multi-token chunks of a text repeat);
  3. otherwise split into single bytes and repeatedly merge the adjacent pair with the lowest priority,
     the leftmost on ties, until no adjacent pair merges. tiktoken's priority of (a, b) is the rank of
     bytes(a)+bytes(b) if that is a token; we precompute it once as a PairMap (a, b) -> (prio, result) over
     every split of every token into two tokens, so the loop hashes one uint64 per pair instead of a byte
     string (identical results: a pair merges iff its concatenation is a token, with that token's rank);
     finding the splits is linear in the token bytes (Encoder::add_splits).
Complexity: chunk of n bytes: O(n^2) linear scan for n <= kHeapMin = 128 (as tiktoken), O(n log n)
with a heap over a linked list above it (long whitespace or digit-free symbol runs). Both pick the same
pair: minimum (prio, position).
SentencePiece-style BPE (Llama 2, Mistral; Encoder::set_sentencepiece): step 3 starts from characters instead of
bytes (a character that is not a token becomes its byte-fallback tokens, else <unk>), as HF's BPE with
byte_fallback does; tokens hold U+2581 as a space so that decoding is still concatenation, and encode() gives each
stretch of ordinary text its leading space first (sp_text).
Decode: concatenate token bytes (arena + offsets by id).
Perf notes (6 MB, 32k vocab, 1 thread, cold cache; tiktoken 0.14 on the same ranks ~11-15 MB/s):
  English+code ~130 MB/s, multilingual ~60 MB/s. Time goes to pair-map probes (memory latency), then the
  whole-chunk lookup and the pre-tokenizer. What helped: open addressing with linear probing; byte-string
  keys keep their first 8 bytes inline (+ a 32-bit hash tag), so most probes never touch the arena; a dense
  256x256 table for the first round of pairs (single bytes, no hashing); a 128 KiB one-bit filter in front
  of the pair map (most probes are misses; the filter stays in L2): ~+15% multilingual; the cache only
  stores chunks that are not a single token and grows (4k..256k slots) before starting over: warm, it
  doubles multilingual speed. A global cache shared between threads was not tried: per-thread caches need
  no locks and one thread sees a text's repeats anyway.
Ref: openai/tiktoken src/lib.rs (_byte_pair_merge), tiktoken/_educational.py; HF tokenizers models/bpe.
*/
#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <queue>
#include <stdexcept>

#include "common.h"

namespace fastllm::tok {

static constexpr size_t kHeapMin = 128;  // longest chunk for the linear scan (its parts array size)
static constexpr int32_t kMaxId = 1 << 28;  // ids index dense tables: refuse absurd ones (corrupt files)

// ---------------------------------------------------------------------------------------------------------
// hashing and maps

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ull;
    x ^= x >> 32;
    return x;
}

uint64_t hash_bytes(const char* p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t v = 0;
        if (n >= 4) {
            uint32_t a, b;
            std::memcpy(&a, p, 4);
            std::memcpy(&b, p + n - 4, 4);
            v = (uint64_t)a << 32 | b;
        } else {
            v = (uint64_t)(uint8_t)p[0] << 16 | (uint64_t)(uint8_t)p[n / 2] << 8 | (uint8_t)p[n - 1];
        }
        h = (h ^ v) * 0x94d049bb133111ebull;
    }
    return mix64(h);
}

void BytesMap::rehash(size_t cap) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(cap, Slot{0, kEmpty, 0, -1, 0});
    mask_ = cap - 1;
    for (const Slot& s : old) {
        if (s.len == kEmpty) continue;
        const uint64_t h = hash_bytes(arena_.data() + s.off, s.len);
        size_t i = h & mask_;
        while (slots_[i].len != kEmpty) i = (i + 1) & mask_;
        slots_[i] = s;
    }
}

int32_t BytesMap::find(std::string_view key, uint64_t h) const {
    const uint32_t tag = (uint32_t)(h >> 32), len = (uint32_t)key.size();
    const uint64_t head = head_of(key);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
        const Slot& s = slots_[i];
        if (s.len == kEmpty) return -1;
        if (s.tag == tag && s.len == len && s.head == head &&
            (len <= 8 || std::memcmp(arena_.data() + s.off + 8, key.data() + 8, len - 8) == 0))
            return s.value;
    }
}

bool BytesMap::insert(std::string_view key, int32_t value) {
    const uint64_t h = hash_bytes(key.data(), key.size());
    if (find(key, h) >= 0) return false;
    if ((n_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    FASTLLM_CHECK(arena_.size() + key.size() < kEmpty, "token bytes exceed 4 GiB");
    size_t i = h & mask_;
    while (slots_[i].len != kEmpty) i = (i + 1) & mask_;
    slots_[i] = Slot{head_of(key), (uint32_t)key.size(), (uint32_t)arena_.size(), value, (uint32_t)(h >> 32)};
    arena_.append(key.data(), key.size());
    n_++;
    return true;
}

void PairMap::rehash(size_t cap) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(cap, Slot{kEmpty, {0, 0}});
    mask_ = cap - 1;
    for (const Slot& s : old) {
        if (s.key == kEmpty) continue;
        size_t i = mix(s.key) & mask_;
        while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
        slots_[i] = s;
    }
}

void PairIndex::rehash(size_t cap) {
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

bool PairMap::insert(int32_t a, int32_t b, Merge m) {
    if (find(a, b)) return false;
    if ((n_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    const uint64_t k = key(a, b);
    const size_t h = mix(k);
    filter_[(h >> 40) & kFilterMask >> 6] |= 1ull << (h >> 34 & 63);
    size_t i = h & mask_;
    while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
    slots_[i] = Slot{k, m};
    n_++;
    return true;
}

// ---------------------------------------------------------------------------------------------------------
// chunk cache

const int32_t* ChunkCache::find(std::string_view chunk, uint64_t h, uint32_t& n) const {
    if (slots_.empty() || chunk.size() > kMaxChunk) return nullptr;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
        const Slot& s = slots_[i];
        if (s.key_len == UINT32_MAX) return nullptr;
        if (s.hash == h && s.key_len == chunk.size() &&
            std::memcmp(keys_.data() + s.key_off, chunk.data(), chunk.size()) == 0) {
            n = s.ids_len;
            return ids_.data() + s.ids_off;
        }
    }
}

void ChunkCache::grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{0, 0, UINT32_MAX, 0, 0});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
        if (s.key_len == UINT32_MAX) continue;
        size_t i = s.hash & mask_;
        while (slots_[i].key_len != UINT32_MAX) i = (i + 1) & mask_;
        slots_[i] = s;
    }
}

void ChunkCache::insert(std::string_view chunk, uint64_t h, const int32_t* ids, uint32_t n) {
    if (chunk.size() > kMaxChunk) return;
    if (slots_.empty() || keys_.size() > (64u << 20)) clear();
    if ((n_ + 1) * 2 > slots_.size()) {
        if (slots_.size() >= kMaxSlots) clear();
        else grow();
    }
    size_t i = h & mask_;
    while (slots_[i].key_len != UINT32_MAX) i = (i + 1) & mask_;
    slots_[i] = Slot{h, (uint32_t)keys_.size(), (uint32_t)chunk.size(), (uint32_t)ids_.size(), n};
    keys_.append(chunk.data(), chunk.size());
    ids_.insert(ids_.end(), ids, ids + n);
    n_++;
}

void ChunkCache::clear() {
    slots_.assign(kMinSlots, Slot{0, 0, UINT32_MAX, 0, 0});
    mask_ = kMinSlots - 1;
    keys_.clear();
    ids_.clear();
    n_ = 0;
}

static std::atomic<uint64_t> g_cache_epoch{0};

void clear_thread_caches() { g_cache_epoch++; }

ChunkCache& Encoder::thread_cache() const {
    // A few caches per thread, keyed by the encoder's uid (uids are never reused); round-robin eviction.
    constexpr int kWays = 4;
    static thread_local ChunkCache caches[kWays];
    static thread_local int next = 0;
    const uint64_t epoch = g_cache_epoch.load(std::memory_order_relaxed);
    for (auto& c : caches)
        if (c.owner == uid_) {
            if (c.epoch != epoch) c.clear(), c.epoch = epoch;
            return c;
        }
    ChunkCache& c = caches[next];
    next = (next + 1) % kWays;
    c.clear();
    c.owner = uid_;
    c.epoch = epoch;
    return c;
}

// ---------------------------------------------------------------------------------------------------------
// construction

static std::atomic<uint64_t> g_next_uid{1};

static std::string show_bytes(std::string_view b) {
    std::string s = "b'";
    for (unsigned char c : b) {
        if (c >= 32 && c < 127 && c != '\\' && c != '\'') s += (char)c;
        else {
            const char* hex = "0123456789abcdef";
            s += "\\x";
            s += hex[c >> 4];
            s += hex[c & 15];
        }
    }
    return s + "'";
}

void Encoder::set_token(int32_t id, std::string_view bytes, bool special) {
    FASTLLM_CHECK(id >= 0, "token id must be >= 0, got ", id, " for ", show_bytes(bytes));
    FASTLLM_CHECK(id < kMaxId, "token id ", id, " is too large (max ", kMaxId - 1, ") for ", show_bytes(bytes));
    if ((size_t)id >= len_.size()) {
        len_.resize((size_t)id + 1, kNone);
        off_.resize((size_t)id + 1, 0);
        special_.resize((size_t)id + 1, 0);
    }
    FASTLLM_CHECK(len_[id] == kNone, "token id ", id, " is assigned twice (", show_bytes(token_bytes(id)),
                  " and ", show_bytes(bytes), ")");
    FASTLLM_CHECK(arena_.size() + bytes.size() < kNone, "token bytes exceed 4 GiB");
    off_[id] = (uint32_t)arena_.size();
    len_[id] = (uint32_t)bytes.size();
    special_[id] = special;
    arena_.append(bytes.data(), bytes.size());
    n_tokens_++;
}

// Every split of every token into two tokens is a merge with the token's rank as priority. Two ways to find
// the splits, the cheaper one for the vocabulary is used:
//  - lookup: both halves of each split in the token map, O(|t|^2) hashed bytes per token t; fastest for real
//    vocabularies (short tokens, the map stays in cache);
//  - tries: the tokens in two tries, one read forwards and one backwards, filled shortest token first;
//    inserting t into the first passes the prefixes of t that are tokens, into the second the suffixes, so all
//    splits of t cost O(|t|) (random probes into tables larger than the cache: ~2x slower per byte), which
//    the tokens of thousands of bytes made by training on a long run of one character need (the lookup costs
//    minutes there).
void Encoder::add_splits(const std::vector<std::string>& tokens, const std::vector<int32_t>& ranks) {
    uint64_t total = 0, squares = 0;
    size_t longest = 0;
    for (const auto& t : tokens) {
        total += t.size();
        squares += (uint64_t)t.size() * t.size();
        longest = std::max(longest, t.size());
    }
    if (squares <= 32 * total) {
        for (size_t i = 0; i < tokens.size(); i++) {
            const std::string_view t = tokens[i];
            for (size_t k = 1; k < t.size(); k++) {
                const int32_t a = regular_.find(t.substr(0, k));
                if (a < 0) continue;
                const int32_t b = regular_.find(t.substr(k));
                if (b >= 0) pairs_.insert(a, b, {ranks[i], ranks[i]});
            }
        }
        return;
    }
    FASTLLM_CHECK(total < (uint64_t)INT32_MAX, "token bytes exceed 2 GiB");
    std::vector<size_t> order(tokens.size()), first(longest + 2, 0);  // counting sort by length
    for (const auto& t : tokens) first[t.size() + 1]++;
    for (size_t n = 1; n < first.size(); n++) first[n] += first[n - 1];
    for (size_t i = 0; i < tokens.size(); i++) order[first[tokens[i].size()]++] = i;
    struct Trie {
        PairIndex edges;             // (node, byte) -> child node - 1; node 0 is the root
        std::vector<int32_t> token;  // by node: the rank of the token spelled by the path to it, or -1
        int32_t child(int32_t node, unsigned char c) {
            const int32_t n = edges.get(node, c, true) + 1;
            if ((size_t)n >= token.size()) token.resize((size_t)n + 1, -1);
            return n;
        }
    } fwd, bwd;
    std::vector<int32_t> prefix;  // prefix[k]: rank of t[:k] (-1: not a token)
    for (size_t i : order) {
        const std::string& t = tokens[i];
        const size_t n = t.size();
        prefix.assign(n, -1);
        int32_t f = 0, b = 0;
        for (size_t k = 1; k < n; k++) prefix[k] = fwd.token[f = fwd.child(f, (unsigned char)t[k - 1])];
        fwd.token[fwd.child(f, (unsigned char)t[n - 1])] = ranks[i];
        for (size_t k = n - 1; k >= 1; k--) {  // suffix t[k:]
            const int32_t s = bwd.token[b = bwd.child(b, (unsigned char)t[k])];
            if (s >= 0 && prefix[k] >= 0) pairs_.insert(prefix[k], s, {ranks[i], ranks[i]});
        }
        bwd.token[bwd.child(b, (unsigned char)t[0])] = ranks[i];
    }
}

Encoder Encoder::with_tokens(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids,
                             const char* what) {
    FASTLLM_CHECK(tokens.size() == ids.size(), "tokens and ", what, "s differ in length");
    Encoder e;
    e.uid_ = g_next_uid++;
    e.byte_id_.fill(-1);
    for (size_t i = 0; i < tokens.size(); i++) {
        FASTLLM_CHECK(!tokens[i].empty(), "token of ", what, " ", ids[i], " is empty");
        e.set_token(ids[i], tokens[i], false);
        FASTLLM_CHECK(e.regular_.insert(tokens[i], ids[i]), "token ", show_bytes(tokens[i]), " appears twice (",
                      what, "s ", e.regular_.find(tokens[i]), " and ", ids[i], ")");
        if (tokens[i].size() == 1) e.byte_id_[(uint8_t)tokens[i][0]] = ids[i];
    }
    return e;
}

Encoder Encoder::from_ranks(const std::vector<std::string>& tokens, const std::vector<int32_t>& ranks) {
    Encoder e = with_tokens(tokens, ranks, "rank");
    for (int b = 0; b < 256; b++)
        FASTLLM_CHECK(e.byte_id_[b] >= 0, "every single byte must be a token; byte ", b, " is missing");
    e.add_splits(tokens, ranks);
    e.whole_lookup_ = true;
    e.build_byte_pairs();
    return e;
}

void Encoder::build_byte_pairs() {
    byte_pairs_.assign(256 * 256, PairMap::Merge{INT32_MAX, -1});
    for (int c0 = 0; c0 < 256; c0++)
        for (int c1 = 0; c1 < 256; c1++)
            if (byte_id_[c0] >= 0 && byte_id_[c1] >= 0)
                if (const PairMap::Merge* g = pairs_.find(byte_id_[c0], byte_id_[c1])) byte_pairs_[c0 * 256 + c1] = *g;
}

Encoder Encoder::from_merges(const std::vector<std::string>& tokens, const std::vector<int32_t>& ids,
                             const std::vector<std::pair<int32_t, int32_t>>& merges, bool whole_chunk_lookup) {
    Encoder e = with_tokens(tokens, ids, "id");
    for (size_t k = 0; k < merges.size(); k++) {
        const auto [a, b] = merges[k];
        FASTLLM_CHECK(e.valid_id(a) && e.valid_id(b), "merge ", k, " refers to an unknown id");
        std::string cat(e.token_bytes(a));
        cat += e.token_bytes(b);
        const int32_t r = e.regular_.find(cat);
        FASTLLM_CHECK(r >= 0, "merge ", k, " makes ", show_bytes(cat), " which is not in the vocabulary");
        e.pairs_.insert(a, b, {(int32_t)k, r});  // a repeated merge keeps its first (highest) priority
    }
    e.whole_lookup_ = whole_chunk_lookup;
    e.build_byte_pairs();
    return e;
}

void Encoder::add_special(const std::string& bytes, int32_t id) {
    FASTLLM_CHECK(!bytes.empty(), "special token must not be empty");
    for (auto& s : specials_) FASTLLM_CHECK(s.first != bytes, "special token ", show_bytes(bytes), " given twice");
    set_token(id, bytes, true);
    specials_.emplace_back(bytes, id);
}

void Encoder::set_strip(int32_t id, bool lstrip, bool rstrip) {
    FASTLLM_CHECK(valid_id(id) && special_[id], "set_strip: id ", id, " is not a special token");
    if (strip_.size() < len_.size()) strip_.resize(len_.size(), 0);
    strip_[id] = (uint8_t)((lstrip ? 1 : 0) | (rstrip ? 2 : 0));
}

// Rust's char::is_whitespace (Unicode White_Space): the code points HF tokenizers' lstrip / rstrip remove.
static bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code point of the UTF-8 character of `len` bytes at p (valid UTF-8: text from a Python str).
static uint32_t code_point(const unsigned char* p, size_t len) {
    if (len == 1) return p[0];
    uint32_t c = p[0] & (0x7F >> len);
    for (size_t k = 1; k < len; k++) c = c << 6 | (p[k] & 0x3F);
    return c;
}

// Length of the UTF-8 character at s[0] (1 for a byte that does not start a valid one).
static size_t utf8_char_len(const unsigned char* s, size_t n) {
    const unsigned c = s[0];
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (len > n) return 1;
    for (size_t k = 1; k < len; k++)
        if ((s[k] & 0xC0) != 0x80) return 1;
    return len;
}

size_t whitespace_at(std::string_view s, size_t i) {
    if (i >= s.size()) return 0;
    const auto* u = reinterpret_cast<const unsigned char*>(s.data()) + i;
    const size_t len = utf8_char_len(u, s.size() - i);
    return is_white_space(code_point(u, len)) ? len : 0;
}

size_t whitespace_before(std::string_view s, size_t i) {
    if (i == 0) return 0;
    size_t start = i - 1;  // back over continuation bytes to the lead byte of the character ending at i
    while (start > 0 && i - start < 4 && ((unsigned char)s[start] & 0xC0) == 0x80) start--;
    return whitespace_at(s, start) == i - start ? i - start : 0;
}

void Encoder::set_sentencepiece(const std::vector<int32_t>& byte_ids, int32_t unk_id, bool fuse_unk, Prefix prefix) {
    FASTLLM_CHECK(byte_ids.size() == 256, "byte_ids must have 256 entries (-1: no token), got ", byte_ids.size());
    for (int b = 0; b < 256; b++) {
        fallback_id_[b] = byte_ids[b];
        if (byte_ids[b] >= 0) set_token(byte_ids[b], std::string(1, (char)b), false);  // decoded, never looked up
    }
    FASTLLM_CHECK(unk_id >= -1 && unk_id < kMaxId, "unk id ", unk_id, " is out of range");
    unk_id_ = unk_id;
    fuse_unk_ = fuse_unk;
    prefix_ = prefix;
    sp_ = true;
    // Files without a pre-tokenizer (Llama 2) run BPE over the whole text. When no token holds a space right after
    // another character, no merge can join the two sides of such a place: splitting the text there gives the same
    // ids, in chunks the cache can hold (SentencePiece's own trainer splits words this way: ~20x faster here).
    sp_words_ = true;
    for (size_t id = 0; id < len_.size() && sp_words_; id++) {
        if (len_[id] == kNone || special_[id]) continue;
        const std::string_view t = token_bytes((int32_t)id);
        for (size_t k = 1; k < t.size(); k++)
            if (t[k] == ' ' && t[k - 1] != ' ') sp_words_ = false;
    }
}

// ---------------------------------------------------------------------------------------------------------
// encoding

void Encoder::initial_parts(std::string_view chunk, std::vector<int32_t>& ids) const {
    const auto* u = reinterpret_cast<const unsigned char*>(chunk.data());
    const size_t n = chunk.size();
    if (!sp_) {
        for (size_t i = 0; i < n; i++)
            if (byte_id_[u[i]] >= 0) ids.push_back(byte_id_[u[i]]);  // (only HF vocabularies lack some bytes)
        return;
    }
    bool prev_unk = false;
    for (size_t i = 0; i < n;) {
        const size_t len = utf8_char_len(u + i, n - i);
        const int32_t id = len == 1 ? byte_id_[u[i]] : regular_.find(chunk.substr(i, len));
        bool fallback = id < 0;
        for (size_t k = 0; k < len && fallback; k++) fallback = fallback_id_[u[i + k]] >= 0;
        if (id >= 0) {
            ids.push_back(id);
        } else if (fallback) {
            for (size_t k = 0; k < len; k++) ids.push_back(fallback_id_[u[i + k]]);
        } else if (unk_id_ >= 0 && !(fuse_unk_ && prev_unk)) {
            ids.push_back(unk_id_);
        }
        prev_unk = id < 0 && !fallback && unk_id_ >= 0;
        i += len;
    }
}

// Chunks that start where a run of spaces follows another character (see set_sentencepiece).
void Encoder::sp_words(std::string_view t, std::vector<std::pair<size_t, size_t>>& chunks) {
    size_t start = 0;
    for (size_t i = 1; i < t.size(); i++)
        if (t[i] == ' ' && t[i - 1] != ' ') chunks.emplace_back(start, i), start = i;
    if (start < t.size()) chunks.emplace_back(start, t.size());
}

std::string_view Encoder::sp_text(std::string_view t, bool at_start, std::string& buf,
                                  std::vector<uint32_t>* where) const {
    static constexpr std::string_view kMeta = "\xE2\x96\x81";  // U+2581, SentencePiece's space
    if (t.empty()) return t;
    const bool space = t[0] == ' ' || t.substr(0, 3) == kMeta;
    buf.clear();
    if (where) where->clear();
    auto put = [&](char c, size_t from) {
        buf += c;
        if (where) where->push_back((uint32_t)from);
    };
    if (prefix_ == Prefix::every || (!space && (prefix_ == Prefix::always || (prefix_ == Prefix::first && at_start))))
        put(' ', 0);
    for (size_t i = 0; i < t.size();) {
        if (t.compare(i, 3, kMeta) == 0) put(' ', i), i += 3;
        else put(t[i], i), i++;
    }
    return buf;
}

void Encoder::encode_chunk(std::string_view chunk, std::vector<int32_t>& out, ChunkCache& cache) const {
    const size_t n = chunk.size();
    if (n == 0) return;
    if (n == 1 && !sp_) {
        const int32_t id = byte_id_[(uint8_t)chunk[0]];
        if (id >= 0) out.push_back(id);
        return;
    }
    const uint64_t h = hash_bytes(chunk.data(), n);
    if (whole_lookup_) {
        const int32_t id = regular_.find(chunk, h);
        if (id >= 0) {
            out.push_back(id);
            return;
        }
    }
    uint32_t m;
    if (const int32_t* ids = cache.find(chunk, h, m)) {
        out.insert(out.end(), ids, ids + m);
        return;
    }
    const size_t start = out.size();
    if (n <= kHeapMin) bpe(chunk, out);
    else bpe_heap(chunk, out);
    cache.insert(chunk, h, out.data() + start, (uint32_t)(out.size() - start));
}

void Encoder::encode_chunks(const std::vector<std::string_view>& chunks, std::vector<int32_t>& out) const {
    ChunkCache& cache = thread_cache();
    for (auto c : chunks) encode_chunk(c, out, cache);
}

void Encoder::encode(std::string_view text, Pattern p, const std::vector<std::pair<std::string, int32_t>>& allowed,
                     std::vector<int32_t>& out, std::vector<int64_t>* starts) const {
    ChunkCache& cache = thread_cache();
    static thread_local std::vector<std::pair<size_t, size_t>> chunks;
    static thread_local std::string buf;
    static thread_local std::vector<uint32_t> where;  // SentencePiece: byte of buf -> byte of the stretch
    out.reserve(out.size() + text.size() / 4 + 16);
    auto ordinary = [&](size_t a, size_t b) {
        std::string_view t = text.substr(a, b - a);
        if (sp_) t = sp_text(t, a == 0, buf, starts ? &where : nullptr);
        chunks.clear();
        if (sp_words_ && p == Pattern::whole) sp_words(t, chunks);
        else pretokenize(t, p, chunks);
        for (auto [x, y] : chunks) {
            const size_t first = out.size();
            encode_chunk(t.substr(x, y - x), out, cache);
            for (size_t k = first, pos = x; starts && k < out.size(); pos += len_[out[k]], k++)
                starts->push_back((int64_t)(a + (sp_ ? where[std::min(pos, y - 1)] : pos)));  // (<unk>: clamped)
        }
    };
    auto special = [&](int32_t id, size_t at) {
        out.push_back(id);
        if (starts) starts->push_back((int64_t)at);
    };
    if (allowed.empty()) ordinary(0, text.size());
    else
        split_specials(text, allowed, ordinary, special,
                       [&](int32_t id) -> uint8_t { return (size_t)id < strip_.size() ? strip_[id] : 0; });
}

void Encoder::encode_batch(const std::vector<std::string_view>& texts, Pattern p,
                           const std::vector<std::pair<std::string, int32_t>>& allowed,
                           std::vector<std::vector<int32_t>>& outs, int threads) const {
    outs.assign(texts.size(), {});
    const int64_t n = (int64_t)texts.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; i++) encode(texts[i], p, allowed, outs[i]);
}

// Linear scan, as tiktoken: parts[i] = (id, merge of parts[i] with parts[i+1]).
void Encoder::bpe(std::string_view chunk, std::vector<int32_t>& out) const {
    struct Part {
        int32_t id;
        int32_t prio;  // INT32_MAX: no merge with the next part
        int32_t result;
    };
    Part parts[kHeapMin];
    int m = 0;
    auto update = [&](int i) {
        const PairMap::Merge* g = pairs_.find(parts[i].id, parts[i + 1].id);
        parts[i].prio = g ? g->prio : INT32_MAX;
        parts[i].result = g ? g->result : -1;
    };
    if (sp_) {  // characters (at most one part per byte)
        static thread_local std::vector<int32_t> ids;
        ids.clear();
        initial_parts(chunk, ids);
        for (int32_t id : ids) parts[m++] = {id, INT32_MAX, -1};
        for (int i = 0; i + 1 < m; i++) update(i);
    } else {
        unsigned last_byte = 0;
        const auto* u = reinterpret_cast<const unsigned char*>(chunk.data());
        const size_t n = chunk.size();
        for (size_t i = 0; i < n; i++) {
            if (byte_id_[u[i]] < 0) continue;  // (only with HF vocabularies lacking some bytes)
            parts[m].id = byte_id_[u[i]];
            parts[m].prio = INT32_MAX;
            parts[m].result = -1;
            if (m > 0) {  // pair with the previous kept byte, from the dense byte-pair table
                const PairMap::Merge& g = byte_pairs_[(size_t)last_byte * 256 + u[i]];
                parts[m - 1].prio = g.prio;
                parts[m - 1].result = g.result;
            }
            last_byte = u[i];
            m++;
        }
    }
    while (m > 1) {
        int best = 0;
        for (int i = 1; i + 1 < m; i++)
            if (parts[i].prio < parts[best].prio) best = i;
        if (parts[best].prio == INT32_MAX) break;
        parts[best].id = parts[best].result;
        std::memmove(&parts[best + 1], &parts[best + 2], sizeof(Part) * (m - best - 2));
        m--;
        parts[m - 1].prio = INT32_MAX;
        if (best + 1 < m) update(best);
        else parts[best].prio = INT32_MAX;
        if (best > 0) update(best - 1);
    }
    for (int i = 0; i < m; i++) out.push_back(parts[i].id);
}

// Heap over a doubly linked list of parts; entries are validated lazily when popped.
void Encoder::bpe_heap(std::string_view chunk, std::vector<int32_t>& out) const {
    std::vector<int32_t> id, next, prev;
    id.reserve(chunk.size());
    initial_parts(chunk, id);
    const int n = (int)id.size();
    next.resize(n);
    prev.resize(n);
    for (int i = 0; i < n; i++) next[i] = i + 1, prev[i] = i - 1;
    struct Entry {
        int32_t prio, pos, right, left_id, right_id, result;
        bool operator>(const Entry& o) const { return prio != o.prio ? prio > o.prio : pos > o.pos; }
    };
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto push = [&](int l) {
        const int r = next[l];
        if (l < 0 || r >= n) return;
        if (const PairMap::Merge* g = pairs_.find(id[l], id[r])) heap.push({g->prio, l, r, id[l], id[r], g->result});
    };
    for (int i = 0; i + 1 < n; i++) push(i);
    std::vector<uint8_t> alive(n, 1);
    while (!heap.empty()) {
        const Entry e = heap.top();
        heap.pop();
        if (!alive[e.pos] || next[e.pos] != e.right || e.right >= n || !alive[e.right] || id[e.pos] != e.left_id ||
            id[e.right] != e.right_id)
            continue;
        id[e.pos] = e.result;
        alive[e.right] = 0;
        next[e.pos] = next[e.right];
        if (next[e.pos] < n) prev[next[e.pos]] = e.pos;
        push(e.pos);
        if (prev[e.pos] >= 0) push(prev[e.pos]);
    }
    for (int i = 0; i < n; i = next[i]) out.push_back(id[i]);
}

void Encoder::encode_chunk_naive(std::string_view chunk, std::vector<int32_t>& out) const {
    // tiktoken _educational.bpe_encode: parts are byte strings; merge the adjacent pair whose concatenation
    // has the lowest priority. With merge priorities (HF), the pair must be a listed merge.
    if (whole_lookup_) {
        const int32_t id = regular_.find(chunk);
        if (id >= 0) {
            out.push_back(id);
            return;
        }
    }
    std::vector<int32_t> parts;
    initial_parts(chunk, parts);
    while (parts.size() > 1) {
        int32_t best_prio = INT32_MAX, best_res = -1;
        size_t best = 0;
        for (size_t i = 0; i + 1 < parts.size(); i++) {
            const PairMap::Merge* g = pairs_.find(parts[i], parts[i + 1]);
            if (g && g->prio < best_prio) best_prio = g->prio, best_res = g->result, best = i;
        }
        if (best_res < 0) break;
        parts[best] = best_res;
        parts.erase(parts.begin() + best + 1);
    }
    out.insert(out.end(), parts.begin(), parts.end());
}

// ---------------------------------------------------------------------------------------------------------
// decoding

void Encoder::decode(const int64_t* ids, size_t n, std::string& out) const {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (!valid_id(ids[i])) {
            FASTLLM_CHECK(ids[i] >= 0 && ids[i] < n_vocab(), "token id ", ids[i], " at index ", i,
                          " is out of range [0, ", n_vocab(), ")");
            FASTLLM_CHECK(false, "token id ", ids[i], " at index ", i, " is not assigned to any token");
        }
        total += len_[ids[i]];
    }
    const size_t start = out.size();
    out.resize(start + total);
    char* p = out.data() + start;
    for (size_t i = 0; i < n; i++) {
        const uint32_t l = len_[ids[i]];
        std::memcpy(p, arena_.data() + off_[ids[i]], l);
        p += l;
    }
}

}  // namespace fastllm::tok
