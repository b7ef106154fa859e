/*
Bindings of the CUDA kernel families (fastllm._C.cuda.*), one section per csrc/cuda/<family>.cu. Each binding
takes DeviceArrays, outputs first (like kernels.h), checks them with check_array/check_float, then launches
with the GIL released. Python wrappers with docstrings: python/fastllm/cuda.py.
*/
#include <pybind11/stl.h>

#include "bindings_cuda.h"

namespace py = pybind11;
using fastllm::str_cat;
using namespace fastllm::cuda;

void fastllm::cuda::register_cuda_kernels(py::module_& m) {
    using py::arg;
    (void)m;
    // ---- matmul.cu

    // ---- attention.cu

    // ---- softmax_ce.cu

    // ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu
}
