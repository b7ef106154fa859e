/*
fastllm._C: the one pybind11 module. Every binding validates its arrays (dtype, C-contiguity, shape,
writability, index ranges) so that bad input becomes a Python exception naming the argument, takes raw
pointers while holding the GIL, then releases the GIL around the kernel.
Errors: wrong dtype -> TypeError; shape/contiguity/range -> ValueError (std::invalid_argument).
*/
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/adamw.h"
#include "cpu/attention.h"
#include "cpu/embedding.h"
#include "cpu/gelu.h"
#include "cpu/layernorm.h"
#include "cpu/matmul.h"
#include "cpu/softmax_ce.h"

namespace py = pybind11;
using fastllm::str_cat;

#ifdef FASTLLM_WITH_CUDA
namespace fastllm::cuda {
int device_count();             // csrc/cuda/device.cu
std::string device_name(int i);
}  // namespace fastllm::cuda
#endif

// ---------------------------------------------------------------------------------------------------------
// array checks

template <typename T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<int32_t>() { return "int32"; }

static std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); i++) s += str_cat(i ? ", " : "", a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}
static std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); i++) s += str_cat(i ? ", " : "", shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// Checks dtype (TypeError), C-contiguity, writability and, if given, the exact shape (ValueError).
template <typename T>
static void check_array(const py::array& a, const char* name, const std::vector<int64_t>& shape, bool writable) {
    if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(str_cat(name, " must be a ", dtype_name<T>(), " array, got ",
                                     std::string(py::str(a.dtype()))));
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument(str_cat(name, " must be C-contiguous (use np.ascontiguousarray)"));
    if (writable && !a.writeable()) throw std::invalid_argument(str_cat(name, " must be writable"));
    if (!shape.empty()) {
        bool ok = (int64_t)a.ndim() == (int64_t)shape.size();
        for (size_t i = 0; ok && i < shape.size(); i++) ok = a.shape(i) == shape[i];
        FASTLLM_CHECK(ok, name, " must have shape ", shape_str(shape), ", got ", shape_str(a));
    }
}
template <typename T>
static const T* in_ptr(const py::array& a, const char* name, const std::vector<int64_t>& shape = {}) {
    check_array<T>(a, name, shape, false);
    return static_cast<const T*>(a.data());
}
template <typename T>
static T* out_ptr(py::array& a, const char* name, const std::vector<int64_t>& shape = {}) {
    check_array<T>(a, name, shape, true);
    return static_cast<T*>(a.mutable_data());
}
template <typename T>
static T* opt_out_ptr(std::optional<py::array>& a, const char* name, const std::vector<int64_t>& shape) {
    return a ? out_ptr<T>(*a, name, shape) : nullptr;
}
static void check_ndim(const py::array& a, const char* name, int ndim, const char* expect) {
    FASTLLM_CHECK(a.ndim() == ndim, name, " must be ", expect, ", got shape ", shape_str(a));
}
// Every id in [0, V) (or == ignore, if allowed); the message names the array, the position and the value.
static void check_ids(const int32_t* ids, int64_t n, int64_t V, const char* name, bool allow_ignore = false,
                      int32_t ignore = -1) {
    for (int64_t i = 0; i < n; i++) {
        int32_t t = ids[i];
        if ((t < 0 || t >= V) && !(allow_ignore && t == ignore))
            throw py::value_error(str_cat(name, "[", i, "] = ", t, " is out of range [0, ", V, ")",
                                          allow_ignore ? str_cat(" and not the ignore index ", ignore) : ""));
    }
}

// ---------------------------------------------------------------------------------------------------------
// matmul

static void matmul_forward_py(py::array out, py::array inp, py::array weight, std::optional<py::array> bias) {
    check_ndim(inp, "inp", 2, "(N, C)");
    check_ndim(weight, "weight", 2, "(OC, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1), OC = weight.shape(0);
    const float* x = in_ptr<float>(inp, "inp");
    const float* w = in_ptr<float>(weight, "weight", {OC, C});
    const float* b = bias ? in_ptr<float>(*bias, "bias", {OC}) : nullptr;
    float* o = out_ptr<float>(out, "out", {N, OC});
    py::gil_scoped_release nogil;
    fastllm::cpu::matmul_forward(o, x, w, b, N, C, OC);
}

static void matmul_backward_py(std::optional<py::array> dinp, std::optional<py::array> dweight,
                               std::optional<py::array> dbias, py::array dout, py::array inp, py::array weight) {
    check_ndim(inp, "inp", 2, "(N, C)");
    check_ndim(weight, "weight", 2, "(OC, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1), OC = weight.shape(0);
    const float* x = in_ptr<float>(inp, "inp");
    const float* w = in_ptr<float>(weight, "weight", {OC, C});
    const float* dy = in_ptr<float>(dout, "dout", {N, OC});
    float* dx = opt_out_ptr<float>(dinp, "dinp", {N, C});
    float* dw = opt_out_ptr<float>(dweight, "dweight", {OC, C});
    float* db = opt_out_ptr<float>(dbias, "dbias", {OC});
    py::gil_scoped_release nogil;
    fastllm::cpu::matmul_backward(dx, dw, db, dy, x, w, N, C, OC);
}

// c (M, N) = alpha * op(a) @ op(b) + beta * c: the GEMM core under matmul, exposed for tests.
static void gemm_py(py::array c, py::array a, py::array b, bool trans_a, bool trans_b, float alpha, float beta) {
    check_ndim(a, "a", 2, "2-D");
    check_ndim(b, "b", 2, "2-D");
    const int64_t M = a.shape(trans_a ? 1 : 0), K = a.shape(trans_a ? 0 : 1);
    const int64_t Kb = b.shape(trans_b ? 1 : 0), N = b.shape(trans_b ? 0 : 1);
    FASTLLM_CHECK(Kb == K, "b: inner dimension ", Kb, " does not match a's ", K);
    const float* pa = in_ptr<float>(a, "a");
    const float* pb = in_ptr<float>(b, "b");
    float* pc = out_ptr<float>(c, "c", {M, N});
    const int64_t lda = a.shape(1), ldb = b.shape(1);
    py::gil_scoped_release nogil;
    fastllm::cpu::gemm(trans_a, trans_b, M, N, K, alpha, pa, lda, pb, ldb, beta, pc, N);
}

// ---------------------------------------------------------------------------------------------------------
// attention

static void attention_forward_py(py::array out, py::array lse, py::array qkv, int64_t NH) {
    check_ndim(qkv, "qkv", 3, "(B, T, 3C)");
    const int64_t B = qkv.shape(0), T = qkv.shape(1), C3 = qkv.shape(2);
    FASTLLM_CHECK(C3 % 3 == 0, "qkv last dim must be 3*C, got ", C3);
    const int64_t C = C3 / 3;
    FASTLLM_CHECK(NH > 0 && C % NH == 0, "n_head=", NH, " must divide C=", C);
    const float* x = in_ptr<float>(qkv, "qkv");
    float* o = out_ptr<float>(out, "out", {B, T, C});
    float* l = out_ptr<float>(lse, "lse", {B, NH, T});
    py::gil_scoped_release nogil;
    fastllm::cpu::attention_forward(o, l, x, B, T, C, NH);
}

static void attention_backward_py(py::array dqkv, py::array dout, py::array qkv, py::array out, py::array lse,
                                  int64_t NH) {
    check_ndim(qkv, "qkv", 3, "(B, T, 3C)");
    const int64_t B = qkv.shape(0), T = qkv.shape(1), C3 = qkv.shape(2);
    FASTLLM_CHECK(C3 % 3 == 0, "qkv last dim must be 3*C, got ", C3);
    const int64_t C = C3 / 3;
    FASTLLM_CHECK(NH > 0 && C % NH == 0, "n_head=", NH, " must divide C=", C);
    const float* x = in_ptr<float>(qkv, "qkv");
    const float* dy = in_ptr<float>(dout, "dout", {B, T, C});
    const float* y = in_ptr<float>(out, "out", {B, T, C});
    const float* l = in_ptr<float>(lse, "lse", {B, NH, T});
    float* dx = out_ptr<float>(dqkv, "dqkv", {B, T, C3});
    py::gil_scoped_release nogil;
    fastllm::cpu::attention_backward(dx, dy, x, y, l, B, T, C, NH);
}

// ---------------------------------------------------------------------------------------------------------
// softmax + cross-entropy

static void softmax_ce_py(py::array losses, std::optional<py::array> dlogits, py::array logits, py::array targets,
                          float grad_scale, int32_t ignore_index) {
    check_ndim(logits, "logits", 2, "(N, V)");
    const int64_t N = logits.shape(0), V = logits.shape(1);
    const float* lg = in_ptr<float>(logits, "logits");
    const int32_t* tg = in_ptr<int32_t>(targets, "targets", {N});
    float* ls = out_ptr<float>(losses, "losses", {N});
    float* dl = opt_out_ptr<float>(dlogits, "dlogits", {N, V});
    check_ids(tg, N, V, "targets", true, ignore_index);
    py::gil_scoped_release nogil;
    fastllm::cpu::softmax_ce_forward_backward(ls, dl, lg, tg, N, V, grad_scale, ignore_index);
}

static void lmhead_ce_py(py::array losses, std::optional<py::array> dhidden, std::optional<py::array> dweight,
                         py::array hidden, py::array weight, py::array targets, float grad_scale,
                         int32_t ignore_index, int64_t chunk_rows) {
    check_ndim(hidden, "hidden", 2, "(N, C)");
    check_ndim(weight, "weight", 2, "(V, C)");
    const int64_t N = hidden.shape(0), C = hidden.shape(1), V = weight.shape(0);
    FASTLLM_CHECK(chunk_rows > 0, "chunk_rows must be positive, got ", chunk_rows);
    const float* h = in_ptr<float>(hidden, "hidden");
    const float* w = in_ptr<float>(weight, "weight", {V, C});
    const int32_t* tg = in_ptr<int32_t>(targets, "targets", {N});
    float* ls = out_ptr<float>(losses, "losses", {N});
    float* dh = opt_out_ptr<float>(dhidden, "dhidden", {N, C});
    float* dw = opt_out_ptr<float>(dweight, "dweight", {V, C});
    check_ids(tg, N, V, "targets", true, ignore_index);
    py::gil_scoped_release nogil;
    fastllm::cpu::lmhead_ce_forward_backward(ls, dh, dw, h, w, tg, N, C, V, grad_scale, ignore_index, chunk_rows);
}

// ---------------------------------------------------------------------------------------------------------
// layernorm, gelu, residual

static void layernorm_forward_py(py::array out, py::array mean, py::array rstd, py::array inp, py::array weight,
                                 py::array bias, float eps) {
    check_ndim(inp, "inp", 2, "(N, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1);
    const float* x = in_ptr<float>(inp, "inp");
    const float* w = in_ptr<float>(weight, "weight", {C});
    const float* b = in_ptr<float>(bias, "bias", {C});
    float* o = out_ptr<float>(out, "out", {N, C});
    float* m = out_ptr<float>(mean, "mean", {N});
    float* r = out_ptr<float>(rstd, "rstd", {N});
    py::gil_scoped_release nogil;
    fastllm::cpu::layernorm_forward(o, m, r, x, w, b, N, C, eps);
}

static void layernorm_backward_py(py::array dinp, py::array dweight, py::array dbias, py::array dout, py::array inp,
                                  py::array weight, py::array mean, py::array rstd) {
    check_ndim(inp, "inp", 2, "(N, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1);
    const float* x = in_ptr<float>(inp, "inp");
    const float* w = in_ptr<float>(weight, "weight", {C});
    const float* dy = in_ptr<float>(dout, "dout", {N, C});
    const float* m = in_ptr<float>(mean, "mean", {N});
    const float* r = in_ptr<float>(rstd, "rstd", {N});
    float* dx = out_ptr<float>(dinp, "dinp", {N, C});
    float* dw = out_ptr<float>(dweight, "dweight", {C});
    float* db = out_ptr<float>(dbias, "dbias", {C});
    py::gil_scoped_release nogil;
    fastllm::cpu::layernorm_backward(dx, dw, db, dy, x, w, m, r, N, C);
}

static std::vector<int64_t> shape_of(const py::array& a) {
    return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

static void gelu_forward_py(py::array out, py::array inp) {
    const float* x = in_ptr<float>(inp, "inp");
    float* o = out_ptr<float>(out, "out", shape_of(inp));
    const int64_t n = inp.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::gelu_forward(o, x, n);
}

static void gelu_backward_py(py::array dinp, py::array inp, py::array dout) {
    const float* x = in_ptr<float>(inp, "inp");
    const float* dy = in_ptr<float>(dout, "dout", shape_of(inp));
    float* dx = out_ptr<float>(dinp, "dinp", shape_of(inp));
    const int64_t n = inp.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::gelu_backward(dx, x, dy, n);
}

static void residual_forward_py(py::array out, py::array inp1, py::array inp2) {
    const float* a = in_ptr<float>(inp1, "inp1");
    const float* b = in_ptr<float>(inp2, "inp2", shape_of(inp1));
    float* o = out_ptr<float>(out, "out", shape_of(inp1));
    const int64_t n = inp1.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::residual_forward(o, a, b, n);
}

static void residual_backward_py(py::array dinp1, py::array dinp2, py::array dout) {
    const float* dy = in_ptr<float>(dout, "dout");
    float* d1 = out_ptr<float>(dinp1, "dinp1", shape_of(dout));
    float* d2 = out_ptr<float>(dinp2, "dinp2", shape_of(dout));
    const int64_t n = dout.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::residual_backward(d1, d2, dy, n);
}

// ---------------------------------------------------------------------------------------------------------
// embedding

static void embedding_forward_py(py::array out, py::array tokens, py::array wte, py::array wpe) {
    check_ndim(tokens, "tokens", 2, "(B, T)");
    check_ndim(wte, "wte", 2, "(V, C)");
    check_ndim(wpe, "wpe", 2, "(max_T, C)");
    const int64_t B = tokens.shape(0), T = tokens.shape(1), V = wte.shape(0), C = wte.shape(1);
    FASTLLM_CHECK(T <= wpe.shape(0), "sequence length T=", T, " exceeds the position table wpe rows=", wpe.shape(0));
    FASTLLM_CHECK(wpe.shape(1) == C, "wpe must have C=", C, " columns like wte, got shape ", shape_str(wpe));
    const int32_t* tk = in_ptr<int32_t>(tokens, "tokens");
    const float* te = in_ptr<float>(wte, "wte");
    const float* pe = in_ptr<float>(wpe, "wpe");
    float* o = out_ptr<float>(out, "out", {B, T, C});
    check_ids(tk, B * T, V, "tokens");
    py::gil_scoped_release nogil;
    fastllm::cpu::embedding_forward(o, tk, te, pe, B, T, C);
}

static void embedding_backward_py(py::array dwte, py::array dwpe, py::array dout, py::array tokens) {
    check_ndim(tokens, "tokens", 2, "(B, T)");
    check_ndim(dwte, "dwte", 2, "(V, C)");
    check_ndim(dwpe, "dwpe", 2, "(max_T, C)");
    const int64_t B = tokens.shape(0), T = tokens.shape(1), V = dwte.shape(0), C = dwte.shape(1);
    FASTLLM_CHECK(T <= dwpe.shape(0), "sequence length T=", T, " exceeds dwpe rows=", dwpe.shape(0));
    const int32_t* tk = in_ptr<int32_t>(tokens, "tokens");
    const float* dy = in_ptr<float>(dout, "dout", {B, T, C});
    float* dte = out_ptr<float>(dwte, "dwte");
    float* dpe = out_ptr<float>(dwpe, "dwpe", {dwpe.shape(0), C});
    check_ids(tk, B * T, V, "tokens");
    py::gil_scoped_release nogil;
    fastllm::cpu::embedding_backward(dte, dpe, dy, tk, B, T, C, V);
}

// ---------------------------------------------------------------------------------------------------------
// AdamW, grad norm

static void adamw_py(py::array params, py::array m, py::array v, py::array grads, float lr, float beta1,
                     float beta2, float eps, float weight_decay, int64_t t, float grad_scale) {
    FASTLLM_CHECK(t >= 1, "step t must be >= 1 (bias correction), got ", t);
    float* p = out_ptr<float>(params, "params");
    const std::vector<int64_t> shape = shape_of(params);
    float* pm = out_ptr<float>(m, "m", shape);
    float* pv = out_ptr<float>(v, "v", shape);
    const float* g = in_ptr<float>(grads, "grads", shape);
    const int64_t n = params.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::adamw_step(p, pm, pv, g, n, lr, beta1, beta2, eps, weight_decay, t, grad_scale);
}

static double sum_squares_py(py::array x) {
    const float* p = in_ptr<float>(x, "x");
    const int64_t n = x.size();
    py::gil_scoped_release nogil;
    return fastllm::cpu::sum_squares(p, n);
}

// ---------------------------------------------------------------------------------------------------------
// build / machine info

static py::dict info_py() {
    py::dict d;
#ifdef FASTLLM_VERSION
    d["version"] = FASTLLM_VERSION;
#endif
    d["build"] = FASTLLM_BUILD_INFO;
    d["simd"] = fastllm::simd_name(fastllm::simd_level());
    d["simd_detected"] = fastllm::simd_name(fastllm::detect_simd());
    d["threads"] = fastllm::max_threads();
#ifdef _OPENMP
    d["openmp"] = (int)_OPENMP;
#else
    d["openmp"] = py::none();
#endif
#ifdef FASTLLM_WITH_CUDA
    d["cuda_built"] = true;
    int n = fastllm::cuda::device_count();
    d["gpu_count"] = n;
    py::list names;
    for (int i = 0; i < n; i++) names.append(fastllm::cuda::device_name(i));
    d["gpus"] = names;
#else
    d["cuda_built"] = false;
    d["gpu_count"] = 0;
    d["gpus"] = py::list();
#endif
    return d;
}

static void set_simd_py(const std::string& level) {
    using fastllm::Simd;
    if (level == "avx512") fastllm::set_simd_level(Simd::avx512);
    else if (level == "avx2") fastllm::set_simd_level(Simd::avx2);
    else if (level == "scalar") fastllm::set_simd_level(Simd::scalar);
    else throw py::value_error(str_cat("simd level must be 'avx512', 'avx2' or 'scalar', got '", level, "'"));
}

static void set_num_threads_py(int n) {
    FASTLLM_CHECK(n >= 1, "threads must be >= 1, got ", n);
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

// ---------------------------------------------------------------------------------------------------------

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastllm native kernels (private; use fastllm.ops)";
    using py::arg;
    auto none = py::none();

    m.def("info", &info_py);
    m.def("set_simd_level", &set_simd_py, arg("level"));
    m.def("set_num_threads", &set_num_threads_py, arg("threads"));
    m.def("get_num_threads", &fastllm::max_threads);

    m.def("matmul_forward", &matmul_forward_py, arg("out"), arg("inp"), arg("weight"), arg("bias") = none);
    m.def("matmul_backward", &matmul_backward_py, arg("dinp"), arg("dweight"), arg("dbias"), arg("dout"),
          arg("inp"), arg("weight"));
    m.def("gemm", &gemm_py, arg("c"), arg("a"), arg("b"), arg("trans_a") = false, arg("trans_b") = false,
          arg("alpha") = 1.0f, arg("beta") = 0.0f);
    m.def("attention_forward", &attention_forward_py, arg("out"), arg("lse"), arg("qkv"), arg("n_head"));
    m.def("attention_backward", &attention_backward_py, arg("dqkv"), arg("dout"), arg("qkv"), arg("out"),
          arg("lse"), arg("n_head"));
    m.def("softmax_ce", &softmax_ce_py, arg("losses"), arg("dlogits"), arg("logits"), arg("targets"),
          arg("grad_scale"), arg("ignore_index"));
    m.def("lmhead_ce", &lmhead_ce_py, arg("losses"), arg("dhidden"), arg("dweight"), arg("hidden"), arg("weight"),
          arg("targets"), arg("grad_scale"), arg("ignore_index"), arg("chunk_rows"));
    m.def("layernorm_forward", &layernorm_forward_py, arg("out"), arg("mean"), arg("rstd"), arg("inp"),
          arg("weight"), arg("bias"), arg("eps"));
    m.def("layernorm_backward", &layernorm_backward_py, arg("dinp"), arg("dweight"), arg("dbias"), arg("dout"),
          arg("inp"), arg("weight"), arg("mean"), arg("rstd"));
    m.def("gelu_forward", &gelu_forward_py, arg("out"), arg("inp"));
    m.def("gelu_backward", &gelu_backward_py, arg("dinp"), arg("inp"), arg("dout"));
    m.def("residual_forward", &residual_forward_py, arg("out"), arg("inp1"), arg("inp2"));
    m.def("residual_backward", &residual_backward_py, arg("dinp1"), arg("dinp2"), arg("dout"));
    m.def("embedding_forward", &embedding_forward_py, arg("out"), arg("tokens"), arg("wte"), arg("wpe"));
    m.def("embedding_backward", &embedding_backward_py, arg("dwte"), arg("dwpe"), arg("dout"), arg("tokens"));
    m.def("adamw_step", &adamw_py, arg("params"), arg("m"), arg("v"), arg("grads"), arg("lr"), arg("beta1"),
          arg("beta2"), arg("eps"), arg("weight_decay"), arg("t"), arg("grad_scale"));
    m.def("sum_squares", &sum_squares_py, arg("x"));

    // ---- tokenizer (csrc/tokenizer): registered below
}
