"""LoRA adapters served beside the model, as vLLM serves them: multi-LoRA serving.

    fastllm serve --ckpt base/ --lora-modules sql=sql_lora/ chat=chat_lora/ [--allow-runtime-lora]

A request whose `model` is an adapter's name runs with that adapter; the model's own id runs the model alone.
Requests on different adapters (or none) share the engine, its KV cache and every decode pass (engine.py keeps
each adapter's rows adjacent; fastllm.lora.LoraRuns applies each to its rows). An adapter is a PEFT adapter folder
(adapter_config.json, adapter_model.safetensors: a fastllm LoRA checkpoint is one; a LoRA run folder stands for
its newest checkpoint), read by fastllm.hf.load_adapter(attach=False): float32 on the model's device (also beside
matrices held in bf16 or int8), checked against the model (its modules and shapes) -- an adapter of another
architecture is refused naming the file and tensor. /v1/models lists each adapter as vLLM does (`root`: its folder,
`parent`: the model's id). With --allow-runtime-lora, POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(vLLM's, which it enables with VLLM_ALLOW_RUNTIME_LORA_UPDATING) add and remove adapters; requests already
accepted for an unloaded adapter finish with it (they hold it), new ones get a 404.

Unlike vLLM, every adapter loaded stays on the device (no LRU cache of them, nothing loaded on first use) and any
mix of them may share a decode pass: --max-loras caps how many are loaded at once (vLLM: how many share a batch,
with --max-cpu-loras more cached), --max-lora-rank refuses adapters of a higher rank (vLLM: sizes its slots).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import hf
from ..checkpoint import latest
from ..fileio import read_json
from ..lora import Lora


class AdapterError(ValueError):
    """An adapter that cannot be loaded (or unloaded); `field` names the request field at fault: lora_name or
    lora_path (vLLM's load_lora_adapter fields)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass
class Adapter:
    """A served adapter: its name (a model id), folder, weights and the id of the model it adapts."""

    name: str
    path: str
    lora: Lora
    parent: str
    created: int

    def card(self, max_len: int) -> dict:
        """Its entry in /v1/models, as vLLM lists a LoRA adapter."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "fastllm",
                "root": self.path, "parent": self.parent, "max_model_len": max_len}


class Adapters:
    """The adapters a server holds, by name (thread-safe: loaded from the HTTP side, read by request parsing).
    model: the served model (adapters are made for it); base: its id; max_loras: most adapters at once;
    max_rank: highest rank taken (None: any); runtime: whether the load/unload endpoints may change them."""

    def __init__(self, model, base: str, max_loras: int = 16, max_rank: int | None = None, runtime: bool = False):
        if max_loras < 0:
            raise ValueError(f"--max-loras must be >= 0, got {max_loras}")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"--max-lora-rank must be >= 1, got {max_rank}")
        self.model, self.base, self.max_loras, self.max_rank, self.runtime = model, base, max_loras, max_rank, runtime
        self._by_name: dict[str, Adapter] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._by_name.get(name)

    def all(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    def load(self, name: str, path: str, parent: str | None = None, replace: bool = False) -> Adapter:
        """Read the adapter folder `path` and serve it as `name` (replace: in place of one of that name, vLLM's
        load_inplace); AdapterError naming the field for a bad name, a full server or an unreadable adapter."""
        if not name or name != name.strip():
            raise AdapterError(f"an adapter's name must be a non-empty string without surrounding spaces, got "
                               f"{name!r}", "lora_name")
        if name == self.base:
            raise AdapterError(f"the adapter name {name!r} is the served model's own id", "lora_name")
        with self._lock:  # (checked again once it is read: another load may have come first)
            self._check_room(name, replace)
        if self.model.lora is not None:
            raise AdapterError(f"the served model {self.base} carries adapters of its own (a LoRA checkpoint): serve "
                               "its base model with --ckpt and these adapters with --lora-modules", "lora_path")
        folder = Path(path)
        if folder.is_dir() and not hf.is_adapter_folder(folder):
            folder = latest(folder) or folder  # a LoRA run folder: its newest checkpoint
        try:
            lora = hf.load_adapter(self.model, folder, attach=False)
        except (ValueError, OSError) as e:
            raise AdapterError(f"adapter {name!r}: {e}", "lora_path") from None
        doc = read_json(folder / hf.ADAPTER_CONFIG)  # (load_adapter checked r and rank_pattern)
        rank = max([doc.get("r", 8), *(doc.get("rank_pattern") or {}).values()])
        if self.max_rank is not None and rank > self.max_rank:
            raise AdapterError(f"adapter {name!r}: rank {rank} ({folder / hf.ADAPTER_CONFIG}) is above --max-lora-rank "
                               f"{self.max_rank}", "lora_path")
        adapter = Adapter(name, str(path), lora, parent or self.base, int(time.time()))
        with self._lock:
            self._check_room(name, replace)
            self._by_name[name] = adapter
        return adapter

    def _check_room(self, name: str, replace: bool) -> None:
        """AdapterError if `name` is taken (unless replaced) or the server is full; the caller holds the lock."""
        if name in self._by_name and not replace:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.", "lora_name")  # (vLLM's words)
        if name not in self._by_name and len(self._by_name) >= self.max_loras:
            raise AdapterError(f"{len(self._by_name)} adapters are loaded, the most this server holds "
                               f"(--max-loras {self.max_loras}): unload one first", "lora_name")

    def unload(self, name: str) -> Adapter:
        """Stop serving `name` (KeyError if it is not served); requests that hold it finish with it."""
        with self._lock:
            return self._by_name.pop(name)


def parse_lora_modules(specs) -> list[tuple[str, str, str | None]]:
    """vLLM's --lora-modules values -> [(name, path, base_model_name or None)]: NAME=PATH, or a JSON object
    '{"name": "sql", "path": "sql_lora/", "base_model_name": "base"}' (base_model_name: the adapter's `parent` in
    /v1/models; default: the served model's id).

    >>> parse_lora_modules(["sql=runs/sql_lora"])
    [('sql', 'runs/sql_lora', None)]
    """
    out = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules {spec!r}: not JSON ({e})") from None
            unknown = sorted(set(d) - {"name", "path", "base_model_name"})
            if unknown or not all(isinstance(d.get(k), str) and d.get(k) for k in ("name", "path")) or \
                    not isinstance(d.get("base_model_name", ""), (str, type(None))):
                raise ValueError(f"--lora-modules {spec!r}: expected {{\"name\": str, \"path\": str, "
                                 f"\"base_model_name\": str (optional)}}" + (f", not {unknown}" if unknown else ""))
            out.append((d["name"], d["path"], d.get("base_model_name") or None))
            continue
        name, eq, path = spec.partition("=")
        if not (eq and name and path):
            raise ValueError(f"--lora-modules {spec!r}: expected NAME=PATH (or a JSON object with name and path)")
        out.append((name, path, None))
    names = [name for name, _, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--lora-modules: the name {dup!r} is given twice")
    return out
