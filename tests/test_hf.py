"""Hugging Face interop: GPT-2 folders written by transformers load into fastllm with the same logits and greedy
generations, and folders fastllm writes load into transformers; sharded checkpoints; GPT-2 tokenizer files
(tokenizer.json from HF's own trainer, vocab.json + merges.txt) give HF's ids; bad files raise errors naming
the file and tensor; `fastllm convert` round trips. Tiny random models only: no downloads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastllm import checkpoint, cli, hf  # noqa: E402
from fastllm.checkpoint import load_model  # noqa: E402
from fastllm.fileio import load_safetensors, save_safetensors  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402
from fastllm.sample import generate  # noqa: E402
from fastllm.tokenizer import Tokenizer  # noqa: E402

V, T_MAX = 600, 48


def hf_model(seed: int = 0, **kw):
    """A random transformers GPT-2 with non-trivial layernorms and biases (so all of them are checked)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        **{
            **dict(n_layer=2, n_head=2, n_embd=32, n_positions=T_MAX, vocab_size=V, initializer_range=0.1),
            **kw,
        },
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers model, folder it saved itself to)."""
    model = hf_model()
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(d, safe_serialization=True)
    return model, d


@pytest.fixture(scope="module")
def text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return (
        "\n".join(topics[k] for k in sorted(topics))[:300_000]
        + "\nnaïve café 日本語 🙂 <|endoftext|> x\r\n\t y"
    )


@pytest.fixture(scope="module")
def hf_tokenizer(text):
    """A GPT-2-style byte-level BPE trained by HF tokenizers' own trainer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def samples(text: str) -> list[str]:
    return [text[:20_000], text[-3000:], " leading", "trailing  ", "a\n\n\nb", "x" * 300, "", "It's 12345!"]


# ---- weights ---------------------------------------------------------------------------------------------


def test_logits_match_transformers(hf_pair):
    ref, d = hf_pair
    model = GPT.from_pretrained(d)
    assert model.config == GPTConfig(block_size=T_MAX, vocab_size=V, n_layer=2, n_head=2, n_embd=32)
    ids = np.random.default_rng(0).integers(0, V, (3, T_MAX))
    out = model.forward(ids)
    want = hf_logits(ref, ids)
    assert np.abs(out - want).max() <= 1e-4
    assert np.abs(want).max() > 0.5  # not a degenerate near-zero comparison


def test_greedy_generation_matches_transformers(hf_pair):
    ref, d = hf_pair
    model = GPT.from_pretrained(d).eval()
    prompt = [5, 17, 99, 3]
    ours = generate(model, prompt, 30, temperature=0.0)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert ours == theirs[0].tolist()
    assert len(set(ours[4:])) > 1


def test_save_pretrained_loads_in_transformers(tmp_path):
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=3, n_head=4, n_embd=32), seed=3)
    rng = np.random.default_rng(1)
    for name, arr in model.p.items():
        if name.endswith(".bias") or name.startswith("ln_"):
            arr += rng.standard_normal(arr.shape).astype(np.float32) * 0.1
    model.save_pretrained(tmp_path / "out")
    ref, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = rng.integers(0, V, (2, 32))
    assert np.abs(model.forward(ids) - hf_logits(ref.eval(), ids)).max() <= 1e-4
    back = GPT.from_pretrained(tmp_path / "out")  # and back, bit for bit
    assert np.array_equal(back.params, model.params)


def test_sharded_checkpoints(hf_pair, tmp_path):
    ref, d = hf_pair
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf.INDEX_FILE).exists() and not (
        tmp_path / "sharded" / hf.WEIGHTS_FILE
    ).exists()
    a, b = GPT.from_pretrained(d), GPT.from_pretrained(tmp_path / "sharded")
    assert np.array_equal(a.params, b.params)
    # fastllm writes shards too; transformers reads them; a later unsharded save removes them
    a.save_pretrained(tmp_path / "ours", max_shard_bytes=30_000)
    shards = sorted((tmp_path / "ours").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    ids = np.arange(20)[None] % V
    assert np.abs(hf_logits(back, ids) - a.forward(ids)).max() <= 1e-4
    a.save_pretrained(tmp_path / "ours")
    assert (
        not list((tmp_path / "ours").glob("model-*-of-*"))
        and not (tmp_path / "ours" / hf.INDEX_FILE).exists()
    )
    assert np.array_equal(GPT.from_pretrained(tmp_path / "ours").params, a.params)
    # transformers' spelling (max_shard_size="30KB" was a TypeError), and `convert --to hf --max-shard-size`
    a.save_pretrained(tmp_path / "ours", max_shard_size="30KB")
    assert sorted((tmp_path / "ours").glob("model-*-of-*.safetensors")) == shards
    checkpoint.convert(tmp_path / "ours", tmp_path / "ckpt")
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size",
                     "30KB"]) == 0
    assert [p.name for p in sorted((tmp_path / "hf").glob("model-*-of-*"))] == [p.name for p in shards]
    assert np.array_equal(GPT.from_pretrained(tmp_path / "hf").params, a.params)
    for bad in ("30", "30XB", 0, 2.5):
        with pytest.raises(ValueError, match="max_shard_size must be a number of bytes > 0 or a size like '5GB'"):
            a.save_pretrained(tmp_path / "bad", max_shard_size=bad)
    with pytest.raises(ValueError, match="max_shard_size is for --to hf"):
        checkpoint.convert(tmp_path / "ours", tmp_path / "x", max_shard_size="1GB")


