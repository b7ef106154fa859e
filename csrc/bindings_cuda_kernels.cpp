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

namespace {
// byte ranges [data, data + nbytes) intersect (views of one allocation can; empty arrays never do)
bool overlap(const DeviceArray& a, const DeviceArray& b) {
    const char *pa = (const char*)a.data(), *pb = (const char*)b.data();
    return a.nbytes() && b.nbytes() && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
}  // namespace

static void register_elementwise(py::module_& m);  // layernorm, gelu, residual, embedding, adamw (below)
static void register_llama(py::module_& m);        // rmsnorm, rope, swiglu, relu2 (at the end)

void fastllm::cuda::register_cuda_kernels(py::module_& m) {
    using py::arg;
    // ---- matmul.cu
    static const auto no_overlap = [](const DeviceArray* out, const char* out_name, const DeviceArray* in,
                                      const char* in_name) {
        if (out && in)
            FASTLLM_CHECK(!overlap(*out, *in), out_name, " must not overlap ", in_name,
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
           bool trans_a, bool trans_b, bool accumulate, float alpha) {
            check_float(a, "a");
            FASTLLM_CHECK(std::isfinite(alpha), "alpha must be finite, got ", alpha);
            check_2d(a, "a");
            check_2d(b, "b");
            check_2d(c, "out");
            const DType ab = a.dtype;
            if (c.dtype != DType::f32 && c.dtype != ab)
                throw py::type_error(str_cat("out must be float32 or a's dtype ", dtype_str(ab), ", got ",
                                             dtype_str(c.dtype)));
            const int64_t M = c.shape[0], N = c.shape[1], K = trans_a ? a.shape[0] : a.shape[1];
            check_array(a, "a", ab, trans_a ? std::vector<int64_t>{K, M} : std::vector<int64_t>{M, K});
            check_array(b, "b", ab, trans_b ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N});
            check_array(c, "out", c.dtype, {M, N});
            if (bias) check_array(*bias, "bias", ab, {N});
            if (pre_gelu) {
                check_array(*pre_gelu, "pre_gelu", c.dtype, {M, N});
                FASTLLM_CHECK(!accumulate, "pre_gelu (the GELU epilogue) cannot be combined with accumulate=True");
            }
            check_int32_size(M, "M");
            check_int32_size(N, "N");
            check_int32_size(K, "K");
            no_overlap(&c, "out", &a, "a");
            no_overlap(&c, "out", &b, "b");
            no_overlap(&c, "out", bias, "bias");
            no_overlap(pre_gelu, "pre_gelu", &a, "a");
            no_overlap(pre_gelu, "pre_gelu", &b, "b");
            no_overlap(pre_gelu, "pre_gelu", bias, "bias");
            no_overlap(pre_gelu, "pre_gelu", &c, "out");
            void* pc = c.data();
            const void *pa = a.data(), *pb = b.data(), *pbias = bias ? bias->data() : nullptr;
            void* ppre = pre_gelu ? pre_gelu->data() : nullptr;
            const DType ct = c.dtype;
            py::gil_scoped_release nogil;
            gemm(pc, ct, pa, pb, pbias, ppre, M, N, K, trans_a, trans_b, accumulate, ab, alpha);
        },
        arg("out"), arg("a"), arg("b"), arg("bias") = py::none(), arg("pre_gelu") = py::none(),
        arg("trans_a") = false, arg("trans_b") = false, arg("accumulate") = false, arg("alpha") = 1.0f,
        "out (M, N) = [out +] alpha * op(a) @ op(b) [+ bias]; with pre_gelu: pre_gelu = the product + bias, "
        "out = gelu(it).");
    // matmul: inp (..., C) and out (..., OC) with the same N leading rows, weight (OC, C) -> {N, C, OC}
    static const auto matmul_dims = [](const DeviceArray& inp, const DeviceArray& weight, const char* out_name,
                                       const DeviceArray& out) {
        check_float(inp, "inp");
        check_2d(weight, "weight");
        check_array(weight, "weight", inp.dtype, weight.shape);
        const int64_t OC = weight.shape[0], C = weight.shape[1];
        FASTLLM_CHECK(inp.shape.size() >= 1 && inp.shape.back() == C, "inp must be (..., C = ", C,
                      ") like weight (OC, C), got shape ", inp.shape_str());
        const int64_t N = C ? inp.size() / C : 0;
        check_array(inp, "inp", inp.dtype, inp.shape);
        FASTLLM_CHECK(out.shape.size() >= 1 && out.shape.back() == OC && out.size() == N * OC, out_name,
                      " must be (..., OC = ", OC, ") with N = ", N, " rows like inp, got shape ", out.shape_str());
        check_int32_size(N, "N (rows)");
        check_int32_size(C, "C");
        check_int32_size(OC, "OC");
        return std::vector<int64_t>{N, C, OC};
    };
    m.def(
        "matmul_forward",
        [](DeviceArray& out, const DeviceArray& inp, const DeviceArray& weight, DeviceArray* bias,
           DeviceArray* pre_gelu) {
            const auto d = matmul_dims(inp, weight, "out", out);
            const DType t = inp.dtype;
            if (out.dtype != DType::f32 && out.dtype != t)
                throw py::type_error(str_cat("out must be float32 or inp's dtype ", dtype_str(t), ", got ",
                                             dtype_str(out.dtype)));
            check_array(out, "out", out.dtype, out.shape);
            if (bias) check_array(*bias, "bias", t, {d[2]});
            if (pre_gelu) check_array(*pre_gelu, "pre_gelu", out.dtype, out.shape);
            for (auto [o, on] : {std::pair<DeviceArray*, const char*>{&out, "out"}, {pre_gelu, "pre_gelu"}}) {
                no_overlap(o, on, &inp, "inp");
                no_overlap(o, on, &weight, "weight");
                no_overlap(o, on, bias, "bias");
            }
            no_overlap(pre_gelu, "pre_gelu", &out, "out");
            void *po = out.data(), *ppre = pre_gelu ? pre_gelu->data() : nullptr;
            const void *pin = inp.data(), *pw = weight.data(), *pb = bias ? bias->data() : nullptr;
            const DType ot = out.dtype;
            py::gil_scoped_release nogil;
            matmul_forward(po, ot, pin, pw, pb, ppre, d[0], d[1], d[2], t);
        },
        arg("out"), arg("inp"), arg("weight"), arg("bias") = py::none(), arg("pre_gelu") = py::none(),
        "out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias; with pre_gelu: pre_gelu = that, out = gelu(it).");
    m.def(
        "matmul_backward",
        [](DeviceArray* dinp, DeviceArray* dweight, DeviceArray* dbias, const DeviceArray& dout,
           const DeviceArray& inp, const DeviceArray& weight) {
            const auto d = matmul_dims(inp, weight, "dout", dout);
            const DType t = inp.dtype;
            check_array(dout, "dout", t, dout.shape);
            if (dinp) check_array(*dinp, "dinp", t, inp.shape);
            if (dweight) check_array(*dweight, "dweight", DType::f32, {d[2], d[1]});
            if (dbias) check_array(*dbias, "dbias", DType::f32, {d[2]});
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
            matmul_backward(pdi, pdw, pdb, pdo, pin, pw, d[0], d[1], d[2], t);
        },
        arg("dinp"), arg("dweight"), arg("dbias"), arg("dout"), arg("inp"), arg("weight"),
        "dinp += dout @ weight, dweight (f32) += dout^T @ inp, dbias (f32) += column sums of dout.");
    m.def("gemm_impl", &gemm_impl, "The GEMM kernel in use: 'auto', 'simple' or 'tc1'.");
    m.def("set_gemm_impl", &set_gemm_impl, arg("name"),
          "Select the GEMM kernel: 'auto' (tensor cores when possible), 'simple' (FFMA reference) or 'tc1'.");

