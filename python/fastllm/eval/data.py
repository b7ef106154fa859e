"""Evaluation data as the public datasets ship it (downloaded once by the user; nothing is fetched here).

Multiple choice (`load_multiple_choice`), one example per line, the format recognised per line:
    HellaSwag (llm.c / rowanz release)  {"ctx": str, "endings": [str x 4], "label": int or "2"}
    HellaSwag without "ctx"             {"activity_label", "ctx_a", "ctx_b", "endings", "label"}: ctx_a + " " + ctx_b
    ARC (AI2 release)                   {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey": "B"}
    ARC, OpenBookQA (Hugging Face Hub)  {"question" or "question_stem": str, "choices": {"text": [...], "label":
                                        [...]}, "answerKey": "B"}
    MMLU (Hugging Face Hub, cais/mmlu)  {"question": str, "choices": [str, ...], "answer": 2}
    PIQA                                {"goal": str, "sol1": str, "sol2": str, "label": 0 | 1}
    Winogrande                          {"sentence": "... _ ...", "option1", "option2", "answer": "1" | "2"}
    generic (ARC/MMLU-style)            {"context": str, "choices": [str, ...], "answer": 0 | "B" | "<choice text>"}
    MMLU CSV (data/test/*_test.csv)     question,A,B,C,D,answer-letter (no header)
JSONL files, or Parquet files with the same fields per row (the Hub's own files, read with pyarrow).
A choice is scored as a continuation of the context: HellaSwag endings with a leading space (llm.c's completion
style); ARC, MMLU and PIQA questions as "Question: <q>\\nAnswer:" (lm-eval's arc_easy, mmlu_continuation, piqa),
OpenBookQA's question_stem (a sentence to complete) and a generic context as they are; followed by the
delimiter (default " ", none where the context ends or the choice starts with whitespace) and the choice.
(lm-eval's default `mmlu` task scores the letters of a lettered list instead, and its `hellaswag` the endings
after "<activity_label>: " with WikiHow's [header] marks removed: other numbers than these.)
Winogrande is scored as lm-eval does (partial scoring): the rest of the sentence after the blank, given the
sentence up to the blank with each option in it.

Text for bits per byte (`load_documents`): .txt/.md files (documents split at <|endoftext|>), JSONL with a "text"
field, Parquet with a "text" column, folders of them; or token shards from `fastllm prepare` (a folder with
val_*.bin, or .bin files).

Every loader raises ValueError naming file:line and the missing or bad field.
"""

from __future__ import annotations

import csv
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import iter_records


@dataclass(frozen=True)
class Choice:
    """A multiple-choice example: the context, the choices as continuations, the index of the right one."""

    context: str
    choices: tuple[str, ...]  # continuation texts, leading space included where the format wants one
    label: int
    where: str = ""
    contexts: tuple[str, ...] = ()  # one context per choice where they differ (Winogrande), else () for `context`
    texts: tuple[str, ...] = ()  # the choices as the data has them (no delimiter): lm-eval's acc_norm divides by
    # their characters; () for `choices`


def _join(context: str, choice: str, delimiter: str = " ") -> str:
    return choice if not context or context[-1:].isspace() or choice[:1].isspace() else delimiter + choice


def _label(value, choices: list[str], where: str, field: str) -> int:
    """An answer given as an index (int or digit string), a letter A-Z, or the text of a choice -> index."""
    n = len(choices)
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip() in choices:
        return choices.index(value.strip())
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        value = ord(value.strip().upper()) - ord("A")
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{where}: field {field!r} must name one of the {n} choices (an index 0..{n - 1}, a letter "
                         f"A..{chr(ord('A') + n - 1)} or the choice's text), got {value!r}")
    return value


def _strings(obj: dict, field: str, where: str, min_len: int = 2) -> list[str]:
    v = obj.get(field)
    if not isinstance(v, list) or len(v) < min_len or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where}: field {field!r} must be a list of at least {min_len} strings, got {v!r}")
    return v


