"""Hugging Face checkpoints' tokenizers: tokenizer.json files configured like Llama 3's, Qwen2/2.5/3's, SmolLM's,
GPT-2's and GPT-NeoX's (split regexes, added and special tokens, NFC, BOS post-processor, ignore_merges), built and
trained here with HF `tokenizers`, give HF's ids on multilingual text through Tokenizer.from_pretrained, on the
native pre-tokenizers; SentencePiece-style files (Llama 2, Mistral, TinyLlama: BPE over characters, byte fallback) built
from models trained with sentencepiece give HF's and sentencepiece's ids; they survive save/load both ways; options
fastllm cannot reproduce are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from hf_families import FAMILIES, build_tokenizer, eval_texts, write_folder  # noqa: E402

from fastllm.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, HF tokenizer, folder holding its tokenizer.json and tokenizer_config.json)."""
    name = request.param
    hf = build_tokenizer(name)
    folder = write_folder(tmp_path_factory.mktemp(name), hf, name)
    return name, hf, folder


def test_ids_equal_hf(family):
    name, hf, folder = family
    tok = Tokenizer.from_pretrained(folder)
    assert tok.pattern == FAMILIES[name][0]  # recognised: the native scanner runs
    texts = eval_texts()
    for t in texts:
        want = hf.encode(t, add_special_tokens=False).ids
        ids = tok.encode(t, allowed_special="all")
        assert ids.tolist() == want, (name, t[:80])
        assert tok.decode(ids) == hf.decode(want, skip_special_tokens=False)
    batch = tok.encode_batch(texts, allowed_special="all", threads=2)
    assert [b.tolist() for b in batch] == [hf.encode(t, add_special_tokens=False).ids for t in texts]
    # specials are tokens of their own; non-BPE vocab is not degenerate
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2


def test_bos_and_special_policy(family):
    name, hf, folder = family
    tok = Tokenizer.from_pretrained(folder)
    bos = FAMILIES[name][5]
    assert tok.bos_token == (None if bos is None else hf.token_to_id(bos))
    text = "Hello, world! 123"
    with_bos = hf.encode(text).ids  # add_special_tokens=True: HF's post-processor
    assert with_bos == ([] if tok.bos_token is None else [tok.bos_token]) + tok.encode(text).tolist()
    special = FAMILIES[name][3][-1]
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(f"a {special} b")  # tiktoken's policy for special tokens
    for plain in FAMILIES[name][4]:  # HF's non-special added tokens: matched in any text, as HF does
        t = f"x {plain} y"
        assert tok.encode(t).tolist() == tok.encode_ordinary(t).tolist() == hf.encode(t).ids


def test_save_load_round_trips(family, tmp_path):
    name, hf, folder = family
    tok = Tokenizer.from_pretrained(folder)
    texts = eval_texts()
    tok.save_hf(tmp_path / "tokenizer.json")  # fastllm -> HF: HF and fastllm read it back with the same ids
    again = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    back = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert back.pattern == tok.pattern and back.bos_token == tok.bos_token
    for t in texts:
        want = hf.encode(t).ids
        assert again.encode(t).ids == want
        assert back.encode(t, allowed_special="all").tolist() == tok.encode(t, allowed_special="all").tolist()
    if tok._is_ranks:  # tiktoken rank semantics (Llama 3's ignore_merges files): the fastllm format too
        tok.save(tmp_path / "tok.tiktoken")
        loaded = Tokenizer.load(tmp_path / "tok.tiktoken")
        assert (loaded.bos_token, loaded.pattern) == (tok.bos_token, tok.pattern)
        for t in texts:
            assert loaded.encode(t, allowed_special="all").tolist() == hf.encode(t, add_special_tokens=False).ids


