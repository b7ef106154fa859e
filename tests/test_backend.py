"""The two backends behind the one model (fastllm/backend.py): fastllm.ops and fastllm.cuda expose the same op
functions with the same parameters in the same order (so the two can never drift apart), and the same array
helpers, checked on both devices (tests/backends.py): round trips (float32 and int32 exact, bfloat16 = round to
nearest even like torch), views sharing memory, carve, copies between dtypes, add_, zero sizes, narrowing of
int64/float64 input. Then what only the GPU has: DeviceArray views, reshapes and errors, and DLPack both ways with
torch CUDA tensors (zero-copy, offsets, lifetimes, capsule protocol).

Tests marked `cuda` need a CUDA build and a GPU (or the emulator); a few need only the CUDA build (the DLPack
import errors for CPU tensors) or nothing at all (the signatures, the bf16 reference, the wrappers' TypeErrors)."""

from __future__ import annotations

import ctypes
import gc
import inspect

import numpy as np
import pytest
from reference import bf16_round

import fastllm
from fastllm import _C, backend, cuda, ops

cuda_built = pytest.mark.skipif(not fastllm.info()["cuda_built"], reason="fastllm was built without CUDA")

# the contract of fastllm/backend.py: array helpers, then the ops
ARRAY_FUNCTIONS = ["empty", "zeros", "carve", "view", "to_device", "to_numpy", "copy_", "zero_", "add_",
                   "synchronize", "sum_squares", "global_norm"]
OP_FUNCTIONS = ["matmul_forward", "matmul_backward", "attention_forward", "attention_backward",
                "attention_kv_forward", "softmax_ce", "lmhead_chunk_rows", "lmhead_ce", "layernorm_forward",
                "layernorm_backward", "rmsnorm_forward", "rmsnorm_backward", "rope_forward", "rope_backward",
                "gelu_forward", "gelu_backward", "gelu_erf_forward", "gelu_erf_backward", "swiglu_forward",
                "swiglu_backward", "geglu_forward", "geglu_backward", "relu2_forward", "relu2_backward",
                "residual_forward", "residual_backward",
                "embedding_forward", "embedding_backward", "adamw_step", "gemm"]
# defaults that are the device's own choice: the allocation alignment, the compute dtype of the lm-head scratch
DEVICE_DEFAULTS = {("carve", "align"), ("lmhead_chunk_rows", "dtype")}
# the CPU's precision of the matmuls (bf16 products of fp32 arrays; backend.CpuBf16 binds it), last and optional;
# on the GPU the arrays' dtype is the precision
CPU_ONLY = {("matmul_forward", "dtype"), ("matmul_backward", "dtype"), ("lmhead_ce", "dtype"),
            ("attention_forward", "dtype"), ("attention_backward", "dtype"), ("attention_kv_forward", "dtype"),
            ("gemm", "dtype")}
# the GPU GEMM's fused epilogues (its tests and benchmarks use them; the model's matmul_forward fuses them on both
# devices), last and optional
GPU_ONLY = {("gemm", "bias"), ("gemm", "pre_gelu")}
OP_SUFFIXES = ("_forward", "_backward", "_step", "_ce")

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 37)]


def _values(rng, shape, dtype=np.float32):
    if dtype == np.int32:
        return rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int64).astype(np.int32)
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, size=shape)).astype(np.float32)


def _capsule_name_is(cap, name: bytes) -> bool:
    f = ctypes.pythonapi.PyCapsule_IsValid
    f.restype, f.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    return bool(f(cap, name))


