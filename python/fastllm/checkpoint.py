"""Checkpoints: what a saved training step holds, how it is written so that a kill never leaves a broken one, and how
it is read back (models, optimizer state, run state, reward-model heads, the tokenizer, Hugging Face folders).

A run folder OUT holds
    ckpt_NNNNNN/               one checkpoint, NNNNNN = optimizer steps taken (zero-padded to 6 digits, or more)
        model.safetensors      the GPT's tensors (GPT.state_dict() names, float32); metadata "config": the GPTConfig
        adapter_model.safetensors + adapter_config.json: instead, a LoRA run's adapters (fastllm.lora) in PEFT's
                               format, naming the frozen base model they go with (base_model_name_or_path; a model
                               made in memory, which has no folder, is saved beside them as model.safetensors)
        optimizer.safetensors  the optimizer's arrays (AdamW: "m", "v", flat like the parameters); metadata "t"
        state.json             {"step", "kind" (train | sft | grpo | reward-model), "rng" (numpy bit-generator
                               state), "stage" (the stage's own state: data position, GRPO reference, ...),
                               "config" (the run's config, for the record)}
        heads.safetensors      parameters trained beside the GPT (a reward model's head) and their AdamW moments
        tokenizer.tiktoken (+ .json) or tokenizer.json: a copy, so a checkpoint needs nothing else
    latest                     the name of the newest checkpoint

Writing (`save`): every file goes into `.ckpt_NNNNNN.tmp/` (each written atomically and fsynced), the folder is
fsynced and renamed to `ckpt_NNNNNN`, the parent fsynced, then `latest` is rewritten through fileio.atomic_write.
`prune` renames an old checkpoint to `.ckpt_NNNNNN.del` before deleting it. So at any kill, every `ckpt_N` folder
is complete; the next save removes leftover dot-folders.

Reading: every error names the file -- corrupt JSON, a missing key, a tensor of the wrong shape or stored as
integers/booleans, optimizer metadata without `t`, a state.json without `rng`.

>>> path = save("run", 100, model, opt, {"loader": loader.state_dict()}, kind="train", tokenizer="tok.tiktoken")
>>> model = load_model("run")                  # the newest checkpoint of a run (or a checkpoint folder)
>>> tok = checkpoint_tokenizer(model.checkpoint_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from . import chat, hf
from .checks import require_device
from .fileio import atomic_write, load_safetensors, read_json, save_safetensors, write_json
from .lora import LoraConfig
from .model import GPT, GPTConfig, param_shapes
from .tokenizer import Tokenizer, find_hf_tokenizer

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = hf.ADAPTER_WEIGHTS  # a LoRA checkpoint's adapters (fastllm.hf.save_adapter)
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
HEADS_FILE = "heads.safetensors"
LATEST_FILE = "latest"
TOKENIZER_FILE = "tokenizer.tiktoken"  # the copy kept beside shards and in checkpoints (+ its .json sidecar)
# a Hugging Face model's files that go with its tokenizer: chat template, special tokens, EOS ids (fastllm.chat),
# and any additional_chat_templates/<name>.jinja (chat_files)
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
TEMPLATE_FILES = CHAT_FILES[:3]  # the template and the special tokens' names (convert writes the EOS ids itself)
_NAME = re.compile(r"ckpt_(\d{6,})")


# ---- the run folder ----------------------------------------------------------------------------------------------


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run folder (`ckpt_N` folders with a model or adapter file), oldest first (by step, not by
    name)."""
    out = Path(out)
    found = [(int(m.group(1)), p) for p in out.glob("ckpt_*") if (m := _NAME.fullmatch(p.name)) and _holds_model(p)]
    return [p for _, p in sorted(found)]


def latest(out: str | os.PathLike) -> Path | None:
    """The checkpoint `OUT/latest` names, else the newest checkpoint folder, else None."""
    out = Path(out)
    pointer = out / LATEST_FILE
    if pointer.is_file():
        p = out / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if _NAME.fullmatch(p.name) and _holds_model(p):
            return p
    found = checkpoints(out)
    return found[-1] if found else None


