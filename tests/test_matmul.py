"""matmul forward/backward on every backend (tests/backends.py) against the float64 reference and torch autograd
(awkward shapes, leading dimensions, bias or not, the fused GELU epilogue, accumulation, optional outputs, zero
rows, the deterministic bias gradient), then the GEMM under it on each device: the CPU's blocked GEMM
(fastllm._C.gemm: transposes, alpha/beta, cache blocks) and the GPU's (fastllm.cuda.gemm: transposes, bias, GELU
and accumulate epilogues, the tensor-core kernel against the simple FFMA one, block rasterisation, misaligned
views); bad input on both.

Inputs are rounded to the backend's dtype first; errors are max |got - ref| / max |ref|. Tolerances: float32 2e-5
(fp32 sums of K products; the CPU's GEMM core is checked elementwise with 1e-5 * sqrt(K)); bfloat16 inputs give
fp32 results to 1e-4 (exact products, fp32 sums: dweight, dbias, fp32 outputs) and bf16 results to 1e-2 (one bf16
rounding, 2^-9 relative). Outputs are poisoned with NaN first (every element must be written)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from backends import Backend, assert_rel
from reference import bf16_round

import fastllm
from fastllm import _C, cuda, ops

TOL = {"float32": dict(out=2e-5, dw=2e-5), "bfloat16": dict(out=1e-2, dw=1e-4)}

# (lead, C, OC): N = prod(lead) rows; one row, primes/odd sizes, the CPU's small-M paths (<= 32 rows, in groups of
# 8), C or OC not a multiple of 8 (the GPU's FFMA fallback for bf16), GPT-2 sizes (the largest too slow to emulate)
SHAPES = [((1,), 1, 1), ((7,), 13, 5), ((7,), 5, 3), ((127,), 769, 3), ((33,), 64, 100), ((97,), 131, 61),
          ((3,), 40, 130), ((13,), 50, 37), ((32,), 300, 70), ((2, 37), 64, 48), ((300,), 96, 770), ((2, 3), 16, 8),
          ((300,), 768, 256), pytest.param((256,), 768, 2304, marks=pytest.mark.gpu_scale)]


def gelu64(x):
    return 0.5 * x * (1 + np.tanh(ref.GELU_K * (x + 0.044715 * x**3)))


def make(bk, rng, lead, C, OC):
    inp = bk.rounded(rng.standard_normal((*lead, C)))
    weight = bk.rounded(rng.standard_normal((OC, C)) / np.sqrt(C))
    bias = bk.rounded(rng.standard_normal(OC))
    dout = bk.rounded(rng.standard_normal((*lead, OC)))
    return inp, weight, bias, dout


@pytest.mark.parametrize("lead,C,OC", SHAPES, ids=str)
@pytest.mark.parametrize("epilogue", ["none", "bias", "gelu"])
def test_matmul_matches_reference(bk, rng, lead, C, OC, epilogue):
    N = int(np.prod(lead))
    if bk.variant == "scalar" and N * C * OC > 10**7:
        pytest.skip("large shape only on the vector paths (keeps the suite quick)")
    tol = TOL[bk.dtype]
    inp, weight, bias, dout = make(bk, rng, lead, C, OC)
    x, w = bk.put(inp), bk.put(weight)
    b = bk.put(bias) if epilogue != "none" else None
    out = bk.poisoned((*lead, OC))  # the forward overwrites: garbage in `out` must not leak
    pre = bk.poisoned((*lead, OC)) if epilogue == "gelu" else None
    assert bk.ops.matmul_forward(x, w, b, out=out, pre_gelu=pre) is out
    prod = ref.matmul_forward(inp.reshape(N, C), weight, bias if epilogue != "none" else None).reshape(*lead, OC)
    if epilogue == "gelu":
        assert_rel(bk.get(pre), prod, tol["out"], "pre_gelu")
        prod = gelu64(prod)
    assert_rel(bk.get(out), prod, tol["out"], "out")
    # the gradients accumulate (+=) into non-zero buffers
    r_dinp, r_dw, r_db = ref.matmul_backward(dout.reshape(N, OC), inp.reshape(N, C), weight)
    dinp0 = bk.rounded(rng.standard_normal(inp.shape))
    dw0, db0 = rng.standard_normal((OC, C)).astype(np.float32), rng.standard_normal(OC).astype(np.float32)
    dinp, dw, db = bk.put(dinp0), bk.put(dw0, "float32"), bk.put(db0, "float32")
    got = bk.ops.matmul_backward(bk.put(dout), x, w, dinp=dinp, dweight=dw, dbias=db)
    assert got[0] is dinp and got[1] is dw and got[2] is db
    assert_rel(bk.get(dinp), dinp0 + r_dinp.reshape(inp.shape), tol["out"], "dinp")
    assert_rel(bk.get(dw), dw0 + r_dw, tol["dw"], "dweight")
    assert_rel(bk.get(db), db0 + r_db, tol["dw"], "dbias")


@pytest.mark.backends(variants=("cpu",))
def test_matmul_backward_accumulates_and_optional_outputs(bk, rng):
    """Two backward calls add twice; need_dinp / need_bias skip those gradients, the others are still right."""
    tol = TOL[bk.dtype]
    inp, weight, _, dout = make(bk, rng, (45,), 70, 33)
    r_dinp, r_dw, r_db = ref.matmul_backward(dout, inp, weight)
    x, w, dy = bk.put(inp), bk.put(weight), bk.put(dout)
    dinp0 = bk.rounded(rng.standard_normal(inp.shape))
    dinp = bk.put(dinp0)
    for _ in range(2):
        bk.ops.matmul_backward(dy, x, w, dinp=dinp)
    assert_rel(bk.get(dinp), dinp0 + 2 * r_dinp, tol["out"], "dinp after two calls")
    none_dinp, dw, none_db = bk.ops.matmul_backward(dy, x, w, need_dinp=False, need_bias=False)
    assert none_dinp is None and none_db is None
    assert_rel(bk.get(dw), r_dw, tol["dw"], "dweight alone")
    none_dinp, dw, db = bk.ops.matmul_backward(dy, x, w, need_dinp=False)
    assert none_dinp is None
    assert_rel(bk.get(db), r_db, tol["dw"], "dbias without dinp")
    dinp = bk.put(dinp0)
    _, none_dw, none_db = bk.ops.matmul_backward(dy, x, w, dinp=dinp, need_weight=False, need_bias=False)  # frozen
    assert none_dw is None and none_db is None
    assert_rel(bk.get(dinp), dinp0 + r_dinp, tol["out"], "dinp of a frozen weight")


@pytest.mark.backends(variants=("cpu",))
def test_matmul_zero_rows(bk, rng):
    """N = 0: nothing to do, the weight's gradients stay as they were."""
    x, w = bk.ops.empty((0, 8), bk.dtype), bk.put(rng.standard_normal((4, 8)))
    assert bk.ops.matmul_forward(x, w).shape == (0, 4)
    dw, db = bk.put(np.ones((4, 8)), "float32"), bk.put(np.ones(4), "float32")
    bk.ops.matmul_backward(bk.ops.empty((0, 4), bk.dtype), x, w, dweight=dw, dbias=db)
    assert (bk.get(dw) == 1).all() and (bk.get(db) == 1).all()


