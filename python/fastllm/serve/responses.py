"""OpenAI's Responses API (`POST /v1/responses`) over the chat machinery of api.py.

A Responses request is the chat request in other clothes, so it is translated into one and checked by
`api.parse_chat` (the same validation, chat template, tools, grammar and engine request); only the shapes differ:
- in: `input` (a string, or items: messages with text content, `function_call` and `function_call_output`
  items), `instructions` (a system message first), `max_output_tokens`, `temperature`, `top_p`, `tools` (flat:
  {"type": "function", "name", "description", "parameters", "strict"}), `tool_choice` ({"type": "function",
  "name"} for a named one), `parallel_tool_calls`, `text.format` (text, json_object, or json_schema with its
  name and schema at the top level), `stream`, and the sampling fields of vLLM's Responses endpoint (extra_body
  in the openai client: top_k, repetition_penalty, seed, stop, ignore_eos, logit_bias, skip_special_tokens,
  include_stop_str_in_output; fastllm's min_p, presence_penalty, frequency_penalty), as in chat;
- out: a `response` object whose `output` is a message item (its text as one `output_text` part), a
  `function_call` item per call, and first a `reasoning` item for a thinking model's reasoning (Qwen3's
  <think>); `status` "completed" or "incomplete" (max_output_tokens reached, with incomplete_details); `usage` in
  input/output tokens. Streamed: OpenAI's semantic events (`event:` and `data:` lines), response.created,
  response.in_progress, response.output_item.added, response.content_part.added, response.output_text.delta ...
  done, response.reasoning_text.delta ... done, response.function_call_arguments.delta / done,
  response.output_item.done, and response.completed / incomplete (or failed), each with its sequence_number.
Nothing is stored (`store` is accepted and answered false): `previous_response_id` is a 400 asking for the whole
conversation in `input`. Errors name the Responses field (text.format.schema, not response_format...).
"""

from __future__ import annotations

import copy
import time
import uuid

from .api import APIError, Call, ServedModel, _bad_type, _check_fields, _get, _unsupported, parse_chat

# fields that mean in the chat request what they mean here: OpenAI's, fastllm's extras (min_p, presence_penalty,
# frequency_penalty) and those vLLM's ResponsesRequest takes (vllm/entrypoints/openai/responses/protocol.py:
# top_k, repetition_penalty, seed, stop, ignore_eos, logit_bias, skip_special_tokens, include_stop_str_in_output;
# vLLM passes no stop_token_ids or min_tokens from a Responses request, so neither is accepted here)
_SAME = ("model", "temperature", "top_p", "parallel_tool_calls", "stream", "seed", "top_k", "min_p",
         "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "skip_special_tokens", "ignore_eos",
         "logit_bias", "include_stop_str_in_output")
FIELDS = {"input", "instructions", "max_output_tokens", "tools", "tool_choice", "text", "store", "metadata", "user",
          "previous_response_id", "reasoning", "truncation", "include", "service_tier", "prompt_cache_key",
          "safety_identifier", "top_logprobs", *_SAME}
LOGPROBS = "message.output_text.logprobs"  # the `include` item asking for the answer's logprobs
# the chat field a Responses field becomes (for naming it in errors)
_PARAMS = {"max_completion_tokens": "max_output_tokens", "response_format.json_schema.schema": "text.format.schema",
           "response_format.json_schema.name": "text.format.name", "response_format.json_schema": "text.format",
           "response_format.type": "text.format.type", "response_format": "text.format", "messages": "input"}


