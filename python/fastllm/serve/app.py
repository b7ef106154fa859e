"""The HTTP side of `fastllm serve`: a Starlette app run by uvicorn.

Why Starlette + uvicorn and not FastAPI: every response here must be OpenAI's wire format -- its error JSON
for every bad request (a field-by-field check that names the field, api.py), server-sent events written
chunk by chunk, a disconnect noticed while a request waits -- so FastAPI's additions (pydantic models with
its own 422 error format, OpenAPI pages) would be overridden rather than used. Starlette is the ASGI toolkit
FastAPI itself is built on (routing, streaming responses, CORS) and uvicorn the server both use; together
they add two small pure-Python packages (plus anyio, h11) and no pydantic.

Routes: GET / (the chat page, static/chat.html), GET /health, GET /v1/models[/{id}], POST /v1/chat/completions,
POST /v1/completions, POST /v1/responses (OpenAI's Responses API, responses.py), and vLLM's POST /tokenize, POST
/detokenize, GET /tokenizer_info (api.py), POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter (with
--allow-runtime-lora: adapters.py), all also without (or with) the /v1 prefix.
With an api_key, everything except /health and the page itself (a static file; its API calls carry the key) needs
`Authorization: Bearer <key>`.

The engine runs in its own thread; handlers only validate, submit and relay events (the engine's `emit`
puts them on the request's asyncio queue with call_soon_threadsafe), so the event loop never waits on the
model. A client that disconnects -- mid-stream or while waiting for a non-streamed answer -- cancels its
request, which frees its slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat import chat_format
from . import api
from .adapters import Adapters
from .api import APIError, Call, ServedModel
from .engine import Engine, EngineClosed, QueueFull
from .responses import ResponseCall, parse_response

MAX_BODY = 32 << 20  # bytes of a request body


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.payload(), status_code=e.status, headers=headers)


async def _read_json(request: HTTPRequest):
    too_large = APIError(413, f"The request body is larger than {MAX_BODY >> 20} MiB.", None, "body_too_large")
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = "it is empty" if not body.strip() else str(e)
        raise APIError(400, f"We could not parse the JSON body of your request ({why}). The API expects a JSON "
                            "object (Content-Type: application/json).", None, "invalid_json") from None


class _EventStream(StreamingResponse):
    """A StreamingResponse that calls on_close() however it ends: finished, failed, or cancelled because the
    client went away (even before the first event was produced)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _ServerErrors:
    """Answers an unhandled exception with the 500 `handler(request, e)` makes, then re-raises it (the server logs
    it). Placed inside the CORS middleware, so that a browser page can read that error too: Starlette's own
    handler for exceptions (ServerErrorMiddleware) sits outside every middleware, and its 500 had no
    Access-Control-Allow-Origin."""

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if not started:  # (once the answer has begun, nothing can replace it)
                await (await self.handler(HTTPRequest(scope), e))(scope, receive, send)
            raise


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone away (after the body was read, receive() only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, name: str, api_key: str | None = None, allow_origins: tuple[str, ...] = (),
               chat="auto", adapters: Adapters | None = None) -> Starlette:
    """The ASGI app serving `engine`'s model as `name`; it starts the engine on startup, stops it on shutdown.
    chat: the chat format of /v1/chat/completions (None: none); "auto": the model folder's own template, else
    ChatML where the tokenizer has its tokens (fastllm.chat.chat_format). adapters: LoRA adapters served beside
    the model, each as its own model id (adapters.py)."""
    folder = getattr(engine.model, "checkpoint_dir", None)
    if chat == "auto":
        chat = chat_format(folder, engine.tokenizer)
    # token ids in requests (prompts, logit_bias): the tokenizer's, not a padded vocabulary's extra rows
    served = ServedModel(name, engine.tokenizer, engine.max_len, engine.max_batch, engine.tokenizer.n_vocab, chat,
                         folder, adapters)
    page = resources.files("fastllm.serve").joinpath("static", "chat.html").read_bytes()

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            why = "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer <key>'."
            raise APIError(401, why, None, "invalid_api_key")

    async def chat_page(request: HTTPRequest) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def health(request: HTTPRequest) -> JSONResponse:
        up = engine.running
        return JSONResponse({"status": "ok" if up else "unavailable", "model": name, **engine.stats()},
                            status_code=200 if up else 503)

    async def models(request: HTTPRequest) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": served.cards()})

    async def model(request: HTTPRequest) -> JSONResponse:
        authorize(request)
        adapter = api.check_model({"model": request.path_params["model"]}, served)
        return JSONResponse(served.card() if adapter is None else adapter.card(served.max_len))

    def tokenizer_route(fn):  # /tokenize, /detokenize: fn(body, served) -> JSON, off the event loop
        async def handler(request: HTTPRequest) -> JSONResponse:
            authorize(request)
            body = await _read_json(request)
            return JSONResponse(await asyncio.to_thread(fn, body, served))
        return handler

    def lora_route(fn):  # /v1/load_lora_adapter, /v1/unload_lora_adapter: fn(body, served) -> text, off the loop
        async def handler(request: HTTPRequest) -> PlainTextResponse:
            authorize(request)
            body = await _read_json(request)
            return PlainTextResponse(await asyncio.to_thread(fn, body, served))
        return handler

    async def tokenizer_info(request: HTTPRequest) -> JSONResponse:
        authorize(request)
        return JSONResponse(api.tokenizer_info(served))

    async def chat(request: HTTPRequest) -> Response:
        return await run(request, api.parse_chat)

    async def completions(request: HTTPRequest) -> Response:
        return await run(request, api.parse_completion)

    async def responses(request: HTTPRequest) -> Response:
        return await run(request, parse_response)

    async def run(request: HTTPRequest, parse) -> Response:
        authorize(request)
        body = await _read_json(request)
        # off the event loop: rendering a template and compiling a grammar (response_format, forced tool calls)
        # may take milliseconds
        call = await asyncio.to_thread(parse, body, served)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        call.request.emit = lambda events: loop.call_soon_threadsafe(q.put_nowait, events)
        try:
            engine.submit(call.request)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry later.", None, "queue_full") from None
        except EngineClosed as e:
            raise APIError(503, f"The server cannot take requests now ({e}).", None, "unavailable") from None
        except ValueError as e:  # api.py checks everything the engine does; a backstop
            raise APIError(400, str(e), None, "invalid_value") from None
        if call.stream:
            return _EventStream(events(call, q), lambda: call.done or engine.cancel(call.request))
        return await collect(request, call, q)

    async def events(call: Call | ResponseCall, q: asyncio.Queue):
        """Server-sent events as OpenAI sends them: chunks ending with `data: [DONE]` (or an error event); the
        Responses API's typed events (`event:` lines too) ending with response.completed / incomplete / failed."""
        while not call.done:
            chunks = call.feed(await q.get())
            if chunks:
                yield "".join(("event: " + c["type"] + "\n" if "type" in c else "") + f"data: {_dumps(c)}\n\n"
                              for c in chunks)
        if isinstance(call, ResponseCall):
            return
        if call.error is not None:
            yield f"data: {_dumps(APIError(500, call.error, None, 'engine_error').payload())}\n\n"
            return
        if call.include_usage:
            yield f"data: {_dumps(call.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"

    async def collect(request: HTTPRequest, call: Call, q: asyncio.Queue) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not call.done:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client disconnected: nobody will read the answer
                    get.cancel()
                    return Response(status_code=499)
                call.feed(get.result())
        finally:
            gone.cancel()
            if not call.done:
                engine.cancel(call.request)
        if call.error is not None:
            raise APIError(500, call.error, None, "engine_error")
        return JSONResponse(call.response())

    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return _error(e)

    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        what = {404: f"Unknown URL: {request.method} {request.url.path}",
                405: f"Method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        return _error(APIError(e.status_code, what, None, {404: "unknown_url", 405: "method_not_allowed"}.get(
            e.status_code)))

    async def server_error(request: HTTPRequest, e: Exception) -> JSONResponse:
        return _error(APIError(500, f"Internal server error: {type(e).__name__}: {e}", None, "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    routes = [Route("/", chat_page, methods=["GET"]), Route("/health", health, methods=["GET"])]
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/models", models, methods=["GET"]),
                   Route(f"{prefix}/models/{{model:path}}", model, methods=["GET"]),
                   Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
                   Route(f"{prefix}/completions", completions, methods=["POST"]),
                   Route(f"{prefix}/responses", responses, methods=["POST"]),
                   Route(f"{prefix}/tokenize", tokenizer_route(api.tokenize), methods=["POST"]),
                   Route(f"{prefix}/detokenize", tokenizer_route(api.detokenize), methods=["POST"]),
                   Route(f"{prefix}/tokenizer_info", tokenizer_info, methods=["GET"]),
                   Route(f"{prefix}/load_lora_adapter", lora_route(api.load_lora_adapter), methods=["POST"]),
                   Route(f"{prefix}/unload_lora_adapter", lora_route(api.unload_lora_adapter), methods=["POST"])]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["*"],
                             allow_headers=["*"])] if allow_origins else []
    middleware.append(Middleware(_ServerErrors, handler=server_error))  # (inside CORS: its headers on a 500 too)
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error})
    app.state.served, app.state.engine = served, engine
    return app