@pytest.mark.backends(variants=False)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (13, 3, 37), (130, 17, 5), (64, 96, 200)], ids=str)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_alpha_accumulate(bk, rng, M, N, K, trans_a, trans_b):
    """The backend's gemm (the same call on both devices; the model's LoRA products): c = [c +] alpha op(a) op(b),
    c float32 or the backend's dtype, against float64."""
    a = bk.rounded(rng.standard_normal((K, M) if trans_a else (M, K)))
    b = bk.rounded(rng.standard_normal((N, K) if trans_b else (K, N)))
    c0 = bk.rounded(rng.standard_normal((M, N)))
    prod = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    tol = TOL[bk.dtype]["dw"] * 20
    for c_dtype in {"float32", bk.dtype}:  # (a gradient in float32 from bf16 activations, on the GPU)
        c = bk.put(c0, c_dtype)
        assert bk.ops.gemm(bk.put(a), bk.put(b), trans_a, trans_b, alpha=-0.75, accumulate=True, out=c) is c
        assert_rel(bk.get(c), c0 - 0.75 * prod, tol if c_dtype == "float32" else TOL[bk.dtype]["out"] * 2)
        c = bk.poisoned((M, N), c_dtype)
        bk.ops.gemm(bk.put(a), bk.put(b), trans_a=trans_a, trans_b=trans_b, alpha=2.0, out=c)  # overwrites
        assert_rel(bk.get(c), 2.0 * prod, tol if c_dtype == "float32" else TOL[bk.dtype]["out"] * 2)


