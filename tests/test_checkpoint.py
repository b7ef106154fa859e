"""fastllm.checkpoint: a save restores model, optimizer, RNG and heads exactly; kills during save/prune never leave an
incomplete `ckpt_N`; every corrupt or wrong file is refused with an error naming it; the tokenizer that goes with a
checkpoint is found in either format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastllm import Tokenizer
from fastllm.checkpoint import (
    TOKENIZER_FILE,
    checkpoint_tokenizer,
    checkpoints,
    latest,
    load_heads,
    load_model,
    load_optimizer,
    load_state,
    prune,
    save,
)
from fastllm.fileio import load_safetensors, save_safetensors
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW

CONFIG = GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8)


def trained(seed: int = 0) -> tuple[GPT, AdamW]:
    """A tiny model and its optimizer after two steps (non-zero moments, t = 2)."""
    model = GPT(CONFIG, seed=seed)
    opt = AdamW(model, 1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        model.zero_grad()
        model.forward(rng.integers(0, 20, (2, 8)), rng.integers(0, 20, (2, 8)))
        model.backward()
        opt.step()
    return model, opt


def test_save_load_round_trip(tmp_path):
    model, opt = trained()
    rng = np.random.default_rng(7)
    rng.random(3)
    head = {"h": np.arange(5, dtype=np.float32)}
    path = save(tmp_path, 12, model, opt, {"loader": {"pos": 3}}, kind="train", rng=rng, config={"lr": 0.1},
                heads=head)
    assert path.name == "ckpt_000012" and latest(tmp_path) == path
    assert (tmp_path / "latest").read_text() == "ckpt_000012\n"
    m2 = load_model(tmp_path)
    assert m2.checkpoint_dir == path and m2.config == model.config
    for name, arr in model.state_dict().items():
        np.testing.assert_array_equal(m2.state_dict()[name], arr)
    opt2 = AdamW(m2, 1e-2)
    load_optimizer(path, opt2)
    assert opt2.t == 2
    np.testing.assert_array_equal(opt2.state_dict()["m"], opt.state_dict()["m"])
    np.testing.assert_array_equal(opt2.state_dict()["v"], opt.state_dict()["v"])
    state = load_state(path, "train")
    assert state["step"] == 12 and state["stage"] == {"loader": {"pos": 3}} and state["config"] == {"lr": 0.1}
    np.testing.assert_array_equal(state["rng"].random(4), rng.random(4))  # the generator continues exactly
    np.testing.assert_array_equal(load_heads(path)["h"], head["h"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Atomic writes go through mkstemp, which creates its files 0600: a checkpoint, a tokenizer or token shards
    were unreadable to the group and others whatever the umask (a model served or shared by another account)."""
    model, opt = trained()
    old = os.umask(umask)
    try:
        path = save(tmp_path, 1, model, opt, {}, kind="train")
    finally:
        os.umask(old)
    files = [p for p in [tmp_path / "latest", *path.iterdir()] if p.is_file()]
    assert files and {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~umask) for p in files}


def test_checkpoints_sort_by_step_and_latest_falls_back(tmp_path):
    model, opt = trained()
    for step in (999_999, 1_000_000, 5):
        save(tmp_path, step, model, opt, {}, kind="train")
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_000005", "ckpt_999999", "ckpt_1000000"]
    assert latest(tmp_path).name == "ckpt_000005"  # what `latest` names: the last one written
    (tmp_path / "latest").write_text("ckpt_000077\n")  # names a missing folder: the newest by step
    assert latest(tmp_path).name == "ckpt_1000000"
    (tmp_path / "ckpt_2000000").mkdir()  # not a checkpoint (no model.safetensors): ignored, and left alone
    (tmp_path / "ckpt_12").mkdir()
    prune(tmp_path, 2)
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_999999", "ckpt_1000000"]
    assert (tmp_path / "ckpt_2000000").is_dir() and latest(tmp_path).name == "ckpt_1000000"