    // ---- attention.cu
    {
        static const auto disjoint = [](const DeviceArray& a, const char* an, const DeviceArray& b, const char* bn) {
            FASTLLM_CHECK(!overlap(a, b), an, " must not overlap ", bn, " (got views of the same memory)");
        };
        static constexpr int64_t kMaxHs = 256;  // the simple kernels keep hs/32 (rounded up to 1, 2, 4, 8) values per lane
        // qkv (B, T, (NH + 2*NKV) * hs), n_head and n_kv_head (None: n_head) -> {B, T, C = NH*hs, NKV}, after
        // checking dtype, ndim, the heads, hs <= kMaxHs
        static const auto qkv_dims = [](const DeviceArray& qkv, int64_t n_head, std::optional<int64_t> n_kv_head) {
            check_float(qkv, "qkv");
            FASTLLM_CHECK(qkv.shape.size() == 3, "qkv must be (B, T, (n_head + 2*n_kv_head) * hs), got shape ",
                          qkv.shape_str());
            const int64_t B = qkv.shape[0], T = qkv.shape[1], W = qkv.shape[2], NKV = n_kv_head.value_or(n_head);
            FASTLLM_CHECK(n_head > 0, "n_head must be > 0, got ", n_head);
            FASTLLM_CHECK(NKV > 0 && n_head % NKV == 0, "n_kv_head=", NKV, " must be > 0 and divide n_head=", n_head);
            const int64_t heads = n_head + 2 * NKV;
            FASTLLM_CHECK(W % heads == 0 && W > 0, "qkv last dim must be (n_head + 2*n_kv_head) * hs = ", heads,
                          " * hs, got ", W, " (n_head=", n_head, ", n_kv_head=", NKV, ")");
            const int64_t hs = W / heads;
            FASTLLM_CHECK(hs <= kMaxHs, "head size hs=", hs, " is above the CUDA attention limit of ", kMaxHs);
            FASTLLM_CHECK(B * n_head * T < ((int64_t)1 << 31), "B*n_head*T=", B * n_head * T,
                          " is too large for the CUDA attention grid (< 2^31)");
            return std::vector<int64_t>{B, T, n_head * hs, NKV};
        };
        m.def(
            "attention_forward",
            [](DeviceArray& out, DeviceArray& lse, const DeviceArray& qkv, int64_t n_head,
               std::optional<int64_t> n_kv_head, float scale, float softcap, int64_t window) {
                const auto opt = fastllm::AttentionOpts::checked(scale, softcap, window);
                const auto d = qkv_dims(qkv, n_head, n_kv_head);
                const int64_t B = d[0], T = d[1], C = d[2], NKV = d[3];
                check_array(out, "out", qkv.dtype, {B, T, C});
                check_array(lse, "lse", DType::f32, {B, n_head, T});
                disjoint(out, "out", qkv, "qkv");
                disjoint(lse, "lse", qkv, "qkv");
                disjoint(lse, "lse", out, "out");
                py::gil_scoped_release nogil;
                attention_forward(out.data(), (float*)lse.data(), qkv.data(), B, T, C, n_head, NKV, opt, qkv.dtype);
            },
            arg("out"), arg("lse"), arg("qkv"), arg("n_head"), arg("n_kv_head") = py::none(), arg("scale") = 0.0f,
            arg("softcap") = 0.0f, arg("window") = 0,
            "scale (0: 1/sqrt(hs)), softcap (0: none), window (0: full causal): AttentionOpts (common.h)");
        m.def(
            "attention_backward",
            [](DeviceArray& dqkv, const DeviceArray& dout, const DeviceArray& qkv, const DeviceArray& out,
               const DeviceArray& lse, int64_t n_head, std::optional<int64_t> n_kv_head, float scale, float softcap,
               int64_t window) {
                const auto opt = fastllm::AttentionOpts::checked(scale, softcap, window);
                const auto d = qkv_dims(qkv, n_head, n_kv_head);
                const int64_t B = d[0], T = d[1], C = d[2], NKV = d[3];
                check_array(dqkv, "dqkv", qkv.dtype, qkv.shape);
                check_array(dout, "dout", qkv.dtype, {B, T, C});
                check_array(out, "out", qkv.dtype, {B, T, C});
                check_array(lse, "lse", DType::f32, {B, n_head, T});
                disjoint(dqkv, "dqkv", qkv, "qkv");
                disjoint(dqkv, "dqkv", dout, "dout");
                disjoint(dqkv, "dqkv", out, "out");
                disjoint(dqkv, "dqkv", lse, "lse");
                py::gil_scoped_release nogil;
                attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), (const float*)lse.data(), B, T,
                                   C, n_head, NKV, opt, qkv.dtype);
            },
            arg("dqkv"), arg("dout"), arg("qkv"), arg("out"), arg("lse"), arg("n_head"), arg("n_kv_head") = py::none(),
            arg("scale") = 0.0f, arg("softcap") = 0.0f, arg("window") = 0);
        m.def(
            "attention_kv_forward",
            [](DeviceArray& out, DeviceArray& kcache, DeviceArray& vcache, const DeviceArray& qkv,
               const DeviceArray& pos, std::optional<int64_t> n_kv_head, float scale, float softcap, int64_t window) {
                const auto opt = fastllm::AttentionOpts::checked(scale, softcap, window);
                check_float(qkv, "qkv");
                FASTLLM_CHECK(qkv.shape.size() == 3, "qkv must be (B, Tn, (n_head + 2*n_kv_head) * hs), got shape ",
                              qkv.shape_str());
                const int64_t B = qkv.shape[0], Tn = qkv.shape[1], W = qkv.shape[2];
                FASTLLM_CHECK(kcache.shape.size() == 4, "kcache must be (B, n_kv_head, max_T, hs), got shape ",
                              kcache.shape_str());
                const int64_t NKV = kcache.shape[1], maxT = kcache.shape[2], hs = kcache.shape[3];
                FASTLLM_CHECK(kcache.shape[0] == B && NKV > 0 && hs > 0, "kcache must be (B=", B,
                              ", n_kv_head, max_T, hs), got shape ", kcache.shape_str());
                FASTLLM_CHECK(!n_kv_head || *n_kv_head == NKV, "n_kv_head=", n_kv_head.value_or(0),
                              " does not match kcache (B, n_kv_head, max_T, hs) of shape ", kcache.shape_str());
                // n_kv_head None: multi-head attention, W = 3 * NKV * hs (the layout before grouped KV heads)
                const int64_t NH = n_kv_head ? W / hs - 2 * NKV : NKV, C = NH * hs;
                FASTLLM_CHECK(NH > 0 && W == (NH + 2 * NKV) * hs && NH % NKV == 0, "qkv last dim ", W,
                              " does not fit kcache ", kcache.shape_str(),
                              ": it must be (n_head + 2*n_kv_head) * hs with n_kv_head",
                              n_kv_head ? "" : " = n_head (pass n_kv_head for grouped-query attention)",
                              " dividing n_head");
                FASTLLM_CHECK(hs <= kMaxHs, "head size hs=", hs, " is above the CUDA attention limit of ", kMaxHs);
                FASTLLM_CHECK(Tn <= maxT, "qkv has Tn=", Tn, " new tokens, more than the cache's max_T=", maxT);
                FASTLLM_CHECK(B * NH * Tn < ((int64_t)1 << 31), "B*NH*Tn=", B * NH * Tn, " is too large (< 2^31)");
                check_array(kcache, "kcache", qkv.dtype, {B, NKV, maxT, hs});
                check_array(vcache, "vcache", qkv.dtype, {B, NKV, maxT, hs});
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
                disjoint(out, "out", pos, "pos");  // pos is read by every block while out is written
                py::gil_scoped_release nogil;
                attention_kv_forward(out.data(), kcache.data(), vcache.data(), qkv.data(),
                                     (const int32_t*)pos.data(), B, Tn, C, NH, NKV, maxT, opt, qkv.dtype);
            },
            arg("out"), arg("kcache"), arg("vcache"), arg("qkv"), arg("pos"), arg("n_kv_head") = py::none(),
            arg("scale") = 0.0f, arg("softcap") = 0.0f, arg("window") = 0);
    }

    // ---- softmax_ce.cu
    // softcap: 0 (none) or c > 0, finite
    static const auto check_softcap = [](float softcap) {
        FASTLLM_CHECK(softcap >= 0.0f && std::isfinite(softcap),
                      "softcap must be a finite number > 0 (0: none), got ", softcap);
    };
    // temperature: finite > 0 with a finite reciprocal (1: none)
    static const auto check_temperature = [](float temperature) {
        FASTLLM_CHECK(temperature > 0.0f && std::isfinite(temperature) && std::isfinite(1.0f / temperature),
                      "temperature must be a finite number > 0, got ", temperature);
    };
    // a per-row array (losses, targets): shaped like the leading dims of the logits, or flat (N,)
    static const auto check_rows = [](const DeviceArray& x, const char* name, DType dt,
                                      const std::vector<int64_t>& lead, int64_t N) {
        check_array(x, name, dt, x.shape == std::vector<int64_t>{N} ? x.shape : lead);
    };
    m.def(
        "softmax_ce",
        [](DeviceArray& losses, DeviceArray* dlogits, const DeviceArray& logits, const DeviceArray& targets,
           float grad_scale, int32_t ignore_index, DeviceArray* row_weights, float softcap, float temperature) {
            check_softcap(softcap);
            check_temperature(temperature);
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
                FASTLLM_CHECK(dlogits->data() == logits.data() || !overlap(*dlogits, logits),
                              "dlogits must be logits itself (in place) or not overlap it");
                no_overlap(dlogits, "dlogits", &targets, "targets");
                no_overlap(dlogits, "dlogits", &losses, "losses");
            }
            no_overlap(&losses, "losses", &logits, "logits");
            no_overlap(&losses, "losses", &targets, "targets");
            if (row_weights) {
                check_rows(*row_weights, "row_weights", DType::f32, lead, N);
                no_overlap(dlogits, "dlogits", row_weights, "row_weights");
            }
            float* pl = (float*)losses.data();
            void* pd = dlogits ? dlogits->data() : nullptr;
            const void* px = logits.data();
            const int32_t* pt = (const int32_t*)targets.data();
            const float* pw = row_weights ? (const float*)row_weights->data() : nullptr;
            py::gil_scoped_release nogil;
            softmax_ce(pl, pd, px, pt, N, V, grad_scale, ignore_index, pw, softcap, temperature, t);
        },
        arg("losses"), arg("dlogits"), arg("logits"), arg("targets"), arg("grad_scale") = 1.0f,
        arg("ignore_index") = -1, arg("row_weights") = py::none(), arg("softcap") = 0.0f, arg("temperature") = 1.0f,
        "losses (N, f32) and optionally dlogits = (softmax - onehot) * grad_scale (may be logits itself).");
    m.def(
        "lmhead_ce",
        [](DeviceArray& losses, DeviceArray* dhidden, DeviceArray* dweight, const DeviceArray& hidden,
           const DeviceArray& weight, const DeviceArray& targets, float grad_scale, int32_t ignore_index,
           DeviceArray* scratch, DeviceArray* row_weights, float softcap, float temperature) {
            check_softcap(softcap);
            check_temperature(temperature);
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
            if (row_weights) {
                check_rows(*row_weights, "row_weights", DType::f32, lead, N);
                no_overlap(scratch, "scratch", row_weights, "row_weights");
                no_overlap(dhidden, "dhidden", row_weights, "row_weights");
                no_overlap(dweight, "dweight", row_weights, "row_weights");
            }
            const float* prw = row_weights ? (const float*)row_weights->data() : nullptr;
            float* pl = (float*)losses.data();
            void* pdh = dhidden ? dhidden->data() : nullptr;
            float* pdw = dweight ? (float*)dweight->data() : nullptr;
            const void *ph = hidden.data(), *pw = weight.data();
            const int32_t* pt = (const int32_t*)targets.data();
            void* ps = scratch->data();
            const int64_t rows = scratch->shape[0];
            {
                py::gil_scoped_release nogil;
                lmhead_ce(pl, pdh, pdw, ph, pw, pt, ps, rows, N, C, V, grad_scale, ignore_index, prw, softcap,
                          temperature, t);
            }
        },
        arg("losses"), arg("dhidden"), arg("dweight"), arg("hidden"), arg("weight"), arg("targets"),
        arg("grad_scale") = 1.0f, arg("ignore_index") = -1, arg("scratch") = py::none(),
        arg("row_weights") = py::none(), arg("softcap") = 0.0f, arg("temperature") = 1.0f,
        "Fused lm head + cross-entropy in row chunks of scratch (rows, V) (allocated if None).");
    m.def("lmhead_chunk_rows", [](int64_t N, int64_t V, const std::string& dtype) {
        return lmhead_chunk_rows(N, V, parse_dtype(dtype));
    }, arg("N"), arg("V"), arg("dtype"), "Default scratch rows of lmhead_ce (<= ~256 MiB).");

    // ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu
    register_elementwise(m);
    // ---- rmsnorm.cu, rope.cu, swiglu.cu
    register_llama(m);
}