@pytest.mark.parametrize("M,N", [(1, 1), (64, 50257), (5000, 3), (16384, 40), (300, 2304)], ids=str)
def test_bias_backward_deterministic(bk, rng, M, N):
    """dbias: the GPU's one-pass and two-pass (partial sums over row slices) paths; bitwise repeatable."""
    dout = bk.rounded(rng.standard_normal((M, N)))
    dy, x, w = bk.put(dout), bk.zeros((M, 1)), bk.zeros((N, 1))
    runs = [bk.get(bk.ops.matmul_backward(dy, x, w, need_dinp=False)[2]) for _ in range(2)]
    assert_rel(runs[0], dout.sum(0, dtype=np.float64), 1e-4 if bk.dtype == "bfloat16" else 2e-5, "dbias")
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.backends(variants=False)
@pytest.mark.parametrize("lead,C,OC", [((1,), 1, 1), ((7,), 13, 5), ((2, 37), 64, 48), ((64,), 96, 288)], ids=str)
def test_matmul_vs_torch(bk, rng, lead, C, OC):
    torch = pytest.importorskip("torch")
    tol = TOL[bk.dtype]
    inp, weight, bias, dout = make(bk, rng, lead, C, OC)
    ti, tw, tb = (torch.tensor(a, requires_grad=True) for a in (inp, weight, bias))
    tout = torch.nn.functional.linear(ti, tw, tb)
    tout.backward(torch.tensor(dout))
    x, w = bk.put(inp), bk.put(weight)
    assert_rel(bk.get(bk.ops.matmul_forward(x, w, bk.put(bias))), tout.detach().numpy(), tol["out"], "out")
    dinp, dw, db = bk.ops.matmul_backward(bk.put(dout), x, w)
    assert_rel(bk.get(dinp), ti.grad.numpy(), tol["out"], "dinp")
    assert_rel(bk.get(dw), tw.grad.numpy(), tol["dw"], "dweight")
    assert_rel(bk.get(db), tb.grad.numpy(), tol["dw"], "dbias")


def tol(K: int) -> dict:
    """CPU GEMM core, fp32 inputs of unit scale: |err| <= atol + rtol*|ref|, both 1e-5 * sqrt(K) (+1e-6 rtol)."""
    s = 1e-5 * np.sqrt(max(K, 1))
    return dict(rtol=s + 1e-6, atol=s)



# ---- the CPU's GEMM core (fastllm._C.gemm): every transpose, alpha/beta, shapes crossing the cache blocks


# (M, N, K); (20, 4200, 9) and (2700, 20, 9) are split into several dynamically scheduled chunks per thread
# (2 threads); M <= 32 with trans_b takes the unpacked small-M path (a single-stream dot product per column for
# 1 row, 4x4 steps for <= 4 rows, 8x3 for more, in groups of 8 rows)
GEMM_SHAPES = [
    (1, 1, 1),
    (1, 333, 235),  # one row: 64-wide steps, then two 16-wide, then a masked K tail
    (21, 70, 45),  # three row groups (8 + 8 + 5)
    (15, 33, 17),
    (29, 47, 1000),
    (350, 70, 41),
    (37, 3100, 19),
    (20, 4200, 9),
    (2700, 20, 9),
    (3, 2000, 50),
    (6, 1001, 77),  # 8x3 small-M steps with a last partial column step and a K tail
]


