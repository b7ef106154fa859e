"""Checks of config values, shared by the config dataclasses' __post_init__ (TrainConfig, SFTConfig, RLConfig,
RewardModelConfig), so the Python API and the CLI (whose flags are those fields) reject the same values with the
same message, naming the field, before any data is read.

>>> at_least(cfg, 1, "batch_size", "max_steps")        # ValueError: "batch_size must be an integer >= 1, got 0"
>>> require_device("cuda")                             # CudaUnavailableError on a machine without a GPU
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection

import numpy as np

from . import backend, cuda

DEVICES = backend.DEVICES
DTYPES = backend.DTYPES["cpu"]  # the compute dtypes a config may name (the same two on both devices)


def _given(cfg, names) -> list[tuple[str, object]]:
    """(name, value) of each field, leaving out a None where the field's declared default is None."""
    optional = {f.name for f in dataclasses.fields(cfg) if f.default is None}
    return [(name, getattr(cfg, name)) for name in names if getattr(cfg, name) is not None or name not in optional]


def at_least(cfg, minimum: int, *names: str) -> None:
    """Each field is an integer >= minimum (or None where that is the field's default)."""
    for name, v in _given(cfg, names):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def number(cfg, *names: str, low: float = 0.0, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> None:
    """Each field is a finite number in the interval low..high (bounds included unless *_open)."""
    for name, v in _given(cfg, names):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
            raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {v!r}")


def one_of(cfg, name: str, choices: Collection) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {v!r}")


def output_dir(cfg, name: str = "out") -> None:
    """The field names a folder to write into: not empty, and not an existing file."""
    v = getattr(cfg, name)
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        raise ValueError(f"{name} must name an output folder, got {v!r}")
    if os.path.exists(v) and not os.path.isdir(v):
        raise ValueError(f"{name}: {v} exists and is not a folder")


def device(cfg) -> None:
    """`device` is cpu or cuda, and `dtype` None (the device's default) or a dtype a model computes in."""
    one_of(cfg, "device", DEVICES)
    if cfg.dtype is not None:
        one_of(cfg, "dtype", DTYPES)


def require_device(name: str) -> None:
    """Fail now, before any data is read, if `name` cannot run here: ValueError for an unknown device,
    fastllm.cuda.CudaUnavailableError for cuda without a CUDA build or a GPU."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {name!r}")
    if name == "cuda":
        cuda._require()


def compute_dtype(cfg) -> str | None:
    """The dtype to move a model to for cfg.device: cfg.dtype (None: the device's default)."""
    return cfg.dtype


def fill_tensors(views: dict, tensors: dict, where: str, needs: str = "the config") -> None:
    """Copy tensors[name] into each view (float32 host arrays) of `views`: ValueError naming `where` and the tensor
    for one that is missing, not floating point, not of the view's shape (which `needs` says), or not finite."""
    for name, dst in views.items():
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name!r}")
        t = np.asarray(tensors[name])
        if t.dtype.kind != "f":
            raise ValueError(f"{where}: tensor {name!r} has dtype {t.dtype}; parameters must be floating point")
        if t.shape != dst.shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {t.shape}, {needs} needs {dst.shape}")
        dst[...] = t
        if not np.isfinite(dst).all():
            raise ValueError(f"{where}: tensor {name!r} holds NaN or infinite values")
