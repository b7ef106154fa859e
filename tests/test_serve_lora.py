"""Multi-LoRA serving (`fastllm serve --lora-modules`, fastllm.serve.adapters): a KV-cache pass with an adapter per
run of rows (fastllm.lora.LoraRuns) computes each row as a model with only that adapter does; the engine's seeded
requests on different adapters (and none), batched together and with rows coming and going, give the tokens of
fastllm.sample.generate on the model with that adapter attached; the real server (a subprocess, the official
`openai` client) lists adapters as vLLM does, answers each adapter's requests -- alone and mixed in one batch -- as
that library call does, loads and unloads adapters at runtime only when allowed (API key honoured, a request on an
adapter being unloaded finishes), and refuses bad or mismatched adapters naming the field or file; an adapter
made by peft answers transformers + peft's greedy tokens."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading

import numpy as np
import pytest
from test_lora import randomize_b
from test_serve import END, byte_tok

from fastllm import hf
from fastllm.checkpoint import load_model, save
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.sample import SamplingParams, generate, stream_text
from fastllm.sft import render_prompt

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from serve_process import Server  # noqa: E402

from fastllm.serve import Engine, Request, parse_lora_modules  # noqa: E402

CONFIG = dict(block_size=96, vocab_size=259, n_layer=2, n_head=2, n_embd=64)
SWIGLU = dict(CONFIG, mlp="swiglu", norm="rmsnorm", positions="rope", n_kv_head=1)
ADAPTERS = {"sql": dict(r=4, alpha=8), "poet": dict(r=2, alpha=4, targets=("q", "v", "down")),
            "mini": dict(r=1, alpha=1, targets=("o",))}  # name: add_lora's fields


def make_adapter(model: GPT, seed: int, **kw):
    """Give `model` LoRA adapters with random nonzero B (so they change what it computes); returns the Lora."""
    lora = model.add_lora(seed=seed, **kw)
    randomize_b(lora, seed)
    return lora


def adapter_folders(config: dict, d) -> dict[str, str]:
    """{name: a PEFT adapter folder} of ADAPTERS for a GPT(config, seed=1)."""
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        m = GPT(GPTConfig(**config), seed=1)
        make_adapter(m, i + 1, **kw)
        out[name] = str(hf.save_adapter(m, d / name))
    return out


def with_adapter(config: dict, path: str | None) -> GPT:
    m = GPT(GPTConfig(**config), seed=1).eval()
    if path is not None:
        hf.load_adapter(m, path)
    return m


# ---- the KV cache and the engine, in process -----------------------------------------------------------------


@pytest.mark.parametrize("config", [CONFIG, SWIGLU], ids=["gelu", "swiglu"])
def test_cache_rows_with_their_own_adapters(config, tmp_path):
    """A cache whose rows run different adapters (runs of one and of two rows, the base alone between): prefill
    and decode logits of each row equal those of a cache of a model with only that adapter attached (prefills bit
    for bit; decodes up to the rounding by which the CPU's one-row GEMV differs from its GEMM, as for the base
    model in test_serve.py); a GELU MLP's base rows keep the fused GELU, the adapted ones add their product
    before it."""
    paths = adapter_folders(config, tmp_path)
    model = with_adapter(config, None)
    loras = {name: hf.load_adapter(model, p, attach=False) for name, p in paths.items()}
    assert model.lora is None  # attach=False leaves the model as it was
    rows = ["sql", "sql", None, "poet", "mini", "mini"]
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, n)) for n in (3, 7, 2, 5, 4, 6)]
    cache = model.kv_cache(len(rows), max_len=32)
    first = [cache.prefill_row(r, p, loras.get(name)) for r, (p, name) in enumerate(zip(prompts, rows))]
    nxt = rng.integers(0, 256, (3, len(rows)))
    steps = [cache.decode_rows(t, loras=[loras.get(name) for name in rows]) for t in nxt]
    for r, name in enumerate(rows):
        alone = with_adapter(config, paths.get(name)).kv_cache(1, max_len=32)
        assert np.array_equal(first[r], alone.prefill_row(0, prompts[r])), r
        for s, t in enumerate(nxt):
            np.testing.assert_allclose(steps[s][r], alone.decode_rows([t[r]])[0], rtol=1e-6, atol=1e-6)
    base = with_adapter(config, None).kv_cache(1, max_len=32)
    assert not np.allclose(first[0], base.prefill_row(0, prompts[0]))  # the adapter changes the logits


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_engine_requests_on_different_adapters_batched(weights, tmp_path):
    """24 seeded requests on three adapters and the base model, from 24 threads into 8 slots (they queue, join and
    leave at step boundaries, some with n=2): each gives the tokens of fastllm.sample.generate on the model with
    its adapter attached; every decode pass holds each adapter's rows as one run, several adapters in a pass."""
    paths = adapter_folders(CONFIG, tmp_path)
    model = with_adapter(CONFIG, None)
    loras = [None] + [hf.load_adapter(model, p, attach=False) for p in paths.values()]
    names = [None, *paths]
    engine = Engine(model, byte_tok(), max_batch=8, weights=weights)
    passes = []
    decode_rows = engine.cache.decode_rows

    def watch(tokens, r0=0, loras=None):  # the adapters of each pass's rows
        passes.append([id(x) for x in loras or [None] * len(tokens)])
        return decode_rows(tokens, r0, loras)

    engine.cache.decode_rows = watch
    engine.start()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, rng.integers(1, 16))) for _ in range(24)]
    sp = SamplingParams(temperature=0.9, top_k=50)

    def tokens(i: int) -> list[list[int]]:
        n = 2 if i % 5 == 0 else 1
        out: list[list[int]] = [[] for _ in range(n)]
        req = Request(prompts=[prompts[i]], max_tokens=8 + i % 7 * 3, params=sp, seed=i, n=n, lora=loras[i % 4])
        for events in engine.stream(req, timeout=60):
            for e in events:
                out[e.index] += e.tokens
        return out

    try:
        got: dict[int, list[list[int]]] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, tokens(i))) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert engine.counters["failures"] == 0
    for i in range(24):
        ref = with_adapter(CONFIG, paths.get(names[i % 4]))
        want = generate(ref, prompts[i], 8 + i % 7 * 3, temperature=0.9, top_k=50, seed=i, weights=weights)
        assert got[i][0] == want[len(prompts[i]):], i
    runs = [[k for k, _ in itertools.groupby(p)] for p in passes]
    assert all(len(r) == len(set(r)) for r in runs)  # each adapter's rows adjacent
    assert max(len(r) for r in runs) >= 3  # several adapters shared passes