@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "trans", [(False, False), (False, True), (True, False), (True, True)], ids=["NN", "NT", "TN", "TT"]
)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)])
def test_cpu_gemm(mnk, trans, alpha, beta, threads, rng):
    M, N, K = mnk
    ta, tb = trans
    a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
    c0 = rng.standard_normal((M, N), dtype=np.float32)
    c = np.full((M, N), np.nan, np.float32) if beta == 0 else c0.copy()  # beta 0: c must not be read
    _C.gemm(c, a, b, ta, tb, alpha, beta)
    opa = a.T.astype(np.float64) if ta else a.astype(np.float64)
    opb = b.T.astype(np.float64) if tb else b.astype(np.float64)
    expect = alpha * (opa @ opb) + (beta * c0 if beta else 0)
    t = tol(K)
    np.testing.assert_allclose(c, expect, rtol=t["rtol"], atol=t["atol"] * max(1.0, abs(alpha)) + 1e-6)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "trans", [(False, False), (False, True), (True, False), (True, True)], ids=["NN", "NT", "TN", "TT"]
)
def test_cpu_gemm_thread_counts_agree(simd_bf16, bf16, trans, rng):
    """Split by rows, the threads share op(B): it is packed once, each thread a run of its panels, where one thread
    packs it block by block. The same panels and the same sums: bit for bit at 1, 2 and 3 threads (K odd and across
    the K block, N off the panels), and within the GEMM's tolerance of float64."""
    M, N, K = 700, 45, 1601
    ta, tb = trans
    a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
    outs = []
    old = fastllm.get_num_threads()
    try:
        for threads in (1, 2, 3):
            fastllm.set_num_threads(threads)
            c = np.full((M, N), np.nan, np.float32)
            _C.gemm(c, a, b, ta, tb, bf16=bf16)
            outs.append(c)
    finally:
        fastllm.set_num_threads(old)
    for c in outs[1:]:
        np.testing.assert_array_equal(c, outs[0])
    if not bf16:
        expect = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
        np.testing.assert_allclose(outs[0], expect, **tol(K))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N,C,OC", [(1601, 45, 700), (1601, 3000, 20), (3, 5, 7)], ids=str)
def test_cpu_dbias_from_the_dweight_gemm(simd_bf16, dtype, N, C, OC, rng):
    """With dweight, dbias comes from the dweight GEMM (row sums of each block of dout^T as it is packed): every
    row once, whatever the thread grid (rows or columns split: C = 3000, OC = 20) and K blocks (N = 1601), bit for bit
    at 1, 2 and 3 threads, and the fp32 column sums of dout (float64 reference) in both precisions."""
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    x, w = rng.standard_normal((N, C), dtype=np.float32), rng.standard_normal((OC, C), dtype=np.float32)
    db0 = rng.standard_normal(OC).astype(np.float32)
    outs = []
    old = fastllm.get_num_threads()
    try:
        for threads in (1, 2, 3):
            fastllm.set_num_threads(threads)
            db = db0.copy()
            ops.matmul_backward(dout, x, w, dbias=db, need_dinp=False, dtype=dtype)
            outs.append(db)
    finally:
        fastllm.set_num_threads(old)
    for db in outs[1:]:
        np.testing.assert_array_equal(db, outs[0])
    np.testing.assert_allclose(outs[0], db0 + dout.sum(0, dtype=np.float64), rtol=0, atol=2e-6 * N)


def test_cpu_gemm_simd_levels(simd, rng):
    """Edge tiles in both M and N and a K crossing the K block, on each micro-kernel."""
    a = rng.standard_normal((53, 1100), dtype=np.float32)
    b = rng.standard_normal((1100, 77), dtype=np.float32)
    c = np.ones((53, 77), np.float32)
    _C.gemm(c, a, b, False, False, 1.0, 1.0)
    np.testing.assert_allclose(c, 1 + a.astype(np.float64) @ b, **tol(1100))


