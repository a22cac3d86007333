"""The OpenAI-compatible HTTP frontend: `create_app(backend)` -> a FastAPI app.

Routes: POST /v1/chat/completions, POST /v1/completions (streaming SSE or not), GET /v1/models,
/health (200 when every served model has a live worker, else 503), /live (always 200), /metrics
(Prometheus), /openapi.json. The frontend owns tokenization and detokenization; the backend only
sees token ids (`tandem.router.interface.Backend`).

A request's path: parse (msgspec) -> resolve the model -> `backend.announce` (if it has one: a router
that picks before tokenization) -> chat template / tokenize -> validate and clamp sampling ->
`backend.generate` -> `GenerationResponse` (detokenize, stop strings, SSE).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tandem import env
from tandem.frontend.errors import FieldError, error_response, install_error_handlers
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.preprocess import TokenizerCache, chat_prompt_ids, completion_prompt_ids, prepare
from tandem.frontend.streaming import Generation, GenerationResponse
from tandem.frontend.timing import TIMING, RequestTiming
from tandem.protocol.errors import (
    ModelNotFoundError,
    OverloadedError,
    RequestCancelledError,
    RequestTooLargeError,
    TandemError,
)
from tandem.protocol.messages import GenerateRequest
from tandem.protocol.openai import (
    SCHEMAS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelList,
    ModelObject,
)
from tandem.router.interface import Backend, ModelCard

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
_REF = "#/components/schemas/{name}"


class _Frontend:
    """Per-app state: the backend, tokenizers, metrics. Routes are thin wrappers over `generate`."""

    def __init__(self, backend: Backend, served_model_name: str | None, max_request_bytes: int) -> None:
        self.backend = backend
        self.alias = served_model_name
        self.max_request_bytes = max_request_bytes
        self.tokenizers = TokenizerCache()
        self.metrics = FrontendMetrics()
        self._lag_task: asyncio.Task[None] | None = None
        # Optional: a router that picks workers before tokenization (`RouterBackend.announce`).
        self._announce: Callable[[str, str], None] | None = getattr(backend, "announce", None)
        self._withdraw: Callable[[str], None] | None = getattr(backend, "withdraw", None)

    def watch_loop(self) -> None:
        """Start sampling the event loop's lag into /metrics (call once, on the serving loop)."""
        if self._lag_task is None:
            self._lag_task = asyncio.create_task(self.metrics.watch_loop_lag(), name="loop-lag")

    async def warm_up(self) -> None:
        """Load every served model's tokenizer and chat template now, so the first request does not
        pay for the load and transformers' lazy imports (~1-2 s). A model whose files fail to load
        is logged here and reported by its requests, as before."""
        for card in self.backend.models():
            try:
                tok = await self.tokenizers.get(card.model_dir)
                tok.encode("warm up", add_special_tokens=True)
                tok.token_text(0)
                if tok.has_chat_template:
                    tok.render_chat([ChatMessage(role="user", content="warm up")])
            except Exception as e:  # the request path answers with the same error, shaped for OpenAI
                log.warning("could not warm up model %s: %s", card.name, e)

    def resolve(self, name: str) -> ModelCard:
        cards = self.backend.models()
        for card in cards:
            if card.name == name:
                return card
        if self.alias is not None and name == self.alias and len(cards) == 1:
            return cards[0]
        known = ", ".join(self.public_name(c) for c in cards) or "none"
        raise ModelNotFoundError(f"the model {name!r} does not exist (served: {known})")

    def public_name(self, card: ModelCard) -> str:
        if self.alias is not None and len(self.backend.models()) == 1:
            return self.alias
        return card.name

    async def generate(self, scope: Scope, receive: Receive, chat: bool) -> Response:
        started = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        # 128 random bits as 32 hex digits, like `uuid4().hex` at a ninth of the cost (~0.9 us).
        response_id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(16).hex()
        announced = False
        try:
            body = await read_body(scope, receive, self.max_request_bytes)
            req = _decode(body, chat)
            card = self.resolve(req.model)
            if self._announce is not None:
                self._announce(card.name, response_id)
                announced = True
            tok = await self.tokenizers.get(card.model_dir)
            if isinstance(req, ChatCompletionRequest):
                prompt_ids = await chat_prompt_ids(tok, req, self.metrics.active == 0)
            else:
                prompt_ids = await completion_prompt_ids(tok, req, self.metrics.active == 0)
            prepared = prepare(req, prompt_ids, card.max_model_len)
            if not self.backend.is_ready(card.name):
                raise OverloadedError(f"no live worker serves the model {card.name!r}; retry shortly")
            outputs = self.backend.generate(
                GenerateRequest(
                    request_id=response_id,
                    model=card.name,
                    prompt_token_ids=prepared.prompt_ids,
                    sampling=prepared.sampling,
                )
            )
        except BaseException as e:
            if announced and self._withdraw is not None:
                self._withdraw(response_id)
            if not isinstance(e, TandemError):
                raise
            self.metrics.count_request(endpoint, e.http_status)
            return error_response(e)
        release = partial(self._withdraw, response_id) if announced and self._withdraw else None
        return GenerationResponse(
            Generation(
                chat=chat,
                endpoint=endpoint,
                response_id=response_id,
                created=int(time.time()),
                model=req.model,
                prepared=prepared,
                tok=tok,
                outputs=outputs,
                stream=req.stream,
                include_usage=req.stream_options is not None and req.stream_options.include_usage,
                metrics=self.metrics,
                started=started,
                release=release,
                timing=RequestTiming(started) if _wants_timing(req) else None,
            )
        )

    def health(self) -> Response:
        cards = self.backend.models()
        ready = {self.public_name(c): self.backend.is_ready(c.name) for c in cards}
        ok = bool(ready) and all(ready.values())
        body = {"status": "healthy" if ok else "unhealthy", "models": ready}
        return Response(_encode(body), status_code=200 if ok else 503, media_type="application/json")

    def models(self) -> Response:
        data = [
            ModelObject(id=self.public_name(c), created=c.created, max_model_len=c.max_model_len)
            for c in self.backend.models()
        ]
        return Response(_encode(ModelList(data)), media_type="application/json")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request's body, refused past `limit` bytes before it is buffered: by its Content-Length
    before anything is read, else as a chunked upload's pieces add up. A client that leaves before
    the body is whole gets a 499 (nobody reads it), not a crash report.

    Why not Starlette's `Request.body()`: it reads any size, and the `Request` around it is a cost
    on every request of the hot path (`_App`)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise _too_large(limit)
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestCancelledError("the client closed the connection before it sent the whole request")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"the request body is larger than the {limit} bytes this server reads (TANDEM_MAX_REQUEST_BYTES)"
    )


