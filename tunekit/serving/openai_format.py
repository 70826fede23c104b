"""OpenAI's wire format for `tunekit serve`: request bodies, errors, and the JSON of whole
responses and of streamed chunks; `answer` turns one request into batching jobs and back.
Field names and shapes follow OpenAI's chat and completions APIs, so the official clients work."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunekit.jsontypes import JsonObject
from tunekit.serving.batching import BatchDecoder, Event, Job, Sampling

log = logging.getLogger("tunekit.serving.server")


@dataclass(frozen=True)
class ServeOptions:
    """What a server answers with: the model's name, defaults from the run's `generation:`
    section, the model's context length, and who may ask."""

    model_id: str
    context_length: int
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    api_key: str | None = None
    log_prompts: bool = False
    max_body: int = 1 << 20  # bytes of a request body (tunekit.serving.guard)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault
        self.code = code  # OpenAI's machine-readable reason, e.g. context_length_exceeded
        self.kind = kind  # OpenAI's error "type"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> JsonObject:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Request bodies (OpenAI's field names; fields that change the output but that tunekit does not
# implement are refused rather than silently ignored)

# Bounds of the fields that cost work in every step of a row's batch: each stop sequence is
# searched for, and its prefixes held back, after every token of the row. OpenAI takes 4 stops.
MAX_STOPS = 4
MAX_STOP_CHARS = 128
# torch seeds a generator with a 64-bit number; a choice i of a request is seeded with seed + i.
SEEDS = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit signed integer

UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "function_call", "response_format",
               "logit_bias", "presence_penalty", "frequency_penalty", "echo", "suffix", "best_of")


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send `user`, `metadata`, ...: harmless

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def unsupported(self) -> str | None:
        """The first field set that tunekit would otherwise ignore (its neutral value is fine)."""
        extra = self.model_extra or {}
        for key in UNSUPPORTED:
            value = extra.get(key)
            if value not in (None, False, 0, [], {}) and not (key == "best_of" and value == 1):
                return key
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Common):
    prompt: str | list[str] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------
# From a request to jobs and back to OpenAI's JSON


def sampling_of(body: Common, prompt_tokens: int, options: ServeOptions) -> Sampling:
    """The request's settings over the run's defaults; a prompt that leaves no room is refused."""
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt is empty; give some text", param="prompt")
    room = options.context_length - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"this model's context is {options.context_length} tokens; the prompt has {prompt_tokens}"
                       + (f" and max_tokens asks for {asked} more" if asked else "") + "; shorten it",
                       param="messages" if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences of at most {MAX_STOP_CHARS} characters each",
                       param="stop")
    if body.seed is not None and not SEEDS[0] <= body.seed <= SEEDS[1]:
        raise ApiError(400, f"seed: {body.seed} is not a 64-bit signed integer ({SEEDS[0]} to {SEEDS[1]})",
                       param="seed")
    return Sampling(
        max_tokens=min(asked or options.max_tokens, room),
        temperature=options.temperature if body.temperature is None else body.temperature,
        top_p=options.top_p if body.top_p is None else body.top_p,
        stop=tuple(s for s in stop if s), seed=body.seed,
    )


def chat_prompt(tokenizer: Any, body: ChatRequest) -> list[int]:
    """The conversation through the run's chat template, tokenised as `tunekit generate` does."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages], tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as err:
        raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Reply:
    """Collects one request's events: text and end of every choice, and the token counts."""

    def __init__(self, choices: int, prompt_tokens: int) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.texts = [""] * choices
        self.finish: list[str | None] = [None] * choices
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.open = choices

    def emit(self, event: Event) -> None:  # called from the worker thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self) -> Event:
        event = await self.queue.get()
        if event.error:
            raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
        self.texts[event.index] += event.text
        if event.finish_reason:
            self.finish[event.index] = event.finish_reason
            self.completion_tokens += event.tokens
            self.open -= 1
        return event

    async def rest(self) -> None:
        while self.open:
            await self.next()

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def choice_json(chat: bool, index: int, text: str, finish: str | None, delta: bool = False) -> JsonObject:
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": index, "delta" if delta else "message": body, "logprobs": None, "finish_reason": finish}


async def stream_events(reply: Reply, jobs: list[Job], chat: bool, head: JsonObject, usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks as server-sent events. When the client goes away, Starlette cancels this
    generator and `finally` drops its rows from the batch."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[JsonObject], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(reply.texts))])
        while reply.open:
            try:
                event = await reply.next()
            except ApiError as err:
                yield f"data: {json.dumps(error_body(err.message, err.kind))}\n\n"
                return
            yield chunk([choice_json(chat, event.index, event.text, event.finish_reason, delta=True)])
        if usage:
            yield chunk([], usage=reply.usage())
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client closes its connection. The body has been read, so the server's next
    message is the disconnect: seen at once, not at a pause between tokens."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(request: Request, engine: BatchDecoder, options: ServeOptions, body: Common, prompts: list[list[int]]) -> Any:
    """Submit one job per prompt and answer with the whole response or a stream of chunks."""
    chat = isinstance(body, ChatRequest)
    samplings = [sampling_of(body, len(p), options) for p in prompts]
    reply = Reply(len(prompts) * body.n, sum(len(p) for p in prompts))
    jobs = [Job(p, body.n, s, reply.emit, first_index=i * body.n) for i, (p, s) in enumerate(zip(prompts, samplings))]
    for job in jobs:
        engine.submit(job)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": options.model_id}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(reply, jobs, chat, head, usage), media_type="text/event-stream")
    collect, gone = asyncio.ensure_future(reply.rest()), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client left: its rows leave the batch at the next step
            return None
        collect.result()  # a generation error: raised here
    finally:
        collect.cancel()
        gone.cancel()
        for job in jobs:
            job.cancel()
    if options.log_prompts:
        log.info("response: %s", json.dumps(reply.texts))
    choices = [choice_json(chat, i, t, f) for i, (t, f) in enumerate(zip(reply.texts, reply.finish))]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": reply.usage()}
