"""`fastllm serve`: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

    fastllm serve --ckpt run/ [--port 8000] [--max-batch 16] [--api-key KEY]
    fastllm serve --ckpt base/ --lora-modules sql=sql_lora/ chat=chat_lora/    # multi-LoRA: model="sql", ...

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}])

Parts: engine.py (the scheduler thread: one model, one batched KV cache, requests joining and leaving at
step boundaries), api.py (OpenAI's request and response format, validation, errors), responses.py (the Responses
API over api.py's chat requests), adapters.py (LoRA adapters served beside the model, each a model id, as vLLM's
--lora-modules), app.py (Starlette routes, server-sent events, API key, disconnects),
static/chat.html (the page at /, no build step, works offline); tool calls and structured output come from
fastllm.tools (call formats) and fastllm.grammar (constrained decoding).
`serve(ServeConfig(...))` loads a checkpoint and runs it with uvicorn; `create_app(engine, name)` gives the
ASGI app to run under any ASGI server. Needs the `serve` extra: pip install "fastllm[serve]".
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from ..chat import ChatML, has_chatml
from ..options import THREADS, option
from ..sample import DECODE_DTYPES, check_decode_dtype, held_weights
from .adapters import AdapterError, Adapters, parse_lora_modules
from .engine import Chunk, Engine, EngineClosed, Failure, QueueFull, Request, TokenLogprob, kv_slot_bytes, load

INSTALL_HINT = 'fastllm serve needs the serve extra: pip install "fastllm[serve]"'


@dataclass
class ServeConfig:
    ckpt: str = option(help="checkpoint folder, or a training run folder (its newest checkpoint)")
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port (0: any free port, printed)")
    model_name: str | None = option(None, "the model id clients send (default: the checkpoint folder's name)")
    tokenizer: str | None = option(None, "tokenizer file (default: the copy inside the checkpoint)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on the API (default: $FASTLLM_API_KEY "
                                       "if set, else no key)")
    max_batch: int = option(16, "sequences decoded together, i.e. KV cache slots")
    max_len: int | None = option(None, "tokens per sequence, prompt + completion (default: the model's context)")
    kv_budget_mb: float | None = option(None, "cap on the KV cache's memory in MiB: fewer slots than --max-batch "
                                              "if needed (default: no cap)")
    max_queue: int = option(256, "requests that may wait for a slot; more get HTTP 429")
    device: str = option("cpu", "run the model on the CPU or a GPU", choices=("cpu", "cuda"))
    dtype: str | None = option(None, "CPU (default: float32): bfloat16 decodes with bf16 weight copies (faster, "
                                     "logits within ~1%), int8 with int8 ones (weight-only, a scale per output row), "
                                     "w8a8 with int8 weights and int8 activations (integer products); "
                                     "GPU (default: bfloat16): the model's compute dtype",
                               choices=DECODE_DTYPES)
    threads: int | None = option(None, THREADS)
    allow_origins: tuple[str, ...] = option((), "CORS: let web pages from ORIGIN call the API ('*': any)")
    lora_modules: tuple[str, ...] = option((), "LoRA adapters served beside the model, as vLLM's: NAME=PATH (a PEFT "
                                               "adapter folder: a fastllm LoRA checkpoint is one) or a JSON object "
                                               "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; a "
                                               "request whose model is NAME runs with that adapter (default: none)")
    max_loras: int = option(16, "most LoRA adapters loaded at once (each stays on the device; requests on any of "
                                "them share the decode passes)")
    max_lora_rank: int | None = option(None, "refuse LoRA adapters of a higher rank (default: any rank)")
    allow_runtime_lora: bool = option(False, "let POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and "
                                             "remove adapters (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    log_level: str = option("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))


def model_name(ckpt: str | os.PathLike) -> str:
    """The default model id: the checkpoint folder's name (run/ckpt_000600 -> "run/ckpt_000600")."""
    p = Path(ckpt).resolve()
    return f"{p.parent.name}/{p.name}" if p.name.startswith("ckpt_") else p.name