# ---- one interface (no GPU needed) -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARRAY_FUNCTIONS + OP_FUNCTIONS)
def test_ops_and_cuda_have_the_same_signatures(name):
    """Same parameter names, kinds and order, and the same defaults (but the device's own choices); the CPU's own
    parameters come last among the positional ones (before any keyword-only ones), with defaults."""
    a, b = inspect.signature(getattr(ops, name)), inspect.signature(getattr(cuda, name))
    for sig, only in ((a, CPU_ONLY), (b, GPU_ONLY)):
        own = [p for p in sig.parameters.values() if (name, p.name) in only]
        positional = [p for p in sig.parameters.values() if p.kind != p.KEYWORD_ONLY]
        assert positional[len(positional) - len(own):] == own and all(p.default is not p.empty for p in own)
    common = [p for p in a.parameters.values() if (name, p.name) not in CPU_ONLY]
    assert [(p.name, p.kind) for p in common] == \
        [(p.name, p.kind) for p in b.parameters.values() if (name, p.name) not in GPU_ONLY], \
        f"ops.{name}{a} != cuda.{name}{b}"
    for p in common:
        if (name, p.name) not in DEVICE_DEFAULTS:
            assert p.default == b.parameters[p.name].default, f"{name}({p.name}=...): ops {p.default!r}, cuda " \
                f"{b.parameters[p.name].default!r}"


def test_every_op_is_in_both_backends():
    """A new op (a *_forward / *_backward / *_step / *_ce function) in one module must come with its twin and be
    listed here, so the signature test covers it."""
    for mod in (ops, cuda):
        public = {n for n, f in vars(mod).items() if inspect.isfunction(f) and not n.startswith("_")
                  and f.__module__ == mod.__name__}
        new = {n for n in public if n.endswith(OP_SUFFIXES)} - set(OP_FUNCTIONS)
        assert not new, f"{mod.__name__} has ops outside the contract (add them to both and to OP_FUNCTIONS): {new}"
        missing = [n for n in ARRAY_FUNCTIONS + OP_FUNCTIONS if n not in public]
        assert not missing, f"{mod.__name__} lacks {missing}"
    assert ops.IGNORE_INDEX == cuda.IGNORE_INDEX
    assert backend.get("cpu") is ops
    with pytest.raises(ValueError, match="device"):
        backend.get("tpu")


def test_cuda_wrappers_reject_numpy_arrays():
    """fastllm.cuda never copies a host array silently: a numpy array where a DeviceArray is due is a TypeError that
    names the argument, before anything touches a GPU (so this runs on CPU-only builds too)."""
    x = np.zeros((2, 4, 24), np.float32)
    f = np.zeros(8, np.float32)
    calls = [
        (lambda: cuda.matmul_forward(x, x), "inp"),
        (lambda: cuda.matmul_backward(x, x, x), "dout"),
        (lambda: cuda.attention_forward(x, 2), "qkv"),
        (lambda: cuda.attention_backward(x, x, x, x, 2), "qkv"),
        (lambda: cuda.attention_kv_forward(x, x, x, np.zeros(2, np.int32)), "qkv"),
        (lambda: cuda.softmax_ce(x, np.zeros((2, 4), np.int32)), "logits"),
        (lambda: cuda.lmhead_ce(x, x, np.zeros((2, 4), np.int32)), "hidden"),
        (lambda: cuda.layernorm_forward(x, f, f), "x"),
        (lambda: cuda.layernorm_backward(x, x, f, f, f), "x"),
        (lambda: cuda.gelu_forward(x), "x"),
        (lambda: cuda.gelu_backward(x, x), "x"),
        (lambda: cuda.gelu_erf_forward(x), "x"),
        (lambda: cuda.gelu_erf_backward(x, x), "x"),
        (lambda: cuda.residual_forward(x, x), "a"),
        (lambda: cuda.residual_backward(x), "dout"),
        (lambda: cuda.embedding_forward(np.zeros((2, 4), np.int32), x, x), "wte"),
        (lambda: cuda.embedding_backward(x, np.zeros((2, 4), np.int32), x, x), "dwte"),
        (lambda: cuda.adamw_step(f, f, f, f, lr=1e-3, t=1), "params"),
        (lambda: cuda.gemm(f, f), "a"),
        (lambda: cuda.add_(f, f), "dst"),
        (lambda: cuda.sum_squares(f), "x"),
        (lambda: cuda.view(f, 0, (2,)), "x"),
    ]
    for call, name in calls:
        with pytest.raises(TypeError, match=f"{name} must be a fastllm.cuda.DeviceArray"):
            call()


