"""`fastllm serve`: the engine's continuous batching (batched rows compute what single rows do, seeded requests
give the tokens of fastllm.sample.generate alone or in a batch), and the real server in a subprocess on a free
loopback port, driven by the official `openai` client (sync and async, streamed and not, chat and completions),
raw HTTP for malformed requests, 16 concurrent streaming clients, disconnects, a full queue, the API key, and
the chat page in headless Chromium (skipped, with the reason, where Chromium or Playwright is missing).

The chat model is a tiny byte-level GPT trained here for a few seconds to answer every user message with
ANSWER, whose characters span 1 to 3 bytes (so UTF-8 characters are split across tokens)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

import fastllm
from fastllm.checkpoint import load_model, save
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.sample import SamplingParams, generate, stream_text
from fastllm.sft import IM_END, IM_START, render, render_prompt
from fastllm.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_process import Server  # noqa: E402

from fastllm.serve import Engine, Request, ServeConfig, kv_slot_bytes, model_name, slots_within  # noqa: E402

ANSWER = "héllo wörld ☃ ça va? ✓"
EOT, START, END = 256, 257, 258
LETTERS = list("abcdefghij ")


def byte_tok(chat: bool = True) -> Tokenizer:
    special = {"<|endoftext|>": EOT} | ({IM_START: START, IM_END: END} if chat else {})
    return Tokenizer({bytes([b]): b for b in range(256)}, special_tokens=special)


def random_conversation(rng) -> list[dict]:
    msgs = [{"role": "user", "content": "".join(rng.choice(LETTERS, rng.integers(1, 12)))}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "".join(rng.choice(LETTERS, rng.integers(1, 8)))})
    return msgs


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"chat": a tiny model trained to answer ANSWER, "slow": a random 6-layer model with a 1024-token context
    (a step takes milliseconds, so a long request is still running when the test cancels it), "base": a model
    whose tokenizer has no chat tokens}, as checkpoint folders with their tokenizers."""
    d = tmp_path_factory.mktemp("serve")
    threads = fastllm.get_num_threads()
    fastllm.set_num_threads(1)
    tok = byte_tok()
    tok.save(d / "tok.tiktoken")
    rng = np.random.default_rng(0)
    m = GPT(GPTConfig(block_size=128, vocab_size=259, n_layer=2, n_head=2, n_embd=64), seed=1)
    opt = AdamW(m, 5e-3, weight_decay=0.0)
    B, T = 16, 80
    for _ in range(160):
        idx, tg = np.full((B, T), EOT, np.int32), np.full((B, T), -1, np.int32)
        for b in range(B):
            ids, mask = render(random_conversation(rng) + [{"role": "assistant", "content": ANSWER}], tok)
            n = min(len(ids), T + 1)
            idx[b, :n - 1], tg[b, :n - 1] = ids[:n - 1], np.where(mask[1:n] == 1, ids[1:n], -1)
        m.zero_grad()
        m.forward(idx, tg)
        m.backward()
        opt.step()
    out = {"chat": save(d / "chat", 160, m, opt, {}, kind="sft", tokenizer=d / "tok.tiktoken")}
    slow = GPT(GPTConfig(block_size=1024, vocab_size=259, n_layer=6, n_head=6, n_embd=384), seed=2)
    out["slow"] = save(d / "slow", 0, slow, AdamW(slow, 1e-3), {}, kind="train", tokenizer=d / "tok.tiktoken")
    byte_tok(chat=False).save(d / "base.tiktoken")
    base = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32), seed=3)
    out["base"] = save(d / "base", 0, base, AdamW(base, 1e-3), {}, kind="train", tokenizer=d / "base.tiktoken")
    fastllm.set_num_threads(threads)
    return out


# ---- the engine, in process ---------------------------------------------------------------------------------


def test_kv_cache_rows_match_single_sequences():
    """reset_row / prefill_row / copy_row / decode_rows: rows of a batch compute what each sequence computes in a
    cache of its own (bitwise here: every kernel reduces a row the same way whatever the batch; the test allows
    float tolerance), copy_row duplicates a sequence, and logits equal the model's full forward."""
    model = GPT(GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=32), seed=5).eval()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 61, n)) for n in (3, 7, 1, 5)]
    cache = model.kv_cache(5, max_len=20)
    first = [cache.prefill_row(r, p) for r, p in enumerate(prompts)]
    cache.copy_row(1, 4)  # row 4: a second sample of prompt 1
    assert list(cache.pos) == [3, 7, 1, 5, 7]
    seqs = [list(p) for p in prompts] + [list(prompts[1])]
    for _ in range(4):
        nxt = rng.integers(0, 61, 5)
        logits = cache.decode_rows(nxt)
        for r in range(5):
            seqs[r].append(int(nxt[r]))
            alone = model.kv_cache(1, max_len=20)
            alone.prefill_row(0, seqs[r][:-1])
            np.testing.assert_allclose(logits[r], alone.decode_rows([nxt[r]])[0], rtol=1e-6, atol=1e-6)
            full = model.forward(np.array([seqs[r]]))[0, -1]
            np.testing.assert_allclose(logits[r], full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    np.testing.assert_allclose(first[0], model.forward(np.array([prompts[0]]))[0, -1], rtol=1e-4, atol=1e-4)
    # the first n rows only; the others keep their state
    pos = cache.pos.copy()
    cache.decode_rows([1, 2], r0=2)
    assert list(cache.pos) == [pos[0], pos[1], pos[2] + 1, pos[3] + 1, pos[4]]
    cache.reset_row(3)
    assert cache.pos[3] == 0
    with pytest.raises(ValueError, match="decode_rows"):
        cache.decode_rows([1, 2, 3], r0=3)
    with pytest.raises(ValueError, match="prefill_row"):
        cache.prefill_row(5, [1])


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "w8a8"])
def test_engine_seeded_requests_same_alone_and_batched(weights):
    """20 seeded requests from 20 threads into 8 slots (so they queue, join and leave at step boundaries) give the
    tokens each gives alone, and those of fastllm.sample.generate with the same seed and parameters; n=3 choices
    of one prompt share its prefill but draw differently."""
    model = GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=2, n_head=2, n_embd=64), seed=1).eval()
    engine = Engine(model, byte_tok(), max_batch=8, weights=weights).start()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, rng.integers(1, 20))) for _ in range(20)]
    sp = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.1)

    def tokens(i: int, n: int = 1) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(n)]
        for events in engine.stream(Request(prompts=[prompts[i]], max_tokens=30, params=sp, seed=i, n=n),
                                    timeout=60):
            for e in events:
                out[e.index] += e.tokens
        return out

    try:
        batched: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i: batched.__setitem__(i, tokens(i)[0])) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
        assert stats["tokens"] == 600 and stats["steps"] < 300  # rows were decoded together
        for i in range(20):
            ref = generate(model, prompts[i], 30, temperature=0.9, top_k=50, repetition_penalty=1.1, seed=i,
                           weights=weights)[len(prompts[i]):]
            assert batched[i] == ref == tokens(i)[0], i
        three = tokens(0, n=3)
        assert three[0] == batched[0] and len({tuple(x) for x in three}) == 3
    finally:
        engine.stop()
    assert not engine.running