def _holds_model(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() or (folder / ADAPTER_FILE).is_file()


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if _holds_model(path):
        return path
    found = latest(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {MODEL_FILE} or ckpt_* folders)")
    return found


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the `ckpt_N` names first, so a kill midway leaves no half."""
    trash = folder.with_name(f".{folder.name}.del")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean(out: Path) -> None:
    """Remove what a killed save or prune left behind."""
    for p in list(out.glob(".ckpt_*.tmp")) + list(out.glob(".ckpt_*.del")):
        shutil.rmtree(p, ignore_errors=True)


# ---- writing -----------------------------------------------------------------------------------------------------


def save_model(folder: str | os.PathLike, model: GPT) -> None:
    """`folder`/model.safetensors: the model's tensors with its GPTConfig in the metadata."""
    save_safetensors(Path(folder) / MODEL_FILE, model.state_dict(), {"config": json.dumps(model.config.to_dict())})


def save(out: str | os.PathLike, step: int, model: GPT, opt, stage: dict, *, kind: str, rng=None,
         config: dict | None = None, heads: dict[str, np.ndarray] | None = None,
         tokenizer: str | os.PathLike | None = None) -> Path:
    """Write OUT/ckpt_{step:06d} atomically (see the module doc) and point OUT/latest at it. `opt`: an optimizer
    with state_dict() -> {arrays..., "t": int}, or that dict; `stage`: JSON-able state of the training stage; `rng`:
    a numpy Generator to resume; `heads`: extra float arrays; `tokenizer`: a tokenizer file to copy in."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    final, tmp = out / f"ckpt_{step:06d}", out / f".ckpt_{step:06d}.tmp"
    tmp.mkdir()
    base = None if model.lora is None else model.lora.base
    if model.lora is None or base is None:
        save_model(tmp, model)
    if model.lora is not None:  # the adapters, naming their base (or beside it: "")
        hf.save_adapter(model, tmp, base=str(Path(base).resolve()) if base is not None else "")
    opt_state = opt if isinstance(opt, dict) else opt.state_dict()
    arrays = {k: v for k, v in opt_state.items() if k != "t"}
    save_safetensors(tmp / OPTIMIZER_FILE, arrays, {"t": int(opt_state["t"])})
    write_json(tmp / STATE_FILE, {"step": step, "kind": kind, "rng": None if rng is None else rng.bit_generator.state,
                                  "stage": stage, "config": config or {}})
    if heads:
        save_safetensors(tmp / HEADS_FILE, heads)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp)
    _fsync_dir(tmp)
    if final.exists():  # the same step written by an earlier, killed run
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(out)
    with atomic_write(out / LATEST_FILE, "w") as f:
        f.write(final.name + "\n")
    _fsync_dir(out)
    return final


def prune(out: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) checkpoints of a run folder, never the one `latest` names."""
    out = Path(out)
    current = latest(out)
    for old in checkpoints(out)[:-max(1, keep)]:
        if old != current:
            _remove(old)


# ---- reading -----------------------------------------------------------------------------------------------------


def _float_tensors(path: Path, tensors: dict) -> dict:
    for name, arr in tensors.items():
        if arr.dtype.kind != "f":
            raise ValueError(f"{path}: tensor {name!r} is stored as {arr.dtype}; expected floating point")
    return tensors


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
               weights: str | None = None) -> GPT:
    """The GPT of a checkpoint folder (or of a run folder: its latest checkpoint, or of a Hugging Face model folder:
    see fastllm.hf), moved to `device` (cpu or cuda) and compute `dtype` (None: the device's default; see GPT).
    model.checkpoint_dir is the folder it came from. weights ("bfloat16", "int8", "w8a8"; CPU): an inference-only
    model holding its matrices in that decode form alone (GPT.hold_weights): converted while loading from a Hugging
    Face folder (never a float32 copy of them), from the float32 ones of a fastllm checkpoint.

    >>> model = load_model("run/", device="cuda", dtype="bfloat16")
    >>> model = load_model("Qwen2.5-0.5B-Instruct/")          # config.json + model.safetensors
    """
    require_device(device)
    if weights is not None and (device, dtype) != ("cpu", None):
        raise ValueError(f"weights={weights!r} holds decode copies for the CPU: give device='cpu' and no dtype, got "
                         f"{device!r}, {dtype!r}")
    if hf.is_hf_folder(path):
        return hf.from_pretrained(path, weights=weights).to(device, dtype)
    folder = resolve(path)
    base = hf.adapter_base(folder) if hf.is_adapter_folder(folder) else None  # LoRA adapters: their base model
    if base is None or Path(base or folder).resolve() == folder.resolve():  # (a base saved beside them: "")
        if not (folder / MODEL_FILE).is_file():
            raise ValueError(f"{folder / hf.ADAPTER_CONFIG}: no base_model_name_or_path, and no {MODEL_FILE} beside "
                             "the adapters")
        model = _load_fastllm(folder)
        if weights is not None:
            model.hold_weights(model.decode_weights(weights), weights)
    elif not Path(base).exists():
        raise FileNotFoundError(f"{folder / hf.ADAPTER_CONFIG}: its base model {base} is not a folder here (give "
                                "the path of a local copy as base_model_name_or_path)")
    else:
        model = load_model(base, weights=weights)  # held in the decode form while loading, where asked
        if model.lora is not None:  # adapters trained on a LoRA checkpoint's model: that model whole
            if weights is not None:
                raise ValueError(f"{folder}: adapters on a LoRA checkpoint ({base}) load in float32 only (no weights=)")
            model.merge_lora()
    if base is not None:
        hf.load_adapter(model, folder)  # (float32, beside held matrices too: inference)
        model.checkpoint_dir = folder
    return model if weights is not None else model.to(device, dtype)