def test_prompt_logprobs_with_an_adapter(tmp_path):
    """echo + logprobs (a full forward of the prompt) runs the request's adapter too (GPT.with_lora), and leaves
    the model as it was."""
    from starlette.testclient import TestClient

    from fastllm.serve.adapters import Adapters
    from fastllm.serve.app import create_app

    paths = adapter_folders(CONFIG, tmp_path)
    model = with_adapter(CONFIG, None)
    adapters = Adapters(model, "base")
    adapters.load("sql", paths["sql"])
    with TestClient(create_app(Engine(model, byte_tok(), max_batch=2), "base", adapters=adapters)) as http:
        for name in ("sql", "base"):
            r = http.post("/v1/completions", json={"model": name, "prompt": "abcd", "max_tokens": 0, "echo": True,
                                                   "logprobs": 0})
            assert r.status_code == 200, r.text
            logits = with_adapter(CONFIG, paths.get(name)).forward(np.array([[97, 98, 99, 100]]))[0]
            lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
                logits.max(-1, keepdims=True)
            assert r.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
                [lp[0, 98], lp[1, 99], lp[2, 100]], abs=1e-4)
            assert r.json()["model"] == name
    assert model.lora is None


def test_lora_modules_option():
    assert parse_lora_modules(["a=x/y", '{"name": "b", "path": "p", "base_model_name": "base"}']) == [
        ("a", "x/y", None), ("b", "p", "base")]
    for bad, match in [("a", "NAME=PATH"), ("=p", "NAME=PATH"), ('{"name": "b"}', "expected"),
                       ('{"name": "b", "path": "p", "rank": 2}', "rank"), ("{oops", "not JSON")]:
        with pytest.raises(ValueError, match=match):
            parse_lora_modules([bad])
    with pytest.raises(ValueError, match="'a' is given twice"):
        parse_lora_modules(["a=x", "a=y"])