@pytest.mark.cuda
def test_engine_on_the_gpu_backend():
    """The engine on device="cuda" (a GPU or the CUDA emulator) -- the row copies (copy_row through the backend's
    view/copy_) and batched decodes run through the GPU code path -- gives the CPU engine's tokens for the same
    seeded requests, with n=2 choices sharing a prefill."""
    model = GPT(GPTConfig(block_size=48, vocab_size=259, n_layer=2, n_head=2, n_embd=32), seed=4).eval()
    rng = np.random.default_rng(2)
    reqs = [dict(prompts=[list(rng.integers(0, 256, rng.integers(1, 9)))], max_tokens=12, seed=i, n=2,
                 params=SamplingParams(temperature=1.0)) for i in range(6)]

    def run(engine) -> list[list[list[int]]]:
        outs: dict[int, list[list[int]]] = {}

        def one(i):
            out: list[list[int]] = [[], []]
            for events in engine.stream(Request(**reqs[i]), timeout=120):
                for e in events:
                    out[e.index] += e.tokens
            outs[i] = out

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        engine.stop()
        return [outs[i] for i in range(len(reqs))]

    cpu = run(Engine(model, byte_tok(), max_batch=4).start())
    model.to("cuda", "float32")
    gpu = Engine(model, byte_tok(), max_batch=4).start()
    assert gpu.kv_bytes == 2 * 2 * 4 * 48 * 32 * 4
    assert run(gpu) == cpu and gpu.counters["failures"] == 0


def test_engine_limits():
    model = GPT(GPTConfig(block_size=32, vocab_size=259, n_layer=1, n_head=2, n_embd=32), seed=1).eval()
    engine = Engine(model, byte_tok(), max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="max_tokens=10 do not fit the context of 16"):
        engine.check(Request(prompts=[[1] * 7], max_tokens=10))
    with pytest.raises(ValueError, match="n=3"):
        engine.check(Request(prompts=[[1]], max_tokens=1, n=3))
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(Request(prompts=[[1]], max_tokens=1))
    assert engine.kv_bytes == 2 * 1 * 2 * 16 * 32 * 4
    # the KV budget lowers the slots: one sequence of 32 tokens needs 2*1*32*32*4 bytes = 8 KiB
    assert slots_within(model, 16, None, 8 * 5 / 1024) == 5
    with pytest.raises(ValueError, match="holds no sequence"):
        slots_within(model, 16, None, 1 / 1024)
    with pytest.raises(ValueError, match="tokenizer has 259 ids but the model only 100"):
        Engine(GPT(GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=1, n_embd=8)), byte_tok())


def test_engine_kv_budget_counts_the_rings():
    """Sliding layers cost a ring of 2 * window - 1 rows, not max_len: a slot of a model with one sliding and one
    full layer is (15 + 64) / 128 of one with two full layers, so a KV budget holds more slots; the engine's cache
    is that size."""
    kw = dict(block_size=64, vocab_size=259, n_layer=2, n_head=2, n_embd=32, positions="rope")
    full = GPT(GPTConfig(**kw), seed=1).eval()
    sliding = GPT(GPTConfig(**kw, sliding_window=8, layer_types=["sliding_attention", "full_attention"]), seed=1)
    row = 2 * 2 * 16 * 4  # keys and values of one position of one layer, float32
    assert kv_slot_bytes(full, 64) == 128 * row and kv_slot_bytes(sliding, 64) == (15 + 64) * row
    budget = 10 * 128 * row / 2**20  # 10 slots of the full model
    assert slots_within(full, 32, None, budget) == 10 and slots_within(sliding, 32, None, budget) == 16
    engine = Engine(sliding.eval(), byte_tok(), max_batch=3)
    cache = engine.cache
    assert engine.kv_bytes == 3 * (15 + 64) * row == sum(a.nbytes for a in (cache.k, cache.v, cache.k_ring,
                                                                             cache.v_ring))


def test_engine_never_samples_ids_the_tokenizer_lacks():
    """A model with more rows than the tokenizer has ids (a padded vocabulary) never emits an undecodable id."""
    model = GPT(GPTConfig(block_size=64, vocab_size=400, n_layer=1, n_head=2, n_embd=32), seed=1).eval()
    model.p["wte"][259:] += 5.0  # make the padding rows likely
    engine = Engine(model, byte_tok(), max_batch=4).start()
    try:
        got = [t for events in engine.stream(Request(prompts=[[1, 2]], max_tokens=40, seed=0,
                                                     params=SamplingParams(temperature=2.0)), timeout=60)
               for e in events for t in e.tokens]
    finally:
        engine.stop()
    assert len(got) >= 1 and max(got) < 259 and engine.counters["failures"] == 0


def test_logprobs_of_a_padded_vocabulary_are_over_real_tokens():
    """A model with more rows than the tokenizer has ids: logprobs (of sampled tokens, their alternatives and an
    echoed prompt) are the log-softmax over the tokenizer's ids -- a padding row, which has no text, is never an
    alternative (the server answered 500 when one was among the top ones) -- and ids past the tokenizer's are a
    400 in prompts and logit_bias."""
    from starlette.testclient import TestClient

    from fastllm.serve.app import create_app

    model = GPT(GPTConfig(block_size=64, vocab_size=400, n_layer=1, n_head=2, n_embd=32), seed=1).eval()
    model.p["wte"][259:] += 5.0  # make the padding rows likely
    tok = byte_tok()
    with TestClient(create_app(Engine(model, tok, max_batch=2), "pad")) as http:
        r = http.post("/v1/chat/completions", json={"model": "pad", "messages": HI, "max_tokens": 6, "seed": 0,
                                                    "logprobs": True, "top_logprobs": 5})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["logprobs"]["content"]
        prompt = render_prompt(HI, tok).tolist()
        ids = [x["bytes"][0] if len(x["bytes"]) == 1 else tok.special_tokens[x["token"]] for x in got]
        lp = log_softmax(model.forward(np.array([prompt + ids]))[0, :, :259])
        for i, x in enumerate(got):
            assert x["logprob"] == pytest.approx(lp[len(prompt) - 1 + i, ids[i]], abs=1e-4)
            assert [t["logprob"] for t in x["top_logprobs"]] == pytest.approx(
                sorted(lp[len(prompt) - 1 + i], reverse=True)[:5], abs=1e-4)
        r = http.post("/v1/completions", json={"model": "pad", "prompt": "abc", "max_tokens": 3, "seed": 0,
                                               "logprobs": 5, "echo": True})
        assert r.status_code == 200, r.text
        abc = log_softmax(model.forward(np.array([[97, 98, 99]]))[0, :, :259])  # "abc" is bytes 97, 98, 99
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"][:3] == pytest.approx(
            [None, abc[0, 98], abc[1, 99]], abs=1e-4)
        for body in ({"prompt": [1, 300]}, {"prompt": "a", "logit_bias": {"300": 1}}):
            r = http.post("/v1/completions", json={"model": "pad", "max_tokens": 1, **body})
            assert r.status_code == 400 and "outside [0, 259)" in r.json()["error"]["message"], r.text


# ---- the server, in a subprocess ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ckpts):
    s = Server(ckpts["chat"], "--max-batch", "16")
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.log), "".join(s.log)


@pytest.fixture(scope="module")
def reference(ckpts):
    """The checkpoint loaded in this process: what fastllm.sample computes for a request."""
    model = load_model(ckpts["chat"]).eval()
    return model, Tokenizer.load(model.checkpoint_dir / "tokenizer.tiktoken")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


MODEL = "chat/ckpt_000160"
HI = [{"role": "user", "content": "abc"}]


def expected_text(reference, prompt_ids, n, stop_tokens=(), **kw) -> str:
    model, tok = reference
    return "".join(stream_text(model, tok, list(prompt_ids), n, stop_tokens=stop_tokens, **kw))


def test_models_and_health(ckpts, server, client):
    assert model_name(ckpts["chat"]) == MODEL  # the default id: the checkpoint folder's name
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "fastllm"
    assert client.models.retrieve(MODEL).id == MODEL
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL and h["slots"] == 16 and h["max_len"] == 128


