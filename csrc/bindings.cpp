/*
fastllm._C: the one pybind11 module. Every binding validates its arrays (dtype, C-contiguity, shape,
writability, index ranges) so that bad input becomes a Python exception naming the argument, takes raw
pointers while holding the GIL, then releases the GIL around the kernel.
Errors: wrong dtype -> TypeError; shape/contiguity/range -> ValueError (std::invalid_argument).
*/
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/adamw.h"
#include "cpu/attention.h"
#include "cpu/embedding.h"
#include "cpu/gelu.h"
#include "cpu/layernorm.h"
#include "cpu/matmul.h"
#include "cpu/residual.h"
#include "cpu/rmsnorm.h"
#include "cpu/rope.h"
#include "cpu/softmax_ce.h"
#include "cpu/swiglu.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/pretokenize_detail.h"
#include "tokenizer/bpe.h"
#include "tokenizer/train.h"

namespace py = pybind11;
using fastllm::str_cat;

#ifdef FASTLLM_WITH_CUDA
#include "bindings_cuda.h"  // fastllm._C.cuda (bindings_cuda.cpp) and the device queries
#endif

// ---------------------------------------------------------------------------------------------------------
// array checks

template <typename T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<int32_t>() { return "int32"; }
template <> const char* dtype_name<uint16_t>() { return "uint16 (bf16 bits)"; }
template <> const char* dtype_name<int8_t>() { return "int8"; }

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
// Outputs must not share memory with the inputs or with each other (a kernel reads its inputs while it writes):
// `a` and `b` may not overlap, unless exact aliasing is allowed (element-wise kernels: out = f(in) in place).
static void check_disjoint(const py::array& a, const char* an, const py::array& b, const char* bn,
                           bool alias_ok = false) {
    const auto* pa = static_cast<const char*>(a.data());
    const auto* pb = static_cast<const char*>(b.data());
    const py::ssize_t na = a.nbytes(), nb = b.nbytes();
    if (na == 0 || nb == 0 || pa + na <= pb || pb + nb <= pa) return;
    if (alias_ok && pa == pb && na == nb) return;
    throw std::invalid_argument(str_cat(an, " overlaps ", bn, " in memory; give ", an,
                                        alias_ok ? " as exactly the same array or a separate one"
                                                 : " a separate buffer (this kernel cannot run in place)"));
}
using Named = std::pair<const py::array*, const char*>;  // (array or nullptr when absent, name)
static const py::array* opt(const std::optional<py::array>& a) { return a ? &*a : nullptr; }
// Every output disjoint from the other outputs and from every input.
static void check_outputs(std::initializer_list<Named> outs, std::initializer_list<Named> ins) {
    for (auto o = outs.begin(); o != outs.end(); ++o) {
        if (!o->first) continue;
        for (auto p = o + 1; p != outs.end(); ++p)
            if (p->first) check_disjoint(*o->first, o->second, *p->first, p->second);
        for (const Named& i : ins)
            if (i.first) check_disjoint(*o->first, o->second, *i.first, i.second);
    }
}
// A size that must be at least 1 (zero-size rows are fine, zero-size features are not).
static void check_positive(int64_t n, const char* what, const py::array& a, const char* name) {
    FASTLLM_CHECK(n >= 1, what, " must be >= 1, got ", n, " (", name, " has shape ", shape_str(a), ")");
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
// argument conversion

// Every kernel is registered with def_kernel, which binds its array and number parameters as plain Python
// objects and converts each one here, first to last, so that a wrong argument raises an error naming it: a list
// or None for an array, 2**70 for an int64, a str for a float. (pybind11's own conversion failure is
// "incompatible function arguments", followed by a dump of every argument, whole arrays included.) It also
// applies the thread limit (limit_threads) for the calling thread.
template <typename T> struct Loose { using type = T; };  // how a parameter of type T is bound
template <> struct Loose<py::array> { using type = py::object; };
template <> struct Loose<std::optional<py::array>> { using type = py::object; };
template <> struct Loose<int64_t> { using type = py::object; };
template <> struct Loose<int32_t> { using type = py::object; };
template <> struct Loose<float> { using type = py::object; };
using HeadRange = std::optional<std::pair<int64_t, int64_t>>;  // rmsnorm's heads=(h0, h1), cols=(c0, c1) or None
template <> struct Loose<std::optional<int64_t>> { using type = py::object; };
template <> struct Loose<HeadRange> { using type = py::object; };

static std::string type_name(const py::handle& o) { return Py_TYPE(o.ptr())->tp_name; }

static py::array array_arg(const py::object& o, const char* name) {
    if (!py::isinstance<py::array>(o))
        throw py::type_error(str_cat(name, " must be a numpy array, got ", type_name(o)));
    return py::reinterpret_borrow<py::array>(o);
}
// Any Python or numpy integer (not bool) in [lo, hi].
static int64_t int_arg(const py::object& o, const char* name, int64_t lo, int64_t hi) {
    if (PyBool_Check(o.ptr()) || !PyIndex_Check(o.ptr()))
        throw py::type_error(str_cat(name, " must be an integer, got ", type_name(o)));
    const py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(o.ptr()));
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (overflow || x < lo || x > hi)
        throw std::invalid_argument(str_cat(name, " = ", std::string(py::str(v)), " is out of range [", lo, ", ",
                                            hi, "]"));
    return x;
}
// A thread count: an integer in [1, kMaxThreads].
static int threads_arg(const py::object& o) { return (int)int_arg(o, "threads", 1, fastllm::kMaxThreads); }
static float float_arg(const py::object& o, const char* name) {
    if (PyBool_Check(o.ptr()) || !PyNumber_Check(o.ptr()))
        throw py::type_error(str_cat(name, " must be a number, got ", type_name(o)));
    const double x = PyFloat_AsDouble(o.ptr());
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw std::invalid_argument(str_cat(name, " = ", std::string(py::repr(o)), " is not a float32 number"));
    }
    return (float)x;
}

template <typename T> struct Convert {
    static T get(T v, const char*) { return v; }
};
template <> struct Convert<py::array> {
    static py::array get(const py::object& o, const char* name) { return array_arg(o, name); }
};
template <> struct Convert<std::optional<py::array>> {
    static std::optional<py::array> get(const py::object& o, const char* name) {
        if (o.is_none()) return std::nullopt;
        return array_arg(o, name);
    }
};
template <> struct Convert<int64_t> {
    static int64_t get(const py::object& o, const char* name) { return int_arg(o, name, INT64_MIN, INT64_MAX); }
};
template <> struct Convert<int32_t> {
    static int32_t get(const py::object& o, const char* name) {
        return (int32_t)int_arg(o, name, INT32_MIN, INT32_MAX);
    }
};
template <> struct Convert<float> {
    static float get(const py::object& o, const char* name) { return float_arg(o, name); }
};
template <> struct Convert<std::optional<int64_t>> {  // None or an integer (n_kv_head)
    static std::optional<int64_t> get(const py::object& o, const char* name) {
        if (o.is_none()) return std::nullopt;
        return int_arg(o, name, INT64_MIN, INT64_MAX);
    }
};
template <> struct Convert<HeadRange> {  // None or a pair of integers
    static HeadRange get(const py::object& o, const char* name) {
        if (o.is_none()) return std::nullopt;
        if (!py::isinstance<py::sequence>(o) || py::isinstance<py::str>(o) || py::len(o) != 2)
            throw py::type_error(str_cat(name, " must be None or a pair (h0, h1) of integers, got ", type_name(o)));
        const py::sequence seq = py::reinterpret_borrow<py::sequence>(o);
        return std::pair<int64_t, int64_t>{int_arg(seq[0], name, INT64_MIN, INT64_MAX),
                                           int_arg(seq[1], name, INT64_MIN, INT64_MAX)};
    }
};

template <typename R, typename... Args, size_t... I, typename... Extra>
static void def_kernel_impl(py::module_& m, const char* fname, R (*f)(Args...), std::index_sequence<I...>,
                            const Extra&... extra) {
    static_assert(sizeof...(Extra) == sizeof...(Args), "def_kernel: one py::arg per parameter");
    const std::array<const char*, sizeof...(Args)> names{extra.name...};
    m.def(
        fname,
        [f, names](typename Loose<Args>::type... a) -> R {
            std::tuple<Args...> args{Convert<Args>::get(std::move(a), names[I])...};  // braces: left to right
            fastllm::limit_threads();
            return std::apply(f, std::move(args));
        },
        extra...);
}
template <typename R, typename... Args, typename... Extra>
static void def_kernel(py::module_& m, const char* fname, R (*f)(Args...), const Extra&... extra) {
    def_kernel_impl(m, fname, f, std::index_sequence_for<Args...>{}, extra...);
}

// ---------------------------------------------------------------------------------------------------------
// matmul

static fastllm::cpu::Prec prec(bool bf16) { return bf16 ? fastllm::cpu::Prec::bf16 : fastllm::cpu::Prec::fp32; }