def test_bf16_round_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = _values(rng, (20000,))
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])])
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_round(x).view(np.uint32), want.view(np.uint32))


@cuda_built
def test_from_dlpack_rejects_cpu_tensors_without_gpu():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="CUDA tensor"):
        _C.cuda.from_dlpack(torch.zeros(3))
    with pytest.raises(TypeError, match="CUDA tensor"):
        _C.cuda.from_dlpack(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="__dlpack__"):
        _C.cuda.from_dlpack([1.0, 2.0])
    with pytest.raises(TypeError, match="CUDA"):  # a bare CPU capsule; its destructor still frees the tensor
        _C.cuda.from_dlpack(torch.utils.dlpack.to_dlpack(torch.zeros(3)))


# ---- the array helpers, on both devices ---------------------------------------------------------------------------


@pytest.mark.backends(dtypes=("float32",), variants=False)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_roundtrip_exact(bk, rng, shape, dtype):
    x = _values(rng, shape, dtype)
    a = bk.ops.to_device(x)
    y = bk.get(a)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, x)
    if bk.is_cuda:
        assert a.shape == shape and a.dtype == np.dtype(dtype).name and a.size == x.size and a.ndim == len(shape)
        assert a.nbytes == x.nbytes and a.device == _C.cuda.current_device()


@pytest.mark.backends(dtypes=("float32",), variants=False)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_bf16_rounds_to_nearest_even(bk, rng, shape):
    x = _values(rng, shape)
    a = bk.ops.to_device(x, "bfloat16")
    assert bk.ops.to_numpy(a).dtype == (np.float32 if bk.is_cuda else np.uint16)  # the CPU keeps the bit patterns
    np.testing.assert_array_equal(bk.get(a).view(np.uint32), bf16_round(x).view(np.uint32))


@pytest.mark.backends(dtypes=("float32",), variants=False)
def test_bf16_ties_and_specials(bk):
    x = np.float32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 0.0, -0.0, np.inf, -np.inf,
                    3.3895314e38, 3.4e38, 1e-30, -2.5])
    y = bk.get(bk.ops.to_device(x, "bfloat16"))
    want = bf16_round(x)
    assert want[0] == 1.0 and want[1] == 1 + 2**-6 and want[3] == 1 + 2**-7  # ties to even, above-tie rounds up
    np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32))
    assert np.isnan(bk.get(bk.ops.to_device(np.float32([np.nan]), "bfloat16"))).all()


@pytest.mark.backends(dtypes=("float32",), variants=False)
def test_to_device_narrows_int64_and_float64(bk):
    a = bk.ops.to_device(np.arange(5, dtype=np.int64))
    assert bk.get(a).dtype == np.int32
    np.testing.assert_array_equal(bk.get(a), np.arange(5))
    b = bk.get(bk.ops.to_device(np.array([0.1, 1e10])))
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, np.float32([0.1, 1e10]))
    with pytest.raises(ValueError, match="int32"):
        bk.ops.to_device(np.array([2**40]))


@pytest.mark.backends(dtypes=("float32",), variants=False)
def test_empty_zeros_and_view(bk):
    z = bk.ops.zeros((3, 4), "bfloat16")
    np.testing.assert_array_equal(bk.get(z), np.zeros((3, 4), np.float32))
    assert bk.ops.empty(5, "int32").shape == (5,)
    with pytest.raises(TypeError, match="dtype"):
        bk.ops.empty((2,), "float16")
    x = np.arange(24, dtype=np.float32)
    a = bk.ops.to_device(x)
    v = bk.ops.view(a, 4, (2, 3))
    np.testing.assert_array_equal(bk.get(v), x[4:10].reshape(2, 3))
    bk.ops.zero_(v)  # the view shares a's memory
    want = x.copy()
    want[4:10] = 0
    np.testing.assert_array_equal(bk.get(a), want)
    bk.ops.copy_(bk.ops.view(v, 1, (2,)), np.float32([7, 8]))  # a view of a view: offsets add up
    np.testing.assert_array_equal(bk.get(a)[5:7], [7, 8])
    with pytest.raises(ValueError):
        bk.ops.view(a, 20, (2, 3))


