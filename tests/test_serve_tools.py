"""Tool calling, structured output and the Responses API in `fastllm serve`: the tool-call formats (fastllm.tools)
parsed as they stream and rendered as Qwen2.5's template renders them, grammar-constrained decoding (fastllm.grammar)
checked against jsonschema on many random schemas and seeds, and the server driven by the official openai client
(tool_choice "required" / named / "auto", a tool result sent back, `response_format` json_schema and json_object,
`client.chat.completions.parse` with a pydantic model, streamed and not), the same through `client.responses`
(its requests run as the chat requests they translate to), with bad requests answered 400 naming the field. The
served model is random (untrained): whatever it would say, the grammar decides the shape; one test fine-tunes a
model on tool conversations and serves it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastllm
from fastllm.chat import ChatML, ChatTemplate
from fastllm.checkpoint import save
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.tokenizer import Tokenizer
from fastllm.tools import FORMATS, HermesParser, Llama3JsonParser, hermes_messages, template_format

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from fastllm.grammar import Guide  # noqa: E402

EOT, START, END = 256, 257, 258


def byte_tok() -> Tokenizer:
    return Tokenizer({bytes([b]): b for b in range(256)},
                     special_tokens={"<|endoftext|>": EOT, "<|im_start|>": START, "<|im_end|>": END})


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city for the next days.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Köln", "東京"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "days", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time."}}
TOOLS = [WEATHER, CLOCK]


def split_feed(parser, text: str, cuts) -> tuple[str, list[dict]]:
    """(content, calls) of `text` fed in pieces cut at `cuts`, then finish()."""
    content, calls = "", []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for piece in pieces:
        c, k = parser.feed(piece)
        content, calls = content + c, calls + k
    c, k = parser.finish()
    return content + c, calls + k


def plain(calls: list[dict]) -> list[tuple[str, dict]]:
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) > 10
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ---- the formats ----------------------------------------------------------------------------------------------

HERMES_CASES = [
    ("Hello there.", "Hello there.", []),
    ('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', "", [("now", {})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "days": 2, "unit": "c"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', "Let me check.",
     [("get_weather", {"city": "Köln", "days": 2, "unit": "c"}), ("now", {})]),
    ('<tool_call>\n{"name": "now", "arguments": {}}', "", [("now", {})]),  # the model stopped before </tool_call>
    ("<tool_call>\n{not json}\n</tool_call> ok", "<tool_call>\n{not json}\n</tool_call> ok", []),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ("<tool_call>\n{\"name\": \"now\", \"argu", "<tool_call>\n{\"name\": \"now\", \"argu", []),  # cut off
    ("a < b <tool but not a call <tool_c", "a < b <tool but not a call <tool_c", []),
    ("  spaced  \n\n", "  spaced  \n\n", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_parser_streamed_in_any_pieces(text, content, calls):
    rng = np.random.default_rng(len(text))
    splits = [[], list(range(1, len(text)))] + [sorted(rng.choice(max(len(text) - 1, 1), 3) + 1) for _ in range(5)]
    for cuts in splits:
        got, got_calls = split_feed(HermesParser(), text, [c for c in cuts if 0 < c < len(text)])
        assert got == content and plain(got_calls) == calls, cuts


LLAMA_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 1, "unit": "f"}}', "",
     [("get_weather", {"city": "Paris", "days": 1, "unit": "f"})]),
    ('<|python_tag|>{"name": "now", "parameters": {}}; {"name": "now", "arguments": {}}', "",
     [("now", {}), ("now", {})]),
    ('  {"name": "now"}', "", [("now", {})]),
    ('{"a": 1}', '{"a": 1}', []),
    ('{"name": "now", "parameters": {}} and then text', '{"name": "now", "parameters": {}} and then text', []),
    ("<|python", "<|python", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json_parser_streamed_in_any_pieces(text, content, calls):
    for cuts in ([], list(range(1, len(text))), [3, 9]):
        got, got_calls = split_feed(Llama3JsonParser(), text, [c for c in cuts if 0 < c < len(text)])
        assert got == content and plain(got_calls) == calls


THINK_CASES = [
    ("<think>\nLet me see.\n\nOk.\n</think>\n\nIt is 12.", False, "Let me see.\n\nOk.", "It is 12."),
    ("Plain answer.", False, "", "Plain answer."),
    ("\nThe template opened it.\n</think>\n\nAnswer", True, "The template opened it.", "Answer"),
    ("<think>\ncut off by max_tok", False, "cut off by max_tok", ""),
    ("<thi", False, "", "<thi"),
    ("<think>\n\n</think>\n\n", False, "", ""),
    ("a < b, <think> later is text", False, "", "a < b, <think> later is text"),
]


@pytest.mark.parametrize("text,opened,reasoning,content", THINK_CASES)
def test_think_parser_streamed_in_any_pieces(text, opened, reasoning, content):
    from fastllm.tools import ThinkParser

    for step in (len(text) or 1, 1, 2, 3, 7):
        parser, got = ThinkParser(opened), ["", ""]
        for i in range(0, len(text), step):
            r, c = parser.feed(text[i:i + step])
            got = [got[0] + r, got[1] + c]
        r, c = parser.finish()
        assert (got[0] + r, got[1] + c) == (reasoning, content), step


def test_a_thinking_models_reasoning_is_split_off():
    """Qwen3's template: the answer's <think> block is message.reasoning_content (streamed as reasoning_content
    deltas; a `reasoning` item in the Responses API), the rest content or tool calls; enable_thinking=False writes
    an empty block into the prompt, and a template that opens <think> itself starts the answer inside it."""
    from hf_families import QWEN3_TEMPLATE

    from fastllm.serve.api import ServedModel, parse_chat
    from fastllm.serve.engine import Chunk
    from fastllm.serve.responses import parse_response

    tok = byte_tok()

    def run(chat, body, answer, responses=False):
        served = ServedModel("m", tok, 4096, 4, 259, chat)
        call = (parse_response if responses else parse_chat)({"model": "m", **body}, served)
        events = []
        for k in range(0, len(answer), 5):
            last = k + 5 >= len(answer)
            events += call.feed([Chunk(0, answer[k:k + 5], [1], finish_reason="stop" if last else None)])
        return call, events

    qwen3 = ChatTemplate(QWEN3_TEMPLATE, tok, stop_tokens=[END])
    assert qwen3.thinks and not ChatML(tok).thinks
    answer = "<think>\nThe user wants the time.\n</think>\n\nIt is noon."
    for stream in (False, True):
        call, chunks = run(qwen3, {"messages": ASK, "stream": stream}, answer)
        msg = call.response()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == ("The user wants the time.", "It is noon.")
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants the time."
        assert "".join(d.get("content") or "" for d in deltas) == "It is noon."
    call, _ = run(qwen3, {"messages": ASK, "tools": TOOLS}, "<think>\nA call.\n</think>\n\n<tool_call>\n"
                  '{"name": "now", "arguments": {}}\n</tool_call>')
    choice = call.response()["choices"][0]
    assert choice["message"]["reasoning_content"] == "A call." and choice["message"]["content"] is None
    assert plain(choice["message"]["tool_calls"]) == [("now", {})] and choice["finish_reason"] == "tool_calls"
    call, events = run(qwen3, {"input": "What time is it?", "stream": True}, answer, responses=True)
    items = call.response()["output"]
    assert [i["type"] for i in items] == ["reasoning", "message"]
    assert items[0]["content"][0]["text"] == "The user wants the time."
    assert items[1]["content"][0]["text"] == "It is noon."
    kinds = [e["type"] for e in events]
    assert "response.reasoning_text.delta" in kinds and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # enable_thinking=False: the prompt holds an empty block; the answer is all content
    plain_qwen3 = ChatTemplate(QWEN3_TEMPLATE, tok, {"enable_thinking": False}, stop_tokens=[END])
    call, _ = run(plain_qwen3, {"messages": ASK}, "It is noon.")
    assert tok.decode(call.request.prompts[0]).endswith("<think>\n\n</think>\n\n")
    assert call.response()["choices"][0]["message"]["reasoning_content"] is None
    # a template whose generation prompt opens <think> (DeepSeek-R1's distills): the answer starts inside it
    opened = ChatTemplate(QWEN3_TEMPLATE + "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}", tok,
                          stop_tokens=[END])
    call, _ = run(opened, {"messages": ASK}, "Hmm.\n</think>\n\nNoon.")
    msg = call.response()["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("Hmm.", "Noon.")


def answer_of(served, body: dict, ids: list[int]):
    """The chat response to `body` whose answer is the tokens `ids` (then a stop token), each turned into text as
    the engine turns it (its per-sequence state, fastllm.serve.engine._Seq: special tokens skipped or not)."""
    from fastllm.serve.api import parse_chat
    from fastllm.serve.engine import _Seq

    call = parse_chat({"model": "m", **body}, served)
    stop = call.request.stop_tokens[0]
    seq = _Seq(call.request, 0, call.request.prompts[0], 1000, served.tokenizer, None, served.vocab_size)
    call.feed([seq.step(t) for t in ids + [stop]])
    return call.response()["choices"][0]


def test_tool_and_reasoning_tags_that_are_special_tokens_reach_the_parsers():
    """Special tokens are left out of the answer (vLLM's skip_special_tokens=true), but a tokenizer whose
    <tool_call> / <think> tags are special tokens still has them read by the hermes and reasoning parsers (vLLM's
    hermes parser turns skipping off for that), while the other special tokens stay out of the content; Llama
    3.1's <|python_tag|> is skipped as in vLLM, and its JSON call is still read (as vLLM's llama3_json parser does)."""
    from hf_families import LLAMA31_TEMPLATE, QWEN3_TEMPLATE

    from fastllm.serve.api import ServedModel

    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={s: 256 + i for i, s in enumerate(names)})
    sp = tok.special_tokens
    qwen3 = ServedModel("m", tok, 4096, 4, tok.n_vocab,
                        ChatTemplate(QWEN3_TEMPLATE, tok, stop_tokens=[sp["<|im_end|>"]]))

    def b(text: str) -> list[int]:
        return list(text.encode())

    ids = [sp["<think>"], *b("\nHm"), sp["<|im_start|>"], *b(".\n"), sp["</think>"], *b("\n\nSure"),
           sp["<|endoftext|>"], *b("."), sp["<tool_call>"], *b('\n{"name": "now", "arguments": {}}\n'),
           sp["</tool_call>"]]
    for body in ({"messages": ASK, "tools": TOOLS}, {"messages": ASK, "tools": TOOLS, "skip_special_tokens": False}):
        choice = answer_of(qwen3, body, ids)
        msg = choice["message"]
        skip = body.get("skip_special_tokens", True)
        assert msg["reasoning_content"] == ("Hm." if skip else "Hm<|im_start|>.")
        assert msg["content"] == ("Sure." if skip else "Sure<|endoftext|>.")
        assert plain(msg["tool_calls"]) == [("now", {})] and choice["finish_reason"] == "tool_calls"
    # no tools (tool_choice "none" too): the tool-call tags are special tokens like the others
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        assert answer_of(qwen3, {"messages": ASK, **extra}, ids)["message"]["content"] == 'Sure.\n{"name": "now", ' \
            '"arguments": {}}\n'
    # Llama 3.1: <|python_tag|>{...} is a call whether the tag is skipped (the default) or not
    names = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={s: 256 + i for i, s in enumerate(names)})
    sp = tok.special_tokens
    llama = ServedModel("m", tok, 4096, 4, tok.n_vocab, ChatTemplate(
        LLAMA31_TEMPLATE, tok, {"bos_token": "<|begin_of_text|>"}, stop_tokens=[sp["<|eot_id|>"]]))
    for skip in (True, False):
        body = {"messages": ASK, "tools": TOOLS, "skip_special_tokens": skip}
        choice = answer_of(llama, body, [sp["<|python_tag|>"], *b('{"name": "now", "parameters": {}}')])
        assert plain(choice["message"]["tool_calls"]) == [("now", {})] and choice["message"]["content"] is None
        choice = answer_of(llama, body, [*b("It is"), sp["<|start_header_id|>"], *b(" noon.")])
        assert choice["message"]["content"] == ("It is noon." if skip else "It is<|start_header_id|> noon.")
    # the Responses API takes vLLM's field too
    from fastllm.serve.responses import parse_response

    for extra, skip in (({}, True), ({"skip_special_tokens": False}, False)):
        assert parse_response({"model": "m", "input": "hi", **extra}, llama).request.skip_special_tokens is skip


def conversation() -> list[dict]:
    """An OpenAI conversation with a tool round trip, as the API layer passes it to chat formats."""
    from fastllm.serve.api import _messages

    return _messages([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Köln and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Köln", "days": 1, "unit": "c"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12°C, rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "09:30"},
        {"role": "assistant", "content": "Rainy, 12°C; it is 09:30."},
        {"role": "user", "content": "Thanks. And Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_3", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1, "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": "20°C"},
    ])


def test_chatml_with_tools_is_written_as_qwen25_writes_it():
    from hf_families import QWEN25_TEMPLATE

    pytest.importorskip("jinja2")
    tok = byte_tok()
    msgs = conversation()
    assert msgs[3]["name"] == "get_weather" and msgs[4]["name"] == "now"  # looked up from the calls' ids
    qwen = ChatTemplate(QWEN25_TEMPLATE, tok)
    assert qwen.tool_format == "hermes" and ChatML(tok).tool_format == "hermes"
    for tools in (TOOLS, None):
        ours = tok.decode(ChatML(tok).prompt(msgs, tools).tolist())
        assert ours == "<|endoftext|>" + qwen.text(msgs, add_generation_prompt=True, tools=tools)
    # without a system message, the tools make one (Qwen's template would write its own default persona first)
    text = hermes_messages(msgs[1:3], TOOLS)[0]["content"]
    assert text.startswith("# Tools\n\nYou may call") and json.dumps(WEATHER, ensure_ascii=False) in text


def test_template_tool_formats():
    from hf_families import LLAMA3_TEMPLATE, QWEN25_TEMPLATE

    assert template_format(QWEN25_TEMPLATE) == "hermes"
    assert template_format(LLAMA3_TEMPLATE) is None  # Llama 3.0's template takes no tools
    llama31 = ("{%- if tools is not none %}{{- 'Given the following functions, respond with a JSON for a function "
               "call with its proper arguments.' }}{{- 'Respond in the format {\"name\": function name, "
               "\"parameters\": dictionary of argument name and its value}.' }}{%- endif %}")
    assert template_format(llama31) == "llama3_json"


# ---- the grammar ----------------------------------------------------------------------------------------------

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"},
                                               "maxItems": 3},
                                      "pos": {"$ref": "#/$defs/point"}},
     "required": ["name", "pos"], "additionalProperties": False,
     "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "required": ["x", "y"], "additionalProperties": False}}},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "none"},
               {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"],
                "additionalProperties": False}]},
]


def run_matcher(constraint, V: int, rng, max_steps: int = 400) -> list[int]:
    """Tokens sampled at random among those the grammar allows, until a stop token."""
    m, out = constraint.matcher(), []
    for _ in range(max_steps):
        allowed = m.allowed(V)
        t = int(rng.choice(np.flatnonzero(allowed)))
        if t == END:
            assert m.complete
            return out
        m.accept(t)
        out.append(t)
    raise AssertionError(f"no stop after {max_steps} tokens: {out}")


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_json_schema_constraint_against_jsonschema(k):
    tok = byte_tok()
    constraint = Guide(tok, [END]).json_schema(SCHEMAS[k])
    rng = np.random.default_rng(k)
    for _ in range(30):
        text = tok.decode(run_matcher(constraint, 300, rng))  # model rows past the tokenizer's are never allowed
        jsonschema.validate(json.loads(text), SCHEMAS[k])
        assert "\n" not in text and not text[0].isspace()  # no free whitespace (fastllm.grammar.JSON_STYLE)


def test_grammar_errors_and_disallowed_tokens():
    tok = byte_tok()
    guide = Guide(tok, [END])
    with pytest.raises(ValueError, match="nope"):
        guide.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})
    with pytest.raises(ValueError):
        guide.lark("start: (")
    m = guide.json_schema({"const": 7}).matcher()
    assert np.flatnonzero(m.allowed(259)).tolist() == [ord("7")]
    with pytest.raises(ValueError, match="token 65"):
        m.accept(65)
    with pytest.raises(ValueError, match="stop token"):
        Guide(tok, [])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_forced_call_grammar_gives_parseable_calls(fmt):
    tok = byte_tok()
    guide = Guide(tok, [END])
    rng = np.random.default_rng(1)
    for parallel in (False, True):
        constraint = guide.lark(FORMATS[fmt].grammar(TOOLS, parallel))
        for _ in range(10):
            text = tok.decode(run_matcher(constraint, 259, rng, 2000))
            content, calls = split_feed(FORMATS[fmt].parser(), text, [5, 20])
            assert content == "" and calls and (parallel or len(calls) == 1), text
            for name, args in plain(calls):
                tool = {t["function"]["name"]: t["function"] for t in TOOLS}[name]
                jsonschema.validate(args, tool.get("parameters", {"type": "object"}))


def test_engine_constrained_request_same_alone_and_batched():
    from fastllm.serve import Engine, Request

    tok = byte_tok()
    model = GPT(GPTConfig(block_size=256, vocab_size=264, n_layer=1, n_head=2, n_embd=32), seed=4).eval()
    constraint = Guide(tok, [END]).json_schema(SCHEMAS[2])
    engine = Engine(model, tok, max_batch=4).start()
    try:
        def run(req):
            return [t for events in engine.stream(req, timeout=60) for e in events for t in e.tokens]

        def make(seed):
            return Request(prompts=[tok.encode("abc").tolist()], max_tokens=120, seed=seed, stop_tokens=[END],
                           constraint=constraint)
        alone = run(make(5))
        others = [make(s) for s in (6, 7)]
        for r in others:
            r.emit = lambda events: None
            engine.submit(r)
        assert run(make(5)) == alone
        assert alone[-1] == END
        jsonschema.validate(json.loads(tok.decode(alone[:-1])), SCHEMAS[2])
    finally:
        engine.stop()


def test_llama31_template_forced_call_and_its_result():
    """A Llama 3.1 folder's template: a forced call is written as {"name", "parameters"} and read back as a tool
    call; the call and its result go back into the prompt as the template writes them (the ipython role)."""
    from hf_families import LLAMA31_TEMPLATE

    from fastllm.serve import Engine
    from fastllm.serve.api import ServedModel, parse_chat

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={s: 256 + i for i, s in enumerate(specials)})
    chat = ChatTemplate(LLAMA31_TEMPLATE, tok, {"bos_token": "<|begin_of_text|>"}, stop_tokens=[259])
    assert chat.tool_format == "llama3_json"
    served = ServedModel("llama", tok, 2048, 2, 261, chat)
    model = GPT(GPTConfig(block_size=2048, vocab_size=261, n_layer=1, n_head=2, n_embd=32), seed=6).eval()
    engine = Engine(model, tok, max_batch=2).start()
    try:
        call = parse_chat({"model": "llama", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 1,
                           "max_tokens": 300}, served)
        for events in engine.stream(call.request, timeout=60):
            call.feed(events)
    finally:
        engine.stop()
    prompt = tok.decode(call.request.prompts[0])
    assert "Given the following functions" in prompt and '"name": "get_weather"' in prompt
    (choice,) = call.response()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    ((name, args),) = check_calls(choice["message"]["tool_calls"])
    history = ASK + [choice["message"], {"role": "tool", "tool_call_id": choice["message"]["tool_calls"][0]["id"],
                                         "content": "sunny"}]
    prompt = tok.decode(parse_chat({"model": "llama", "messages": history, "tools": TOOLS}, served).request.prompts[0])
    written = json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
    # (a string is "iterable" to Jinja, so this template writes a result as JSON: "sunny", as transformers renders it)
    assert prompt.endswith(f'{written}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"sunny"<|eot_id|>'
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---- the server, driven by the openai client -------------------------------------------------------------------

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_process import Server  # noqa: E402

MODEL = "tools"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A random 1-layer model with a 1536-token context (the tools' descriptions are ~800 byte tokens)."""
    d = tmp_path_factory.mktemp("tools")
    byte_tok().save(d / "tok.tiktoken")
    model = GPT(GPTConfig(block_size=1536, vocab_size=259, n_layer=1, n_head=2, n_embd=32), seed=3)
    ckpt = save(d / "run", 0, model, AdamW(model, 1e-3), {}, kind="sft", tokenizer=d / "tok.tiktoken")
    s = Server(ckpt, "--max-batch", "4", "--model-name", MODEL)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.log), "".join(s.log)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def check_calls(calls, names=("get_weather", "now")) -> list[tuple[str, dict]]:
    out = []
    for c in calls:
        c = c if isinstance(c, dict) else c.model_dump()
        name, args = plain([c])[0]
        assert name in names
        params = {t["function"]["name"]: t["function"] for t in TOOLS}[name].get("parameters", {"type": "object"})
        jsonschema.validate(args, params)
        out.append((name, args))
    return out