def test_chat_greedy_answer_and_usage(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    prompt = render_prompt(HI, reference[1])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == ANSWER and c.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ANSWER.encode()) + 1  # the answer's bytes and <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_chunks(client, reference):
    """OpenAI's stream: the first chunk carries the role, one id throughout, text only in whole UTF-8 characters,
    a final chunk with finish_reason, then the usage chunk when asked."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hij"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == ANSWER
    assert sum(bool(p) for p in pieces) >= 10 and all("\ufffd" not in p for p in pieces)  # streamed, never a half
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"] and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ANSWER.encode()) + 1
    assert chunks[-1].usage.prompt_tokens == len(render_prompt(messages, reference[1]))


def test_chat_seeded_sampling_equals_library(client, reference):
    """A seeded request at temperature 2 gives what fastllm.sample gives with that seed (the chat stops at
    <|im_end|> or <|endoftext|>), streamed or not; another seed gives another answer."""
    kw = dict(temperature=2.0, top_p=0.99, seed=7)
    prompt = render_prompt(HI, reference[1])
    want = expected_text(reference, prompt, 60, stop_tokens=(END,), **kw)
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, **kw)
    streamed = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, stream=True, **kw)
    assert r.choices[0].message.content == want == "".join(c.choices[0].delta.content or "" for c in streamed)
    others = {client.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, temperature=2.0,
                                             top_p=0.99, seed=s).choices[0].message.content for s in range(8)}
    assert len(others) > 1


def test_chat_n_choices_logprobs_and_extra_fields(client, reference):
    model, tok = reference
    r = client.chat.completions.create(model=MODEL, messages=HI, n=3, seed=1, temperature=1.5, max_tokens=12,
                                       logprobs=True, top_logprobs=3, extra_body={"top_k": 20, "min_p": 0.01})
    assert [c.index for c in r.choices] == [0, 1, 2]
    prompt = render_prompt(HI, tok).tolist()
    assert r.usage.prompt_tokens == len(prompt)  # counted once, whatever n
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop")
                                            for c in r.choices)
    # choice 0 is what a single seeded request (and fastllm.sample) gives
    assert r.choices[0].message.content == expected_text(reference, prompt, 12, stop_tokens=(END,), seed=1,
                                                         temperature=1.5, top_k=20, min_p=0.01)
    for c in r.choices:
        ids = [x.bytes[0] if len(x.bytes) == 1 else tok.special_tokens[x.token] for x in c.logprobs.content]
        lp = log_softmax(model.forward(np.array([prompt + ids]))[0])  # the model's own, from a full forward
        for i, x in enumerate(c.logprobs.content):
            assert x.logprob == pytest.approx(lp[len(prompt) - 1 + i, ids[i]], abs=1e-4)
            tops = [t.logprob for t in x.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True)
            assert tops[0] == pytest.approx(lp[len(prompt) - 1 + i].max(), abs=1e-4)


def test_chat_takes_the_rest_of_openais_fields(client):
    """Fields of OpenAI's chat request that change nothing here (bookkeeping, hints to reasoning models, predicted
    output) are accepted and ignored, as OpenAI accepts them; those asking for what this server lacks are a 400
    naming the field as unsupported, never 'Unrecognized request argument'."""
    ignored = {"user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "prompt_cache_key": "k",
               "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"},
               "safety_identifier": "s", "reasoning_effort": "low", "verbosity": "low",
               "prediction": {"type": "content", "content": ANSWER}, "audio": None}
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, extra_body=ignored)
    assert r.choices[0].message.content == ANSWER
    for name, value in [("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {}),
                        ("moderation", {"model": "omni-moderation-latest"})]:
        with pytest.raises(openai.BadRequestError, match=f"'{name}'.*not supported") as e:
            client.chat.completions.create(model=MODEL, messages=HI, extra_body={name: value})
        assert e.value.code == "unsupported_parameter" and e.value.param == name


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_chat_stream_n_choices_with_logprobs(client):
    """Streamed n=2: chunks of both choices interleave, each choice's first chunk carries the role, and the
    streamed texts and logprobs equal the non-streamed ones for the same seed."""
    kw = dict(model=MODEL, messages=HI, n=2, seed=4, temperature=2.0, max_tokens=15, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == whole.choices[i].finish_reason
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        streamed = [x for c in mine if c.logprobs for x in c.logprobs.content]
        assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob)
                                                            for x in whole.choices[i].logprobs.content]


def test_completions_prompts_echo_logprobs_and_stop(client, reference):
    model, tok = reference
    text = render_prompt(HI, tok)
    prompt = tok.decode(text)  # the chat prompt as text: special tokens in completions' prompts are allowed
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text.startswith(ANSWER)  # only <|endoftext|> ends a completion (<|im_end|> is not shown)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens == len(text)
    # stop strings: cut before the first one, finish_reason "stop"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=["wör", "zz"])
    assert r.choices[0].text == ANSWER.split("wör")[0] and r.choices[0].finish_reason == "stop"
    # max_tokens: finish_reason "length" and exactly that many tokens (UTF-8 held back, then flushed)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert r.choices[0].text == "h\ufffd" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2
    # a list of prompts (text and token ids) x n, echo and logprobs of prompt and completion
    ids = text.tolist()
    r = client.completions.create(model=MODEL, prompt=[prompt, ids], n=2, max_tokens=5, echo=True, logprobs=2,
                                  extra_body={"top_k": 1})  # (greedy; temperature 0 with n > 1 is a 400, as in vLLM)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 4 * 5
    lp = log_softmax(model.forward(np.array([ids + list(ANSWER.encode()[:5])]))[0])
    for c in r.choices:
        assert c.text == prompt + "héll"  # "h", "é" (2 bytes), "l", "l"
        got = c.logprobs
        assert len(got.tokens) == len(ids) + 5 and got.token_logprobs[0] is None and got.top_logprobs[0] is None
        seq = ids + list(ANSWER.encode()[:5])
        want = [lp[t - 1, seq[t]] for t in range(1, len(seq))]
        np.testing.assert_allclose(got.token_logprobs[1:], want, atol=1e-4)
        assert all(got.tokens[t] in d for t, d in enumerate(got.top_logprobs) if d is not None)
        assert got.text_offset[:3] == [0, len(got.tokens[0]), len(got.tokens[0]) + len(got.tokens[1])]


def ask(client, chat: bool, stream: bool, prompt: str, **kw) -> tuple[str, str, int | str | None, int]:
    """(text, finish_reason, vLLM's stop_reason, completion_tokens) of one choice, streamed or not: the chat of HI,
    or the completion of `prompt` (the chat prompt as text, which the model answers with ANSWER too)."""
    create = client.chat.completions.create if chat else client.completions.create
    kw = {"model": MODEL, "temperature": 0, **({"messages": HI} if chat else {"prompt": prompt}), **kw}
    if not stream:
        r = create(**kw)
        c = r.choices[0]
        return c.message.content if chat else c.text, c.finish_reason, c.stop_reason, r.usage.completion_tokens
    chunks = list(create(**kw, stream=True, stream_options={"include_usage": True}))
    choices = [c.choices[0] for c in chunks if c.choices]
    text = "".join((c.delta.content or "") if chat else c.text for c in choices)
    if not chat:  # vLLM's completions chunks all carry stop_reason, null until the last
        assert all(c.stop_reason is None for c in choices[:-1])
    return text, choices[-1].finish_reason, choices[-1].stop_reason, chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("chat,stream", [(True, False), (True, True), (False, False), (False, True)])
def test_vllm_stop_token_ids_and_include_stop_str_in_output(client, reference, chat, stream):
    """vLLM's extra stop fields, chat and completions, streamed or not: stop_token_ids end the answer at a token the
    greedy ANSWER holds (its text left out, stop_reason the id), include_stop_str_in_output keeps a stop token's
    or stop string's text (stop_reason the string), and a stop string in the first min_tokens tokens' text does not
    stop (the first "l" of "héllo" is in the first 4 tokens, h é é l; the second stops)."""
    prompt = reference[1].decode(render_prompt(HI, reference[1]))
    run = lambda **kw: ask(client, chat, stream, prompt, max_tokens=40, extra_body=kw)  # noqa: E731
    w, head = ord("w"), ANSWER.split("w")[0]
    assert run(stop_token_ids=[w]) == (head, "stop", w, len(head.encode()) + 1)
    assert run(stop_token_ids=[w, w], include_stop_str_in_output=True) == (head + "w", "stop", w,
                                                                           len(head.encode()) + 1)
    stop = dict(stop=["zz", "wör"])
    n = len((head + "wör").encode())  # (the stop string is found when its last token comes)
    assert run(**stop) == (head, "stop", "wör", n)
    assert run(**stop, include_stop_str_in_output=True) == (head + "wör", "stop", "wör", n)
    assert run(stop=["l"]) == ("hé", "stop", "l", 4)
    assert run(stop=["l"], min_tokens=4) == ("hél", "stop", "l", 5)
    assert run(stop=["l"], min_tokens=4, include_stop_str_in_output=True) == ("héll", "stop", "l", 5)
    if chat:  # the model's EOS (<|im_end|>): stop_reason null; its text (a special token) is skipped either way
        n = len(ANSWER.encode()) + 1
        assert run() == run(include_stop_str_in_output=True) == (ANSWER, "stop", None, n)
        assert run(include_stop_str_in_output=True, skip_special_tokens=False) == (ANSWER + "<|im_end|>", "stop",
                                                                                   None, n)
    else:
        assert run(max_tokens=3) == ("hé", "length", None, 3)  # (max_tokens overrides the 40 above)


def test_vllm_min_tokens_and_ignore_eos(client):
    """vLLM's min_tokens and ignore_eos, as benchmark clients send them: with <|im_end|> made certain by logit_bias
    the answer ends at once; min_tokens=5 masks the EOS ids for 5 tokens (the model writes ANSWER's first 5 bytes),
    then it ends; ignore_eos samples <|im_end|> on (counted, skipped in the text unless skip_special_tokens is
    false) up to max_tokens, and masked for min_tokens all the same; without the bias, ignore_eos runs the answer
    past its <|im_end|> to max_tokens. stop_reason is null for an EOS, streamed or not."""
    eos = {"logit_bias": {str(END): 100}}
    for stream in (False, True):
        run = lambda max_tokens=8, **kw: ask(client, True, stream, "", max_tokens=max_tokens, extra_body=kw)  # noqa
        assert run(**eos) == ("", "stop", None, 1)
        assert run(**eos, min_tokens=5) == ("héll", "stop", None, 6)
        assert run(**eos, min_tokens=8) == ("héllo w", "length", None, 8)
        assert run(**eos, ignore_eos=True) == ("", "length", None, 8)
        assert run(**eos, ignore_eos=True, skip_special_tokens=False) == ("<|im_end|>" * 8, "length", None, 8)
        assert run(**eos, ignore_eos=True, min_tokens=5, skip_special_tokens=False) == \
            ("héll" + "<|im_end|>" * 3, "length", None, 8)
        text, finish, reason, tokens = run(max_tokens=60, ignore_eos=True)
        assert text.startswith(ANSWER) and len(text) > len(ANSWER) and (finish, reason, tokens) == ("length", None, 60)
    # every token sampled has its logprob, a stop token whose text is left out too (as vLLM's), and ignore_eos's
    # <|im_end|> tokens
    kw = dict(model=MODEL, messages=HI, temperature=0, max_tokens=8, logprobs=True)
    r = client.chat.completions.create(**kw, extra_body={"stop_token_ids": [ord("w")]})
    assert [x.token for x in r.choices[0].logprobs.content][-2:] == [" ", "w"] and r.usage.completion_tokens == 8
    assert r.choices[0].message.content == "héllo "
    r = client.chat.completions.create(**kw, extra_body={**eos, "ignore_eos": True, "min_tokens": 2})
    assert [x.token for x in r.choices[0].logprobs.content][2:] == ["<|im_end|>"] * 6
    # the mask is the sampler's: logprobs stay the model's own (after ANSWER, <|im_end|> is the most likely token)
    n = len(ANSWER.encode())
    r = client.chat.completions.create(**{**kw, "max_tokens": n + 3}, top_logprobs=1, extra_body={"min_tokens": n + 1})
    x = r.choices[0].logprobs.content[n]
    assert x.token != "<|im_end|>" and x.top_logprobs[0].token == "<|im_end|>"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_tokens_logprob_is_reported_as_vllm_does(client, reference, stream):
    """A choice that ends on an EOS has a logprob entry for it, as vLLM's does (its detokenizer leaves only the stop
    token's text out; its logprobs cover every sampled token id): chat's <|im_end|> after ANSWER, with the model's
    logprob, and completions' <|endoftext|> (made certain by logit_bias; the model's own logprob all the same), one
    entry per completion token, streamed or not."""
    model, tok = reference
    ids = render_prompt(HI, tok).tolist() + list(ANSWER.encode()) + [END]
    want = log_softmax(model.forward(np.array([ids]))[0])
    kw = dict(model=MODEL, temperature=0, max_tokens=40, stream=stream)
    chat = client.chat.completions.create(**kw, messages=HI, logprobs=True)
    comp = client.completions.create(**kw, prompt="ab", logprobs=0, logit_bias={str(EOT): 100})
    if stream:
        chat = [c.choices[0] for c in chat if c.choices[0].logprobs]
        entries, text = [x for c in chat for x in c.logprobs.content], "".join(c.delta.content for c in chat)
        comp = [c.choices[0] for c in comp]
    else:
        assert chat.usage.completion_tokens == len(ANSWER.encode()) + 1 and comp.usage.completion_tokens == 1
        (c,), comp = chat.choices, comp.choices
        entries, text = c.logprobs.content, c.message.content
    tokens, lps = [t for c in comp for t in c.logprobs.tokens], [x for c in comp for x in c.logprobs.token_logprobs]
    assert text == ANSWER and len(entries) == len(ANSWER.encode()) + 1 and entries[-1].token == "<|im_end|>"
    n = len(entries)
    np.testing.assert_allclose([x.logprob for x in entries], [want[-n - 1 + i, ids[-n + i]] for i in range(n)],
                               atol=1e-4)
    eot = log_softmax(model.forward(np.array([list(b"ab")]))[0])[-1, EOT]
    assert "".join(c.text for c in comp) == "" and tokens == ["<|endoftext|>"] and lps == pytest.approx([eot], abs=1e-4)


def test_logit_bias_clamped_and_greedy_n_refused_as_vllm_does(client):
    """vLLM clamps logit_bias values to [-100, 100] (vllm/sampling_params.py SamplingParams.from_optional) and
    refuses n > 1 with greedy sampling (SamplingParams._verify_greedy_sampling: n identical choices); so does
    fastllm (it answered a value beyond +-100 with a 400)."""
    run = lambda bias: ask(client, True, False, "", max_tokens=8, logit_bias=bias)  # noqa: E731
    assert run({str(END): 1e6}) == run({str(END): 100}) == ("", "stop", None, 1)
    h = run({str(ord("h")): -1e6})
    assert h == run({str(ord("h")): -100}) and not h[0].startswith("h")
    with pytest.raises(openai.BadRequestError, match="n must be 1 when using greedy sampling, got 2") as e:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=0, n=2)
    assert e.value.param == "n"
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0.5, n=2, max_tokens=4)
    assert len(r.choices) == 2


def test_stop_reason_of_an_eos_other_than_the_tokenizers_own(ckpts, reference, tmp_path):
    """vLLM's stop_reason for EOS ids: null for the tokenizer's own eos_token_id, the id for the other EOS ids of
    generation_config.json (vLLM makes them stop_token_ids: vllm/sampling_params.py update_from_generation_config,
    vllm/v1/core/sched/utils.py check_stop), as Llama 3.1's <|eom_id|> beside its <|eot_id|>. The chat model's
    folder given a tokenizer_config.json whose eos_token is <|endoftext|> and a generation_config.json with both
    (as Qwen2.5 base's): its answer ends at <|im_end|>, stop_reason 258, chat and completions, streamed or not;
    <|endoftext|> (made certain) ends with null; ignore_eos ignores both. (Without the files <|im_end|> is the chat's
    own EOS: null, as the tests above check.)"""
    folder = tmp_path / "qwenish"
    shutil.copytree(ckpts["chat"], folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [END, EOT]}))
    server = Server(folder, "--max-batch", "2", "--model-name", "qwenish")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompt = reference[1].decode(render_prompt(HI, reference[1]))
        n = len(ANSWER.encode()) + 1
        for chat in (True, False):
            for stream in (False, True):
                run = lambda **kw: ask(client, chat, stream, prompt, **{"model": "qwenish", "max_tokens": 40, **kw})  # noqa
                assert run() == (ANSWER, "stop", END, n)
                assert run(logit_bias={str(EOT): 100}) == ("", "stop", None, 1)
                assert run(max_tokens=n + 4, extra_body={"ignore_eos": True})[1:] == ("length", None, n + 4)
    finally:
        server.stop()


def test_responses_take_vllms_sampling_fields(client):
    """vLLM's Responses endpoint takes ignore_eos, logit_bias and include_stop_str_in_output beside stop, seed,
    top_k, repetition_penalty and skip_special_tokens (vllm/entrypoints/openai/responses/protocol.py
    ResponsesRequest.to_sampling_params); so does fastllm's, as in chat. It passes on neither stop_token_ids nor
    min_tokens: a 400 here, as any unknown field."""
    kw = dict(model=MODEL, input="abc", temperature=0, max_output_tokens=6)
    r = client.responses.create(**kw, extra_body={"logit_bias": {str(END): 100}})
    assert (r.status, r.output_text, r.usage.output_tokens) == ("completed", "", 1)
    r = client.responses.create(**kw, extra_body={"logit_bias": {str(END): 100}, "ignore_eos": True})
    assert (r.status, r.output_text, r.usage.output_tokens) == ("incomplete", "", 6)
    kw["max_output_tokens"] = 40
    head = ANSWER.split("w")[0]
    assert client.responses.create(**kw, extra_body={"stop": ["wör"]}).output_text == head
    r = client.responses.create(**kw, extra_body={"stop": ["wör"], "include_stop_str_in_output": True})
    assert r.output_text == head + "wör"
    for name, value in [("stop_token_ids", [ord("w")]), ("min_tokens", 2)]:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**kw, extra_body={name: value})
        assert (e.value.param, e.value.code) == (name, "unknown_parameter")


def test_responses_logprobs_are_the_chat_answers(client):
    """include=["message.output_text.logprobs"] with top_logprobs: the output text's tokens with their logprobs and
    alternatives, those chat completions gives for the same seeded request, in the response and in the stream's
    output_text deltas (together: the final part's); without the include, none (as OpenAI)."""
    kw = dict(model=MODEL, input="abc", max_output_tokens=12, extra_body={"seed": 5})
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=12,
                                          seed=5, logprobs=True, top_logprobs=2)
    want = [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in chat.choices[0].logprobs.content]
    r = client.responses.create(**kw, include=["message.output_text.logprobs"], top_logprobs=2)
    part = r.output[0].content[0]
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in part.logprobs] == want
    assert b"".join(bytes(t.bytes) for t in part.logprobs) == r.output_text.encode()  # (tokens: parts of characters)
    assert r.output_text == chat.choices[0].message.content
    assert len(part.logprobs) == r.usage.output_tokens
    events = list(client.responses.create(**kw, include=["message.output_text.logprobs"], top_logprobs=2,
                                          stream=True))
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert [(t.token, t.logprob) for t in streamed] == [w[:2] for w in want]
    done = [e for e in events if e.type == "response.output_text.done"][0]
    assert [t.token for t in done.logprobs] == [w[0] for w in want]
    assert client.responses.create(**kw).output[0].content[0].logprobs == []
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**kw, include=["message.output_text.logprobs"], top_logprobs=21)
    assert e.value.param == "top_logprobs"


