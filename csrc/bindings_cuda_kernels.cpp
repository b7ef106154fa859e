/*
Bindings of the CUDA kernel families (fastllm._C.cuda.*), one section per csrc/cuda/<family>.cu. Each binding
takes DeviceArrays, outputs first (like kernels.h), checks them with check_array/check_float, then launches
with the GIL released. Python wrappers with docstrings: python/fastllm/cuda.py.
*/
#include <pybind11/stl.h>

#include <cmath>
#include <utility>
#include <vector>

#include "bindings_cuda.h"

namespace py = pybind11;
using fastllm::str_cat;
using namespace fastllm::cuda;

static void register_elementwise(py::module_& m);  // layernorm.cu, gelu.cu, embedding.cu, adamw.cu (below)

void fastllm::cuda::register_cuda_kernels(py::module_& m) {
    using py::arg;
    (void)m;
    // ---- matmul.cu

    // ---- attention.cu

    // ---- softmax_ce.cu

    // ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu
    register_elementwise(m);
}

// ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu (registered at the end of register_cuda_kernels)

namespace {

void ew_check_device(const DeviceArray& a, const char* name) {
    FASTLLM_CHECK(a.device == current_device(), name, " is on GPU ", a.device, " but the current GPU is ",
                  current_device());
}

// byte ranges [data, data + nbytes) intersect (empty arrays never do)
bool ew_overlap(const DeviceArray& a, const DeviceArray& b) {
    if (a.nbytes() == 0 || b.nbytes() == 0) return false;
    const char *pa = (const char*)a.data(), *pb = (const char*)b.data();
    return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
void ew_disjoint(const DeviceArray& a, const char* an, const DeviceArray& b, const char* bn) {
    FASTLLM_CHECK(!ew_overlap(a, b), an, " and ", bn, " must not overlap in memory");
}
// an output that may be exactly the input (in place) but must not partially overlap it
void ew_same_or_disjoint(const DeviceArray& out, const char* on, const DeviceArray& in, const char* in_name) {
    const bool same = out.data() == in.data() && out.nbytes() == in.nbytes();
    FASTLLM_CHECK(same || !ew_overlap(out, in), on, " must be ", in_name, " itself (in place) or not overlap it");
}

// x (..., C): C = last axis (>= 1), N = the other axes' product; sizes the kernels take as int
void ew_rows(const DeviceArray& x, const char* name, int64_t& N, int64_t& C) {
    FASTLLM_CHECK(!x.shape.empty(), name, " must have shape (..., C), got a 0-d array");
    C = x.shape.back();
    FASTLLM_CHECK(C >= 1, name, " must have a last axis C >= 1, got shape ", x.shape_str());
    FASTLLM_CHECK(C < (1ll << 31), name, ": C = ", C, " is too large (< 2^31)");
    N = x.size() / C;
}

// per-row statistics of x (..., C): float32 of shape x.shape[:-1] or (N,)
void ew_check_stats(const DeviceArray& a, const char* name, const DeviceArray& x, int64_t N) {
    if (a.dtype != DType::f32)
        throw py::type_error(str_cat(name, " must have dtype float32, got ", dtype_str(a.dtype)));
    std::vector<int64_t> lead(x.shape.begin(), x.shape.end() - 1);
    FASTLLM_CHECK(a.shape == lead || a.shape == std::vector<int64_t>{N}, name, " must have shape ",
                  DeviceArray{nullptr, 0, lead}.shape_str(), " or (", N, ",), got ", a.shape_str());
    ew_check_device(a, name);
}

void ew_check_tokens(const DeviceArray& tokens, int64_t& B, int64_t& T) {
    if (tokens.dtype != DType::i32)
        throw py::type_error(str_cat("tokens must have dtype int32, got ", dtype_str(tokens.dtype)));
    FASTLLM_CHECK(tokens.shape.size() == 2, "tokens must have shape (B, T), got ", tokens.shape_str());
    ew_check_device(tokens, "tokens");
    B = tokens.shape[0], T = tokens.shape[1];
    FASTLLM_CHECK(B * T < (1ll << 31), "tokens: B * T = ", B * T, " is too large (< 2^31)");
}

// a (rows, C) table of dtype t: wte, wpe, dwte, dwpe
void ew_check_table(const DeviceArray& a, const char* name, DType t, int64_t C) {
    if (a.dtype != t)
        throw py::type_error(str_cat(name, " must have dtype ", dtype_str(t), ", got ", dtype_str(a.dtype)));
    FASTLLM_CHECK(a.shape.size() == 2 && a.shape[1] == C, name, " must have shape (rows, ", C, "), got ",
                  a.shape_str());
    FASTLLM_CHECK(a.shape[0] < (1ll << 31), name, " has too many rows (< 2^31)");
    ew_check_device(a, name);
}

void ew_check_f32_size(const DeviceArray& a, const char* name, int64_t n) {
    if (a.dtype != DType::f32)
        throw py::type_error(str_cat(name, " must have dtype float32, got ", dtype_str(a.dtype)));
    FASTLLM_CHECK(a.size() == n, name, " must have ", n, " elements (like params), got shape ", a.shape_str());
    ew_check_device(a, name);
}

}  // namespace

static void register_elementwise(py::module_& m) {
    using py::arg;

    m.def(
        "layernorm_forward",
        [](DeviceArray& out, DeviceArray& mean, DeviceArray& rstd, const DeviceArray& x, const DeviceArray& weight,
           const DeviceArray& bias, float eps) {
            check_float(x, "x");
            int64_t N, C;
            ew_rows(x, "x", N, C);
            check_array(x, "x", x.dtype, x.shape);
            check_array(out, "out", x.dtype, x.shape);
            check_array(weight, "weight", x.dtype, {C});
            check_array(bias, "bias", x.dtype, {C});
            ew_check_stats(mean, "mean", x, N);
            ew_check_stats(rstd, "rstd", x, N);
            FASTLLM_CHECK(eps >= 0.0f && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
            ew_same_or_disjoint(out, "out", x, "x");
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&weight, "weight"}, {&bias, "bias"},
                                 {&mean, "mean"}, {&rstd, "rstd"}})
                ew_disjoint(out, "out", *a, an);
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&x, "x"}, {&weight, "weight"},
                                 {&bias, "bias"}, {&rstd, "rstd"}})
                ew_disjoint(mean, "mean", *a, an);
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&x, "x"}, {&weight, "weight"},
                                 {&bias, "bias"}})
                ew_disjoint(rstd, "rstd", *a, an);
            py::gil_scoped_release nogil;
            layernorm_forward(out.data(), (float*)mean.data(), (float*)rstd.data(), x.data(), weight.data(),
                              bias.data(), N, C, eps, x.dtype);
        },
        arg("out"), arg("mean"), arg("rstd"), arg("x"), arg("weight"), arg("bias"), arg("eps"));

    m.def(
        "layernorm_backward",
        [](DeviceArray& dx, DeviceArray& dweight, DeviceArray& dbias, const DeviceArray& dout, const DeviceArray& x,
           const DeviceArray& weight, const DeviceArray& mean, const DeviceArray& rstd) {
            check_float(x, "x");
            int64_t N, C;
            ew_rows(x, "x", N, C);
            check_array(x, "x", x.dtype, x.shape);
            check_array(dx, "dx", x.dtype, x.shape);
            check_array(dout, "dout", x.dtype, x.shape);
            check_array(weight, "weight", x.dtype, {C});
            check_array(dweight, "dweight", DType::f32, {C});
            check_array(dbias, "dbias", DType::f32, {C});
            ew_check_stats(mean, "mean", x, N);
            ew_check_stats(rstd, "rstd", x, N);
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&dout, "dout"}, {&x, "x"},
                                 {&weight, "weight"}, {&mean, "mean"}, {&rstd, "rstd"}, {&dweight, "dweight"},
                                 {&dbias, "dbias"}})
                ew_disjoint(dx, "dx", *a, an);
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&dout, "dout"}, {&x, "x"},
                                 {&weight, "weight"}, {&mean, "mean"}, {&rstd, "rstd"}, {&dbias, "dbias"}})
                ew_disjoint(dweight, "dweight", *a, an);
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&dout, "dout"}, {&x, "x"},
                                 {&weight, "weight"}, {&mean, "mean"}, {&rstd, "rstd"}})
                ew_disjoint(dbias, "dbias", *a, an);
            py::gil_scoped_release nogil;
            layernorm_backward(dx.data(), (float*)dweight.data(), (float*)dbias.data(), dout.data(), x.data(),
                               weight.data(), (const float*)mean.data(), (const float*)rstd.data(), N, C, x.dtype);
        },
        arg("dx"), arg("dweight"), arg("dbias"), arg("dout"), arg("x"), arg("weight"), arg("mean"), arg("rstd"));

    m.def(
        "gelu_forward",
        [](DeviceArray& out, const DeviceArray& x) {
            check_float(x, "x");
            check_array(x, "x", x.dtype, x.shape);
            check_array(out, "out", x.dtype, x.shape);
            ew_same_or_disjoint(out, "out", x, "x");
            py::gil_scoped_release nogil;
            gelu_forward(out.data(), x.data(), x.size(), x.dtype);
        },
        arg("out"), arg("x"));

    m.def(
        "gelu_backward",
        [](DeviceArray& dx, const DeviceArray& dout, const DeviceArray& x) {
            check_float(x, "x");
            check_array(x, "x", x.dtype, x.shape);
            check_array(dx, "dx", x.dtype, x.shape);
            check_array(dout, "dout", x.dtype, x.shape);
            ew_disjoint(dx, "dx", dout, "dout");
            ew_disjoint(dx, "dx", x, "x");
            py::gil_scoped_release nogil;
            gelu_backward(dx.data(), dout.data(), x.data(), x.size(), x.dtype);
        },
        arg("dx"), arg("dout"), arg("x"));

    m.def(
        "residual_forward",
        [](DeviceArray& out, const DeviceArray& a, const DeviceArray& b) {
            check_float(a, "a");
            check_array(a, "a", a.dtype, a.shape);
            check_array(b, "b", a.dtype, a.shape);
            check_array(out, "out", a.dtype, a.shape);
            ew_same_or_disjoint(out, "out", a, "a");
            ew_same_or_disjoint(out, "out", b, "b");
            py::gil_scoped_release nogil;
            residual_forward(out.data(), a.data(), b.data(), a.size(), a.dtype);
        },
        arg("out"), arg("a"), arg("b"));

    m.def(
        "embedding_forward",
        [](DeviceArray& out, const DeviceArray& tokens, const DeviceArray& wte, const DeviceArray& wpe) {
            int64_t B, T;
            ew_check_tokens(tokens, B, T);
            check_float(wte, "wte");
            FASTLLM_CHECK(wte.shape.size() == 2, "wte must have shape (V, C), got ", wte.shape_str());
            const int64_t V = wte.shape[0], C = wte.shape[1];
            ew_check_table(wte, "wte", wte.dtype, C);
            ew_check_table(wpe, "wpe", wte.dtype, C);
            FASTLLM_CHECK(wpe.shape[0] >= T, "wpe has ", wpe.shape[0], " rows (positions) but tokens have T = ", T);
            check_array(out, "out", wte.dtype, {B, T, C});
            ew_disjoint(out, "out", tokens, "tokens");
            ew_disjoint(out, "out", wte, "wte");
            ew_disjoint(out, "out", wpe, "wpe");
            py::gil_scoped_release nogil;
            embedding_forward(out.data(), (const int32_t*)tokens.data(), wte.data(), wpe.data(), B, T, C, V,
                              wte.dtype);
        },
        arg("out"), arg("tokens"), arg("wte"), arg("wpe"));

    m.def(
        "embedding_backward",
        [](DeviceArray& dwte, DeviceArray& dwpe, const DeviceArray& dout, const DeviceArray& tokens) {
            int64_t B, T;
            ew_check_tokens(tokens, B, T);
            check_float(dout, "dout");
            FASTLLM_CHECK(dout.shape.size() == 3 && dout.shape[0] == B && dout.shape[1] == T, "dout must have shape (",
                          B, ", ", T, ", C) like tokens (B, T), got ", dout.shape_str());
            const int64_t C = dout.shape[2];
            ew_check_device(dout, "dout");
            ew_check_table(dwte, "dwte", DType::f32, C);
            ew_check_table(dwpe, "dwpe", DType::f32, C);
            FASTLLM_CHECK(dwpe.shape[0] >= T, "dwpe has ", dwpe.shape[0], " rows (positions) but tokens have T = ",
                          T);
            ew_disjoint(dwte, "dwte", dwpe, "dwpe");
            for (auto [a, an] : {std::pair<const DeviceArray*, const char*>{&dwte, "dwte"}, {&dwpe, "dwpe"}}) {
                ew_disjoint(*a, an, dout, "dout");
                ew_disjoint(*a, an, tokens, "tokens");
            }
            py::gil_scoped_release nogil;
            embedding_backward((float*)dwte.data(), (float*)dwpe.data(), dout.data(), (const int32_t*)tokens.data(),
                               B, T, C, dwte.shape[0], dout.dtype);
        },
        arg("dwte"), arg("dwpe"), arg("dout"), arg("tokens"));

    m.def(
        "adamw_step",
        [](DeviceArray& params, DeviceArray& mo, DeviceArray& vo, const DeviceArray& grads, DeviceArray* params_copy,
           float lr, float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale) {
            const int64_t n = params.size();
            ew_check_f32_size(params, "params", n);
            ew_check_f32_size(mo, "m", n);
            ew_check_f32_size(vo, "v", n);
            ew_check_f32_size(grads, "grads", n);
            FASTLLM_CHECK(t >= 1, "t (the step number) must be >= 1, got ", t);
            std::vector<std::pair<const DeviceArray*, const char*>> all = {
                {&params, "params"}, {&mo, "m"}, {&vo, "v"}, {&grads, "grads"}};
            DType copy_t = DType::f32;
            if (params_copy) {
                check_float(*params_copy, "params_copy");
                FASTLLM_CHECK(params_copy->size() == n, "params_copy must have ", n,
                              " elements (like params), got shape ", params_copy->shape_str());
                ew_check_device(*params_copy, "params_copy");
                copy_t = params_copy->dtype;
                all.push_back({params_copy, "params_copy"});
            }
            for (size_t i = 0; i < all.size(); i++)
                for (size_t j = i + 1; j < all.size(); j++)
                    ew_disjoint(*all[i].first, all[i].second, *all[j].first, all[j].second);
            py::gil_scoped_release nogil;
            adamw_step((float*)params.data(), (float*)mo.data(), (float*)vo.data(), (const float*)grads.data(),
                       params_copy ? params_copy->data() : nullptr, copy_t, n, lr, beta1, beta2, eps, weight_decay,
                       t, grad_scale);
        },
        arg("params"), arg("m"), arg("v"), arg("grads"), arg("params_copy").none(true), arg("lr"), arg("beta1"),
        arg("beta2"), arg("eps"), arg("weight_decay"), arg("t"), arg("grad_scale"));

    m.def("_set_simple_elementwise", &set_simple_elementwise, arg("on"),
          "Tests: run the simple reference kernels of layernorm/gelu/residual/embedding/adamw (True) or the fast "
          "ones (False, the default).");
}
