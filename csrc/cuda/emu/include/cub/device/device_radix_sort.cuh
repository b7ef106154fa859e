/* fastllm's CUDA emulator: cub::DeviceRadixSort::SortPairs as a stable sort on the key bits [begin_bit, end_bit)
(what an LSD radix sort gives). Asks for a little temporary storage so the caller's sizing path runs. */
#pragma once
#include <algorithm>
#include <numeric>
#include <vector>

#include "../../cuda_runtime.h"

namespace cub {
struct DeviceRadixSort {
    template <typename K, typename V, typename N>
    static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out, const V* vals_in,
                                 V* vals_out, N n, int begin_bit = 0, int end_bit = (int)sizeof(K) * 8,
                                 cudaStream_t = nullptr) {
        if (temp == nullptr) {
            temp_bytes = 256 + (size_t)n;
            return cudaSuccess;
        }
        if (!::emu::is_device_pointer(temp)) return cudaErrorInvalidValue;
        const int bits = end_bit - begin_bit;
        const K mask = bits >= (int)sizeof(K) * 8 ? ~K(0) : (K)((K(1) << bits) - 1);
        std::vector<int64_t> order((size_t)n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
            return ((keys_in[a] >> begin_bit) & mask) < ((keys_in[b] >> begin_bit) & mask);
        });
        std::vector<K> k((size_t)n);
        std::vector<V> v((size_t)n);
        for (int64_t i = 0; i < (int64_t)n; i++) k[i] = keys_in[order[i]], v[i] = vals_in[order[i]];
        std::copy(k.begin(), k.end(), keys_out);
        std::copy(v.begin(), v.end(), vals_out);
        return cudaSuccess;
    }
};
}  // namespace cub
