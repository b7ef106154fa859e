"""Supervised fine-tuning: chat template and masks, JSONL validation, packing, vocab growth, a tiny model that
learns a task from conversations (held-out accuracy before/after), and `fastllm chat` driven by piped stdin."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastllm
from fastllm import ops
from fastllm.checkpoint import copy_tokenizer, load_model
from fastllm.cli import main
from fastllm.data import write_shard
from fastllm.model import GPT, GPTConfig
from fastllm.sample import generate
from fastllm.sft import (
    IM_END,
    IM_START,
    ChatSession,
    PackedLoader,
    SFTConfig,
    add_chat_tokens,
    chat_loop,
    grow_vocab,
    load_conversations,
    render,
    render_prompt,
    sft,
    tokenize_conversations,
)
from fastllm.tokenizer import Tokenizer
from fastllm.train import TrainConfig, train

EOT, START, END, NL = 256, 257, 258, 10


def byte_tok(chat: bool = True) -> Tokenizer:
    special = {"<|endoftext|>": EOT}
    if chat:
        special |= {IM_START: START, IM_END: END}
    return Tokenizer({bytes([b]): b for b in range(256)}, special_tokens=special)


def b(s: str) -> list[int]:
    return list(s.encode())


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


# ---- template ------------------------------------------------------------------------------------------


def test_render_exact_ids_and_mask():
    ids, mask = render(conv(("user", "hi"), ("assistant", "yo")), byte_tok())
    user = [START] + b("user\n") + b("hi") + [END, NL]
    asst_head, asst_body = [START] + b("assistant\n"), b("yo") + [END]
    assert ids.tolist() == [EOT] + user + asst_head + asst_body + [NL]
    assert mask.tolist() == [0] * (1 + len(user) + len(asst_head)) + [1] * len(asst_body) + [0]


def test_render_system_multi_turn_and_special_text_in_content():
    c = conv(("system", "be nice"), ("user", "a"), ("assistant", "B"), ("user", "<|im_end|>"), ("assistant", ""))
    ids, mask = render(c, byte_tok())
    want, wmask = [EOT], [0]
    for role, content in [(m["role"], m["content"]) for m in c]:
        head, body = [START] + b(role + "\n"), b(content) + [END]
        want += head + body + [NL]
        wmask += [0] * len(head) + [int(role == "assistant")] * len(body) + [0]
    assert ids.tolist() == want and mask.tolist() == wmask
    assert ids.tolist().count(END) == 5  # the user's "<|im_end|>" text stayed ordinary bytes
    assert mask.sum() == len("B") + 1 + 1  # "B<|im_end|>" and the empty answer's <|im_end|>


def test_render_bpe_tokenizer_mask_boundaries():
    tok = Tokenizer.train(
        ["hello world, hello there\nassistant user\n" * 20],
        vocab_size=300,
        special_tokens=("<|endoftext|>", IM_START, IM_END),
        progress=False,
    )
    ids, mask = render(conv(("user", "hello"), ("assistant", "hello world")), tok)
    assert tok.decode(ids[mask == 1]) == "hello world" + IM_END
    assert tok.decode(ids) == (
        f"<|endoftext|>{IM_START}user\nhello{IM_END}\n{IM_START}assistant\nhello world{IM_END}\n"
    )


def test_render_prompt_ends_with_assistant_header():
    tok = byte_tok()
    p = render_prompt(conv(("user", "hi")), tok)
    assert p.tolist() == [EOT, START] + b("user\nhi") + [END, NL, START] + b("assistant\n")
    with pytest.raises(ValueError, match="no <|im_start|>|im_start"):
        render_prompt(conv(("user", "hi")), byte_tok(chat=False))


def test_render_without_endoftext():
    tok = Tokenizer({bytes([x]): x for x in range(256)}, special_tokens={IM_START: 256, IM_END: 257})
    ids, _ = render(conv(("assistant", "x")), tok)
    assert ids.tolist() == [256] + b("assistant\nx") + [257, NL]


# ---- validation ----------------------------------------------------------------------------------------

GOOD = json.dumps({"messages": conv(("user", "q"), ("assistant", "a"))})


@pytest.mark.parametrize(
    "line,msg",
    [
        ("{not json", "bad JSON"),
        (json.dumps({"messages": []}), "empty conversation"),
        (json.dumps({"messages": conv(("robot", "x"), ("assistant", "y"))}), "unknown role 'robot'"),
        (
            json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
            "content must be a string",
        ),
        (json.dumps({"messages": conv(("system", "s"), ("user", "q"))}), "no assistant turn"),
        (json.dumps({"text": "hi"}), "'messages'"),
        (json.dumps([1, 2]), "message 0 must be an object"),
        (json.dumps({"messages": "hi"}), "must be a list"),
        (json.dumps({"conversations": [{"from": "bot", "value": "x"}]}), "unknown role 'bot'"),
        (json.dumps({"conversations": [{"from": "gpt", "text": "x"}]}), r"message 0 \(assistant\) content must be"),
        (json.dumps({"conversations": {"from": "gpt"}}), "'conversations' must be a list"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, msg):
    f = tmp_path / "chats.jsonl"
    f.write_text(GOOD + "\n\n" + line + "\n" + GOOD + "\n")
    with pytest.raises(ValueError, match=msg) as e:
        load_conversations(f)
    assert f"{f}:3:" in str(e.value)


def test_load_conversations_ok_and_missing(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(GOOD + "\n" + GOOD + "\n")
    assert load_conversations(f) == [conv(("user", "q"), ("assistant", "a"))] * 2
    if importlib.util.find_spec("pyarrow"):  # the Hub's Parquet form (smoltalk: messages + source columns)
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{**json.loads(GOOD), "source": "x"}, json.loads(GOOD)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
        assert load_conversations(tmp_path / "train-00000.parquet") == load_conversations(f)
    sharegpt = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]  # (OpenHermes, SlimOrca, ...)
    (tmp_path / "sharegpt.jsonl").write_text(json.dumps({"conversations": sharegpt, "source": "x"}) + "\n")
    assert load_conversations(tmp_path / "sharegpt.jsonl") == [conv(("user", "q"), ("assistant", "a"))]
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no conversations"):
        load_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="conversation: message 0 has unknown role"):
        render([{"role": "bot", "content": "x"}], byte_tok())


def test_single_turn_forms_alpaca_and_prompt_completion(tmp_path):
    """Alpaca's {instruction, input, output} (Stanford Alpaca, alpaca-cleaned) and {prompt, completion} (OpenAI's
    legacy fine-tuning files, TRL's prompt-completion datasets) load as a user turn and an assistant turn."""
    qa = conv(("user", "q"), ("assistant", "a"))
    records = [
        {"instruction": "q", "input": "", "output": "a", "text": "Below is an instruction..."},
        {"instruction": "q", "output": "a"},
        {"instruction": "Add.", "input": "1+2", "output": "3"},
        {"prompt": "q", "completion": "a"},
        # TRL's conversational form: the completion's turns are learned, the prompt's (a few-shot answer) not
        {"prompt": conv(("system", "s"), ("user", "x"), ("assistant", "y"), ("user", "q")),
         "completion": conv(("assistant", "a"))},
    ]
    f = tmp_path / "single.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    convs = load_conversations(f)
    assert convs[:2] == [qa, qa] and convs[3] == qa
    assert convs[2] == conv(("user", "Add.\n\n1+2"), ("assistant", "3"))
    assert convs[4] == [*conv(("system", "s"), ("user", "x")), {"role": "assistant", "content": "y", "weight": 0},
                        *conv(("user", "q"), ("assistant", "a"))]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(records, indent=4))  # Stanford Alpaca's: one JSON array
    assert load_conversations(tmp_path / "alpaca_data.json") == convs
    tok = byte_tok()
    (_, (ids, mask)), _ = tokenize_conversations([convs[3], convs[4]], tok, 1023)
    assert tok.decode(ids[mask == 1].tolist()) == "a<|im_end|>"
    for record, msg in [({"instruction": "q"}, "'output'"), ({"instruction": "q", "output": 3}, "'output' must be"),
                        ({"prompt": "q"}, "'completion'"),
                        ({"prompt": conv(("user", "q")), "completion": ["a"]}, "message 1 must be"),
                        ({"prompt": "q", "completion": conv(("assistant", "a"))}, "'prompt' and 'completion'")]:
        f.write_text(GOOD + "\n" + json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=msg) as e:
            load_conversations(f)
        assert f"{f}:2:" in str(e.value)