// ---- layernorm.cu, gelu.cu, embedding.cu, adamw.cu (registered at the end of register_cuda_kernels)

namespace {

void ew_check_device(const DeviceArray& a, const char* name) {
    FASTLLM_CHECK(a.device == current_device(), name, " is on GPU ", a.device, " but the current GPU is ",
                  current_device());
}

void ew_disjoint(const DeviceArray& a, const char* an, const DeviceArray& b, const char* bn) {
    FASTLLM_CHECK(!overlap(a, b), an, " and ", bn, " must not overlap in memory");
}
// ew_disjoint(out, on, *a, an) for each (a, an) of the list that is given (a not nullptr)
using Named = std::pair<const DeviceArray*, const char*>;
void ew_disjoint_all(const DeviceArray& out, const char* on, std::initializer_list<Named> ins) {
    for (auto [a, an] : ins)
        if (a) ew_disjoint(out, on, *a, an);
}
// an output that may be exactly the input (in place) but must not partially overlap it
void ew_same_or_disjoint(const DeviceArray& out, const char* on, const DeviceArray& in, const char* in_name) {
    const bool same = out.data() == in.data() && out.nbytes() == in.nbytes();
    FASTLLM_CHECK(same || !overlap(out, in), on, " must be ", in_name, " itself (in place) or not overlap it");
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

// An element-wise activation (gelu, gelu_erf, relu2): fwd(out, x): out = f(x), out may be x itself; bwd(dx, dout, x):
// dx += f'(x) * dout.
void def_activation(py::module_& m, const char* fwd_name, decltype(&gelu_forward) fwd, const char* bwd_name,
                    decltype(&gelu_backward) bwd) {
    using py::arg;
    m.def(
        fwd_name,
        [fwd](DeviceArray& out, const DeviceArray& x) {
            check_float(x, "x");
            check_array(x, "x", x.dtype, x.shape);
            check_array(out, "out", x.dtype, x.shape);
            ew_same_or_disjoint(out, "out", x, "x");
            py::gil_scoped_release nogil;
            fwd(out.data(), x.data(), x.size(), x.dtype);
        },
        arg("out"), arg("x"));
    m.def(
        bwd_name,
        [bwd](DeviceArray& dx, const DeviceArray& dout, const DeviceArray& x) {
            check_float(x, "x");
            check_array(x, "x", x.dtype, x.shape);
            check_array(dx, "dx", x.dtype, x.shape);
            check_array(dout, "dout", x.dtype, x.shape);
            ew_disjoint(dx, "dx", dout, "dout");
            ew_disjoint(dx, "dx", x, "x");
            py::gil_scoped_release nogil;
            bwd(dx.data(), dout.data(), x.data(), x.size(), x.dtype);
        },
        arg("dx"), arg("dout"), arg("x"));
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
            ew_disjoint_all(out, "out", {{&weight, "weight"}, {&bias, "bias"}, {&mean, "mean"}, {&rstd, "rstd"}});
            ew_disjoint_all(mean, "mean", {{&x, "x"}, {&weight, "weight"}, {&bias, "bias"}, {&rstd, "rstd"}});
            ew_disjoint_all(rstd, "rstd", {{&x, "x"}, {&weight, "weight"}, {&bias, "bias"}});
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
            ew_disjoint_all(dx, "dx", {{&dout, "dout"}, {&x, "x"}, {&weight, "weight"}, {&mean, "mean"},
                                       {&rstd, "rstd"}, {&dweight, "dweight"}, {&dbias, "dbias"}});
            ew_disjoint_all(dweight, "dweight", {{&dout, "dout"}, {&x, "x"}, {&weight, "weight"}, {&mean, "mean"},
                                                 {&rstd, "rstd"}, {&dbias, "dbias"}});
            ew_disjoint_all(dbias, "dbias", {{&dout, "dout"}, {&x, "x"}, {&weight, "weight"}, {&mean, "mean"},
                                             {&rstd, "rstd"}});
            py::gil_scoped_release nogil;
            layernorm_backward(dx.data(), (float*)dweight.data(), (float*)dbias.data(), dout.data(), x.data(),
                               weight.data(), (const float*)mean.data(), (const float*)rstd.data(), N, C, x.dtype);
        },
        arg("dx"), arg("dweight"), arg("dbias"), arg("dout"), arg("x"), arg("weight"), arg("mean"), arg("rstd"));