def test_prune_interrupted_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    """A kill while a checkpoint is deleted (simulated: the deletion stops after one file) leaves no incomplete
    folder under a `ckpt_N` name (issue 23 item 13); the next save removes the remains."""
    import shutil

    from fastllm import checkpoint

    model, opt = trained()
    for step in (1, 2, 3):
        save(tmp_path, step, model, opt, {}, kind="train", rng=np.random.default_rng(0))
    real = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if not os.path.exists(path):
            return
        for f in sorted(os.listdir(path))[1:]:  # all but model.safetensors, then the kill
            os.unlink(os.path.join(path, f))
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(SystemExit):
        prune(tmp_path, 1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    for ck in checkpoints(tmp_path):
        load_model(ck)
        load_state(ck, "train")
        load_optimizer(ck, AdamW(GPT(CONFIG, init=False)))
    save(tmp_path, 4, model, opt, {}, kind="train", rng=np.random.default_rng(0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


KILL_LOOP = """
import sys
import numpy as np
from fastllm.checkpoint import prune, save
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64))
opt = AdamW(model)
step = 0
while True:
    step += 1
    save(sys.argv[1], step, model, opt, {"i": step}, kind="train", rng=np.random.default_rng(step))
    prune(sys.argv[1], 2)
    if step == 3:
        print("ready", flush=True)
"""


def test_sigkill_during_save_and_prune(tmp_path):
    """A process saving and pruning checkpoints in a loop is SIGKILLed at random moments: every `ckpt_N` left is
    complete and `latest` resolves to a loadable one."""
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for trial in range(6):
        out = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(out)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = checkpoints(out)
        assert found, "pruning must keep checkpoints"
        for ck in found:
            step = int(ck.name.split("_")[1])
            assert load_state(ck, "train")["stage"] == {"i": step}
            load_model(ck)
            load_optimizer(ck, AdamW(load_model(ck)))
        load_model(out)


@pytest.fixture
def ckpt(tmp_path):
    model, opt = trained()
    return save(tmp_path / "run", 4, model, opt, {}, kind="train", rng=np.random.default_rng(0))


def _rewrite_tensors(path, fn, meta_fn=lambda m: m):
    tensors, meta = load_safetensors(path)
    save_safetensors(path, fn(dict(tensors)), meta_fn(dict(meta)))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int64])
def test_integer_or_bool_weights_are_refused(ckpt, dtype):
    """Issue 23 item 8: parameters stored as integers or booleans used to load silently."""
    _rewrite_tensors(ckpt / "model.safetensors", lambda t: {**t, "wte": t["wte"].astype(dtype)})
    with pytest.raises(ValueError, match=r"model.safetensors.*'wte'.*(int|bool)"):
        load_model(ckpt)


def test_bad_model_config_metadata_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    for bad in ("{not json", '{"n_layer": 1, "bogus": 2}', "[1, 2]", '{"n_head": -2}', "[" * 100_000):
        _rewrite_tensors(f, lambda t: t, lambda m, bad=bad: {**m, "config": bad})
        with pytest.raises(ValueError, match=r"model.safetensors: bad model config"):
            load_model(ckpt)


@pytest.mark.parametrize("field,value,match", [
    ("vocab_size", 2**40, r"'wte' has shape \(20, 8\); the model config in the metadata needs \(1099511627776, 8\)"),
    ("n_layer", 2**33, r"'ln_1.weight' has shape \(1, 8\); .* needs \(8589934592, 8\)"),
    ("tie_embeddings", False, r"'lm_head.weight' is missing"),
])
def test_config_not_matching_the_tensors_is_refused_before_allocating(ckpt, field, value, match):
    """A damaged config in the metadata (a size off by a few digits) used to allocate the model it describes first:
    a MemoryError asking for terabytes, not an error naming the file."""
    f = ckpt / "model.safetensors"
    _rewrite_tensors(f, lambda t: t, lambda m: {**m, "config": json.dumps({**json.loads(m["config"]),
                                                                               field: value})})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor " + match):
        load_model(ckpt)


def test_optimizer_state_errors_name_the_file(ckpt):
    f = ckpt / "optimizer.safetensors"
    opt = AdamW(GPT(CONFIG, init=False))
    _rewrite_tensors(f, lambda t: t, lambda m: {})
    with pytest.raises(ValueError, match=r"optimizer.safetensors: no 't'"):
        load_optimizer(ckpt, opt)
    _rewrite_tensors(f, lambda t: t, lambda m: {"t": "two"})
    with pytest.raises(ValueError, match=r"optimizer.safetensors: 't' .* integer"):
        load_optimizer(ckpt, opt)
    _rewrite_tensors(f, lambda t: {**t, "m": t["m"][:-3]}, lambda m: {"t": "2"})
    with pytest.raises(ValueError, match=r"optimizer.safetensors: 'm' must have shape"):
        load_optimizer(ckpt, opt)
    _rewrite_tensors(f, lambda t: {**t, "m": t["v"][:-3], "v": t["v"].astype(np.int32)}, lambda m: {"t": "2"})
    with pytest.raises(ValueError, match=r"optimizer.safetensors: tensor 'v' is stored as int32"):
        load_optimizer(ckpt, opt)


@pytest.mark.parametrize("text,match", [
    ("{corrupt", "corrupt JSON"),
    ("[]", "expected a JSON object"),
    ('{"step": 4, "kind": "train", "stage": {}}', "'rng' is missing"),
    ('{"step": -1, "kind": "train", "rng": {}, "stage": {}}', "'step' must be >= 0"),
    ('{"step": 4, "kind": "train", "rng": {"bit_generator": "MT19937"}, "stage": {}}', "bad 'rng'"),
    ('{"step": 4, "kind": "train", "rng": {"bit_generator": "PCG64", "state": {"state": 1' + "0" * 60 +
     ', "inc": 1}, "has_uint32": 0, "uinteger": 0}, "stage": {}}', "bad 'rng'"),  # was an OverflowError
    ('{"step": 4, "kind": "grpo", "rng": {}, "stage": {}}', "'grpo' checkpoint; it cannot resume 'train'"),
])
def test_bad_state_json_names_the_file(ckpt, text, match):
    (ckpt / "state.json").write_text(text)
    with pytest.raises(ValueError, match=rf"state.json:.*{match}"):
        load_state(ckpt, "train")


# ---- the safetensors reader (fastllm.fileio) -----------------------------------------------------------------


def _raw_safetensors(path, header, data: bytes = b"\0" * 8):
    hdr = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    path.write_bytes(len(hdr).to_bytes(8, "little") + hdr + data)
    return path


@pytest.mark.parametrize("header,match", [
    ({"a": {"dtype": [], "shape": [2], "data_offsets": [0, 8]}}, "'a' has unsupported dtype \\[\\]"),  # TypeError
    ({"__metadata__": [1], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__ must map"),
    ({"__metadata__": {"config": 3}}, "__metadata__ must map names to strings"),  # load_model: TypeError
    ({"a": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 8]}}, "'a' .* does not fit"),  # OverflowError
    ({"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, "'a' .* does not fit"),  # wrapped
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "'a' has a malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "'a' has a malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "'a' has a malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, "'a' has a malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}, "'a' has a malformed header entry"),
    pytest.param("[" * 100_000 + "]" * 100_000, "corrupt safetensors header", id="nested"),  # RecursionError
])
@pytest.mark.parametrize("mmap", [False, True])
def test_malformed_safetensors_headers_name_the_file(tmp_path, header, match, mmap):
    """Each of these used to raise TypeError, OverflowError or RecursionError, load with a made-up shape
    ("2" -> (2,), 2.0 -> 2, True -> 1), or, for a shape whose element count wraps around int64 to 0, pass the size
    check and fail later in a numpy reshape that named nothing."""
    f = _raw_safetensors(tmp_path / "x.safetensors", header)
    with pytest.raises(ValueError, match=r"x.safetensors.*" + match):
        load_safetensors(f, mmap=mmap)


def test_safetensors_files_of_the_safetensors_library(tmp_path):
    """Files written by the safetensors library load here, and ours there: every integer, float and bool dtype
    (U32 and U64 were refused), zero-size and 0-d tensors (a 0-d array was written with shape [1]), big-endian and
    Fortran-ordered arrays (a big-endian array was refused as an 'unsupported dtype')."""
    st = pytest.importorskip("safetensors.numpy")
    arrays = {f"{np.dtype(t).name}": (np.arange(6) % 2 if t is np.bool_ else np.arange(6) - 2).astype(t)
              for t in (np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
                        np.uint16, np.uint32, np.uint64, np.bool_)}
    arrays.update(empty=np.zeros((0, 3), np.float32), scalar=np.array(2.5, np.float32))
    st.save_file(arrays, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    for mmap in (False, True):
        got, meta = load_safetensors(tmp_path / "lib.safetensors", mmap=mmap)
        assert meta == {"k": "v"} and sorted(got) == sorted(arrays)
        for name, a in arrays.items():
            assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
            np.testing.assert_array_equal(got[name], a)
    ours = {**arrays, "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))}
    save_safetensors(tmp_path / "ours.safetensors", ours, {"n": 1})
    back = st.load_file(str(tmp_path / "ours.safetensors"))
    for name, a in ours.items():
        assert back[name].dtype == a.dtype.newbyteorder("=") and back[name].shape == a.shape, name
        np.testing.assert_array_equal(back[name], a)


def test_missing_checkpoint_and_heads(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no heads.safetensors"):
        load_heads(ckpt)
    with pytest.raises(ValueError, match="device"):
        load_model(ckpt, device="tpu")


def test_checkpoint_tokenizer_either_format(tmp_path):
    """The tokenizer of a checkpoint folder in either format (fastllm's rank file or a HF tokenizer.json, as
    `fastllm convert` leaves it), an explicit path first, and a clear error naming the folder without one."""
    tok = Tokenizer.train(["the cat sat on the mat. " * 20], 280, special_tokens=[], progress=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "none").mkdir()
    tok.save(tmp_path / "a" / TOKENIZER_FILE)
    tok.save_hf(tmp_path / "b" / "tokenizer.json")
    for folder in ("a", "b"):
        assert checkpoint_tokenizer(tmp_path / folder).encode("the mat").tolist() == tok.encode("the mat").tolist()
    assert checkpoint_tokenizer(tmp_path / "none", tmp_path / "a" / TOKENIZER_FILE).n_vocab == tok.n_vocab
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*none"):
        checkpoint_tokenizer(tmp_path / "none")
    # save() copies the tokenizer in, so a checkpoint needs nothing else
    model, opt = trained()
    path = save(tmp_path / "run", 1, model, opt, {}, kind="train", tokenizer=tmp_path / "a" / TOKENIZER_FILE)
    assert checkpoint_tokenizer(path).encode("the mat").tolist() == tok.encode("the mat").tolist()
    assert json.loads((path / (TOKENIZER_FILE + ".json")).read_text())["n_ranks"] > 0