def test_openai_weight_text_parts_and_developer_role(tmp_path):
    """OpenAI's chat format: an assistant message with "weight": 0 is not learned (it trained on it), content may be
    a list of text parts, and "developer" is the system role (both were refused)."""
    record = {"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "bad", "weight": 0},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good", "weight": 1}]}
    f = tmp_path / "openai.jsonl"
    f.write_text(json.dumps(record) + "\n")
    (msgs,) = load_conversations(f)
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    tok = byte_tok()
    ((ids, mask),), _ = tokenize_conversations([msgs], tok, 1023)
    assert tok.decode(ids[mask == 1].tolist()) == "good<|im_end|>"
    assert "<|im_start|>assistant\nbad<|im_end|>" in tok.decode(ids.tolist())
    for messages, msg in [
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}],
         r"message 1 \(assistant\) weight must be 0 or 1"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
         "no assistant turn with weight 1"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
          {"role": "assistant", "content": "a"}], r"message 0 \(user\) content\[0\].*only text parts"),
    ]:
        f.write_text(GOOD + "\n" + json.dumps({"messages": messages}) + "\n")
        with pytest.raises(ValueError, match=msg) as e:
            load_conversations(f)
        assert f"{f}:2:" in str(e.value)


# ---- tool calling ---------------------------------------------------------------------------------------

