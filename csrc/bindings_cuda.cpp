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

#include <numeric>

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

static std::vector<int64_t> shape_arg(py::object shape) {
    if (py::isinstance<py::int_>(shape)) return {shape.cast<int64_t>()};
    return shape.cast<std::vector<int64_t>>();
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
            "reshape",
            [](const DeviceArray& a, py::object shape) {
                DeviceArray v = a;
                v.shape = shape_arg(shape);
                FASTLLM_CHECK(v.size() == a.size(), "cannot reshape ", a.shape_str(), " to ", v.shape_str());
                return v;
            },
            arg("shape"))
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
