/*
fastllm._C.cuda: the CUDA half of the one pybind11 module (compiled only with FASTLLM_WITH_CUDA; registered by
bindings.cpp). DeviceArray is a dense row-major GPU array (float32, bfloat16 or int32) that owns or shares one
allocation; views of a flat buffer (all parameters, say) share it. Every kernel binding checks dtype (TypeError),
shape, device and aliasing rules (ValueError) before it launches, and releases the GIL around the launch.
The kernels themselves are declared in csrc/cuda/kernels.h and live in csrc/cuda/<family>.cu.
*/
#include "bindings_cuda.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <numeric>

#include "dlpack_abi.h"

namespace py = pybind11;
using fastllm::str_cat;
using namespace fastllm::cuda;

namespace fastllm::cuda {

int64_t DeviceArray::size() const {
    return std::accumulate(shape.begin(), shape.end(), (int64_t)1, std::multiplies<int64_t>());
}

std::string DeviceArray::shape_str() const {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); i++) s += str_cat(i ? ", " : "", shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

DeviceArray DeviceArray::empty(const std::vector<int64_t>& shape, DType dtype) {
    for (int64_t d : shape) FASTLLM_CHECK(d >= 0, "shape must not have negative sizes, got ", d);
    DeviceArray a;
    a.shape = shape;
    a.dtype = dtype;
    a.device = current_device();
    void* p = malloc_device(a.nbytes());
    a.base = std::shared_ptr<void>(p, [](void* q) { free_device(q); });
    return a;
}

DType parse_dtype(const std::string& s) {
    if (s == "float32" || s == "f32") return DType::f32;
    if (s == "bfloat16" || s == "bf16") return DType::bf16;
    if (s == "int32" || s == "i32") return DType::i32;
    throw py::type_error(str_cat("dtype must be 'float32', 'bfloat16' or 'int32', got '", s, "'"));
}

void check_array(const DeviceArray& a, const char* name, DType dtype, const std::vector<int64_t>& shape) {
    if (a.dtype != dtype)
        throw py::type_error(str_cat(name, " must have dtype ", dtype_str(dtype), ", got ", dtype_str(a.dtype)));
    FASTLLM_CHECK(a.shape == shape, name, " must have shape ", DeviceArray{nullptr, 0, shape}.shape_str(),
                  ", got ", a.shape_str());
    FASTLLM_CHECK(a.device == current_device(), name, " is on GPU ", a.device, " but the current GPU is ",
                  current_device());
}

void check_float(const DeviceArray& a, const char* name) {
    if (a.dtype != DType::f32 && a.dtype != DType::bf16)
        throw py::type_error(str_cat(name, " must be float32 or bfloat16, got ", dtype_str(a.dtype)));
}

}  // namespace fastllm::cuda

// ---- numpy <-> device

static DType numpy_dtype(const py::array& a, const char* name) {
    if (py::isinstance<py::array_t<float>>(a)) return DType::f32;
    if (py::isinstance<py::array_t<int32_t>>(a)) return DType::i32;
    throw py::type_error(str_cat(name, " must be a float32 or int32 numpy array, got ", py::str(a.dtype())
                                                                                          .cast<std::string>()));
}

// copies host array `a` into device array `dst` (same shape); float32 -> bfloat16 is converted on the GPU
static void upload(DeviceArray& dst, py::array a) {
    DType src_t = numpy_dtype(a, "array");
    std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
    FASTLLM_CHECK(shape == dst.shape, "cannot copy an array of shape ", DeviceArray{nullptr, 0, shape}.shape_str(),
                  " into a DeviceArray of shape ", dst.shape_str());
    bool ok = src_t == dst.dtype || (src_t == DType::f32 && dst.dtype == DType::bf16);
    if (!ok)
        throw py::type_error(str_cat("cannot copy a ", dtype_str(src_t), " array into a ", dtype_str(dst.dtype),
                                     " DeviceArray"));
    py::array c = py::array::ensure(a, py::array::c_style);
    size_t n = dst.size();
    if (src_t == dst.dtype) {
        py::gil_scoped_release nogil;
        copy_to_device(dst.data(), c.data(), n * dtype_size(src_t));
        return;
    }
    DeviceArray tmp = DeviceArray::empty(dst.shape, DType::f32);
    py::gil_scoped_release nogil;
    copy_to_device(tmp.data(), c.data(), n * 4);
    convert(dst.data(), dst.dtype, tmp.data(), DType::f32, n);
    synchronize();
}