def test_special_tokens_are_left_out_of_the_text_as_vllm_does(client, reference, tmp_path):
    """Special tokens the model writes mid-text (not a stop token) are not in the text, streamed or not, chat and
    completions, as vLLM's default skip_special_tokens=true leaves them out: the text is transformers'
    decode(ids, skip_special_tokens=True) of the tokens sampled; vLLM's extra field skip_special_tokens=false keeps
    them (decode(ids)), and spaces_between_special_tokens is accepted. Logprobs name a special token by its text
    either way (as vLLM's do)."""
    transformers = pytest.importorskip("transformers")
    model, tok = reference
    tok.save_hf(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    # chat: <|im_start|> made likely mid-answer; the tokens sampled read off the logprobs' bytes
    kw = dict(model=MODEL, messages=HI, max_tokens=40, seed=2, temperature=1.0, logprobs=True,
              logit_bias={str(START): 12})
    for extra in ({}, {"skip_special_tokens": True, "spaces_between_special_tokens": False},
                  {"skip_special_tokens": False}):
        r = client.chat.completions.create(**kw, extra_body=extra)
        entries = r.choices[0].logprobs.content
        ids = [x.bytes[0] if len(x.bytes) == 1 else tok.special_tokens[x.token] for x in entries]
        assert START in ids and "<|im_start|>" in [x.token for x in entries]
        skip = extra.get("skip_special_tokens", True)
        want = hf.decode(ids, skip_special_tokens=skip)
        assert r.choices[0].message.content == want and ("<|im_start|>" in want) != skip
        chunks = list(client.chat.completions.create(**kw, extra_body=extra, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # completions of the chat prompt as text: the model answers, then writes <|im_end|> (no stop here) and goes on
    prompt_ids = render_prompt(HI, tok).tolist()
    out = generate(model, prompt_ids, 40, temperature=0, stop_tokens=[EOT])[len(prompt_ids):]
    out = out[:-1] if out[-1] == EOT else out
    assert END in out
    for skip in (True, False):
        want = hf.decode(out, skip_special_tokens=skip)
        assert want.startswith(ANSWER + ("" if skip else "<|im_end|>"))
        ckw = dict(model=MODEL, prompt=tok.decode(prompt_ids), max_tokens=40, temperature=0, logprobs=0,
                   extra_body={"skip_special_tokens": skip})
        r = client.completions.create(**ckw)
        assert r.choices[0].text == want and "<|im_end|>" in r.choices[0].logprobs.tokens
        assert "".join(c.choices[0].text for c in client.completions.create(**ckw, stream=True)) == want
    with pytest.raises(openai.BadRequestError, match="skip_special_tokens") as e:
        client.completions.create(model=MODEL, prompt="a", extra_body={"skip_special_tokens": "no"})
    assert e.value.param == "skip_special_tokens"


def test_completions_echo_with_max_tokens_0_scores_the_prompt(server, client, reference):
    """echo with max_tokens=0 (how evaluation harnesses score text with OpenAI's completions): each prompt back
    with its logprobs, nothing generated, no slot taken, streamed or not; without echo max_tokens=0 stays a 400."""
    model, tok = reference
    texts = ["abc hij", "héllo"]
    kw = dict(model=MODEL, prompt=texts, max_tokens=0, echo=True, logprobs=1, n=2)
    r = client.completions.create(**kw)
    assert [c.text for c in r.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 0
    for c in r.choices:
        ids = tok.encode(c.text).tolist()
        lp = log_softmax(model.forward(np.array([ids]))[0])
        assert len(c.logprobs.tokens) == len(ids) and c.logprobs.token_logprobs[0] is None
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:], [lp[t - 1, ids[t]] for t in range(1, len(ids))],
                                   atol=1e-4)
    chunks = list(client.completions.create(stream=True, **kw))
    for c in r.choices:
        mine = [x.choices[0] for x in chunks if x.choices[0].index == c.index]
        assert "".join(x.text for x in mine) == c.text and [x.finish_reason for x in mine][-1] == "length"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="abc", max_tokens=0)
    assert server.wait_idle()["active"] == 0


def test_completions_stream_raw_sse(server, reference):
    """The bytes on the wire: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 20, "temperature": 0.8, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected_text(reference, reference[1].encode("abc"), 20, seed=3, temperature=0.8)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1


def test_async_client_concurrent(server, reference):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = aclient.chat.completions.create(model=MODEL, messages=HI, temperature=0)
        comp = aclient.completions.create(model=MODEL, prompt="ab", max_tokens=10, seed=5)

        async def streamed():
            s = await aclient.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in s])

        out = await asyncio.gather(chat, comp, streamed())
        await aclient.close()
        return out

    chat, comp, streamed = asyncio.run(run())
    assert chat.choices[0].message.content == ANSWER == streamed
    assert comp.choices[0].text == expected_text(reference, reference[1].encode("ab"), 10, seed=5)


def test_16_concurrent_streaming_clients(server, reference):
    """16 seeded streams at once: each gets exactly the text it gets alone (and that fastllm.sample gives), the
    engine decoded them together (far fewer steps than tokens), and the server is healthy and idle afterwards."""
    model, tok = reference
    rng = np.random.default_rng(1)
    prompts = ["".join(rng.choice(LETTERS, rng.integers(1, 30))) for _ in range(16)]
    kws = [dict(seed=100 + i, temperature=1.0, max_tokens=int(rng.integers(20, 60))) for i in range(16)]

    async def one(aclient, i):
        s = await aclient.completions.create(model=MODEL, prompt=prompts[i], stream=True, **kws[i])
        return "".join([c.choices[0].text async for c in s])

    async def run(ids):
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = await asyncio.gather(*(one(aclient, i) for i in ids))
        await aclient.close()
        return out

    before = server.health()
    together = asyncio.run(run(range(16)))
    during = server.health()
    alone = [asyncio.run(run([i]))[0] for i in range(16)]
    for i in range(16):
        kw = dict(kws[i])
        want = expected_text(reference, tok.encode(prompts[i]), kw.pop("max_tokens"), **kw)
        assert together[i] == alone[i] == want, i
    tokens, steps = during["tokens"] - before["tokens"], during["steps"] - before["steps"]
    assert tokens >= 16 * 20 and steps < tokens / 3, (tokens, steps)
    h = server.wait_idle()
    assert h["status"] == "ok" and h["active"] == 0 and h["waiting"] == 0 and h["failures"] == 0
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "temperature": 0},
                   timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == ANSWER


LONG = "x" * 200  # 200 byte tokens: more than the 128-token context


@pytest.mark.parametrize("path,body,status,param,code", [
    ("chat/completions", "{not json", 400, None, "invalid_json"),
    ("chat/completions", "", 400, None, "invalid_json"),
    ("chat/completions", "[1, 2]", 400, None, "invalid_body"),
    ("chat/completions", {"model": MODEL, "messages": HI, "bogus": 1}, 400, "bogus", "unknown_parameter"),
    ("chat/completions", {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "unsupported_parameter"),
    ("chat/completions", {"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 500}, 400, "max_tokens",
     "context_length_exceeded"),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_completion_tokens": 500}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "n": 1.5}, 400, "n", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "n": 17}, 400, "n", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "n": 2, "temperature": 0}, 400, "n", "invalid_value"),
    ("completions", {"model": MODEL, "prompt": "ab", "n": 3, "temperature": 0.0}, 400, "n", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stop": ["a"] * 5}, 400, "stop", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stop": [1]}, 400, "stop", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "logit_bias": {"999": 5}}, 400, "logit_bias",
     "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "response_format": {"type": "json_schema",
                                                                              "json_schema": "x"}}, 400,
     "response_format.json_schema", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, 400,
     "tools[0].function", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "repetition_penalty": 0}, 400, "repetition_penalty",
     "invalid_value"),
    ("chat/completions", {"model": "gpt-4o", "messages": HI}, 404, "model", "model_not_found"),
    ("chat/completions", {"messages": HI}, 400, "model", "missing_required_parameter"),
    ("completions", {"model": MODEL, "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"model": MODEL, "prompt": "ab", "max_tokens": 127}, 400, "max_tokens",
     "context_length_exceeded"),
    ("completions", {"model": MODEL, "prompt": [[1, 2], [300]]}, 400, "prompt", "invalid_value"),
    ("completions", {"model": MODEL, "prompt": [{"a": 1}]}, 400, "prompt[0]", "invalid_type"),
    ("completions", {"model": MODEL, "prompt": "ab", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ("completions", {"model": MODEL, "prompt": "ab", "logprobs": True}, 400, "logprobs", "invalid_type"),
    ("completions", {"model": MODEL, "prompt": "ab", "echo": 1}, 400, "echo", "invalid_type"),
    ("completions", {"model": MODEL, "prompt": "ab", "suffix": "z"}, 400, "suffix", "unsupported_parameter"),
    ("completions", {"model": MODEL, "prompt": "ab", "seed": "1"}, 400, "seed", "invalid_type"),
    ("completions", {"model": MODEL, "prompt": "ab", "frequency_penalty": 3}, 400, "frequency_penalty",
     "invalid_value"),
    ("completions", {"model": MODEL, "prompt": "ab", "min_tokens": 17}, 400, "min_tokens", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 5, "min_tokens": 6}, 400, "min_tokens",
     "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "min_tokens": 200}, 400, "min_tokens", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "min_tokens": -1}, 400, "min_tokens", "invalid_value"),
    ("chat/completions", {"model": MODEL, "messages": HI, "min_tokens": "3"}, 400, "min_tokens", "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stop_token_ids": 5}, 400, "stop_token_ids",
     "invalid_type"),
    ("chat/completions", {"model": MODEL, "messages": HI, "stop_token_ids": [5, "a"]}, 400, "stop_token_ids[1]",
     "invalid_type"),
    ("completions", {"model": MODEL, "prompt": "ab", "stop_token_ids": [300]}, 400, "stop_token_ids",
     "invalid_value"),
    ("completions", {"model": MODEL, "prompt": "ab", "ignore_eos": "yes"}, 400, "ignore_eos", "invalid_type"),
    ("completions", {"model": MODEL, "prompt": "ab", "include_stop_str_in_output": 1}, 400,
     "include_stop_str_in_output", "invalid_type"),
    ("tokenize", {"prompt": "ab", "messages": HI}, 400, "messages", "invalid_value"),
    ("tokenize", {}, 400, "prompt", "invalid_value"),
    ("tokenize", {"prompt": 5}, 400, "prompt", "invalid_type"),
    ("tokenize", {"prompt": "ab", "add_special_tokens": "no"}, 400, "add_special_tokens", "invalid_type"),
    ("tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("tokenize", {"model": "gpt-4o", "prompt": "ab"}, 404, "model", "model_not_found"),
    ("tokenize", {"prompt": "ab", "truncate": 3}, 400, "truncate", "unknown_parameter"),
    ("detokenize", {}, 400, "tokens", "missing_required_parameter"),
    ("detokenize", {"tokens": [1, 300]}, 400, "tokens", "invalid_value"),
    ("detokenize", {"tokens": [1, "a"]}, 400, "tokens[1]", "invalid_type"),
    ("detokenize", {"tokens": "ab"}, 400, "tokens", "invalid_type"),
])
def test_bad_requests(server, path, body, status, param, code):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}/v1/{path}", content=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["message"]
    assert err["type"] == "invalid_request_error"


def test_bad_requests_through_the_openai_client(server, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=HI, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model=MODEL, prompt=LONG)
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ---- vLLM's tokenizer endpoints, and lm-evaluation-harness's local-completions model through them ---------------


def test_tokenizer_endpoints(server, reference):
    """/tokenize, /detokenize and /tokenizer_info as vLLM answers them: the ids of a prompt (special tokens matched)
    and of a chat, the text of ids, the special tokens by name and a chat template that renders the chat's ids."""
    jinja2 = pytest.importorskip("jinja2")
    _, tok = reference
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=30)  # noqa: E731
    r = post("/tokenize", {"prompt": "aé<|endoftext|>", "return_token_strs": True}).json()
    assert r == {"count": 4, "max_model_len": 128, "tokens": [97, 0xC3, 0xA9, EOT],
                 "token_strs": ["a", "\ufffd", "\ufffd", "<|endoftext|>"]}
    r = post("/v1/tokenize", {"model": MODEL, "prompt": "ab", "add_special_tokens": False}).json()
    assert r["tokens"] == [97, 98] and r["token_strs"] is None
    assert post("/tokenize", {"prompt": ""}).json()["tokens"] == [EOT]  # a new document, as completions start it
    chat = post("/tokenize", {"messages": HI}).json()["tokens"]
    assert chat == render_prompt(HI, tok).tolist()
    assert post("/detokenize", {"tokens": chat}).json() == {"prompt": tok.decode(chat)}
    assert post("/detokenize", {"tokens": [0xC3]}).json() == {"prompt": "\ufffd"}  # half a character
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None and info["model_max_length"] == 128
    msgs = [{"role": "system", "content": "be brief"}, *HI]
    text = jinja2.Template(info["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    assert tok.encode(text, allowed_special="all").tolist() == render_prompt(msgs, tok).tolist()


def test_lm_eval_local_completions_scores_as_in_process(server, reference, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model pointed at the server finds its tokenizer endpoints
    (tokenizer backend "remote": no tokenizer files on the client), sends token ids, and computes what
    fastllm.eval.harness computes in process: the same log-likelihoods (multiple choice), answers (generate_until)
    and bits per byte (loglikelihood_rolling)."""
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.utils import check_remote_tokenizer_support

    from fastllm.eval.harness import simple_evaluate

    model, tok = reference
    base = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(base)
    rng = np.random.default_rng(4)
    word = lambda: "".join(rng.choice(LETTERS, rng.integers(2, 9)))  # noqa: E731
    chats = [render_prompt([{"role": "user", "content": word()}], tok) for _ in range(12)]
    rows = {"mc": [{"context": tok.decode(c), "choices": [ANSWER[:9], word(), ANSWER[2:8]], "answer": 0}
                   for c in chats],
            "gen": [{"prompt": tok.decode(c), "answer": ANSWER[:6]} for c in chats[:6]],
            "ppl": [{"text": word() + " " + word()} for _ in range(5)]}
    tasks = {
        "srv_mc": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                  "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n",
        "srv_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                   "target_delimiter: ''\ngeneration_kwargs:\n  until: ['w']\n  max_gen_toks: 8\n"
                   "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        "srv_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                   "metric_list:\n  - metric: bits_per_byte\n",
    }
    for name, body in tasks.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name[4:]]))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {tmp_path / 'hf_cache'}\n{body}")
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    remote = evaluator.simple_evaluate(
        model="local-completions", model_args=f"base_url={base},model={MODEL},max_length=127,num_concurrent=1",
        tasks=list(tasks), task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    assert remote is not None and lm_eval.__version__
    local = simple_evaluate(model, tok, list(tasks), include_path=str(tmp_path), include_defaults=False,
                            log_samples=True)
    for name in ("srv_mc", "srv_gen"):
        got = [s["resps"] for s in sorted(remote["samples"][name], key=lambda s: s["doc_id"])]
        want = [s["resps"] for s in sorted(local["samples"][name], key=lambda s: s["doc_id"])]
        if name == "srv_mc":  # [[(loglikelihood, is_greedy)] per choice] per question
            np.testing.assert_allclose([[r[0][0] for r in q] for q in got], [[r[0][0] for r in q] for q in want],
                                       rtol=1e-4, atol=1e-4)
            assert [[r[0][1] for r in q] for q in got] == [[r[0][1] for r in q] for q in want]
        else:
            assert got == want and any(r[0] for r in got)
    # local-chat-completions: lm-eval's chat messages through /v1/chat/completions, as in process with the template
    chat_gen = [{"prompt": word(), "answer": ANSWER[:6]} for _ in range(4)]
    (tmp_path / "srv_gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_gen))
    remote_chat = evaluator.simple_evaluate(
        model="local-chat-completions", model_args=f"base_url={server.url}/v1/chat/completions,model={MODEL}",
        tasks=["srv_gen"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        apply_chat_template=True, log_samples=True)
    local_chat = simple_evaluate(model, tok, ["srv_gen"], include_path=str(tmp_path), include_defaults=False,
                                 apply_chat_template=True, log_samples=True)
    got = sorted((s["doc_id"], s["resps"]) for s in remote_chat["samples"]["srv_gen"])
    assert got == sorted((s["doc_id"], s["resps"]) for s in local_chat["samples"]["srv_gen"])
    assert [r[0][0] for _, r in got] == [ANSWER[:8].split("w")[0]] * 4  # the trained answer, cut at 'until'
    got, want = remote["results"], local["results"]
    print(f"\nlm-eval local-completions: {got['srv_mc']['acc,none']:.3f} acc, {got['srv_gen']['exact_match,none']:.3f} "
          f"exact match, {got['srv_ppl']['bits_per_byte,none']:.4f} bits per byte")
    assert got["srv_mc"]["acc,none"] == want["srv_mc"]["acc,none"]
    assert got["srv_ppl"]["bits_per_byte,none"] == pytest.approx(want["srv_ppl"]["bits_per_byte,none"], rel=1e-5)


# ---- disconnects, a full queue, the API key: a slow model in a server with 2 slots ----------------------------

SLOW = {"model": "slow/ckpt_000000", "prompt": "abc", "max_tokens": 900, "logit_bias": {str(EOT): -100}}
KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def slow_server(ckpts):
    s = Server(ckpts["slow"], "--max-batch", "2", "--max-queue", "1", "--api-key", "s3cret")
    yield s
    s.stop()


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    s = slow_server
    before = s.health()["tokens"]
    with httpx.stream("POST", s.url + "/v1/completions", json={**SLOW, "stream": True}, headers=KEY,
                      timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: ") and s.health()["active"] == 1
    t0 = time.time()
    h = s.wait_idle(5)
    assert h["active"] == 0 and time.time() - t0 < 2, h
    tokens = s.health()["tokens"]
    time.sleep(0.3)
    assert s.health()["tokens"] == tokens < before + 900  # generation stopped, far before max_tokens


def test_disconnect_while_waiting_for_a_full_answer(slow_server):
    s = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/completions", json=SLOW, headers=KEY, timeout=httpx.Timeout(30, read=0.5))
    assert s.wait_idle(5)["active"] == 0


def test_full_queue_answers_429(slow_server):
    """2 slots busy and 1 request waiting (--max-queue 1): the next request gets 429 at once; when the clients
    go away the server is idle again and serves."""
    s = slow_server
    streams, opened = [], []
    try:
        for _ in range(3):  # two run, the third waits
            cm = httpx.stream("POST", s.url + "/v1/completions", json={**SLOW, "stream": True}, headers=KEY,
                              timeout=60)
            streams.append(cm)
            opened.append(cm.__enter__())
            assert opened[-1].status_code == 200
        deadline = time.time() + 10
        while (s.health()["active"], s.health()["waiting"]) != (2, 1) and time.time() < deadline:
            time.sleep(0.05)
        assert (s.health()["active"], s.health()["waiting"]) == (2, 1)
        t0 = time.time()
        r = httpx.post(s.url + "/v1/completions", json=SLOW, headers=KEY, timeout=30)
        assert r.status_code == 429 and time.time() - t0 < 5
        assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    assert s.wait_idle(5)["active"] == 0
    r = httpx.post(s.url + "/v1/completions", json={**SLOW, "max_tokens": 3}, headers=KEY, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_api_key(slow_server):
    s = slow_server
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        bad.models.list()
    r = httpx.post(s.url + "/v1/completions", json={**SLOW, "max_tokens": 1}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(**{**SLOW, "max_tokens": 2}).usage.completion_tokens == 2
    assert httpx.get(s.url + "/health").status_code == 200  # health and the page need no key
    assert httpx.get(s.url + "/").status_code == 200


# ---- in process: a base model (no chat template), the page, the command line --------------------------------


def test_base_model_chat_is_a_clear_400(ckpts):
    from starlette.testclient import TestClient

    from fastllm.serve.app import create_app
    from fastllm.serve.engine import load

    model, tok = load(ckpts["base"])
    with TestClient(create_app(Engine(model, tok, max_batch=2), "base")) as http:
        r = http.post("/v1/chat/completions", json={"model": "base", "messages": HI})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"
        assert "/v1/completions" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "base", "prompt": "", "max_tokens": 4, "seed": 0})
        assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                                              "total_tokens": 5}  # "" is <|endoftext|>


def test_cors_headers_on_server_errors(ckpts, monkeypatch):
    """With --allow-origin, a 500 (an unexpected exception in a handler) carries Access-Control-Allow-Origin as
    every other answer does, so that a page can read the error (Starlette answers those outside the CORS
    middleware: the browser saw a CORS failure instead); it is still OpenAI's error JSON, and the exception still
    reaches the server's log."""
    from starlette.testclient import TestClient

    from fastllm.serve import api
    from fastllm.serve.app import create_app
    from fastllm.serve.engine import load

    def boom(body, served):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "parse_completion", boom)
    model, tok = load(ckpts["base"])
    page = "http://page.example"
    body = {"model": "base", "prompt": "a", "max_tokens": 1}
    for origins in ((page,), ()):
        app = create_app(Engine(model, tok, max_batch=1), "base", allow_origins=origins)
        with TestClient(app, raise_server_exceptions=False) as http:
            r = http.post("/v1/completions", json=body, headers={"Origin": page})
            assert r.status_code == 500 and r.json()["error"]["code"] == "server_error"
            assert "RuntimeError: boom" in r.json()["error"]["message"]
            assert r.headers.get("access-control-allow-origin") == (page if origins else None)
            r = http.post("/v1/chat/completions", json={"model": "nope"}, headers={"Origin": page})  # a 4xx
            assert r.status_code == 404 and r.headers.get("access-control-allow-origin") == (page if origins else None)
        with TestClient(app) as http, pytest.raises(RuntimeError, match="boom"):  # (re-raised: the server logs it)
            http.post("/v1/completions", json=body, headers={"Origin": page})


def test_chat_page_is_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script" in page and "v1/chat/completions" in page
    for ref in ("src=", "href=", "@import", "url("):  # nothing is fetched from elsewhere: works offline
        assert ref not in page, ref


def test_cli_errors(ckpts, capsys):
    from fastllm.cli import main

    assert main(["serve", "--ckpt", str(ckpts["chat"].parent / "missing")]) == 1
    assert "fastllm: error: no checkpoint" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(ckpts["chat"]), "--kv-budget-mb", "0.001"]) == 1
    assert "holds no sequence" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--ckpt", str(ckpts["chat"]), "--port", str(port)]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert ServeConfig(ckpt="x").host == "127.0.0.1"  # loopback unless --host says otherwise


