/*
Shared declarations of the CUDA bindings: DeviceArray and the argument checks every kernel binding uses.
*/
#pragma once
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "cuda/kernels.h"

namespace fastllm::cuda {

struct DeviceArray {
    std::shared_ptr<void> base;  // the allocation (freed with its last view); data() = base + offset bytes
    size_t offset = 0;
    std::vector<int64_t> shape;
    DType dtype = DType::f32;
    int device = 0;

    int64_t size() const;
    size_t nbytes() const { return (size_t)size() * dtype_size(dtype); }
    void* data() const { return base ? (char*)base.get() + offset : nullptr; }
    std::string shape_str() const;
    static DeviceArray empty(const std::vector<int64_t>& shape, DType dtype);
};

DType parse_dtype(const std::string& s);
// dtype (TypeError), exact shape and device (ValueError)
void check_array(const DeviceArray& a, const char* name, DType dtype, const std::vector<int64_t>& shape);
// float32 or bfloat16 (TypeError)
void check_float(const DeviceArray& a, const char* name);

void register_cuda(pybind11::module_& parent);        // bindings_cuda.cpp
void register_cuda_kernels(pybind11::module_& m);     // bindings_cuda_kernels.cpp

}  // namespace fastllm::cuda