    def_activation(m, "gelu_forward", gelu_forward, "gelu_backward", gelu_backward);
    def_activation(m, "gelu_erf_forward", gelu_erf_forward, "gelu_erf_backward", gelu_erf_backward);

    m.def(
        "residual_forward",
        [](DeviceArray& out, const DeviceArray& a, const DeviceArray& b, float scale) {
            check_float(a, "a");
            check_array(a, "a", a.dtype, a.shape);
            check_array(b, "b", a.dtype, a.shape);
            check_array(out, "out", a.dtype, a.shape);
            ew_same_or_disjoint(out, "out", a, "a");
            ew_same_or_disjoint(out, "out", b, "b");
            py::gil_scoped_release nogil;
            residual_forward(out.data(), a.data(), b.data(), a.size(), a.dtype, scale);
        },
        arg("out"), arg("a"), arg("b"), arg("scale") = 1.0f);

    m.def(
        "residual_backward",
        [](DeviceArray& da, DeviceArray& db, const DeviceArray& dout, float scale) {
            check_float(dout, "dout");
            check_array(dout, "dout", dout.dtype, dout.shape);
            check_array(da, "dinp1", dout.dtype, dout.shape);
            check_array(db, "dinp2", dout.dtype, dout.shape);
            ew_disjoint(da, "dinp1", db, "dinp2");
            ew_disjoint(da, "dinp1", dout, "dout");
            ew_disjoint(db, "dinp2", dout, "dout");
            py::gil_scoped_release nogil;
            residual_backward(da.data(), db.data(), dout.data(), dout.size(), dout.dtype, scale);
        },
        arg("dinp1"), arg("dinp2"), arg("dout"), arg("scale") = 1.0f);

