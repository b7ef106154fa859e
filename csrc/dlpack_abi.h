/*
The few DLPack structs fastllm needs to exchange GPU arrays with torch, cupy, jax ... without copies.
DLPack (https://dmlc.github.io/dlpack) is a small, stable C ABI; these definitions follow its public spec
(v1.0 layout) and are written here so the build needs no extra dependency.

Python protocol (array API standard): obj.__dlpack_device__() -> (device_type, device_id); obj.__dlpack__(
stream=, max_version=, dl_device=, copy=) -> a PyCapsule named "dltensor" (holding a DLManagedTensor) or, when
the consumer passed max_version >= (1, 0), "dltensor_versioned" (a DLManagedTensorVersioned). The consumer renames
the capsule to "used_dltensor" / "used_dltensor_versioned" when it takes ownership and calls `deleter` once it no
longer needs the memory; an unconsumed capsule calls the deleter from its own destructor.
*/
#pragma once
#include <cstdint>

namespace fastllm::dlpack {

enum DeviceType : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13 };
enum TypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };

struct DLDevice {
    int32_t device_type;  // DeviceType (a C enum: int-sized)
    int32_t device_id;
};

struct DLDataType {
    uint8_t code;  // TypeCode
    uint8_t bits;
    uint16_t lanes;  // 1 for plain (non-vector) element types
};

struct DLTensor {
    void* data;  // device pointer; the first element is at (char*)data + byte_offset
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;    // ndim sizes
    int64_t* strides;  // ndim strides in ELEMENTS, or NULL for compact row-major
    uint64_t byte_offset;
};

struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor* self);
};

struct DLPackVersion {
    uint32_t major;
    uint32_t minor;
};

constexpr uint64_t kFlagReadOnly = 1ull << 0;
constexpr uint64_t kFlagIsCopied = 1ull << 1;

struct DLManagedTensorVersioned {
    DLPackVersion version;
    void* manager_ctx;
    void (*deleter)(DLManagedTensorVersioned* self);
    uint64_t flags;
    DLTensor dl_tensor;
};

}  // namespace fastllm::dlpack
