"""Hugging Face interop: GPT-2 models in the `transformers` layout (the tokenizer files are read by
fastllm.tokenizer; fastllm.checkpoint.convert turns such a folder into a fastllm checkpoint and back).

A folder that ``transformers.GPT2LMHeadModel.from_pretrained`` reads holds
    config.json                    model_type "gpt2", n_layer, n_head, n_embd, n_positions, vocab_size, ...
    model.safetensors              tensors named transformer.wte.weight, transformer.h.N.attn.c_attn.weight, ...
    (or model-0000K-of-0000N.safetensors + model.safetensors.index.json {"weight_map": {name: file}})
    tokenizer.json | vocab.json + merges.txt   (optional)
HF GPT-2 uses Conv1D layers whose weights are (in, out), the transpose of fastllm's nn.Linear (out, in) layout,
and keeps one tensor per layer where fastllm stacks them (L, ...). lm_head.weight is tied to wte (absent from
the file, or equal to it). Loading copies each tensor straight from a memory-mapped file into the model's flat
buffer (peak memory ~ one model), through fastllm.fileio: no pickle, every offset bounds-checked.

>>> model = GPT.from_pretrained("gpt2_folder")          # or hf.from_pretrained(path)
>>> model.save_pretrained("out", tokenizer=tok)          # transformers can load "out"
>>> tok = Tokenizer.from_pretrained("gpt2_folder")       # tokenizer.json or vocab.json + merges.txt
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .fileio import load_safetensors, read_json, save_safetensors, write_json
from .model import GPT, GPTConfig
from .version import __version__

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both GELU's tanh approximation, as fastllm's kernel
# per-layer tensors whose HF (Conv1D) layout is the transpose of ours
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LAYER_TENSORS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip
_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers that old checkpoints carry
_LAYER_RE = re.compile(r"h\.(\d+)\.(.+)")
_HF_DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, layer_norm_epsilon=1e-5
)


# ---- config ----------------------------------------------------------------------------------------------


def config_from_hf(d: dict, where: str = CONFIG_FILE) -> GPTConfig:
    """A GPTConfig from a transformers GPT-2 config.json dict; ValueError for what fastllm cannot run."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: not a JSON object")

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    if d.get("model_type") != "gpt2":
        raise bad(f"model_type {d.get('model_type')!r} is not supported (only 'gpt2')")
    archs = d.get("architectures") or ["GPT2LMHeadModel"]
    if not isinstance(archs, list) or any(a not in ARCHITECTURES for a in archs):
        raise bad(f"architectures {archs!r} are not supported (only {list(ARCHITECTURES)})")
    act = d.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise bad(f"activation_function {act!r} is not supported (only {list(ACTIVATIONS)})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):  # fmt: skip
        if key in d and bool(d[key]) != want:
            raise bad(f"{key}={d[key]!r} is not supported (fastllm needs {want})")
    v = {k: d.get(k, default) for k, default in _HF_DEFAULTS.items()}
    n_ctx = d.get("n_ctx")
    if "n_positions" not in d and n_ctx is not None:  # very old configs name the context n_ctx only
        v["n_positions"] = n_ctx
    if n_ctx is not None and n_ctx != v["n_positions"]:
        raise bad(f"n_ctx={n_ctx} differs from n_positions={v['n_positions']}")
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * v["n_embd"]:
        raise bad(f"n_inner={n_inner} is not supported (fastllm's MLP is 4 * n_embd = {4 * v['n_embd']})")
    eps = v["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise bad(f"layer_norm_epsilon must be a positive number, got {eps!r}")
    try:
        return GPTConfig(block_size=v["n_positions"], vocab_size=v["vocab_size"], n_layer=v["n_layer"],
                         n_head=v["n_head"], n_embd=v["n_embd"], layernorm_eps=float(eps))  # fmt: skip
    except ValueError as e:
        raise bad(str(e)) from None


def config_to_hf(cfg: GPTConfig, eot_id: int | None = None) -> dict:
    """The config.json dict transformers needs for GPT2LMHeadModel (no dropout: fastllm has none)."""
    if eot_id is None and cfg.vocab_size == 50257:
        eot_id = 50256  # GPT-2's <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_inner": None,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.layernorm_eps,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "fastllm_version": __version__,
    }


# ---- weights ---------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """model.safetensors, or the shards named by model.safetensors.index.json (and its weight_map)."""
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE], {}
    index = folder / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors is read, never "
                                f"pytorch_model.bin)")  # fmt: skip
    doc = read_json(index)
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"{index}: no weight_map")
    files = []
    for name, f in wmap.items():
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise ValueError(f"{index}: tensor {name!r} maps to a bad file name {f!r}")
        if not (folder / f).exists():
            raise FileNotFoundError(f"{index}: shard {f} of tensor {name!r} is missing")
        if folder / f not in files:
            files.append(folder / f)
    return files, wmap


def _target(name: str, n_layer: int) -> tuple[str, int | None] | None:
    """HF tensor name -> (fastllm parameter, layer or None); None for buffers to skip; KeyError if unknown."""
    key = name.removeprefix("transformer.")
    if key in ("wte.weight", "wpe.weight"):
        return key.split(".")[0], None
    if key in ("ln_f.weight", "ln_f.bias"):
        return key, None
    m = _LAYER_RE.fullmatch(key)
    if m and int(m.group(1)) < n_layer and m.group(1) == str(int(m.group(1))):
        if m.group(2) in _LAYER_TENSORS:
            return m.group(2), int(m.group(1))
        if m.group(2) in _BUFFERS:
            return None
    raise KeyError(name)


def _expected(n_layer: int) -> list[tuple[str, int | None]]:
    glob = [("wte", None), ("wpe", None), ("ln_f.weight", None), ("ln_f.bias", None)]
    return glob + [(n, layer) for layer in range(n_layer) for n in _LAYER_TENSORS]


