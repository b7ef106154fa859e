"""Real chat templates (tests/chat_templates.py: Llama 2, Mistral v0.1 to v0.3, Zephyr / TinyLlama, Phi-3, Gemma 2 / 3,
OLMo 2, SmolLM2 / SmolLM3, Llama 3 / 3.1 / 3.2, Qwen2.5 / Qwen3, Hermes 2 Pro) rendered by fastllm.chat from a
checkpoint folder exactly as transformers' apply_chat_template renders them from the same folder: with and without a
system message and a generation prompt, over several turns, with tools and tool results, reasoning, template options
(enable_thinking, date_string, ...); the same refusals, as a ValueError quoting the template's raise_exception
message; the special tokens and templates a folder declares the way transformers reads them; and the prompt's ids
as apply_chat_template(tokenize=True) encodes them (the BOS the text starts with is encoded once)."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
jinja2 = pytest.importorskip("jinja2")

from chat_templates import FAMILIES  # noqa: E402
from hf_families import build_tokenizer, sentencepiece_doc  # noqa: E402

from fastllm.chat import ChatTemplate, chat_format, validate_conversation  # noqa: E402
from fastllm.tokenizer import Tokenizer  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city — «ünïcode» and \"quotes\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}]
CALL = {"id": "call0042X", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello! What's 2+2?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    "turns": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."}, {"role": "user", "content": " Another, in German? "},
              {"role": "assistant", "content": "  Grün  "}],
    "open": [{"role": "user", "content": "日本語で答えて: 東京は?"},
             {"role": "assistant", "content": "日本の首都です。"}, {"role": "user", "content": "ありがとう\n"}],
    "two users": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "think": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
              {"role": "user", "content": "bye"}, {"role": "assistant", "content": "<think>ok</think>Bye."}],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}],
}
TOOL_CONVERSATIONS = {
    "tools": [{"role": "user", "content": "Weather in Zürich?"}],
    "tool turns": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Zürich?"},
                   {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "call0042X", "name": "get_weather", "content": "{\"temp\": 21}"},
                   {"role": "assistant", "content": "It is 21 °C."}],
}


@functools.cache
def _base_tokenizer() -> str:
    return build_tokenizer("gpt2", 1000).to_str()


def _added(content: str) -> dict:  # how the SentencePiece families' tokenizer_config.json writes a special token
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_family(folder, name: str, legacy: bool = False, files: bool = False):
    """A checkpoint folder of family `name` (FAMILIES): a byte-level tokenizer.json with the family's special
    tokens (and its BOS put before every text where its tokenizer does that), tokenizer_config.json with the
    family's special-token names and its template (a list of named templates where it has a "tool_use" one;
    SmolLM3's in chat_template.jinja, as that checkpoint ships it), generation_config.json's end-of-turn ids.
    legacy: the names in special_tokens_map.json instead, as older folders have them; files: the templates in
    chat_template.jinja and additional_chat_templates/tool_use.jinja, as transformers 5 saves them."""
    from tokenizers import AddedToken, processors

    fam = FAMILIES[name]
    folder.mkdir(parents=True)
    sp = fam.specials[:3] == ("<unk>", "<s>", "</s>")  # Llama 2's tokenizer (Mistral v0.1-v0.3, Zephyr, Phi-3)
    tok = tokenizers.Tokenizer.from_str(json.dumps(sentencepiece_doc(800)) if sp else _base_tokenizer())
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False, rstrip=name == "phi-3")  # (Phi-3's
                            for s in fam.specials])  # take the whitespace after them, the newline its template writes)
    if fam.plain:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in fam.plain])
    if fam.adds_bos and not sp:  # (a SentencePiece file has its <s> post-processor)
        bos = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B:1",
                                            special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
    tok.save(str(folder / "tokenizer.json"))
    names = {"bos_token": fam.bos, "eos_token": fam.eos, "unk_token": fam.unk, "pad_token": fam.pad}
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 4096}
    if legacy:
        (folder / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in names.items() if v}))
    else:
        conf.update({k: _added(v) if sp and v else v for k, v in names.items()})
        conf["added_tokens_decoder"] = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": False,
                                                 "rstrip": t.rstrip, "single_word": False, "special": t.special}
                                        for i, t in tok.get_added_tokens_decoder().items()}
    if files or name == "smollm3":
        (folder / "chat_template.jinja").write_text(fam.template)
        if fam.tool_template is not None:
            (folder / "additional_chat_templates").mkdir()
            (folder / "additional_chat_templates" / "tool_use.jinja").write_text(fam.tool_template)
    elif fam.tool_template is not None:
        conf["chat_template"] = [{"name": "default", "template": fam.template},
                                 {"name": "tool_use", "template": fam.tool_template}]
    else:
        conf["chat_template"] = fam.template
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    stops = [tok.token_to_id(t) for t in fam.stops or (fam.eos,)]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_family(root / name, name) for name in FAMILIES}


@functools.cache
def _auto(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_text(folder, msgs, **kw):
    """transformers' text, or the exception it raised."""
    try:
        return _auto(folder).apply_chat_template(json.loads(json.dumps(msgs)), tokenize=False, **kw)
    except Exception as e:  # (a template's raise_exception, and errors while rendering)
        return e