// a new numpy array with the contents (bfloat16 comes back as float32, exactly)
static py::array download(const DeviceArray& a) {
    py::array out = a.dtype == DType::i32 ? (py::array)py::array_t<int32_t>(a.shape) : py::array_t<float>(a.shape);
    size_t n = a.size();
    void* host = out.mutable_data();
    if (a.dtype != DType::bf16) {
        py::gil_scoped_release nogil;
        copy_to_host(host, a.data(), n * dtype_size(a.dtype));
        return out;
    }
    DeviceArray tmp = DeviceArray::empty(a.shape, DType::f32);
    {
        py::gil_scoped_release nogil;
        convert(tmp.data(), DType::f32, a.data(), DType::bf16, n);
        copy_to_host(host, tmp.data(), n * 4);
    }
    return out;
}

// ---- DLPack: zero-copy exchange with torch, cupy, ... (struct definitions in dlpack_abi.h)
//
// Export (DeviceArray.__dlpack__): a heap DLManagedTensor[Versioned] whose manager_ctx holds a copy of the
// DeviceArray (so the allocation lives until the consumer calls the deleter) plus its shape/strides arrays.
// Import (from_dlpack): validates the producer's DLTensor (CUDA, dense row-major, f32/bf16/i32), renames the
// capsule "used_..." and wraps the data pointer in a shared_ptr whose deleter calls the producer's deleter once
// the last DeviceArray view dies. Streams: fastllm runs on the legacy default stream, so we ask producers for
// stream 1 and, when exporting to a consumer on some other stream, synchronise the device first (correct, and
// rare in practice: torch passes 1 for its default stream).

namespace dl = fastllm::dlpack;