@pytest.mark.backends(dtypes=("float32",), variants=False)
def test_carve(bk):
    """Typed views of one allocation (the model's activations): aligned, disjoint, independent."""
    specs = {"x": ((3, 5), "bfloat16"), "i": ((7,), "int32"), "f": ((2, 3, 4), "float32"), "e": ((0,), "float32")}
    views = bk.ops.carve(specs, align=256)
    for name, (shape, dtype) in specs.items():
        assert views[name].shape == shape
        bk.ops.copy_(views[name], np.full(shape, 3, np.int32 if dtype == "int32" else np.float32))
    for name in ("x", "i", "f"):
        assert (bk.get(views[name]) == 3).all(), name
    ptrs = sorted((v.ptr, v.nbytes) if bk.is_cuda else (v.ctypes.data, v.nbytes) for v in views.values() if v.size)
    assert all(p % 256 == 0 for p, _ in ptrs) or bk.is_cuda  # the CPU aligns absolutely, the GPU within the arena
    assert all(p % 256 == ptrs[0][0] % 256 for p, _ in ptrs)
    assert all(p0 + n0 <= p1 for (p0, n0), (p1, _) in zip(ptrs, ptrs[1:]))  # disjoint


@pytest.mark.backends(dtypes=("float32",), variants=False)
@pytest.mark.parametrize("src_t,dst_t", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32"),
                                         ("bfloat16", "bfloat16"), ("int32", "int32")])
def test_copy_between_dtypes(bk, rng, src_t, dst_t):
    x = _values(rng, (5, 77), np.int32 if src_t == "int32" else np.float32)
    src = bk.ops.to_device(x, src_t)
    dst = bk.ops.empty((5, 77), dst_t)
    bk.ops.copy_(dst, src)
    want = x if src_t == "int32" else bf16_round(x) if "bfloat16" in (src_t, dst_t) else x
    np.testing.assert_array_equal(bk.get(dst), want)
    bk.ops.copy_(dst, x)  # from the host
    np.testing.assert_array_equal(bk.get(dst), bf16_round(x) if dst_t == "bfloat16" else x)


@pytest.mark.parametrize("n", [1, 7, 4096, 100003])
def test_add_(bk, rng, n):
    x, y = _values(rng, (n,)), _values(rng, (n,))
    a, b = bk.put(x), bk.put(y)
    assert bk.ops.add_(a, b) is None
    np.testing.assert_array_equal(bk.get(a), bk.rounded(bk.rounded(x) + bk.rounded(y)))
    np.testing.assert_array_equal(bk.get(b), bk.rounded(y))


@pytest.mark.backends(dtypes=("float32",), variants=False)
@pytest.mark.parametrize("n", [1, 17, 16384 * 5 + 3])  # above the CPU's threshold for threads too
def test_zero_every_element_and_nothing_else(bk, n):
    """zero_ clears every element, NaN and inf included, of each dtype, and nothing outside the array (a view)."""
    for dtype in ["float32", "bfloat16", "int32"]:
        a = bk.ops.to_device(np.full(n + 2, np.nan if dtype != "int32" else 7, np.int32 if dtype == "int32"
                                     else np.float32), dtype)
        inner = bk.ops.view(a, 1, (n,))
        bk.ops.zero_(inner)
        got = bk.get(a)
        assert (got[1:-1] == 0).all(), dtype
        assert (np.isnan(got[[0, -1]]) if dtype != "int32" else got[[0, -1]] == 7).all(), dtype


def test_cpu_zero_strided_view():
    """A numpy view that is not contiguous (the CPU's zero_ takes any array): only its own elements are cleared."""
    x = np.full((40000, 6), np.nan, np.float32)
    ops.zero_(x[:, ::2])
    assert (x[:, ::2] == 0).all() and np.isnan(x[:, 1::2]).all()