def _text(content, where: str) -> str:
    """A message's content: a string or text parts (input_text / output_text / text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad_type(where, "a string or an array of content parts", content)
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") or \
                not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise _unsupported(f"{where}[{j}]", f"of type {kind!r} (only text parts)")
        parts.append(p["text"])
    return "".join(parts)


def _messages(body: dict) -> list[dict]:
    """`instructions` and `input` as chat messages (function calls and their outputs as tool_calls / tool)."""
    msgs = []
    instructions = _get(body, "instructions", "string")
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    items = body.get("input")
    if items is None:
        raise APIError(400, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _bad_type("input", "a string or an array of input items", items)
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad_type(where, "an object", item)
        kind = item.get("type", "message")
        if kind == "message":
            msgs.append({"role": item.get("role"), "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else _text(out, f"{where}.output")})
        else:
            raise _unsupported(f"{where}.type", f"{kind!r} (messages, function_call and function_call_output only)")
    return msgs


def _chat_body(body) -> dict:
    """The chat completions request that a Responses request is."""
    _check_fields(body, FIELDS)
    if body.get("previous_response_id") is not None:
        raise APIError(400, "'previous_response_id' is not supported: this server stores no responses; send the whole "
                            "conversation in 'input'.", "previous_response_id", "unsupported_parameter")
    chat = {k: body[k] for k in _SAME if k in body}
    chat["messages"] = _messages(body)
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    include = _get(body, "include", "array") or []
    if LOGPROBS in include:  # (as OpenAI: top_logprobs alternatives, 0 by default, only with it)
        chat.update(logprobs=True, top_logprobs=body.get("top_logprobs") or 0)
    tools = _get(body, "tools", "array")
    if tools is not None:
        chat["tools"] = [{"type": t.get("type"), "function": {k: v for k, v in t.items() if k != "type"}}
                         if isinstance(t, dict) else t for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = (_get(body, "text", "object") or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise _bad_type("text.format", "an object", fmt)
        if fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        chat["response_format"] = fmt
    return chat


def parse_response(body, served: ServedModel) -> ResponseCall:
    """A /v1/responses body -> ResponseCall (APIError naming the Responses field on bad input)."""
    try:
        chat = _chat_body(body)
        call = parse_chat(chat, served)
    except APIError as e:
        param = e.param
        for chat_name, name in _PARAMS.items():
            if param is not None and (param == chat_name or param.startswith(chat_name + ".")):
                param = name + param[len(chat_name):]
                e.message = e.message.replace(f"'{chat_name}", f"'{name}")
                break
        if param is not None and param.startswith("tools[") and ".function." in param:
            param = param.replace(".function.", ".", 1)
            e.message = e.message.replace(".function.", ".")
        e.param = param
        raise
    return ResponseCall(call, body)


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ResponseCall:
    """A validated Responses call: the chat Call it runs as, and the Responses shapes of its results."""

    def __init__(self, call: Call, body: dict):
        self.call, self.body = call, body
        self.request, self.stream = call.request, call.stream
        self.id, self.created = _id("resp_"), int(time.time())
        self.seq = 0
        self.output: list[dict] = []  # the output items so far
        self.open_item: dict | None = None  # the message or reasoning item being streamed
        self.pending: list[dict] = []  # logprobs of tokens whose text has not come yet (part of a UTF-8 character)

    @property
    def done(self) -> bool:
        return self.call.done

    @property
    def error(self) -> str | None:
        return self.call.error

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def response(self, status: str | None = None) -> dict:
        """The response object (once done: completed, or incomplete when max_output_tokens ended it)."""
        b, c = self.body, self.call.choices[0]
        if status is None:
            status = "failed" if self.call.error else "incomplete" if c.finish_reason == "length" else "completed"
        fmt = (b.get("text") or {}).get("format") or {"type": "text"}
        d = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
             "model": self.call.model, "output": copy.deepcopy(self.output), "error": None,
             "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
             "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
             "temperature": b.get("temperature", 1.0), "top_p": b.get("top_p", 1.0), "tools": b.get("tools") or [],
             "tool_choice": b.get("tool_choice") or ("auto" if b.get("tools") else "none"),
             "parallel_tool_calls": b.get("parallel_tool_calls", True), "text": {"format": fmt},
             "previous_response_id": None, "store": False, "metadata": b.get("metadata") or {},
             "truncation": "disabled", "reasoning": {"effort": None, "summary": None}, "user": b.get("user")}
        if status == "failed":
            d["error"] = {"code": "server_error", "message": self.call.error}
        if self.call.done:
            u = self.call.usage()
            d["usage"] = {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": u["total_tokens"]}
        return d

    def feed(self, events: list) -> list[dict]:
        """Engine events -> stream events (the output items are built as they come, streamed or not)."""
        started = self.seq == 0
        out = []
        if started:
            out += [self._event("response.created", response=self.response("in_progress")),
                    self._event("response.in_progress", response=self.response("in_progress"))]
        for chunk in self.call.feed(events):
            for choice in chunk["choices"]:
                delta = choice["delta"]
                logprobs = (choice.get("logprobs") or {}).get("content") or []
                if delta.get("reasoning_content"):  # (a chunk's logprobs go with its answer text, not its reasoning)
                    out += self._text(delta["reasoning_content"], "reasoning")
                elif delta.get("content"):
                    out += self._text(delta["content"], logprobs=self.pending + logprobs)
                    self.pending = []
                else:  # no text yet (part of a character), or none at all (a stop token): with the next text
                    self.pending += logprobs
                for tc in delta.get("tool_calls") or []:
                    out += self._close_text() + self._function_call(tc)
        if self.call.done:
            if not any(i["type"] != "reasoning" for i in self.output) and not self.call.error:
                out += self._text("")  # an empty answer is still a message
            if self.pending and self.open_item is not None and self.open_item["type"] == "message":
                self.open_item["content"][0]["logprobs"] += self.pending  # (a stop token's: in the final part)
            self.pending = []
            out += self._close_text()
            if self.call.error:
                out.append(self._event("response.failed", response=self.response()))
            else:
                r = self.response()
                out.append(self._event(f"response.{r['status']}", response=r))
        return out

    def _text(self, delta: str, kind: str = "message", logprobs: list | None = None) -> list[dict]:
        """Events of `delta` added to the open item of `kind` ("message": output text, with the logprobs of its
        tokens when asked for; "reasoning": a thinking model's reasoning text), opening one (and closing the other
        kind's) first if needed."""
        out = []
        if self.open_item is not None and self.open_item["type"] != kind:
            out += self._close_text()
        if self.open_item is None:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "message" else \
                {"type": "reasoning_text", "text": ""}
            item = {"type": "message", "id": _id("msg_"), "status": "in_progress", "role": "assistant",
                    "content": []} if kind == "message" else \
                {"type": "reasoning", "id": _id("rs_"), "status": "in_progress", "summary": [], "content": []}
            self.output.append(item)
            self.open_item, index = item, len(self.output) - 1
            out.append(self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item)))
            if kind == "message":
                out.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                       content_index=0, part=dict(part)))
            item["content"].append(part)
        if delta:
            item = self.open_item
            item["content"][0]["text"] += delta
            extra = {"logprobs": logprobs or []} if kind == "message" else {}
            if kind == "message":
                item["content"][0]["logprobs"] += copy.deepcopy(logprobs or [])
            out.append(self._event(f"response.{'output' if kind == 'message' else 'reasoning'}_text.delta",
                                   item_id=item["id"], output_index=self.output.index(item), content_index=0,
                                   delta=delta, **extra))
        return out

    def _close_text(self) -> list[dict]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        index, part = self.output.index(item), item["content"][0]
        item["status"] = "completed" if self.call.choices[0].finish_reason != "length" else "incomplete"
        if item["type"] == "reasoning":
            return [self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=part["text"]),
                    self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=copy.deepcopy(part["logprobs"])),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=dict(part)),
                self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]

    def _function_call(self, tc: dict) -> list[dict]:
        fn = tc["function"]
        item = {"type": "function_call", "id": _id("fc_"), "call_id": tc["id"], "name": fn["name"],
                "arguments": fn["arguments"], "status": "completed"}
        self.output.append(item)
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"]),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item)]