namespace {

struct ExportCtx {
    DeviceArray array;
    std::vector<int64_t> shape, strides;
};

template <typename M>
void export_deleter(M* self) {  // may run on any thread, with or without the GIL: touches no Python object
    delete static_cast<ExportCtx*>(self->manager_ctx);
    delete self;
}

dl::DLDataType dl_dtype(DType t) {
    if (t == DType::f32) return {dl::kDLFloat, 32, 1};
    if (t == DType::bf16) return {dl::kDLBfloat, 16, 1};
    return {dl::kDLInt, 32, 1};
}

void fill_dltensor(dl::DLTensor& t, ExportCtx& ctx) {
    const DeviceArray& a = ctx.array;
    ctx.shape = a.shape;
    ctx.strides.assign(a.shape.size(), 1);  // always given (DLPack >= 1.2 asks for them); compact row-major
    for (int i = (int)a.shape.size() - 2; i >= 0; i--)
        ctx.strides[i] = ctx.strides[i + 1] * std::max<int64_t>(a.shape[i + 1], 1);
    t.data = a.data();
    t.device = {dl::kDLCUDA, a.device};
    t.ndim = (int32_t)a.shape.size();
    t.dtype = dl_dtype(a.dtype);
    t.shape = ctx.shape.empty() ? nullptr : ctx.shape.data();
    t.strides = ctx.strides.empty() ? nullptr : ctx.strides.data();
    t.byte_offset = 0;
}

// destructor of a capsule nobody consumed: release the tensor (called by Python with the GIL held)
template <typename M>
void capsule_destructor(PyObject* cap, const char* name, const char* used_name) {
    if (PyCapsule_IsValid(cap, used_name)) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    auto* m = static_cast<M*>(PyCapsule_GetPointer(cap, name));
    if (m) {
        if (m->deleter) m->deleter(m);
    } else {
        PyErr_WriteUnraisable(cap);
    }
    PyErr_Restore(type, value, tb);
}
void legacy_capsule_destructor(PyObject* cap) {
    capsule_destructor<dl::DLManagedTensor>(cap, "dltensor", "used_dltensor");
}
void versioned_capsule_destructor(PyObject* cap) {
    capsule_destructor<dl::DLManagedTensorVersioned>(cap, "dltensor_versioned", "used_dltensor_versioned");
}

py::object to_dlpack(const DeviceArray& a, py::object stream, py::object max_version, py::object dl_device,
                     py::object copy) {
    if (!dl_device.is_none()) {
        auto d = dl_device.cast<std::pair<int, int>>();
        if (d.first != dl::kDLCUDA || d.second != a.device)
            throw py::buffer_error(str_cat("__dlpack__: cannot export a DeviceArray on cuda:", a.device,
                                           " to device (", d.first, ", ", d.second, ")"));
    }
    bool foreign_stream = false;
    if (!stream.is_none()) {
        if (!py::isinstance<py::int_>(stream))
            throw py::type_error("__dlpack__: stream must be None or an integer (a CUDA stream handle)");
        const int64_t s = stream.cast<int64_t>();
        // -1: no synchronisation wanted; 0/1: the legacy default stream (ours); 2: per-thread default stream
        // (synchronises with the legacy one); anything else: a foreign stream, so wait for our work (below, after
        // the copy=True copy, which is itself queued on our stream)
        foreign_stream = s < -1 || s > 2;
    }
    bool versioned = false;
    if (!max_version.is_none()) {
        auto v = max_version.cast<std::pair<int, int>>();
        versioned = v.first >= 1;
    }
    const bool do_copy = !copy.is_none() && copy.cast<bool>();
    auto ctx = std::make_unique<ExportCtx>();
    if (do_copy) {
        ctx->array = DeviceArray::empty(a.shape, a.dtype);
        py::gil_scoped_release nogil;
        copy_device(ctx->array.data(), a.data(), a.nbytes());
    } else {
        ctx->array = a;
    }
    if (foreign_stream) {
        py::gil_scoped_release nogil;
        synchronize();
    }
    PyObject* cap;
    if (versioned) {
        auto* m = new dl::DLManagedTensorVersioned{};
        m->version = {1, 0};
        m->flags = do_copy ? dl::kFlagIsCopied : 0;
        fill_dltensor(m->dl_tensor, *ctx);
        m->manager_ctx = ctx.release();
        m->deleter = export_deleter<dl::DLManagedTensorVersioned>;
        cap = PyCapsule_New(m, "dltensor_versioned", versioned_capsule_destructor);
        if (!cap) m->deleter(m);
    } else {
        auto* m = new dl::DLManagedTensor{};
        fill_dltensor(m->dl_tensor, *ctx);
        m->manager_ctx = ctx.release();
        m->deleter = export_deleter<dl::DLManagedTensor>;
        cap = PyCapsule_New(m, "dltensor", legacy_capsule_destructor);
        if (!cap) m->deleter(m);
    }
    if (!cap) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(cap);
}

// owns an imported tensor: calls the producer's deleter (with the GIL: some producers' deleters are Python)
struct ImportDeleter {
    void* managed;
    bool versioned;
    void operator()(void*) const {
        if (!Py_IsInitialized()) return;  // interpreter gone: leak rather than crash at exit
        PyGILState_STATE g = PyGILState_Ensure();
        if (versioned) {
            auto* m = static_cast<dl::DLManagedTensorVersioned*>(managed);
            if (m->deleter) m->deleter(m);
        } else {
            auto* m = static_cast<dl::DLManagedTensor*>(managed);
            if (m->deleter) m->deleter(m);
        }
        PyGILState_Release(g);
    }
};

const char* device_type_name(int t) {
    switch (t) {
        case dl::kDLCPU: return "CPU";
        case dl::kDLCUDA: return "CUDA";
        case dl::kDLCUDAHost: return "CUDA pinned host memory";
        case dl::kDLCUDAManaged: return "CUDA managed memory";
        default: return "a non-CUDA device";
    }
}

std::string dl_dtype_str(const dl::DLDataType& d) {
    static const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    std::string s = d.code < 7 ? str_cat(kinds[d.code], (int)d.bits) : str_cat("type code ", (int)d.code, " bits ",
                                                                                (int)d.bits);
    if (d.lanes != 1) s += str_cat(" x ", d.lanes, " lanes");
    return s;
}

DeviceArray from_dlpack(py::object obj) {
    if (py::isinstance<DeviceArray>(obj)) return obj.cast<DeviceArray>();  // a view of the same allocation
    py::object cap;
    if (PyCapsule_CheckExact(obj.ptr())) {
        cap = obj;  // a bare capsule (e.g. torch.utils.dlpack.to_dlpack(t))
    } else {
        if (!py::hasattr(obj, "__dlpack__"))
            throw py::type_error(str_cat("from_dlpack needs a CUDA tensor with __dlpack__ (torch, cupy, ...), got ",
                                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>()));
        if (py::hasattr(obj, "__dlpack_device__")) {
            py::tuple d = obj.attr("__dlpack_device__")();
            const int type = py::int_(d[0]).cast<int>();
            if (type != dl::kDLCUDA)
                throw py::type_error(str_cat("from_dlpack needs a CUDA tensor, got one on ", device_type_name(type),
                                             " (DLPack device type ", type, "); copy host arrays with to_device"));
        }
        // we consume on the legacy default stream (1); producers without max_version support get a retry
        try {
            cap = obj.attr("__dlpack__")(py::arg("stream") = 1, py::arg("max_version") = py::make_tuple(1, 0));
        } catch (py::error_already_set& e) {
            if (!e.matches(PyExc_TypeError)) throw;
            cap = obj.attr("__dlpack__")(py::arg("stream") = 1);
        }
    }
    PyObject* c = cap.ptr();
    void* managed;
    dl::DLTensor* t;
    bool versioned;
    if (PyCapsule_IsValid(c, "dltensor_versioned")) {
        auto* m = static_cast<dl::DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"));
        if (m->version.major != 1)
            throw py::value_error(str_cat("from_dlpack: DLPack version ", m->version.major, ".", m->version.minor,
                                          " is not supported (1.x is)"));
        if (m->flags & dl::kFlagReadOnly)
            throw py::value_error("from_dlpack: the tensor is read-only (DeviceArrays are writable)");
        managed = m, t = &m->dl_tensor, versioned = true;
    } else if (PyCapsule_IsValid(c, "dltensor")) {
        auto* m = static_cast<dl::DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
        managed = m, t = &m->dl_tensor, versioned = false;
    } else {
        throw py::value_error("from_dlpack: expected an unused DLPack capsule ('dltensor' or 'dltensor_versioned'); "
                              "a capsule can be consumed only once");
    }
    // validate; on any error the capsule stays unconsumed and its destructor releases the tensor
    if (t->device.device_type != dl::kDLCUDA)
        throw py::type_error(str_cat("from_dlpack needs a CUDA tensor, got one on ",
                                     device_type_name(t->device.device_type)));
    DType dt;
    const dl::DLDataType& d = t->dtype;
    if (d.lanes == 1 && d.code == dl::kDLFloat && d.bits == 32) dt = DType::f32;
    else if (d.lanes == 1 && d.code == dl::kDLBfloat && d.bits == 16) dt = DType::bf16;
    else if (d.lanes == 1 && d.code == dl::kDLInt && d.bits == 32) dt = DType::i32;
    else
        throw py::type_error(str_cat("from_dlpack: dtype ", dl_dtype_str(d),
                                     " is not supported (float32, bfloat16 or int32)"));
    FASTLLM_CHECK(t->ndim >= 0 && (t->ndim == 0 || t->shape), "from_dlpack: invalid ndim ", t->ndim);
    std::vector<int64_t> shape(t->shape, t->shape + t->ndim);
    int64_t size = 1;
    for (int64_t s : shape) {
        FASTLLM_CHECK(s >= 0, "from_dlpack: negative size in the shape");
        size *= s;
    }
    if (t->strides && size > 0) {
        int64_t expect = 1;
        for (int i = t->ndim - 1; i >= 0; i--) {
            if (shape[i] != 1 && t->strides[i] != expect) {
                std::string st;
                for (int j = 0; j < t->ndim; j++) st += str_cat(j ? ", " : "", t->strides[j]);
                throw py::value_error(str_cat("from_dlpack needs a dense row-major (C-contiguous) tensor; got "
                                              "strides (", st, ") in elements for shape ",
                                              DeviceArray{nullptr, 0, shape}.shape_str(), " (call .contiguous())"));
            }
            expect *= shape[i];
        }
    }
    FASTLLM_CHECK(size == 0 || t->data, "from_dlpack: the tensor has a null data pointer");
    DeviceArray a;
    a.shape = std::move(shape);
    a.dtype = dt;
    a.device = t->device.device_id;
    void* ptr = t->data ? (char*)t->data + t->byte_offset : nullptr;
    // take ownership: rename first, so that nothing can call the producer's deleter twice
    if (PyCapsule_SetName(c, versioned ? "used_dltensor_versioned" : "used_dltensor") != 0)
        throw py::error_already_set();
    a.base = std::shared_ptr<void>(ptr, ImportDeleter{managed, versioned});
    return a;
}

}  // namespace

