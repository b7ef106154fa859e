// Internals of pretokenize.cpp exposed for tests (bindings.cpp: _C._pretokenize_char_classes).
#pragma once
#include <cstdint>

namespace fastllm::tok {

// Class flags of a code point as the scanners see it: 1 = \p{L}, 2 = \p{N}, 4 = \s (regex's definitions);
// 0 for anything else, including cp >= 0x110000.
uint8_t char_class(uint32_t cp);

}  // namespace fastllm::tok
