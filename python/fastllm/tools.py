"""Tool calling: how a chat model is told about functions, how it calls them, and how a call is read back.

OpenAI's API, which `fastllm serve` speaks: a request lists `tools` ({"type": "function", "function": {"name",
"description", "parameters": JSON schema}}) and a `tool_choice` ("none", "auto", "required", or {"type":
"function", "function": {"name"}}); the answer carries `tool_calls` ({"id", "type": "function", "function":
{"name", "arguments": JSON text}}) with finish_reason "tool_calls"; the client runs them and sends each result
back as a {"role": "tool", "tool_call_id", "content"} message.

The model itself reads and writes calls as text, in the format its checkpoint was trained on. Two are supported,
written exactly as those checkpoints' chat templates write them:

- "hermes" (Qwen2.5, Hermes 2/3, and fastllm's ChatML): the system turn lists the tools in <tools></tools>; a call
  is `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, several in a row separated by newlines;
  results come back in a user turn as `<tool_response>\\n...\\n</tool_response>` blocks. `hermes_messages`
  writes a conversation with tools as plain ChatML messages, the way Qwen2.5's template renders it.
- "llama3_json" (Llama 3.1 / 3.2 / 3.3): the whole answer is `{"name": "f", "parameters": {...}}`, possibly after
  <|python_tag|>; one call (several joined by ";" are read too).

A third, "mistral" (Mistral 7B Instruct v0.3 and the other tokenizer-v3 models: tools in [AVAILABLE_TOOLS],
calls as `[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "<9 characters>"}]`, results in [TOOL_RESULTS]), is
only rendered: its templates get tools and tool turns (SFT, prompts), but FORMATS has no parser for it, so the
server does not take tools for such a model.

`FORMATS[name].parser()` reads an answer as it streams: `feed(text) -> (content, calls)` gives the text to show
now and the calls completed now; text that may still turn into a call is held back, a call goes out whole once
its JSON is complete, and an answer that only looked like a call (invalid JSON, an unknown shape) comes out as
content at the end. `FORMATS[name].grammar(tools, parallel)` is the Lark grammar (fastllm.grammar) of one call --
or several -- to one of `tools`, its arguments valid for that function's parameters schema: the server forces a
call with it for tool_choice "required" or a named function.

A thinking model (Qwen3) starts its answer with its reasoning between <think> and </think>; `ThinkParser` splits
that off the same way, before the tool-call parser reads the rest.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import NamedTuple

from .grammar import JSON_STYLE

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function without parameters


class ToolError(ValueError):
    """Bad tools or tool calls: the message names where; `param` is that place as OpenAI names it
    ("tools[0].function.name") and `code` its error code ("invalid_value", "invalid_type", ...)."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def check_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI's function list, checked (1 to 128 {"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}, names of 1-64 letters, digits, _ or -, each once); ToolError naming the field."""
    if not isinstance(tools, list) or not 1 <= len(tools) <= 128:
        raise ToolError(f"Invalid '{where}': expected an array of 1 to 128 tools.", where)
    names = set()
    kinds = {"description": (str, "a string"), "parameters": (dict, "an object"), "strict": (bool, "a boolean")}
    for i, t in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise ToolError(f"Invalid type for '{at}': expected an object.", at, "invalid_type")
        if t.get("type") != "function":
            raise ToolError(f"'{at}.type' {t.get('type')!r} is not supported (only 'function' tools).", f"{at}.type",
                            "unsupported_parameter")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"Invalid type for '{at}.function': expected an object.", f"{at}.function", "invalid_type")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"Invalid '{at}.function.name': {name!r}: expected 1 to 64 letters, digits, underscores "
                            "or dashes.", f"{at}.function.name")
        if name in names:
            raise ToolError(f"Invalid '{where}': the function name {name!r} is given twice.", f"{at}.function.name")
        names.add(name)
        for key, (kind, what) in kinds.items():
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise ToolError(f"Invalid type for '{at}.function.{key}': expected {what}.", f"{at}.function.{key}",
                                "invalid_type")
    return tools


def parse_tool_calls(value, where: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls`, checked, with each call's arguments (JSON text, or already an
    object) as a dict, as chat templates want them; ToolError naming the field."""
    if not isinstance(value, list):
        raise ToolError(f"Invalid type for '{where}': expected an array.", where, "invalid_type")
    calls = []
    for j, c in enumerate(value):
        at = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError(f"Invalid value for '{at}': expected {{\"id\", \"type\": \"function\", \"function\": "
                            f"{{\"name\", \"arguments\"}}}}.", at)
        args = fn.get("arguments") or "{}"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise ToolError(f"Invalid value for '{at}.function.arguments': not JSON ({e}).",
                                f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise ToolError(f"Invalid value for '{at}.function.arguments': expected a JSON object.",
                            f"{at}.function.arguments")
        calls.append({"id": str(c.get("id") or ""), "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(name: str, arguments: dict) -> dict:
    """An OpenAI tool call (arguments as JSON text) with a fresh id."""
    return {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _dumps(x) -> str:  # as chat templates' tojson writes it
    return json.dumps(x, ensure_ascii=False)


def _held(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is the start of `marker` (it may still become the marker)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


# ---- hermes ---------------------------------------------------------------------------------------------------

HERMES_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\nFor each "
                "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
                "</tool_call>")


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """A conversation with tools (OpenAI messages: assistant `tool_calls` with arguments as dicts, "tool" messages)
    as plain {"role", "content"} messages, in the hermes layout of Qwen2.5's template: the tools appended to the
    system message (one is added if there is none), each call a <tool_call> block after the assistant's text,
    each run of tool results one user turn of <tool_response> blocks."""
    msgs = list(messages)
    out: list[dict] = []
    if tools:
        system = msgs.pop(0)["content"] + "\n\n" if msgs and msgs[0]["role"] == "system" else ""
        listed = "".join("\n" + _dumps(t) for t in tools)
        out.append({"role": "system", "content": system + HERMES_TOOLS.format(tools=listed)})
    for m in msgs:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [f"{TOOL_CALL}\n{{\"name\": \"{c['function']['name']}\", \"arguments\": "
                     f"{_dumps(c['function']['arguments'])}}}\n{TOOL_CALL_END}" for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + calls)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _call(obj, args_key: str) -> dict | None:
    """A tool call from a parsed {"name", args_key: {...}} object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return tool_call(obj["name"], args) if isinstance(args, dict) else None


class HermesParser:
    """Reads <tool_call> blocks out of a streamed answer (see the module doc)."""

    def __init__(self):
        self.buf, self.inside, self.space = "", False, ""

    def _content(self, text: str) -> str:
        """Text to show, less trailing whitespace, which waits: before a call it is dropped."""
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body):]
        return body

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        content, calls = "", []
        while True:
            if not self.inside:
                i = self.buf.find(TOOL_CALL)
                if i < 0:
                    keep = _held(self.buf, TOOL_CALL)
                    content += self._content(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return content, calls
                content += self._content(self.buf[:i])
                self.space, self.buf, self.inside = "", self.buf[i + len(TOOL_CALL):], True
            else:
                j = self.buf.find(TOOL_CALL_END)
                if j < 0:
                    return content, calls
                body, self.buf, self.inside = self.buf[:j], self.buf[j + len(TOOL_CALL_END):], False
                call = self._parse(body)
                if call is None:
                    content += self._content(TOOL_CALL + body + TOOL_CALL_END)
                else:
                    calls.append(call)
                    self.buf = self.buf.lstrip()

    @staticmethod
    def _parse(body: str) -> dict | None:
        try:
            return _call(json.loads(body), "arguments")
        except ValueError:
            return None

    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end of the answer (a call whose </tool_call> never came counts if its JSON does)."""
        if self.inside:
            call = self._parse(self.buf)
            if call is not None:
                return "", [call]
            text = self.space + TOOL_CALL + self.buf
        else:
            text = self.space + self.buf
        self.buf = self.space = ""
        return text, []


def hermes_grammar(tools: list[dict], parallel: bool) -> str:
    more = ' ("\\n" call)*' if parallel else ""
    schema = _dumps(_choice_schema(tools, "arguments"))
    return f'start: call{more}\ncall: "{TOOL_CALL}\\n" %json{schema} "\\n{TOOL_CALL_END}"\n'


# ---- reasoning ------------------------------------------------------------------------------------------------

THINK, THINK_END = "<think>", "</think>"


class ThinkParser:
    """Splits a thinking model's streamed answer (Qwen3, QwQ, DeepSeek-R1 distills) into its reasoning, between
    <think> and </think> (the newlines just inside the tags dropped), and the answer after it (the newlines
    after </think> dropped). `opened`: the prompt already ends with <think>, so the answer starts inside it.
    feed(text) -> (reasoning, content) to show now; text that may still be a tag is held back."""

    def __init__(self, opened: bool = False):
        self.state = "think" if opened else "start"  # start -> think -> answer, or start -> answer
        self.buf, self.lead = "", True  # lead: no reasoning (or, in answer, no content) shown yet

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK):
                self.buf, self.state = head[len(THINK):], "think"
            elif head and not THINK.startswith(head):
                self.state = "answer"
            else:
                return "", ""
        if self.state == "think":
            i = self.buf.find(THINK_END)
            end = i if i >= 0 else len(self.buf) - _held(self.buf, THINK_END)
            body = self.buf[:end]
            shown = body.rstrip("\n")  # newlines wait: before </think> they are dropped
            if self.lead:
                shown = shown.lstrip("\n")
            self.lead = self.lead and not shown
            reasoning = shown
            if i < 0:
                self.buf = body[len(body.rstrip("\n")):] + self.buf[end:]
                return reasoning, ""
            self.buf, self.state, self.lead = self.buf[i + len(THINK_END):], "answer", True
        if self.state == "answer":
            content, self.buf = self.buf, ""
            if self.lead:
                content = content.lstrip("\n")
                self.lead = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held at the end: a cut-off reasoning stays reasoning; anything else is content."""
        text, self.buf = self.buf, ""
        if self.state == "think":
            text = text.rstrip("\n")
            return text.lstrip("\n") if self.lead else text, ""
        return "", text.lstrip("\n") if self.state == "answer" and self.lead else text


# ---- llama3_json ----------------------------------------------------------------------------------------------


class Llama3JsonParser:
    """Reads a Llama 3.1 JSON call: an answer that starts with `{` (or <|python_tag|>) is held to the end and read
    as one or more ";"-separated {"name", "parameters"} objects; any other answer is content as it comes."""

    def __init__(self):
        self.buf, self.mode = "", None  # mode: None (undecided), "json", "text"

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        if self.mode is None:
            head = self.buf.lstrip()
            if head.startswith(PYTHON_TAG) or head.startswith("{"):
                self.mode = "json"
            elif head and not PYTHON_TAG.startswith(head):
                self.mode = "text"
        if self.mode != "text":
            return "", []
        text, self.buf = self.buf, ""
        return text, []

    def finish(self) -> tuple[str, list[dict]]:
        text, self.buf = self.buf, ""
        if self.mode == "json":
            calls = self._parse(text.strip().removeprefix(PYTHON_TAG))
            if calls:
                return "", calls
        return text, []

    @staticmethod
    def _parse(s: str) -> list[dict] | None:
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(s):
            try:
                obj, i = decoder.raw_decode(s, i)
            except ValueError:
                return None
            call = _call(obj, "parameters")
            if call is None:
                return None
            calls.append(call)
            while i < len(s) and (s[i].isspace() or s[i] == ";"):
                i += 1
        return calls


def llama3_grammar(tools: list[dict], parallel: bool) -> str:
    return f"start: %json{_dumps(_choice_schema(tools, 'parameters'))}\n"


def _choice_schema(tools: list[dict], args_key: str) -> dict:
    """JSON schema of one call {"name": ..., args_key: {...}} to any of `tools`."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               args_key: t["function"].get("parameters") or EMPTY_PARAMETERS},
              "required": ["name", args_key], "additionalProperties": False} for t in tools]
    return {"x-guidance": JSON_STYLE, "anyOf": calls}


class Format(NamedTuple):
    name: str
    parser: type  # HermesParser or Llama3JsonParser
    grammar: object  # (tools, parallel) -> Lark source


FORMATS = {"hermes": Format("hermes", HermesParser, hermes_grammar),
           "llama3_json": Format("llama3_json", Llama3JsonParser, llama3_grammar)}


def template_format(source: str) -> str | None:
    """The tool-call format a Jinja2 chat template writes, or None if it takes no tools: "hermes" where it writes
    <tool_call> blocks, "llama3_json" where it writes {"name", "parameters"} calls (Llama 3.1's), "mistral" where
    it writes [TOOL_CALLS] (rendered only: not in FORMATS)."""
    if "tools" not in source:
        return None
    if TOOL_CALL in source:
        return "hermes"
    if MISTRAL_TOOL_CALLS in source:
        return "mistral"
    if '"parameters": ' in source or PYTHON_TAG in source:
        return "llama3_json"
    return None