static std::vector<int64_t> shape_arg(py::object shape) {
    std::vector<int64_t> s =
        py::isinstance<py::int_>(shape) ? std::vector<int64_t>{shape.cast<int64_t>()} : shape.cast<std::vector<int64_t>>();
    // view/reshape: an even number of negative sizes would otherwise pass the element-count checks
    for (int64_t d : s) FASTLLM_CHECK(d >= 0, "shape must not have negative sizes, got ", d);
    return s;
}

void fastllm::cuda::register_cuda(py::module_& parent) {
    using py::arg;
    py::module_ m = parent.def_submodule("cuda", "fastllm's CUDA kernels and device arrays");

    py::class_<DeviceArray>(m, "DeviceArray",
                            "A dense row-major GPU array (float32, bfloat16 or int32). Views share the allocation.")
        .def(py::init([](py::object shape, const std::string& dtype) {
                 return DeviceArray::empty(shape_arg(shape), parse_dtype(dtype));
             }),
             arg("shape"), arg("dtype") = "float32", "Uninitialised device memory of this shape and dtype.")
        .def_property_readonly("shape", [](const DeviceArray& a) { return py::tuple(py::cast(a.shape)); })
        .def_property_readonly("dtype", [](const DeviceArray& a) { return std::string(dtype_str(a.dtype)); })
        .def_property_readonly("ndim", [](const DeviceArray& a) { return a.shape.size(); })
        .def_property_readonly("size", &DeviceArray::size)
        .def_property_readonly("nbytes", &DeviceArray::nbytes)
        .def_property_readonly("device", [](const DeviceArray& a) { return a.device; })
        .def_property_readonly("ptr", [](const DeviceArray& a) { return (uintptr_t)a.data(); })
        .def("numpy", &download, "Copy to a new numpy array (bfloat16 -> float32).")
        .def("copy_", [](DeviceArray& a, py::array src) { upload(a, src); }, arg("src"),
             "Copy a numpy array of the same shape in (float32 into bfloat16 converts).")
        .def(
            "copy_",
            [](DeviceArray& a, const DeviceArray& src) {
                FASTLLM_CHECK(src.shape == a.shape, "cannot copy shape ", src.shape_str(), " into ", a.shape_str());
                if (src.dtype == a.dtype) return copy_device(a.data(), src.data(), a.nbytes());
                check_float(a, "destination");
                check_float(src, "source");
                convert(a.data(), a.dtype, src.data(), src.dtype, a.size());
            },
            arg("src"), "Copy another DeviceArray of the same shape in (float32 <-> bfloat16 converts).")
        .def("zero_", [](DeviceArray& a) { zero_device(a.data(), a.nbytes()); })
        .def(
            "view",
            [](const DeviceArray& a, int64_t offset, py::object shape) {
                DeviceArray v = a;
                v.shape = shape_arg(shape);
                FASTLLM_CHECK(offset >= 0 && offset + v.size() <= a.size(), "view of ", v.size(),
                              " elements at offset ", offset, " does not fit in ", a.size(), " elements");
                v.offset = a.offset + offset * dtype_size(a.dtype);
                return v;
            },
            arg("offset"), arg("shape"), "A view of `prod(shape)` elements starting at element `offset`.")
        .def(
            "view_as",
            [](const DeviceArray& a, int64_t byte_offset, py::object shape, const std::string& dtype) {
                DeviceArray v = a;
                v.dtype = parse_dtype(dtype);
                v.shape = shape_arg(shape);
                const int64_t es = (int64_t)dtype_size(v.dtype);
                FASTLLM_CHECK(byte_offset >= 0 && byte_offset % es == 0, "byte_offset ", byte_offset,
                              " must be >= 0 and a multiple of ", es, " (the size of ", dtype, ")");
                FASTLLM_CHECK(byte_offset + (int64_t)v.nbytes() <= (int64_t)a.nbytes(), "view of ", v.nbytes(),
                              " bytes at byte ", byte_offset, " does not fit in ", a.nbytes(), " bytes");
                v.offset = a.offset + byte_offset;
                return v;
            },
            arg("byte_offset"), arg("shape"), arg("dtype"),
            "A view of another dtype at a byte offset (carving typed buffers out of one allocation).")
        .def(
            "reshape",
            [](const DeviceArray& a, py::object shape) {
                DeviceArray v = a;
                v.shape = shape_arg(shape);
                FASTLLM_CHECK(v.size() == a.size(), "cannot reshape ", a.shape_str(), " to ", v.shape_str());
                return v;
            },
            arg("shape"))
        .def("__dlpack__", &to_dlpack, arg("stream") = py::none(), arg("max_version") = py::none(),
             arg("dl_device") = py::none(), arg("copy") = py::none(),
             "DLPack export (zero-copy unless copy=True): torch.from_dlpack(a), cupy.from_dlpack(a).")
        .def("__dlpack_device__", [](const DeviceArray& a) { return py::make_tuple((int)dl::kDLCUDA, a.device); })
        .def("__repr__", [](const DeviceArray& a) {
            return str_cat("DeviceArray(shape=", a.shape_str(), ", dtype=", dtype_str(a.dtype), ", device=cuda:",
                           a.device, ")");
        });

    m.def(
        "from_numpy",
        [](py::array a, std::optional<std::string> dtype) {
            DType t = dtype ? parse_dtype(*dtype) : numpy_dtype(a, "array");
            DeviceArray d = DeviceArray::empty(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()), t);
            upload(d, a);
            return d;
        },
        arg("array"), arg("dtype") = py::none(), "Copy a float32/int32 numpy array to the GPU (optionally as bfloat16).");
    m.def("from_dlpack", &from_dlpack, arg("obj"),
          "Wrap a CUDA tensor (anything with __dlpack__, or a DLPack capsule) without copying: dense row-major, "
          "float32/bfloat16/int32. The DeviceArray keeps the producer's memory alive.");
    m.def("device_count", &device_count);
    m.def("set_device", &set_device, arg("device"));
    m.def("current_device", &current_device);
    m.def("synchronize", []() {
        py::gil_scoped_release nogil;
        synchronize();
    });
    m.def(
        "add_",
        [](DeviceArray& dst, const DeviceArray& src) {
            check_float(dst, "dst");
            check_array(src, "src", dst.dtype, dst.shape);
            add_inplace(dst.data(), src.data(), dst.size(), dst.dtype);
        },
        arg("dst"), arg("src"), "dst += src (same shape and dtype).");
    m.def(
        "sum_squares",
        [](const DeviceArray& x) {
            check_float(x, "x");
            py::gil_scoped_release nogil;
            return sum_squares(x.data(), x.size(), x.dtype);
        },
        arg("x"), "Sum of squares (fp32 partial sums, double total); synchronises.");

    // ---- kernel families: each registers its bindings (see register_* in csrc/bindings_cuda.h)
    register_cuda_kernels(m);
}