NOW = {"type": "function", "function": {"name": "now", "description": "The time."}}
TOOL_CONV = {"messages": [
    {"role": "user", "content": "time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "09:30"},
    {"role": "assistant", "content": "It is 09:30."}], "tools": [NOW]}


def test_tool_conversations_learn_the_calls_not_the_results(tmp_path):
    """OpenAI's fine-tuning format with tools: the mask covers the assistant's <tool_call> block and its answer,
    not the tools' list or the tool's result; the text is the hermes layout the server prompts with."""
    f = tmp_path / "tools.jsonl"
    f.write_text(json.dumps(TOOL_CONV) + "\n" + GOOD + "\n" + json.dumps({**TOOL_CONV, "tools": json.dumps([NOW])}))
    convs = load_conversations(f)
    assert convs[1] == conv(("user", "q"), ("assistant", "a")) and convs[0] == convs[2]
    assert convs[0]["tools"] == [NOW] and convs[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {}
    tok = byte_tok()
    ((ids, mask),), _ = tokenize_conversations(convs[:1], tok, 1023)
    learned = tok.decode(ids[mask == 1].tolist())
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert learned == call + "<|im_end|>" + "It is 09:30.<|im_end|>"
    text = tok.decode(ids.tolist())
    assert "<tools>\n" + json.dumps(NOW) + "\n</tools>" in text and "<tool_response>\n09:30\n</tool_response>" in text
    from fastllm.chat import ChatML

    prompt = ChatML(tok).prompt(convs[0]["messages"][:1], [NOW]).tolist()
    assert ids[:len(prompt)].tolist() == prompt  # training text = what `fastllm serve` prompts with


@pytest.mark.parametrize("record,msg", [
    ({**TOOL_CONV, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, r"tools\[0\].function.name"),
    ({**TOOL_CONV, "tools": "[oops"}, "'tools' is not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "now", "arguments": "{bad"}}]}]}, r"message 1 \(assistant\).*arguments.*not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     r"message 1 \(assistant\) content must be a string"),
])
def test_tool_conversation_errors_name_the_line(tmp_path, record, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(GOOD + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=msg) as e:
        load_conversations(f)
    assert f"{f}:2:" in str(e.value)


def test_tool_conversations_need_a_template_that_takes_tools():
    from hf_families import LLAMA3_TEMPLATE

    from fastllm.chat import ChatTemplate

    tok = Tokenizer({bytes([x]): x for x in range(256)}, special_tokens={
        "<|begin_of_text|>": 256, "<|start_header_id|>": 257, "<|end_header_id|>": 258, "<|eot_id|>": 259})
    llama3 = ChatTemplate(LLAMA3_TEMPLATE, tok, {"bos_token": "<|begin_of_text|>"}, stop_tokens=[259])
    with pytest.raises(ValueError, match="takes no tools"):
        tokenize_conversations([TOOL_CONV], tok, 1023, chat=llama3)


# ---- packing -------------------------------------------------------------------------------------------


def test_too_long_conversations_counted_and_warned():
    tok = byte_tok()
    convs = [conv(("user", "q"), ("assistant", "a"))] * 3 + [
        conv(("user", "x" * 40), ("assistant", "a" * 10)),
        conv(("user", "x" * 80), ("assistant", "a")),
    ]
    warnings = []
    ex, st = tokenize_conversations(convs, tok, 63, warn=warnings.append)
    assert (st.conversations, st.used, st.truncated, st.skipped) == (5, 4, 1, 1)  # 2nd long: nothing left to learn
    assert all(ids.size <= 64 for ids, _ in ex) and ex[3][1].any()
    assert len(warnings) == 1 and "2 of 5" in warnings[0] and "1 truncated, 1 skipped" in warnings[0]
    ex, st = tokenize_conversations(convs, tok, 63, too_long="skip", warn=warnings.append)
    assert (st.used, st.truncated, st.skipped) == (3, 0, 2)
    with pytest.raises(ValueError, match="too_long"):
        tokenize_conversations(convs, tok, 63, too_long="drop")


def test_packed_loader_targets_windows_and_resume():
    tok = byte_tok()
    convs = [conv(("user", "q" * (i % 7)), ("assistant", "a" * (1 + i % 5))) for i in range(40)]
    ex, st = tokenize_conversations(convs, tok, 63)
    loader = PackedLoader(ex, 4, 63, EOT, 259, seed=3, stats=st)
    assert st.windows == len(loader) < 40 and st.tokens == sum(e[0].size for e in ex)
    assert st.loss_tokens == sum(int(m.sum()) for _, m in ex)  # whole conversations, none split
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 63)
    valid = y != -1
    assert valid.any() and np.isin(y[valid], [END] + b("a")).all()  # loss only on assistant content + <|im_end|>
    np.testing.assert_array_equal(x[:, 1:][valid[:, :-1]], y[:, :-1][valid[:, :-1]])  # y is x shifted
    state = loader.state_dict()
    want = [loader.next_batch() for _ in range(5)]
    again = PackedLoader(ex, 4, 63, EOT, 259, seed=3)
    again.load_state_dict(state)
    for (a, b_), (c, d) in zip(want, [again.next_batch() for _ in range(5)]):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b_, d)
    with pytest.raises(ValueError, match="windows"):
        PackedLoader(ex[:5], 4, 63, EOT, 259).load_state_dict(state)
    with pytest.raises(ValueError, match="no conversations"):
        PackedLoader([], 4, 63, EOT, 259)


# ---- vocab growth --------------------------------------------------------------------------------------


def test_add_chat_tokens_grows_vocab_and_keeps_old_logits():
    base_tok = byte_tok(chat=False)
    model = GPT(GPTConfig.preset("tiny", vocab_size=257), seed=1).eval()
    idx = np.random.default_rng(0).integers(0, 257, (2, 16))
    before = model.forward(idx)
    tok, grown = add_chat_tokens(base_tok, model)
    assert tok.special_tokens == {"<|endoftext|>": EOT, IM_START: START, IM_END: END}
    assert tok.encode("ab<|im_end|>", allowed_special="all").tolist() == [97, 98, END]
    assert grown.config.vocab_size == 259 and model.config.vocab_size == 257
    after = grown.eval().forward(idx)
    np.testing.assert_allclose(after[..., :257], before, rtol=1e-5, atol=1e-6)
    new_rows = grown.p["wte"][257:]
    np.testing.assert_allclose(new_rows, np.broadcast_to(model.p["wte"].mean(0), new_rows.shape), atol=0.01)
    assert not np.array_equal(new_rows[0], new_rows[1])
    for name in model.p:
        if name != "wte":
            np.testing.assert_array_equal(grown.p[name], model.p[name])
    # nothing to add: the same objects back
    t2, m2 = add_chat_tokens(tok, grown)
    assert t2 is tok and m2 is grown
    with pytest.raises(ValueError, match="smaller"):
        grow_vocab(grown, 100)


def test_add_chat_tokens_grows_an_untied_lm_head_too():
    cfg = GPTConfig.preset("nano", vocab_size=257, n_layer=2, tie_embeddings=False, block_size=32)
    model = GPT(cfg, seed=1).eval()
    idx = np.random.default_rng(0).integers(0, 257, (2, 16))
    before = model.forward(idx)
    _, grown = add_chat_tokens(byte_tok(chat=False), model)
    assert grown.p["lm_head.weight"].shape == (259, cfg.n_embd) and grown.p["wte"].shape == (259, cfg.n_embd)
    np.testing.assert_allclose(grown.eval().forward(idx)[..., :257], before, rtol=1e-5, atol=1e-6)
    head = grown.p["lm_head.weight"][257:]
    np.testing.assert_allclose(head, np.broadcast_to(model.p["lm_head.weight"].mean(0), head.shape), atol=0.01)


def test_add_chat_tokens_into_padded_model_rows():
    """A model with more rows than the tokenizer ids: new tokens reuse (and re-initialise) the spare rows."""
    model = GPT(GPTConfig.preset("tiny", vocab_size=264), seed=1)
    tok, grown = add_chat_tokens(byte_tok(chat=False), model)
    assert grown.config.vocab_size == 264
    mean = model.p["wte"][:257].mean(0)
    np.testing.assert_allclose(grown.p["wte"][[START, END]], np.stack([mean, mean]), atol=0.01)
    np.testing.assert_array_equal(grown.p["wte"][259:], model.p["wte"][259:])


# ---- end to end: a task learned from conversations -----------------------------------------------------

LETTERS = "abcdefgh"


def chat(user: str, answer: str) -> str:
    return json.dumps({"messages": conv(("user", user), ("assistant", answer))})


def accuracy(model, tok, words) -> float:
    """Greedy answers to 'xyz' must be 'zyx' then <|im_end|>."""
    prompts = [render_prompt(conv(("user", w)), tok).tolist() for w in words]
    outs = generate(model, prompts, 4, temperature=0)
    end = tok.special_tokens[IM_END]
    return float(np.mean([o[len(p) :] == b(w[::-1]) + [end] for o, p, w in zip(outs, prompts, words)]))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny byte-level model pre-trained briefly on letter soup, then fine-tuned to reverse 3-letter words
    (448 seen, 64 held out). One thread: 2 OpenMP threads on a busy 2-core machine are many times slower."""
    d = tmp_path_factory.mktemp("sft")
    threads = fastllm.get_num_threads()
    tok = byte_tok(chat=False)
    tok.save(d / "tok.tiktoken")
    rng = np.random.default_rng(0)
    (d / "data").mkdir()
    write_shard(d / "data" / "train_000000.bin", tok.encode("".join(rng.choice(list(LETTERS + " \n"), 20000))), 257)
    copy_tokenizer(d / "tok.tiktoken", d / "data")
    train(
        TrainConfig(
            data=str(d / "data"),
            out=str(d / "base"),
            model="tiny",
            n_embd=64,
            n_head=4,
            seq_len=64,
            batch_size=8,
            max_steps=20,
            lr=3e-3,
            warmup_steps=2,
            eval_every=0,
            threads=1,
        ),
        progress=False,
        log=lambda *a: None,
    )
    words = ["".join(w) for w in itertools.product(LETTERS, repeat=3)]
    rng.shuffle(words)
    held, seen = words[:64], words[64:]
    (d / "train.jsonl").write_text("".join(chat(w, w[::-1]) + "\n" for w in seen))
    (d / "val.jsonl").write_text("".join(chat(w, w[::-1]) + "\n" for w in held[:16]))
    logs = []
    summary = sft(
        SFTConfig(
            base=str(d / "base"),
            data=str(d / "train.jsonl"),
            val_data=str(d / "val.jsonl"),
            out=str(d / "sft"),
            batch_size=8,
            max_steps=600,
            lr=5e-3,
            warmup_steps=10,
            eval_every=300,
            ckpt_every=300,
            threads=1,
        ),
        progress=False,
        log=logs.append,
    )
    yield d, held, summary, logs
    fastllm.set_num_threads(threads)


def test_default_window_is_capped(tuned, tmp_path, monkeypatch):
    """Without --seq-len, windows are the base model's context, at most sft.DEFAULT_SEQ_LEN tokens (a hub model's
    8k-32k context would not fit in memory at the default batch)."""
    from fastllm import sft as sft_module

    d, *_ = tuned
    logs = []
    cfg = SFTConfig(base=str(d / "base"), data=str(d / "train.jsonl"), out=str(tmp_path / "o"), batch_size=2,
                    max_steps=1, eval_every=0, threads=1)
    monkeypatch.setattr(sft_module, "DEFAULT_SEQ_LEN", 24)
    sft(cfg, progress=False, log=logs.append)
    assert any("windows of T+1=25 tokens" in str(x) for x in logs), logs
    monkeypatch.setattr(sft_module, "DEFAULT_SEQ_LEN", 1024)  # above the base model's 64: its context
    sft(dataclasses.replace(cfg, out=str(tmp_path / "p")), progress=False, log=logs.append)
    assert any("windows of T+1=65 tokens" in str(x) for x in logs), logs


def test_sft_learns_held_out_task(tuned):
    d, held, summary, logs = tuned
    base = load_model(d / "base")
    base_tok = Tokenizer.load(base.checkpoint_dir / "tokenizer.tiktoken")
    tok, grown = add_chat_tokens(base_tok, base)
    acc_before = accuracy(grown.eval(), tok, held)
    model = load_model(d / "sft").eval()
    tok = Tokenizer.load(model.checkpoint_dir / "tokenizer.tiktoken")
    acc_after = accuracy(model, tok, held)
    print(
        f"\nheld-out accuracy (reverse 3-letter words): before SFT {acc_before:.2f}, after {acc_after:.2f}; "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.4f}"
    )
    assert acc_after >= acc_before + 0.6 and acc_after >= 0.8
    assert summary["conversations"] == 448 and summary["truncated"] == summary["skipped"] == 0
    assert summary["val_loss"] < 0.5
    assert model.config.vocab_size == 259 and model.checkpoint_dir.name == "ckpt_000600"
    assert tok.special_tokens[IM_END] == END
    rows = [json.loads(x) for x in (d / "sft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(600))
    assert (d / "sft" / "loss.png").exists() and any(line.startswith("sft: 448 conversations") for line in logs)


def test_chat_session_history_and_context(tuned):
    d = tuned[0]
    model = load_model(d / "sft").eval()
    s = ChatSession(model, Tokenizer.load(d / "sft" / "tokenizer.tiktoken"), temperature=0)
    assert "".join(s.reply("abc")) == "cba"
    assert s.history == conv(("user", "abc"), ("assistant", "cba"))
    for w in ("bcd", "fgh", "hha"):
        "".join(s.reply(w))
    assert s.dropped > 0 and s.history[0]["role"] == "user" and s.history[-2]["content"] == "hha"
    assert render_prompt(s.history, s.tok).size <= model.config.block_size
    s.reset()
    assert s.history == [] and "".join(s.reply("ddd")) == "ddd"
    with pytest.raises(ValueError, match="too long"):
        list(s.reply("x" * 100))
    assert s.history[-1]["content"] == "ddd"  # the refused message is not kept
    with pytest.raises(ValueError, match="im_start"):
        ChatSession(model, byte_tok(chat=False))
    # int8 weights: quantized once for the session (not per reply); the tuned model still reverses
    s8 = ChatSession(model, Tokenizer.load(d / "sft" / "tokenizer.tiktoken"), temperature=0, weights="int8")
    assert isinstance(s8.sampling["weights"][model.head], ops.Int8Weight)
    assert "".join(s8.reply("abc")) == "cba"
    sq = ChatSession(model, Tokenizer.load(d / "sft" / "tokenizer.tiktoken"), temperature=0, weights="w8a8")
    assert isinstance(sq.sampling["weights"][model.head], ops.Int8Panels)
    assert "".join(sq.reply("abc")) == "cba"


def test_chat_loop_commands(tuned):
    d = tuned[0]
    s = ChatSession(load_model(d / "sft").eval(), Tokenizer.load(d / "sft" / "tokenizer.tiktoken"), temperature=0)
    out, err = io.StringIO(), io.StringIO()
    chat_loop(s, io.StringIO("abc\n\n/help\n/reset\ngfe\n/quit\nhhh\n"), out, err)
    assert out.getvalue() == "cba\nefg\n"
    assert "unknown command /help" in err.getvalue() and "history cleared" in err.getvalue()


def test_chat_answer_cut_short_keeps_the_turns_alternating():
    """An answer cut short (its generator closed, Ctrl-C in `fastllm chat`) is kept as far as it went: the user turn
    used to stay without an answer (two user turns in a row next time, which templates that check alternation
    refuse), and Ctrl-C ended the whole chat; now it stops the answer and the chat goes on."""
    from fastllm.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=16), seed=1).eval()
    s = ChatSession(model, byte_tok(), max_new_tokens=12, temperature=0)
    full = "".join(s.reply("hi"))
    s.reset()
    r = s.reply("hi")
    first = next(r)
    r.close()
    assert first and full.startswith(first) and s.history == conv(("user", "hi"), ("assistant", first))

    class CtrlC(io.StringIO):  # the first answer piece is interrupted
        def write(self, text):
            if text and not getattr(self, "hit", False):
                self.hit = True
                raise KeyboardInterrupt
            return super().write(text)

    s.reset()
    out, err = CtrlC(), io.StringIO()
    assert chat_loop(s, io.StringIO("hi\nho\n"), out, err) == 0
    assert "interrupted" in err.getvalue()
    assert [m["role"] for m in s.history] == ["user", "assistant"] * 2 and s.history[2]["content"] == "ho"
    assert out.getvalue() == "\n" + s.history[3]["content"] + "\n"


def _cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    # the subprocess imports the same fastllm as this test (installed, or a development build via PYTHONPATH)
    env = {**os.environ, "PYTHONPATH": str(Path(fastllm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fastllm", *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_chat_piped_stdin(tuned):
    d = tuned[0]
    r = _cli("chat", "--ckpt", str(d / "sft"), "--temperature", "0", stdin="abc\nbbc\nccd\ndef\n/reset\nhag\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cba" and lines[-1] == "gah" and len(lines) == 5
    assert "dropped" in r.stderr
    r = _cli("chat", "--ckpt", str(d / "base"), stdin="hi\n")
    assert r.returncode == 1 and "im_start" in r.stderr


def test_cli_sft_runs_resumes_and_rejects_bad_input(tuned, tmp_path, capsys):
    d = tuned[0]
    args = [
        "sft",
        "--base",
        str(d / "base"),
        "--data",
        str(d / "train.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--max-steps",
        "6",
        "--ckpt-every",
        "3",
        "--eval-every",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--val-fraction",
        "0.1",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    assert main(args[: args.index("6")] + ["9"] + args[args.index("6") + 1 :] + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "ckpt_000009" in out
    rows = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(9))
    assert any("val_loss" in r for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat("a", "b") + "\n" + json.dumps({"messages": conv(("user", "x"))}) + "\n")
    for extra, msg in [
        (["--data", str(bad)], f"{bad}:2: no assistant turn"),
        (["--data", str(tmp_path / "missing.jsonl")], "not found"),
        (["--seq-len", "999"], "seq_len=999"),
        (["--base", str(tmp_path / "nobase")], "no checkpoint"),
    ]:
        assert main(args + extra) == 1
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a value outside the choices: argparse's one-line usage error
        main(args + ["--too-long", "drop"])
    assert e.value.code == 2 and "--too-long: invalid choice: 'drop'" in capsys.readouterr().err


def test_lora_sft_learns_a_new_task_checkpoints_the_adapters_and_resumes(tuned, tmp_path, capsys):
    """LoRA on the fine-tuned model (which has its chat tokens): the adapters alone learn to echo words instead of
    reversing them; checkpoints hold the adapters (PEFT's files naming the base), load as base + adapters, resume
    exactly, merge into a whole model (convert --to hf); a base without chat tokens is refused."""
    d, held = tuned[0], tuned[1]
    words = ["".join(w) for w in itertools.product(LETTERS, repeat=3) if "".join(w) not in held[:16]]
    (tmp_path / "echo.jsonl").write_text("".join(chat(w, w) + "\n" for w in words))
    args = ["sft", "--base", str(d / "sft"), "--data", str(tmp_path / "echo.jsonl"), "--out", str(tmp_path / "lora"),
            "--lora-r", "16", "--lora-alpha", "32", "--lr", "5e-3", "--max-steps", "400", "--ckpt-every", "200",
            "--eval-every", "0", "--batch-size", "8", "--val-fraction", "0", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "LoRA {'r': 16" in capsys.readouterr().out
    ckpt = tmp_path / "lora" / "ckpt_000400"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    base = load_model(d / "sft").eval()
    tok = Tokenizer.load(base.checkpoint_dir / "tokenizer.tiktoken")

    def echo_accuracy(model) -> float:
        prompts = [render_prompt(conv(("user", w)), tok).tolist() for w in held[:16]]
        outs = generate(model, prompts, 4, temperature=0)
        end = tok.special_tokens[IM_END]
        return float(np.mean([o[len(p):] == b(w) + [end] for o, p, w in zip(outs, prompts, held[:16])]))

    tuned_model = load_model(tmp_path / "lora").eval()  # the base (named by the adapters) + the adapters
    assert tuned_model.lora is not None and tuned_model.checkpoint_dir == ckpt
    for name, v in tuned_model.state_dict().items():  # the base unchanged
        np.testing.assert_array_equal(v, base.state_dict()[name], err_msg=name)
    before, after = echo_accuracy(base), echo_accuracy(tuned_model)
    print(f"\nLoRA SFT, echo instead of reverse (held-out words): before {before:.2f}, after {after:.2f}")
    assert before <= 0.2 and after >= 0.6
    # resume: from step 200 to 400 again gives the same adapters
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(tmp_path / "lora" / "ckpt_000200", resumed / "ckpt_000200")
    assert main(args[: args.index(str(tmp_path / "lora"))] + [str(resumed)] +
                args[args.index(str(tmp_path / "lora")) + 1:] + ["--resume"]) == 0
    want, got = tuned_model.lora.state_dict(), load_model(resumed).lora.state_dict()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # merged into one model that computes what base + adapters compute
    assert main(["convert", str(ckpt), str(tmp_path / "merged"), "--to", "hf"]) == 0
    merged = load_model(tmp_path / "merged").eval()
    assert merged.lora is None
    idx = np.array([render_prompt(conv(("user", held[0])), tok)])
    np.testing.assert_allclose(merged.forward(idx), tuned_model.forward(idx), rtol=0, atol=2e-4)
    capsys.readouterr()
    assert main([*args[:2], str(d / "base"), *args[3:]]) == 1  # no chat tokens: they would need training
    assert "--lora-r: the base" in capsys.readouterr().err