def our_text(folder, msgs, tools=None, add_generation_prompt=False, **options):
    """fastllm's text, as SFT renders a conversation record (validate_conversation first), or the ValueError."""
    try:
        fmt = chat_format(folder, Tokenizer.from_pretrained(folder), options)
        return fmt.text(validate_conversation(msgs, need_assistant=False), add_generation_prompt, tools=tools)
    except ValueError as e:
        return e


def assert_same(ours, theirs, what):
    """The same text, or both refused: the template's raise_exception message quoted in our ValueError."""
    if isinstance(theirs, Exception):
        assert isinstance(ours, ValueError), f"{what}: transformers raised {theirs!r}, fastllm rendered {ours!r}"
        if type(theirs) is jinja2.exceptions.TemplateError:  # raise_exception's
            assert theirs.message in str(ours), what
        return
    assert not isinstance(ours, Exception), f"{what}: fastllm raised {ours!r}"
    assert ours == theirs, what


def cases(name):
    fam = FAMILIES[name]
    convs = [(c, msgs, None) for c, msgs in CONVERSATIONS.items()]
    if fam.tools:
        convs += [(c, msgs, TOOLS) for c, msgs in TOOL_CONVERSATIONS.items()]
    for c, msgs, tools in convs:
        for gen in (False, True):
            for opts in fam.options:
                yield f"{name}: {c}, add_generation_prompt={gen}, {opts}", msgs, dict(
                    tools=tools, add_generation_prompt=gen, **opts)


@pytest.mark.parametrize("name", FAMILIES)
def test_renders_as_transformers(name, folders):
    refused = 0
    for what, msgs, kw in cases(name):
        theirs = hf_text(folders[name], msgs, **kw)
        refused += isinstance(theirs, Exception)
        assert_same(our_text(folders[name], msgs, **kw), theirs, what)
    assert refused < len(list(cases(name))) // 2  # (most of them render)