    // wpe / dwpe may be None: no position embedding (rotary models); scale multiplies the token embeddings (Gemma)
    static const auto check_scale = [](float scale) {
        FASTLLM_CHECK(std::isfinite(scale), "scale must be a finite float32 number, got ", scale);
    };
    m.def(
        "embedding_forward",
        [](DeviceArray& out, const DeviceArray& tokens, const DeviceArray& wte, const DeviceArray* wpe, float scale) {
            check_scale(scale);
            int64_t B, T;
            ew_check_tokens(tokens, B, T);
            check_float(wte, "wte");
            FASTLLM_CHECK(wte.shape.size() == 2, "wte must have shape (V, C), got ", wte.shape_str());
            const int64_t V = wte.shape[0], C = wte.shape[1];
            ew_check_table(wte, "wte", wte.dtype, C);
            if (wpe) {
                ew_check_table(*wpe, "wpe", wte.dtype, C);
                FASTLLM_CHECK(wpe->shape[0] >= T, "wpe has ", wpe->shape[0], " rows (positions) but tokens have T = ",
                              T);
            }
            check_array(out, "out", wte.dtype, {B, T, C});
            ew_disjoint(out, "out", tokens, "tokens");
            ew_disjoint(out, "out", wte, "wte");
            if (wpe) ew_disjoint(out, "out", *wpe, "wpe");
            const void* pe = wpe ? wpe->data() : nullptr;
            py::gil_scoped_release nogil;
            embedding_forward(out.data(), (const int32_t*)tokens.data(), wte.data(), pe, B, T, C, V, scale,
                              wte.dtype);
        },
        arg("out"), arg("tokens"), arg("wte"), arg("wpe").none(true), arg("scale") = 1.0f);

