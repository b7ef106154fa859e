"""Chat formats: how a conversation becomes the tokens a model reads, for `fastllm chat`, SFT and the server.

Two formats with one interface (`prompt(messages) -> ids`, `render(messages) -> (ids, mask)`, `stop_tokens`):

- `ChatML`, fastllm's own, for the models it trains (the default). A conversation is rendered as

      <|endoftext|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
      <|im_start|>assistant\\n{content}<|im_end|>\\n ...

  `<|im_start|>` and `<|im_end|>` are special tokens (fastllm.sft.add_chat_tokens adds them). The leading
  `<|endoftext|>` (only if the tokenizer has it) starts every conversation as pre-training starts every document.
  Role names and contents are encoded as ordinary text (text that looks like a special token in a message stays
  text), each piece separately so no token straddles a boundary. The mask is 1 on assistant contents and their
  `<|im_end|>`; a generation prompt ends with `<|im_start|>assistant\\n`; generation stops at `<|im_end|>` or
  `<|endoftext|>`.

- `ChatTemplate`, a Hugging Face checkpoint's own Jinja2 template (`chat_template.jinja`, else `chat_template` in
  tokenizer_config.json; its "tool_use" template, if it names one, whenever tools are given), rendered as
  transformers' `apply_chat_template` renders it: a sandboxed environment (jinja2.sandbox.
  ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop controls), the variables `messages` (keys whose
  value is None left out, a reasoning under both `reasoning_content` and `thinking`), `tools` and `documents`
  (None unless given), `add_generation_prompt`, the tokenizer's named special tokens (`bos_token`, `eos_token`, ...
  from tokenizer_config.json, or special_tokens_map.json in an older folder) and template options
  (`enable_thinking`, ...: apply_chat_template's **kwargs), the functions `raise_exception` (a ValueError quoting
  its message) and `strftime_now`, transformers' `tojson`, `dict` and `namespace`; the text is then encoded with
  every special token recognised (transformers' default: `add_special_tokens=False`, so a BOS the template writes
  is its only one; control tokens not sanitized).
  The SFT mask covers each assistant turn as the template writes it (content and end-of-turn token, trailing
  whitespace left out): the `{% generation %}` blocks where the template has them, else the text that rendering
  the conversation up to that turn adds to the generation prompt before it (less what the template writes only
  after the last message, as Phi-3's EOS) -- a template that does not render conversations incrementally is
  refused by name. Generation stops at the checkpoint's EOS ids
  (generation_config.json / config.json `eos_token_id`, int or list, and the folder's `eos_token`).
  Needs jinja2 (the `hf` extra: pip install "fastllm[hf]").

Both take OpenAI's `tools` and tool-calling messages (assistant `tool_calls`, "tool" results) in `prompt(messages,
tools)`: ChatML writes them in the hermes layout of Qwen2.5's template (fastllm.tools.hermes_messages), a template
gets them as its `tools` variable and message fields, as transformers passes them. `tool_format` names the format
in which the model writes calls ("hermes", "llama3_json", "mistral" -- rendered, not read --, None: the template
takes no tools).

`chat_format(folder, tokenizer)` picks the format of a checkpoint folder: its template if it has one, else ChatML
if the tokenizer has the ChatML tokens, else None (a base model, no chat). `ChatSession` and `chat_loop` run a
conversation in the terminal with either.

>>> fmt = chat_format("Qwen2.5-0.5B-Instruct/", Tokenizer.from_pretrained("Qwen2.5-0.5B-Instruct/"))
>>> ids = fmt.prompt([{"role": "user", "content": "Hi!"}])
>>> session = ChatSession(model, tok, chat=fmt, system="Be brief.")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from .fileio import read_json
from .sample import SamplingParams, check_seed, stream_text
from .tools import THINK, THINK_END, ToolError, check_tools, hermes_messages, parse_tool_calls, template_format

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOT = "<|endoftext|>"
ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"  # more named templates (<name>.jinja), as transformers saves them
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# the tokenizer's named special tokens, which transformers passes to every template (special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # a message's reasoning, under the names in use
INSTALL_HINT = 'chat templates need jinja2: pip install "fastllm[hf]" (or pip install jinja2)'


# ---- conversations -------------------------------------------------------------------------------------


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def validate_conversation(obj, where: str = "conversation", need_assistant: bool = True) -> list[dict]:
    """The message list of `obj`, checked, as {"role", "content"} dicts; ValueError naming `where`. `obj` is
    {"messages": [{"role", "content"}, ...]} (OpenAI's chat format), the list itself, ShareGPT's
    {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}, or one of the single-turn forms
    (pair_messages: Alpaca's {"instruction", "input", "output"}, {"prompt", "completion"}).
    As in OpenAI's fine-tuning files: content may be a list of text parts (joined), "developer" is the system role,
    an assistant message with "weight": 0 is not learned (kept as "weight": 0 in its dict, which the chat formats'
    render() leave out of the mask), an assistant message may carry `tool_calls` (its content may then be null;
    arguments become dicts), a "tool" message is a result. What chat templates read besides is kept: an assistant's
    reasoning (`reasoning_content`, or TRL's and others' `thinking` / `reasoning`, as "reasoning_content"; Qwen3's
    template writes it in <think>), a tool result's `tool_call_id` and `name` (Mistral's and Hermes' templates)."""
    sharegpt = isinstance(obj, dict) and "messages" not in obj and "conversations" in obj
    if isinstance(obj, dict) and "messages" not in obj and not sharegpt:
        obj = {"messages": pair_messages(obj, where)}
    msgs = obj.get("conversations" if sharegpt else "messages") if isinstance(obj, dict) else obj
    if not isinstance(msgs, list):
        raise ValueError(f"{where}: '{'conversations' if sharegpt else 'messages'}' must be a list, got "
                         f"{type(msgs).__name__}")
    if not msgs:
        raise ValueError(f"{where}: empty conversation")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {k} must be an object with 'role' and 'content'"
                             + (" (ShareGPT: 'from' and 'value')" if sharegpt else ""))
        if sharegpt:
            role, content = SHAREGPT_ROLES.get(m.get("from"), m.get("from")), m.get("value")
        else:
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ValueError(f"{where}: message {k} has unknown role {role!r} (expected one of {list(ROLES)})")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if isinstance(content, list):
            content = _text_parts(content, f"{where}: message {k} ({role}) content")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {k} ({role}) content must be a string, got {type(content).__name__}")
        msg = {"role": role, "content": content}
        if calls:
            try:
                msg["tool_calls"] = parse_tool_calls(calls, "tool_calls")
            except ToolError as e:
                raise ValueError(f"{where}: message {k} ({role}): {e}") from None
        reasoning = next((f for f in REASONING_FIELDS if m.get(f) is not None), None) if role == "assistant" else None
        for key in (reasoning,) if reasoning else ("tool_call_id", "name") if role == "tool" else ():
            if m.get(key) is None:
                continue
            if not isinstance(m[key], str):
                raise ValueError(f"{where}: message {k} ({role}) {key} must be a string, got {type(m[key]).__name__}")
            msg["reasoning_content" if key == reasoning else key] = m[key]
        weight = m.get("weight", 1) if role == "assistant" else 1
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ValueError(f"{where}: message {k} ({role}) weight must be 0 or 1, got {weight!r}")
        if weight == 0:
            msg["weight"] = 0
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn (nothing to learn from)")
    if need_assistant and not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise ValueError(f"{where}: no assistant turn with weight 1 (nothing to learn from)")
    return out


def pair_messages(obj: dict, where: str = "conversation") -> list[dict]:
    """The messages of a single-turn record: Alpaca's {"instruction", "input" (optional), "output"} -> a user turn
    (the instruction, a blank line and the input) and an assistant turn; {"prompt", "completion"} -> the same from
    two strings, or, as TRL's conversational form, the prompt's messages then the completion's, where only the
    completion is learned (assistant turns of the prompt get weight 0). ValueError naming `where` otherwise."""
    if "instruction" in obj:
        for key in ("instruction", "output") + (("input",) if obj.get("input") is not None else ()):
            if not isinstance(obj.get(key), str):
                got = "missing" if key not in obj else type(obj[key]).__name__
                raise ValueError(f"{where}: Alpaca's {key!r} must be a string, got {got}")
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if isinstance(prompt, list) and isinstance(completion, list):
            return [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m
                    for m in prompt] + completion
        if prompt is None or completion is None:
            raise ValueError(f"{where}: {'prompt' if prompt is None else 'completion'!r} missing beside "
                             f"{'completion' if prompt is None else 'prompt'!r}")
        raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists, got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")
    raise ValueError(f"{where}: expected an object with a 'messages' list (or ShareGPT's 'conversations', Alpaca's "
                     "'instruction' and 'output', or 'prompt' and 'completion')")


def _text_parts(parts: list, where: str) -> str:
    """OpenAI's content parts [{"type": "text", "text": ...}, ...] joined; ValueError for other parts."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text") or \
                not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{where}[{j}] is of type {kind!r}: only text parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def conversation_tools(obj, where: str = "conversation") -> list[dict] | None:
    """The `tools` a conversation record lists (OpenAI's function list, or its JSON text), checked; None if none."""
    tools = obj.get("tools") if isinstance(obj, dict) else None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise ValueError(f"{where}: 'tools' is not JSON ({e})") from None
    if not tools:
        return None
    try:
        return check_tools(tools)
    except ToolError as e:
        raise ValueError(f"{where}: {e}") from None


# ---- ChatML, fastllm's own format ----------------------------------------------------------------------


def _special(tokenizer, name: str) -> int:
    ids = tokenizer.special_tokens
    if name not in ids:
        raise ValueError(f"the tokenizer has no {name} special token (use add_chat_tokens)")
    return ids[name]


def render(conversation, tokenizer, tools: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, mask uint8) of a conversation in ChatML (see the module doc). mask is 1 on assistant content
    tokens (tool calls included) and their <|im_end|>, 0 elsewhere. `tools` and tool messages are written in the
    hermes layout (fastllm.tools.hermes_messages)."""
    valid = validate_conversation(conversation, need_assistant=False)
    weights = iter([m.get("weight", 1) for m in valid if m["role"] == "assistant"])  # hermes keeps their order
    msgs = hermes_messages(valid, tools)
    start, end = _special(tokenizer, IM_START), _special(tokenizer, IM_END)
    eot = tokenizer.special_tokens.get(EOT)
    ids: list[int] = [] if eot is None else [eot]
    mask: list[int] = [0] * len(ids)
    nl = tokenizer.encode_ordinary("\n").tolist()
    for m in msgs:
        head = [start] + tokenizer.encode_ordinary(m["role"] + "\n").tolist()
        body = tokenizer.encode_ordinary(m["content"]).tolist() + [end]
        learn = next(weights) if m["role"] == "assistant" else 0
        ids += head + body + nl
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(nl)
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def render_prompt(messages, tokenizer, tools: list[dict] | None = None) -> np.ndarray:
    """Ids of the history `messages` in ChatML followed by `<|im_start|>assistant\\n`: what the model continues."""
    ids, _ = render(messages, tokenizer, tools)
    head = [_special(tokenizer, IM_START)] + tokenizer.encode_ordinary("assistant\n").tolist()
    return np.concatenate([ids, np.asarray(head, np.int32)])


def has_chatml(tokenizer) -> bool:
    specials = tokenizer.special_tokens
    return IM_START in specials and IM_END in specials


class ChatML:
    """fastllm's ChatML as a chat format (see the module doc); ValueError if the tokenizer lacks its tokens."""

    name = "ChatML"

    tool_format = "hermes"  # tools and calls written as Qwen2.5 writes them (fastllm.tools.hermes_messages)
    thinks = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        _special(tokenizer, IM_START)
        stops = (_special(tokenizer, IM_END), tokenizer.special_tokens.get(EOT))
        self.stop_tokens = tuple(t for t in stops if t is not None)

    def prompt(self, messages, tools: list[dict] | None = None) -> np.ndarray:
        """Ids the model continues; `tools` (OpenAI's function list) and tool messages in the hermes layout."""
        return render_prompt(messages, self.tokenizer, tools)

    def render(self, messages, tools: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return render(messages, self.tokenizer, tools)

    @property
    def template(self) -> str:
        """This format as a Jinja2 chat template, for clients that render prompts themselves (the server's
        /tokenizer_info): the same text for messages without tools."""
        eot = EOT if EOT in self.tokenizer.special_tokens else ""
        return (eot + "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END +
                "\n{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}")


# ---- Hugging Face chat templates -----------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' sandboxed environment (see the module doc)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: records where the assistant's text lands (SFT masks)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            spans = self.environment.spans
            if spans is not None:
                done = len("".join(spans[0]))
                spans[1].append((done, done + len(text)))
            return text

    class Raised(jinja2.exceptions.TemplateError):
        """The template's own raise_exception(message): it refuses the conversation."""

    def raise_exception(message):
        raise Raised(message)

    class TemplateDict:  # dict(...) and dict.fromkeys(...), and nothing more of the type (as transformers')
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.spans = None  # (rendered blocks, generation spans) while a render records them
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace, dict=TemplateDict())
    env.raised = Raised
    return env.from_string(source)


def template_messages(messages) -> list[dict]:
    """Messages as transformers hands them to a chat template: copies without the keys whose value is None (a
    template tests `'tool_calls' in message`, or prints "None"), a reasoning given under any of its names
    (REASONING_FIELDS) under both "reasoning_content" (Qwen3's) and "thinking" (gpt-oss')."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[f] for f in REASONING_FIELDS if f in m), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


class ChatTemplate:
    """A Hugging Face chat template (Jinja2) over a tokenizer (see the module doc).

    template: the Jinja2 source; variables: what the template sees besides messages, tools and
    add_generation_prompt (bos_token, eos_token, ... and any template option such as enable_thinking); stop_tokens:
    ids that end an answer; where: the file it came from, named in errors; tool_template: the checkpoint's template
    named "tool_use", if it has one, which transformers renders instead whenever tools are given (Hermes 2 Pro's,
    Command R's)."""

    name = "chat template"

    def __init__(self, template: str, tokenizer, variables: dict | None = None, stop_tokens: Sequence[int] = (),
                 where: str = "chat_template", tool_template: str | None = None):
        self.template, self.tokenizer, self.where = template, tokenizer, where
        self.tool_template = tool_template
        self._jinja = self._compiled(template)
        self._tool_jinja = self._compiled(tool_template) if tool_template is not None else None
        self._default_format = template_format(template)
        # None: the template takes no tools
        self.tool_format = template_format(tool_template) if tool_template is not None else self._default_format
        self.thinks = THINK in template and THINK_END in template  # the model reasons in <think> first (Qwen3)
        self.variables = dict(variables or {})
        self.stop_tokens = tuple(int(t) for t in stop_tokens)

    def _compiled(self, template):
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"{self.where}: the chat template must be a non-empty string")
        try:
            return _compile(template)
        except ImportError:
            raise
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise ValueError(f"{self.where}: the chat template does not compile: {type(e).__name__}: {e}") from None

    def text(self, messages, add_generation_prompt: bool = False, spans: list | None = None,
             tools: list[dict] | None = None, options: dict | None = None) -> str:
        """The template's text for `messages` (a list of {"role", "content"} dicts, and OpenAI's tool calls and
        tool messages), as transformers' apply_chat_template(tokenize=False) renders it: keys whose value is None
        left out, an assistant's reasoning under both "reasoning_content" and "thinking", `tools` (None if not
        given) and `documents` (None) defined, the "tool_use" template when tools are given. ValueError naming the
        template for what it rejects (its raise_exception, with the template's message) and errors while rendering.
        With `spans` (a list), the (start, end) character offsets of its {% generation %} blocks are appended to
        it. `tools`: OpenAI's function list, the template's `tools` variable; ValueError if the template takes
        none (see tool_format) and there are tools or tool turns, which it would drop or garble. `options`: template
        variables for this rendering only, over `variables` (apply_chat_template's **kwargs: enable_thinking, ...)."""
        use_tools = tools is not None and self._tool_jinja is not None
        jinja, fmt = (self._tool_jinja, self.tool_format) if use_tools else (self._jinja, self._default_format)
        tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
        if fmt is None and (tools or tool_turns):
            raise ValueError(f"{self.where}: the chat template takes no tools (it never writes a tool call)")
        taken = {"messages", "tools", "documents", "add_generation_prompt"}.intersection(options or ())
        if taken:
            raise ValueError(f"template options cannot set {sorted(taken)} (the conversation's own)")
        ctx = {**self.variables, **(options or {}), "messages": template_messages(messages), "tools": tools,
               "documents": None, "add_generation_prompt": add_generation_prompt}
        env = jinja.environment
        blocks: list[str] = []
        env.spans = (blocks, spans if spans is not None else [])
        try:
            for block in jinja.generate(**ctx):
                blocks.append(block)
        except env.raised as e:
            raise ValueError(f"{self.where}: the chat template refuses the conversation: {e.message}") from None
        except Exception as e:
            raise ValueError(f"{self.where}: the chat template failed: {type(e).__name__}: {e}") from None
        finally:
            env.spans = None
        return "".join(blocks)

    def _encode(self, text: str) -> np.ndarray:
        return self.tokenizer.encode(text, allowed_special="all")

    def prompt(self, messages, tools: list[dict] | None = None, options: dict | None = None) -> np.ndarray:
        """Ids of `messages` followed by the template's generation prompt: what the model continues. `options`:
        template variables for this prompt (text())."""
        return self._encode(self.text(messages, add_generation_prompt=True, tools=tools, options=options))

    def render(self, messages, tools: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, mask uint8) of a whole conversation; mask 1 on the assistant turns (see the module doc), but
        those with "weight": 0."""
        msgs = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        weights = [m.get("weight", 1) for m in messages if m.get("role") == "assistant"]
        spans: list[tuple[int, int]] = []
        full = self.text(msgs, spans=spans, tools=tools)
        if not spans:
            spans = self._assistant_spans(msgs, full, tools)
        if 0 in weights:
            if len(spans) != len(weights):
                raise ValueError(f"{self.where}: the chat template's {{% generation %}} blocks are {len(spans)} for "
                                 f"{len(weights)} assistant turns, so the turns of weight 0 cannot be left out")
            spans = [s for s, w in zip(spans, weights) if w]
        spans = [(a, a + len(full[a:b].rstrip())) for a, b in spans]
        norm = self.tokenizer._normalize
        cuts = sorted({0, len(full), *[x for s in spans for x in s]})
        pieces = [norm(full[a:b]) for a, b in zip(cuts, cuts[1:])]
        text = "".join(pieces)
        if text != norm(full):
            raise ValueError(f"{self.where}: the tokenizer's normalizer joins text across an assistant turn's edge")
        # byte offset of every token (where its text starts: a SentencePiece tokenizer's prefix spaces and the
        # whitespace Phi-3's tokens take are not text of their own), and of every span edge in the normalized text
        ids, starts = self.tokenizer.encode_offsets(text)
        edge, pos = {0: 0}, 0  # (an empty text has no pieces; its spans are at 0)
        for (a, b), piece in zip(zip(cuts, cuts[1:]), pieces):
            edge[a] = pos
            pos += len(piece.encode("utf-8"))
            edge[b] = pos
        mask = np.zeros(len(ids), np.uint8)
        for a, b in spans:
            mask[(starts >= edge[a]) & (starts < edge[b])] = 1
        return ids.astype(np.int32, copy=False), mask

    def _assistant_spans(self, msgs: list[dict], full: str, tools: list[dict] | None) -> list[tuple[int, int]]:
        """Character spans of the assistant turns: what rendering up to each one adds to the generation prompt
        before it, less what the template writes only at the end of a whole conversation (Phi-3's EOS after the
        last turn: the text the conversation up to the turn does not share with it followed by a user turn, when
        the whole conversation ends with that text too). ValueError when the renderings are not prefixes of each
        other."""
        spans = []
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            head = self.text(msgs[:i], add_generation_prompt=True, tools=tools) if i else ""
            upto = self.text(msgs[: i + 1], tools=tools)
            if upto.startswith(head):
                try:
                    more = self.text(msgs[: i + 1] + [{"role": "user", "content": "?"}], tools=tools)
                except ValueError:  # (a template that wants no user turn here)
                    more = upto
                end = self._token_edge(upto, len(os.path.commonprefix([upto, more])))
                if end > len(head) and full.startswith(upto[:end]) and full.endswith(upto[end:]):
                    spans.append((len(head), end))
                    continue
                if full.startswith(upto):  # (the turn renders otherwise when it is not the last: Qwen3's)
                    spans.append((len(head), len(upto)))
                    continue
            raise ValueError(f"{self.where}: the chat template does not render conversations incrementally "
                             f"(message {i}: the conversation up to it is not a prefix of the whole), so the "
                             f"assistant's tokens cannot be told apart; add {{% generation %}} blocks to it")
        return spans

    def _token_edge(self, text: str, end: int) -> int:
        """`end`, or the start of the special token of `text` it falls inside ("<|endoftext|>" and "<|user|>"
        share "<|")."""
        for s in self.tokenizer.special_tokens:
            k = text.find(s, max(0, end - len(s) + 1), end + len(s) - 1)
            if 0 <= k < end:
                return k
        return end


# ---- a checkpoint folder's chat format -----------------------------------------------------------------


def read_templates(folder: str | os.PathLike) -> tuple[dict[str, str], str] | None:
    """(named templates, the file they came from) of a checkpoint folder as transformers loads them, or None:
    chat_template.jinja (the "default") and additional_chat_templates/<name>.jinja when there are such files, else
    tokenizer_config.json's chat_template (a string: the "default"; or a list of {"name", "template"})."""
    folder = Path(folder)
    named, where = {}, None
    path = folder / TEMPLATE_FILE
    if path.is_file():
        named["default"], where = _read_text(path), str(path)
    extra = folder / TEMPLATE_DIR
    for f in sorted(extra.glob("*.jinja")) if extra.is_dir() else ():
        named[f.name[: -len(".jinja")]] = _read_text(f)
        where = where or str(f)
    if named:
        return named, where
    tpl = tokenizer_config(folder).get("chat_template")
    where = str(folder / TOKENIZER_CONFIG)
    if tpl is None:
        return None
    if isinstance(tpl, str):
        return {"default": tpl}, where
    if isinstance(tpl, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tpl):
        tpl = {t["name"]: t.get("template") for t in tpl}
    if isinstance(tpl, dict) and tpl and all(isinstance(t, str) for t in tpl.values()):
        return tpl, where
    raise ValueError(f"{where}: chat_template must be a string or a list of named templates")


def read_template(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(default template source, the file it came from) of a checkpoint folder (read_templates), or None;
    ValueError for named templates without a "default"."""
    found = read_templates(folder)
    if found is None:
        return None
    named, where = found
    if "default" not in named:
        raise ValueError(f"{where}: the chat templates are {sorted(named)}, none named 'default'")
    return named["default"], where


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def tokenizer_config(folder: str | os.PathLike | None) -> dict:
    """tokenizer_config.json of a folder ({} if absent, or no folder: a model built in memory); ValueError naming it
    when it is not a JSON object."""
    return _json_object(Path(folder) / TOKENIZER_CONFIG) if folder is not None else {}


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    conf = read_json(path)
    if not isinstance(conf, dict):
        raise ValueError(f"{path}:1: expected a JSON object")
    return conf


def special_token_strings(conf: dict) -> dict[str, str]:
    """The named special tokens (SPECIAL_TOKEN_NAMES) a config sets, as strings ({"content": ...} read)."""
    out = {}
    for key in SPECIAL_TOKEN_NAMES:
        v = conf.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[key] = v
    return out


def special_tokens(folder: str | os.PathLike | None) -> dict[str, str]:
    """The named special tokens of a checkpoint folder (bos_token, eos_token, ...: what transformers passes every
    chat template) as transformers 5 reads them: tokenizer_config.json's and, when that has no added_tokens_decoder
    (an older folder), special_tokens_map.json's, which then take precedence. {} for no folder."""
    if folder is None:
        return {}
    conf = tokenizer_config(folder)
    names = special_token_strings(conf)
    if "added_tokens_decoder" not in conf:
        names.update(special_token_strings(_json_object(Path(folder) / SPECIAL_TOKENS_MAP)))
    return names


def eos_token_ids(folder: str | os.PathLike | None, tokenizer=None) -> list[int]:
    """The ids that end a generation for a model folder: generation_config.json's eos_token_id, config.json's, and
    the folder's eos_token (special_tokens, through `tokenizer`), in that order, each an int or a list; [] if none
    (or no folder: a model built in memory). ValueError naming the file for a malformed value."""
    out: list[int] = []
    if folder is None:
        return out
    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        doc = read_json(path)
        v = doc.get("eos_token_id") if isinstance(doc, dict) else None
        ids = [v] if isinstance(v, int) else v if isinstance(v, list) else [] if v is None else None
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {v!r}")
        out += [i for i in ids if i not in out]
    if tokenizer is not None:
        eos = special_tokens(folder).get("eos_token")
        i = tokenizer.special_tokens.get(eos) if eos is not None else None
        if i is not None and i not in out:
            out.append(i)
    return out


def chat_format(folder: str | os.PathLike | None, tokenizer, variables: dict | None = None):
    """The chat format of a checkpoint folder (see the module doc): a ChatTemplate (its template -- and its
    "tool_use" one --, its special tokens, its EOS ids), else ChatML when the tokenizer has <|im_start|>/<|im_end|>,
    else None. folder None (a model built in memory): ChatML or None. `variables`: template options (e.g.
    {"enable_thinking": False})."""
    found = read_templates(folder) if folder is not None else None
    if found is None:
        return ChatML(tokenizer) if has_chatml(tokenizer) else None
    source, where = read_template(folder)
    stops = eos_token_ids(folder, tokenizer)
    if not stops:
        raise ValueError(f"{folder}: the chat template has no end-of-turn token to stop at: no eos_token_id in "
                         f"generation_config.json or config.json, no eos_token in {TOKENIZER_CONFIG}")
    names = {**special_tokens(folder), **(variables or {})}
    return ChatTemplate(source, tokenizer, names, stops, where, tool_template=found[0].get("tool_use"))


# ---- a conversation ------------------------------------------------------------------------------------


class ChatSession:
    """A conversation with a chat model: `reply(text)` streams the answer (text pieces) and records both turns.
    `chat`: the chat format (default ChatML on `tokenizer`). The prompt keeps the system message and drops the
    oldest turns when the history plus room for the answer would not fit in the context window; a system message
    the template refuses (Gemma's refuses any) is a ValueError at once. skip_special_tokens (default True): special
    tokens the model writes are left out of the answer (as shown and as kept in the history), as `transformers
    chat` and vLLM's chat completions leave them out."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 min_new_tokens: int = 16, chat=None, skip_special_tokens: bool = True, **sampling):
        self.model, self.tok = model, tokenizer
        self.chat = chat if chat is not None else ChatML(tokenizer)
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.n_vocab} ids but the model only "
                f"{model.config.vocab_size} (was it fine-tuned with these chat tokens?)"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        SamplingParams(**{f.name: sampling[f.name] for f in dataclasses.fields(SamplingParams) if f.name in sampling})
        check_seed(sampling.get("seed"))  # (bad options fail here, not at every message)
        if system:  # (a template that refuses system messages, Gemma's, refuses it here, not at every message)
            try:
                self.chat.prompt([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
            except ValueError as e:
                raise ValueError(f"the system message cannot be used: {e}") from None
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min(min_new_tokens, max_new_tokens)
        if "weights" in sampling:  # the bf16/int8 snapshot taken once, not per reply
            sampling["weights"] = model.decode_weights(sampling["weights"]) or "float32"
        self.sampling = sampling
        self.skip_special_tokens = skip_special_tokens
        self.history: list[dict] = []
        self.dropped = 0  # turns dropped to fit the context so far

    def reset(self) -> None:
        self.history, self.dropped = [], 0

    def prompt(self) -> np.ndarray:
        """The prompt ids for the current history, dropping oldest turns to leave room for an answer."""
        room = self.model.config.block_size - self.min_new_tokens
        system = [{"role": "system", "content": self.system}] if self.system else []
        hist, dropped = self.history, 0
        while True:
            ids = self.chat.prompt(system + hist)
            if ids.size <= room:
                break
            users = [i for i, m in enumerate(hist) if m["role"] == "user"]
            if len(users) <= 1:
                raise ValueError(
                    f"the message is too long: {ids.size} prompt tokens leave no room for an answer "
                    f"in the context of {self.model.config.block_size} tokens"
                )
            hist, dropped = hist[users[1] :], dropped + 1  # drop the oldest user turn and its answer
        self.history, self.dropped = hist, self.dropped + dropped
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to the user message `text`. An answer cut short (the generator closed
        early, Ctrl-C) is recorded as far as it went, so user and assistant turns keep alternating."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self.history.append({"role": "user", "content": text})
        try:
            ids = self.prompt()
        except ValueError:
            self.history.pop()
            raise
        n = min(self.max_new_tokens, self.model.config.block_size - ids.size)
        answer = []
        try:
            for piece in stream_text(self.model, self.tok, ids.tolist(), n, stop_tokens=self.chat.stop_tokens,
                                     skip_special_tokens=self.skip_special_tokens, continues=False, **self.sampling):
                answer.append(piece)
                yield piece
        finally:
            self.history.append({"role": "assistant", "content": "".join(answer)})


def chat_loop(session: ChatSession, inp, out, err) -> int:
    """Read user messages line by line from `inp` (a terminal or a pipe) and stream answers to `out`.
    Commands: /reset (forget the history), /quit (or end of input). Ctrl-C during an answer stops it (kept in the
    history as far as it went) and asks for the next message; at the prompt it ends the chat."""
    interactive = hasattr(inp, "isatty") and inp.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\n")
        cmd = text.strip()
        if not cmd:
            continue
        if cmd == "/quit":
            break
        if cmd == "/reset":
            session.reset()
            err.write("(history cleared)\n")
            continue
        if cmd.startswith("/") and " " not in cmd:
            err.write(f"unknown command {cmd} (commands: /reset, /quit)\n")
            continue
        dropped = session.dropped
        answer = session.reply(text)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except ValueError as e:
            err.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:
            answer.close()  # records the answer so far
            out.write("\n")
            err.write("(answer interrupted; /quit or Ctrl-D ends the chat)\n")
            continue
        out.write("\n")
        out.flush()
        if session.dropped > dropped:
            err.write(f"(dropped {session.dropped - dropped} oldest turn(s) to fit the context)\n")
    return 0


__all__ = ["ChatML", "ChatTemplate", "ChatSession", "chat_format", "chat_loop", "read_template", "read_templates",
           "render", "render_prompt", "special_tokens", "template_messages", "validate_conversation", "IM_START",
           "IM_END"]