@pytest.mark.parametrize("name,conversation,message", [
    ("llama2-chat", "two users", "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("mistral-v0.1", "system", "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("mistral-v1", "two users", "After the optional system message, conversation roles must alternate"),
    ("gemma-2", "system", "System role not supported"),
    ("gemma-2", "two users", "Conversation roles must alternate user/assistant/user/assistant/..."),
])
def test_raise_exception_is_a_value_error_quoting_the_template(name, conversation, message, folders):
    """A template's raise_exception(message) (Gemma refuses a system message, Llama 2 and Mistral turns that do not
    alternate) is a ValueError naming the template's file and quoting its message, as the server (a 400), SFT (the
    record) and `fastllm chat` (an error line) show it -- not a crash."""
    fmt = chat_format(folders[name], Tokenizer.from_pretrained(folders[name]))
    with pytest.raises(ValueError, match="tokenizer_config.json: the chat template refuses the conversation: "
                                         + message.replace(".", r"\.")):
        fmt.prompt(CONVERSATIONS[conversation])
    assert message in str(hf_text(folders[name], CONVERSATIONS[conversation]))


def test_llama31_single_tool_call_refusal(folders):
    two = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]}]
    fmt = chat_format(folders["llama-3.1"], Tokenizer.from_pretrained(folders["llama-3.1"]))
    with pytest.raises(ValueError, match="refuses the conversation: This model only supports single tool-calls"):
        fmt.text(validate_conversation(two), tools=TOOLS)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_ids_as_transformers(name, folders):
    """The ids the model continues are apply_chat_template(add_generation_prompt=True)'s, which encodes the text
    with add_special_tokens=False: a BOS the template writes ("<s>", "<|begin_of_text|>", "<bos>") is one token, not
    preceded by another one although the tokenizer puts a BOS before every text it encodes; and so are SFT's."""
    fam, folder = FAMILIES[name], folders[name]
    msgs = CONVERSATIONS["open"]
    tok = Tokenizer.from_pretrained(folder)
    fmt = chat_format(folder, tok)
    want = _auto(folder).apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = fmt.prompt(msgs).tolist()
    assert ids == list(want)
    text = fmt.text(msgs, add_generation_prompt=True)
    if fam.bos is not None and fam.adds_bos:
        bos = tok.special_tokens[fam.bos]
        assert tok.bos_token == bos and tok.encode_prompt("x")[0] == bos  # (a text of its own gets one)
        assert ids.count(bos) == text.count(fam.bos) and ids[:2] != [bos, bos]
    full = CONVERSATIONS["open"] + [{"role": "assistant", "content": "どういたしまして"}]
    if name == "qwen3":  # an earlier turn loses its <think></think> once a user turn follows
        with pytest.raises(ValueError, match="does not render conversations incrementally"):
            fmt.render(full)
        full = full[2:]
    ids, mask = fmt.render(full)
    assert ids.tolist() == list(_auto(folder).apply_chat_template(full, return_dict=True)["input_ids"])
    assert 0 < mask.sum() < len(mask)


def test_smollm3_generation_blocks_mask_the_assistant(folders):
    """SmolLM3's template marks the assistant turns with {% generation %}: SFT's mask is transformers'
    return_assistant_tokens_mask less the whitespace after each turn (fastllm leaves trailing whitespace out)."""
    folder = folders["smollm3"]
    tok = Tokenizer.from_pretrained(folder)
    msgs = CONVERSATIONS["turns"][1:]
    want = _auto(folder).apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat_format(folder, tok).render(msgs)
    assert ids.tolist() == list(want["input_ids"])
    theirs = np.asarray(want["assistant_masks"])
    left_out = np.flatnonzero(theirs - mask)
    assert mask.sum() > 0 and (mask <= theirs).all() and len(left_out) == 2  # the "\n" after each <|im_end|>
    assert all(tok.decode([int(ids[i])]) == "\n" and not theirs[i + 1:i + 2].any() for i in left_out)


# ---- what transformers passes a template --------------------------------------------------------------------


