/*
CUDA device queries for fastllm.info(): how many GPUs the driver reports and their names.
Returns 0 devices (not an error) when no driver or GPU is present, so a CUDA build imports anywhere.
*/
#include <cuda_runtime.h>

#include <string>

namespace fastllm::cuda {

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error
        return 0;
    }
    return n;
}

std::string device_name(int i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) return "unknown";
    return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}

}  // namespace fastllm::cuda