def test_interrupted_sharded_save_never_loads_a_mix(tmp_path, monkeypatch):
    """Saving shards over an earlier sharded save of the same size (same shard names) used to keep the old index
    until the end: a save killed after its first shard left new and old shards under a valid index, loaded
    without a word. Now the old index goes first, so what is left is refused, naming the folder."""
    cfg = GPTConfig(block_size=8, vocab_size=300, n_layer=2, n_head=2, n_embd=16)
    old, new = GPT(cfg, seed=0), GPT(cfg, seed=1)
    old.save_pretrained(tmp_path, max_shard_bytes=8000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    real, written = hf.save_safetensors, []

    def killed_after_one_shard(path, *args, **kw):
        if written:
            raise KeyboardInterrupt  # (a SIGKILL here leaves the same files)
        written.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(hf, "save_safetensors", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path, max_shard_bytes=8000)
    monkeypatch.setattr(hf, "save_safetensors", real)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        GPT.from_pretrained(tmp_path)
    new.save_pretrained(tmp_path, max_shard_bytes=8000)  # a complete save loads again
    assert np.array_equal(GPT.from_pretrained(tmp_path).params, new.params)


def rewrite(d, fn, out):
    """Copy HF folder d to out, passing its tensors through fn(dict) -> dict."""
    shutil.copytree(d, out)
    tensors, meta = load_safetensors(out / hf.WEIGHTS_FILE)
    save_safetensors(out / hf.WEIGHTS_FILE, fn(dict(tensors)), meta)
    return out


def test_name_variants(hf_pair, tmp_path):
    """No `transformer.` prefix (GPT2Model / old hub files), causal-mask buffers, a tied lm_head.weight, fp16."""
    _, d = hf_pair
    base = GPT.from_pretrained(d)
    C = base.config.n_embd

    def old_style(t):
        t = {k.removeprefix("transformer."): v for k, v in t.items()}
        for layer in range(2):
            t[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, T_MAX, T_MAX), np.float32))
            t[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
        t["lm_head.weight"] = t["wte.weight"]
        return t

    m = GPT.from_pretrained(rewrite(d, old_style, tmp_path / "old"))
    assert np.array_equal(m.params, base.params)
    m = GPT.from_pretrained(
        rewrite(d, lambda t: {k: v.astype(np.float16) for k, v in t.items()}, tmp_path / "f16")
    )
    assert np.abs(m.params - base.params).max() < 1e-2

    def untied(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1
        return t

    with pytest.raises(ValueError, match="lm_head.weight differs"):
        GPT.from_pretrained(rewrite(d, untied, tmp_path / "untied"))
    assert C == 32


# ---- bad input -------------------------------------------------------------------------------------------


def edit_config(d, out, **changes):
    shutil.copytree(d, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(model_type="llama"), "model_type 'llama'"),
        (dict(architectures=["GPT2ForSequenceClassification"]), "architectures"),
        (dict(activation_function="relu"), "activation_function 'relu'"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(scale_attn_weights=False), "scale_attn_weights"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings"),
        (dict(n_inner=100), "n_inner=100"),
        (dict(n_ctx=64), "n_ctx=64 differs from n_positions=48"),
        (dict(n_head=5), "divisible"),
        (dict(n_embd=16), r"tensor 'transformer\.\S+' has shape .*, config.json needs"),
        (dict(n_layer=1), "unexpected tensor 'transformer.h.1"),
        (dict(n_layer=3), r"missing tensors \['transformer.h.2.ln_1.weight'"),
        # a size off by digits was allocated before the tensors were checked: a MemoryError (or, for n_layer, an
        # endless tensor_map) instead of the file and the tensor
        (dict(vocab_size=2**40), r"'transformer.wte.weight' has shape .*, config.json needs \(1099511627776, 32"),
        (dict(n_positions=2**40, n_ctx=2**40), r"'transformer.wpe.weight' has shape .*needs \(1099511627776, 32"),
        (dict(n_layer=2**31), r"n_layer=2147483648, but the weight files hold only \d+ tensors"),
    ],
)
def test_bad_config(hf_pair, tmp_path, changes, match):
    d = edit_config(hf_pair[1], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=match) as e:
        GPT.from_pretrained(d)
    assert "config.json" in str(e.value) or "model.safetensors" in str(e.value)


def test_bad_tensors(hf_pair, tmp_path):
    _, d = hf_pair

    def drop(t):
        del t["transformer.h.1.mlp.c_fc.bias"]
        return t

    with pytest.raises(ValueError, match=r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\]"):
        GPT.from_pretrained(rewrite(d, drop, tmp_path / "missing"))

    def not_transposed(t):
        t["transformer.h.0.mlp.c_fc.weight"] = np.ascontiguousarray(t["transformer.h.0.mlp.c_fc.weight"].T)
        return t

    with pytest.raises(
        ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' has shape \(128, 32\).*\(32, 128\)"
    ):
        GPT.from_pretrained(rewrite(d, not_transposed, tmp_path / "shape"))
    with pytest.raises(ValueError, match="unexpected tensor 'score.weight'"):
        GPT.from_pretrained(
            rewrite(d, lambda t: {**t, "score.weight": np.zeros(3, np.float32)}, tmp_path / "extra")
        )

    def dup(t):
        t["h.0.ln_1.bias"] = t["transformer.h.0.ln_1.bias"]
        return t

    with pytest.raises(ValueError, match="duplicates"):
        GPT.from_pretrained(rewrite(d, dup, tmp_path / "dup"))


def test_truncated_and_missing_files(hf_pair, tmp_path):
    _, d = hf_pair
    out = shutil.copytree(d, tmp_path / "trunc")
    f = out / hf.WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' .*truncated"):
        GPT.from_pretrained(out)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(out)
    (out / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="config.json:1: corrupt JSON"):
        GPT.from_pretrained(out)


def test_bad_shard_index(hf_pair, tmp_path):
    ref, _ = hf_pair
    d = tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="20KB")
    index = json.loads((d / hf.INDEX_FILE).read_text())
    shard = index["weight_map"]["transformer.wte.weight"]
    (d / shard).rename(d / "gone")
    with pytest.raises(FileNotFoundError, match=f"shard {shard} of tensor '.+' is missing"):
        GPT.from_pretrained(d)
    (d / "gone").rename(d / shard)
    index["weight_map"]["transformer.ln_f.bias"] = "../../etc/passwd"
    (d / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="bad file name"):
        GPT.from_pretrained(d)