def streamed(client, **kw) -> tuple[str, list[dict], str]:
    """(content, tool calls, finish_reason) of a streamed answer, put together from its deltas."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        (choice,) = chunk.choices
        d = choice.delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "type": tc.type,
                                                "function": {"name": "", "arguments": ""}})
            entry["function"]["name"] += tc.function.name or ""
            entry["function"]["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_tool_call_streamed_and_not(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=11, max_tokens=400)
    r = client.chat.completions.create(**kw)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = check_calls(choice.message.tool_calls)
    content, s_calls, finish = streamed(client, **kw)
    assert content == "" and finish == "tool_calls" and check_calls(s_calls) == calls
    one = client.chat.completions.create(**{**kw, "parallel_tool_calls": False, "n": 3, "seed": 2})
    assert all(c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 for c in one.choices)


def test_named_tool_call_and_the_answer_to_its_result(client, server):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=300, seed=5,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = client.chat.completions.create(**kw).choices[0].message
    ((name, args),) = check_calls(msg.tool_calls, names=("get_weather",))
    history = ASK + [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 21°C"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=5, seed=1)
    tok = byte_tok()
    from fastllm.serve.api import _messages

    expected = ChatML(tok).prompt(_messages(history), TOOLS)
    assert r.usage.prompt_tokens == len(expected)
    assert "<tool_response>\nsunny, 21°C\n</tool_response>" in tok.decode(expected.tolist())
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_calls_read_from_the_stream_of_engine_events():
    """tool_choice "auto": the API layer turns a hermes answer, in whatever pieces the engine sends it, into a
    content delta, one tool_calls delta per call (indices 0, 1) and finish_reason "tool_calls"."""
    from fastllm.serve.api import ServedModel, parse_chat
    from fastllm.serve.engine import Chunk

    tok = byte_tok()
    served = ServedModel("m", tok, 4096, 4, 259, ChatML(tok))
    answer = ('One moment.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"city": "東京", "days": 3, "unit": "c"}}\n</tool_call>')
    for stream in (True, False):
        call = parse_chat({"model": "m", "messages": ASK, "tools": TOOLS, "stream": stream}, served)
        pieces = [answer[i:i + 7] for i in range(0, len(answer), 7)]
        chunks = []
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            chunks += call.feed([Chunk(0, piece, [1], finish_reason="stop" if last else None)])
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content") or "" for d in deltas) == "One moment."
        tool_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert [d["index"] for d in tool_deltas] == [0, 1]
        assert plain(tool_deltas) == [("now", {}), ("get_weather", {"city": "東京", "days": 3, "unit": "c"})]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        msg = call.response()["choices"][0]["message"]
        assert msg["content"] == "One moment." and plain(msg["tool_calls"]) == plain(tool_deltas)


def test_fine_tuned_on_tool_conversations_then_served(tmp_path):
    """The pipeline end to end: `fastllm.sft` on tool-use conversations in OpenAI's fine-tuning format (a BPE
    tokenizer trained on them, a random base), then the checkpoint served and asked through the openai client with
    tool_choice "auto": a greeting gets text, a question about the time a call to `now` (streamed the same), and
    the call's result a text answer."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from fastllm.chat import validate_conversation
    from fastllm.serve import Engine, load
    from fastllm.serve.app import create_app
    from fastllm.sft import SFTConfig, sft

    now = {"type": "function", "function": {"name": "now", "description": "The time."}}
    rng = np.random.default_rng(0)

    def conversation() -> dict:
        if rng.random() < 0.4:
            return {"messages": [{"role": "user", "content": str(rng.choice(["hi", "hello", "hey there"]))},
                                 {"role": "assistant", "content": "hello!"}], "tools": [now]}
        call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
        return {"messages": [
            {"role": "user", "content": str(rng.choice(["what time is it?", "time please", "the time?"]))},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": f"{rng.integers(24):02d}:{rng.integers(60):02d}"},
            {"role": "assistant", "content": "done"}], "tools": [now]}

    convs = [conversation() for _ in range(300)]
    texts = ["\n".join(m["content"] for m in hermes_messages(validate_conversation(c), c["tools"])) for c in convs]
    tok = Tokenizer.train(texts, 600, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), progress=False)
    tok.save(tmp_path / "tok.tiktoken")
    base = GPT(GPTConfig(block_size=256, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=64), seed=1)
    save(tmp_path / "base", 0, base, AdamW(base, 1e-3), {}, kind="train", tokenizer=tmp_path / "tok.tiktoken")
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    threads = fastllm.get_num_threads()
    try:
        sft(SFTConfig(base=str(tmp_path / "base"), data=str(tmp_path / "tools.jsonl"), out=str(tmp_path / "sft"),
                      batch_size=8, max_steps=200, lr=1e-2, warmup_steps=5, eval_every=0, ckpt_every=200, threads=1,
                      val_fraction=0), progress=False, log=lambda *a: None)
    finally:
        fastllm.set_num_threads(threads)
    model, tk = load(tmp_path / "sft")
    with TestClient(create_app(Engine(model, tk, max_batch=2), "m")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        kw = dict(model="m", tools=[now], max_tokens=40, temperature=0)
        r = client.chat.completions.create(messages=[{"role": "user", "content": "hey there"}], **kw)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("hello!", "stop")
        ask = [{"role": "user", "content": "time please"}]
        r = client.chat.completions.create(messages=ask, **kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        assert plain([c.model_dump() for c in msg.tool_calls]) == [("now", {})]
        content, calls, finish = streamed(client, messages=ask, **kw)
        assert (content, plain(calls), finish) == ("", [("now", {})], "tool_calls")
        result = {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "12:34"}
        r = client.chat.completions.create(messages=ask + [msg.model_dump(exclude_none=True), result], **kw)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("done", "stop")


def test_auto_and_none_leave_a_random_model_free(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=8,
                                           seed=3)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_json_schema_and_json_object(client):
    schema = SCHEMAS[2]
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        content, calls, finish = streamed(client, model=MODEL, messages=ASK, response_format=fmt, seed=seed,
                                          max_tokens=200)
        assert content == r.choices[0].message.content and finish == "stop" and not calls
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"}, seed=1,
                                       max_tokens=40)
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_parse_with_a_pydantic_model(client):
    from typing import Literal

    import pydantic

    class Forecast(pydantic.BaseModel):
        city: Literal["Paris", "Köln"]
        rain: bool
        days: Literal[1, 2, 3]

    r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast, seed=4, max_tokens=100)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and parsed.city in ("Paris", "Köln")