def _hf_name(pname: str, layer: int | None) -> str:
    if layer is not None:
        return f"transformer.h.{layer}.{pname}"
    return f"transformer.{pname}.weight" if pname in ("wte", "wpe") else f"transformer.{pname}"


def from_pretrained(path: str | os.PathLike, cls: type[GPT] = GPT) -> GPT:
    """Load a transformers GPT-2 folder (config.json + safetensors, single file or sharded) into a GPT."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected config.json and model.safetensors)")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found")
    cfg = config_from_hf(read_json(cfg_path), str(cfg_path))
    model = cls(cfg, init=False)
    seen: dict[str, Path] = {}
    filled: set[tuple[str, int | None]] = set()
    lm_head = None
    files, wmap = _weight_files(folder)
    for file in files:
        tensors, _meta = load_safetensors(file, mmap=True)
        for name, arr in tensors.items():
            if name in seen:
                raise ValueError(f"{file}: tensor {name!r} is also in {seen[name]}")
            seen[name] = file
            if name == "lm_head.weight":
                lm_head = (file, arr)
                continue
            try:
                tgt = _target(name, cfg.n_layer)
            except KeyError:
                raise ValueError(f"{file}: unexpected tensor {name!r} (not a GPT-2 LM parameter of this config: "
                                 f"n_layer={cfg.n_layer})") from None  # fmt: skip
            if tgt is None:
                continue
            pname, layer = tgt
            dst = model.p[pname] if layer is None else model.p[pname][layer]
            want = dst.T.shape if pname in _CONV1D else dst.shape
            if arr.shape != want:
                raise ValueError(f"{file}: tensor {name!r} has shape {arr.shape}, config.json needs {want}")
            if arr.dtype.kind != "f":
                raise ValueError(f"{file}: tensor {name!r} has dtype {arr.dtype}, expected floats")
            dst[...] = arr.T if pname in _CONV1D else arr
            if (pname, layer) in filled:
                raise ValueError(f"{file}: tensor {name!r} duplicates {_hf_name(pname, layer)!r}")
            filled.add((pname, layer))
    for name, f in wmap.items():
        if name not in seen:
            raise ValueError(f"{folder / f}: tensor {name!r} (listed in {INDEX_FILE}) is not in the file")
    missing = [_hf_name(n, layer) for n, layer in _expected(cfg.n_layer) if (n, layer) not in filled]
    if missing:
        where = files[0] if not wmap else folder / INDEX_FILE
        raise ValueError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if lm_head is not None:
        file, arr = lm_head
        if arr.shape != model.p["wte"].shape or not np.array_equal(arr, model.p["wte"]):
            raise ValueError(f"{file}: lm_head.weight differs from transformer.wte.weight; fastllm ties the lm-head "
                             f"to the token embedding and cannot load an untied head")  # fmt: skip
    model.pretrained_dir = folder
    return model


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's tensors under transformers' GPT2LMHeadModel names and layouts (lm_head left out: tied)."""
    p, out = model.p, {}
    out["transformer.wte.weight"] = p["wte"]
    out["transformer.wpe.weight"] = p["wpe"]
    for layer in range(model.config.n_layer):
        for n in _LAYER_TENSORS:
            a = p[n][layer]
            out[f"transformer.h.{layer}.{n}"] = np.ascontiguousarray(a.T) if n in _CONV1D else a
    out["transformer.ln_f.weight"] = p["ln_f.weight"]
    out["transformer.ln_f.bias"] = p["ln_f.bias"]
    return out


def save_pretrained(
    model: GPT, path: str | os.PathLike, tokenizer=None, max_shard_bytes: int | None = None
) -> Path:
    """Write `model` as a transformers GPT-2 folder (config.json, model.safetensors or shards + index; with a
    `tokenizer`, also tokenizer.json and tokenizer_config.json). Every file is written atomically; stale shards
    of an earlier save are removed."""
    if tokenizer is not None and tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_vocab} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")  # fmt: skip
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    old = set(folder.glob("model-*-of-*.safetensors"))
    if max_shard_bytes is None or sum(a.nbytes for a in state.values()) <= max_shard_bytes:
        save_safetensors(folder / WEIGHTS_FILE, state, meta)
        (folder / INDEX_FILE).unlink(missing_ok=True)
        written = set()
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in state.items():
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        n = len(shards)
        wmap, written = {}, set()
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            save_safetensors(folder / fname, shard, meta)
            wmap.update({name: fname for name in shard})
            written.add(folder / fname)
        total = sum(a.nbytes for a in state.values())
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": wmap})
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    for f in old - written:
        f.unlink(missing_ok=True)
    eot = tokenizer.eot_token if tokenizer is not None else None
    write_json(folder / CONFIG_FILE, config_to_hf(model.config, eot))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, model.config.block_size)
    return folder


# ---- tokenizer files -------------------------------------------------------------------------------------


def save_tokenizer(tokenizer, folder: str | os.PathLike, model_max_length: int | None = None) -> None:
    """tokenizer.json (Tokenizer.save_hf) plus a tokenizer_config.json so AutoTokenizer finds it."""
    folder = Path(folder)
    tokenizer.save_hf(folder / "tokenizer.json")
    conf: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if model_max_length:
        conf["model_max_length"] = model_max_length
    eot = "<|endoftext|>" if tokenizer.eot_token is not None else None
    if eot:
        conf.update(bos_token=eot, eos_token=eot, unk_token=eot)
    write_json(folder / "tokenizer_config.json", conf)


__all__ = ["from_pretrained", "save_pretrained", "config_from_hf", "config_to_hf", "hf_state_dict", "save_tokenizer"]