def test_rank_tokenizer_with_hf_options(tmp_path):
    """A tiktoken-rank tokenizer in Llama 3's layout (pattern, BOS post-processor, NFC, a non-special added
    token) written by save_hf gives the same ids in HF, reads back with rank semantics, and keeps every option
    through fastllm's own format."""
    from hf_families import training_text

    tok = Tokenizer.train(training_text()[:100_000], vocab_size=600, pattern="llama3",
                          special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<x>"], progress=False)
    tok._set_hf_options("NFC", ["<x>"], tok.special_tokens["<|begin_of_text|>"])
    tok.save_hf(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    back = Tokenizer.from_pretrained(tmp_path)
    assert back._is_ranks and back.pattern == "llama3" and back.bos_token == tok.bos_token
    back.save(tmp_path / "t.tiktoken")
    again = Tokenizer.load(tmp_path / "t.tiktoken")
    for t in eval_texts() + ["Cafe\u0301 <x> y"]:
        ids = tok.encode(t, allowed_special="all").tolist()
        assert hf.encode(t, add_special_tokens=False).ids == ids
        assert back.encode(t, allowed_special="all").tolist() == ids == again.encode(t, allowed_special="all").tolist()
    assert hf.encode("hi").ids == [tok.bos_token] + again.encode("hi").tolist()
    side = json.loads((tmp_path / "t.tiktoken.json").read_text())
    side["bos_token"] = 5  # not a special token
    (tmp_path / "t.tiktoken.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"t.tiktoken.json:1: bos_token 5 is not the id of a special token"):
        Tokenizer.load(tmp_path / "t.tiktoken")


def test_neox_layout_lists_added_tokens_in_the_vocab(tmp_path):
    """GPT-NeoX-20B's (Pythia's) tokenizer.json lists its whitespace tokens in model.vocab too, as the literal spaces
    (no byte-level token): read as added tokens, the same ids as HF's; save_hf keeps <|endoftext|> at id 0."""
    hf = build_tokenizer("neox", 600)
    doc = json.loads(hf.to_str())
    doc["model"]["vocab"].update({t["content"]: t["id"] for t in doc["added_tokens"]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    code = "def f(x):\n        return x  # 8 spaces\n" + " " * 30 + "y\t  z<|endoftext|>"
    for t in [code, *eval_texts()]:
        assert tok.encode(t, allowed_special="all").tolist() == hf.encode(t).ids
    assert tok.special_tokens["<|endoftext|>"] == 0 and tok.encode("  ").tolist() == [hf.token_to_id("  ")]


def test_transformers_autotokenizer_agrees(family):
    transformers = pytest.importorskip("transformers")
    name, hf, folder = family
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer.from_pretrained(folder)
    for t in eval_texts()[:20]:
        ids = tok.encode(t, allowed_special="all").tolist()
        assert auto(t, add_special_tokens=False)["input_ids"] == ids
        assert auto(t)["input_ids"] == ([] if tok.bos_token is None else [tok.bos_token]) + ids


def with_specials_inside(tok, family: str, rng) -> list[list[int]]:
    """Id sequences of eval_texts() with the family's special and non-special added tokens put in at random places
    (also between the bytes of a character), as a model may write them."""
    names = FAMILIES[family][3] + FAMILIES[family][4]
    extra = [tok.special_tokens[s] for s in names]
    out = []
    for t in eval_texts()[:30]:
        ids = tok.encode(t, allowed_special="all").tolist()
        for _ in range(rng.integers(1, 6)):
            ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.choice(extra)))
        out.append(ids)
    return out


def test_decode_skips_special_tokens_as_hf(family):
    """decode / decode_batch(skip_special_tokens=True) leave out the special tokens, as HF's tokenizers and
    transformers' decode(ids, skip_special_tokens=True) do, and keep the added tokens HF does not mark special
    (Qwen's <tool_call>, <think>); the default keeps every token, as HF's default does."""
    transformers = pytest.importorskip("transformers")
    name, hf, folder = family
    tok = Tokenizer.from_pretrained(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.special_ids == {tok.special_tokens[s] for s in FAMILIES[name][3]}
    batch = with_specials_inside(tok, name, np.random.default_rng(0))
    for ids in batch:
        want = hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=True) == want == auto.decode(ids, skip_special_tokens=True)
        assert tok.decode(np.array(ids, np.int32), skip_special_tokens=True) == want
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == auto.decode(ids)
    want = [hf.decode(ids, skip_special_tokens=True) for ids in batch]
    assert tok.decode_batch(batch, skip_special_tokens=True, threads=2) == want
    assert auto.batch_decode(batch, skip_special_tokens=True) == want
    special = tok.special_tokens[FAMILIES[name][3][-1]]
    for plain in FAMILIES[name][4]:
        ids = tok.encode(f"a{plain}b", allowed_special="all").tolist() + [special]
        assert tok.decode(ids, skip_special_tokens=True) == f"a{plain}b" == auto.decode(ids, skip_special_tokens=True)
    # errors="strict" names the token holding the bad byte by its index in the ids given
    piece = next((i for i in tok.byte_fallback_ids if tok.token_to_bytes(i) == b"\xe4"),  # (SentencePiece's)
                 tok.encode("\u4f60").tolist()[0])
    bad = [special, special, piece]
    assert len(tok.token_to_bytes(bad[-1])) < 3  # (a piece of the character)
    with pytest.raises(ValueError, match=r"token index 2, id"):
        tok.decode(bad, errors="strict", skip_special_tokens=True)


def test_text_streamer_matches_transformers_text_streamer(family):
    """TextStreamer(tok, skip_special_tokens=True) streams what transformers' TextStreamer(tokenizer,
    skip_special_tokens=True) prints, and TextStreamer(tok) what its default (no decode_kwargs) prints: the
    special tokens too."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from fastllm.sample import TextStreamer

    class Printed(transformers.TextStreamer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text

    name, hf, folder = family
    tok = Tokenizer.from_pretrained(folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for ids in with_specials_inside(tok, name, np.random.default_rng(1)):
        for kw in ({}, {"skip_special_tokens": True}, {"skip_special_tokens": False}):
            theirs, ours = Printed(auto, **kw), TextStreamer(tok, **kw)
            text = ""
            for t in ids:
                theirs.put(torch.tensor([t]))
                text += ours.push(t)
            theirs.end()
            assert text + ours.flush() == tok.decode(ids, **kw), (name, kw)
            if not tok.strips_leading_space:  # (transformers' streamer decodes each line anew after a newline: with a
                assert theirs.text == tok.decode(ids, **kw)  # SentencePiece tokenizer, a line's first space is lost)


@pytest.mark.parametrize("name", ["llama3", "gpt2", "llama2", "mistral", "phi3", "gemma2"])
def test_encode_offsets_as_hf(name):
    """encode_offsets' token starts (bytes) are HF's offsets (characters; a token that starts inside a character
    starts at that character), with SentencePiece's prefix spaces (none: Gemma) and Phi-3's rstrip tokens."""
    hf = build_tokenizer(name, 800 if name in ("llama2", "mistral", "phi3", "gemma2") else 400)
    tok = Tokenizer._from_hf_doc(json.loads(hf.to_str()), "tokenizer.json")
    for t in eval_texts():
        ids, starts = tok.encode_offsets(t)
        want = hf.encode(t, add_special_tokens=False)
        assert ids.tolist() == want.ids
        char_of_byte = np.repeat(np.arange(len(t)), [len(c.encode()) for c in t])  # byte -> its character
        assert [int(char_of_byte[b]) if b < len(char_of_byte) else len(t) for b in starts] == \
            [a for a, _ in want.offsets], (name, t[:60])


def test_split_that_removes_what_the_regex_leaves():
    """A Split that keeps the regex's matches and removes the text between them ("Removed", invert: tiktoken
    conversions' form, OLMo 2's dolma2 tokenizer, whose cl100k regex is Llama 3's native split) gives HF's ids, with
    a regex that leaves text out too; one that removes the matches (no invert) is refused by name."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as P

    hf = build_tokenizer("gpt2", 400)
    byte_level = P.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = P.Sequence([P.Split(Regex(r"\p{L}+| ?\p{N}"), "removed", invert=True), byte_level])
    doc = json.loads(hf.to_str())
    tok = Tokenizer._from_hf_doc(doc, "tokenizer.json")
    for t in eval_texts():
        assert tok.encode(t, allowed_special="all").tolist() == hf.encode(t, add_special_tokens=False).ids, t[:80]
    doc["pre_tokenizer"]["pretokenizers"][0]["invert"] = False
    with pytest.raises(ValueError, match="unsupported pre_tokenizer"):
        Tokenizer._from_hf_doc(doc, "tokenizer.json")


def test_nfc_normalizer():
    """Qwen2's files normalize to NFC: decomposed input gives the ids of the composed text."""
    hf = build_tokenizer("qwen2", vocab_size=600)
    doc = json.loads(hf.to_str())
    assert doc["normalizer"]["type"] == "NFC"
    tok = Tokenizer._from_hf_doc(doc, "tokenizer.json")
    nfd, nfc = "Cafe\u0301 nai\u0308ve n\u0303", "Café naïve ñ"
    assert tok.encode(nfd).tolist() == tok.encode(nfc).tolist() == hf.encode(nfd).ids


# ---- SentencePiece-style files (Llama 2, Mistral, TinyLlama): BPE over characters with byte fallback ------------

SP_TEXTS = [
    "Hello<s>world</s> x", "<s>Hi", "</s>", "  two  spaces ", "   ", "a\u2581b \u2581c\u2581", "\u2581x",
    "\U0001F600 \u00e9\u00e8 \u4e2d\u6587 \u0915\u094d\u0937 \u0e01\u0e02 \u2603\u2603 q\U0001F9EA\U0001F9EA",
    "x<unk>y", "tab\tnew\nline\r\n", "<s> <s>  </s>",
]


@pytest.mark.parametrize("metaspace,split", [(None, False), ("first", False), ("always", False), ("always", True),
                                             ("first", True), ("never", False), ("gemma", False)])
def test_sentencepiece_variants_equal_hf(metaspace, split):
    """Llama 2's legacy normalizer, each Metaspace setting and Gemma's layout (a Replace normalizer alone: no
    prefix space; a Split(' ') pre-tokenizer after it, no Strip decoder, a "\t" token) give HF's ids (special
    tokens and leading spaces where the variants differ, characters only byte fallback can spell) and HF's decoded
    text."""
    from hf_families import gemma_layout, sentencepiece_doc

    doc = sentencepiece_doc(metaspace=None if metaspace == "gemma" else metaspace, split=split)
    if metaspace == "gemma":
        doc = gemma_layout(doc)
    hf = tokenizers.Tokenizer.from_str(json.dumps(doc))
    tok = Tokenizer._from_hf_doc(doc, "tokenizer.json")
    assert tok.pattern == ("metaspace" if split else "whole") and tok.bos_token == 1
    texts = eval_texts() + SP_TEXTS
    for t in texts:
        want = hf.encode(t, add_special_tokens=False).ids
        assert tok.encode(t, allowed_special="all").tolist() == want, t[:80]
        assert tok.decode(want) == hf.decode(want, skip_special_tokens=False), t[:80]
        if not t.startswith("<s>"):  # (encode_prompt does not put a second <s> before one, HF does)
            assert tok.encode_prompt(t).tolist() == hf.encode(t).ids
        plain = hf.encode(t.replace("<", "\u2039"), add_special_tokens=False).ids  # no special tokens in the text
        assert tok.encode(t.replace("<", "\u2039")).tolist() == plain
    batch = tok.encode_batch(texts, allowed_special="all", threads=2)
    assert [b.tolist() for b in batch] == [hf.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.decode_batch(batch) == [hf.decode(b.tolist(), skip_special_tokens=False) for b in batch]


def test_sentencepiece_equals_sentencepiece_library():
    """Llama 2's layout encodes and decodes as the sentencepiece library does with the model it came from."""
    spm = pytest.importorskip("sentencepiece")
    from hf_families import sentencepiece_doc, sentencepiece_model

    sp = spm.SentencePieceProcessor(model_file=sentencepiece_model(3000))
    tok = Tokenizer._from_hf_doc(sentencepiece_doc(), "tokenizer.json")
    fallback = 0
    for t in eval_texts() + [s for s in SP_TEXTS if "<" not in s]:
        ids = sp.encode(t)
        assert tok.encode(t).tolist() == ids, t[:80]
        assert tok.decode(ids) == sp.decode(ids)
        fallback += sum(sp.is_byte(i) for i in ids)
    assert fallback > 20  # the byte-fallback path ran
    assert tok.token_to_bytes(sp.piece_to_id("<0xE2>")) == b"\xe2"
    assert tok.token_to_bytes(sp.piece_to_id("\u2581the")) == b" the"


def llama2_style_doc(variant: str) -> dict:
    """A small SentencePiece-style tokenizer.json built with tokenizers: Llama 2's layout, or tokenizers' default
    Metaspace (prepend always, split) without byte fallback (unknown characters become <unk>, fused)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    from tokenizers import pre_tokenizers as P

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "a": 4, "\u2581a": 5,
             **{f"<0x{b:02X}>": 6 + b for b in range(256)}}
    tok = HFTokenizer(models.BPE(vocab, [("\u2581", "a")], unk_token="<unk>", byte_fallback=variant == "llama2",
                                 fuse_unk=True))
    if variant == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = P.Metaspace()
        tok.decoder = decoders.Metaspace()
    return json.loads(tok.to_str())


@pytest.mark.parametrize("variant", ["llama2", "metaspace"])
@pytest.mark.parametrize("fuse_unk", [True, False])
def test_sentencepiece_unknown_characters(tmp_path, variant, fuse_unk):
    doc = llama2_style_doc(variant)
    doc["model"]["fuse_unk"] = fuse_unk
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    for t in ["a", "aa a", "xyz a \u2603\u2603 a b", " a<s>a", "", "  ", "\u00e9a"]:
        want = hf.encode(t, add_special_tokens=False).ids
        assert tok.encode(t, allowed_special="all").tolist() == want, t
        assert tok.decode(want) == hf.decode(want, skip_special_tokens=False)


def test_sentencepiece_token_across_a_space():
    """Files without a pre-tokenizer run BPE over the whole text; fastllm splits it before each run of spaces (so
    that the chunk cache works) only when no token has a space after another character: a token like 'a▁a' must
    still merge across the space, as HF does."""
    doc = llama2_style_doc("llama2")
    doc["model"]["vocab"]["a\u2581a"] = len(doc["model"]["vocab"])
    doc["model"]["merges"].append(["a", "\u2581a"])
    hf = tokenizers.Tokenizer.from_str(json.dumps(doc))
    tok = Tokenizer._from_hf_doc(doc, "tokenizer.json")
    for t in ["ba a", "ba  a", "a a a", "b a"]:
        assert tok.encode(t).tolist() == hf.encode(t, add_special_tokens=False).ids, t
    assert hf.encode("ba a", add_special_tokens=False).tokens == ["\u2581", "<0x62>", "a\u2581a"]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(normalizer={"type": "Precompiled", "precompiled_charsmap": "AA=="}),
         "normalizer .*Precompiled.* not supported"),
        (lambda d: d.update(normalizer=None), "neither a Metaspace pre-tokenizer nor a Replace"),
        (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "_", "prepend_scheme": "always"}),
         "pre_tokenizer .*Metaspace.* is not supported"),
        # (Gemma's Split(' ') after the Replace finds no space; one at '▁' would split the text)
        (lambda d: d.update(pre_tokenizer={"type": "Split", "pattern": {"String": "\u2581"},
                                           "behavior": "MergedWithPrevious", "invert": False}),
         "pre_tokenizer .*Split.* is not supported"),
        (lambda d: d.update(normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "_"}),
         "Metaspace replacement '_' is not supported"),
        (lambda d: d.update(decoder={"type": "WordPiece", "prefix": "##", "cleanup": True}),
         "decoder .*WordPiece.* is not supported"),
        (lambda d: d["model"].update(unk_token="<missing>"), "model.unk_token '<missing>' is not in the vocab"),
        (lambda d: d["model"]["merges"].append(["<0x41>", "<0x42>"]), "merge .* uses a token missing from the vocab"),
        (lambda d: d["model"].update(dropout=0.1), "model.dropout=0.1 is not supported"),
    ],
)
def test_sentencepiece_unsupported_named(tmp_path, edit, match):
    doc = llama2_style_doc("llama2")
    edit(doc)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path)


# ---- a folder with a SentencePiece tokenizer.model and no tokenizer.json (converted: fastllm.spm) ----------------

USER_DEFINED = ("<sep>", "\u2014")  # the second (an em dash) is in some of eval_texts()
SPM_VARIANTS = {  # trainer settings changed from Llama 2's (hf_families.sentencepiece_model)
    "llama2": {},
    "no_byte_fallback": dict(byte_fallback=False, character_coverage=0.99),  # unknown characters: <unk>, fused
    "user_defined": dict(user_defined_symbols=USER_DEFINED),
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    # the trainer's splits only limit which pieces it learns: encoding is the same BPE over the whole text
    "splits_off": dict(split_by_unicode_script=False, split_by_whitespace=False, split_by_number=False,
                       split_digits=False),
}


def spm_folder(folder, model_file: str, **config):
    """A model folder with only tokenizer.model and tokenizer_config.json (LlamaTokenizer's, with `config`)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, folder / "tokenizer.model")
    conf = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    return folder


def spm_model(variant: str) -> str:
    from hf_families import sentencepiece_model

    return sentencepiece_model(3000, **SPM_VARIANTS[variant])


@pytest.mark.parametrize("variant", list(SPM_VARIANTS))
def test_sentencepiece_model_equals_sentencepiece_library(tmp_path, variant):
    """A folder with only tokenizer.model encodes as the sentencepiece library does with it (byte fallback or
    <unk>, trainer splits off, no dummy prefix), decodes as it does, and puts <s> first in encode_prompt. The one
    difference is HF's: the text after a user-defined piece gets its own dummy prefix."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    sp = spm.SentencePieceProcessor(model_file=spm_model(variant))
    tok = Tokenizer.from_pretrained(spm_folder(tmp_path, spm_model(variant)))
    assert tok.pattern == "whole" and tok.bos_token == 1 and tok.n_vocab == sp.get_piece_size()
    seen = {"byte": 0, "unk": 0, "user": 0}
    for t in eval_texts() + [s for s in SP_TEXTS if "<" not in s]:
        ids = sp.encode(t)
        seen["byte"] += sum(sp.is_byte(i) for i in ids)
        seen["unk"] += sum(sp.is_unknown(i) for i in ids)
        if variant == "user_defined" and any(u in t for u in USER_DEFINED):
            seen["user"] += 1
            # HF's layout: each stretch between user-defined pieces is encoded as a text of its own
            parts = t.split("\u2014")
            want = sum(([sp.piece_to_id("\u2014")] + sp.encode(p) if k else sp.encode(p)
                        for k, p in enumerate(parts)), [])
            assert tok.encode(t).tolist() == want != ids, t[:80]
            continue
        assert tok.encode(t).tolist() == ids, (variant, t[:80])
        assert tok.encode_prompt(t).tolist() == [1] + ids
        if not seen["unk"]:  # (sentencepiece decodes <unk> as " \u2047 ", HF as "<unk>")
            assert tok.decode(ids) == sp.decode(ids), (variant, t[:80])
    assert seen["byte"] > 20 if variant != "no_byte_fallback" else seen["unk"] > 5  # the fallback paths ran
    if variant == "user_defined":
        assert seen["user"] >= 2
        assert sp.encode("x\u2014y", out_type=str) == ["\u2581x", "\u2014", "y"]
        assert [tok.token_to_bytes(i) for i in tok.encode("x\u2014y")] == [b" x", "\u2014".encode(), b" y"]


def transformers_conversion(model_file: str, legacy: bool):
    """transformers' own LlamaConverter run on `model_file`: an HF tokenizers.Tokenizer. (transformers 5 has no
    slow LlamaTokenizer, and its SentencePieceExtractor.extract no longer takes the scores LlamaConverter passes:
    the shim gives the converter what transformers 4's extractor gave, generate_merges by piece score.)"""
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    from transformers.convert_slow_tokenizer import LlamaConverter

    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        from transformers.convert_slow_tokenizer import generate_merges
    sp = spm.SentencePieceProcessor(model_file=model_file)

    class Extractor:
        def __init__(self, path):
            pass

        def extract(self, vocab_scores=None):
            vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            return vocab, generate_merges(vocab, vocab_scores)

    class Converter(LlamaConverter):
        SpmExtractor = Extractor

    class Slow:  # what LlamaConverter reads of the slow tokenizer
        vocab_file, add_prefix_space = model_file, True

        def convert_ids_to_tokens(self, i):
            return sp.id_to_piece(i)

    slow = Slow()
    slow.legacy = legacy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (LlamaConverter warns about byte fallback)
        hf = Converter(slow).converted()
    hf.add_special_tokens([tokenizers.AddedToken("<unk>", special=True, normalized=False)])  # (LlamaTokenizerFast's)
    return hf


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("variant", ["llama2", "user_defined", "no_byte_fallback"])
def test_sentencepiece_model_equals_transformers(tmp_path, variant, legacy):
    """The conversion gives the ids of transformers' LlamaConverter (legacy: the Prepend normalizer; legacy=false:
    Metaspace, prepend_scheme first) and, for legacy=false with byte fallback, of transformers' AutoTokenizer on the
    same folder."""
    model = spm_model(variant)
    folder = spm_folder(tmp_path, model, legacy=legacy)
    tok = Tokenizer.from_pretrained(folder)
    refs = [transformers_conversion(model, legacy)]
    # (transformers 5 builds legacy LlamaTokenizers with Metaspace, not the Prepend normalizer, and with no
    # unk_token, so that without byte fallback it drops unknown characters)
    if not legacy and variant != "no_byte_fallback":
        from transformers import AutoTokenizer

        refs.append(AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer)
    texts = eval_texts() + SP_TEXTS + ["\u2014x", "x\u2014", " \u2014 ", "<sep><sep> a"]
    for t in texts:
        ids = tok.encode(t, allowed_special="all").tolist()
        for hf in refs:
            assert ids == hf.encode(t, add_special_tokens=False).ids, (variant, legacy, t[:80])
        assert tok.decode(ids) == refs[0].decode(ids, skip_special_tokens=False), (variant, legacy, t[:80])


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_model_save_hf(tmp_path, legacy):
    """save_hf of a converted tokenizer.model writes a tokenizer.json that HF tokenizers and fastllm load to the
    same ids (<s> first through HF's post-processor)."""
    tok = Tokenizer.from_pretrained(spm_folder(tmp_path / "src", spm_model("user_defined"), legacy=legacy))
    tok.save_hf(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_pretrained(tmp_path)
    for t in eval_texts() + SP_TEXTS:
        ids = tok.encode(t, allowed_special="all").tolist()
        assert hf.encode(t, add_special_tokens=False).ids == ids == again.encode(t, allowed_special="all").tolist()
        assert hf.encode(t).ids == [1] + ids
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids) == again.decode(ids)
    assert again.bos_token == 1 and again.plain_tokens == frozenset(USER_DEFINED)


def test_sentencepiece_model_config(tmp_path):
    """tokenizer_config.json's settings: the model file named directly, add_bos_token false, added tokens after
    the vocab (added_tokens_decoder, as Llama 2 fine-tunes add <pad>), their lstrip/rstrip."""
    spm = pytest.importorskip("sentencepiece")
    model = spm_model("llama2")
    sp = spm.SentencePieceProcessor(model_file=model)
    added = {"0": {"content": "<unk>", "special": True}, "3000": {"content": "<pad>", "special": True},
             "3001": {"content": "<|end|>", "special": True, "rstrip": True}}
    folder = spm_folder(tmp_path, model, add_bos_token=False, added_tokens_decoder=added)
    tok = Tokenizer.from_pretrained(folder / "tokenizer.model")
    assert tok.bos_token is None
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3000, "<|end|>": 3001}
    t = "Hello<|end|>\n  world<pad>"
    ids = tok.encode(t, allowed_special="all").tolist()
    assert ids == sp.encode("Hello") + [3001] + sp.encode("world") + [3000]  # (<|end|> takes the whitespace after it)
    tok.save_hf(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(t).ids == ids and hf.decode(ids, skip_special_tokens=True) == "Hello world"


def edited_model(folder, edit) -> None:
    """folder/tokenizer.model: Llama 2's test model with `edit` applied to its ModelProto."""
    pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    with open(spm_model("llama2"), "rb") as f:
        m.ParseFromString(f.read())
    edit(m)
    spm_folder(folder, spm_model("llama2"))
    (folder / "tokenizer.model").write_bytes(m.SerializeToString())


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.trainer_spec.__setattr__("model_type", 1), "a SentencePiece UNIGRAM model .*not BPE"),
        (lambda m: (m.normalizer_spec.__setattr__("name", "nmt_nfkc"),
                    m.normalizer_spec.__setattr__("precompiled_charsmap", b"\0\0\0\0")),
         "normalizer_spec 'nmt_nfkc' rewrites the text"),
        (lambda m: m.normalizer_spec.__setattr__("remove_extra_whitespaces", True),
         "normalizer_spec.remove_extra_whitespaces=true"),
        (lambda m: m.normalizer_spec.__setattr__("escape_whitespaces", False),
         "normalizer_spec.escape_whitespaces=false"),
        (lambda m: m.trainer_spec.__setattr__("treat_whitespace_as_suffix", True),
         "trainer_spec.treat_whitespace_as_suffix=true"),
        (lambda m: m.pieces[500].__setattr__("type", 5), "1 unused pieces"),
    ],
)
def test_sentencepiece_model_refused(tmp_path, edit, match):
    edited_model(tmp_path, edit)
    with pytest.raises(ValueError, match=r"tokenizer.model: " + match):
        Tokenizer.from_pretrained(tmp_path)


def test_sentencepiece_model_refused_other(tmp_path, monkeypatch):
    """A real Unigram model, a file that is no model, tokenizer classes converted otherwise, EOS after every text,
    added tokens only added_tokens.json lists, and the packages missing: ValueErrors that say so."""
    from hf_families import sentencepiece_model

    spm_folder(tmp_path / "unigram", sentencepiece_model(1000, model_type="unigram", character_coverage=0.98))
    with pytest.raises(ValueError, match="a SentencePiece UNIGRAM model"):
        Tokenizer.from_pretrained(tmp_path / "unigram")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.model").write_bytes(b"\x0a\x0bsentencepiece")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path / "junk")
    spm_folder(tmp_path / "gemma", spm_model("llama2"), tokenizer_class="GemmaTokenizer")
    with pytest.raises(ValueError, match="tokenizer_class 'GemmaTokenizer'"):
        Tokenizer.from_pretrained(tmp_path / "gemma")
    spm_folder(tmp_path / "eos", spm_model("llama2"), add_eos_token=True)
    with pytest.raises(ValueError, match="adds no tokens after the text"):
        Tokenizer.from_pretrained(tmp_path / "eos")
    spm_folder(tmp_path / "extra", spm_model("llama2"))
    (tmp_path / "extra" / "added_tokens.json").write_text(json.dumps({"<pad>": 3000}))
    with pytest.raises(ValueError, match="added_tokens.json: added tokens that .* does not list .*'<pad>': 3000"):
        Tokenizer.from_pretrained(tmp_path / "extra")
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    with pytest.raises(ValueError, match=r"pip install sentencepiece protobuf\); or give the folder its tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "eos")


STRIP_TEXTS = ["a  {x}  b", "{x}\n\nb", "a\u3000\u00a0{x}\u2003\tb", "{x}  {y}  {x}", "  {y}{y}  ", "{y} \n{x}",
               "no specials  here ", "{x}", " {y} "]


@pytest.mark.parametrize("family", ["llama3", "llama2", "regex"])
def test_added_tokens_lstrip_rstrip(family, tmp_path):
    """Added tokens with lstrip / rstrip (Phi-3's take the whitespace after them: the newline its chat template
    puts after <|user|>) take the Unicode whitespace on that side with them, as HF does, but never back across
    the previous special token; on the native encoder and on the `regex` path of custom patterns."""
    from hf_families import sentencepiece_doc

    if family == "llama2":
        doc = sentencepiece_doc()
    else:
        doc = json.loads(build_tokenizer("llama3", vocab_size=400).to_str())
        if family == "regex":  # a split that is not a native pattern
            doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    n = max(t["id"] for t in doc["added_tokens"]) + 1
    n = max(n, len(doc["model"]["vocab"]))
    doc["added_tokens"] += [
        {"id": n, "content": "<|x|>", "single_word": False, "lstrip": False, "rstrip": True, "normalized": False,
         "special": True},
        {"id": n + 1, "content": "<|y|>", "single_word": False, "lstrip": True, "rstrip": True, "normalized": False,
         "special": True}]
    hf = tokenizers.Tokenizer.from_str(json.dumps(doc))
    tok = Tokenizer._from_hf_doc(doc, "tokenizer.json")
    for t in STRIP_TEXTS:
        t = t.format(x="<|x|>", y="<|y|>")
        want = hf.encode(t, add_special_tokens=False).ids
        assert tok.encode(t, allowed_special="all").tolist() == want, (family, t)
        assert [a.tolist() for a in tok.encode_batch([t, t], allowed_special="all")] == [want, want]
        char_of_byte = np.repeat(np.arange(len(t)), [len(c.encode()) for c in t])  # (as test_encode_offsets_as_hf)
        starts = tok.encode_offsets(t)[1]
        assert [int(char_of_byte[b]) for b in starts] == [a for a, _ in hf.encode(t, add_special_tokens=False).offsets]
    tok.save_hf(tmp_path / "tokenizer.json")  # the flags are written back (and kept by fastllm's own format)
    again = [tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), Tokenizer.load_hf(tmp_path /
                                                                                                  "tokenizer.json")]
    if tok._is_ranks:
        tok.save(tmp_path / "t.tiktoken")
        again.append(Tokenizer.load(tmp_path / "t.tiktoken"))
    for t in STRIP_TEXTS:
        t = t.format(x="<|x|>", y="<|y|>")
        want = hf.encode(t, add_special_tokens=False).ids
        assert again[0].encode(t, add_special_tokens=False).ids == want
        assert all(a.encode(t, allowed_special="all").tolist() == want for a in again[1:])


def base_doc() -> dict:
    return json.loads(build_tokenizer("llama3", vocab_size=400).to_str())


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["added_tokens"][0].update(single_word=True),
         "added token '<|begin_of_text|>' has single_word=true"),
        (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer .*Lowercase.* not supported"),
        (lambda d: d.update(post_processor={"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}),
         "post_processor of type 'RobertaProcessing' is not supported"),
        (lambda d: d["post_processor"]["processors"][1]["single"].append(
            {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}}), "adds no tokens after the text"),
        (lambda d: d["post_processor"]["processors"][1]["single"].__setitem__(0, {"SpecialToken": "<s>"}),
         "post_processor template item .*SpecialToken.* is not understood"),
        (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
        (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "unsupported pre_tokenizer"),
        (lambda d: d["model"].update(dropout=0.1), "model.dropout=0.1 is not supported"),
    ],
)
def test_unsupported_options_named(tmp_path, edit, match):
    doc = base_doc()
    edit(doc)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path)


def test_regex_fallback_for_other_patterns(tmp_path):
    """A Split regex that is not a native one still gives HF's ids (through the `regex` module)."""
    from tokenizers import Regex, decoders, models, trainers
    from tokenizers import pre_tokenizers as P

    pat = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = P.Sequence([P.Split(Regex(pat), "isolated"), P.ByteLevel(add_prefix_space=False,
                                                                                use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    from hf_families import training_text

    hf.train_from_iterator([training_text()[:100_000]], trainers.BpeTrainer(
        vocab_size=800, show_progress=False, initial_alphabet=P.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.pattern == pat
    for t in eval_texts()[:20]:
        assert tok.encode(t, allowed_special="all").tolist() == hf.encode(t).ids
    assert np.array_equal(tok.encode_batch(["ab 12"])[0], tok.encode("ab 12"))
