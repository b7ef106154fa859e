"""Files: atomic writes (temp file + fsync + rename) and a small bounds-checked safetensors reader/writer.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian tensor bytes (offsets relative to the end of the header). No pickle anywhere.
BF16 tensors are read (widened to float32); writing covers numpy's dtypes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: readers see the old
    file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """("file:line", parsed value) for each non-blank line of a JSONL file; invalid JSON or UTF-8 raises
    ValueError naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None


def read_json(path: str | os.PathLike):
    """The parsed JSON document in a file; ValueError naming the file (and line) when it is not UTF-8 or not JSON.

    >>> read_json("config.json")["model_type"]
    'gpt2'
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: corrupt JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: corrupt JSON (nested too deeply)") from None


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write named arrays to a .safetensors file atomically (little-endian, C order)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise TypeError(f"save_safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[np.dtype(arr.dtype.name)], "shape": list(arr.shape),
                        "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
        arrays.append(arr)
    hdr = json.dumps(header, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)  # align the data to 8 bytes
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for arr in arrays:
            f.write(arr.tobytes())


def load_safetensors(path: str | os.PathLike, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Read a .safetensors file -> ({name: array}, metadata). Every offset is checked against the file size;
    a truncated or corrupt file raises ValueError naming the file and the tensor."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    data_start, data_len = 8 + n, size - 8 - n
    buf = np.memmap(path, np.uint8, "r") if mmap else np.fromfile(path, np.uint8)
    out = {}
    for name, spec in header.items():
        if isinstance(spec, dict) and spec.get("dtype") not in _DTYPES and spec.get("dtype") != "BF16":
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {spec.get('dtype')!r} "
                             f"(supported: {', '.join(_DTYPES)}, BF16)")
        bf16 = isinstance(spec, dict) and spec.get("dtype") == "BF16"
        try:
            dtype = np.dtype("<u2" if bf16 else _DTYPES[spec["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in spec["shape"])
            b, e = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {spec!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= b <= e <= data_len) or e - b != count * dtype.itemsize or any(s < 0 for s in shape):
            raise ValueError(f"{path}: tensor {name!r} (shape {shape}, bytes {b}..{e}) does not fit the file "
                             f"({data_len} data bytes): truncated or corrupt")
        arr = buf[data_start + b:data_start + e].view(dtype).reshape(shape)
        if bf16:  # bfloat16 is the top half of a float32: widen to float32 (numpy has no bfloat16)
            out[name] = (arr.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = arr if mmap else arr.astype(dtype.newbyteorder("="), copy=False)
    return out, meta
