"""fastllm.cuda device arrays: host round trips (float32 exact, bfloat16 = round to nearest even like torch,
int32 exact), views and reshapes sharing memory, copy_ between dtypes, add_, sum_squares, zero sizes, errors, and
DLPack both ways with torch CUDA tensors (zero-copy, offsets, lifetimes, capsule protocol).

GPU tests are marked `cuda` (skipped without a CUDA build and a GPU). A few need only the CUDA build (the
DLPack import errors for CPU tensors) or nothing at all (the bf16 reference, the wrappers' TypeErrors).
Tolerances: copies and conversions are exact; sum_squares accumulates fp32 per block then double: rtol 1e-6."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest
from reference import bf16_round

import fastllm
from fastllm import _C, cuda

cuda_built = pytest.mark.skipif(not fastllm.info()["cuda_built"], reason="fastllm was built without CUDA")

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 37)]


def _values(rng, shape, dtype=np.float32):
    if dtype == np.int32:
        return rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int64).astype(np.int32)
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, size=shape)).astype(np.float32)


def _capsule_name_is(cap, name: bytes) -> bool:
    f = ctypes.pythonapi.PyCapsule_IsValid
    f.restype, f.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    return bool(f(cap, name))


# ---- no GPU needed -------------------------------------------------------------------------------------------


def test_bf16_round_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = _values(rng, (20000,))
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])])
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_round(x).view(np.uint32), want.view(np.uint32))


def test_wrappers_reject_numpy_arrays():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="dst must be a fastllm.cuda.DeviceArray"):
        cuda.add_(x, x)
    with pytest.raises(TypeError, match="x must be a fastllm.cuda.DeviceArray"):
        cuda.sum_squares(x)


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


# ---- host round trips ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_roundtrip_exact(rng, shape, dtype):
    x = _values(rng, shape, dtype)
    a = cuda.to_device(x)
    assert a.shape == shape and a.dtype == np.dtype(dtype).name and a.size == x.size and a.ndim == len(shape)
    assert a.nbytes == x.nbytes and a.device == _C.cuda.current_device()
    y = a.numpy()
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, x)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_bf16_rounds_to_nearest_even(rng, shape):
    x = _values(rng, shape)
    a = cuda.to_device(x, "bfloat16")
    assert a.dtype == "bfloat16" and a.nbytes == 2 * x.size
    y = a.numpy()
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y.view(np.uint32), bf16_round(x).view(np.uint32))


@pytest.mark.cuda
def test_bf16_ties_and_specials():
    x = np.float32(
        [
            1 + 2**-8,
            1 + 3 * 2**-8,
            -(1 + 2**-8),
            1 + 2**-8 + 2**-20,
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            3.3895314e38,
            3.4e38,
            1e-30,
            -2.5,
        ]
    )
    y = cuda.to_device(x, "bfloat16").numpy()
    want = bf16_round(x)
    assert want[0] == 1.0 and want[1] == 1 + 2**-6 and want[3] == 1 + 2**-7  # ties to even, above-tie rounds up
    np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32))
    nan = cuda.to_device(np.float32([np.nan]), "bfloat16").numpy()
    assert np.isnan(nan).all()


@pytest.mark.cuda
def test_bf16_matches_torch_cuda_conversion(torch_cuda, rng):
    torch = torch_cuda
    x = _values(rng, (4099,))
    t = torch.from_numpy(x).cuda().to(torch.bfloat16)
    mine = cuda.to_device(x, "bfloat16")
    np.testing.assert_array_equal(mine.numpy(), t.float().cpu().numpy())


@pytest.mark.cuda
def test_to_device_narrows_int64_and_float64(rng):
    a = cuda.to_device(np.arange(5, dtype=np.int64))
    assert a.dtype == "int32"
    np.testing.assert_array_equal(a.numpy(), np.arange(5))
    b = cuda.to_device(np.array([0.1, 1e10]))
    assert b.dtype == "float32"
    np.testing.assert_array_equal(b.numpy(), np.float32([0.1, 1e10]))
    with pytest.raises(ValueError, match="int32"):
        cuda.to_device(np.array([2**40]))


@pytest.mark.cuda
def test_empty_and_zeros():
    z = cuda.zeros((3, 4), "bfloat16")
    np.testing.assert_array_equal(z.numpy(), np.zeros((3, 4), np.float32))
    e = cuda.empty(5, "int32")
    assert e.shape == (5,) and e.dtype == "int32"
    assert "DeviceArray(shape=(5,), dtype=int32" in repr(e)


# ---- views, reshape, copies ------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_view_and_reshape_share_memory(rng):
    x = np.arange(24, dtype=np.float32)
    a = cuda.to_device(x)
    v = a.view(4, (2, 3))
    assert v.shape == (2, 3) and v.ptr == a.ptr + 16
    np.testing.assert_array_equal(v.numpy(), x[4:10].reshape(2, 3))
    v.zero_()
    want = x.copy()
    want[4:10] = 0
    np.testing.assert_array_equal(a.numpy(), want)
    r = a.reshape((4, 6))
    assert r.ptr == a.ptr
    r.copy_(np.ones((4, 6), np.float32))
    np.testing.assert_array_equal(a.numpy(), np.ones(24, np.float32))
    vv = v.view(1, 2)  # a view of a view: offsets add up
    assert vv.ptr == a.ptr + 20
    vv.copy_(np.float32([7, 8]))
    np.testing.assert_array_equal(a.numpy()[5:7], [7, 8])
    del a, r  # the views keep the allocation alive
    gc.collect()
    np.testing.assert_array_equal(vv.numpy(), [7, 8])


@pytest.mark.cuda
def test_view_errors():
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
    with pytest.raises(TypeError, match="dtype"):
        cuda.empty((2,), "float16")


@pytest.mark.cuda
def test_view_as_and_carve():
    """Typed views at byte offsets of one allocation (CudaGPT's activations): aligned, disjoint, independent."""
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
    specs = {"x": ((3, 5), "bfloat16"), "i": ((7,), "int32"), "f": ((2, 3, 4), "float32")}
    views = cuda.carve(specs)
    ptrs = sorted((v.ptr, v.nbytes) for v in views.values())
    assert all(p % 256 == ptrs[0][0] % 256 for p, _ in ptrs)
    assert all(p0 + n0 <= p1 for (p0, n0), (p1, _) in zip(ptrs, ptrs[1:]))  # disjoint
    for name, (shape, dtype) in specs.items():
        assert views[name].shape == shape and views[name].dtype == dtype
        views[name].copy_(np.full(shape, 3, np.int32 if dtype == "int32" else np.float32))
    assert all((v.numpy() == 3).all() for v in views.values())


@pytest.mark.cuda
@pytest.mark.parametrize(
    "src_t,dst_t",
    [
        ("float32", "bfloat16"),
        ("bfloat16", "float32"),
        ("float32", "float32"),
        ("bfloat16", "bfloat16"),
        ("int32", "int32"),
    ],
)
def test_copy_between_dtypes(rng, src_t, dst_t):
    x = _values(rng, (5, 77), np.int32 if src_t == "int32" else np.float32)
    src = cuda.to_device(x, src_t)
    dst = cuda.empty((5, 77), dst_t)
    dst.copy_(src)
    want = x if src_t == "int32" else bf16_round(x) if "bfloat16" in (src_t, dst_t) else x
    np.testing.assert_array_equal(dst.numpy(), want)


@pytest.mark.cuda
def test_copy_errors(rng):
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


# ---- add_, sum_squares, zero sizes -----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 7, 4096, 100003])
def test_add_(rng, dtype, n):
    x, y = _values(rng, (n,)), _values(rng, (n,))
    a, b = cuda.to_device(x, dtype), cuda.to_device(y, dtype)
    cuda.add_(a, b)
    if dtype == "float32":
        want = x + y
    else:
        want = bf16_round(bf16_round(x) + bf16_round(y))
    np.testing.assert_array_equal(a.numpy(), want)
    np.testing.assert_array_equal(b.numpy(), bf16_round(y) if dtype == "bfloat16" else y)


@pytest.mark.cuda
def test_add_errors():
    a = cuda.zeros((4,))
    with pytest.raises(TypeError, match="src"):
        cuda.add_(a, cuda.zeros((4,), "bfloat16"))
    with pytest.raises(ValueError, match="src"):
        cuda.add_(a, cuda.zeros((5,)))
    with pytest.raises(TypeError, match="dst"):
        cuda.add_(cuda.zeros((4,), "int32"), cuda.zeros((4,), "int32"))
    with pytest.raises(TypeError, match="DeviceArray"):
        cuda.add_(a, np.zeros(4, np.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 33, 1 << 20, 3_000_001])
def test_sum_squares(rng, dtype, n):
    x = rng.standard_normal(n).astype(np.float32)
    xr = bf16_round(x) if dtype == "bfloat16" else x
    got = cuda.sum_squares(cuda.to_device(x, dtype))
    want = float(np.sum(xr.astype(np.float64) ** 2))
    assert abs(got - want) <= 1e-6 * want, f"sum_squares rel err {abs(got - want) / want:.3g}"
    gn = cuda.global_norm(cuda.to_device(x, dtype), cuda.to_device(x[:5], dtype))
    assert abs(gn - np.sqrt(want + np.sum(xr[:5].astype(np.float64) ** 2))) <= 1e-6 * gn


@pytest.mark.cuda
def test_zero_sizes():
    for dtype in ["float32", "bfloat16", "int32"]:
        a = cuda.empty((0, 5), dtype)
        assert a.size == 0 and a.nbytes == 0 and a.numpy().shape == (0, 5)
        a.zero_()
        a.copy_(np.zeros((0, 5), np.int32 if dtype == "int32" else np.float32))
        a.copy_(cuda.empty((0, 5), dtype))
    z = cuda.empty((0,), "bfloat16")
    cuda.add_(z, cuda.empty((0,), "bfloat16"))
    assert cuda.sum_squares(z) == 0.0
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