# ---- the server, in a subprocess ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"base": a random chat-format model's checkpoint, "sql": a PEFT adapter folder, "poet_run": a fastllm LoRA
    training run and "poet_ckpt" its checkpoint (the adapters), "mini": another adapter folder, "other": an adapter
    of another architecture}."""
    d = tmp_path_factory.mktemp("serve_lora")
    byte_tok().save(d / "tok.tiktoken")
    base = GPT(GPTConfig(**CONFIG), seed=1)
    out = {"base": save(d / "base", 0, base, AdamW(base, 1e-3), {}, kind="train", tokenizer=d / "tok.tiktoken")}
    out.update(adapter_folders(CONFIG, d))
    m = load_model(out["base"])
    make_adapter(m, 2, **ADAPTERS["poet"])  # (the same adapter as "poet", as a LoRA run's checkpoint)
    out["poet_ckpt"] = save(d / "poet_run", 0, m, AdamW(m, 1e-3), {}, kind="sft", tokenizer=d / "tok.tiktoken")
    out["poet_run"] = d / "poet_run"
    m = GPT(GPTConfig(**dict(CONFIG, n_embd=32)), seed=1)
    make_adapter(m, 1, r=2)
    out["other"] = hf.save_adapter(m, d / "other")
    return out


MODEL = "base/ckpt_000000"
KEY = "sekret"


@pytest.fixture(scope="module")
def server(folders):
    s = Server(folders["base"], "--max-batch", "8", "--lora-modules", f"sql={folders['sql']}",
               f'{{"name": "poet", "path": "{folders["poet_run"]}", "base_model_name": "my-base"}}',
               "--allow-runtime-lora", "--api-key", KEY)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.log), "".join(s.log)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(folders, adapter: str | None, messages, n: int, **kw) -> str:
    """What fastllm.sample gives for a chat request on the base with `adapter` (a key of folders) attached."""
    model = load_model(folders["base"]).eval()
    if adapter is not None:
        hf.load_adapter(model, folders[adapter])
    tok = byte_tok()
    return "".join(stream_text(model, tok, render_prompt(messages, tok).tolist(), n, stop_tokens=(END,), **kw))


def test_models_lists_adapters_as_vllm_does(folders, client):
    cards = [m.model_dump() for m in client.models.list().data]
    assert [c["id"] for c in cards] == [MODEL, "sql", "poet"]
    assert cards[0]["parent"] is None and cards[0]["root"] == str(folders["base"])
    assert cards[1]["parent"] == MODEL and cards[1]["root"] == str(folders["sql"]) and cards[1]["owned_by"] == "fastllm"
    assert cards[2]["parent"] == "my-base" and cards[2]["object"] == "model"
    assert client.models.retrieve("sql").id == "sql"
    with pytest.raises(openai.NotFoundError, match="`base/ckpt_000000`, `sql`, `poet`"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])


def test_adapter_requests_mixed_in_one_batch_equal_the_library(folders, server):
    """12 concurrent seeded chat requests on the base, sql and poet (a LoRA run folder): each answer is what
    fastllm.sample gives on the base with that adapter attached; the answers' model is the id asked for."""
    msgs = [[{"role": "user", "content": c}] for c in ("abc", "hello", "zz top")]
    jobs = [(model, msgs[i % 3], i) for i, model in enumerate([MODEL, "sql", "poet"] * 4)]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        out = await asyncio.gather(*(aclient.chat.completions.create(model=m, messages=x, max_tokens=20, seed=s,
                                                                     temperature=1.0) for m, x, s in jobs))
        await aclient.close()
        return out

    answers = asyncio.run(run())
    refs = {MODEL: None, "sql": "sql", "poet": "poet_ckpt"}
    for (model, m, seed), r in zip(jobs, answers):
        assert r.model == model
        assert r.choices[0].message.content == expected(folders, refs[model], m, 20, seed=seed, temperature=1.0)
    assert len({r.choices[0].message.content for r in answers[:3]}) == 3


def test_completions_responses_and_tokenize_take_an_adapter(folders, client, server):
    r = client.completions.create(model="sql", prompt="ab", max_tokens=8, seed=3)
    model = load_model(folders["base"]).eval()
    hf.load_adapter(model, folders["sql"])
    assert r.model == "sql" and r.choices[0].text == "".join(stream_text(model, byte_tok(), [97, 98], 8, seed=3))
    resp = client.responses.create(model="poet", input="abc", max_output_tokens=10, temperature=0)
    want = expected(folders, "poet_ckpt", [{"role": "user", "content": "abc"}], 10, temperature=0)
    assert resp.model == "poet" and resp.output_text == want
    t = httpx.post(server.url + "/tokenize", json={"model": "sql", "prompt": "ab"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert t.status_code == 200 and t.json()["tokens"] == [97, 98]


def post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def test_load_and_unload_at_runtime(folders, server, client):
    """vLLM's endpoints: the API key is needed; a loaded adapter serves requests and is listed; its name is taken
    until it is unloaded (or replaced in place); unloaded, it is a 404; a request streaming from an adapter that
    is unloaded meanwhile finishes with it."""
    body = {"lora_name": "mini", "lora_path": folders["mini"]}
    assert post(server, "/v1/load_lora_adapter", body, key=None).status_code == 401
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mini' added successfully."
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "poet", "mini"]
    hi = [{"role": "user", "content": "abc"}]
    want = expected(folders, "mini", hi, 30, seed=1)
    assert client.chat.completions.create(model="mini", messages=hi, max_tokens=30, seed=1).choices[0] \
        .message.content == want
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name" and "already been loaded" in r.text
    assert post(server, "/v1/load_lora_adapter", {**body, "load_inplace": True}).status_code == 200
    stream = client.chat.completions.create(model="mini", messages=hi, max_tokens=30, seed=1, stream=True)
    text = next(stream).choices[0].delta.content  # (the role chunk: the request is running)
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "mini"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mini' removed successfully."
    text += "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == want
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="mini", messages=hi, max_tokens=2)
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "mini"})
    assert r.status_code == 404 and "cannot be found" in r.text
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "poet"]
    assert server.health()["failures"] == 0