# ---- the chat page in a real browser --------------------------------------------------------------------------


def chromium() -> str | None:
    for name in (os.environ.get("FASTLLM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the OS, driven by Playwright; skips (with the reason) where either is missing."""
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium executable (apt-get install chromium, or set FASTLLM_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        except Exception as e:  # an unusable browser install is an environment problem, not a failure of ours
            pytest.skip(f"Chromium at {exe} does not start: {e}")
        yield b
        b.close()


def watch_answer(page) -> None:
    """Record, in window.lengths, the length of the streaming answer's text at every DOM change."""
    page.evaluate("""() => { window.lengths = []; new MutationObserver(() => {
        const a = document.querySelector(".msg.assistant[data-state='streaming']");
        if (a && a.firstChild) window.lengths.push(a.firstChild.textContent.length);
      }).observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true}); }""")


def test_chat_page_conversation(server, browser):
    """Type a message and get the model's answer, regenerate it, and keep the conversation: the second question
    is sent with the system prompt and the first exchange (the page's answer is the API's to those messages)."""
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('chat/')")
    page.fill("#temperature", "0")
    page.fill("#input", "abc")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60000)
    assert page.locator(".msg.assistant").last.evaluate("e => e.firstChild.textContent") == ANSWER
    page.click("#regenerate")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60000)
    assert page.locator(".msg.assistant").count() == 1
    page.fill("#system", "be nice")
    page.fill("#input", "hij")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-state='done']\").length == 2")
    texts = page.locator(".msg.assistant").evaluate_all("es => es.map(e => e.firstChild.textContent)")
    assert page.locator(".msg.user").all_text_contents() == ["abc", "hij"]
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "abc"},
                {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "hij"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                              "temperature": 0}, timeout=60)
    assert texts == [ANSWER, r.json()["choices"][0]["message"]["content"]]
    page.close()


