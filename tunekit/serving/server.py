"""`tunekit serve`: an OpenAI-compatible HTTP API for a causal-LM run (or any model id/folder).

`GET /v1/models`, `POST /v1/chat/completions` (the run's chat template) and `POST /v1/completions`
(raw text), streamed as server-sent events on request. The HTTP layer is FastAPI on uvicorn; the
model belongs to one worker thread (tunekit/serving/batching.py) that decodes concurrent requests as one
batch; tunekit/serving/openai_format.py holds the wire format. Errors are OpenAI's JSON and never stop the
server. Prompts are not logged unless `log_prompts` is set."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunekit.errors import UserError
from tunekit.jsontypes import JsonObject
from tunekit.serving.batching import BatchDecoder
from tunekit.serving.guard import Guard
from tunekit.serving.openai_format import (
    ApiError,
    ChatRequest,
    Common,
    CompletionRequest,
    ServeOptions,
    answer,
    chat_prompt,
    error_body,
)

log = logging.getLogger("tunekit.serving.server")

# The body cap: 1 MiB, or more for a long context. A prompt that fills the context takes about 4
# bytes a token as text, up to ~12 as JSON-escaped non-Latin text; 16 leaves room for the rest.
BODY_BYTES_PER_TOKEN = 16


# ---------------------------------------------------------------------------------------------
# The app


def create_app(engine: BatchDecoder, options: ServeOptions) -> Any:
    """The FastAPI app over a started engine; every route needs the API key when one is set (checked
    by tunekit.serving.guard before the body is read, which is capped at options.max_body bytes)."""
    app = FastAPI(title="tunekit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=options.api_key, max_body=options.max_body)
    app.state.options = options

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error"), 400)
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg')}" if param else f"the body: {first.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)

    def check(body: Common) -> None:
        if body.model != options.model_id:
            raise ApiError(404, f"model {body.model!r} does not exist; this server has {options.model_id!r}",
                           param="model", code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise ApiError(400, f"{bad} is not supported by tunekit serve; leave it out", param=bad)

    def fits(prompts: int, n: int) -> None:
        if prompts * n > engine.max_batch:
            raise ApiError(400, f"{prompts} prompt(s) x n={n} choices exceed the batch of {engine.max_batch}", param="n")

    async def reply(body: Common, prompts: list[list[int]], request: Request) -> Any:
        fits(len(prompts), body.n)
        shown = f", {json.dumps(body.model_dump(include={'messages', 'prompt'}))}" if options.log_prompts else ""
        log.info("%s: %s prompt tokens, n=%d%s", request.url.path, "+".join(str(len(p)) for p in prompts), body.n, shown)
        return await answer(request, engine, options, body, prompts)

    @app.get("/v1/models")
    async def models() -> JsonObject:
        return {"object": "list", "data": [{"id": options.model_id, "object": "model", "created": 0, "owned_by": "tunekit"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        check(body)
        return await reply(body, [chat_prompt(engine.tokenizer, body)], request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        fits(len(texts), body.n)  # before tokenising them all
        return await reply(body, [engine.tokenizer(t)["input_ids"] for t in texts], request)

    return app


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes: its position limit, else the tokenizer's."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else 2048


def build(target: str, api_key: str | None = None, model_id: str | None = None, max_batch: int = 64,
          wait_ms: float = 10.0, log_prompts: bool = False) -> tuple[Any, BatchDecoder]:
    """Load the model of `target` (run folder, model id/folder) and return the app and its started engine."""
    from pathlib import Path

    import torch

    from tunekit.generation import load_chat_model, settings_with

    model, tokenizer, settings = load_chat_model(target, "serve")
    if torch.cuda.is_available() and model.device.type == "cpu" and not getattr(model, "is_quantized", False):
        model.to("cuda")
    context = context_length(model, tokenizer)
    defaults = settings_with(settings).model_dump(include=set(settings))  # the run's own settings only
    options = ServeOptions(
        model_id=model_id or Path(target.rstrip("/")).name, context_length=context,
        api_key=api_key, log_prompts=log_prompts, max_body=max(1 << 20, BODY_BYTES_PER_TOKEN * context),
        **{k: defaults[k] for k in ("temperature", "top_p") if k in defaults},
        **({"max_tokens": defaults["max_new_tokens"]} if "max_new_tokens" in defaults else {}),
    )
    engine = BatchDecoder(model, tokenizer, max_batch=max_batch, wait_s=wait_ms / 1000).start()
    return create_app(engine, options), engine


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another port") from None
    sock.listen(2048)  # clients that connect while the model loads wait in the backlog
    return sock


def serve(target: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_id: str | None = None, max_batch: int = 64, wait_ms: float = 10.0, log_prompts: bool = False) -> None:
    """Serve until Ctrl-C. The address is printed on stderr once the server listens."""
    import uvicorn

    sock = bind(host, port)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who reaches this port can use the model", host)
    app, engine = build(target, api_key, model_id, max_batch, wait_ms, log_prompts)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    address = sock.getsockname()
    shown = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    print(f"tunekit serve: http://{shown}:{address[1]}/v1 (model {app.state.options.model_id!r})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    if server.should_exit:  # stopped by Ctrl-C or SIGTERM: uvicorn raises the signal again after its
        raise KeyboardInterrupt  # shutdown, but asyncio's own SIGINT handler can let the run end normally


@contextlib.contextmanager
def background(target: str, **options: Any) -> Iterator[tuple[str, BatchDecoder]]:
    """A server in a thread on a free loopback port, for tests, benchmarks and notebooks:
    yields (base URL, engine) and shuts both down on exit."""
    import threading

    import uvicorn

    sock = bind("127.0.0.1", 0)
    app, engine = build(target, **options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
        sock.close()