def parse_choice(obj, where: str, delimiter: str = " ") -> Choice:
    """One JSONL object in any of the multiple-choice forms of the module doc -> Choice."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "endings" in obj:  # HellaSwag
        if "ctx" in obj:
            ctx = obj["ctx"]
        elif "ctx_a" in obj:
            ctx = f"{obj['ctx_a']} {obj.get('ctx_b') or ''}".strip()
        else:
            raise ValueError(f"{where}: missing field 'ctx' (or 'ctx_a'/'ctx_b') of a HellaSwag example")
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: field 'ctx' must be a string, got {ctx!r}")
        endings = _strings(obj, "endings", where)
        if "label" not in obj or obj["label"] in ("", None):
            raise ValueError(f"{where}: missing field 'label' (HellaSwag's test split has no labels)")
        return Choice(ctx, tuple(" " + e for e in endings), _label(obj["label"], endings, where, "label"), where,
                      texts=tuple(endings))
    if isinstance(obj.get("question"), dict):  # ARC as AI2 ships it
        q = obj["question"]
        cs = q.get("choices")
        if not isinstance(cs, list) or not all(isinstance(c, dict) and "label" in c for c in cs):
            raise ValueError(f"{where}: field 'question.choices' must be a list of {{'text', 'label'}} objects")
        return _lettered(q.get("stem"), [c.get("text") for c in cs], [c["label"] for c in cs], obj, where,
                         "question.stem", "question.choices", delimiter)
    if isinstance(obj.get("choices"), dict):  # ARC and OpenBookQA as the Hugging Face Hub ships them
        cs = obj["choices"]
        texts, labels = cs.get("text"), cs.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise ValueError(f"{where}: field 'choices' must be {{'text': [...], 'label': [...]}} of equal lengths")
        field = "question_stem" if "question_stem" in obj else "question"
        ex = _lettered(obj.get(field), texts, labels, obj, where, field, "choices.text", delimiter)
        if field == "question_stem":  # OpenBookQA: the stem continued by each choice, as lm-eval's openbookqa
            stem = obj[field]
            return Choice(stem, tuple(_join(stem, t, delimiter) for t in texts), ex.label, where, texts=ex.texts)
        return ex
    if "sentence" in obj and "option1" in obj:  # Winogrande: the blank filled by each option, the rest scored
        return _winogrande(obj, where)
    if "goal" in obj and "sol1" in obj:  # PIQA
        return _question(obj, "goal", [obj.get("sol1"), obj.get("sol2")], "label", where, delimiter)
    if "choices" in obj:  # generic, or MMLU as the Hugging Face Hub ships it ("question" for "context")
        if not isinstance(obj.get("context"), str) and isinstance(obj.get("question"), str):
            return _question(obj, "question", _strings(obj, "choices", where), "answer", where, delimiter)
        if not isinstance(obj.get("context"), str):
            raise ValueError(f"{where}: missing field 'context' (a string)")
        choices = _strings(obj, "choices", where)
        if "answer" not in obj:
            raise ValueError(f"{where}: missing field 'answer'")
        ctx = obj["context"]
        return Choice(ctx, tuple(_join(ctx, c, delimiter) for c in choices),
                      _label(obj["answer"], choices, where, "answer"), where, texts=tuple(choices))
    raise ValueError(f"{where}: not a multiple-choice example: expected 'ctx' + 'endings' + 'label' (HellaSwag), "
                     f"'context' (or 'question') + 'choices' + 'answer', ARC's 'question' + 'choices' + "
                     f"'answerKey', PIQA's 'goal' + 'sol1' + 'sol2' + 'label', or Winogrande's 'sentence' + "
                     f"'option1' + 'option2' + 'answer'; fields: {sorted(obj)}")


def _winogrande(obj: dict, where: str) -> Choice:
    """lm-eval's partial scoring: context j = the sentence up to the blank with option j in it, and the same
    continuation for both (the rest of the sentence), so only how well each option fits the rest is compared."""
    sentence, options = obj.get("sentence"), [obj.get("option1"), obj.get("option2")]
    if not isinstance(sentence, str) or sentence.count("_") != 1:
        raise ValueError(f"{where}: field 'sentence' must be a string with one '_' blank, got {sentence!r}")
    if not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: fields 'option1' and 'option2' must be strings, got {options!r}")
    if obj.get("answer") in ("", None):
        raise ValueError(f"{where}: missing field 'answer' (Winogrande's test split has no answers)")
    if str(obj["answer"]).strip() not in ("1", "2"):
        raise ValueError(f"{where}: field 'answer' must be 1 or 2 (the option), got {obj['answer']!r}")
    head, rest = sentence.split("_")
    cont = " " + rest.strip()
    return Choice(sentence, (cont, cont), int(str(obj["answer"]).strip()) - 1, where,
                  tuple(head + o for o in options))


def _question(obj: dict, field: str, choices: list, answer: str, where: str, delimiter: str) -> Choice:
    """A question (obj[field]) asked as "Question: <q>\nAnswer:", its choices, the index obj[answer] names."""
    q = obj.get(field)
    if not isinstance(q, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {q!r}")
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: the choices must be at least 2 strings, got {choices!r}")
    if answer not in obj:
        raise ValueError(f"{where}: missing field {answer!r}")
    return _asked(q, choices, _label(obj[answer], choices, where, answer), where, delimiter)


def _lettered(stem, texts: list, labels: list, obj: dict, where: str, stem_field: str, choices_field: str,
              delimiter: str) -> Choice:
    """ARC / OpenBookQA: choices labelled ("A".. or "1"..), the right one named by obj["answerKey"]."""
    if not isinstance(stem, str):
        raise ValueError(f"{where}: missing field {stem_field!r} (a string)")
    if len(texts) < 2 or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{where}: field {choices_field!r} must be at least 2 strings, got {texts!r}")
    labels, key = [str(x).strip() for x in labels], str(obj.get("answerKey")).strip()
    if key not in labels:
        raise ValueError(f"{where}: field 'answerKey' must be one of the choice labels {labels}, "
                         f"got {obj.get('answerKey')!r}")
    return _asked(stem, texts, labels.index(key), where, delimiter)


def _asked(question: str, choices: list[str], label: int, where: str, delimiter: str) -> Choice:
    """A question as "Question: <q>\\nAnswer:", each choice a continuation of it (ARC, MMLU, PIQA, ...)."""
    ctx = f"Question: {question}\nAnswer:"
    return Choice(ctx, tuple(_join(ctx, c, delimiter) for c in choices), label, where, texts=tuple(choices))


def _mmlu_csv(path: Path, delimiter: str) -> list[Choice]:
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM (saved by Excel) is not the question's
        for lineno, row in enumerate(csv.reader(f), 1):
            where = f"{path}:{lineno}"
            if not row:
                continue
            if len(row) < 4:
                raise ValueError(f"{where}: expected question, at least 2 choices and the answer letter, "
                                 f"got {len(row)} columns")
            choices = row[1:-1]
            out.append(_asked(row[0], choices, _label(row[-1], choices, where, "answer"), where, delimiter))
    return out


def load_multiple_choice(paths, limit: int | None = None, delimiter: str = " ") -> list[Choice]:
    """Examples of JSONL or Parquet (any form of the module doc) and MMLU CSV files, in order; the first `limit`.
    delimiter: what joins a context and a choice (not HellaSwag's endings, which always get a space)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Choice] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"multiple-choice file not found: {path}")
        if path.suffix == ".csv":
            out += _mmlu_csv(path, delimiter)
        else:
            for where, obj in iter_records(path):
                out.append(parse_choice(obj, where, delimiter))
                if limit is not None and len(out) >= limit:
                    break
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no multiple-choice examples in {', '.join(map(str, paths))}")
    return out[:limit]


# ---- documents for bits per byte --------------------------------------------------------------------------------


def _shards(paths: list[Path], split: str) -> list[Path] | None:
    """Token shard files named by `paths` (a folder with <split>_*.bin, or .bin files), or None if they are text."""
    if all(p.suffix == ".bin" for p in paths):
        return paths
    if len(paths) == 1 and paths[0].is_dir():
        found = sorted(paths[0].glob(f"{split}_*.bin"))
        if found:
            return found
        if any(paths[0].glob("*.bin")):
            raise ValueError(f"{paths[0]}: no {split}_*.bin token shards (choose the split with --split)")
    return None


def load_documents(paths, tokenizer, limit: int | None = None, split: str = "val") -> list[np.ndarray]:
    """Token sequences to score, each starting with the tokenizer's BOS (Llama 3's <|begin_of_text|>), else
    <|endoftext|> (its first token is context, not scored): one per text document ([start] + its tokens), or one
    per token shard (as written by `fastllm prepare`, where every document already starts with eot; `limit` then
    caps the tokens per shard). Text documents: the first `limit`."""
    from ..data import _input_files, iter_documents, read_shard

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("bits per byte needs text: give --data files, folders or token shards")
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
    shards = _shards([Path(p) for p in paths], split)
    if shards is not None:
        seqs = [np.asarray(read_shard(p)[: None if limit is None else limit + 1], np.int64) for p in shards]
        return [s for s in seqs if len(s) > 1]
    start = tokenizer.start_token
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an <|endoftext|> token to start documents with")
    docs = list(itertools.islice(iter_documents(_input_files([str(p) for p in paths])), limit))
    if not docs:
        raise ValueError(f"no documents in {', '.join(map(str, paths))}")
    encoded = tokenizer.encode_batch(docs, disallowed_special=())
    return [np.concatenate([[start], np.asarray(ids, np.int64)]) for ids in encoded]


def token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes per token id (int64, vocab_size entries); 0 for special tokens and ids the tokenizer lacks,
    which bits per byte therefore leaves out (as nanochat does)."""
    special = set(tokenizer.special_tokens.values())
    out = np.zeros(vocab_size, np.int64)
    for i in range(min(vocab_size, tokenizer.n_vocab)):
        if i not in special:
            try:
                out[i] = len(tokenizer.token_to_bytes(i))
            except ValueError:
                pass  # a gap in the ids
    return out