def _wants_timing(req: ChatCompletionRequest | CompletionRequest) -> bool:
    fields = req.nvext.extra_fields if req.nvext is not None else None
    return fields is not None and TIMING in fields


def _decode(body: bytes, chat: bool) -> ChatCompletionRequest | CompletionRequest:
    try:
        return _CHAT_DECODER.decode(body) if chat else _COMPLETION_DECODER.decode(body)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.max_tokens`".
        # or "Object missing required field `messages`"; either names the parameter.
        msg = str(e)
        param = msg.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in msg else None
        if "missing required field `" in msg:
            field = msg.split("missing required field `", 1)[1].split("`", 1)[0]
            param = f"{param}.{field}" if param else field
        raise FieldError(f"invalid request: {msg}", param) from e
    except msgspec.DecodeError as e:
        raise FieldError(f"the request body is not valid JSON: {e}") from e


def _body_doc(schema: str, stream: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(name=schema)}}}
    if stream:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "SSE chunks, then [DONE]"}
        }
    return content


_HOT_ROUTES = {"/v1/chat/completions": True, "/v1/completions": False}
"""POST path -> chat?: the generation routes that `_App` serves without FastAPI's request layers."""


class _App(FastAPI):
    """FastAPI, except that POSTs to the generation routes go straight to `_Frontend.generate`.

    Why: under load FastAPI's layers (middleware chain, route matching, dependency solving, which
    parses cookies, exception wrappers) cost about as much frontend CPU per request as the chat
    template and tokenization together. `generate` already maps every user error to its response;
    only a crash needs the 500 that FastAPI's handler would give. Everything else (other routes,
    other methods, OpenAPI) is plain FastAPI, and the routes stay registered for the schema.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chat = _HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if chat is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        fe: _Frontend = self.state.frontend
        try:
            response = await fe.generate(scope, receive, chat)
        except Exception as e:
            log.exception("unhandled error in the frontend", exc_info=e)
            response = error_response(TandemError(f"internal error: {type(e).__name__}"))
        await response(scope, receive, send)


def create_app(
    backend: Backend,
    *,
    served_model_name: str | None = None,
    title: str = "Tandem",
    max_request_bytes: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible app over `backend`.

    `served_model_name`: when the backend serves exactly one model, also (and in listings only)
    call it this name. `max_request_bytes`: the largest request body read (default
    `TANDEM_MAX_REQUEST_BYTES`, 32 MiB); a larger one gets a 413. Each app has its own metrics
    registry, so tests may build many apps.
    """
    limit = env.max_request_bytes() if max_request_bytes is None else max_request_bytes
    fe = _Frontend(backend, served_model_name, limit)
    app = _App(title=title, version="0.1.0")
    app.state.frontend = fe
    install_error_handlers(app)

    def request_doc(schema: str, response: str) -> dict[str, Any]:
        return {
            "requestBody": {"required": True, "content": _body_doc(schema, False)},
            "responses": {
                "200": {"description": "The completion", "content": _body_doc(response, True)},
                "400": {"description": "Invalid request", "content": _body_doc("ErrorResponse", False)},
                "404": {"description": "Unknown model", "content": _body_doc("ErrorResponse", False)},
                "503": {"description": "No live worker", "content": _body_doc("ErrorResponse", False)},
            },
        }

    @app.post(
        "/v1/chat/completions",
        openapi_extra=request_doc("ChatCompletionRequest", "ChatCompletionResponse"),
        summary="Create a chat completion",
    )
    async def chat_completions(request: Request) -> Response:
        return await fe.generate(request.scope, request.receive, chat=True)

    @app.post(
        "/v1/completions",
        openapi_extra=request_doc("CompletionRequest", "CompletionResponse"),
        summary="Create a completion",
    )
    async def completions(request: Request) -> Response:
        return await fe.generate(request.scope, request.receive, chat=False)

    @app.get("/v1/models", summary="List served models")
    async def list_models() -> Response:
        return fe.models()

    @app.get("/health", summary="200 when every served model has a live worker")
    async def health() -> Response:
        return fe.health()

    @app.get("/live", summary="200 while the process runs")
    async def live() -> Response:
        return Response(b'{"status":"live"}', media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics (`?scope=process`: this frontend process's only)")
    async def metrics(request: Request) -> Response:
        process_only = request.query_params.get("scope") == "process"
        return Response(await fe.metrics.render(process_only), media_type=CONTENT_TYPE_LATEST)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            _, components = msgspec.json.schema_components(SCHEMAS, ref_template=_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