@pytest.mark.backends(dtypes=("float32",), variants=False)
def test_zero_sizes(bk):
    for dtype in ["float32", "bfloat16", "int32"]:
        a = bk.ops.empty((0, 5), dtype)
        assert bk.get(a).shape == (0, 5)
        bk.ops.zero_(a)
        bk.ops.copy_(a, np.zeros((0, 5), np.int32 if dtype == "int32" else np.float32))
        bk.ops.copy_(a, bk.ops.empty((0, 5), dtype))
    z = bk.ops.empty((0,))
    bk.ops.add_(z, bk.ops.empty((0,)))
    assert bk.ops.sum_squares(z) == 0.0 and bk.ops.global_norm(z, z) == 0.0


# ---- DeviceArray (the GPU only) ---------------------------------------------------------------------------------


@pytest.mark.cuda
def test_bf16_matches_torch_cuda_conversion(torch_cuda, rng):
    torch = torch_cuda
    x = _values(rng, (4099,))
    t = torch.from_numpy(x).cuda().to(torch.bfloat16)
    np.testing.assert_array_equal(cuda.to_device(x, "bfloat16").numpy(), t.float().cpu().numpy())


@pytest.mark.cuda
def test_device_array_views_and_reshape_share_memory():
    x = np.arange(24, dtype=np.float32)
    a = cuda.to_device(x)
    assert "DeviceArray(shape=(24,), dtype=float32" in repr(a)
    v = a.view(4, (2, 3))
    assert v.shape == (2, 3) and v.ptr == a.ptr + 16
    r = a.reshape((4, 6))
    assert r.ptr == a.ptr
    r.copy_(np.ones((4, 6), np.float32))
    np.testing.assert_array_equal(a.numpy(), np.ones(24, np.float32))
    vv = v.view(1, 2)  # a view of a view: offsets add up
    assert vv.ptr == a.ptr + 20
    vv.copy_(np.float32([7, 8]))
    del a, r  # the views keep the allocation alive
    gc.collect()
    np.testing.assert_array_equal(vv.numpy(), [7, 8])


@pytest.mark.cuda
def test_device_array_view_errors():
    a = cuda.zeros(10)
    with pytest.raises(ValueError, match="does not fit"):
        a.view(8, 3)
    with pytest.raises(ValueError, match="does not fit"):
        a.view(-1, 2)
    with pytest.raises(ValueError, match="cannot reshape"):
        a.reshape((3, 4))
    with pytest.raises(ValueError, match="negative"):
        cuda.empty((2, -1))
    with pytest.raises(ValueError, match="negative"):  # (-1) * (-2) = 2 elements would pass the size check
        a.view(0, (-1, -2))
    with pytest.raises(ValueError, match="negative"):
        cuda.zeros(1).reshape((-1, -1))


@pytest.mark.cuda
def test_device_array_view_as():
    a = cuda.zeros((64,), "float32")
    b = a.view_as(16, (3, 2), "bfloat16")
    assert b.dtype == "bfloat16" and b.shape == (3, 2) and b.ptr == a.ptr + 16
    b.copy_(np.float32([[1, 2], [3, 4], [5, 6]]))
    np.testing.assert_array_equal(b.numpy(), [[1, 2], [3, 4], [5, 6]])
    assert a.numpy()[:4].tolist() == [0, 0, 0, 0] and a.numpy()[7:].max() == 0  # bytes 16..27 only
    with pytest.raises(ValueError, match="multiple of 4"):
        a.view_as(2, (1,), "int32")
    with pytest.raises(ValueError, match="does not fit"):
        a.view_as(248, (4,), "float32")  # 248 + 16 > 256 bytes