# ---- tokenizers ------------------------------------------------------------------------------------------


def test_tokenizer_json_from_hf_trainer(hf_tokenizer, text, tmp_path):
    hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.special_tokens == {"<|endoftext|>": 0}
    for s in samples(text):
        ids = tok.encode(s, allowed_special="all")
        assert ids.tolist() == hf_tokenizer.encode(s).ids
        assert tok.decode(ids) == s


def test_vocab_and_merges_files(hf_tokenizer, text, tmp_path):
    hf_tokenizer.model.save(str(tmp_path))  # GPT-2's classic vocab.json + merges.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    tok = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    for s in samples(text):
        assert tok.encode(s, allowed_special="all").tolist() == ref(s)["input_ids"]
    assert tok.eot_token == hf_tokenizer.token_to_id("<|endoftext|>")
    assert (
        Tokenizer.from_pretrained(tmp_path / "merges.txt").encode(text[:5000]).tolist()
        == ref(text[:5000])["input_ids"]
    )
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nbroken\n")
    with pytest.raises(ValueError, match=r"merges.txt:3: expected '<left> <right>'"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, vocab.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_save_pretrained_with_tokenizer(hf_tokenizer, text, tmp_path):
    hf_tokenizer.save(str(tmp_path / "t.json"))
    tok = Tokenizer.load_hf(tmp_path / "t.json")
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "out", tokenizer=tok)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eot_token == 0
    with pytest.raises(ValueError, match="tokenizer has 600 ids but the model's vocab_size is 100"):
        GPT(GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=1, n_embd=8)).save_pretrained(
            tmp_path / "small", tokenizer=tok
        )
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    s = text[:3000]
    assert (
        auto(s)["input_ids"]
        == tok.encode(s).tolist()
        == Tokenizer.from_pretrained(tmp_path / "out").encode(s).tolist()
    )


# ---- convert CLI -----------------------------------------------------------------------------------------


