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
    // byte ranges of two arrays intersect (empty arrays never do)
    static const auto overlaps = [](const DeviceArray& x, const DeviceArray& y) {
        const uintptr_t x0 = (uintptr_t)x.data(), y0 = (uintptr_t)y.data();
        return x.nbytes() && y.nbytes() && x0 < y0 + y.nbytes() && y0 < x0 + x.nbytes();
    };
    static const auto no_overlap = [](const DeviceArray* out, const char* out_name, const DeviceArray* in,
                                      const char* in_name) {
        if (out && in)
            FASTLLM_CHECK(!overlaps(*out, *in), out_name, " must not overlap ", in_name,
                          " (use a separate output buffer)");
    };
    static const auto check_2d = [](const DeviceArray& x, const char* name) {
        FASTLLM_CHECK(x.shape.size() == 2, name, " must be 2-D, got shape ", x.shape_str());
    };
    static const auto check_int32_size = [](int64_t v, const char* what) {
        FASTLLM_CHECK(v < (int64_t(1) << 31), what, " = ", v, " is too large for the CUDA kernels (max 2^31 - 1)");
    };
    m.def(
        "gemm",
        [](DeviceArray& c, const DeviceArray& a, const DeviceArray& b, DeviceArray* bias, DeviceArray* pre_gelu,
           bool trans_a, bool trans_b, bool accumulate) {
            check_float(a, "a");
            check_2d(a, "a");
            check_2d(b, "b");
            check_2d(c, "c");
            const DType ab = a.dtype;
            if (c.dtype != DType::f32 && c.dtype != ab)
                throw py::type_error(str_cat("c must be float32 or a's dtype ", dtype_str(ab), ", got ",
                                             dtype_str(c.dtype)));
            const int64_t M = c.shape[0], N = c.shape[1], K = trans_a ? a.shape[0] : a.shape[1];
            check_array(a, "a", ab, trans_a ? std::vector<int64_t>{K, M} : std::vector<int64_t>{M, K});
            check_array(b, "b", ab, trans_b ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N});
            check_array(c, "c", c.dtype, {M, N});
            if (bias) check_array(*bias, "bias", ab, {N});
            if (pre_gelu) {
                check_array(*pre_gelu, "pre_gelu", c.dtype, {M, N});
                FASTLLM_CHECK(!accumulate, "pre_gelu (the GELU epilogue) cannot be combined with accumulate=True");
            }
            check_int32_size(M, "M");
            check_int32_size(N, "N");
            check_int32_size(K, "K");
            no_overlap(&c, "c", &a, "a");
            no_overlap(&c, "c", &b, "b");
            no_overlap(&c, "c", bias, "bias");
            no_overlap(pre_gelu, "pre_gelu", &a, "a");
            no_overlap(pre_gelu, "pre_gelu", &b, "b");
            no_overlap(pre_gelu, "pre_gelu", bias, "bias");
            no_overlap(pre_gelu, "pre_gelu", &c, "c");
            void* pc = c.data();
            const void *pa = a.data(), *pb = b.data(), *pbias = bias ? bias->data() : nullptr;
            void* ppre = pre_gelu ? pre_gelu->data() : nullptr;
            const DType ct = c.dtype;
            py::gil_scoped_release nogil;
            gemm(pc, ct, pa, pb, pbias, ppre, M, N, K, trans_a, trans_b, accumulate, ab);
        },
        arg("c"), arg("a"), arg("b"), arg("bias") = py::none(), arg("pre_gelu") = py::none(),
        arg("trans_a") = false, arg("trans_b") = false, arg("accumulate") = false,
        "c (M, N) = [c +] op(a) @ op(b) [+ bias]; with pre_gelu: pre_gelu = the product + bias, c = gelu(it).");
    m.def(
        "matmul_backward",
        [](DeviceArray* dinp, DeviceArray* dweight, DeviceArray* dbias, const DeviceArray& dout,
           const DeviceArray& inp, const DeviceArray& weight) {
            check_float(dout, "dout");
            const DType t = dout.dtype;
            check_2d(weight, "weight");
            check_array(weight, "weight", t, weight.shape);
            const int64_t OC = weight.shape[0], C = weight.shape[1];
            FASTLLM_CHECK(dout.shape.size() >= 1 && dout.shape.back() == OC, "dout must be (..., OC = ", OC,
                          "), got shape ", dout.shape_str());
            // leading dims are flattened: dout (..., OC) and inp (..., C) with the same number N of rows
            int64_t N = 1;
            for (size_t i = 0; i + 1 < dout.shape.size(); i++) N *= dout.shape[i];
            FASTLLM_CHECK(inp.shape.size() >= 1 && inp.shape.back() == C && inp.size() == N * C,
                          "inp must be (..., C = ", C, ") with N = ", N, " rows like dout, got shape ",
                          inp.shape_str());
            const std::vector<int64_t> inp_shape = inp.shape;
            check_array(inp, "inp", t, inp_shape);
            check_array(dout, "dout", t, dout.shape);
            check_int32_size(N, "N (rows)");
            check_int32_size(C, "C");
            check_int32_size(OC, "OC");
            if (dinp) check_array(*dinp, "dinp", t, inp_shape);
            if (dweight) check_array(*dweight, "dweight", DType::f32, {OC, C});
            if (dbias) check_array(*dbias, "dbias", DType::f32, {OC});
            for (auto [o, on] : {std::pair<DeviceArray*, const char*>{dinp, "dinp"}, {dweight, "dweight"},
                                 {dbias, "dbias"}}) {
                no_overlap(o, on, &dout, "dout");
                no_overlap(o, on, &inp, "inp");
                no_overlap(o, on, &weight, "weight");
            }
            no_overlap(dinp, "dinp", dweight, "dweight");
            no_overlap(dinp, "dinp", dbias, "dbias");
            no_overlap(dweight, "dweight", dbias, "dbias");
            void* pdi = dinp ? dinp->data() : nullptr;
            float* pdw = dweight ? (float*)dweight->data() : nullptr;
            float* pdb = dbias ? (float*)dbias->data() : nullptr;
            const void *pdo = dout.data(), *pin = inp.data(), *pw = weight.data();
            py::gil_scoped_release nogil;
            // dinp (N, C) += dout (N, OC) @ weight (OC, C)
            if (pdi) gemm(pdi, t, pdo, pw, nullptr, nullptr, N, C, OC, false, false, true, t);
            // dweight (OC, C) += dout^T (OC, N) @ inp (N, C)
            if (pdw) gemm(pdw, DType::f32, pdo, pin, nullptr, nullptr, OC, C, N, true, false, true, t);
            if (pdb) bias_backward(pdb, pdo, N, OC, t);
        },
        arg("dinp"), arg("dweight"), arg("dbias"), arg("dout"), arg("inp"), arg("weight"),
        "dinp += dout @ weight, dweight (f32) += dout^T @ inp, dbias (f32) += column sums of dout.");
    m.def("gemm_impl", &gemm_impl, "The GEMM kernel in use: 'auto', 'simple' or 'tc1'.");
    m.def("set_gemm_impl", &set_gemm_impl, arg("name"),
          "Select the GEMM kernel: 'auto' (tensor cores when possible), 'simple' (FFMA reference) or 'tc1'.");

    // ---- attention.cu

    // ---- softmax_ce.cu
    // a per-row array (losses, targets): shaped like the leading dims of the logits, or flat (N,)
    static const auto check_rows = [](const DeviceArray& x, const char* name, DType dt,
                                      const std::vector<int64_t>& lead, int64_t N) {
        check_array(x, name, dt, x.shape == std::vector<int64_t>{N} ? x.shape : lead);
    };
    m.def(
        "softmax_cross_entropy",
        [](DeviceArray& losses, DeviceArray* dlogits, const DeviceArray& logits, const DeviceArray& targets,
           float grad_scale, int32_t ignore_index) {
            check_float(logits, "logits");
            const DType t = logits.dtype;
            FASTLLM_CHECK(logits.shape.size() >= 1, "logits must be (..., V), got a 0-d array");
            const int64_t V = logits.shape.back();
            FASTLLM_CHECK(V >= 1, "logits must have V >= 1 columns, got shape ", logits.shape_str());
            const std::vector<int64_t> lead(logits.shape.begin(), logits.shape.end() - 1);
            const int64_t N = logits.size() / V;
            check_array(logits, "logits", t, logits.shape);
            check_int32_size(N, "N (rows)");
            check_rows(targets, "targets", DType::i32, lead, N);
            check_rows(losses, "losses", DType::f32, lead, N);
            if (dlogits) {
                check_array(*dlogits, "dlogits", t, logits.shape);
                FASTLLM_CHECK(dlogits->data() == logits.data() || !overlaps(*dlogits, logits),
                              "dlogits must be logits itself (in place) or not overlap it");
                no_overlap(dlogits, "dlogits", &targets, "targets");
                no_overlap(dlogits, "dlogits", &losses, "losses");
            }
            no_overlap(&losses, "losses", &logits, "logits");
            no_overlap(&losses, "losses", &targets, "targets");
            float* pl = (float*)losses.data();
            void* pd = dlogits ? dlogits->data() : nullptr;
            const void* px = logits.data();
            const int32_t* pt = (const int32_t*)targets.data();
            py::gil_scoped_release nogil;
            softmax_cross_entropy(pl, pd, px, pt, N, V, grad_scale, ignore_index, t);
        },
        arg("losses"), arg("dlogits"), arg("logits"), arg("targets"), arg("grad_scale") = 1.0f,
        arg("ignore_index") = -100,
        "losses (N, f32) and optionally dlogits = (softmax - onehot) * grad_scale (may be logits itself).");
    m.def(
        "lmhead_cross_entropy",
        [](DeviceArray& losses, DeviceArray* dhidden, DeviceArray* dweight, const DeviceArray& hidden,
           const DeviceArray& weight, const DeviceArray& targets, float grad_scale, int32_t ignore_index,
           DeviceArray* scratch) {
            check_float(hidden, "hidden");
            const DType t = hidden.dtype;
            check_2d(weight, "weight");
            check_array(weight, "weight", t, weight.shape);
            const int64_t V = weight.shape[0], C = weight.shape[1];
            FASTLLM_CHECK(V >= 1, "weight must be (V, C) with V >= 1, got shape ", weight.shape_str());
            FASTLLM_CHECK(hidden.shape.size() >= 1 && hidden.shape.back() == C, "hidden must be (..., C = ", C,
                          "), got shape ", hidden.shape_str());
            check_array(hidden, "hidden", t, hidden.shape);
            const std::vector<int64_t> lead(hidden.shape.begin(), hidden.shape.end() - 1);
            int64_t N = 1;
            for (int64_t d : lead) N *= d;
            check_int32_size(N, "N (rows)");
            check_int32_size(V, "V");
            check_int32_size(C, "C");
            check_rows(targets, "targets", DType::i32, lead, N);
            check_rows(losses, "losses", DType::f32, lead, N);
            if (dhidden) check_array(*dhidden, "dhidden", t, hidden.shape);
            if (dweight) check_array(*dweight, "dweight", DType::f32, {V, C});
            DeviceArray own;  // the scratch allocated here when none is given (freed after the kernels)
            if (scratch) {
                if (scratch->dtype != t)
                    throw py::type_error(str_cat("scratch must have hidden's dtype ", dtype_str(t), ", got ",
                                                 dtype_str(scratch->dtype)));
                FASTLLM_CHECK(scratch->shape.size() == 2 && scratch->shape[1] == V && scratch->shape[0] >= 1,
                              "scratch must be (rows >= 1, V = ", V, "), got shape ", scratch->shape_str());
                check_array(*scratch, "scratch", t, scratch->shape);
                check_int32_size(scratch->shape[0], "scratch rows");
            } else {
                own = DeviceArray::empty({lmhead_chunk_rows(N, V, t), V}, t);
                scratch = &own;
            }
            const DeviceArray* ins[] = {&hidden, &weight, &targets, scratch};
            const char* in_names[] = {"hidden", "weight", "targets", "scratch"};
            for (int i = 0; i < 4; i++) {
                no_overlap(&losses, "losses", ins[i], in_names[i]);
                no_overlap(dhidden, "dhidden", ins[i], in_names[i]);
                no_overlap(dweight, "dweight", ins[i], in_names[i]);
            }
            no_overlap(scratch, "scratch", &hidden, "hidden");
            no_overlap(scratch, "scratch", &weight, "weight");
            no_overlap(scratch, "scratch", &targets, "targets");
            no_overlap(dhidden, "dhidden", dweight, "dweight");
            no_overlap(dhidden, "dhidden", &losses, "losses");
            no_overlap(dweight, "dweight", &losses, "losses");
            float* pl = (float*)losses.data();
            void* pdh = dhidden ? dhidden->data() : nullptr;
            float* pdw = dweight ? (float*)dweight->data() : nullptr;
            const void *ph = hidden.data(), *pw = weight.data();
            const int32_t* pt = (const int32_t*)targets.data();
            void* ps = scratch->data();
            const int64_t rows = scratch->shape[0];
            {
                py::gil_scoped_release nogil;
                lmhead_cross_entropy(pl, pdh, pdw, ph, pw, pt, ps, rows, N, C, V, grad_scale, ignore_index, t);
            }
        },
        arg("losses"), arg("dhidden"), arg("dweight"), arg("hidden"), arg("weight"), arg("targets"),
        arg("grad_scale") = 1.0f, arg("ignore_index") = -100, arg("scratch") = py::none(),
        "Fused lm head + cross-entropy in row chunks of scratch (rows, V) (allocated if None).");
    m.def("lmhead_chunk_rows", [](int64_t N, int64_t V, const std::string& dtype) {
        return lmhead_chunk_rows(N, V, parse_dtype(dtype));
    }, arg("N"), arg("V"), arg("dtype"), "Default scratch rows of lmhead_cross_entropy (<= ~256 MiB).");

    // ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu
}