@pytest.mark.cuda
def test_device_array_copy_and_add_errors():
    f = cuda.zeros((2, 3))
    with pytest.raises(ValueError, match="cannot copy"):
        f.copy_(cuda.zeros((3, 2)))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        f.copy_(cuda.zeros((2, 3), "int32"))
    with pytest.raises(ValueError, match="cannot copy"):
        f.copy_(np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError):
        f.copy_(np.zeros((2, 3), np.float64))
    with pytest.raises(TypeError, match="int32"):
        f.copy_(np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError, match="float32 or int32"):
        cuda.to_device(np.zeros(3, np.float16))
    a = cuda.zeros((4,))
    with pytest.raises(TypeError, match="src"):
        cuda.add_(a, cuda.zeros((4,), "bfloat16"))
    with pytest.raises(ValueError, match="src"):
        cuda.add_(a, cuda.zeros((5,)))
    with pytest.raises(TypeError, match="dst"):
        cuda.add_(cuda.zeros((4,), "int32"), cuda.zeros((4,), "int32"))
    assert cuda.to_device(np.zeros((3, 0), np.float32)).reshape((0, 7)).shape == (0, 7)


# ---- DLPack -----------------------------------------------------------------------------------------------------

TORCH_DTYPES = ["float32", "bfloat16", "int32"]


def _torch_dtype(torch, name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "int32": torch.int32}[name]


def _torch_rand(torch, shape, name):
    if name == "int32":
        return torch.randint(-1000, 1000, shape, dtype=torch.int32, device="cuda")
    return torch.randn(shape, device="cuda").to(_torch_dtype(torch, name))


def _host(torch, t):
    return t.float().cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5, 7), (2, 3, 64)])
def test_from_dlpack_torch_zero_copy(torch_cuda, dtype, shape):
    torch = torch_cuda
    t = _torch_rand(torch, shape, dtype)
    a = cuda.from_dlpack(t)
    assert a.shape == shape and a.dtype == dtype and a.ptr == t.data_ptr()
    assert a.device == t.device.index
    np.testing.assert_array_equal(a.numpy(), _host(torch, t))
    if dtype != "int32":  # writes through our array are visible to torch
        cuda.add_(a, cuda.from_dlpack(t.clone()))
        cuda.synchronize()
        np.testing.assert_array_equal(_host(torch, t), a.numpy())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_to_torch_zero_copy(torch_cuda, rng, dtype):
    torch = torch_cuda
    x = _values(rng, (6, 9), np.int32 if dtype == "int32" else np.float32)
    a = cuda.to_device(x, dtype)
    t = torch.from_dlpack(a)
    assert t.is_cuda and t.dtype == _torch_dtype(torch, dtype) and tuple(t.shape) == (6, 9)
    assert t.data_ptr() == a.ptr and t.is_contiguous()
    np.testing.assert_array_equal(_host(torch, t), a.numpy())
    t.zero_()  # torch writes are visible to us
    torch.cuda.synchronize()
    np.testing.assert_array_equal(a.numpy(), np.zeros((6, 9)))


@pytest.mark.cuda
def test_dlpack_views_with_offsets(torch_cuda):
    torch = torch_cuda
    base = torch.arange(100, dtype=torch.float32, device="cuda")
    t = base[10:40].view(5, 6)  # storage offset 10
    a = cuda.from_dlpack(t)
    assert a.ptr == t.data_ptr() == base.data_ptr() + 40
    np.testing.assert_array_equal(a.numpy(), np.arange(10, 40, dtype=np.float32).reshape(5, 6))
    # and our views (offset inside one allocation) export their own start
    b = cuda.to_device(np.arange(50, dtype=np.float32)).view(7, (3, 4))
    tb = torch.from_dlpack(b)
    assert tb.data_ptr() == b.ptr
    np.testing.assert_array_equal(tb.cpu().numpy(), np.arange(7, 19, dtype=np.float32).reshape(3, 4))
    bf = cuda.to_device(np.arange(50, dtype=np.float32), "bfloat16").view(3, (5,))
    np.testing.assert_array_equal(torch.from_dlpack(bf).float().cpu().numpy(), np.arange(3, 8))


