"""Files: atomic writes (temp file + fsync + rename), compressed inputs, records of JSONL and Parquet files, and a
small bounds-checked safetensors reader/writer.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian tensor bytes (offsets relative to the end of the header). No pickle anywhere.
BF16 tensors are read (widened to float32); writing covers numpy's dtypes. Memory-mapped reading
(`load_safetensors(path, mmap=True)`) converts one tensor at a time, as it is asked for, and can copy a tensor
straight into a float32 buffer and then give its pages back (`SafetensorsFile.read_into`, `release`), so loading
a large model never holds the file's data and the model at once.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import math
import mmap as _mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32, "U64": np.uint64,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_STORED = {**_DTYPES, "BF16": np.uint16}  # what each dtype's bytes are read as (BF16: then widened to float32)
_MAX_HEADER = 100 * 1024 * 1024


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: readers see the old
    file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode open() would
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- compressed inputs -------------------------------------------------------------------------------------

COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}  # as datasets ship JSONL
DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)  # damaged or truncated streams


def open_decompressed(path: str | os.PathLike, kind: str):
    """A binary reader of a gzip / bz2 / xz / zstd file's decompressed bytes (it closes the file when closed);
    zstd needs Python 3.14 or the `zstandard` package (ImportError saying so)."""
    if kind != "zstd":
        return {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind](path, "rb")
    try:
        from compression import zstd  # Python 3.14

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise ImportError("zstd-compressed: needs Python 3.14 or `pip install zstandard`") from None
    return io.BufferedReader(_ZstdReader(path, zstandard), 1 << 16)


class _ZstdReader(io.RawIOBase):
    """The frames of a zstd file decompressed one after another with the zstandard package. A file that ends
    inside a frame raises EOFError, as gzip and lzma do (zstandard's stream_reader returns the bytes so far and
    ends quietly: a truncated download would lose its tail unnoticed); damaged data raises OSError."""

    def __init__(self, path, zstandard):
        self._f, self._z = open(path, "rb"), zstandard
        self._frame = None  # the decompressor of the current frame
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._out):
            if self._frame is None or self._frame.eof:  # between frames: the next one, if any
                data = (self._frame.unused_data if self._frame is not None else b"") or self._f.read(1 << 16)
                if not data:
                    return 0
                self._frame = self._z.ZstdDecompressor().decompressobj()
            else:
                data = self._f.read(1 << 16)
                if not data:
                    raise EOFError("the zstd stream ends inside a frame (a truncated file)")
            try:
                self._out, self._pos = self._frame.decompress(data), 0
            except self._z.ZstdError as e:
                raise OSError(f"zstd: {e}") from None
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def data_suffix(path: str | os.PathLike) -> str:
    """The suffix of what a file holds: "data.jsonl.zst" -> ".jsonl", "a.txt" -> ".txt"."""
    p = Path(path)
    return Path(p.stem).suffix if p.suffix in COMPRESSION_SUFFIXES else p.suffix


def open_input(path: str | os.PathLike):
    """A binary reader of a file, decompressed when its name ends in .gz, .bz2, .xz or .zst."""
    kind = COMPRESSION_SUFFIXES.get(Path(path).suffix)
    return open_decompressed(path, kind) if kind else open(path, "rb")


def read_text(path: str | os.PathLike) -> str:
    """A (maybe compressed, see open_input) UTF-8 text file, line ends read as "\\n" (Python's universal newlines,
    as open() in text mode reads them), a leading BOM dropped; ValueError naming the file when it is not UTF-8 or
    its compression is damaged."""
    try:
        with open_input(path) as f:
            return f.read().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except ImportError as e:
        raise ImportError(f"{path}: {e}") from None
    except DECOMPRESS_ERRORS as e:
        if Path(path).suffix not in COMPRESSION_SUFFIXES:  # a plain file's OSError says what it is
            raise
        raise ValueError(f"{path}: damaged {COMPRESSION_SUFFIXES[Path(path).suffix]} "
                         f"({type(e).__name__}: {e})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """("file:line", parsed value) for each non-blank line of a JSONL file (maybe compressed, see open_input);
    invalid JSON or UTF-8, or a damaged compressed stream, raises ValueError naming the file and line."""
    try:
        f = open_input(path)
    except ImportError as e:
        raise ImportError(f"{path}: {e}") from None
    lineno = 0
    with f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines, None)
            except DECOMPRESS_ERRORS as e:
                if Path(path).suffix not in COMPRESSION_SUFFIXES:  # a plain file's OSError says what it is
                    raise
                raise ValueError(f"{path}:{lineno + 1}: damaged {COMPRESSION_SUFFIXES[Path(path).suffix]} "
                                 f"({type(e).__name__}: {e})") from None
            if raw is None:
                return
            lineno += 1
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows tools) is no text
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None


def iter_records(path: str | os.PathLike, columns: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """("file:N", record) for each record of a JSONL file (N: its line; iter_jsonl) or of a Parquet file, as the
    Hugging Face Hub ships datasets (N: its row, from 1; each row a dict without its null fields; `columns`: read
    only these, Parquet only). A .json file holds JSON Lines too (C4's and Dolma's .json.gz), or one JSON array of
    records (Stanford Alpaca's alpaca_data.json; "file: record N", from 1), as datasets' json loader reads both.
    Parquet is read in batches with pyarrow (an optional dependency: ImportError saying so); a file it cannot read,
    or a missing column, raises ValueError naming the file."""
    if Path(path).suffix != ".parquet":
        yield from _iter_json_array(path) if data_suffix(path) == ".json" and _starts_array(path) else \
            iter_jsonl(path)
    else:
        yield from iter_parquet(path, columns)


def iter_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """("file:N", row) for each row of a Parquet file, whatever its name (see iter_records)."""
    try:
        import pyarrow.parquet as pq  # the field's Parquet reader (datasets, pandas and lm-eval use it too)
    except ImportError:
        raise ImportError(f"{path}: reading Parquet files needs pyarrow: pip install pyarrow") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid: not Parquet, truncated
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in columns or () if c not in f.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {f.schema_arrow.names})")
    n = 0
    batches = f.iter_batches(batch_size=1024, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt page
            raise ValueError(f"{path}: rows after {n} cannot be read ({type(e).__name__}: {e})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:{n}", {k: v for k, v in row.items() if v is not None}  # null: no such field in this row


def _starts_array(path: str | os.PathLike) -> bool:
    """Whether a (maybe compressed) file's first non-blank character is "[" (a JSON array, not JSON Lines)."""
    try:
        with open_input(path) as f:
            head = f.read(4096)
            while head and not head.lstrip():
                head = f.read(4096)
    except (ImportError, *DECOMPRESS_ERRORS):
        return False  # iter_jsonl names the file and what is wrong with it
    return head.lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"[")  # (a UTF-8 BOM too)