def test_cpu_gemm_bad_input(rng):
    a = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="inner dimension"):
        _C.gemm(np.zeros((4, 3), np.float32), a, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        _C.gemm(np.zeros((4, 4), np.float32), a, np.zeros((5, 3), np.float32))
    with pytest.raises(TypeError, match="b"):
        _C.gemm(np.zeros((4, 3), np.float32), a, np.zeros((5, 3)))


# ---- the GPU's GEMM (fastllm.cuda.gemm): every transpose, the epilogues, tensor cores vs the FFMA kernel

GEMM_TOL = {("float32", "float32"): 2e-5, ("bfloat16", "float32"): 1e-4, ("bfloat16", "bfloat16"): 1e-2}
TRANS = [(False, False), (False, True), (True, False), (True, True)]
TRANS_IDS = ["nn", "nt", "tn", "tt"]


def run_cuda_gemm(rng, M, N, K, trans_a, trans_b, ab, ct, epilogue, impl=None):
    """cuda.gemm once -> (c, pre_gelu or None, reference c, reference pre_gelu or None), float64 references of the
    operands as the GPU holds them."""
    bk = Backend("cuda", ab)
    a = bk.rounded(rng.standard_normal((K, M) if trans_a else (M, K)))
    b = bk.rounded(rng.standard_normal((N, K) if trans_b else (K, N)) / np.sqrt(max(K, 1)))
    prod = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    bias = pre = ref_pre = None
    if epilogue in ("bias", "gelu", "accumulate"):
        bias64 = bk.rounded(rng.standard_normal(N))
        bias, prod = bk.put(bias64), prod + bias64
    if epilogue == "accumulate":
        c0 = bk.rounded(rng.standard_normal((M, N)), ct)
        c, want = bk.put(c0, ct), c0 + prod
    else:
        c, want = bk.poisoned((M, N), ct), prod
    if epilogue == "gelu":
        pre = bk.poisoned((M, N), ct)
        ref_pre, want = prod, gelu64(prod)
    old = cuda.gemm_impl(impl) if impl else None
    try:
        cuda.gemm(bk.put(a), bk.put(b), trans_a=trans_a, trans_b=trans_b, accumulate=epilogue == "accumulate",
                  bias=bias, pre_gelu=pre, out=c)
    finally:
        if old:
            cuda.gemm_impl(old)
    return bk.get(c), None if pre is None else bk.get(pre), want, ref_pre


DTYPES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (127, 129, 65), (300, 770, 96), (264, 200, 136)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}->{d[1]}")
@pytest.mark.parametrize("epilogue", ["none", "bias", "gelu", "accumulate"])
def test_cuda_gemm(rng, shape, trans, dtypes, epilogue):
    c, pre, want, want_pre = run_cuda_gemm(rng, *shape, *trans, *dtypes, epilogue)
    assert_rel(c, want, GEMM_TOL[dtypes], "c")
    if want_pre is not None:
        assert_rel(pre, want_pre, GEMM_TOL[dtypes], "pre_gelu")


@pytest.mark.cuda
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("dtypes", DTYPES[1:], ids=lambda d: f"{d[0]}->{d[1]}")
def test_cuda_gemm_gpt_shape(rng, trans, dtypes):
    """1024 x 2304 x 768 (the qkv projection of GPT-2 small on 1024 tokens) with the GELU epilogue."""
    c, pre, want, want_pre = run_cuda_gemm(rng, 1024, 2304, 768, *trans, *dtypes, "gelu")
    assert_rel(c, want, GEMM_TOL[dtypes], "c")
    assert_rel(pre, want_pre, GEMM_TOL[dtypes], "pre_gelu")