@pytest.mark.parametrize("body,param,code", [
    ({"tools": [{"type": "function"}]}, "tools[0].function", "invalid_type"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [CLOCK, CLOCK]}, "tools[1].function.name", "invalid_value"),
    ({"tools": []}, "tools", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": "{}"}}]},
     "tools[0].function.parameters", "invalid_type"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "invalid_value"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "invalid_value"),
    ({"tools": [CLOCK, {"type": "function", "function": {"name": "x", "parameters": {"type": "nope"}}}],
      "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tools[1].function.parameters", "invalid_value"),
    ({"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}, "messages[0].tool_call_id", "invalid_type"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "invalid_value"),
    ({"functions": [{"name": "x"}]}, "functions", "unsupported_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
     "response_format.json_schema.schema", "invalid_type"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "invalid_value"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]",
     "invalid_value"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role", "unsupported_parameter"),
])
def test_bad_tool_and_format_requests(server, body, param, code):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert server.health()["status"] == "ok"


def test_without_llguidance_constraints_are_a_clear_400(monkeypatch):
    """llguidance is in the serve extra; a server without it still serves tools ("auto"), and a request that needs
    a grammar is a 400 that says what to install."""
    import sys

    from fastllm.serve.api import APIError, ServedModel, parse_chat

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    tok = byte_tok()
    served = ServedModel("m", tok, 4096, 4, 259, ChatML(tok))
    assert parse_chat({"model": "m", "messages": ASK, "tools": TOOLS}, served).request.constraint is None
    for extra in ({"response_format": {"type": "json_object"}}, {"tools": TOOLS, "tool_choice": "required"}):
        with pytest.raises(APIError, match=r'pip install "fastllm\[serve\]"') as e:
            parse_chat({"model": "m", "messages": ASK, **extra}, served)
        assert e.value.status == 400


def test_a_template_without_tools_refuses_them(tmp_path):
    """Llama 3.0's template never writes a tool call: tools are a 400, not silently dropped."""
    from hf_families import LLAMA3_TEMPLATE

    from fastllm.serve.api import APIError, ServedModel, parse_chat

    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={
        "<|begin_of_text|>": 256, "<|start_header_id|>": 257, "<|end_header_id|>": 258, "<|eot_id|>": 259})
    chat = ChatTemplate(LLAMA3_TEMPLATE, tok, {"bos_token": "<|begin_of_text|>"}, stop_tokens=[259])
    served = ServedModel("llama", tok, 512, 4, 260, chat)
    assert len(parse_chat({"model": "llama", "messages": ASK}, served).request.prompts[0]) > 10
    with pytest.raises(APIError, match="takes no tools") as e:
        parse_chat({"model": "llama", "messages": ASK, "tools": TOOLS}, served)
    assert e.value.param == "tools"
    result = ASK + [{"role": "tool", "tool_call_id": "c1", "content": "09:30"}]  # a tool turn, no tools
    with pytest.raises(APIError, match="takes no tools") as e:
        parse_chat({"model": "llama", "messages": result}, served)
    assert e.value.param == "messages"


# ---- the Responses API (POST /v1/responses) -------------------------------------------------------------------

R_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's flat tool
R_TOOLS = [R_WEATHER, {"type": "function", **CLOCK["function"]}]


def test_responses_text_is_the_chat_answer(client):
    """A Responses request runs as the chat request it translates to: the same prompt tokens and, seeded, the
    same text; max_output_tokens ends it as "incomplete"."""
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."}] + ASK,
                                          max_completion_tokens=12, seed=7)
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=ASK[0]["content"], max_output_tokens=12,
                                extra_body={"seed": 7})  # (seed: fastllm's extra field, as in chat)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 12)