def test_chat_page_streams_and_stops(slow_server, browser):
    """With the slow model (a step takes milliseconds): the API key typed into the page, a seeded answer appears
    piece by piece and equals the API's for the same seed; Stop ends a long answer and frees the server's slot."""
    s = slow_server
    page = browser.new_page()
    page.goto(s.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('API')")  # 401 shown
    page.fill("#api-key", "s3cret")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent.includes('slow/')")
    # seed 31 runs to the 400 tokens (seed 11 stopped after ~47): long enough that the page sees the answer grow
    # even on a loaded machine (a loaded CI run once received the 47-token answer in one read)
    for field, value in (("#temperature", "1"), ("#max-tokens", "400"), ("#seed", "31")):
        page.fill(field, value)
    watch_answer(page)
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120000)
    text = page.locator(".msg.assistant").last.evaluate("e => e.firstChild.textContent")
    r = httpx.post(s.url + "/v1/chat/completions", headers=KEY, timeout=120, json={
        "model": SLOW["model"], "messages": [{"role": "user", "content": "hello"}], "temperature": 1,
        "max_tokens": 400, "seed": 31})
    assert text == r.json()["choices"][0]["message"]["content"] and text
    assert len(set(page.evaluate("window.lengths")) - {0}) >= 5  # the text grew in many steps
    # Stop: a long answer (the rest of the 1024-token context) is cut, the slot freed
    page.fill("#max-tokens", "")
    page.fill("#input", "more")
    page.press("#input", "Enter")
    # Stop is clicked in the page as soon as the answer streams (a round trip from here could come after the end
    # on a loaded machine); 'stopped' is the state of an answer whose stream was aborted mid-way
    page.wait_for_function("(() => { const m = document.querySelector(\".msg.assistant[data-state='streaming']\");"
                           " if (!m || m.textContent.length <= 5) return false;"
                           " document.getElementById('stop').click(); return true; })()", timeout=60000)
    page.wait_for_selector(".msg.assistant[data-state='stopped']")
    assert len(page.locator(".msg.assistant").last.evaluate("e => e.firstChild.textContent")) < 900
    assert s.wait_idle(5)["active"] == 0
    page.close()
