"""SentencePiece ``tokenizer.model`` -> HF ``tokenizer.json`` document, as transformers' LlamaConverter writes it.

A model folder with a SentencePiece BPE model and no tokenizer.json (older Llama 2 fine-tunes, original checkpoints)
loads through this conversion (`Tokenizer.from_pretrained`); the document is then read as any SentencePiece-style
tokenizer.json (see fastllm.tokenizer). Reading the model needs the optional ``sentencepiece`` and ``protobuf``
packages (for sentencepiece's bundled ``sentencepiece_model_pb2``).

The document (Llama 2's layout, transformers' LlamaConverter):
  - vocab: every piece at its id (byte pieces ``<0x00>``..``<0xFF>`` included); BPE with ``byte_fallback`` as the
    trainer spec says, ``<unk>`` (the unknown piece) fused as sentencepiece fuses runs of unknown characters;
  - merges: every split of a normal piece into two normal pieces, the piece's score first (highest first), then
    its id, then the ids of the left and right parts;
  - normalizer ``Prepend('▁')`` (when the model adds a dummy prefix) + ``Replace(' ', '▁')``; with
    tokenizer_config.json's ``legacy: false`` instead a Metaspace pre-tokenizer (prepend_scheme "first");
  - added tokens: the unknown and control pieces (``<unk>``, ``<s>``, ``</s>``) special, user-defined pieces not
    special, all matched in raw text; tokenizer_config.json's ``added_tokens_decoder`` entries after the vocab;
  - post-processor: the BOS piece before every text unless ``add_bos_token`` is false (``add_eos_token`` puts EOS
    after it, which fastllm then refuses by name);
  - decoder ``Replace('▁', ' ')``, ``ByteFallback``, ``Fuse``, ``Strip`` of the one leading space.

On models trained as Llama 2's was (identity normalization, whitespace kept) this encodes as
``SentencePieceProcessor.encode`` (tests/test_hf_tokenizers.py), with exceptions that come from the HF layout
itself: the text after a user-defined piece gets its own dummy prefix (sentencepiece puts one at the start of the
text only, also when a user-defined piece starts it, where HF puts none), with ``legacy: false`` a text that
starts with a space gets none, and where two splits of one piece could merge at once sentencepiece takes the
leftmost, HF the earlier merge (not seen on the test texts). What the layout cannot express is refused by name:
Unigram (and word/char) models, a normalization rule or precompiled charsmap other than identity,
``remove_extra_whitespaces``, ``escape_whitespaces: false``, ``treat_whitespace_as_suffix``, unused pieces
(sentencepiece re-splits them), and tokenizer classes other than Llama's (whose HF converters differ). The
trainer's splits (split_by_unicode_script, split_by_whitespace, split_digits, ...) only limit which pieces it
learns: sentencepiece's BPE encodes the whole text either way, as this does.
"""

from __future__ import annotations

import os
from pathlib import Path

from .fileio import read_json

__all__ = ["sentencepiece_doc", "sentencepiece_folder_doc"]

META = "\u2581"  # SentencePiece's space
INSTALL = ("reading a SentencePiece tokenizer.model needs the sentencepiece and protobuf packages (pip install "
           "sentencepiece protobuf); or give the folder its tokenizer.json")
# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
# tokenizer_config.json's tokenizer_class values whose HF conversion is LlamaConverter's
_LLAMA_CLASSES = (None, "LlamaTokenizer", "LlamaTokenizerFast")


def _model_proto(path: str):
    """The parsed ModelProto of `path` (ValueError: the packages are missing, or the file is not a model)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # sentencepiece missing, or protobuf (which the bundled _pb2 module imports)
        raise ValueError(f"{path}: {INSTALL} ({e})") from None
    m = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            m.ParseFromString(f.read())
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise ValueError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not m.pieces:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces)")
    return m


def _refusals(m, path: str) -> None:
    """ValueError naming the first setting of `m` that the HF layout cannot reproduce exactly."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{path}: {msg}; fastllm converts SentencePiece BPE models with Llama 2's settings only "
                          "(give the folder a tokenizer.json to use another)")

    t, n = m.trainer_spec, m.normalizer_spec
    if t.model_type != 2:
        kind = _MODEL_TYPES.get(t.model_type, str(t.model_type))
        raise bad(f"a SentencePiece {kind} model (trainer_spec.model_type), not BPE")
    if n.precompiled_charsmap or n.normalization_rule_tsv:
        raise bad(f"normalizer_spec {n.name or 'custom'!r} rewrites the text (a precompiled charsmap: NFKC and the "
                  "like); only 'identity' is supported")
    if n.remove_extra_whitespaces:
        raise bad("normalizer_spec.remove_extra_whitespaces=true (sentencepiece drops leading, trailing and repeated "
                  "spaces)")
    if not n.escape_whitespaces:
        raise bad("normalizer_spec.escape_whitespaces=false (spaces are not written as '\u2581')")
    if t.treat_whitespace_as_suffix:
        raise bad("trainer_spec.treat_whitespace_as_suffix=true (the space goes after each word)")
    unused = [p.piece for p in m.pieces if p.type == UNUSED]
    if unused:
        raise bad(f"{len(unused)} unused pieces (type UNUSED, e.g. {unused[0]!r}: sentencepiece merges into them "
                  "and then splits them again)")
    types = {p.type for p in m.pieces}
    if not types <= {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE}:
        raise bad(f"piece types {sorted(types)} (unknown to sentencepiece_model.proto)")
    if sum(p.type == UNKNOWN for p in m.pieces) != 1:
        raise bad("not exactly one unknown piece")
    if len({p.piece for p in m.pieces}) != len(m.pieces):
        raise bad("a piece appears twice")


