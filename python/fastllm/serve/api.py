"""The OpenAI wire format: request validation and the JSON of responses and stream chunks (no HTTP here).

`parse_chat(body, served)` / `parse_completion(body, served)` check a decoded JSON body field by field and
return a `Call`: the engine `Request` plus what is needed to format its results; bad input raises `APIError`
with OpenAI's error JSON (message, type, param naming the field, code) and status. `Call.feed(events)` turns
engine events into stream chunks, `Call.response()` builds the non-streamed body, `Call.usage()` the usage.

Semantics (OpenAI's, where it defines them):
- chat: messages (string content or text parts; role "developer" is a system message) are rendered with the
  model's chat format (`fastllm.chat.chat_format`): the checkpoint folder's own template (a Llama 3 or Qwen2.5
  folder's Jinja2 chat template; generation stops at its EOS ids), else fastllm's ChatML (`fastllm.sft.
  render_prompt`; generation stops at <|im_end|> or <|endoftext|>). A model with neither (a base model: no
  template and no <|im_start|>/<|im_end|> tokens) answers 400 with code "chat_template_missing": use
  /v1/completions, or fine-tune it with `fastllm sft`.
- completions: prompt is a string, a list of strings, a list of token ids or a list of lists of token ids
  (text may contain special tokens such as <|endoftext|>, as in `fastllm sample`; a text prompt starts with the
  tokenizer's BOS where it has one, as HF's tokenizer and vLLM encode it, token ids are taken as they are; an empty
  prompt is the BOS or <|endoftext|>); generation stops at the model's EOS ids (an HF folder's
  generation_config.json, fastllm.chat.eos_token_ids) and <|endoftext|>. max_tokens defaults to 16 (chat: the rest
  of the context); with echo it may be 0 (the prompt and, with logprobs, its logprobs, as evaluation harnesses score
  text).
- max_tokens that do not fit the context, or a prompt that fills it, are a 400 (code context_length_exceeded);
  an unknown model a 404 (code model_not_found); unknown fields a 400 naming them, as OpenAI does. OpenAI's
  own fields that change nothing here (user, metadata, prompt_cache_key, reasoning_effort, ...) are accepted;
  those asking for what this server lacks (audio, web_search_options, ...) are a 400 (unsupported_parameter).
- usage: prompt_tokens counts each prompt once (whatever n), completion_tokens every token sampled, a
  terminating stop token included; finish_reason "stop" (stop token or stop string) or "length" (max_tokens),
  and vLLM's stop_reason: the stop string or stop token id that ended the choice -- a stop_token_ids id, or an EOS
  id other than the tokenizer's own (as vLLM makes a generation_config's other EOS ids, Llama 3.1's <|eom_id|> and
  <|end_of_text|> beside its <|eot_id|>, stop_token_ids) --, null for the tokenizer's EOS (tokenizer_config.json's
  eos_token, else the first EOS id: ChatML's <|im_end|>, completions' <|endoftext|>) or max_tokens (streamed: on
  every completions chunk, on the last chat chunk, as vLLM sends it).
- vLLM's stop fields (extra_body in the openai client), both endpoints: stop_token_ids (ids that end a choice, their
  text left out), ignore_eos (the model's EOS ids end nothing: they are sampled and counted as any other token;
  not with a grammar), min_tokens (<= max_tokens: until that many tokens are sampled the EOS ids -- ignore_eos or
  not -- and stop_token_ids are masked out of the logits, and stop strings are not looked for in their text; one
  that ends after it stops the choice where it starts; a grammar that allows nothing but its end still ends it)
  and include_stop_str_in_output (the stop string, or the text of the stop token, stays in the text; a special
  token's text is still skipped unless skip_special_tokens is false).
- special tokens (tokenizer.special_ids: <|im_start|>, <|eot_id|>, <|endoftext|>, ... but not HF's non-special
  added tokens such as Qwen's <tool_call>) the model writes are left out of the text, streamed or not, as vLLM
  leaves them out; vLLM's extra field skip_special_tokens=false keeps them (spaces_between_special_tokens is
  accepted: vLLM applies it to "slow" tokenizers only, and fastllm's, all read from tokenizer.json, are "fast").
  Stop strings are found in the text as returned. The tags the tool-call and reasoning parsers read (<tool_call>,
  <think>) stay in their input where a tokenizer has them as special tokens. Logprobs name every token by its own
  text, special tokens too (as vLLM).
- logprobs are the model's own (log-softmax of the logits, before temperature, penalties, min_tokens' mask and
  filtering), for every sampled token, a terminating stop token included (as vLLM's: its text is left out, its
  logprob is not); chat: logprobs=true and top_logprobs 0..20,
  completions: logprobs 0..5 (with echo, the prompt's tokens too).
- n > 1 with temperature 0 (greedy) is a 400, as in vLLM (n identical choices); logit_bias values beyond
  [-100, 100] are clamped to it, as vLLM does (vllm/sampling_params.py).
- seed: choice 0 of a seeded request gives the tokens of `fastllm.sample.generate(..., seed=seed)`, alone or
  in a batch. fastllm's extra fields: top_k, min_p, repetition_penalty (`extra_body` in the openai client).
- tools (chat): `tools` are listed to the model by its chat format, in the tool-call format it was trained on
  (fastllm.tools: "hermes" for ChatML and Qwen2.5-style templates, "llama3_json" for Llama 3.1's); assistant
  `tool_calls` (arguments: JSON text) and "tool" messages are rendered back. With tool_choice "auto" (the default
  when tools are given) calls are read out of the answer: message.tool_calls, finish_reason "tool_calls", content
  null if there is no other text; streamed, each call is one `tool_calls` delta once complete. "required" or a
  named function ({"type": "function", "function": {"name"}}, one call) constrain the answer to the grammar of a
  call whose arguments match the function's parameters schema; "none" lists the tools but reads no calls.
  parallel_tool_calls=false: at most one forced call. The deprecated functions / function_call are a 400.
- reasoning (chat): with a thinking model's template (one that writes <think>, as Qwen3's), the answer's
  <think> block is message.reasoning_content (None when empty; streamed as reasoning_content deltas) and the rest
  the content (or tool calls); where the generation prompt already opens <think>, the answer starts inside it.
- response_format (chat): {"type": "json_object"} (a JSON object) or {"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}} constrain the answer by grammar (fastllm.grammar): a finished answer parses and
  matches the schema (one cut by max_tokens is a prefix of one, finish_reason "length").
- chat_template_kwargs (chat, /tokenize; vLLM's field): variables for the checkpoint's chat template in this
  request, as {"enable_thinking": false} for Qwen3's (a 400 for fastllm's ChatML, which has no template).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..chat import eos_token_ids, special_tokens
from ..grammar import Guide
from ..sample import SamplingParams
from ..tools import (
    FORMATS,
    NAME,
    THINK,
    THINK_END,
    TOOL_CALL,
    TOOL_CALL_END,
    ThinkParser,
    ToolError,
    check_tools,
    parse_tool_calls,
)
from .adapters import Adapter, AdapterError, Adapters
from .engine import Chunk, Failure, PromptLogprobs, Request, TokenLogprob

# ---- errors ---------------------------------------------------------------------------------------------

ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # others: invalid_request_error


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ---- the model being served -----------------------------------------------------------------------------


class ServedModel:
    """What the API layer knows of the model: its name, tokenizer, context, slots, and chat format (a
    fastllm.chat ChatTemplate or ChatML: `prompt(messages)` and `stop_tokens`; None: no chat), and the LoRA adapters
    served beside it (an adapters.Adapters). folder: the checkpoint folder, whose EOS ids (generation_config.json,
    ...) and tokenizer_config.json's special-token names completions and /tokenizer_info use."""

    def __init__(self, name: str, tokenizer, max_len: int, max_batch: int, vocab_size: int, chat=None,
                 folder: str | None = None, adapters: Adapters | None = None):
        self.name, self.tokenizer, self.max_len, self.max_batch = name, tokenizer, max_len, max_batch
        self.root = name if folder is None else str(folder)
        self.adapters = adapters  # the LoRA adapters served beside it (adapters.py), by name; None: none
        self.vocab_size, self.chat = vocab_size, chat
        # completions stop at the model's EOS ids (Llama 3 base: <|end_of_text|>) and at <|endoftext|>
        eot = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
        self.stops = list(dict.fromkeys(eos_token_ids(folder, tokenizer) + eot))
        self.names = special_tokens(folder)
        self.eos_token = tokenizer.special_tokens.get(self.names.get("eos_token"))  # tokenizer_config.json's, if any
        self.created = int(time.time())
        self._strings: dict[int, tuple[str, list[int]]] = {}
        self._guide, self._guide_lock = None, threading.Lock()

    def eos_token_id(self, stops) -> int | None:
        """Which of the EOS ids `stops` is the tokenizer's own EOS (vLLM's tokenizer.eos_token_id: stop_reason null;
        vLLM makes the other generation_config EOS ids stop_token_ids, whose stop_reason is the id, see
        vllm/sampling_params.py update_from_generation_config): tokenizer_config.json's eos_token, else the first
        (ChatML's <|im_end|>, a folder's first generation_config id, completions' <|endoftext|>)."""
        return self.eos_token if self.eos_token in stops else next(iter(stops), None)

    def guide(self):
        """The grammars of constrained chat answers (fastllm.grammar.Guide), built on first use."""
        with self._guide_lock:
            if self._guide is None:
                try:
                    self._guide = Guide(self.tokenizer, self.chat.stop_tokens)
                except ImportError as e:
                    raise APIError(400, f"This server cannot constrain answers: {e}.", None,
                                   "unsupported_parameter") from None
            return self._guide

    def token_str(self, t: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token (invalid UTF-8 as U+FFFD in the text; the bytes are exact)."""
        if t not in self._strings:
            b = self.tokenizer.decode_bytes([t])
            self._strings[t] = (b.decode("utf-8", errors="replace"), list(b))
        return self._strings[t]

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "fastllm",
                "root": self.root, "parent": None, "max_model_len": self.max_len}

    def cards(self) -> list[dict]:
        """/v1/models: the model, then its adapters (vLLM's order)."""
        adapters = self.adapters.all() if self.adapters else []
        return [self.card()] + [a.card(self.max_len) for a in adapters]


# ---- field checks ---------------------------------------------------------------------------------------

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
_ARTICLE = {"integer": "an integer", "number": "a number", "boolean": "a boolean", "string": "a string",
            "array": "an array", "object": "an object"}


def _json_type(v) -> str:
    return "null" if v is None else _JSON_TYPES.get(type(v), type(v).__name__)


def _bad_type(name: str, expected: str, v) -> APIError:
    got = _ARTICLE.get(_json_type(v), "null")
    return APIError(400, f"Invalid type for '{name}': expected {expected}, but got {got} instead.", name,
                    "invalid_type")


def _get(body: dict, name: str, kind: str, default=None, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False):
    """body[name] checked to be of JSON type `kind` (null or absent: default) and within [lo, hi]."""
    v = body.get(name)
    if v is None:
        return default
    if kind == "integer" and isinstance(v, float) and v.is_integer():
        v = int(v)
    ok = {"integer": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "boolean": isinstance(v, bool), "string": isinstance(v, str), "array": isinstance(v, list),
          "object": isinstance(v, dict)}[kind]
    if not ok:
        raise _bad_type(name, _ARTICLE[kind], v)
    if kind in ("integer", "number"):
        if not math.isfinite(v):
            raise APIError(400, f"Invalid value for '{name}': {v} is not a finite number.", name, "invalid_value")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise APIError(400, f"Invalid value for '{name}': expected a value {'>' if lo_open else '>='} {lo}, "
                                f"but got {v} instead.", name, "invalid_value")
        if hi is not None and v > hi:
            raise APIError(400, f"Invalid value for '{name}': expected a value <= {hi}, but got {v} instead.", name,
                           "invalid_value")
    return v


# fields accepted and ignored: they change nothing here (user, metadata, store: bookkeeping on OpenAI's side)
_IGNORED = {"user", "metadata", "store", "service_tier", "stream_options"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
           "frequency_penalty", "logit_bias", "logprobs", "top_k", "min_p", "repetition_penalty", "skip_special_tokens",
           "spaces_between_special_tokens", "stop_token_ids", "ignore_eos", "min_tokens",
           "include_stop_str_in_output"} | _IGNORED
# chat fields of OpenAI's that change nothing here either: prompt caching and safety ids (bookkeeping),
# prediction (only makes OpenAI faster), reasoning_effort and verbosity (hints to OpenAI's reasoning models)
_CHAT_IGNORED = {"prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "safety_identifier",
                 "prediction", "reasoning_effort", "verbosity"}
# chat fields of OpenAI's asking for what this server does not do: a 400 unless null
_CHAT_UNSUPPORTED = {"audio": "(audio output)", "web_search_options": "(web search)", "moderation": "(moderation)"}
CHAT_FIELDS = _COMMON | _CHAT_IGNORED | set(_CHAT_UNSUPPORTED) | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "modalities", "chat_template_kwargs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {_ARTICLE.get(_json_type(body), 'null')}.",
                       None, "invalid_body")
    for k in body:
        if k not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")


def _unsupported(name: str, what: str) -> APIError:
    return APIError(400, f"'{name}' {what} is not supported by this server.", name, "unsupported_parameter")


# ---- one API call ---------------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it
    started: bool = False
    offset: int = 0  # completions' text_offset of the next token
    parser: object = None  # chat with tools: the format's parser (fastllm.tools), which text goes through
    calls: list[dict] = field(default_factory=list)  # the tool calls read so far
    think: ThinkParser | None = None  # a thinking model's: its reasoning is split off first
    reasoning: list[str] = field(default_factory=list)


class Call:
    """One validated API call (chat or completion): its engine request and the formatting of its results."""

    def __init__(self, kind: str, served: ServedModel, request: Request, stream: bool, include_usage: bool,
                 echo: list[str] | None = None, tool_format: str | None = None, think: bool | None = None,
                 model: str | None = None):
        self.kind, self.served, self.request = kind, served, request
        self.model = model or served.name  # the id answers name: the model's, or the adapter's it ran with
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.stream, self.include_usage = stream, include_usage
        self.logprobs, self.echo = request.logprobs, echo
        # think: None (the model does not reason), False / True (the prompt leaves it outside / inside <think>)
        self.choices = [_Choice(parser=tool_format and FORMATS[tool_format].parser(),
                                think=None if think is None else ThinkParser(think))
                        for _ in range(len(request.prompts) * request.n)]
        self.thinks = think is not None
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.finished = 0
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.finished == len(self.choices)

    # -- events -> state (+ stream chunks) --

    def feed(self, events: list) -> list[dict]:
        """Record engine events; the stream chunks they make (in order)."""
        out: list[dict] = []
        for e in events:
            if isinstance(e, Failure):
                self.error = e.message
            elif isinstance(e, PromptLogprobs):
                self.prompt_logprobs[e.prompt] = e.entries
            elif isinstance(e, Chunk):
                out += self._chunk(e)
        return out

    def _chunk(self, e: Chunk) -> list[dict]:
        c = self.choices[e.index]
        out = []
        if not c.started:
            c.started = True
            if self.kind == "chat":
                out.append(self._stream_chunk(e.index, {"role": "assistant", "content": ""}))
            elif self.echo is not None:
                p = e.index // self.request.n
                c.text.append(self.echo[p])
                lp = self._completion_logprobs(c, self.prompt_logprobs.get(p, []), self._prompt_ids(p))
                out.append(self._stream_chunk(e.index, self.echo[p], lp))
        c.tokens += len(e.tokens)
        c.logprobs += e.logprobs
        reasoning, text, calls = "", e.text, []
        if c.think is not None:  # the reasoning comes off the text
            reasoning, text = c.think.feed(text)
            if e.finish_reason is not None:
                more, more_text = c.think.finish()
                reasoning, text = reasoning + more, text + more_text
            c.reasoning.append(reasoning)
        if c.parser is not None:  # tool calls come out of the rest
            text, calls = c.parser.feed(text)
            if e.finish_reason is not None:
                more, more_calls = c.parser.finish()
                text, calls = text + more, calls + more_calls
        c.text.append(text)
        if e.finish_reason is not None:
            c.finish_reason, c.stop_reason = e.finish_reason, e.stop_reason
            self.finished += 1
        if self.kind == "chat":
            if reasoning:
                out.append(self._stream_chunk(e.index, {"reasoning_content": reasoning}))
            if text or e.logprobs:
                out.append(self._stream_chunk(e.index, {"content": text}, self._chat_logprobs(e.logprobs)))
            for call in calls:
                out.append(self._stream_chunk(e.index, {"tool_calls": [{"index": len(c.calls), **call}]}))
                c.calls.append(call)
            if e.finish_reason is not None:
                if c.calls and c.finish_reason == "stop":
                    c.finish_reason = "tool_calls"
                out.append(self._stream_chunk(e.index, {}, finish_reason=c.finish_reason))
                out[-1]["choices"][0]["stop_reason"] = c.stop_reason  # (vLLM: on the last chunk only)
        elif e.text or e.logprobs or e.finish_reason is not None:
            lp = self._completion_logprobs(c, e.logprobs, [x.token for x in e.logprobs])
            out.append(self._stream_chunk(e.index, e.text, lp, e.finish_reason))
            out[-1]["choices"][0]["stop_reason"] = e.stop_reason  # (vLLM: on every chunk, null until the end)
        return out

    def _message(self, c: _Choice) -> dict:
        text = "".join(c.text)
        msg = {"role": "assistant", "content": text or (None if c.calls else ""), "refusal": None}
        if self.thinks:
            msg["reasoning_content"] = "".join(c.reasoning) or None
        if c.calls:
            msg["tool_calls"] = c.calls
        return msg

    def _prompt_ids(self, p: int) -> list[int]:
        return self.request.prompts[p] if p in self.prompt_logprobs else []

    # -- formatting --

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": _fingerprint()}

    def _stream_chunk(self, index: int, content, logprobs=None, finish_reason=None) -> dict:
        """A stream chunk of choice `index`; content: the chat delta (a dict) or the completion text."""
        chat = self.kind == "chat"
        d = self._head("chat.completion.chunk" if chat else "text_completion")
        d["choices"] = [{"index": index, "delta" if chat else "text": content, "logprobs": logprobs,
                         "finish_reason": finish_reason}]
        if self.include_usage:
            d["usage"] = None
        return d

    def _entry(self, t: int, lp: float) -> dict:
        s, b = self.served.token_str(t)
        return {"token": s, "logprob": lp, "bytes": b}

    def _chat_logprobs(self, entries: list[TokenLogprob]):
        if self.logprobs is None:
            return None
        return {"content": [{**self._entry(x.token, x.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in x.top]}
                            for x in entries], "refusal": None}

    def _completion_logprobs(self, c: _Choice, entries: list, ids: list[int]):
        """OpenAI's legacy logprobs object for tokens `ids` (entries: their TokenLogprob, None for the first
        prompt token); the top_logprobs dicts hold the sampled token too, as OpenAI's do."""
        if self.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, x in zip(ids, entries):
            s = self.served.token_str(t)[0]
            out["tokens"].append(s)
            out["text_offset"].append(c.offset)
            c.offset += len(s)
            if x is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(x.logprob)
                top = {self.served.token_str(u)[0]: lp for u, lp in x.top}
                top.setdefault(s, x.logprob)
                out["top_logprobs"].append(top)
        return out

    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        prompt = sum(len(p) for p in self.request.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        d = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        d["choices"], d["usage"] = [], self.usage()
        return d

    def response(self) -> dict:
        """The non-streamed body, once done."""
        if self.kind == "chat":
            d = self._head("chat.completion")
            d["choices"] = [{"index": i, "message": self._message(c), "logprobs": self._chat_logprobs(c.logprobs),
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                            for i, c in enumerate(self.choices)]
        else:
            d = self._head("text_completion")
            d["choices"] = []
            for i, c in enumerate(self.choices):
                p = i // self.request.n  # its prompt's logprobs are there with echo (and logprobs) only
                c.offset = 0
                entries = self.prompt_logprobs.get(p, []) + c.logprobs
                lp = self._completion_logprobs(c, entries, self._prompt_ids(p) + [x.token for x in c.logprobs])
                d["choices"].append({"index": i, "text": "".join(c.text), "logprobs": lp,
                                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        d["usage"] = self.usage()
        return d


def _fingerprint() -> str:
    from .. import __version__

    return f"fastllm-{__version__}"


# ---- parsing --------------------------------------------------------------------------------------------


def check_model(body: dict, served: ServedModel) -> Adapter | None:
    """The LoRA adapter that body's `model` names (None: the model itself); a 404 for an id not served here."""
    name = body.get("model")
    if name is None:
        raise APIError(400, "you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(name, str):
        raise _bad_type("model", "a string", name)
    if name == served.name:
        return None
    adapter = served.adapters.get(name) if served.adapters else None
    if adapter is None:
        ids = ", ".join(f"`{c['id']}`" for c in served.cards())
        raise APIError(404, f"The model `{name}` does not exist (this server serves {ids}).", "model",
                       "model_not_found")
    return adapter


def _lora(adapter: Adapter | None):
    return None if adapter is None else adapter.lora


def _sampling(body: dict, served: ServedModel) -> tuple[dict, bool, bool]:
    """(the engine Request fields common to both endpoints, stream, include_usage), checked."""
    temperature = _get(body, "temperature", "number", 1.0, 0, 2)
    top_p = _get(body, "top_p", "number", None, 0, 1)
    top_k = _get(body, "top_k", "integer", None, -1)
    if top_k is not None and top_k <= 0:  # -1 / 0: no top-k (vLLM's convention)
        top_k = None
    if top_p == 0:  # the limit of nucleus sampling: only the most likely token
        top_p, top_k = None, 1
    n = _get(body, "n", "integer", 1, 1, 128)
    if n > 1 and temperature < 1e-5:  # (vLLM's greedy threshold and message: vllm/sampling_params.py)
        raise APIError(400, f"n must be 1 when using greedy sampling, got {n}.", "n", "invalid_value")
    if n > served.max_batch:
        raise APIError(400, f"Invalid value for 'n': this server decodes at most {served.max_batch} sequences at "
                            f"once (--max-batch), got n={n}.", "n", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad_type("stop", "a string or an array of strings", stop)
    if len(stop) > 4:
        raise APIError(400, f"Invalid value for 'stop': at most 4 stop sequences, got {len(stop)}.", "stop",
                       "invalid_value")
    seed = _get(body, "seed", "integer")
    bias = _get(body, "logit_bias", "object")
    logit_bias = None
    if bias:
        logit_bias = {}
        for k, v in bias.items():
            try:
                t = int(k)
            except ValueError:
                raise APIError(400, f"Invalid key in 'logit_bias': {k!r} is not a token id.", "logit_bias",
                               "invalid_value") from None
            if not 0 <= t < served.vocab_size:
                raise APIError(400, f"Invalid key in 'logit_bias': token id {t} is outside [0, {served.vocab_size}).",
                               "logit_bias", "invalid_value")
            b = float(_get({f"logit_bias.{k}": v}, f"logit_bias.{k}", "number", 0.0))
            logit_bias[t] = min(100.0, max(-100.0, b))  # clamped, as vLLM's SamplingParams.from_optional does
    try:
        params = SamplingParams(
            temperature=float(temperature), top_k=top_k, top_p=None if top_p is None else float(top_p),
            min_p=_get(body, "min_p", "number", None, 0, 1),
            repetition_penalty=float(_get(body, "repetition_penalty", "number", 1.0, 0, lo_open=True)),
            presence_penalty=float(_get(body, "presence_penalty", "number", 0.0, -2, 2)),
            frequency_penalty=float(_get(body, "frequency_penalty", "number", 0.0, -2, 2)))
    except ValueError as e:  # checked above already; a backstop naming the field
        raise APIError(400, str(e), str(e).split()[0], "invalid_value") from None
    stream = _get(body, "stream", "boolean", False)
    options = _get(body, "stream_options", "object")
    if options is not None and not stream:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       "stream_options", "invalid_value")
    include_usage = bool(_get({"stream_options.include_usage": (options or {}).get("include_usage")},
                              "stream_options.include_usage", "boolean", False))
    # vLLM's: special tokens are left out of the text unless skip_special_tokens is false; its
    # spaces_between_special_tokens only changes the text of "slow" tokenizers (sentencepiece's): tokenizer.json
    # ("fast") ones, as all of fastllm's, ignore it
    skip = _get(body, "skip_special_tokens", "boolean", True)
    _get(body, "spaces_between_special_tokens", "boolean")
    common = dict(params=params, n=n, stop=stop, seed=None if seed is None else seed % 2**64, logit_bias=logit_bias,
                  skip_special_tokens=skip, **_vllm_stops(body, served))
    return common, stream, include_usage


def _vllm_stops(body: dict, served: ServedModel) -> dict:
    """vLLM's extra stop fields, checked (min_tokens against max_tokens: `_check_min_tokens`, once that is known)."""
    ids = _get(body, "stop_token_ids", "array", [])
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise _bad_type(f"stop_token_ids[{i}]", "an integer", t)
    _check_ids(ids, "stop_token_ids", "stop_token_ids", served)
    return dict(stop_token_ids=list(dict.fromkeys(ids)), ignore_eos=_get(body, "ignore_eos", "boolean", False),
                min_tokens=_get(body, "min_tokens", "integer", 0, 0),
                include_stop_str_in_output=_get(body, "include_stop_str_in_output", "boolean", False))


def _check_min_tokens(common: dict, max_tokens: int) -> None:
    if common["min_tokens"] > max_tokens:  # (vLLM's message; max_tokens as resolved: the rest of the context if unset)
        raise APIError(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got "
                            f"{common['min_tokens']}.", "min_tokens", "invalid_value")


def _max_tokens(body: dict, names: tuple[str, ...], lo: int = 1) -> tuple[int | None, str]:
    for name in names:
        v = _get(body, name, "integer", None, lo)
        if v is not None:
            return v, name
    return None, names[-1]


def _fit(served: ServedModel, n_prompt: int, max_tokens: int | None, default: int | None, what: str,
         name: str) -> int:
    """max_tokens for a prompt of n_prompt tokens (default: `default`, or the rest of the context), checked."""
    ctx = served.max_len
    if n_prompt >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in "
                            f"{n_prompt} tokens. Please reduce the length of the {what}.",
                       what, "context_length_exceeded")
    m = max_tokens if max_tokens is not None else (default or ctx - n_prompt)
    if n_prompt + m > ctx:
        given = "" if max_tokens is not None else " (the default)"
        raise APIError(400, f"'{name}' is too large: {m}{given}. This model's maximum context length is {ctx} tokens "
                            f"and your request has {n_prompt} input tokens, so at most {ctx - n_prompt} can be "
                            f"generated.", name, "context_length_exceeded")
    return m


def _messages(value) -> list[dict]:
    """OpenAI messages -> [{"role", "content"}] for the chat format (text parts joined), with an assistant's
    `tool_calls` (arguments parsed to dicts, as chat templates want them) and a tool result's `tool_call_id` and
    function `name`."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty array of messages.", "messages", "invalid_value")
    out, names = [], {}
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad_type(where, "an object", m)
        role = m.get("role")
        if role == "function" or m.get("function_call"):
            raise _unsupported(f"{where}.role", "'function' (deprecated function calling; use tools)")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"Invalid value for '{where}.role': {role!r} (expected 'system', 'developer', 'user', "
                                f"'assistant' or 'tool').", f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text") or \
                        not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                    raise _unsupported(f"{where}.content[{j}]", f"of type {kind!r} (only text parts)")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad_type(f"{where}.content", "a string or an array of text parts", content)
        msg = {"role": role, "content": content}
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):  # (templates that keep it use it)
            msg["reasoning_content"] = m["reasoning_content"]
        if role == "assistant" and m.get("tool_calls"):  # (an empty list: no calls)
            try:
                msg["tool_calls"] = parse_tool_calls(m["tool_calls"], f"{where}.tool_calls")
            except ToolError as e:
                raise APIError(400, str(e), e.param, e.code) from None
            names.update((c["id"], c["function"]["name"]) for c in msg["tool_calls"])
        if role == "tool":
            msg["tool_call_id"] = _get({f"{where}.tool_call_id": m.get("tool_call_id")}, f"{where}.tool_call_id",
                                       "string")
            if msg["tool_call_id"] is None:
                raise APIError(400, f"Missing required parameter: '{where}.tool_call_id'.", f"{where}.tool_call_id",
                               "missing_required_parameter")
            if msg["tool_call_id"] in names:
                msg["name"] = names[msg["tool_call_id"]]
        out.append(msg)
    return out


def _tools(body: dict) -> tuple[list[dict] | None, str | dict]:
    """(the request's tools, checked, as chat templates list them; tool_choice: "none" / "auto" / "required" or
    the name-only function object)."""
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise _unsupported(name, "(deprecated function calling; use 'tools' and 'tool_choice')")
    tools = body.get("tools")
    if tools is not None:
        try:
            check_tools(tools)
        except ToolError as e:
            raise APIError(400, str(e), e.param, e.code) from None
    names = [t["function"]["name"] for t in tools or []]
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                                '{"type": "function", "function": {"name": ...}}.', "tool_choice", "invalid_value")
        if name not in names:
            raise APIError(400, f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
                           "tool_choice", "invalid_value")
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in ("none", "auto", "required"):
        raise APIError(400, f"Invalid value for 'tool_choice': {choice!r} (expected 'none', 'auto', 'required' or a "
                            "function).", "tool_choice", "invalid_value")
    if choice == "required" and not tools:
        raise APIError(400, "'tool_choice' is 'required' but no 'tools' are given.", "tool_choice", "invalid_value")
    return tools, choice


def _forced_call(served: ServedModel, tools: list[dict], choice, parallel: bool, fmt: str):
    """The grammar (a Constraint) of a call that tool_choice forces: to any of `tools` ("required") or to the
    named one, once); APIError naming the tool whose parameters are not a schema this server can enforce."""
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    chosen = [(i, t) for i, t in enumerate(tools) if named in (None, t["function"]["name"])]
    guide, grammar = served.guide(), FORMATS[fmt].grammar
    try:
        return guide.lark(grammar([t for _, t in chosen], parallel and named is None))
    except ValueError:
        pass
    for i, t in chosen:  # find the culprit
        try:
            guide.lark(grammar([t], False))
        except ValueError as e:
            raise APIError(400, f"Invalid 'tools[{i}].function.parameters': not a JSON schema this server can "
                                f"enforce ({e}).", f"tools[{i}].function.parameters", "invalid_value") from None
    raise APIError(400, "The tools cannot be compiled into one grammar.", "tools", "invalid_value")


def _response_format(body: dict, served: ServedModel):
    """The Constraint of `response_format` (json_object: any JSON object; json_schema: its schema), or None."""
    fmt = _get(body, "response_format", "object")
    kind = fmt.get("type") if fmt else "text"
    if kind == "text":
        return None
    if kind == "json_object":
        schema, where = {"type": "object"}, "response_format"
    elif kind == "json_schema":
        js = _get({"response_format.json_schema": fmt.get("json_schema")}, "response_format.json_schema", "object")
        if js is None:
            raise APIError(400, "Missing required parameter: 'response_format.json_schema'.",
                           "response_format.json_schema", "missing_required_parameter")
        name = js.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise APIError(400, f"Invalid 'response_format.json_schema.name': {name!r}: expected 1 to 64 letters, "
                                "digits, underscores or dashes.", "response_format.json_schema.name", "invalid_value")
        where = "response_format.json_schema.schema"
        schema = js.get("schema")
        if schema is None:
            schema = {}
        elif not isinstance(schema, (dict, bool)):
            raise _bad_type(where, "an object", schema)
    else:
        raise APIError(400, f"Invalid value for 'response_format.type': {kind!r} (expected 'text', 'json_object' or "
                            "'json_schema').", "response_format.type", "invalid_value")
    try:
        return served.guide().json_schema(schema)
    except ValueError as e:
        raise APIError(400, f"Invalid '{where}': {e}", where, "invalid_value") from None


def parse_chat(body, served: ServedModel) -> Call:
    """A /v1/chat/completions body -> Call (APIError on bad input)."""
    _check_fields(body, CHAT_FIELDS)
    adapter = check_model(body, served)
    for name, what in _CHAT_UNSUPPORTED.items():
        if body.get(name) is not None:
            raise _unsupported(name, what)
    if "messages" not in body:
        raise APIError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    msgs = _messages(body["messages"])
    common, stream, include_usage = _sampling(body, served)
    logprobs = _get(body, "logprobs", "boolean", False)
    top = _get(body, "top_logprobs", "integer", None, 0, 20)
    if top is not None and not logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", "top_logprobs", "invalid_value")
    tools, choice = _tools(body)
    parallel = _get(body, "parallel_tool_calls", "boolean", True)
    modalities = _get(body, "modalities", "array")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", f"{modalities!r}")
    if served.chat is None:
        raise APIError(400, f"The model `{served.name}` has no chat template: none in its folder (or a --tokenizer "
                            "replaced the folder's), and its tokenizer lacks the <|im_start|> and <|im_end|> tokens "
                            "(a base model). Use /v1/completions, or fine-tune it with `fastllm sft`.", "messages",
                       "chat_template_missing")
    fmt = served.chat.tool_format
    if fmt is None and tools:  # (tool turns without tools: the template refuses them, a 400 naming 'messages')
        raise APIError(400, f"The chat template of `{served.name}` takes no tools (it never writes a tool call).",
                       "tools", "unsupported_parameter")
    if fmt not in FORMATS:  # a format fastllm renders but does not read (Mistral's [TOOL_CALLS])
        if tools:
            raise APIError(400, f"The chat template of `{served.name}` writes tool calls in the {fmt!r} format, "
                                "which this server does not read.", "tools", "unsupported_parameter")
        fmt = None
    constraint = _response_format(body, served)
    if choice not in ("none", "auto"):
        if constraint is not None:
            raise APIError(400, "'response_format' cannot be combined with a forced tool call ('tool_choice').",
                           "response_format", "invalid_value")
        constraint = _forced_call(served, tools, choice, parallel, fmt)
    ids = _chat_prompt(body, served, msgs, tools)
    max_tokens, name = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    m = _fit(served, len(ids), max_tokens, None, "messages", name)
    _check_min_tokens(common, m)
    if common["ignore_eos"] and constraint is not None:
        raise APIError(400, "'ignore_eos' cannot be combined with 'response_format' or a forced tool call: the answer "
                            "ends where its grammar ends.", "ignore_eos", "invalid_value")
    think = None
    if getattr(served.chat, "thinks", False) and constraint is None:  # (a grammar's text is all answer)
        think = served.tokenizer.decode(ids[-8:]).rstrip().endswith(THINK)  # the template opened <think> itself
    tool_format = None if choice == "none" else fmt
    # the tags the parsers read stay in the text where a tokenizer has them as special tokens (vLLM's hermes parser
    # turns skip_special_tokens off for the same reason; this drops the other special tokens still)
    keep = [TOOL_CALL, TOOL_CALL_END] if tool_format == "hermes" else []
    if think is not None:
        keep += [THINK, THINK_END]
    stops = list(served.chat.stop_tokens)
    req = Request(prompts=[ids], max_tokens=m, stop_tokens=stops, eos_token_id=served.eos_token_id(stops),
                  logprobs=(top or 0) if logprobs else None, constraint=constraint, keep_special=keep,
                  lora=_lora(adapter), **common)
    return Call("chat", served, req, stream, include_usage, tool_format=tool_format, think=think,
                model=body["model"])


def _chat_prompt(body: dict, served: ServedModel, msgs: list[dict], tools: list[dict] | None) -> list[int]:
    """The chat format's prompt ids, with the request's chat_template_kwargs (vLLM's field: variables for the
    checkpoint's template, as enable_thinking for Qwen3's; fastllm's ChatML takes none)."""
    options = _get(body, "chat_template_kwargs", "object")
    if options and not hasattr(served.chat, "variables"):
        raise APIError(400, f"The model `{served.name}` has no chat template to pass 'chat_template_kwargs' to "
                            "(fastllm's ChatML takes no options).", "chat_template_kwargs", "unsupported_parameter")
    taken = sorted({"messages", "tools", "documents", "add_generation_prompt"}.intersection(options or ()))
    if taken:
        raise APIError(400, f"Invalid 'chat_template_kwargs': {taken} are the request's own.",
                       "chat_template_kwargs", "invalid_value")
    try:
        return (served.chat.prompt(msgs, tools, options) if options else served.chat.prompt(msgs, tools)).tolist()
    except ValueError as e:
        raise APIError(400, f"Invalid 'messages': {e}", "messages", "invalid_value") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ids(ids: list[int], where: str, param: str, served: ServedModel) -> None:
    """APIError naming `where` for the first id outside the tokenizer's [0, vocab_size)."""
    bad = [t for t in ids if not 0 <= t < served.vocab_size]
    if bad:
        raise APIError(400, f"Invalid value for '{where}': token id {bad[0]} is outside [0, {served.vocab_size}).",
                       param, "invalid_value")


def _prompts(value, served: ServedModel) -> tuple[list[list[int]], list[str]]:
    """A completions `prompt` -> (token ids per prompt, text per prompt)."""
    tok = served.tokenizer
    if value is None:
        value = ""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "Invalid value for 'prompt': expected a string, an array of strings, an array of token ids "
                            "or an array of arrays of token ids.", "prompt", "invalid_value")
    ids, texts = [], []
    for i, p in enumerate(value):
        if isinstance(p, str):
            ids.append(tok.encode_prompt(p).tolist())
            if not ids[-1]:
                raise APIError(400, f"'prompt[{i}]' is empty and the tokenizer has neither a BOS token nor "
                                    "<|endoftext|> to start from.", "prompt", "invalid_value")
            texts.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            _check_ids(p, f"prompt[{i}]", "prompt", served)
            ids.append(list(p))
            texts.append(tok.decode(p))
        else:
            raise _bad_type(f"prompt[{i}]", "a string or a non-empty array of token ids", p)
    return ids, texts


def parse_completion(body, served: ServedModel) -> Call:
    """A /v1/completions body -> Call (APIError on bad input)."""
    _check_fields(body, COMPLETION_FIELDS)
    adapter = check_model(body, served)
    ids, texts = _prompts(body.get("prompt"), served)
    common, stream, include_usage = _sampling(body, served)
    echo = _get(body, "echo", "boolean", False)
    logprobs = _get(body, "logprobs", "integer", None, 0, 5)
    if _get(body, "suffix", "string"):
        raise _unsupported("suffix", "(insertion)")
    best_of = _get(body, "best_of", "integer", None, 1)
    if best_of is not None and best_of != common["n"]:
        raise _unsupported("best_of", f"={best_of} (other than n)")
    max_tokens, name = _max_tokens(body, ("max_tokens",), 0 if echo else 1)  # echo, 0: the prompt's logprobs only
    maxes = [_fit(served, len(p), max_tokens, 16, "prompt", name) for p in ids]
    _check_min_tokens(common, min(maxes))
    stops = list(served.stops)
    req = Request(prompts=ids, max_tokens=maxes, stop_tokens=stops, eos_token_id=served.eos_token_id(stops),
                  logprobs=logprobs, prompt_logprobs=echo and logprobs is not None, lora=_lora(adapter), **common)
    return Call("completion", served, req, stream, include_usage, texts if echo else None, model=body["model"])


# ---- vLLM's tokenizer endpoints -------------------------------------------------------------------------
# POST /tokenize, POST /detokenize and GET /tokenizer_info, with vLLM's fields: clients that evaluate or count
# tokens through a server use them. lm-evaluation-harness's `local-completions` looks for /tokenizer_info and
# /tokenize, then tokenizes through them and sends token ids, so `lm_eval --model local-completions --model_args
# base_url=http://HOST/v1/completions,model=NAME` scores log-likelihood tasks on `fastllm serve` with no tokenizer
# files on its side.

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs",
                   "tools", "chat_template_kwargs"}


def tokenize(body, served: ServedModel) -> dict:
    """/tokenize: {"prompt": text, "add_special_tokens": true} (the BOS first, as HF's tokenizer(text) does) or
    {"messages": [...], "add_generation_prompt": true} (the chat format's ids) -> {"count", "max_model_len",
    "tokens", "token_strs"}. Special tokens written in a prompt are matched (as HF's tokenizers do)."""
    _check_fields(body, TOKENIZE_FIELDS)
    if body.get("model") is not None:  # optional here, as in vLLM
        check_model(body, served)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise APIError(400, "Give exactly one of 'prompt' (a string) and 'messages' (a chat).",
                       "messages" if has_messages else "prompt", "invalid_value")
    if has_prompt:
        text = _get(body, "prompt", "string")
        tok = served.tokenizer
        special = _get(body, "add_special_tokens", "boolean", True)
        ids = (tok.encode_prompt(text) if special else tok.encode(text, allowed_special="all")).tolist()
    else:
        if served.chat is None:
            raise APIError(400, f"The model `{served.name}` has no chat template; tokenize a 'prompt' instead.",
                           "messages", "chat_template_missing")
        msgs, tools = _messages(body["messages"]), _get(body, "tools", "array")
        if not _get(body, "add_generation_prompt", "boolean", True):
            raise _unsupported("add_generation_prompt", "= false")
        ids = _chat_prompt(body, served, msgs, tools)
    strs = [served.token_str(t)[0] for t in ids] if _get(body, "return_token_strs", "boolean", False) else None
    return {"count": len(ids), "max_model_len": served.max_len, "tokens": ids, "token_strs": strs}


def detokenize(body, served: ServedModel) -> dict:
    """/detokenize: {"tokens": [ids]} -> {"prompt": text} (invalid UTF-8 as U+FFFD)."""
    _check_fields(body, {"model", "tokens"})
    if body.get("model") is not None:
        check_model(body, served)
    ids = _get(body, "tokens", "array")
    if ids is None:
        raise APIError(400, "Missing required parameter: 'tokens'.", "tokens", "missing_required_parameter")
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise _bad_type(f"tokens[{i}]", "an integer", t)
    _check_ids(ids, "tokens", "tokens", served)
    return {"prompt": served.tokenizer.decode(ids)}


def tokenizer_info(served: ServedModel) -> dict:
    """/tokenizer_info: the special tokens by name (tokenizer_config.json's where the folder has one, else the
    tokenizer's own: BOS, and the first EOS id), the context, and the chat template's Jinja2 source."""
    tok, names = served.tokenizer, dict(served.names)
    by_id = {i: s for s, i in tok.special_tokens.items()}
    if "bos_token" not in names and tok.bos_token is not None:
        names["bos_token"] = by_id[tok.bos_token]
    if "eos_token" not in names and served.stops and served.stops[0] in by_id:
        names["eos_token"] = by_id[served.stops[0]]
    template = None if served.chat is None else served.chat.template
    return {"tokenizer_class": "fastllm.Tokenizer", "model_max_length": served.max_len,
            "vocab_size": served.vocab_size, **{k: names.get(k) for k in ("bos_token", "eos_token", "pad_token",
                                                                            "unk_token")},
            "chat_template": template}



# ---- vLLM's LoRA adapter endpoints (adapters.py) -----------------------------------------------------------


def _runtime_lora(served: ServedModel) -> Adapters:
    if served.adapters is None or not served.adapters.runtime:
        raise APIError(404, "Loading and unloading LoRA adapters is off on this server: start it with "
                            "--allow-runtime-lora.", None, "runtime_lora_disabled")
    return served.adapters


def _lora_name(body: dict, also: set[str]) -> str:
    _check_fields(body, {"lora_name"} | also)
    name = _get(body, "lora_name", "string")
    if not name:
        raise APIError(400, "Missing required parameter: 'lora_name'.", "lora_name", "missing_required_parameter")
    return name


def load_lora_adapter(body, served: ServedModel) -> str:
    """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"} (with --allow-runtime-lora):
    serve the PEFT adapter folder lora_path as the model id lora_name (load_inplace: in place of one of that name);
    its answer, vLLM's text. A 400 naming the field for a name taken or a folder that is no adapter of this
    model (the message names the file and tensor)."""
    adapters = _runtime_lora(served)
    name = _lora_name(body, {"lora_path", "load_inplace"})
    path = _get(body, "lora_path", "string")
    if not path:
        raise APIError(400, "Missing required parameter: 'lora_path'.", "lora_path", "missing_required_parameter")
    try:
        adapters.load(name, path, replace=_get(body, "load_inplace", "boolean", False))
    except AdapterError as e:
        raise APIError(400, str(e), e.field, "invalid_value") from None
    return f"Success: LoRA adapter '{name}' added successfully."


def unload_lora_adapter(body, served: ServedModel) -> str:
    """vLLM's POST /v1/unload_lora_adapter {"lora_name"} (with --allow-runtime-lora): stop serving the adapter (404
    if it is not served); requests already running with it finish with it."""
    adapters = _runtime_lora(served)
    name = _lora_name(body, {"lora_int_id"})
    try:
        adapters.unload(name)
    except KeyError:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "model_not_found") from None
    return f"Success: LoRA adapter '{name}' removed successfully."