// weight: float32, bf16 bit patterns as uint16 (OC, C) (inference with bf16 weights, see fastllm.ops.to_bf16), or
// int8 (OC, C) with its per-row `scale` (OC,) float32 (weight-only quantization, see fastllm.ops.quantize_int8).
// bf16: with float32 weights, both operands rounded to bf16 (Prec::bf16, the CPU's mixed precision).
static void matmul_forward_py(py::array out, py::array inp, py::array weight, std::optional<py::array> bias,
                              std::optional<py::array> pre_gelu, bool bf16, std::optional<py::array> scale) {
    check_ndim(inp, "inp", 2, "(N, C)");
    check_ndim(weight, "weight", 2, "(OC, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1), OC = weight.shape(0);
    check_positive(C, "C (inp columns)", inp, "inp");
    check_positive(OC, "OC (weight rows)", weight, "weight");
    const bool w16 = weight.dtype().is(py::dtype::of<uint16_t>()), w8 = weight.dtype().is(py::dtype::of<int8_t>());
    if (w8 != bool(scale))
        throw py::type_error(w8 ? "matmul_forward: int8 weight needs its per-row scale (OC,) float32"
                                : "matmul_forward: scale goes with an int8 weight only, got weight of dtype " +
                                      std::string(py::str(weight.dtype())));
    const float* x = in_ptr<float>(inp, "inp");
    const void* w = w16  ? (const void*)in_ptr<uint16_t>(weight, "weight", {OC, C})
                    : w8 ? (const void*)in_ptr<int8_t>(weight, "weight", {OC, C})
                         : (const void*)in_ptr<float>(weight, "weight", {OC, C});
    const float* sc = w8 ? in_ptr<float>(*scale, "scale", {OC}) : nullptr;
    const float* b = bias ? in_ptr<float>(*bias, "bias", {OC}) : nullptr;
    float* o = out_ptr<float>(out, "out", {N, OC});
    float* pg = opt_out_ptr<float>(pre_gelu, "pre_gelu", {N, OC});
    check_outputs({{&out, "out"}, {opt(pre_gelu), "pre_gelu"}},
                  {{&inp, "inp"}, {&weight, "weight"}, {opt(bias), "bias"}, {opt(scale), "scale"}});
    py::gil_scoped_release nogil;
    if (w16) fastllm::cpu::matmul_forward_bf16w(o, x, (const uint16_t*)w, b, pg, N, C, OC);
    else if (w8) fastllm::cpu::matmul_forward_i8w(o, x, (const int8_t*)w, sc, b, pg, N, C, OC);
    else fastllm::cpu::matmul_forward(o, x, (const float*)w, b, pg, N, C, OC, prec(bf16));
}

// bf16 weights packed once (fastllm.ops.pack_bf16): panels (bf16_panel_rows(OC), C) uint16 of the (OC, C) matrix.
static void pack_bf16_panels_py(py::array out, py::array w) {
    check_ndim(w, "w", 2, "(OC, C)");
    const int64_t OC = w.shape(0), C = w.shape(1);
    if (C % 2) throw py::value_error("pack_bf16: C (the weight's columns) must be even, got " + std::to_string(C));
    const uint16_t* src = in_ptr<uint16_t>(w, "w");
    uint16_t* d = out_ptr<uint16_t>(out, "out", {fastllm::cpu::bf16_panel_rows(OC), C});
    check_outputs({{&out, "out"}}, {{&w, "w"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::pack_bf16_panels(d, src, OC, C);
}

static void matmul_forward_bf16p_py(py::array out, py::array inp, py::array panels, int64_t rows,
                                    std::optional<py::array> bias, std::optional<py::array> pre_gelu) {
    check_ndim(inp, "inp", 2, "(N, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1), OC = rows;
    check_positive(C, "C (inp columns)", inp, "inp");
    if (OC <= 0) throw py::value_error("matmul_forward: the panels' rows must be positive, got " + std::to_string(OC));
    if (C % 2) throw py::value_error("matmul_forward: bf16 panels need C even, got inp with C = " + std::to_string(C));
    const float* x = in_ptr<float>(inp, "inp");
    const uint16_t* w = in_ptr<uint16_t>(panels, "weight", {fastllm::cpu::bf16_panel_rows(OC), C});
    const float* b = bias ? in_ptr<float>(*bias, "bias", {OC}) : nullptr;
    float* o = out_ptr<float>(out, "out", {N, OC});
    float* pg = opt_out_ptr<float>(pre_gelu, "pre_gelu", {N, OC});
    check_outputs({{&out, "out"}, {opt(pre_gelu), "pre_gelu"}}, {{&inp, "inp"}, {&panels, "weight"}, {opt(bias), "bias"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::matmul_forward_bf16p(o, x, w, b, pg, N, C, OC);
}

// w8a8 weights packed once (fastllm.ops.pack_int8): panels int8 (w8a8_panel_rows(OC) * w8a8_depth(C),) and the row
// sums wsum (OC,) int32 of q (OC, C) int8.
static void pack_w8a8_panels_py(py::array out, py::array wsum, py::array q) {
    check_ndim(q, "q", 2, "(OC, C)");
    const int64_t OC = q.shape(0), C = q.shape(1);
    check_positive(C, "C (q columns)", q, "q");
    const int8_t* src = in_ptr<int8_t>(q, "q");
    int8_t* d = out_ptr<int8_t>(out, "out", {fastllm::cpu::w8a8_panel_rows(OC) * fastllm::cpu::w8a8_depth(C)});
    int32_t* ws = out_ptr<int32_t>(wsum, "wsum", {OC});
    check_outputs({{&out, "out"}, {&wsum, "wsum"}}, {{&q, "q"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::pack_w8a8_panels(d, ws, src, OC, C);
}

static void matmul_forward_w8a8_py(py::array out, py::array inp, py::array panels, py::array scale, py::array wsum,
                                   std::optional<py::array> bias, std::optional<py::array> pre_gelu) {
    check_ndim(inp, "inp", 2, "(N, C)");
    check_ndim(scale, "scale", 1, "(OC,)");
    const int64_t N = inp.shape(0), C = inp.shape(1), OC = scale.shape(0);
    check_positive(C, "C (inp columns)", inp, "inp");
    check_positive(OC, "OC (scale length)", scale, "scale");
    if (C > 65536) throw py::value_error("matmul_forward: int8 activations need C <= 65536, got " + std::to_string(C));
    const float* x = in_ptr<float>(inp, "inp");
    const int8_t* w =
        in_ptr<int8_t>(panels, "weight", {fastllm::cpu::w8a8_panel_rows(OC) * fastllm::cpu::w8a8_depth(C)});
    const float* sc = in_ptr<float>(scale, "scale", {OC});
    const int32_t* ws = in_ptr<int32_t>(wsum, "wsum", {OC});
    const float* b = bias ? in_ptr<float>(*bias, "bias", {OC}) : nullptr;
    float* o = out_ptr<float>(out, "out", {N, OC});
    float* pg = opt_out_ptr<float>(pre_gelu, "pre_gelu", {N, OC});
    check_outputs({{&out, "out"}, {opt(pre_gelu), "pre_gelu"}},
                  {{&inp, "inp"}, {&panels, "weight"}, {&scale, "scale"}, {&wsum, "wsum"}, {opt(bias), "bias"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::matmul_forward_w8a8(o, x, w, sc, ws, b, pg, N, C, OC);
}

static void float_to_bf16_py(py::array out, py::array x) {
    const float* src = in_ptr<float>(x, "x");
    uint16_t* d = out_ptr<uint16_t>(out, "out", std::vector<int64_t>(x.shape(), x.shape() + x.ndim()));
    check_outputs({{&out, "out"}}, {{&x, "x"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::float_to_bf16(d, src, x.size());
}

// weight: float32, or (a frozen weight, no dweight/dbias) bf16 bit patterns (OC, C) uint16, bf16 panels of `rows`
// rows (fastllm.ops.pack_bf16: (bf16_panel_rows(rows), C) uint16), or int8 (OC, C) with its per-row `scale`.
static void matmul_backward_py(std::optional<py::array> dinp, std::optional<py::array> dweight,
                               std::optional<py::array> dbias, py::array dout, py::array inp, py::array weight,
                               bool bf16, std::optional<py::array> scale, int64_t rows) {
    using fastllm::cpu::HeldWeight;
    check_ndim(inp, "inp", 2, "(N, C)");
    check_ndim(weight, "weight", 2, "(OC, C)");
    const bool w16 = weight.dtype().is(py::dtype::of<uint16_t>()), w8 = weight.dtype().is(py::dtype::of<int8_t>());
    const int64_t N = inp.shape(0), C = inp.shape(1), OC = rows > 0 ? rows : weight.shape(0);
    check_positive(C, "C (inp columns)", inp, "inp");
    check_positive(OC, "OC (weight rows)", weight, "weight");
    if (w8 != bool(scale))
        throw py::type_error(w8 ? "matmul_backward: int8 weight needs its per-row scale (OC,) float32"
                                : "matmul_backward: scale goes with an int8 weight only, got weight of dtype " +
                                      std::string(py::str(weight.dtype())));
    if (rows > 0 && !w16) throw py::type_error("matmul_backward: rows goes with bf16 panels (uint16) only");
    if ((w16 || w8) && (dweight || dbias))
        throw py::value_error("matmul_backward: a weight held in bf16 or int8 is frozen: no dweight or dbias");
    if (rows > 0 && C % 2) throw py::value_error("matmul_backward: bf16 panels need C even, got " + std::to_string(C));
    const float* x = in_ptr<float>(inp, "inp");
    const std::vector<int64_t> wshape = rows > 0 ? std::vector<int64_t>{fastllm::cpu::bf16_panel_rows(OC), C}
                                                 : std::vector<int64_t>{OC, C};
    const void* w = w16  ? (const void*)in_ptr<uint16_t>(weight, "weight", wshape)
                    : w8 ? (const void*)in_ptr<int8_t>(weight, "weight", wshape)
                         : (const void*)in_ptr<float>(weight, "weight", wshape);
    const float* sc = w8 ? in_ptr<float>(*scale, "scale", {OC}) : nullptr;
    const float* dy = in_ptr<float>(dout, "dout", {N, OC});
    float* dx = opt_out_ptr<float>(dinp, "dinp", {N, C});
    float* dw = opt_out_ptr<float>(dweight, "dweight", {OC, C});
    float* db = opt_out_ptr<float>(dbias, "dbias", {OC});
    check_outputs({{opt(dinp), "dinp"}, {opt(dweight), "dweight"}, {opt(dbias), "dbias"}},
                  {{&dout, "dout"}, {&inp, "inp"}, {&weight, "weight"}, {opt(scale), "scale"}});
    py::gil_scoped_release nogil;
    if (w16 || w8) {
        const auto form = w8 ? HeldWeight::int8 : rows > 0 ? HeldWeight::bf16_panels : HeldWeight::bf16;
        if (dx) fastllm::cpu::matmul_backward_held(dx, dy, HeldWeight{form, w, sc}, N, C, OC, prec(bf16));
    } else {
        fastllm::cpu::matmul_backward(dx, dw, db, dy, x, (const float*)w, N, C, OC, prec(bf16));
    }
}

// out (M, N) = alpha * op(a) @ op(b) + beta * out: the GEMM core under matmul (ops.gemm; tests).
static void gemm_py(py::array c, py::array a, py::array b, bool trans_a, bool trans_b, float alpha, float beta,
                    bool bf16) {
    check_ndim(a, "a", 2, "2-D");
    check_ndim(b, "b", 2, "2-D");
    const int64_t M = a.shape(trans_a ? 1 : 0), K = a.shape(trans_a ? 0 : 1);
    const int64_t Kb = b.shape(trans_b ? 1 : 0), N = b.shape(trans_b ? 0 : 1);
    FASTLLM_CHECK(Kb == K, "b: inner dimension ", Kb, " does not match a's ", K);
    const float* pa = in_ptr<float>(a, "a");
    const float* pb = in_ptr<float>(b, "b");
    float* pc = out_ptr<float>(c, "out", {M, N});
    check_outputs({{&c, "out"}}, {{&a, "a"}, {&b, "b"}});
    const int64_t lda = a.shape(1), ldb = b.shape(1);
    py::gil_scoped_release nogil;
    fastllm::cpu::gemm(trans_a, trans_b, M, N, K, alpha, pa, lda, pb, ldb, beta, pc, N, prec(bf16));
}

// ---------------------------------------------------------------------------------------------------------
// attention

// qkv (B, T, (NH + 2*NKV) * hs) -> {B, T, C = NH*hs, NKV}; n_kv_head None means n_head (multi-head attention)
static std::array<int64_t, 4> qkv_dims(const py::array& qkv, int64_t NH, std::optional<int64_t> n_kv_head) {
    check_ndim(qkv, "qkv", 3, "(B, T, (n_head + 2*n_kv_head) * hs)");
    const int64_t NKV = n_kv_head.value_or(NH);
    FASTLLM_CHECK(NH > 0, "n_head must be > 0, got ", NH);
    FASTLLM_CHECK(NKV > 0 && NH % NKV == 0, "n_kv_head=", NKV, " must be > 0 and divide n_head=", NH);
    const int64_t W = qkv.shape(2), heads = NH + 2 * NKV;
    if (n_kv_head) check_positive(W, "hs (qkv has (n_head + 2*n_kv_head) * hs columns)", qkv, "qkv");
    else check_positive(W / 3, "C (qkv has 3*C columns)", qkv, "qkv");
    FASTLLM_CHECK(W % heads == 0, "qkv last dim must be (n_head + 2*n_kv_head) * hs = ", heads, " * hs, got ", W,
                  " (n_head=", NH, ", n_kv_head=", NKV, ")");
    return {qkv.shape(0), qkv.shape(1), NH * (W / heads), NKV};
}

// scale (0: 1/sqrt(hs)), softcap (0: none) and window (0: full causal) of the score: AttentionOpts (common.h)
static void attention_forward_py(py::array out, py::array lse, py::array qkv, int64_t NH,
                                 std::optional<int64_t> n_kv_head, bool bf16, float scale, float softcap,
                                 int64_t window) {
    const auto opt = fastllm::AttentionOpts::checked(scale, softcap, window);
    const auto [B, T, C, NKV] = qkv_dims(qkv, NH, n_kv_head);
    const float* x = in_ptr<float>(qkv, "qkv");
    float* o = out_ptr<float>(out, "out", {B, T, C});
    float* l = out_ptr<float>(lse, "lse", {B, NH, T});
    check_outputs({{&out, "out"}, {&lse, "lse"}}, {{&qkv, "qkv"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::attention_forward(o, l, x, B, T, C, NH, NKV, opt, bf16);
}

static void attention_backward_py(py::array dqkv, py::array dout, py::array qkv, py::array out, py::array lse,
                                  int64_t NH, std::optional<int64_t> n_kv_head, bool bf16, float scale,
                                  float softcap, int64_t window) {
    const auto opt = fastllm::AttentionOpts::checked(scale, softcap, window);
    const auto [B, T, C, NKV] = qkv_dims(qkv, NH, n_kv_head);
    const float* x = in_ptr<float>(qkv, "qkv");
    const float* dy = in_ptr<float>(dout, "dout", {B, T, C});
    const float* y = in_ptr<float>(out, "out", {B, T, C});
    const float* l = in_ptr<float>(lse, "lse", {B, NH, T});
    float* dx = out_ptr<float>(dqkv, "dqkv", {B, T, qkv.shape(2)});
    check_outputs({{&dqkv, "dqkv"}}, {{&dout, "dout"}, {&qkv, "qkv"}, {&out, "out"}, {&lse, "lse"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::attention_backward(dx, dy, x, y, l, B, T, C, NH, NKV, opt, bf16);
}

// kcache (B, NKV, max_T, hs) gives NKV and hs; NH = W / hs - 2 NKV. n_kv_head, if given, must equal NKV; None means
// multi-head attention (W = 3 * NKV * hs, today's layout)
static void attention_kv_forward_py(py::array out, py::array kcache, py::array vcache, py::array qkv, py::array pos,
                                    std::optional<int64_t> n_kv_head, bool bf16, float scale, float softcap,
                                    int64_t window) {
    const auto opt = fastllm::AttentionOpts::checked(scale, softcap, window);
    check_ndim(qkv, "qkv", 3, "(B, Tn, (n_head + 2*n_kv_head) * hs)");
    check_ndim(kcache, "kcache", 4, "(B, n_kv_head, max_T, hs)");
    const int64_t B = qkv.shape(0), Tn = qkv.shape(1), W = qkv.shape(2);
    const int64_t NKV = kcache.shape(1), maxT = kcache.shape(2), hs = kcache.shape(3);
    check_positive(W, "qkv's last dim", qkv, "qkv");
    FASTLLM_CHECK(kcache.shape(0) == B && NKV > 0 && hs > 0, "kcache must be (B=", B,
                  ", n_kv_head, max_T, hs), got shape ", shape_str(kcache));
    FASTLLM_CHECK(!n_kv_head || *n_kv_head == NKV, "n_kv_head=", n_kv_head.value_or(0),
                  " does not match kcache (B, n_kv_head, max_T, hs) of shape ", shape_str(kcache));
    const int64_t NH = n_kv_head ? W / hs - 2 * NKV : NKV;
    FASTLLM_CHECK(NH > 0 && W == (NH + 2 * NKV) * hs && NH % NKV == 0, "qkv last dim ", W,
                  " does not fit kcache ", shape_str(kcache), ": it must be (n_head + 2*n_kv_head) * hs with n_kv_head",
                  n_kv_head ? "" : " = n_head (pass n_kv_head for grouped-query attention)", " dividing n_head");
    const int64_t C = NH * hs;
    float* kc = out_ptr<float>(kcache, "kcache");
    float* vc = out_ptr<float>(vcache, "vcache", {B, NKV, maxT, hs});
    const float* x = in_ptr<float>(qkv, "qkv");
    const int32_t* p = in_ptr<int32_t>(pos, "pos", {B});
    float* o = out_ptr<float>(out, "out", {B, Tn, C});
    check_outputs({{&out, "out"}, {&kcache, "kcache"}, {&vcache, "vcache"}}, {{&qkv, "qkv"}, {&pos, "pos"}});
    for (int64_t b = 0; b < B; b++)
        FASTLLM_CHECK(fastllm::kv_rows_fit(p[b], Tn, maxT, window), "pos[", b, "] = ", p[b], " + ", Tn,
                      " new tokens does not fit the cache of max_T=", maxT,
                      window > 0 ? " (a ring cache with window=" + std::to_string(window) +
                                       " needs max_T >= window + Tn - 1 = " + std::to_string(window + Tn - 1) + ")"
                                 : std::string());
    py::gil_scoped_release nogil;
    fastllm::cpu::attention_kv_forward(o, kc, vc, x, p, B, Tn, C, NH, NKV, maxT, opt, bf16);
}

// ---------------------------------------------------------------------------------------------------------
// softmax + cross-entropy

// softcap: 0 (none) or c > 0, finite (logits capped to c * tanh(logits / c))
static void check_softcap(float softcap) {
    FASTLLM_CHECK(softcap >= 0.0f && std::isfinite(softcap), "softcap must be a finite number > 0 (0: none), got ",
                  softcap);
}

// temperature: finite > 0 with a finite reciprocal (the logits are divided by it after the cap; 1: none)
static void check_temperature(float temperature) {
    FASTLLM_CHECK(temperature > 0.0f && std::isfinite(temperature) && std::isfinite(1.0f / temperature),
                  "temperature must be a finite number > 0, got ", temperature);
}

static void softmax_ce_py(py::array losses, std::optional<py::array> dlogits, py::array logits, py::array targets,
                          float grad_scale, int32_t ignore_index, std::optional<py::array> row_weights, float softcap,
                          float temperature) {
    check_softcap(softcap);
    check_temperature(temperature);
    check_ndim(logits, "logits", 2, "(N, V)");
    const int64_t N = logits.shape(0), V = logits.shape(1);
    check_positive(V, "V (logits columns)", logits, "logits");
    const float* lg = in_ptr<float>(logits, "logits");
    const int32_t* tg = in_ptr<int32_t>(targets, "targets", {N});
    float* ls = out_ptr<float>(losses, "losses", {N});
    float* dl = opt_out_ptr<float>(dlogits, "dlogits", {N, V});
    const float* rw = row_weights ? in_ptr<float>(*row_weights, "row_weights", {N}) : nullptr;
    check_outputs({{&losses, "losses"}, {opt(dlogits), "dlogits"}},
                  {{&targets, "targets"}, {opt(row_weights), "row_weights"}});
    check_outputs({{&losses, "losses"}}, {{&logits, "logits"}});
    if (dlogits) check_disjoint(*dlogits, "dlogits", logits, "logits", true);  // in place: dlogits is logits
    check_ids(tg, N, V, "targets", true, ignore_index);
    py::gil_scoped_release nogil;
    fastllm::cpu::softmax_ce(ls, dl, lg, tg, N, V, grad_scale, ignore_index, rw, softcap, temperature);
}

static void lmhead_ce_py(py::array losses, std::optional<py::array> dhidden, std::optional<py::array> dweight,
                         py::array hidden, py::array weight, py::array targets, float grad_scale,
                         int32_t ignore_index, std::optional<py::array> scratch, std::optional<py::array> row_weights,
                         float softcap, float temperature, bool bf16) {
    check_softcap(softcap);
    check_temperature(temperature);
    check_ndim(hidden, "hidden", 2, "(N, C)");
    check_ndim(weight, "weight", 2, "(V, C)");
    const int64_t N = hidden.shape(0), C = hidden.shape(1), V = weight.shape(0);
    check_positive(C, "C (hidden columns)", hidden, "hidden");
    check_positive(V, "V (weight rows)", weight, "weight");
    std::vector<float> own;  // the scratch allocated here when none is given
    float* sc = nullptr;
    int64_t chunk_rows = 0;
    if (scratch) {
        check_ndim(*scratch, "scratch", 2, "(rows, V)");
        chunk_rows = scratch->shape(0);
        FASTLLM_CHECK(chunk_rows >= 1, "scratch must have at least one row, got shape ", shape_str(*scratch));
        sc = out_ptr<float>(*scratch, "scratch", {chunk_rows, V});
    } else {
        chunk_rows = fastllm::cpu::lmhead_chunk_rows(N, V);
        own.resize((size_t)(chunk_rows * V));
        sc = own.data();
    }
    const float* h = in_ptr<float>(hidden, "hidden");
    const float* w = in_ptr<float>(weight, "weight", {V, C});
    const int32_t* tg = in_ptr<int32_t>(targets, "targets", {N});
    float* ls = out_ptr<float>(losses, "losses", {N});
    float* dh = opt_out_ptr<float>(dhidden, "dhidden", {N, C});
    float* dw = opt_out_ptr<float>(dweight, "dweight", {V, C});
    const float* rw = row_weights ? in_ptr<float>(*row_weights, "row_weights", {N}) : nullptr;
    check_outputs(
        {{&losses, "losses"}, {opt(dhidden), "dhidden"}, {opt(dweight), "dweight"}, {opt(scratch), "scratch"}},
        {{&hidden, "hidden"}, {&weight, "weight"}, {&targets, "targets"}, {opt(row_weights), "row_weights"}});
    check_ids(tg, N, V, "targets", true, ignore_index);
    py::gil_scoped_release nogil;
    fastllm::cpu::lmhead_ce(ls, dh, dw, h, w, tg, sc, chunk_rows, N, C, V, grad_scale, ignore_index, rw, softcap,
                            temperature, prec(bf16));
}

// ---------------------------------------------------------------------------------------------------------
// layernorm, gelu, residual

static void layernorm_forward_py(py::array out, py::array mean, py::array rstd, py::array inp, py::array weight,
                                 py::array bias, float eps) {
    check_ndim(inp, "inp", 2, "(N, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1);
    check_positive(C, "C (inp columns)", inp, "inp");
    const float* x = in_ptr<float>(inp, "inp");
    const float* w = in_ptr<float>(weight, "weight", {C});
    const float* b = in_ptr<float>(bias, "bias", {C});
    float* o = out_ptr<float>(out, "out", {N, C});
    float* m = out_ptr<float>(mean, "mean", {N});
    float* r = out_ptr<float>(rstd, "rstd", {N});
    check_outputs({{&out, "out"}, {&mean, "mean"}, {&rstd, "rstd"}},
                  {{&inp, "inp"}, {&weight, "weight"}, {&bias, "bias"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::layernorm_forward(o, m, r, x, w, b, N, C, eps);
}

static void layernorm_backward_py(py::array dinp, py::array dweight, py::array dbias, py::array dout, py::array inp,
                                  py::array weight, py::array mean, py::array rstd) {
    check_ndim(inp, "inp", 2, "(N, C)");
    const int64_t N = inp.shape(0), C = inp.shape(1);
    check_positive(C, "C (inp columns)", inp, "inp");
    const float* x = in_ptr<float>(inp, "inp");
    const float* w = in_ptr<float>(weight, "weight", {C});
    const float* dy = in_ptr<float>(dout, "dout", {N, C});
    const float* m = in_ptr<float>(mean, "mean", {N});
    const float* r = in_ptr<float>(rstd, "rstd", {N});
    float* dx = out_ptr<float>(dinp, "dinp", {N, C});
    float* dw = out_ptr<float>(dweight, "dweight", {C});
    float* db = out_ptr<float>(dbias, "dbias", {C});
    check_outputs({{&dinp, "dinp"}, {&dweight, "dweight"}, {&dbias, "dbias"}},
                  {{&dout, "dout"}, {&inp, "inp"}, {&weight, "weight"}, {&mean, "mean"}, {&rstd, "rstd"}});
    py::gil_scoped_release nogil;
    fastllm::cpu::layernorm_backward(dx, dw, db, dy, x, w, m, r, N, C);
}

static std::vector<int64_t> shape_of(const py::array& a) {
    return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// gelu (tanh) or gelu_erf (exact): the kernel is a template argument
template <void (*kernel)(float*, const float*, int64_t)>
static void gelu_forward_py(py::array out, py::array inp) {
    const float* x = in_ptr<float>(inp, "inp");
    float* o = out_ptr<float>(out, "out", shape_of(inp));
    check_disjoint(out, "out", inp, "inp", true);
    const int64_t n = inp.size();
    py::gil_scoped_release nogil;
    kernel(o, x, n);
}

template <void (*kernel)(float*, const float*, const float*, int64_t)>
static void gelu_backward_py(py::array dinp, py::array dout, py::array inp) {
    const float* x = in_ptr<float>(inp, "inp");
    const float* dy = in_ptr<float>(dout, "dout", shape_of(inp));
    float* dx = out_ptr<float>(dinp, "dinp", shape_of(inp));
    check_disjoint(dinp, "dinp", inp, "inp", true);
    check_disjoint(dinp, "dinp", dout, "dout", true);
    const int64_t n = inp.size();
    py::gil_scoped_release nogil;
    kernel(dx, dy, x, n);
}

static void residual_forward_py(py::array out, py::array inp1, py::array inp2, float scale) {
    const float* a = in_ptr<float>(inp1, "inp1");
    const float* b = in_ptr<float>(inp2, "inp2", shape_of(inp1));
    float* o = out_ptr<float>(out, "out", shape_of(inp1));
    check_disjoint(out, "out", inp1, "inp1", true);
    check_disjoint(out, "out", inp2, "inp2", true);
    const int64_t n = inp1.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::residual_forward(o, a, b, n, scale);
}

static void residual_backward_py(py::array dinp1, py::array dinp2, py::array dout, float scale) {
    const float* dy = in_ptr<float>(dout, "dout");
    float* d1 = out_ptr<float>(dinp1, "dinp1", shape_of(dout));
    float* d2 = out_ptr<float>(dinp2, "dinp2", shape_of(dout));
    check_disjoint(dinp1, "dinp1", dout, "dout", true);
    check_disjoint(dinp2, "dinp2", dout, "dout", true);
    check_disjoint(dinp1, "dinp1", dinp2, "dinp2", true);
    const int64_t n = dout.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::residual_backward(d1, d2, dy, n, scale);
}

// ---------------------------------------------------------------------------------------------------------
// embedding

// ---------------------------------------------------------------------------------------------------------
// the Llama and Gemma families' ops: rmsnorm, rope, swiglu, geglu, relu2

// The rows an rmsnorm call works on: x (..., C) whole; with heads = (h0, h1) only rows [h0, h1) of its
// second-to-last axis R (x (..., R, C), e.g. the q heads of qkv viewed as (B, T, NH + 2*NKV, hs)); with cols =
// (c0, c1) only the columns x[..., c0:c1] of its last axis, normed as rows of c1 - c0 (OLMo 2's QK-norm over all the
// q (or k) channels of qkv (B, T, W)).
struct NormRows {
    int64_t N, C, group, group_stride, offset;  // see cpu/rmsnorm.h; offset = h0 * C or c0 elements
    std::vector<int64_t> stats_shape;           // rstd: x.shape[:-1], or (..., h1 - h0)
};
static NormRows norm_rows(const py::array& x, HeadRange heads, HeadRange cols) {
    FASTLLM_CHECK(x.ndim() >= 1, "x must be (..., C), got a 0-d array");
    FASTLLM_CHECK(!(heads && cols), "give heads or cols, not both");
    const int64_t C = x.shape(x.ndim() - 1);
    std::vector<int64_t> lead(x.shape(), x.shape() + x.ndim() - 1);
    int64_t N = 1;
    for (int64_t d : lead) N *= d;
    if (cols) {
        const int64_t c0 = cols->first, c1 = cols->second;
        FASTLLM_CHECK(0 <= c0 && c0 < c1 && c1 <= C, "cols=(", c0, ", ", c1, ") must satisfy 0 <= c0 < c1 <= C=", C,
                      " (x.shape[-1] of x ", shape_str(x), ")");
        return {N, c1 - c0, 1, C, c0, lead};
    }
    if (!heads) return {N, C, std::max<int64_t>(N, 1), N * C, 0, lead};
    FASTLLM_CHECK(x.ndim() >= 2, "heads needs x (..., R, C) with a head axis, got shape ", shape_str(x));
    const int64_t R = lead.back(), h0 = heads->first, h1 = heads->second;
    FASTLLM_CHECK(0 <= h0 && h0 < h1 && h1 <= R, "heads=(", h0, ", ", h1, ") must satisfy 0 <= h0 < h1 <= R=", R,
                  " (x.shape[-2] of x ", shape_str(x), ")");
    lead.back() = h1 - h0;
    return {N / R * (h1 - h0), C, h1 - h0, R * C, h0 * C, lead};
}

static void rmsnorm_forward_py(py::array out, py::array rstd, py::array inp, py::array weight, float eps,
                               HeadRange heads, HeadRange cols) {
    const NormRows r = norm_rows(inp, heads, cols);
    FASTLLM_CHECK(eps >= 0.0f && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
    const float* x = in_ptr<float>(inp, "x");
    const float* w = in_ptr<float>(weight, "weight", {r.C});
    float* o = out_ptr<float>(out, "out", shape_of(inp));
    float* s = out_ptr<float>(rstd, "rstd", r.stats_shape);
    check_disjoint(out, "out", inp, "x", true);
    check_outputs({{&out, "out"}, {&rstd, "rstd"}}, {{&weight, "weight"}});
    check_disjoint(rstd, "rstd", inp, "x");
    py::gil_scoped_release nogil;
    fastllm::cpu::rmsnorm_forward(o + r.offset, s, x + r.offset, w, r.N, r.C, r.group, r.group_stride, eps);
}

static void rmsnorm_backward_py(py::array dinp, py::array dweight, py::array dout, py::array inp, py::array weight,
                                py::array rstd, HeadRange heads, HeadRange cols) {
    const NormRows r = norm_rows(inp, heads, cols);
    const float* x = in_ptr<float>(inp, "x");
    const float* w = in_ptr<float>(weight, "weight", {r.C});
    const float* dy = in_ptr<float>(dout, "dout", shape_of(inp));
    const float* s = in_ptr<float>(rstd, "rstd", r.stats_shape);
    float* dx = out_ptr<float>(dinp, "dx", shape_of(inp));
    float* dw = out_ptr<float>(dweight, "dweight", {r.C});
    check_disjoint(dinp, "dx", dout, "dout", true);  // in place: dx is dout (its rows replaced by the gradient)
    check_outputs({{&dinp, "dx"}, {&dweight, "dweight"}}, {{&inp, "x"}, {&weight, "weight"}, {&rstd, "rstd"}});
    check_disjoint(dweight, "dweight", dout, "dout");
    py::gil_scoped_release nogil;
    fastllm::cpu::rmsnorm_backward(dx + r.offset, dw, dy + r.offset, x + r.offset, w, s, r.N, r.C, r.group,
                                   r.group_stride);
}

// qkv (B, T, (NH + 2*NKV) * hs), tables (P, R2) with 2*R2 <= hs, pos (B) or None; positions checked against P
struct RopeDims {
    int64_t B, T, NKV, hs, R2;
};
static RopeDims rope_dims(const py::array& x, const char* xname, const py::array& cos, const py::array& sin,
                          const int32_t*& p, const std::optional<py::array>& pos, int64_t NH,
                          std::optional<int64_t> n_kv_head) {
    check_ndim(x, xname, 3, "(B, T, (n_head + 2*n_kv_head) * hs)");
    const int64_t NKV = n_kv_head.value_or(NH);
    FASTLLM_CHECK(NH > 0, "n_head must be > 0, got ", NH);
    FASTLLM_CHECK(NKV > 0 && NH % NKV == 0, "n_kv_head=", NKV, " must be > 0 and divide n_head=", NH);
    const int64_t B = x.shape(0), T = x.shape(1), W = x.shape(2), heads = NH + 2 * NKV;
    FASTLLM_CHECK(W % heads == 0 && W > 0, xname, " last dim must be (n_head + 2*n_kv_head) * hs = ", heads,
                  " * hs, got ", W);
    const int64_t hs = W / heads;
    check_ndim(cos, "cos", 2, "(max_pos, rotary_dim / 2)");
    const int64_t P = cos.shape(0), R2 = cos.shape(1);
    FASTLLM_CHECK(2 * R2 <= hs, "cos has ", R2, " columns: rotary_dim = ", 2 * R2, " exceeds the head size hs=", hs);
    in_ptr<float>(cos, "cos");
    in_ptr<float>(sin, "sin", {P, R2});
    p = pos ? in_ptr<int32_t>(*pos, "pos", {B}) : nullptr;
    for (int64_t b = 0; b < B && T > 0; b++) {
        const int64_t p0 = p ? p[b] : 0;
        FASTLLM_CHECK(p0 >= 0 && p0 + T <= P, "positions pos[", b, "] = ", p0, " .. ", p0 + T - 1,
                      " are outside the cos/sin tables of ", P, " rows");
    }
    return {B, T, NKV, hs, R2};
}

// rope_forward (out, qkv, ...) and rope_backward (dqkv, dout, ...): the same checks, then the kernel
static void rope_py(decltype(&fastllm::cpu::rope_forward) kernel, py::array& out, const char* oname,
                    const py::array& x, const char* xname, const py::array& cos, const py::array& sin,
                    const std::optional<py::array>& pos, int64_t NH, std::optional<int64_t> n_kv_head) {
    const int32_t* p = nullptr;
    const RopeDims d = rope_dims(x, xname, cos, sin, p, pos, NH, n_kv_head);
    const float* px = in_ptr<float>(x, xname);
    float* o = out_ptr<float>(out, oname, shape_of(x));
    check_disjoint(out, oname, x, xname, true);
    check_outputs({{&out, oname}}, {{&cos, "cos"}, {&sin, "sin"}, {opt(pos), "pos"}});
    const float *c = static_cast<const float*>(cos.data()), *s = static_cast<const float*>(sin.data());
    py::gil_scoped_release nogil;
    kernel(o, px, c, s, p, d.B, d.T, NH, d.NKV, d.hs, d.R2);
}
static void rope_forward_py(py::array out, py::array qkv, py::array cos, py::array sin, std::optional<py::array> pos,
                            int64_t NH, std::optional<int64_t> n_kv_head) {
    rope_py(fastllm::cpu::rope_forward, out, "out", qkv, "qkv", cos, sin, pos, NH, n_kv_head);
}
static void rope_backward_py(py::array dqkv, py::array dout, py::array cos, py::array sin,
                             std::optional<py::array> pos, int64_t NH, std::optional<int64_t> n_kv_head) {
    rope_py(fastllm::cpu::rope_backward, dqkv, "dqkv", dout, "dout", cos, sin, pos, NH, n_kv_head);
}

// gate_up (..., 2H) -> {N, H}
static std::pair<int64_t, int64_t> swiglu_dims(const py::array& gate_up) {
    FASTLLM_CHECK(gate_up.ndim() >= 1 && gate_up.shape(gate_up.ndim() - 1) % 2 == 0, "gate_up must be (..., 2H) = "
                  "[gate | up], got shape ", shape_str(gate_up));
    const int64_t H = gate_up.shape(gate_up.ndim() - 1) / 2;
    return {H ? gate_up.size() / (2 * H) : 0, H};
}
static std::vector<int64_t> half_last(const py::array& a) {
    std::vector<int64_t> s = shape_of(a);
    s.back() /= 2;
    return s;
}

// SwiGLU and GeGLU (swiglu.cpp): one binding per direction, the kernel a template argument
using GluForward = void (*)(float*, const float*, int64_t, int64_t);
using GluBackward = void (*)(float*, const float*, const float*, int64_t, int64_t);

template <GluForward kernel>
static void glu_forward_py(py::array out, py::array gate_up) {
    const auto [N, H] = swiglu_dims(gate_up);
    const float* gu = in_ptr<float>(gate_up, "gate_up");
    float* o = out_ptr<float>(out, "out", half_last(gate_up));
    check_outputs({{&out, "out"}}, {{&gate_up, "gate_up"}});
    py::gil_scoped_release nogil;
    kernel(o, gu, N, H);
}

template <GluBackward kernel>
static void glu_backward_py(py::array dgate_up, py::array dout, py::array gate_up) {
    const auto [N, H] = swiglu_dims(gate_up);
    const float* gu = in_ptr<float>(gate_up, "gate_up");
    const float* dy = in_ptr<float>(dout, "dout", half_last(gate_up));
    float* dgu = out_ptr<float>(dgate_up, "dgate_up", shape_of(gate_up));
    check_outputs({{&dgate_up, "dgate_up"}}, {{&dout, "dout"}, {&gate_up, "gate_up"}});
    py::gil_scoped_release nogil;
    kernel(dgu, dy, gu, N, H);
}

static void relu2_forward_py(py::array out, py::array inp) {
    const float* x = in_ptr<float>(inp, "x");
    float* o = out_ptr<float>(out, "out", shape_of(inp));
    check_disjoint(out, "out", inp, "x", true);
    const int64_t n = inp.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::relu2_forward(o, x, n);
}

static void relu2_backward_py(py::array dinp, py::array dout, py::array inp) {
    const float* x = in_ptr<float>(inp, "x");
    const float* dy = in_ptr<float>(dout, "dout", shape_of(inp));
    float* dx = out_ptr<float>(dinp, "dx", shape_of(inp));
    check_outputs({{&dinp, "dx"}}, {{&dout, "dout"}, {&inp, "x"}});
    const int64_t n = inp.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::relu2_backward(dx, dy, x, n);
}

// wpe / dwpe may be None: no position embedding (rotary models); scale multiplies the token embeddings (Gemma)
static void check_scale(float scale) {
    FASTLLM_CHECK(std::isfinite(scale), "scale must be a finite float32 number, got ", scale);
}

static void embedding_forward_py(py::array out, py::array tokens, py::array wte, std::optional<py::array> wpe,
                                 float scale) {
    check_scale(scale);
    check_ndim(tokens, "tokens", 2, "(B, T)");
    check_ndim(wte, "wte", 2, "(V, C)");
    const int64_t B = tokens.shape(0), T = tokens.shape(1), V = wte.shape(0), C = wte.shape(1);
    if (wpe) {
        check_ndim(*wpe, "wpe", 2, "(max_T, C)");
        FASTLLM_CHECK(T <= wpe->shape(0), "sequence length T=", T, " exceeds the position table wpe rows=",
                      wpe->shape(0));
        FASTLLM_CHECK(wpe->shape(1) == C, "wpe must have C=", C, " columns like wte, got shape ", shape_str(*wpe));
    }
    const int32_t* tk = in_ptr<int32_t>(tokens, "tokens");
    const float* te = in_ptr<float>(wte, "wte");
    const float* pe = wpe ? in_ptr<float>(*wpe, "wpe") : nullptr;
    float* o = out_ptr<float>(out, "out", {B, T, C});
    check_outputs({{&out, "out"}}, {{&tokens, "tokens"}, {&wte, "wte"}, {opt(wpe), "wpe"}});
    check_ids(tk, B * T, V, "tokens");
    py::gil_scoped_release nogil;
    fastllm::cpu::embedding_forward(o, tk, te, pe, B, T, C, scale);
}

static void embedding_backward_py(py::array dwte, std::optional<py::array> dwpe, py::array dout, py::array tokens,
                                  float scale) {
    check_scale(scale);
    check_ndim(tokens, "tokens", 2, "(B, T)");
    check_ndim(dwte, "dwte", 2, "(V, C)");
    const int64_t B = tokens.shape(0), T = tokens.shape(1), V = dwte.shape(0), C = dwte.shape(1);
    if (dwpe) {
        check_ndim(*dwpe, "dwpe", 2, "(max_T, C)");
        FASTLLM_CHECK(T <= dwpe->shape(0), "sequence length T=", T, " exceeds dwpe rows=", dwpe->shape(0));
    }
    const int32_t* tk = in_ptr<int32_t>(tokens, "tokens");
    const float* dy = in_ptr<float>(dout, "dout", {B, T, C});
    float* dte = out_ptr<float>(dwte, "dwte");
    float* dpe = dwpe ? out_ptr<float>(*dwpe, "dwpe", {dwpe->shape(0), C}) : nullptr;
    check_outputs({{&dwte, "dwte"}, {opt(dwpe), "dwpe"}}, {{&dout, "dout"}, {&tokens, "tokens"}});
    check_ids(tk, B * T, V, "tokens");
    py::gil_scoped_release nogil;
    fastllm::cpu::embedding_backward(dte, dpe, dy, tk, B, T, C, V, scale);
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
    check_outputs({{&params, "params"}, {&m, "m"}, {&v, "v"}}, {{&grads, "grads"}});
    const int64_t n = params.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::adamw_step(p, pm, pv, g, n, lr, beta1, beta2, eps, weight_decay, t, grad_scale);
}

static void zero_py(py::array x) {
    float* p = out_ptr<float>(x, "x", shape_of(x));
    const int64_t n = x.size();
    py::gil_scoped_release nogil;
    fastllm::cpu::zero(p, n);
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
    d["bf16_matmul"] = fastllm::simd_name(fastllm::cpu::matmul_bf16w_path());
    d["bf16_weights"] = fastllm::cpu::bf16_panels_preferred() ? "panels" : "rows";
    d["w8a8"] = fastllm::cpu::w8a8_path();
    d["bf16_attention"] = fastllm::cpu::attention_bf16_available() ? "avx512_bf16" : "fp32";
    d["bf16_gemm"] = std::string(fastllm::simd_name(fastllm::cpu::gemm_bf16_path())) +
                     (fastllm::cpu::amx_emulation() ? " (emulated)" : "");
    const fastllm::CpuFeatures& f = fastllm::cpu_features();
    d["cpu"] = f.model;
    py::dict feats;  // named as in /proc/cpuinfo's flags
    feats["avx2"] = f.avx2;
    feats["fma"] = f.fma;
    feats["avx512f"] = f.avx512f;
    feats["avx512bw"] = f.avx512bw;
    feats["avx512_bf16"] = f.avx512_bf16;
    feats["avx512_fp16"] = f.avx512_fp16;
    feats["avx512_vnni"] = f.avx512_vnni;
    feats["amx_tile"] = f.amx_tile;
    feats["amx_bf16"] = f.amx_bf16;
    feats["amx_int8"] = f.amx_int8;
    d["cpu_features"] = feats;
    d["amx_permission"] = f.amx_permission;
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
#ifdef FASTLLM_CUDA_EMULATOR
    d["cuda_emulator"] = true;  // the "GPU" is csrc/cuda/emu running the kernels on the CPU
#else
    d["cuda_emulator"] = false;
#endif
#else
    d["cuda_built"] = false;
    d["cuda_emulator"] = false;
    d["gpu_count"] = 0;
    d["gpus"] = py::list();
#endif
    return d;
}

static fastllm::Simd parse_simd(const std::string& level) {
    for (int i = 0; i < fastllm::kSimdLevels; i++) {
        const auto s = static_cast<fastllm::Simd>(i);
        if (level == fastllm::simd_name(s)) return s;
    }
    std::string names;
    for (int i = 0; i < fastllm::kSimdLevels; i++)
        names += str_cat(i ? ", '" : "'", fastllm::simd_name(static_cast<fastllm::Simd>(i)), "'");
    throw py::value_error(str_cat("simd level must be one of ", names, ", got '", level, "'"));
}

// Lowers the SIMD level (clamped to what the CPU has; fastllm.set_simd is the strict public wrapper).
static void set_simd_py(const std::string& level) { fastllm::set_simd_level(parse_simd(level)); }

static py::tuple simd_levels() {
    py::list names;
    for (int i = 0; i < fastllm::kSimdLevels; i++) names.append(fastllm::simd_name(static_cast<fastllm::Simd>(i)));
    return py::tuple(names);
}

static void set_num_threads_py(const py::object& threads) {
    fastllm::requested_threads().store(threads_arg(threads));  // for every thread (common.h)
    fastllm::limit_threads();
}

// ---------------------------------------------------------------------------------------------------------
// pre-tokenizer

static fastllm::tok::Pattern parse_pattern(const std::string& name) {
    if (name == "gpt2") return fastllm::tok::Pattern::gpt2;
    if (name == "gpt4") return fastllm::tok::Pattern::gpt4;
    if (name == "llama3") return fastllm::tok::Pattern::llama3;
    if (name == "qwen2") return fastllm::tok::Pattern::qwen2;
    if (name == "smollm") return fastllm::tok::Pattern::smollm;
    if (name == "whole") return fastllm::tok::Pattern::whole;
    if (name == "metaspace") return fastllm::tok::Pattern::metaspace;
    throw std::invalid_argument(str_cat(
        "pattern must be 'gpt2', 'gpt4', 'llama3', 'qwen2', 'smollm', 'whole' or 'metaspace', got '", name, "'"));
}

// Text arrives as a str; its UTF-8 form is cached by CPython inside the object, so no copy is made. Lone
// surrogates cannot be encoded as UTF-8: ValueError (policy: callers repair them first, as tiktoken does).
static std::string_view utf8_view(const py::str& text) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(text.ptr(), &n);
    if (!s) {
        PyErr_Clear();
        throw std::invalid_argument("text must be valid Unicode without lone surrogates (not UTF-8 encodable)");
    }
    return {s, static_cast<size_t>(n)};
}

static py::list pretokenize_py(const py::str& text, const std::string& pattern) {
    const auto pat = parse_pattern(pattern);
    const std::string_view s = utf8_view(text);
    std::vector<std::pair<size_t, size_t>> chunks;
    {
        py::gil_scoped_release nogil;
        chunks.reserve(s.size() / 4 + 1);
        fastllm::tok::pretokenize(s, pat, chunks);
    }
    // Building the str objects costs more than the scan: ASCII chunks (most of them) are copied straight into
    // a new compact ASCII str (1-character ones come from CPython's cache), the rest are decoded from UTF-8.
    const char* base = s.data();
    py::list out(chunks.size());
    for (size_t i = 0; i < chunks.size(); i++) {
        const auto [a, b] = chunks[i];
        const Py_ssize_t len = static_cast<Py_ssize_t>(b - a);
        unsigned char any = 0;
        for (size_t k = a; k < b; k++) any |= static_cast<unsigned char>(base[k]);
        PyObject* o;
        if (any < 0x80) {
            if (len == 1) {
                o = PyUnicode_FromOrdinal(static_cast<unsigned char>(base[a]));
            } else {
                o = PyUnicode_New(len, 127);
                if (o) std::memcpy(PyUnicode_DATA(o), base + a, static_cast<size_t>(len));
            }
        } else {
            o = PyUnicode_DecodeUTF8(base + a, len, nullptr);
        }
        if (!o) throw py::error_already_set();
        PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), o);
    }
    return out;
}

static std::string pattern_string_py(const std::string& pattern) {
    return fastllm::tok::pattern_string(parse_pattern(pattern));
}

// Number of chunks only (no str objects): the scan's own speed, for benchmarks.
static size_t pretokenize_count_py(const py::str& text, const std::string& pattern) {
    const auto pat = parse_pattern(pattern);
    const std::string_view s = utf8_view(text);
    py::gil_scoped_release nogil;
    std::vector<std::pair<size_t, size_t>> chunks;
    chunks.reserve(s.size() / 4 + 1);
    fastllm::tok::pretokenize(s, pat, chunks);
    return chunks.size();
}

// Class flags (1 = letter, 2 = number, 4 = whitespace) of every code point 0..0x10FFFF, for the tests.
static py::bytes pretokenize_char_classes_py() {
    std::string flags(0x110000, '\0');
    for (uint32_t cp = 0; cp < 0x110000; cp++) flags[cp] = static_cast<char>(fastllm::tok::char_class(cp));
    return py::bytes(flags);
}

// ---------------------------------------------------------------------------------------------------------
// BPE tokenizer (csrc/tokenizer/bpe.h, train.h); the Python policy lives in fastllm/tokenizer.py

namespace tok = fastllm::tok;
using Specials = std::vector<std::pair<std::string, int32_t>>;

// A 1-D int32 array that owns the vector's buffer (freed when numpy drops the array).
static py::array_t<int32_t> ids_to_array(std::vector<int32_t>&& v) {
    auto* owned = new std::vector<int32_t>(std::move(v));
    py::capsule base(owned, [](void* q) { delete static_cast<std::vector<int32_t>*>(q); });
    return py::array_t<int32_t>({static_cast<py::ssize_t>(owned->size())}, {sizeof(int32_t)}, owned->data(), base);
}

// UTF-8 views of a list of str (valid while the list lives); lone surrogates -> the UnicodeEncodeError
// propagates (tokenizer.py repairs the text and retries).
static std::vector<std::string_view> utf8_views(const py::list& items, const char* name) {
    std::vector<std::string_view> v(items.size());
    for (size_t i = 0; i < v.size(); i++) {
        PyObject* o = PyList_GET_ITEM(items.ptr(), static_cast<Py_ssize_t>(i));
        if (!PyUnicode_Check(o)) throw py::type_error(str_cat(name, "[", i, "] must be a str"));
        Py_ssize_t n = 0;
        const char* s = PyUnicode_AsUTF8AndSize(o, &n);
        if (!s) throw py::error_already_set();
        v[i] = {s, static_cast<size_t>(n)};
    }
    return v;
}

static std::string_view utf8_strict(const py::str& text) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(text.ptr(), &n);
    if (!s) throw py::error_already_set();  // UnicodeEncodeError (lone surrogate)
    return {s, static_cast<size_t>(n)};
}

static Specials specials_by_id(const tok::Encoder& e, const std::vector<int32_t>& ids) {
    Specials out;
    for (int32_t id : ids) {
        FASTLLM_CHECK(e.valid_id(id) && e.is_special(id), "allowed_special: id ", id, " is not a special token");
        out.emplace_back(std::string(e.token_bytes(id)), id);
    }
    return out;
}

static std::vector<int64_t> ids_from_array(const py::array& ids) {
    FASTLLM_CHECK(ids.ndim() == 1, "ids must be 1-D, got ndim=", ids.ndim());
    auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(ids);
    if (!a) throw py::type_error("ids must be an integer array");
    return std::vector<int64_t>(a.data(), a.data() + a.size());
}

static std::string decode_raw(const tok::Encoder& e, const py::array& ids) {
    const std::vector<int64_t> v = ids_from_array(ids);
    std::string out;
    {
        py::gil_scoped_release nogil;
        e.decode(v.data(), v.size(), out);
    }
    return out;
}

// Special tokens cut out of training text: an empty one would match everywhere.
static void check_specials(const std::vector<std::string>& specials) {
    for (size_t i = 0; i < specials.size(); i++)
        FASTLLM_CHECK(!specials[i].empty(), "special_tokens[", i, "] is empty");
}

static py::list train_bpe_py(const py::list& texts, const std::string& pattern, const std::vector<std::string>& specials,
                             int64_t n_merges, const py::object& threads_obj, const py::object& progress,
                             int64_t every) {
    const auto pat = parse_pattern(pattern);
    const auto views = utf8_views(texts, "texts");
    FASTLLM_CHECK(n_merges >= 0, "n_merges must be >= 0, got ", n_merges);
    const int threads = threads_arg(threads_obj);
    check_specials(specials);
    tok::ProgressFn fn;
    if (!progress.is_none())
        fn = [&progress](int64_t done, int64_t total) {
            py::gil_scoped_acquire gil;
            progress(done, total);
            if (PyErr_CheckSignals() != 0) throw py::error_already_set();  // Ctrl-C stops training
        };
    std::vector<std::pair<int32_t, int32_t>> merges;
    {
        py::gil_scoped_release nogil;
        tok::ChunkCounts counts = tok::count_chunks(views, pat, specials, threads);
        merges = tok::train_bpe(counts, n_merges, fn, every);
    }
    py::list out;
    for (auto [a, b] : merges) out.append(py::make_tuple(a, b));
    return out;
}

// Training on chunks found by Python (custom patterns): one list of str chunks.
static py::list train_bpe_chunks_py(const py::list& chunks, int64_t n_merges, const py::object& progress,
                                    int64_t every) {
    const auto views = utf8_views(chunks, "chunks");
    FASTLLM_CHECK(n_merges >= 0, "n_merges must be >= 0, got ", n_merges);
    tok::ProgressFn fn;
    if (!progress.is_none())
        fn = [&progress](int64_t done, int64_t total) {
            py::gil_scoped_acquire gil;
            progress(done, total);
            if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        };
    std::vector<std::pair<int32_t, int32_t>> merges;
    {
        py::gil_scoped_release nogil;
        tok::ChunkCounts counts;
        for (auto v : views) counts.add(v);
        merges = tok::train_bpe(counts, n_merges, fn, every);
    }
    py::list out;
    for (auto [a, b] : merges) out.append(py::make_tuple(a, b));
    return out;
}

// Encoder::encode of a str, the GIL released; `starts` as there.
static py::array_t<int32_t> encode_str(const tok::Encoder& e, const py::str& text, const std::string& pattern,
                                       const std::vector<int32_t>& allowed, std::vector<int64_t>* starts) {
    const auto pat = parse_pattern(pattern);
    const Specials sp = specials_by_id(e, allowed);
    const std::string_view s = utf8_strict(text);
    std::vector<int32_t> out;
    {
        py::gil_scoped_release nogil;
        e.encode(s, pat, sp, out, starts);
    }
    return ids_to_array(std::move(out));
}

static void register_bpe(py::module_& m) {
    using py::arg;
    using tok::Encoder;
    py::class_<Encoder, std::shared_ptr<Encoder>>(m, "BpeEncoder")
        .def_static(
            "from_ranks",
            [](const std::vector<std::string>& tokens, const std::vector<int32_t>& ranks) {
                return std::make_shared<Encoder>(Encoder::from_ranks(tokens, ranks));
            },
            arg("tokens"), arg("ranks"))
        .def_static(
            "from_merges",
            [](const std::vector<std::string>& tokens, const std::vector<int32_t>& ids,
               const std::vector<std::pair<int32_t, int32_t>>& merges, bool whole_chunk_lookup) {
                return std::make_shared<Encoder>(Encoder::from_merges(tokens, ids, merges, whole_chunk_lookup));
            },
            arg("tokens"), arg("ids"), arg("merges"), arg("whole_chunk_lookup"))
        .def("add_special", &Encoder::add_special, arg("token"), arg("id"))
        .def("set_strip", &Encoder::set_strip, arg("id"), arg("lstrip"), arg("rstrip"))
        .def(
            "set_sentencepiece",
            [](Encoder& e, const std::vector<int32_t>& byte_ids, int32_t unk_id, bool fuse_unk, const std::string& prefix) {
                using P = Encoder::Prefix;
                const P p = prefix == "none" ? P::none : prefix == "first" ? P::first : prefix == "always" ? P::always
                          : prefix == "every" ? P::every
                          : throw std::invalid_argument("prefix must be 'none', 'first', 'always' or 'every', got '" +
                                                        prefix + "'");
                e.set_sentencepiece(byte_ids, unk_id, fuse_unk, p);
            },
            arg("byte_ids"), arg("unk_id"), arg("fuse_unk"), arg("prefix"))
        .def_property_readonly("sentencepiece", &Encoder::sentencepiece)
        .def(
            "encode",
            [](const Encoder& e, const py::str& text, const std::string& pattern, const std::vector<int32_t>& allowed) {
                return encode_str(e, text, pattern, allowed, nullptr);
            },
            arg("text"), arg("pattern"), arg("allowed_special"))
        .def(
            "encode_offsets",
            [](const Encoder& e, const py::str& text, const std::string& pattern, const std::vector<int32_t>& allowed) {
                std::vector<int64_t> starts;
                auto ids = encode_str(e, text, pattern, allowed, &starts);
                py::array_t<int64_t> st((py::ssize_t)starts.size());
                std::copy(starts.begin(), starts.end(), st.mutable_data());
                return py::make_tuple(ids, st);
            },
            arg("text"), arg("pattern"), arg("allowed_special"))
        .def(
            "encode_batch",
            [](const Encoder& e, const py::list& texts, const std::string& pattern, const std::vector<int32_t>& allowed,
               const py::object& threads_obj) {
                const int threads = threads_arg(threads_obj);
                const auto pat = parse_pattern(pattern);
                const Specials sp = specials_by_id(e, allowed);
                const auto views = utf8_views(texts, "texts");
                std::vector<std::vector<int32_t>> outs;
                {
                    py::gil_scoped_release nogil;
                    e.encode_batch(views, pat, sp, outs, threads);
                }
                py::list res(outs.size());
                for (size_t i = 0; i < outs.size(); i++)
                    res[i] = ids_to_array(std::move(outs[i]));
                return res;
            },
            arg("texts"), arg("pattern"), arg("allowed_special"), arg("threads"))
        .def(
            "encode_chunks",
            [](const Encoder& e, const py::list& chunks) {
                const auto views = utf8_views(chunks, "chunks");
                std::vector<int32_t> out;
                {
                    py::gil_scoped_release nogil;
                    e.encode_chunks(views, out);
                }
                return ids_to_array(std::move(out));
            },
            arg("chunks"))
        .def(
            "encode_chunk_naive",
            [](const Encoder& e, const py::bytes& chunk) {
                std::vector<int32_t> out;
                e.encode_chunk_naive(std::string(chunk), out);
                return out;
            },
            arg("chunk"))
        .def(
            "decode",
            [](const Encoder& e, const py::array& ids, const std::string& errors) {
                const std::string b = decode_raw(e, ids);
                PyObject* o = PyUnicode_DecodeUTF8(b.data(), static_cast<Py_ssize_t>(b.size()), errors.c_str());
                if (!o) throw py::error_already_set();
                return py::reinterpret_steal<py::str>(o);
            },
            arg("ids"), arg("errors"))
        .def(
            "decode_batch",
            [](const Encoder& e, const py::list& seqs, const std::string& errors, const py::object& threads_obj) {
                const int threads = threads_arg(threads_obj);
                std::vector<std::vector<int64_t>> ids(seqs.size());
                for (size_t k = 0; k < ids.size(); k++) {
                    ids[k] = ids_from_array(py::array::ensure(seqs[k]));
                    for (size_t i = 0; i < ids[k].size(); i++) {  // validate here: no throwing in threads
                        const int64_t v = ids[k][i];
                        if (e.valid_id(v)) continue;
                        FASTLLM_CHECK(v >= 0 && v < e.n_vocab(), "token id ", v, " at index ", i, " of ids[", k,
                                      "] is out of range [0, ", e.n_vocab(), ")");
                        FASTLLM_CHECK(false, "token id ", v, " at index ", i, " of ids[", k,
                                      "] is not assigned to any token");
                    }
                }
                std::vector<std::string> out(ids.size());
                {
                    py::gil_scoped_release nogil;
                    const int64_t n = (int64_t)ids.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
                    for (int64_t k = 0; k < n; k++) e.decode(ids[k].data(), ids[k].size(), out[k]);
                }
                py::list res(out.size());
                for (size_t k = 0; k < out.size(); k++) {
                    PyObject* o = PyUnicode_DecodeUTF8(out[k].data(), (Py_ssize_t)out[k].size(), errors.c_str());
                    if (!o) throw py::error_already_set();
                    PyList_SET_ITEM(res.ptr(), (Py_ssize_t)k, o);
                }
                return res;
            },
            arg("ids"), arg("errors"), arg("threads"))
        .def(
            "decode_bytes", [](const Encoder& e, const py::array& ids) { return py::bytes(decode_raw(e, ids)); },
            arg("ids"))
        .def(
            "token_bytes",
            [](const Encoder& e, int64_t id) {
                FASTLLM_CHECK(e.valid_id(id), "token id ", id, " is not in the vocabulary [0, ", e.n_vocab(), ")");
                return py::bytes(std::string(e.token_bytes(static_cast<int32_t>(id))));
            },
            arg("id"))
        .def("is_special", [](const Encoder& e, int64_t id) { return e.valid_id(id) && e.is_special((int32_t)id); })
        .def("valid_id", &Encoder::valid_id)
        .def_property_readonly("n_vocab", &Encoder::n_vocab)
        .def_property_readonly("n_tokens", &Encoder::n_tokens)
        .def_property_readonly("whole_chunk_lookup", &Encoder::whole_chunk_lookup)
        .def("specials",
             [](const Encoder& e) {
                 py::list out;
                 for (auto& [b, id] : e.specials()) out.append(py::make_tuple(py::bytes(b), id));
                 return out;
             })
        .def("pairs", [](const Encoder& e) {
            // every (left, right, priority, result) the merge loop knows, sorted by (priority, left, right)
            std::vector<std::array<int32_t, 4>> v;
            e.pairs().for_each([&](int32_t a, int32_t b, tok::PairMap::Merge g) { v.push_back({g.prio, a, b, g.result}); });
            std::sort(v.begin(), v.end());
            py::list out;
            for (auto& x : v) out.append(py::make_tuple(x[1], x[2], x[0], x[3]));
            return out;
        });
    m.def("bpe_clear_caches", &tok::clear_thread_caches);  // cold-cache benchmarks
    m.def("train_bpe", &train_bpe_py, arg("texts"), arg("pattern"), arg("special_tokens"), arg("n_merges"),
          arg("threads"), arg("progress"), arg("every"));
    m.def(
        "bpe_count_chunks",
        [](const py::list& texts, const std::string& pattern, const std::vector<std::string>& specials,
           const py::object& threads_obj) {
            // the chunk counts training starts from (for tests)
            const auto pat = parse_pattern(pattern);
            const auto views = utf8_views(texts, "texts");
            const int threads = threads_arg(threads_obj);
            check_specials(specials);
            tok::ChunkCounts counts;
            {
                py::gil_scoped_release nogil;
                counts = tok::count_chunks(views, pat, specials, threads);
            }
            py::dict out;
            for (size_t i = 0; i < counts.size(); i++) out[py::bytes(std::string(counts.key(i)))] = counts.count(i);
            return out;
        },
        arg("texts"), arg("pattern"), arg("special_tokens"), arg("threads"));
    m.def("train_bpe_chunks", &train_bpe_chunks_py, arg("chunks"), arg("n_merges"), arg("progress"), arg("every"));
}

// ---------------------------------------------------------------------------------------------------------

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastllm native kernels (private; use fastllm.ops)";
    using py::arg;
    auto none = py::none();

    m.def("info", &info_py);
    m.def("set_simd_level", &set_simd_py, arg("level"));
    m.def("get_simd_level", [] { return std::string(fastllm::simd_name(fastllm::simd_setting())); });
    m.attr("SIMD_LEVELS") = simd_levels();  // lowest to highest
    m.def("set_num_threads", &set_num_threads_py, arg("threads"));
    m.def("get_num_threads", &fastllm::max_threads);
    m.attr("MAX_THREADS") = fastllm::kMaxThreads;
#ifdef _OPENMP
    if (omp_get_max_threads() > fastllm::kMaxThreads) {  // OMP_NUM_THREADS too large: use the limit
        const std::string msg = str_cat("fastllm: OMP_NUM_THREADS asks for ", omp_get_max_threads(),
                                        " threads; using ", fastllm::kMaxThreads, " (the most fastllm runs)");
        fastllm::limit_threads();
        if (PyErr_WarnEx(PyExc_RuntimeWarning, msg.c_str(), 1) < 0) throw py::error_already_set();
    }
#endif

    // kernels: every argument converted by def_kernel (errors name it)
    def_kernel(m, "matmul_forward", &matmul_forward_py, arg("out"), arg("inp"), arg("weight"), arg("bias") = none,
               arg("pre_gelu") = none, arg("bf16") = false, arg("scale") = none);
    def_kernel(m, "float_to_bf16", &float_to_bf16_py, arg("out"), arg("x"));
    def_kernel(m, "pack_bf16_panels", &pack_bf16_panels_py, arg("out"), arg("w"));
    def_kernel(m, "matmul_forward_bf16p", &matmul_forward_bf16p_py, arg("out"), arg("inp"), arg("panels"),
               arg("rows"), arg("bias") = none, arg("pre_gelu") = none);
    def_kernel(m, "pack_w8a8_panels", &pack_w8a8_panels_py, arg("out"), arg("wsum"), arg("q"));
    def_kernel(m, "matmul_forward_w8a8", &matmul_forward_w8a8_py, arg("out"), arg("inp"), arg("panels"), arg("scale"),
               arg("wsum"), arg("bias") = none, arg("pre_gelu") = none);
    def_kernel(m, "matmul_backward", &matmul_backward_py, arg("dinp"), arg("dweight"), arg("dbias"), arg("dout"),
               arg("inp"), arg("weight"), arg("bf16") = false, arg("scale") = none, arg("rows") = 0);
    def_kernel(m, "gemm", &gemm_py, arg("out"), arg("a"), arg("b"), arg("trans_a") = false, arg("trans_b") = false,
               arg("alpha") = 1.0f, arg("beta") = 0.0f, arg("bf16") = false);
    def_kernel(m, "attention_forward", &attention_forward_py, arg("out"), arg("lse"), arg("qkv"), arg("n_head"),
               arg("n_kv_head") = none, arg("bf16") = false, arg("scale") = 0.0f, arg("softcap") = 0.0f,
               arg("window") = 0);
    def_kernel(m, "attention_backward", &attention_backward_py, arg("dqkv"), arg("dout"), arg("qkv"), arg("out"),
               arg("lse"), arg("n_head"), arg("n_kv_head") = none, arg("bf16") = false, arg("scale") = 0.0f,
               arg("softcap") = 0.0f, arg("window") = 0);
    def_kernel(m, "attention_kv_forward", &attention_kv_forward_py, arg("out"), arg("kcache"), arg("vcache"),
               arg("qkv"), arg("pos"), arg("n_kv_head") = none, arg("bf16") = false, arg("scale") = 0.0f,
               arg("softcap") = 0.0f, arg("window") = 0);
    def_kernel(m, "softmax_ce", &softmax_ce_py, arg("losses"), arg("dlogits"), arg("logits"), arg("targets"),
               arg("grad_scale"), arg("ignore_index"), arg("row_weights") = none, arg("softcap") = 0.0f,
               arg("temperature") = 1.0f);
    def_kernel(m, "lmhead_ce", &lmhead_ce_py, arg("losses"), arg("dhidden"), arg("dweight"), arg("hidden"),
               arg("weight"), arg("targets"), arg("grad_scale"), arg("ignore_index"), arg("scratch") = none,
               arg("row_weights") = none, arg("softcap") = 0.0f, arg("temperature") = 1.0f, arg("bf16") = false);
    m.def("lmhead_chunk_rows", &fastllm::cpu::lmhead_chunk_rows, arg("N"), arg("V"));
    m.def("bf16_gemm_path", [] { return std::string(fastllm::simd_name(fastllm::cpu::gemm_bf16_path())); },
          "The kernel bf16 GEMMs run now: amx, avx512_bf16, avx512, avx2 or scalar (see info()['bf16_gemm'])");
    m.def("bf16_panels_preferred", &fastllm::cpu::bf16_panels_preferred,
          "Whether bf16 decode weights are faster packed (pack_bf16_panels): the bf16 GEMM runs on avx512_bf16");
    m.def("w8a8_panel_rows", &fastllm::cpu::w8a8_panel_rows, arg("OC"), "Rows of the w8a8 panels of an (OC, C) matrix");
    m.def("w8a8_depth", &fastllm::cpu::w8a8_depth, arg("C"), "C rounded up to the w8a8 panels' groups of 4");
    m.def("bf16_panel_rows", &fastllm::cpu::bf16_panel_rows, arg("OC"), "Rows of the panels of an (OC, C) matrix");
    m.def("set_amx_emulation", &fastllm::cpu::set_amx_emulation, arg("on"),
          "Testing: bf16 GEMMs run the AMX kernel on a C++ model of the tiles (any CPU; slow)");
    def_kernel(m, "layernorm_forward", &layernorm_forward_py, arg("out"), arg("mean"), arg("rstd"), arg("inp"),
               arg("weight"), arg("bias"), arg("eps"));
    def_kernel(m, "layernorm_backward", &layernorm_backward_py, arg("dinp"), arg("dweight"), arg("dbias"),
               arg("dout"), arg("inp"), arg("weight"), arg("mean"), arg("rstd"));
    def_kernel(m, "gelu_forward", &gelu_forward_py<fastllm::cpu::gelu_forward>, arg("out"), arg("inp"));
    def_kernel(m, "gelu_backward", &gelu_backward_py<fastllm::cpu::gelu_backward>, arg("dinp"), arg("dout"),
               arg("inp"));
    def_kernel(m, "gelu_erf_forward", &gelu_forward_py<fastllm::cpu::gelu_erf_forward>, arg("out"), arg("inp"));
    def_kernel(m, "gelu_erf_backward", &gelu_backward_py<fastllm::cpu::gelu_erf_backward>, arg("dinp"),
               arg("dout"), arg("inp"));
    def_kernel(m, "residual_forward", &residual_forward_py, arg("out"), arg("inp1"), arg("inp2"), arg("scale") = 1.0f);
    def_kernel(m, "residual_backward", &residual_backward_py, arg("dinp1"), arg("dinp2"), arg("dout"),
               arg("scale") = 1.0f);
    def_kernel(m, "rmsnorm_forward", &rmsnorm_forward_py, arg("out"), arg("rstd"), arg("x"), arg("weight"),
               arg("eps"), arg("heads") = none, arg("cols") = none);
    def_kernel(m, "rmsnorm_backward", &rmsnorm_backward_py, arg("dx"), arg("dweight"), arg("dout"), arg("x"),
               arg("weight"), arg("rstd"), arg("heads") = none, arg("cols") = none);
    def_kernel(m, "rope_forward", &rope_forward_py, arg("out"), arg("qkv"), arg("cos"), arg("sin"), arg("pos"),
               arg("n_head"), arg("n_kv_head") = none);
    def_kernel(m, "rope_backward", &rope_backward_py, arg("dqkv"), arg("dout"), arg("cos"), arg("sin"), arg("pos"),
               arg("n_head"), arg("n_kv_head") = none);
    def_kernel(m, "swiglu_forward", &glu_forward_py<fastllm::cpu::swiglu_forward>, arg("out"), arg("gate_up"));
    def_kernel(m, "swiglu_backward", &glu_backward_py<fastllm::cpu::swiglu_backward>, arg("dgate_up"), arg("dout"),
               arg("gate_up"));
    def_kernel(m, "geglu_forward", &glu_forward_py<fastllm::cpu::geglu_forward>, arg("out"), arg("gate_up"));
    def_kernel(m, "geglu_backward", &glu_backward_py<fastllm::cpu::geglu_backward>, arg("dgate_up"), arg("dout"),
               arg("gate_up"));
    def_kernel(m, "relu2_forward", &relu2_forward_py, arg("out"), arg("x"));
    def_kernel(m, "relu2_backward", &relu2_backward_py, arg("dx"), arg("dout"), arg("x"));
    def_kernel(m, "embedding_forward", &embedding_forward_py, arg("out"), arg("tokens"), arg("wte"), arg("wpe"),
               arg("scale") = 1.0f);
    def_kernel(m, "embedding_backward", &embedding_backward_py, arg("dwte"), arg("dwpe"), arg("dout"),
               arg("tokens"), arg("scale") = 1.0f);
    def_kernel(m, "adamw_step", &adamw_py, arg("params"), arg("m"), arg("v"), arg("grads"), arg("lr"),
               arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("t"), arg("grad_scale"));
    def_kernel(m, "sum_squares", &sum_squares_py, arg("x"));
    def_kernel(m, "zero_", &zero_py, arg("x"));

    // ---- tokenizer (csrc/tokenizer): registered below
    // ---- pre-tokenizer
    m.def("pretokenize", &pretokenize_py, arg("text"), arg("pattern"));
    m.def("pattern_string", &pattern_string_py, arg("pattern"));
    m.def("_pretokenize_count", &pretokenize_count_py, arg("text"), arg("pattern"));
    m.def("_pretokenize_char_classes", &pretokenize_char_classes_py);
    // ---- BPE tokenizer
    register_bpe(m);
#ifdef FASTLLM_WITH_CUDA
    // ---- CUDA: fastllm._C.cuda (DeviceArray and the GPU kernels)
    fastllm::cuda::register_cuda(m);
#endif
}