def _iter_json_array(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """("file: record N", record) for each item of a file holding one JSON array; ValueError naming the file
    (and line) when it is not valid JSON."""
    try:
        items = json.loads(read_text(path))  # (read_text drops a BOM)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: bad JSON (nested too deeply)") from None
    for n, item in enumerate(items, 1):
        yield f"{path}: record {n}", item


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
        arr = np.asarray(arr)
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # (ascontiguousarray makes a 0-d array 1-d)
        if arr.dtype.newbyteorder("=") not in _NAMES:  # (either byte order: the file's is little-endian)
            raise TypeError(f"save_safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[arr.dtype.newbyteorder("=")], "shape": list(arr.shape),
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


class SafetensorsFile(Mapping):
    """The tensors of a memory-mapped .safetensors file (what load_safetensors(path, mmap=True) returns): a
    mapping name -> array whose values are made when asked for (views of the file for F32/F16/..., a widened
    float32 copy for BF16), so only one converted tensor need exist at a time.

    >>> tensors, meta = load_safetensors("model.safetensors", mmap=True)
    >>> tensors.read_into("lm_head.weight", out)      # converted straight into a float32 array
    >>> tensors.release("lm_head.weight")             # its pages leave this process's memory"""

    def __init__(self, path: Path, buf: np.ndarray, entries: dict[str, tuple[str, tuple[int, ...], int, int]],
                 mm: _mmap.mmap | None = None):
        self.path, self._buf, self._mm = path, buf, mm  # the file's bytes (mapped by mm, or read)
        self._entries = entries  # name -> (dtype, shape, begin, end) in the file

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._raw(name)
        if self.dtype(name) == "BF16":  # bfloat16 is the top half of a float32: widen (numpy has no bfloat16)
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor ("F32", "BF16", ...), without reading it."""
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def _raw(self, name: str) -> np.ndarray:
        dtype, shape, b, e = self._entries[name]
        return self._buf[b:e].view(np.dtype(_STORED[dtype]).newbyteorder("<")).reshape(shape)

    def read_into(self, name: str, out: np.ndarray, block_bytes: int = 32 << 20, start: int | None = None) -> None:
        """out[...] = the tensor, converted to out's dtype, a block of rows at a time, each block's file pages given
        back once copied: the extra memory is one block, whatever the tensor's size. BF16 into a C-contiguous
        float32 `out` is widened in place (no temporary); into a uint16 `out`, its bits are copied as they are.
        ValueError naming the tensor if the shapes differ.
        start: out holds the tensor's rows start .. start + len(out) - 1 instead (a part of a large matrix)."""
        shape = self.shape(name)
        fits = tuple(out.shape) == shape if start is None else \
            len(shape) >= 1 and tuple(out.shape[1:]) == shape[1:] and 0 <= start and start + len(out) <= shape[0]
        if not fits:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {shape}, expected {out.shape}"
                             f"{'' if start is None else f' from row {start}'}")
        bf16, src = self.dtype(name) == "BF16", self._raw(name)
        if src.ndim == 0 or src.size == 0:
            out[...] = self[name]
            return
        begin = self._entries[name][2]
        if start is not None:
            src, begin = src[start:start + len(out)], begin + start * max(1, src[0].nbytes)
        row = max(1, src[0].nbytes)
        step = max(1, block_bytes // row)
        for i in range(0, src.shape[0], step):
            block, dst = src[i:i + step], out[i:i + step]
            if bf16 and dst.dtype == np.uint16:
                dst[...] = block
            elif bf16 and dst.dtype == np.float32 and dst.flags.c_contiguous:
                bits = dst.view(np.uint32)
                bits[...] = block
                bits <<= 16
            elif bf16:
                dst[...] = (block.astype(np.uint32) << 16).view(np.float32)
            else:
                dst[...] = block
            self._release(begin + i * row, begin + (i + len(block)) * row)

    def release(self, name: str) -> None:
        """Give back the memory pages of a tensor that has been read (the file keeps the data: reading it again
        faults it back in)."""
        _, _, b, e = self._entries[name]
        self._release(b, e)

    def _release(self, b: int, e: int) -> None:
        if self._mm is None or not hasattr(self._mm, "madvise"):  # read into memory, or not Linux
            return
        start = (b // _mmap.PAGESIZE) * _mmap.PAGESIZE
        if e > start:
            self._mm.madvise(_mmap.MADV_DONTNEED, start, min(len(self._mm), e) - start)


def load_safetensors(path: str | os.PathLike, mmap: bool = False) -> tuple[Mapping[str, np.ndarray], dict]:
    """Read a .safetensors file -> ({name: array}, metadata). Every offset is checked against the file size;
    a truncated or corrupt file raises ValueError naming the file and the tensor. mmap=True maps the file and
    returns a SafetensorsFile (arrays made on access, see its doc) instead of a dict."""
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):  # the spec: {str: str}
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings, got "
                         f"{meta!r:.80})")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for name, spec in header.items():
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if isinstance(spec, dict) and not (isinstance(dtype, str) and dtype in _STORED):
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} "
                             f"(supported: {', '.join(_STORED)})")
        shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if dtype else (None, None)
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape + offsets)):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {spec!r:.200} (expected "
                             "dtype, shape: [int >= 0, ...], data_offsets: [begin, end])")
        shape, (b, e) = tuple(shape), offsets
        count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to the byte count
        if not (b <= e <= data_len) or e - b != count * np.dtype(_STORED[dtype]).itemsize:
            raise ValueError(f"{path}: tensor {name!r} (shape {shape}, bytes {b}..{e}) does not fit the file "
                             f"({data_len} data bytes): truncated or corrupt")
        entries[name] = (spec["dtype"], shape, data_start + b, data_start + e)
    if mmap:
        with open(path, "rb") as f:
            mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)  # (size >= 8 here)
        return SafetensorsFile(path, np.frombuffer(mm, np.uint8), entries, mm), meta
    tensors = SafetensorsFile(path, np.fromfile(path, np.uint8), entries)
    return {name: arr.astype(arr.dtype.newbyteorder("="), copy=False) for name, arr in tensors.items()}, meta