@pytest.mark.parametrize("body, param, match", [
    ({"lora_name": "x", "lora_path": "/no/such/folder"}, "lora_path", "adapter_config.json not found"),
    ({"lora_name": "x", "lora_path": "OTHER"}, "lora_path", "adapter_model.safetensors.*has shape"),
    ({"lora_name": "sql", "lora_path": "OTHER"}, "lora_name", "already been loaded"),
    ({"lora_name": MODEL, "lora_path": "OTHER"}, "lora_name", "the served model's own id"),
    ({"lora_name": "x"}, "lora_path", "Missing required parameter"),
    ({"lora_path": "p"}, "lora_name", "Missing required parameter"),
    ({"lora_name": "x", "lora_path": "p", "rank": 3}, "rank", "Unrecognized request argument"),
])
def test_bad_loads_are_400s_naming_the_field(folders, server, body, param, match):
    body = {k: str(folders["other"]) if v == "OTHER" else v for k, v in body.items()}
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert re.search(match, r.json()["error"]["message"]), r.text


def test_runtime_loading_is_off_unless_allowed(folders):
    from starlette.testclient import TestClient

    from fastllm.serve.adapters import Adapters
    from fastllm.serve.app import create_app

    model = load_model(folders["base"]).eval()
    for adapters in (None, Adapters(model, "base")):
        with TestClient(create_app(Engine(model, byte_tok(), max_batch=1), "base", adapters=adapters)) as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(folders["sql"])})
            assert r.status_code == 404 and "--allow-runtime-lora" in r.text


def test_startup_errors(folders, capsys):
    from fastllm.cli import main

    base = str(folders["base"])
    cases = [([f"x={folders['other']}"], "--lora-modules x=.*adapter_model.safetensors: tensor .* has shape"),
             (["x=/no/such"], "adapter_config.json not found"),
             (["x"], "expected NAME=PATH"),
             ([f"{MODEL}={folders['sql']}"], "the served model's own id"),
             ([f"a={folders['sql']}", f"b={folders['mini']}", "--max-loras", "1"], "--max-loras 1"),
             ([f"a={folders['sql']}", "--max-lora-rank", "2"], "rank 4 .* above --max-lora-rank 2")]
    for args, match in cases:
        assert main(["serve", "--ckpt", base, "--lora-modules", *args]) == 1
        err = capsys.readouterr().err
        assert re.search(match, err), (args, err)
    # a LoRA checkpoint as the model: serve its base instead
    run = str(folders["poet_run"])
    assert main(["serve", "--ckpt", run, "--lora-modules", f"sql={folders['sql']}"]) == 1
    assert "carries adapters of its own" in capsys.readouterr().err


# ---- an adapter trained with peft -------------------------------------------------------------------------------


def test_a_peft_adapter_gives_peft_greedy_tokens(tmp_path):
    """A transformers Llama folder served with an adapter made by peft (random lora_B, per-module ranks): greedy
    completions on the adapter's id are transformers + peft's greedy tokens, on the base id the model's own."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from test_lora_peft import base_model, peft_model

    ref = base_model("llama-gqa")
    ref.save_pretrained(tmp_path / "llama")
    tuned = peft_model("llama-gqa", ref, "patterns-rslora")
    tuned.save_pretrained(tmp_path / "adapter")
    byte_tok().save(tmp_path / "tok.tiktoken")  # (259 of the model's 301 ids: the rest are never sampled)

    def greedy(model, ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            for _ in range(n):
                ids = ids + [int(model(torch.tensor([ids])).logits[0, -1, :259].argmax())]
        return ids

    s = Server(tmp_path / "llama", "--tokenizer", str(tmp_path / "tok.tiktoken"), "--lora-modules",
               f"tuned={tmp_path / 'adapter'}")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        prompt = [5, 17, 200, 33]
        for name, model in (("tuned", tuned), ("llama", ref)):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
            want = byte_tok().decode(greedy(model, prompt, 12)[len(prompt):], skip_special_tokens=True)
            assert r.choices[0].text == want, name
    finally:
        s.stop()