# shapes where every operand row is a multiple of 8 elements (the tensor-core kernel runs), with M, N, K below, at
# and above the 128 x 128 x 32 block tile and its 4-stage pipeline; 1160 x 264: 10 x 3 block tiles, two groups of
# 8 block-rows (the rasterisation), the second one partial
FAST_SHAPES = [(8, 8, 8), (128, 128, 32), (136, 264, 40), (264, 200, 136), (520, 392, 1000), (1160, 264, 8),
               pytest.param((1024, 768, 3072), marks=pytest.mark.gpu_scale)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", FAST_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("ct", ["float32", "bfloat16"])
@pytest.mark.parametrize("epilogue", ["gelu", "accumulate"])
@pytest.mark.parametrize("impl", ["auto", "tc1"])
def test_cuda_gemm_tensor_cores_vs_simple(shape, trans, ct, epilogue, impl):
    M, N, K = shape
    assert M % 8 == 0 and N % 8 == 0 and K % 8 == 0  # tensor cores for every transpose
    fast = run_cuda_gemm(np.random.default_rng(7), M, N, K, *trans, "bfloat16", ct, epilogue, impl=impl)
    slow = run_cuda_gemm(np.random.default_rng(7), M, N, K, *trans, "bfloat16", ct, epilogue, impl="simple")
    # same bf16 products, fp32 sums in another order; bf16 outputs may differ by one rounding
    tol = 1e-5 if ct == "float32" else 1e-2
    assert_rel(fast[0], slow[0], tol, "tensor cores vs simple: c")
    assert_rel(fast[0], fast[2], GEMM_TOL[("bfloat16", ct)], "tensor cores: c vs float64")
    if fast[1] is not None:
        assert_rel(fast[1], slow[1], tol, "tensor cores vs simple: pre_gelu")


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [1, 8], ids=["misaligned", "aligned"])
def test_cuda_gemm_views(rng, offset):
    """Operands that are views into a larger buffer: offset 1 (2 bytes: the FFMA fallback) or 8 (16 bytes)."""
    M, N, K = 136, 72, 64
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((N, K)).astype(np.float32)
    base = cuda.to_device(np.concatenate([np.zeros(offset, np.float32), a.ravel(), b.ravel()]), "bfloat16")
    c = cuda.to_device(np.full((M, N), np.nan, np.float32))
    cuda.gemm(base.view(offset, (M, K)), base.view(offset + M * K, (N, K)), trans_b=True, out=c)
    want = bf16_round(a).astype(np.float64) @ bf16_round(b).astype(np.float64).T
    assert_rel(c.numpy(), want, GEMM_TOL[("bfloat16", "float32")], "c")


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_matmul_bad_dtype_cpu(rng):
    inp = rng.standard_normal((4, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(TypeError, match="weight"):
        _C.matmul_forward(out, inp, np.zeros((3, 8)), None)  # float64
    with pytest.raises(TypeError, match="inp"):
        _C.matmul_forward(out, inp.astype(np.float64), np.zeros((3, 8), np.float32), None)


def test_matmul_bad_shapes_cpu(rng):
    inp = rng.standard_normal((4, 8), dtype=np.float32)
    weight = rng.standard_normal((3, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(ValueError, match="weight"):
        _C.matmul_forward(out, inp, weight[:, :7].copy(), None)  # C mismatch
    with pytest.raises(ValueError, match="bias"):
        _C.matmul_forward(out, inp, weight, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="out"):
        _C.matmul_forward(np.empty((4, 4), np.float32), inp, weight, None)
    with pytest.raises(ValueError, match="inp"):
        _C.matmul_forward(out, inp.reshape(-1), weight, None)
    dout = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="dweight"):
        _C.matmul_backward(None, np.zeros((8, 3), np.float32), None, dout, inp, weight)
    with pytest.raises(ValueError, match="dout"):
        _C.matmul_backward(
            np.zeros((4, 8), np.float32), None, None, np.zeros((3, 4), np.float32), inp, weight
        )
    with pytest.raises(ValueError, match="dinp"):
        _C.matmul_backward(np.zeros((4, 7), np.float32), None, None, dout, inp, weight)


def test_matmul_non_contiguous_cpu(rng):
    inp = rng.standard_normal((4, 16), dtype=np.float32)
    weight = rng.standard_normal((3, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(ValueError, match="contiguous"):
        _C.matmul_forward(out, inp[:, ::2], weight, None)
    with pytest.raises(ValueError, match="contiguous"):
        _C.matmul_forward(np.empty((3, 4), np.float32).T, inp[:, :8].copy(), weight, None)


def test_matmul_output_overlapping_an_input_is_refused_cpu(rng):
    """out=inp used to return wrong numbers (the kernel reads inp while writing out); any overlap is refused."""
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="out overlaps inp"):
        ops.matmul_forward(x, w, out=x)
    with pytest.raises(ValueError, match="out overlaps weight"):
        ops.matmul_forward(x, w, out=w[2:6])
    buf = np.zeros(40, np.float32)
    with pytest.raises(ValueError, match="out overlaps inp"):  # partial overlap
        _C.matmul_forward(buf[8:40].reshape(4, 8), buf[:32].reshape(4, 8), w, None)
    with pytest.raises(ValueError, match="dinp overlaps dout"):
        ops.matmul_backward(x, x, w, dinp=x)
    with pytest.raises(ValueError, match="dweight overlaps dbias"):
        _C.matmul_backward(None, buf[:32].reshape(4, 8), buf[28:32], np.zeros((4, 4), np.float32), x,
                           w[:4].copy())
    with pytest.raises(ValueError, match="out overlaps a"):
        _C.gemm(buf[:16].reshape(4, 4), buf[:16].reshape(4, 4), np.zeros((4, 4), np.float32))
    np.testing.assert_allclose(ops.matmul_forward(x, w), x @ w.T, rtol=1e-5, atol=1e-5)  # separate out: fine


def test_matmul_zero_sizes_cpu(rng):
    """Zero rows are an empty batch; zero columns (C) or output channels (OC) are refused, naming them (they
    used to fail in numpy's reshape with 'cannot reshape array of size 0')."""
    x = rng.standard_normal((4, 8), dtype=np.float32)
    assert ops.matmul_forward(np.zeros((0, 8), np.float32), np.zeros((3, 8), np.float32)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"OC \(weight rows\) must be >= 1"):
        ops.matmul_forward(x, np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match=r"C \(inp columns\) must be >= 1"):
        ops.matmul_forward(np.zeros((4, 0), np.float32), np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"C \(inp columns\)"):
        ops.matmul_backward(np.zeros((4, 3), np.float32), np.zeros((4, 0), np.float32),
                            np.zeros((3, 0), np.float32))


def test_matmul_arguments_of_the_wrong_kind_are_named_cpu(rng):
    """A list, None or an integer past 64 bits gives an error naming the argument, not pybind11's
    'incompatible function arguments' listing every argument (whole arrays included)."""
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((3, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    for args, kind, name in [((out, x, w.tolist(), None), TypeError, "weight"),
                             ((out, None, w, None), TypeError, "inp"),
                             ((out, x, w, [0.0, 0.0, 0.0]), TypeError, "bias")]:
        with pytest.raises(kind, match=name) as e:
            _C.matmul_forward(*args)
        assert "Invoked with" not in str(e.value)
    with pytest.raises(ValueError, match="alpha"):
        _C.gemm(np.zeros((4, 4), np.float32), x, x, False, True, 10**400, 0.0)
    with pytest.raises(TypeError, match="beta"):
        _C.gemm(np.zeros((4, 4), np.float32), x, x, False, True, 1.0, "0")


def test_matmul_strided_output_is_refused_not_copied_cpu(rng):
    """A strided 3-D out cannot be viewed as (N, OC): it used to be copied silently by reshape, the kernel
    filled the copy and out kept its old values."""
    x = rng.standard_normal((2, 3, 8), dtype=np.float32)
    w = rng.standard_normal((4, 8), dtype=np.float32)
    out = np.zeros((3, 2, 4), np.float32).transpose(1, 0, 2)  # (2, 3, 4), not viewable as (6, 4)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        ops.matmul_forward(x, w, out=out)
    mean = np.zeros((6, 2), np.float32)[:, 0]  # a strided (6,) buffer for layernorm's mean
    with pytest.raises(ValueError, match="mean must be C-contiguous"):
        ops.layernorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32), mean=mean.reshape(2, 3))


@pytest.mark.cuda
def test_cuda_gemm_bad_input():
    a = cuda.zeros((4, 8), "bfloat16")
    b = cuda.zeros((8, 6), "bfloat16")
    c = cuda.zeros((4, 6))
    with pytest.raises(TypeError, match="b must have dtype bfloat16"):
        cuda.gemm(a, cuda.zeros((8, 6)), out=c)
    with pytest.raises(TypeError, match="out must be float32 or"):
        cuda.gemm(a, b, out=cuda.zeros((4, 6), "int32"))
    with pytest.raises(TypeError, match="out must be float32 or"):
        cuda.gemm(cuda.zeros((4, 8)), cuda.zeros((8, 6)), out=cuda.zeros((4, 6), "bfloat16"))
    with pytest.raises(TypeError, match="a must be float32 or bfloat16"):
        cuda.gemm(cuda.zeros((4, 8), "int32"), b, out=c)
    with pytest.raises(ValueError, match="b must have shape"):
        cuda.gemm(a, cuda.zeros((7, 6), "bfloat16"), out=c)
    with pytest.raises(ValueError, match="b must have shape"):
        cuda.gemm(a, b, trans_b=True, out=c)
    with pytest.raises(ValueError, match="a must have shape"):
        cuda.gemm(a, b, trans_a=True, out=c)
    with pytest.raises(ValueError, match="a must be 2-D"):
        cuda.gemm(cuda.zeros((8,), "bfloat16"), b, out=c)
    with pytest.raises(ValueError, match="bias must have shape"):
        cuda.gemm(a, b, bias=cuda.zeros((5,), "bfloat16"), out=c)
    with pytest.raises(TypeError, match="bias must have dtype"):
        cuda.gemm(a, b, bias=cuda.zeros((6,)), out=c)
    with pytest.raises(ValueError, match="pre_gelu must have shape"):
        cuda.gemm(a, b, pre_gelu=cuda.zeros((6, 4)), out=c)
    with pytest.raises(TypeError, match="pre_gelu must have dtype"):
        cuda.gemm(a, b, pre_gelu=cuda.zeros((4, 6), "bfloat16"), out=c)
    with pytest.raises(ValueError, match="accumulate"):
        cuda.gemm(a, b, accumulate=True, pre_gelu=cuda.zeros((4, 6)), out=c)
    sq = cuda.zeros((8, 8), "bfloat16")
    with pytest.raises(ValueError, match="out must not overlap a"):
        cuda.gemm(sq, cuda.zeros((8, 8), "bfloat16"), out=sq)
    buf = cuda.zeros((64,), "bfloat16")
    with pytest.raises(ValueError, match="out must not overlap b"):
        cuda.gemm(cuda.zeros((4, 4), "bfloat16"), buf.view(8, (4, 4)), out=buf.view(0, (4, 4)))
    with pytest.raises(ValueError, match="pre_gelu must not overlap out"):
        cuda.gemm(cuda.zeros((4, 4), "bfloat16"), cuda.zeros((4, 4), "bfloat16"),
                  pre_gelu=buf.view(8, (4, 4)), out=buf.view(0, (4, 4)))
    with pytest.raises(ValueError, match="must be 'auto', 'simple' or 'tc1'"):
        cuda.gemm_impl("cublas")


@pytest.mark.cuda
def test_cuda_matmul_bad_input():
    x = cuda.zeros((5, 4), "bfloat16")
    w = cuda.zeros((3, 4), "bfloat16")
    dy = cuda.zeros((5, 3), "bfloat16")
    with pytest.raises(TypeError, match="weight must have dtype bfloat16"):
        cuda.matmul_forward(x, cuda.zeros((3, 4)))
    with pytest.raises(ValueError, match="weight"):
        cuda.matmul_forward(x, cuda.zeros((3, 5), "bfloat16"))
    with pytest.raises(ValueError, match="bias"):
        cuda.matmul_forward(x, w, cuda.zeros((4,), "bfloat16"))
    with pytest.raises(ValueError, match="out"):
        cuda.matmul_forward(x, w, out=cuda.zeros((5, 4), "bfloat16"))
    with pytest.raises(TypeError, match="weight must have dtype bfloat16"):
        cuda.matmul_backward(dy, x, cuda.zeros((3, 4)))
    with pytest.raises(TypeError, match="weight must have dtype float32"):  # inp's dtype rules
        cuda.matmul_backward(dy, cuda.zeros((5, 4)), w)
    with pytest.raises(ValueError, match="dout must be"):
        cuda.matmul_backward(cuda.zeros((5, 2), "bfloat16"), x, w)
    with pytest.raises(ValueError, match="dout must be .* rows like inp"):
        cuda.matmul_backward(dy, cuda.zeros((6, 4), "bfloat16"), w)
    with pytest.raises(TypeError, match="dweight must have dtype float32"):
        cuda.matmul_backward(dy, x, w, dweight=cuda.zeros((3, 4), "bfloat16"))
    with pytest.raises(ValueError, match="dweight must have shape"):
        cuda.matmul_backward(dy, x, w, dweight=cuda.zeros((4, 3)))
    with pytest.raises(ValueError, match="dbias must have shape"):
        cuda.matmul_backward(dy, x, w, dbias=cuda.zeros((4,)))
    with pytest.raises(ValueError, match="dinp must have shape"):
        cuda.matmul_backward(dy, x, w, dinp=cuda.zeros((5, 3), "bfloat16"))
    x3, w3 = cuda.zeros((5, 3), "bfloat16"), cuda.zeros((3, 3), "bfloat16")
    with pytest.raises(ValueError, match="dinp must not overlap dout"):
        cuda.matmul_backward(dy, x3, w3, dinp=dy.reshape((5, 3)))