def _merges(m) -> list[list[str]]:
    """Every split of a normal piece into two normal pieces, by the piece's score (highest first), then its id,
    then the ids of its parts (transformers' LlamaConverter's order; sentencepiece's BPE merges the pair whose
    result scores highest, the leftmost among equals)."""
    normal = {p.piece: i for i, p in enumerate(m.pieces) if p.type == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-m.pieces[i].score, i, normal[left], normal[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _added(id: int, content: str, special: bool, lstrip: bool = False, rstrip: bool = False) -> dict:
    return {"id": id, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": False, "special": special}


def _token_name(value) -> str | None:
    """A tokenizer_config.json token setting: "<s>" or {"content": "<s>", ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def sentencepiece_doc(model_file: str | os.PathLike, legacy: bool = True, add_prefix_space: bool | None = None,
                      add_bos_token: bool = True, add_eos_token: bool = False, bos_token: str | None = None,
                      eos_token: str | None = None, added_tokens: dict | None = None) -> dict:
    """The tokenizer.json document of the SentencePiece BPE model `model_file` (see the module doc). The other
    arguments are tokenizer_config.json's settings: `legacy` (False: a Metaspace pre-tokenizer, prepend_scheme
    "first", instead of the Prepend normalizer), `add_prefix_space` (default: the model's add_dummy_prefix),
    `add_bos_token` / `add_eos_token` (the post-processor), `bos_token` / `eos_token` (default: the model's
    pieces), `added_tokens` (its added_tokens_decoder: {id: {"content", "special", "lstrip", "rstrip",
    "single_word"}}). ValueError naming the file for what cannot be converted exactly, and when the sentencepiece
    and protobuf packages are missing."""
    path = os.fspath(model_file)
    m = _model_proto(path)
    _refusals(m, path)
    pieces, byte_fallback = m.pieces, bool(m.trainer_spec.byte_fallback)
    if add_prefix_space is None:
        add_prefix_space = bool(m.normalizer_spec.add_dummy_prefix)
    unk = next(p.piece for p in pieces if p.type == UNKNOWN)
    added = [_added(i, p.piece, p.type != USER_DEFINED) for i, p in enumerate(pieces)
             if p.type in (UNKNOWN, CONTROL, USER_DEFINED)]
    for key, entry in sorted((added_tokens or {}).items(), key=lambda kv: int(kv[0])):
        i, content = int(key), _token_name(entry)
        if content is None:
            raise ValueError(f"{path}: added_tokens_decoder entry {key}: no content")
        flags = entry if isinstance(entry, dict) else {}
        if flags.get("single_word"):
            raise ValueError(f"{path}: added token {content!r} has single_word=true, which is not supported")
        token = _added(i, content, bool(flags.get("special", True)), bool(flags.get("lstrip")),
                       bool(flags.get("rstrip")))
        if i < len(pieces):
            if pieces[i].piece != content:
                raise ValueError(f"{path}: added_tokens_decoder renames piece {i} {pieces[i].piece!r} to "
                                 f"{content!r}, which is not supported")
            if pieces[i].type in (NORMAL, BYTE):
                kind = "normal" if pieces[i].type == NORMAL else "byte"
                raise ValueError(f"{path}: added_tokens_decoder makes the {kind} piece {i} {content!r} an added "
                                 "token, which is not supported")
            added = [token if t["id"] == i else t for t in added]
        else:
            added.append(token)
    piece_names = {p.piece for p in pieces}
    if len({t["content"] for t in added}) != len(added) or any(
            t["content"] in piece_names for t in added if t["id"] >= len(pieces)):
        raise ValueError(f"{path}: an added token of tokenizer_config.json repeats a piece or another added token")

    if legacy:
        normalizer = {"type": "Sequence", "normalizers": ([{"type": "Prepend", "prepend": META}] if add_prefix_space
                                                          else []) +
                      [{"type": "Replace", "pattern": {"String": " "}, "content": META}]}
        pre_tokenizer = None
    else:
        normalizer = None
        pre_tokenizer = {"type": "Metaspace", "replacement": META,
                         "prepend_scheme": "first" if add_prefix_space else "never", "split": False}
    decoders = [{"type": "Replace", "pattern": {"String": META}, "content": " "}]
    decoders += [{"type": "ByteFallback"}] if byte_fallback else []
    decoders += [{"type": "Fuse"}]
    decoders += [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_prefix_space else []

    ids = {tok["content"]: tok["id"] for tok in added}
    t = m.trainer_spec
    bos = (bos_token or (pieces[t.bos_id].piece if 0 <= t.bos_id < len(pieces) else None)) if add_bos_token else None
    eos = (eos_token or (pieces[t.eos_id].piece if 0 <= t.eos_id < len(pieces) else None)) if add_eos_token else None
    for name in (bos, eos):
        if name is not None and name not in ids:
            raise ValueError(f"{path}: tokenizer_config.json adds {name!r} to every text, and it is no control or "
                             "added token")
    post = _template(bos, eos, ids) if bos or eos else None
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": sorted(added, key=lambda tok: tok["id"]),
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback,
                  "ignore_merges": False, "vocab": {p.piece: i for i, p in enumerate(pieces)},
                  "merges": _merges(m)},
    }


def _template(bos: str | None, eos: str | None, ids: dict[str, int]) -> dict:
    """LlamaTokenizerFast's TemplateProcessing: "<s> $A" (and "</s>" after it with add_eos_token); the pair
    repeats it for $B with type id 1."""

    def seq(type_id: int) -> list[dict]:
        return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + \
            [{"Sequence": {"id": "AB"[type_id], "type_id": type_id}}] + \
            ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])

    return {"type": "TemplateProcessing", "single": seq(0), "pair": seq(0) + seq(1),
            "special_tokens": {name: {"id": name, "ids": [ids[name]], "tokens": [name]} for name in (bos, eos)
                               if name}}


def sentencepiece_folder_doc(folder: str | os.PathLike) -> dict:
    """sentencepiece_doc of `folder`/tokenizer.model with the settings of `folder`/tokenizer_config.json (legacy,
    add_prefix_space, add_bos_token, add_eos_token, bos_token, eos_token, added_tokens_decoder; absent: Llama's
    defaults). Refused by name: a tokenizer_class other than Llama's, and an added_tokens.json whose tokens
    added_tokens_decoder does not list."""
    folder = Path(folder)
    model, conf_path = folder / "tokenizer.model", folder / "tokenizer_config.json"
    conf = read_json(conf_path) if conf_path.exists() else {}
    if not isinstance(conf, dict):
        raise ValueError(f"{conf_path}:1: expected a JSON object")
    cls = conf.get("tokenizer_class")
    if cls not in _LLAMA_CLASSES:
        raise ValueError(f"{conf_path}: tokenizer_class {cls!r}: fastllm converts a tokenizer.model as "
                         "LlamaTokenizer does (transformers converts this class otherwise); give the folder its "
                         "tokenizer.json")
    for key in ("legacy", "add_prefix_space", "add_bos_token", "add_eos_token"):
        if conf.get(key) is not None and not isinstance(conf[key], bool):
            raise ValueError(f"{conf_path}: {key} must be true or false, got {conf[key]!r}")
    added = conf.get("added_tokens_decoder") or {}
    if not isinstance(added, dict) or not all(isinstance(k, str) and k.isdigit() for k in added):
        raise ValueError(f"{conf_path}: added_tokens_decoder must map ids to tokens")
    extra = folder / "added_tokens.json"
    if extra.exists():
        listed = {(_token_name(v), int(k)) for k, v in added.items()}
        more = read_json(extra)
        missing = [(s, i) for s, i in (more.items() if isinstance(more, dict) else [("?", "?")])
                   if (s, i) not in listed]
        if missing:
            raise ValueError(f"{extra}: added tokens that tokenizer_config.json's added_tokens_decoder does not list "
                             f"(e.g. {missing[0][0]!r}: {missing[0][1]!r}) are not supported; give the folder its "
                             "tokenizer.json")
    return sentencepiece_doc(
        model, legacy=conf.get("legacy") is not False, add_prefix_space=conf.get("add_prefix_space"),
        add_bos_token=conf.get("add_bos_token") is not False, add_eos_token=bool(conf.get("add_eos_token")),
        bos_token=_token_name(conf.get("bos_token")), eos_token=_token_name(conf.get("eos_token")),
        added_tokens=added)