def load_start(path: str | os.PathLike, lora: LoraConfig | None = None, seed: int = 0,
               weights: str | None = None) -> GPT:
    """The model a fine-tuning run (sft, rl, dpo, reward-model) starts from: load_model's, on the CPU, with a LoRA
    checkpoint's adapters merged into its base (the fine-tuned model whole; new adapters, or every weight, train on
    top of it; and so adapters trained on adapters load); then new adapters of config `lora` if given (seed: their
    initialisation), the rest frozen. weights ("bfloat16", "int8"): the matrices held in that form alone (load_model's
    weights=), frozen: adapters train over them (LoraConfig.of checks a run's options)."""
    model = load_model(path, weights=weights)
    if model.lora is not None:
        if weights is not None:  # (merging needs the float32 matrices)
            raise ValueError(f"{path}: a LoRA checkpoint starts a run from its adapters merged into its base, in "
                             f"float32: convert it first (fastllm convert {path} merged/ --to hf) and start from "
                             f"that folder to hold it in {weights}")
        model.merge_lora()
    if lora is not None:
        model.add_lora(lora, seed=seed)
    return model


def _load_fastllm(folder: Path) -> GPT:
    """The GPT of a fastllm checkpoint folder's model.safetensors, on the CPU."""
    file = folder / MODEL_FILE
    tensors, meta = load_safetensors(file)
    if "config" not in meta:
        raise ValueError(f"{file}: no model config in the metadata (a Hugging Face file? see `fastllm convert`)")
    try:
        config = GPTConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"{file}: bad model config in the metadata ({e})") from None
    for name, shape in param_shapes(config).items():  # before allocating: a damaged config may ask for terabytes
        got = tensors[name].shape if name in tensors else None
        if got != shape:
            raise ValueError(f"{file}: tensor {name!r} {'is missing' if got is None else f'has shape {got}'}; the "
                             f"model config in the metadata needs {shape}")
    model = GPT(config, init=False)
    model.load_state_dict(_float_tensors(file, tensors), where=str(file))
    model.checkpoint_dir = folder
    return model


def load_optimizer(folder: str | os.PathLike, opt) -> None:
    """Restore `opt` (AdamW or anything with load_state_dict(state, where)) from folder/optimizer.safetensors."""
    file = Path(folder) / OPTIMIZER_FILE
    tensors, meta = load_safetensors(file)
    try:
        t = int(meta["t"])
    except KeyError:
        raise ValueError(f"{file}: no 't' (steps taken) in the metadata") from None
    except ValueError:
        raise ValueError(f"{file}: 't' in the metadata must be an integer, got {meta['t']!r}") from None
    opt.load_state_dict({**_float_tensors(file, tensors), "t": t}, where=str(file))