def slots_within(model, max_batch: int, max_len: int | None, kv_budget_mb: float | None) -> int:
    """max_batch, lowered so that the KV cache fits kv_budget_mb (ValueError if not even one slot fits)."""
    if kv_budget_mb is None:
        return max_batch
    max_len = max_len or model.config.block_size
    slot = kv_slot_bytes(model, max_len)
    n = min(max_batch, int(kv_budget_mb * 2**20 // slot))
    if n < 1:
        raise ValueError(f"--kv-budget-mb {kv_budget_mb} holds no sequence of {max_len} tokens "
                         f"(one needs {slot / 2**20:.1f} MiB); raise it or lower --max-len")
    return n


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (ValueError naming the address if that is impossible)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(cfg: ServeConfig, log=None) -> None:
    """Load cfg.ckpt and serve it until interrupted (Ctrl-C / SIGTERM stop it gracefully)."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    import fastllm

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_decode_dtype(cfg.dtype, cfg.device)
    lora_modules = parse_lora_modules(cfg.lora_modules)
    if cfg.threads:
        fastllm.set_num_threads(cfg.threads)
    model, tok = load(cfg.ckpt, cfg.tokenizer, weights=held_weights(cfg.dtype, cfg.device))
    weights = "float32"  # the CPU decodes with bf16 weight copies if asked; a GPU model computes in its dtype
    if cfg.device == "cuda":
        model.to("cuda", cfg.dtype or "bfloat16")
    elif cfg.device == "cpu":
        weights = cfg.dtype or "float32"
    else:
        raise ValueError(f"--device must be cpu or cuda, got {cfg.device!r}")
    slots = slots_within(model, cfg.max_batch, cfg.max_len, cfg.kv_budget_mb)
    engine = Engine(model, tok, slots, cfg.max_len, cfg.max_queue, weights, cfg.threads)
    name = cfg.model_name or model_name(cfg.ckpt)
    adapters = Adapters(model, name, cfg.max_loras, cfg.max_lora_rank, cfg.allow_runtime_lora)
    for lora_name, path, parent in lora_modules:
        try:
            adapters.load(lora_name, path, parent)
        except AdapterError as e:
            raise ValueError(f"--lora-modules {lora_name}={path}: {e}") from None
    api_key = cfg.api_key or os.environ.get("FASTLLM_API_KEY") or None
    # the checkpoint's own chat template (or ChatML); with another tokenizer, ChatML if it has the tokens
    fmt = "auto" if cfg.tokenizer is None else ChatML(tok) if has_chatml(tok) else None
    app = create_app(engine, name, api_key, tuple(cfg.allow_origins), fmt, adapters)
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    chat = app.state.served.chat
    log(f"fastllm serve: {name} ({model.num_parameters / 1e6:.2f}M parameters, {cfg.device} {model.dtype}"
        f"{f' with {weights} decode weights' if weights != 'float32' else ''}, "
        f"{f'chat: {chat.name}' if chat else 'no chat template: /v1/completions only'}), context {engine.max_len} "
        f"tokens, {slots} slots, KV cache {engine.kv_bytes / 2**20:.1f} MiB, "
        f"{engine.threads} threads{', API key required' if api_key else ''}")
    if lora_modules or cfg.allow_runtime_lora:
        names = ", ".join(a.name for a in adapters.all()) or "none yet"
        log(f"fastllm serve: LoRA adapters: {names} (at most {cfg.max_loras}"
            f"{', loaded and unloaded at /v1/load_lora_adapter' if cfg.allow_runtime_lora else ''})")
    log(f"fastllm serve: listening on {url} (chat page {url}/, API {url}/v1)")
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.stop()


__all__ = ["ServeConfig", "serve", "Engine", "Request", "Chunk", "Failure", "TokenLogprob", "QueueFull",
           "EngineClosed", "load", "model_name", "slots_within", "INSTALL_HINT", "Adapters", "parse_lora_modules"]