def test_responses_function_calls_streamed_and_not(client):
    kw = dict(model=MODEL, input=ASK, tools=R_TOOLS, tool_choice="required", max_output_tokens=400,
              extra_body={"seed": 11})
    r = client.responses.create(**kw)
    assert r.status == "completed" and all(item.type == "function_call" for item in r.output)
    calls = check_calls([{"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.arguments}}
                         for i in r.output])
    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    final = events[-1].response
    assert [(i.name, json.loads(i.arguments)) for i in final.output] == calls
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(a) for a in done] == [args for _, args in calls]
    named = client.responses.create(**{**kw, "tool_choice": {"type": "function", "name": "now"}})
    assert [(i.type, i.name, i.arguments) for i in named.output] == [("function_call", "now", "{}")]
    # the call and its output go back in as input items: the prompt is the chat conversation's
    item = named.output[0]
    result = {"type": "function_call_output", "call_id": item.call_id, "output": "09:30"}
    follow = client.responses.create(model=MODEL, tools=R_TOOLS, max_output_tokens=3,
                                     input=ASK + [item.model_dump(exclude_none=True), result])
    chat = client.chat.completions.create(model=MODEL, tools=TOOLS, max_tokens=3, messages=ASK + [
        {"role": "assistant", "tool_calls": [{"id": item.call_id, "type": "function",
                                              "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": item.call_id, "content": "09:30"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_structured_output_streamed_and_parsed(client):
    from typing import Literal

    import pydantic

    class Forecast(pydantic.BaseModel):
        city: Literal["Paris", "Köln"]
        rain: bool

    r = client.responses.parse(model=MODEL, input=ASK, text_format=Forecast, max_output_tokens=60,
                               extra_body={"seed": 2})
    assert isinstance(r.output_parsed, Forecast) and r.status == "completed"
    fmt = {"format": {"type": "json_schema", "name": "shape", "schema": SCHEMAS[2], "strict": True}}
    with client.responses.stream(model=MODEL, input=ASK, text=fmt, max_output_tokens=200,
                                 extra_body={"seed": 3}) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text
    jsonschema.validate(json.loads(final.output_text), SCHEMAS[2])


@pytest.mark.parametrize("body,param,code", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "wat"}}}}, "text.format.schema",
     "invalid_value"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type", "unsupported_parameter"),
    ({"input": None}, "input", "missing_required_parameter"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"n": 2}, "n", "unknown_parameter"),
])
def test_bad_responses_requests(server, body, param, code):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
