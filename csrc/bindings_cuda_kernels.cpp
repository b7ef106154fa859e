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
    {
        // true if the byte ranges of two arrays intersect (views of one allocation can)
        static const auto overlap = [](const DeviceArray& a, const DeviceArray& b) {
            const char *pa = (const char*)a.data(), *pb = (const char*)b.data();
            return a.nbytes() && b.nbytes() && pa < pb + b.nbytes() && pb < pa + a.nbytes();
        };
        static const auto disjoint = [](const DeviceArray& a, const char* an, const DeviceArray& b, const char* bn) {
            FASTLLM_CHECK(!overlap(a, b), an, " must not overlap ", bn, " (got views of the same memory)");
        };
        static constexpr int64_t kMaxHs = 256;  // the simple kernels keep hs/32 (rounded up to 1, 2, 4, 8) values per lane
        // qkv (B, T, 3C) and n_head -> {B, T, C}, after checking dtype, ndim, 3C, n_head | C, hs <= kMaxHs
        static const auto qkv_dims = [](const DeviceArray& qkv, int64_t n_head) {
            check_float(qkv, "qkv");
            FASTLLM_CHECK(qkv.shape.size() == 3, "qkv must be (B, T, 3C), got shape ", qkv.shape_str());
            const int64_t B = qkv.shape[0], T = qkv.shape[1], C3 = qkv.shape[2];
            FASTLLM_CHECK(C3 % 3 == 0 && C3 > 0, "qkv last dim must be 3*C > 0, got ", C3);
            const int64_t C = C3 / 3;
            FASTLLM_CHECK(n_head > 0 && C % n_head == 0, "n_head=", n_head, " must divide C=", C);
            FASTLLM_CHECK(C / n_head <= kMaxHs, "head size C/n_head=", C / n_head,
                          " is above the CUDA attention limit of ", kMaxHs);
            FASTLLM_CHECK(B * n_head * T < ((int64_t)1 << 31), "B*n_head*T=", B * n_head * T,
                          " is too large for the CUDA attention grid (< 2^31)");
            return std::vector<int64_t>{B, T, C};
        };
        m.def(
            "attention_forward",
            [](DeviceArray& out, DeviceArray& lse, const DeviceArray& qkv, int64_t n_head) {
                const auto d = qkv_dims(qkv, n_head);
                const int64_t B = d[0], T = d[1], C = d[2];
                check_array(out, "out", qkv.dtype, {B, T, C});
                check_array(lse, "lse", DType::f32, {B, n_head, T});
                disjoint(out, "out", qkv, "qkv");
                disjoint(lse, "lse", qkv, "qkv");
                disjoint(lse, "lse", out, "out");
                py::gil_scoped_release nogil;
                attention_forward(out.data(), (float*)lse.data(), qkv.data(), B, T, C, n_head, qkv.dtype);
            },
            arg("out"), arg("lse"), arg("qkv"), arg("n_head"));
        m.def(
            "attention_backward",
            [](DeviceArray& dqkv, const DeviceArray& dout, const DeviceArray& qkv, const DeviceArray& out,
               const DeviceArray& lse, int64_t n_head) {
                const auto d = qkv_dims(qkv, n_head);
                const int64_t B = d[0], T = d[1], C = d[2];
                check_array(dqkv, "dqkv", qkv.dtype, {B, T, 3 * C});
                check_array(dout, "dout", qkv.dtype, {B, T, C});
                check_array(out, "out", qkv.dtype, {B, T, C});
                check_array(lse, "lse", DType::f32, {B, n_head, T});
                disjoint(dqkv, "dqkv", qkv, "qkv");
                disjoint(dqkv, "dqkv", dout, "dout");
                disjoint(dqkv, "dqkv", out, "out");
                disjoint(dqkv, "dqkv", lse, "lse");
                py::gil_scoped_release nogil;
                attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), (const float*)lse.data(), B, T,
                                   C, n_head, qkv.dtype);
            },
            arg("dqkv"), arg("dout"), arg("qkv"), arg("out"), arg("lse"), arg("n_head"));
        m.def(
            "attention_kv_forward",
            [](DeviceArray& out, DeviceArray& kcache, DeviceArray& vcache, const DeviceArray& qkv,
               const DeviceArray& pos) {
                check_float(qkv, "qkv");
                FASTLLM_CHECK(qkv.shape.size() == 3, "qkv must be (B, Tn, 3C), got shape ", qkv.shape_str());
                const int64_t B = qkv.shape[0], Tn = qkv.shape[1], C3 = qkv.shape[2];
                FASTLLM_CHECK(C3 % 3 == 0 && C3 > 0, "qkv last dim must be 3*C > 0, got ", C3);
                const int64_t C = C3 / 3;
                FASTLLM_CHECK(kcache.shape.size() == 4, "kcache must be (B, NH, max_T, hs), got shape ",
                              kcache.shape_str());
                const int64_t NH = kcache.shape[1], maxT = kcache.shape[2], hs = kcache.shape[3];
                FASTLLM_CHECK(kcache.shape[0] == B && NH > 0 && NH * hs == C, "kcache must be (B=", B,
                              ", NH, max_T, hs) with NH*hs = C=", C, ", got shape ", kcache.shape_str());
                FASTLLM_CHECK(hs <= kMaxHs, "head size hs=", hs, " is above the CUDA attention limit of ", kMaxHs);
                FASTLLM_CHECK(Tn <= maxT, "qkv has Tn=", Tn, " new tokens, more than the cache's max_T=", maxT);
                FASTLLM_CHECK(B * NH * Tn < ((int64_t)1 << 31), "B*NH*Tn=", B * NH * Tn, " is too large (< 2^31)");
                check_array(kcache, "kcache", qkv.dtype, {B, NH, maxT, hs});
                check_array(vcache, "vcache", qkv.dtype, {B, NH, maxT, hs});
                check_array(out, "out", qkv.dtype, {B, Tn, C});
                check_array(pos, "pos", DType::i32, {B});
                disjoint(kcache, "kcache", vcache, "vcache");
                disjoint(kcache, "kcache", qkv, "qkv");
                disjoint(vcache, "vcache", qkv, "qkv");
                disjoint(out, "out", qkv, "qkv");
                disjoint(out, "out", kcache, "kcache");
                disjoint(out, "out", vcache, "vcache");
                disjoint(pos, "pos", kcache, "kcache");
                disjoint(pos, "pos", vcache, "vcache");
                py::gil_scoped_release nogil;
                attention_kv_forward(out.data(), kcache.data(), vcache.data(), qkv.data(),
                                     (const int32_t*)pos.data(), B, Tn, C, NH, maxT, qkv.dtype);
            },
            arg("out"), arg("kcache"), arg("vcache"), arg("qkv"), arg("pos"));
    }

    // ---- softmax_ce.cu

    // ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu
}
