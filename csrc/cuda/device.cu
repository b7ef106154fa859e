/*
Devices and memory for fastllm's CUDA backend: device queries (fastllm.info()), allocation, host<->device
copies, dtype conversion (fp32 <-> bf16), in-place add and a sum of squares (gradient norm).
device_count() returns 0 (not an error) when no driver or GPU is present, so a CUDA build imports anywhere.
Element-wise kernels are grid-stride loops: O(n) work, memory-bound; sum_squares reduces per block in fp32
then adds the block sums in double on the host (deterministic: fixed grid, fixed order).
*/
#include <vector>

#include "common.cuh"

namespace fastllm::cuda {

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the error so later calls start clean
        return 0;
    }
    return n;
}

std::string device_name(int i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) return "unknown";
    return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}

int current_device() {
    int d = 0;
    CUDA_CHECK(cudaGetDevice(&d));
    return d;
}

void set_device(int device) { CUDA_CHECK(cudaSetDevice(device)); }

void* malloc_device(size_t bytes) {
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error(str_cat("CUDA could not allocate ", bytes, " bytes (", bytes / (1 << 20),
                                         " MiB): ", cudaGetErrorString(err)));
    }
    return p;
}

void free_device(void* p) {
    if (p) cudaFree(p);  // never throws: called from destructors
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
void copy_to_host(void* dst, const void* src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
void copy_device(void* dst, const void* src, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}
void zero_device(void* p, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemset(p, 0, bytes));
}
void synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }

static int grid_for(int64_t n, int block) {
    int64_t g = (n + block - 1) / block;
    return (int)(g < 4096 ? (g > 0 ? g : 1) : 4096);
}

template <typename D, typename S>
__global__ void convert_kernel(D* dst, const S* src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = from_f32<D>(to_f32(src[i]));
}

void convert(void* dst, DType dt, const void* src, DType st, int64_t n) {
    if (n == 0) return;
    if (dt == st) return copy_device(dst, src, n * dtype_size(dt));
    DISPATCH_FLOAT(dt, D, DISPATCH_FLOAT(st, S, {
        convert_kernel<D, S><<<grid_for(n, 256), 256>>>((D*)dst, (const S*)src, n);
    }));
    CUDA_CHECK_LAUNCH();
}

template <typename T>
__global__ void add_kernel(T* dst, const T* src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = from_f32<T>(to_f32(dst[i]) + to_f32(src[i]));
}

void add_inplace(void* dst, const void* src, int64_t n, DType t) {
    if (n == 0) return;
    DISPATCH_FLOAT(t, T, { add_kernel<T><<<grid_for(n, 256), 256>>>((T*)dst, (const T*)src, n); });
    CUDA_CHECK_LAUNCH();
}

template <typename T>
__global__ void sum_squares_kernel(float* block_sums, const T* x, int64_t n) {
    float acc = 0.f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = to_f32(x[i]);
        acc += v * v;
    }
    __shared__ float warp_sums[32];
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        float s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
        s = warp_sum(s);
        if (threadIdx.x == 0) block_sums[blockIdx.x] = s;
    }
}

double sum_squares(const void* x, int64_t n, DType t) {
    if (n == 0) return 0.0;
    const int block = 512, grid = grid_for(n, block) < 1024 ? grid_for(n, block) : 1024;
    float* sums = (float*)malloc_device(grid * sizeof(float));
    try {
        DISPATCH_FLOAT(t, T, { sum_squares_kernel<T><<<grid, block>>>(sums, (const T*)x, n); });
        CUDA_CHECK_LAUNCH();
        std::vector<float> host(grid);
        copy_to_host(host.data(), sums, grid * sizeof(float));
        free_device(sums);
        double s = 0.0;
        for (float v : host) s += v;
        return s;
    } catch (...) {
        free_device(sums);
        throw;
    }
}

}  // namespace fastllm::cuda
