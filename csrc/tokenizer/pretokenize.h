// Pre-tokenization: split UTF-8 text into chunks exactly as the `regex` module splits it with one of the
// built-in patterns (GPT-2, GPT-4/cl100k, Llama 3, Qwen2, SmolLM, and two for SentencePiece files), by hand-written scanners (no regex
// engine), see pretokenize.cpp.
#pragma once
#include <cstddef>
#include <string_view>
#include <utility>
#include <vector>

namespace fastllm::tok {

// whole: the text is one chunk (SentencePiece files without a split: Llama 2); metaspace: a chunk starts at every
// space (HF's Metaspace split=true, the space kept with what follows).
enum class Pattern { gpt2, gpt4, llama3, qwen2, smollm, whole, metaspace };

// The regex source strings of the built-in patterns (what tiktoken's pat_str would be).
const char* pattern_string(Pattern p);

// Appends to `chunks` the [begin, end) byte offsets of each match of the pattern in `text` (valid UTF-8), in
// order. As with regex.findall, text not covered by any match is skipped (for these patterns every character
// is covered, so the chunks tile the text).
void pretokenize(std::string_view text, Pattern p, std::vector<std::pair<size_t, size_t>>& chunks);

}  // namespace fastllm::tok