    m.def(
        "embedding_backward",
        [](DeviceArray& dwte, DeviceArray* dwpe, const DeviceArray& dout, const DeviceArray& tokens, float scale) {
            check_scale(scale);
            int64_t B, T;
            ew_check_tokens(tokens, B, T);
            check_float(dout, "dout");
            FASTLLM_CHECK(dout.shape.size() == 3 && dout.shape[0] == B && dout.shape[1] == T, "dout must have shape (",
                          B, ", ", T, ", C) like tokens (B, T), got ", dout.shape_str());
            const int64_t C = dout.shape[2];
            ew_check_device(dout, "dout");
            ew_check_table(dwte, "dwte", DType::f32, C);
            ew_disjoint(dwte, "dwte", dout, "dout");
            ew_disjoint(dwte, "dwte", tokens, "tokens");
            if (dwpe) {
                ew_check_table(*dwpe, "dwpe", DType::f32, C);
                FASTLLM_CHECK(dwpe->shape[0] >= T, "dwpe has ", dwpe->shape[0],
                              " rows (positions) but tokens have T = ", T);
                ew_disjoint(dwte, "dwte", *dwpe, "dwpe");
                ew_disjoint(*dwpe, "dwpe", dout, "dout");
                ew_disjoint(*dwpe, "dwpe", tokens, "tokens");
            }
            float* pdpe = dwpe ? (float*)dwpe->data() : nullptr;
            py::gil_scoped_release nogil;
            embedding_backward((float*)dwte.data(), pdpe, dout.data(), (const int32_t*)tokens.data(), B, T, C,
                               dwte.shape[0], scale, dout.dtype);
        },
        arg("dwte"), arg("dwpe").none(true), arg("dout"), arg("tokens"), arg("scale") = 1.0f);

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
            std::vector<Named> all = {
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

// ---- rmsnorm.cu, rope.cu, swiglu.cu: the Llama and Gemma families' ops (registered at the end of
// register_cuda_kernels)

static void register_llama(py::module_& m) {
    using py::arg;
    using Heads = std::optional<std::pair<int64_t, int64_t>>;
    // x (..., C) whole, with heads = (h0, h1) rows [h0, h1) of its second-to-last axis, or with cols = (c0, c1) the
    // columns x[..., c0:c1]: {N, C, group, group_stride, offset (elements)} (csrc/cpu/rmsnorm.h) and rstd's shape
    struct NormRows {
        int64_t N, C, group, group_stride, offset;
        std::vector<int64_t> stats;
    };
    static const auto norm_rows = [](const DeviceArray& x, const Heads& heads, const Heads& cols) {
        check_float(x, "x");
        FASTLLM_CHECK(!(heads && cols), "give heads or cols, not both");
        int64_t N, C;
        ew_rows(x, "x", N, C);
        check_array(x, "x", x.dtype, x.shape);
        std::vector<int64_t> lead(x.shape.begin(), x.shape.end() - 1);
        if (cols) {
            const int64_t c0 = cols->first, c1 = cols->second;
            FASTLLM_CHECK(0 <= c0 && c0 < c1 && c1 <= C, "cols=(", c0, ", ", c1, ") must satisfy 0 <= c0 < c1 <= C=",
                          C, " (x.shape[-1] of x ", x.shape_str(), ")");
            return NormRows{N, c1 - c0, 1, C, c0, lead};
        }
        if (!heads) return NormRows{N, C, std::max<int64_t>(N, 1), N * C, 0, lead};
        FASTLLM_CHECK(x.shape.size() >= 2, "heads needs x (..., R, C) with a head axis, got shape ", x.shape_str());
        const int64_t R = lead.back(), h0 = heads->first, h1 = heads->second;
        FASTLLM_CHECK(0 <= h0 && h0 < h1 && h1 <= R, "heads=(", h0, ", ", h1, ") must satisfy 0 <= h0 < h1 <= R=",
                      R, " (x.shape[-2] of x ", x.shape_str(), ")");
        lead.back() = h1 - h0;
        return NormRows{N / R * (h1 - h0), C, h1 - h0, R * C, h0 * C, lead};
    };
    static const auto stats = [](const DeviceArray& a, const char* name, const NormRows& r) {
        if (a.dtype != DType::f32)
            throw py::type_error(str_cat(name, " must have dtype float32, got ", dtype_str(a.dtype)));
        FASTLLM_CHECK(a.shape == r.stats, name, " must have shape ", DeviceArray{nullptr, 0, r.stats}.shape_str(),
                      ", got ", a.shape_str());
        ew_check_device(a, name);
    };
    const auto at = [](const DeviceArray& a, int64_t elems) { return (char*)a.data() + elems * dtype_size(a.dtype); };
    m.def(
        "rmsnorm_forward",
        [at](DeviceArray& out, DeviceArray& rstd, const DeviceArray& x, const DeviceArray& weight, float eps,
             Heads heads, Heads cols) {
            const NormRows r = norm_rows(x, heads, cols);
            check_array(out, "out", x.dtype, x.shape);
            check_array(weight, "weight", x.dtype, {r.C});
            stats(rstd, "rstd", r);
            FASTLLM_CHECK(eps >= 0.0f && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
            ew_same_or_disjoint(out, "out", x, "x");
            ew_disjoint_all(out, "out", {{&weight, "weight"}, {&rstd, "rstd"}});
            ew_disjoint_all(rstd, "rstd", {{&x, "x"}, {&weight, "weight"}});
            void* po = at(out, r.offset);
            const void* px = at(x, r.offset);
            py::gil_scoped_release nogil;
            rmsnorm_forward(po, (float*)rstd.data(), px, weight.data(), r.N, r.C, r.group, r.group_stride, eps,
                            x.dtype);
        },
        arg("out"), arg("rstd"), arg("x"), arg("weight"), arg("eps"), arg("heads") = py::none(),
        arg("cols") = py::none());
    m.def(
        "rmsnorm_backward",
        [at](DeviceArray& dx, DeviceArray& dweight, const DeviceArray& dout, const DeviceArray& x,
             const DeviceArray& weight, const DeviceArray& rstd, Heads heads, Heads cols) {
            const NormRows r = norm_rows(x, heads, cols);
            check_array(dx, "dx", x.dtype, x.shape);
            check_array(dout, "dout", x.dtype, x.shape);
            check_array(weight, "weight", x.dtype, {r.C});
            check_array(dweight, "dweight", DType::f32, {r.C});
            stats(rstd, "rstd", r);
            ew_same_or_disjoint(dx, "dx", dout, "dout");  // in place: dx is dout (its rows replaced)
            ew_disjoint_all(dx, "dx", {{&x, "x"}, {&weight, "weight"}, {&rstd, "rstd"}, {&dweight, "dweight"}});
            ew_disjoint_all(dweight, "dweight", {{&dout, "dout"}, {&x, "x"}, {&weight, "weight"}, {&rstd, "rstd"}});
            void* pdx = at(dx, r.offset);
            const void *pdy = at(dout, r.offset), *px = at(x, r.offset);
            py::gil_scoped_release nogil;
            rmsnorm_backward(pdx, (float*)dweight.data(), pdy, px, weight.data(), (const float*)rstd.data(), r.N,
                             r.C, r.group, r.group_stride, x.dtype);
        },
        arg("dx"), arg("dweight"), arg("dout"), arg("x"), arg("weight"), arg("rstd"), arg("heads") = py::none(),
        arg("cols") = py::none());

    // qkv (B, T, (NH + 2*NKV) * hs), tables cos/sin (P, R2) f32 with 2*R2 <= hs, pos int32 (B) or None ->
    // {B, T, P, NKV, hs, R2}. Positions are not checked here (device memory): fastllm.cuda checks numpy ones.
    static const auto rope_dims = [](const DeviceArray& x, const char* xname, const DeviceArray& cos,
                                     const DeviceArray& sin, const DeviceArray* pos, int64_t NH,
                                     std::optional<int64_t> n_kv_head) {
        check_float(x, xname);
        FASTLLM_CHECK(x.shape.size() == 3, xname, " must be (B, T, (n_head + 2*n_kv_head) * hs), got shape ",
                      x.shape_str());
        const int64_t NKV = n_kv_head.value_or(NH);
        FASTLLM_CHECK(NH > 0, "n_head must be > 0, got ", NH);
        FASTLLM_CHECK(NKV > 0 && NH % NKV == 0, "n_kv_head=", NKV, " must be > 0 and divide n_head=", NH);
        const int64_t B = x.shape[0], T = x.shape[1], W = x.shape[2], heads = NH + 2 * NKV;
        FASTLLM_CHECK(W % heads == 0 && W > 0, xname, " last dim must be (n_head + 2*n_kv_head) * hs = ", heads,
                      " * hs, got ", W);
        FASTLLM_CHECK(B * T * W < (1ll << 62) && W < (1ll << 31), xname, " is too large");
        const int64_t hs = W / heads;
        FASTLLM_CHECK(cos.shape.size() == 2, "cos must be (max_pos, rotary_dim / 2), got shape ", cos.shape_str());
        const int64_t P = cos.shape[0], R2 = cos.shape[1];
        check_array(cos, "cos", DType::f32, {P, R2});
        check_array(sin, "sin", DType::f32, {P, R2});
        FASTLLM_CHECK(2 * R2 <= hs, "cos has ", R2, " columns: rotary_dim = ", 2 * R2, " exceeds the head size hs=",
                      hs);
        if (pos) check_array(*pos, "pos", DType::i32, {B});
        return std::vector<int64_t>{B, T, P, NKV, hs, R2};
    };
    // rope_forward (out, qkv, ...) and rope_backward (dqkv, dout, ...): the same checks, then the kernel
    struct RopeDef {
        const char *fname, *oname, *xname;
        decltype(&rope_forward) kernel;
    };
    for (const RopeDef d : {RopeDef{"rope_forward", "out", "qkv", &rope_forward},
                            RopeDef{"rope_backward", "dqkv", "dout", &rope_backward}})
        m.def(
            d.fname,
            [d](DeviceArray& out, const DeviceArray& x, const DeviceArray& cos, const DeviceArray& sin,
                DeviceArray* pos, int64_t n_head, std::optional<int64_t> n_kv_head) {
                const auto r = rope_dims(x, d.xname, cos, sin, pos, n_head, n_kv_head);
                check_array(out, d.oname, x.dtype, x.shape);
                ew_same_or_disjoint(out, d.oname, x, d.xname);
                ew_disjoint_all(out, d.oname, {{&cos, "cos"}, {&sin, "sin"}, {pos, "pos"}});
                const int32_t* pp = pos ? (const int32_t*)pos->data() : nullptr;
                py::gil_scoped_release nogil;
                d.kernel(out.data(), x.data(), (const float*)cos.data(), (const float*)sin.data(), pp, r[0], r[1],
                         r[2], n_head, r[3], r[4], r[5], x.dtype);
            },
            arg(d.oname), arg(d.xname), arg("cos"), arg("sin"), arg("pos").none(true), arg("n_head"),
            arg("n_kv_head") = py::none());

    // gate_up (..., 2H) -> {N, H} and the shape of out (..., H)
    static const auto swiglu_dims = [](const DeviceArray& gate_up, std::vector<int64_t>& half) {
        check_float(gate_up, "gate_up");
        FASTLLM_CHECK(!gate_up.shape.empty() && gate_up.shape.back() % 2 == 0,
                      "gate_up must be (..., 2H) = [gate | up], got shape ", gate_up.shape_str());
        check_array(gate_up, "gate_up", gate_up.dtype, gate_up.shape);
        half = gate_up.shape;
        half.back() /= 2;
        const int64_t H = half.back();
        return std::pair<int64_t, int64_t>{H ? gate_up.size() / (2 * H) : 0, H};
    };
    // SwiGLU and GeGLU (swiglu.cu): fwd(out, gate_up), bwd(dgate_up, dout, gate_up)
    const auto def_gated = [&](const char* fwd_name, decltype(&swiglu_forward) fwd, const char* bwd_name,
                               decltype(&swiglu_backward) bwd) {
        m.def(
            fwd_name,
            [fwd](DeviceArray& out, const DeviceArray& gate_up) {
                std::vector<int64_t> half;
                const auto [N, H] = swiglu_dims(gate_up, half);
                check_array(out, "out", gate_up.dtype, half);
                ew_disjoint(out, "out", gate_up, "gate_up");
                py::gil_scoped_release nogil;
                fwd(out.data(), gate_up.data(), N, H, gate_up.dtype);
            },
            arg("out"), arg("gate_up"));
        m.def(
            bwd_name,
            [bwd](DeviceArray& dgate_up, const DeviceArray& dout, const DeviceArray& gate_up) {
                std::vector<int64_t> half;
                const auto [N, H] = swiglu_dims(gate_up, half);
                check_array(dout, "dout", gate_up.dtype, half);
                check_array(dgate_up, "dgate_up", gate_up.dtype, gate_up.shape);
                ew_disjoint(dgate_up, "dgate_up", gate_up, "gate_up");
                ew_disjoint(dgate_up, "dgate_up", dout, "dout");
                py::gil_scoped_release nogil;
                bwd(dgate_up.data(), dout.data(), gate_up.data(), N, H, gate_up.dtype);
            },
            arg("dgate_up"), arg("dout"), arg("gate_up"));
    };
    def_gated("swiglu_forward", swiglu_forward, "swiglu_backward", swiglu_backward);
    def_gated("geglu_forward", geglu_forward, "geglu_backward", geglu_backward);
    def_activation(m, "relu2_forward", relu2_forward, "relu2_backward", relu2_backward);
}