def load_state(folder: str | os.PathLike, kind: str) -> dict:
    """state.json of a checkpoint, checked: {"step": int, "rng": numpy Generator, "stage": dict, ...}. ValueError
    naming the file for corrupt JSON, a missing or bad key, or a checkpoint of another kind of training."""
    file = Path(folder) / STATE_FILE
    state = read_json(file)
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a JSON object")
    for key, typ in (("step", int), ("kind", str), ("rng", dict), ("stage", dict)):
        if not isinstance(state.get(key), typ) or isinstance(state.get(key), bool):
            raise ValueError(f"{file}: {key!r} is missing or not a {typ.__name__} (got {state.get(key)!r:.80})")
    if state["step"] < 0:
        raise ValueError(f"{file}: 'step' must be >= 0, got {state['step']}")
    if state["kind"] != kind:
        raise ValueError(f"{file}: this is a {state['kind']!r} checkpoint; it cannot resume {kind!r} training")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["rng"]
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # (Overflow: a number too big for 128 bits)
        raise ValueError(f"{file}: bad 'rng' state ({type(e).__name__}: {e})") from None
    return {**state, "rng": rng}


def load_heads(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The extra tensors of a checkpoint (heads.safetensors); FileNotFoundError naming the folder if it has none."""
    file = Path(folder) / HEADS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no {HEADS_FILE} (not a reward-model checkpoint?)")
    tensors, _ = load_safetensors(file)
    return _float_tensors(file, tensors)


# ---- the tokenizer that goes with a checkpoint -------------------------------------------------------------------


def _tokenizer_files(src: str | os.PathLike, folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(source, destination) of each file copy_tokenizer copies; the tokenizer file itself first."""
    src = Path(src)
    if (src.suffix == ".json" and not Path(str(src) + ".json").exists()) or src.name == "tokenizer.model":
        pairs = [(src, Path(folder) / ("tokenizer.model" if src.name == "tokenizer.model" else "tokenizer.json"))]
        return pairs + [(src.parent / f, Path(folder) / f) for f in chat_files(src.parent)]
    return [(Path(str(src) + sfx), Path(folder) / (TOKENIZER_FILE + sfx)) for sfx in ("", ".json")]


def chat_files(folder: Path, names: tuple[str, ...] = CHAT_FILES) -> list[str]:
    """Those of `names` that `folder` has, and its additional_chat_templates/*.jinja (paths relative to it)."""
    extra = folder / chat.TEMPLATE_DIR
    return [n for n in names if (folder / n).is_file()] + (
        [f"{chat.TEMPLATE_DIR}/{f.name}" for f in sorted(extra.glob("*.jinja"))] if extra.is_dir() else [])


def copied_tokenizer(src: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Where copy_tokenizer(src, folder) puts the tokenizer (without copying anything)."""
    return _tokenizer_files(src, folder)[0][1]


def copy_tokenizer(src: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copy a tokenizer into `folder`: one saved by Tokenizer.save (rank file + `.json` sidecar) becomes
    TOKENIZER_FILE (+ sidecar); a HF tokenizer.json (or a SentencePiece tokenizer.model) is copied as it is named,
    with the CHAT_FILES beside it (tokenizer_config.json holds settings the conversion of a tokenizer.model reads)."""
    pairs = _tokenizer_files(src, folder)
    for a, b in pairs:
        if not a.is_file():
            raise FileNotFoundError(f"tokenizer file {a} not found (saved with Tokenizer.save?)")
        copy_file(a, b)
    return pairs[0][1]


def copy_file(a: Path, b: Path) -> None:
    """Copy file a to b atomically (nothing when they are the same file)."""
    if a.resolve() != b.resolve():
        with atomic_write(b) as f:
            f.write(a.read_bytes())


def find_tokenizer(folder: str | os.PathLike) -> Path | None:
    """fastllm's tokenizer copy in `folder`, else a HF tokenizer.json (from `fastllm convert`), else a SentencePiece
    tokenizer.model (a HF folder without tokenizer.json: converted when loaded, see fastllm.spm), else None."""
    for name in (TOKENIZER_FILE, "tokenizer.json", "tokenizer.model"):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def checkpoint_tokenizer(folder: str | os.PathLike, override: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer at `override` if given, else the one find_tokenizer finds in `folder` (either format);
    FileNotFoundError naming the folder if there is none."""
    path = override or find_tokenizer(folder)
    if path is None:
        raise FileNotFoundError(f"no tokenizer in {folder} ({TOKENIZER_FILE} or tokenizer.json); pass one explicitly")
    return Tokenizer.from_pretrained(path)


# ---- Hugging Face folders ----------------------------------------------------------------------------------------


def _check_convert_paths(src: Path, dst: Path) -> None:
    """convert() never writes into its source: dst may be neither src nor inside it."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"convert: the output folder {dst} is {'the source' if d == s else 'inside the source'} "
                         f"{src}; choose another output folder")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"convert: the output {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):  # an earlier folder's tokenizer, template or EOS ids would stay
        raise ValueError(f"convert: the output folder {dst} exists and is not empty; remove it or choose a new "
                         "folder (convert never mixes its files with those already there)")


@contextlib.contextmanager
def _output_folder(dst: Path):
    """The folder to write dst's files into: a hidden sibling folder, renamed to dst (new, or an empty folder) at
    the end, so an interrupted or failed conversion leaves no dst at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this process id
    tmp.mkdir()  # (mode from the umask, unlike mkdtemp's 0700)
    try:
        yield tmp
        _fsync_dir(tmp)  # its files are fsynced; their names too, before the folder appears under dst
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "fastllm",
            max_shard_size: int | str | None = None) -> Path:
    """HF model folder (GPT-2, Llama, Mistral, Qwen2, Qwen3: see fastllm.hf) -> fastllm checkpoint folder
    (to="fastllm": model.safetensors with the GPTConfig in its metadata, as load_model reads, the tokenizer with its
    tokenizer_config.json and chat template, and a generation_config.json with the EOS ids), or a fastllm checkpoint
    -> HF folder (to="hf"; a LoRA checkpoint's adapters merged into its base: the fine-tuned model whole, which
    transformers, llama.cpp's converter or vLLM read as any model). Everything is read and checked before anything
    is written; dst may not be src or
    inside it, nor a folder that holds files already. max_shard_size (to="hf"): shards of at most that size
    ("5GB", as transformers writes it; default: one model.safetensors).

    >>> convert("Qwen2.5-0.5B-Instruct/", "ckpt/")     # then: fastllm sample --ckpt ckpt/
    """
    src, dst = Path(src), Path(dst)
    if to not in ("fastllm", "hf"):
        raise ValueError(f"to must be 'fastllm' or 'hf', got {to!r}")
    if max_shard_size is not None and to != "hf":
        raise ValueError("max_shard_size is for --to hf (a fastllm checkpoint is one model.safetensors)")
    _check_convert_paths(src, dst)
    if to == "fastllm":
        model = hf.from_pretrained(src)
        found = find_hf_tokenizer(src) is not None or (src / "tokenizer.model").is_file()
        tok = Tokenizer.from_pretrained(src) if found else None
        if tok is not None and tok.n_vocab > model.config.vocab_size:
            raise ValueError(f"{src}: the tokenizer has {tok.n_vocab} ids but config.json has vocab_size="
                             f"{model.config.vocab_size}")
        eos = chat.eos_token_ids(src, tok)
        with _output_folder(dst) as out:
            save_model(out, model)
            if tok is not None and tok._is_ranks:  # tiktoken semantics: the rank file `fastllm sample` looks for
                tok.save(out / TOKENIZER_FILE)
            elif tok is not None:  # HF merge priority: only tokenizer.json can express it
                tok.save_hf(out / "tokenizer.json")
            for name in chat_files(src, TEMPLATE_FILES) if tok is not None else ():
                copy_file(src / name, out / name)
            if eos:
                write_json(out / hf.GENERATION_FILE, {"eos_token_id": eos})
        return dst
    model = load_model(src)
    if model.lora is not None:
        model.merge_lora()
    tok_path = find_tokenizer(model.checkpoint_dir)
    tok = Tokenizer.from_pretrained(tok_path) if tok_path is not None else None
    eos = chat.eos_token_ids(model.checkpoint_dir, tok) or None
    with _output_folder(dst) as out:
        hf.save_pretrained(model, out, tokenizer=tok, eos_token_id=eos, max_shard_size=max_shard_size)
        if tok_path is not None and tok_path.name == "tokenizer.json":  # a HF tokenizer: its own files, as they were
            copy_tokenizer(tok_path, out)
        for name in chat_files(model.checkpoint_dir, TEMPLATE_FILES):
            copy_file(model.checkpoint_dir / name, out / name)
    return dst