def test_reasoning_reaches_the_template(folders):
    """An assistant turn's reasoning (reasoning_content, or TRL's `thinking` / `reasoning`) is what Qwen3's
    template writes between <think> and </think>: SFT keeps it (it used to drop it, training on an empty
    <think></think> instead), under the names transformers gives it."""
    folder = folders["qwen3"]
    for field in ("reasoning_content", "thinking", "reasoning"):
        msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", field: "Two and two."}]
        ours, theirs = our_text(folder, msgs), hf_text(folder, msgs)
        assert ours == theirs and "<think>\nTwo and two.\n</think>\n\n4<|im_end|>" in ours, field
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) reasoning_content must be a string"):
        validate_conversation([{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a", "reasoning_content": ["x"]}])


def test_tool_use_template_and_tool_result_names(folders):
    """A checkpoint with named templates (Hermes 2 Pro: "default" and "tool_use") is rendered with "tool_use"
    whenever tools are given, as transformers does, and its tool results keep the `name` the template requires
    (and `tool_call_id`, Mistral's)."""
    folder = folders["hermes-2-pro"]
    msgs = TOOL_CONVERSATIONS["tool turns"][1:]
    ours, theirs = our_text(folder, msgs, tools=TOOLS), hf_text(folder, msgs, tools=TOOLS)
    assert ours == theirs and "You are a function calling AI model" in ours
    assert '<tool_response>\n{"name": "get_weather", "content": "{\\"temp\\": 21}"}' in ours
    assert our_text(folder, CONVERSATIONS["user"]) == hf_text(folder, CONVERSATIONS["user"])  # no tools: "default"
    kept = validate_conversation(msgs)[2]
    assert kept == {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call0042X", "name": "get_weather"}


def test_tool_use_template_file(tmp_path):
    """transformers 5 saves named templates as chat_template.jinja and additional_chat_templates/<name>.jinja."""
    folder = write_family(tmp_path / "hermes", "hermes-2-pro", files=True)
    for what, msgs, kw in cases("hermes-2-pro"):
        assert_same(our_text(folder, msgs, **kw), hf_text(folder, msgs, **kw), what)
    assert "You are a function calling AI model" in our_text(folder, CONVERSATIONS["user"], tools=TOOLS)


def test_special_tokens_map_of_an_older_folder(tmp_path):
    """An older folder names its special tokens in special_tokens_map.json (and tokenizer_config.json has no
    added_tokens_decoder): transformers reads them from there, and so does fastllm -- the template's bos_token and
    eos_token, and the EOS to stop at (it used to find none and refuse the folder)."""
    folder = write_family(tmp_path / "zephyr", "zephyr", legacy=True)
    for what, msgs, kw in cases("zephyr"):
        assert_same(our_text(folder, msgs, **kw), hf_text(folder, msgs, **kw), what)
    tok = Tokenizer.from_pretrained(folder)
    assert chat_format(folder, tok).stop_tokens == (tok.special_tokens["</s>"],)


def test_the_variables_transformers_defines():
    """Every template sees the tokenizer's named special tokens (sep_token, cls_token and mask_token too), `tools`
    and `documents` (None unless given; an empty tool list is a list), as transformers passes them; dict() and
    dict.fromkeys() work, nothing else of the type."""
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"</s>": 256})
    names = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "[SEP]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"}
    source = ("{{ sep_token }}|{{ cls_token }}|{{ mask_token }}|{{ tools }}|{{ documents }}|"
              "{{ tools is defined }}|{{ dict(a=1) }}|{{ dict.fromkeys(['x'], 0) }}")
    fmt = ChatTemplate(source, tok, names, [256])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()),
                                              **names)
    for tools in (None, []):
        assert fmt.text([], tools=tools) == hf.apply_chat_template([{"role": "user", "content": "x"}], tools=tools,
                                                                  chat_template=source, tokenize=False)
    with pytest.raises(ValueError, match="chat template failed"):
        ChatTemplate("{{ dict.__class__ }}{{ ''.__class__.__mro__ }}", tok, names, [256]).text([])


def test_none_values_are_left_out():
    """A message key whose value is None is not there for the template (transformers drops it): Llama 3.1's
    `'tool_calls' in message` is false for "tool_calls": None."""
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|eot_id|>": 256})
    from hf_families import LLAMA31_TEMPLATE

    fmt = ChatTemplate(LLAMA31_TEMPLATE, tok, {"bos_token": "", "date_string": "1 Jan 2025"}, [256])
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tool_calls": None}]
    assert fmt.text(msgs).endswith("<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>")