@pytest.mark.cuda
def test_from_dlpack_layout_and_dtype_errors(torch_cuda):
    torch = torch_cuda
    t = torch.zeros(4, 6, device="cuda")
    with pytest.raises(ValueError, match="row-major"):
        cuda.from_dlpack(t.T)
    with pytest.raises(ValueError, match="row-major"):
        cuda.from_dlpack(t[:, ::2])
    with pytest.raises(ValueError, match="row-major"):
        cuda.from_dlpack(torch.zeros(1, 6, device="cuda").expand(3, 6))
    for bad in [torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]:
        with pytest.raises(TypeError, match="not supported"):
            cuda.from_dlpack(torch.zeros(3, device="cuda", dtype=bad))
    with pytest.raises(TypeError, match="CUDA tensor"):
        cuda.from_dlpack(torch.zeros(3))
    # size-1 axes may have any stride; so may any axis of an empty tensor
    odd = torch.zeros(6, device="cuda").as_strided((1, 6, 1), (100, 1, 7))
    assert cuda.from_dlpack(odd).shape == (1, 6, 1)
    s = torch.zeros(1, 5, device="cuda").as_strided((1, 5), (3, 1))
    assert cuda.from_dlpack(s).shape == (1, 5)


@pytest.mark.cuda
def test_dlpack_capsule_protocol(torch_cuda):
    torch = torch_cuda
    a = cuda.to_device(np.arange(6, dtype=np.float32))
    assert a.__dlpack_device__() == (2, a.device)
    legacy = a.__dlpack__()
    assert _capsule_name_is(legacy, b"dltensor")
    versioned = a.__dlpack__(max_version=(1, 0))
    assert _capsule_name_is(versioned, b"dltensor_versioned")
    old = a.__dlpack__(max_version=(0, 8))
    assert _capsule_name_is(old, b"dltensor")
    del old  # an unconsumed capsule releases its reference through its destructor
    b = cuda.from_dlpack(legacy)  # bare capsules are accepted
    assert b.ptr == a.ptr and _capsule_name_is(legacy, b"used_dltensor")
    with pytest.raises(ValueError, match="consumed only once"):
        cuda.from_dlpack(legacy)
    bv = cuda.from_dlpack(versioned)
    assert bv.ptr == a.ptr and _capsule_name_is(versioned, b"used_dltensor_versioned")
    np.testing.assert_array_equal(bv.numpy(), np.arange(6))
    c = a.__dlpack__(copy=True)
    tc = torch.utils.dlpack.from_dlpack(c)
    assert tc.data_ptr() != a.ptr
    np.testing.assert_array_equal(tc.cpu().numpy(), np.arange(6))
    with pytest.raises(BufferError):
        a.__dlpack__(dl_device=(1, 0))
    side = torch.cuda.Stream()  # a foreign stream: export synchronises first
    t2 = torch.utils.dlpack.from_dlpack(a.__dlpack__(stream=side.cuda_stream))
    np.testing.assert_array_equal(t2.cpu().numpy(), np.arange(6))
    assert cuda.from_dlpack(a).ptr == a.ptr  # a DeviceArray is returned as a view


@pytest.mark.cuda
def test_dlpack_lifetime_producer_deleted_first(torch_cuda, rng):
    torch = torch_cuda
    # torch -> fastllm: the DeviceArray (and its views) keep torch's memory alive
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t = torch.randn(1 << 20, device="cuda")
    want = t.cpu().numpy()
    a = cuda.from_dlpack(t)
    v = a.view(5, (10,))
    del t
    gc.collect()
    assert torch.cuda.memory_allocated() >= before + (4 << 20)
    junk = [torch.randn(1 << 20, device="cuda") for _ in range(4)]  # would reuse freed memory
    np.testing.assert_array_equal(a.numpy(), want)
    del a
    gc.collect()
    np.testing.assert_array_equal(v.numpy(), want[5:15])
    del v  # the last view: torch's deleter runs, the memory goes back to torch
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before + 4 * (4 << 20)
    del junk

    # fastllm -> torch: the torch tensor keeps our allocation alive
    x = _values(rng, (1 << 18,))
    b = cuda.to_device(x)
    tb = torch.from_dlpack(b)
    del b
    gc.collect()
    others = [cuda.to_device(np.full(1 << 18, 7.0, np.float32)) for _ in range(4)]
    np.testing.assert_array_equal(tb.cpu().numpy(), x)
    del others, tb
    gc.collect()