def test_convert_round_trip(hf_pair, hf_tokenizer, tmp_path, capsys):
    ref, d = hf_pair
    src = shutil.copytree(d, tmp_path / "src")
    hf_tokenizer.model.save(str(src))  # vocab.json + merges.txt travel along
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    model = load_model(tmp_path / "ckpt")
    ids = np.random.default_rng(2).integers(0, V, (2, 16))
    assert np.abs(model.forward(ids) - hf_logits(ref, ids)).max() <= 1e-4
    tok = Tokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok.encode("hello world").tolist() == hf_tokenizer.encode("hello world").ids
    assert (
        cli.main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "The", "-n", "5", "--seed", "0"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1].startswith("The")
    for dtype in ("bfloat16", "int8", "w8a8"):
        args = ["sample", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "The", "-n", "5", "--dtype", dtype,
                "--seed", "0"]  # (unseeded, a sampled newline made this flaky)
        assert cli.main(args) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("The")
    assert cli.main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--device", "cuda", "--dtype", "int8"]) == 1
    assert "--dtype int8 (int8 weight copies) is for decoding on the CPU" in capsys.readouterr().err
    assert cli.main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--device", "cuda", "--dtype", "w8a8"]) == 1
    assert "--dtype w8a8 (int8 weight copies) is for decoding on the CPU" in capsys.readouterr().err

    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert np.abs(hf_logits(back, ids) - hf_logits(ref, ids)).max() <= 1e-5
    assert (tmp_path / "back" / "tokenizer.json").exists()

    assert cli.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "fastllm: error:" in capsys.readouterr().err


def test_convert_fastllm_tokenizer(tmp_path, text):
    """A fastllm checkpoint with a tiktoken-rank tokenizer converts to HF and back without losing it."""
    tok = Tokenizer.train(text[:50_000], vocab_size=300, pattern="gpt2", progress=False)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=8))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    checkpoint.save_model(ckpt, model)
    tok.save(ckpt / "tokenizer.tiktoken")
    checkpoint.convert(ckpt, tmp_path / "hf", to="hf")
    checkpoint.convert(tmp_path / "hf", tmp_path / "ckpt2")
    assert (tmp_path / "ckpt2" / "tokenizer.tiktoken").exists()  # rank semantics survive the trip
    assert np.array_equal(load_model(tmp_path / "ckpt2").params, model.params)
    assert (
        Tokenizer.from_pretrained(tmp_path / "ckpt2").encode(text[:2000]).tolist()
        == tok.encode(text[:2000]).tolist()
    )
    with pytest.raises(ValueError, match="to must be"):
        checkpoint.convert(ckpt, tmp_path / "x", to="onnx")


def test_convert_never_writes_into_its_source(hf_pair, tmp_path):
    """`convert hfdir hfdir` used to overwrite the HF weights with fastllm's layout (exit 0); dst == src or
    inside src is refused and the source is left byte-identical, in both directions."""
    _, d = hf_pair
    src = shutil.copytree(d, tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for dst in (src, src / "sub", tmp_path / "src" / ".." / "src"):
        with pytest.raises(ValueError, match="source"):
            checkpoint.convert(src, dst)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    checkpoint.convert(src, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="inside the source"):
        checkpoint.convert(tmp_path / "ckpt", tmp_path / "ckpt" / "hf", to="hf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        checkpoint.convert(src, tmp_path / "file")


def test_convert_refuses_a_folder_that_holds_files(hf_pair, tmp_path, monkeypatch):
    """Converting into an existing folder used to write over its files one by one and leave the others: a model
    without a tokenizer, converted where another model had been, got that model's tokenizer (and chat template and
    EOS ids). A folder that holds files is refused, untouched; an empty one is filled (staged, fsynced, renamed)."""
    _, d = hf_pair
    src = shutil.copytree(d, tmp_path / "src")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.tiktoken").write_text("stale")
    with pytest.raises(ValueError, match=r"output folder .*old exists and is not empty"):
        checkpoint.convert(src, tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["tokenizer.tiktoken"]
    assert cli.main(["convert", str(src), str(tmp_path / "old")]) == 1
    synced = []
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda folder: synced.append(folder.name))
    (tmp_path / "empty").mkdir()
    checkpoint.convert(src, tmp_path / "empty")
    assert synced[0].startswith(".empty.") and synced[1] == tmp_path.name  # the staged folder, then its parent
    assert np.array_equal(load_model(tmp_path / "empty").params, GPT.from_pretrained(src).params)
    with pytest.raises(ValueError, match="not empty"):
        checkpoint.convert(tmp_path / "empty", tmp_path / "old", to="hf")


def test_convert_leaves_nothing_on_failure(hf_pair, tmp_path):
    """A bad tokenizer in the source used to fail after model.safetensors was written: now everything is read
    first, and a new output folder appears complete or not at all."""
    _, d = hf_pair
    src = shutil.copytree(d, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        checkpoint.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging folder left either
    (src / "tokenizer.json").unlink()
    assert checkpoint.convert(src, tmp_path / "out") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