def test_phi3_sft_mask_leaves_out_the_closing_eos(folders):
    """Phi-3's template ends a conversation without a generation prompt with its EOS, so the conversation up to an
    assistant turn is not a prefix of the whole: SFT still tells each answer apart (the answer and its <|end|>
    learned, not the EOS only the last turn is followed by) instead of refusing the template."""
    folder = folders["phi-3"]
    tok = Tokenizer.from_pretrained(folder)
    msgs = [{**m, "content": m["content"].strip()} for m in CONVERSATIONS["turns"]]
    ids, mask = chat_format(folder, tok).render(msgs)
    assert ids.tolist() == list(_auto(folder).apply_chat_template(msgs, return_dict=True)["input_ids"])
    learned = tok.decode(ids[mask == 1].tolist())
    assert learned == _auto(folder).decode(ids[mask == 1].tolist())  # (Llama 2's tokenizer: " Grün" after a special)
    assert learned.replace(" ", "") == "Blue.<|end|>Grün<|end|>" and ids[-1] == tok.special_tokens["<|endoftext|>"]


@pytest.mark.parametrize("layout", ["config", "legacy", "files"])
def test_saved_and_converted_folders_render_as_their_source(layout, tmp_path):
    """A model of a family's folder saved with save_pretrained (its tokenizer_config.json written anew), and the
    folder converted to a fastllm checkpoint and back (`fastllm convert`, which copies the chat files), render
    every conversation as the source does: the same special-token names (Qwen's unset bos_token stays unset,
    SmolLM2's is <|im_start|>), the "tool_use" template, special_tokens_map.json and additional_chat_templates/."""
    from fastllm import checkpoint, hf
    from fastllm.model import GPT, GPTConfig

    names = ["hermes-2-pro"] if layout == "files" else ["zephyr"] if layout == "legacy" else [
        "smollm2", "phi-3", "qwen2.5", "llama-3.1", "hermes-2-pro"]
    for name in names:
        src = write_family(tmp_path / name, name, legacy=layout == "legacy", files=layout == "files")
        tok = Tokenizer.from_pretrained(src)
        model = GPT(GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16,
                              positions="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, proj_bias=False,
                              mlp_bias=False, tie_embeddings=False))
        model.checkpoint_dir = src
        saved = hf.save_pretrained(model, tmp_path / f"{name}-saved", tokenizer=tok)
        hf.save_pretrained(model, src)  # (the weights beside the tokenizer files, to convert)
        ckpt = checkpoint.convert(src, tmp_path / f"{name}-ckpt")
        back = checkpoint.convert(ckpt, tmp_path / f"{name}-hf", to="hf")
        for what, msgs, kw in cases(name):
            theirs = hf_text(src, msgs, **kw)
            for folder in (saved, ckpt, back):
                assert_same(our_text(folder, msgs, **kw), theirs, f"{folder.name}: {what}")
            for folder in (saved, back):
                assert_same(hf_text(folder, msgs, **kw), theirs, f"{folder.name} in transformers: {what}")


def test_mistral_tool_calls_are_rendered_not_read(folders):
    """Mistral 7B Instruct v0.3's templates take tools ([AVAILABLE_TOOLS]) and write calls as [TOOL_CALLS] (they
    used to be refused as templates that take no tools): SFT renders a tool conversation as transformers does, ids
    and all; the server, which cannot read [TOOL_CALLS] answers, refuses tools by name but renders a history with
    tool turns."""
    from chat_templates import MISTRAL_V03_TEMPLATE_2024_05, MISTRAL_V3_TEMPLATE

    from fastllm.serve.api import APIError, ServedModel, parse_chat
    from fastllm.tools import template_format

    assert template_format(MISTRAL_V3_TEMPLATE) == template_format(MISTRAL_V03_TEMPLATE_2024_05) == "mistral"
    folder = folders["mistral-v3"]
    tok = Tokenizer.from_pretrained(folder)
    fmt = chat_format(folder, tok)
    msgs = TOOL_CONVERSATIONS["tool turns"][1:]  # (its system message goes into a last user turn only)
    ids, mask = fmt.render(validate_conversation(msgs), TOOLS)
    assert ids.tolist() == list(_auto(folder).apply_chat_template(msgs, tools=TOOLS, return_dict=True)["input_ids"])
    learned = tok.decode(ids[mask == 1].tolist())
    assert learned == _auto(folder).decode(ids[mask == 1].tolist())  # (Llama 2's tokenizer: a space after a special)
    assert learned.startswith('[TOOL_CALLS]') and learned.endswith("It is 21 °C.</s>")
    assert ' [{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "call0042X"}]</s>' in learned
    served = ServedModel("mistral", tok, 4096, 1, tok.n_vocab, fmt, folder)
    with pytest.raises(APIError, match="writes tool calls in the 'mistral' format, which this server does not read"):
        parse_chat({"model": "mistral", "messages": msgs[:1], "tools": TOOLS}, served)
    call = parse_chat({"model": "mistral", "messages": msgs + [{"role": "user", "content": "And Bern?"}]}, served)
    assert "[TOOL_RESULTS]" in tok.decode(call.request.prompts[0])


def test_template_options_per_request_and_in_fastllm_chat(folders, tmp_path, monkeypatch, capsys):
    """Template variables that transformers takes as apply_chat_template(**kwargs) -- Qwen3's enable_thinking --
    reach the template: per request as vLLM's `chat_template_kwargs` (chat completions and /tokenize), and as
    `fastllm chat --chat-template-kwargs JSON`; a 400 / an error where there is no template to take them."""
    import io
    import shutil

    from fastllm import chat, cli, hf
    from fastllm.chat import ChatML
    from fastllm.model import GPT, GPTConfig
    from fastllm.serve.api import APIError, ServedModel, parse_chat, tokenize

    folder = folders["qwen3"]
    tok = Tokenizer.from_pretrained(folder)
    served = ServedModel("qwen3", tok, 4096, 1, tok.n_vocab, chat_format(folder, tok), folder)
    msgs = CONVERSATIONS["user"]
    for options in ({}, {"enable_thinking": False}):
        want = list(_auto(folder).apply_chat_template(msgs, add_generation_prompt=True, return_dict=True,
                                                      **options)["input_ids"])
        body = {"model": "qwen3", "messages": msgs, "chat_template_kwargs": options}
        assert parse_chat(body, served).request.prompts[0] == want
        assert tokenize(body, served)["tokens"] == want
    assert tok.decode(want).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(APIError, match="'add_generation_prompt'] are the request's own"):
        parse_chat({"model": "qwen3", "messages": msgs, "chat_template_kwargs": {"add_generation_prompt": 0}}, served)
    chatml = ServedModel("m", tok, 4096, 1, tok.n_vocab, ChatML(tok))
    with pytest.raises(APIError, match="no chat template to pass 'chat_template_kwargs' to"):
        parse_chat({"model": "m", "messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}, chatml)

    ckpt = shutil.copytree(folder, tmp_path / "qwen3")
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16, positions="rope",
                          norm="rmsnorm", mlp="swiglu", qkv_bias=False, proj_bias=False, mlp_bias=False))
    model.checkpoint_dir = ckpt
    hf.save_pretrained(model, ckpt)
    prompts = []
    monkeypatch.setattr(chat, "stream_text", lambda model, tok, ids, *a, **k: prompts.append(ids) or iter(()))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert cli.main(["chat", "--ckpt", str(ckpt), "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert tok.decode(prompts[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    with pytest.raises(SystemExit):
        cli.main(["chat", "--ckpt", str(ckpt), "--chat-template-kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
