"""The serving logic both generation endpoints share, and what each adds.

One path for `/v1/completions` and `/v1/chat/completions`: read and parse the body, check the
model name, tokenize (off the event loop), let the runtime validate and fit the settings, submit,
then stream SSE chunks or collect one body. The two endpoints differ only in how a prompt is
built and how a chunk or a body looks (`CompletionServing`, `ChatServing`).
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from mtad_trt.client import RuntimeClient
from mtad_trt.errors import MtadError
from mtad_trt.params import split_settings
from mtad_trt.serve.errors import ApiError, as_api_error, parse
from mtad_trt.serve.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
)
from mtad_trt.serve.worker import Job


@dataclass
class ServerSettings:
    """What `serve` and `create_app` are configured with (the CLI flags, minus the engine loading)."""

    model_name: str | None = None  # served model id; default: the engine folder's name
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 64  # requests waiting for the runtime (the running ones not counted)
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # the Retry-After header of a 429
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight and queued requests may still run
    defaults: dict[str, Any] = field(default_factory=dict)  # settings a request does not give (decoder, gamma...)

    def validate(self) -> None:
        if self.max_queue < 1:
            raise MtadError(f"--max-queue must be >= 1, got {self.max_queue}")
        split_settings(dict(self.defaults))  # refuse bad server defaults at startup, not per request


class OpenAIServing:
    """What both endpoints share. One per app; the tokenizer thread is its own."""

    def __init__(self, client: RuntimeClient, settings: ServerSettings, model_name: str) -> None:
        self.client, self.settings, self.model_name = client, settings, model_name
        # Prompts are tokenized before queueing (to refuse what cannot fit) while the runtime
        # decodes. A 1 MiB prompt takes seconds, so it runs on a thread of its own, not on the
        # event loop (streams keep flowing), with an encoder of its own (see `pipeline.Encoder`).
        self.encoder = client.encoder()
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="mtad-trt-tokenize")

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    async def tokenize(self, fn, *args) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def generate(self, http: Request, req, prompt_ids: list[int], default_max: int | None,
                       shape: Shape) -> Response:
        """Fit, submit, then stream or collect: the path both endpoints end in."""
        prepared = self.client.prepare(prompt_ids, default_max, self.settings.defaults, **req.runtime_settings())
        job = Job(asyncio.get_running_loop())
        try:
            job.handle = self.client.submit(prepared, job, streaming=req.stream)
        except MtadError as e:
            raise as_api_error(e, self.settings.retry_after_s) from e
        if req.stream:
            events = self._stream_events(job, shape, req.include_usage, req.return_token_ids)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, ids = await self._collect(http, job)
        return JSONResponse({**shape.body(text, finish_reason(job), ids if req.return_token_ids else None),
                             "usage": usage(job), "mtad": mtad_stats(job)})

    async def _collect(self, http: Request, job: Job) -> tuple[str, list[int]]:
        watcher = asyncio.create_task(self._watch_disconnect(http, job))
        try:
            parts, ids = [], []
            async for pieces in job.events(self.client):
                for piece in pieces:
                    parts.append(piece.text)
                    ids.extend(piece.token_ids)
            return "".join(parts), ids
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, http: Request, job: Job) -> None:
        """Cancel a non-streaming request when its client goes away (streams are cancelled by
        Starlette, which raises into the response generator)."""
        while True:
            message = await http.receive()
            if message["type"] == "http.disconnect":
                self.client.cancel(job.handle)
                return

    async def _stream_events(self, job: Job, shape: Shape, include_usage: bool, return_ids: bool) -> AsyncIterator[str]:
        """SSE: the first chunks, one chunk per non-empty piece, a finish chunk (with `mtad`), an
        optional usage chunk, then [DONE]. Errors after the headers go out as an error event."""
        extra = {"usage": None} if include_usage else {}
        try:
            for c in shape.first():
                yield sse({**c, **extra})
            async for pieces in job.events(self.client):
                out = [sse({**shape.chunk(p.text, None, p.token_ids if return_ids else None), **extra})
                       for p in pieces if p.text or (return_ids and p.token_ids)]
                if out:
                    yield "".join(out)  # one write for everything that arrived together
            yield sse({**shape.chunk("", finish_reason(job), [] if return_ids else None), **extra,
                       "mtad": mtad_stats(job)})
            if include_usage:
                yield sse({**shape.chunk("", None, None), "choices": [], "usage": usage(job), "mtad": mtad_stats(job)})
        except Exception as e:  # noqa: BLE001 - reported to the client in-stream
            yield sse(as_api_error(e).body())
        yield sse("[DONE]")


@dataclass
class Shape(abc.ABC):
    """How one request's chunks and body look; each endpoint has its own."""

    model: str
    prompt_ids: list[int]
    return_ids: bool
    rid: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @abc.abstractmethod
    def chunk(self, text: str, finish: str | None, ids: list[int] | None) -> dict:
        """One streamed chunk (finish=None until the last)."""

    @abc.abstractmethod
    def first(self) -> list[dict]:
        """Chunks sent before any token (the chat role, prompt token ids)."""

    @abc.abstractmethod
    def body(self, text: str, finish: str, ids: list[int] | None) -> dict:
        """The non-streaming response, without usage and stats."""

    def _envelope(self, obj: str, choice: dict, ids: list[int] | None) -> dict:
        if ids is not None:
            choice["token_ids"] = ids
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}


class CompletionShape(Shape):
    def chunk(self, text: str, finish: str | None, ids: list[int] | None) -> dict:
        return self._envelope("text_completion", {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}, ids)

    def first(self) -> list[dict]:
        return [{**self.chunk("", None, []), "prompt_token_ids": self.prompt_ids}] if self.return_ids else []

    def body(self, text: str, finish: str, ids: list[int] | None) -> dict:
        out = self.chunk(text, finish, ids)
        if self.return_ids:
            out["prompt_token_ids"] = self.prompt_ids
        return out


class ChatShape(Shape):
    def chunk(self, text: str, finish: str | None, ids: list[int] | None, delta: dict | None = None) -> dict:
        delta = delta if delta is not None else ({"content": text} if text else {})
        return self._envelope("chat.completion.chunk",
                              {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}, ids)

    def first(self) -> list[dict]:
        first = self.chunk("", None, [] if self.return_ids else None, delta={"role": "assistant", "content": ""})
        if self.return_ids:
            first["prompt_token_ids"] = self.prompt_ids
        return [first]

    def body(self, text: str, finish: str, ids: list[int] | None) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        out = self._envelope("chat.completion", choice, ids)
        if self.return_ids:
            out["prompt_token_ids"] = self.prompt_ids
        return out


class CompletionServing(OpenAIServing):
    async def create(self, http: Request) -> Response:
        req = parse(CompletionRequest, await read_json(http, self.settings.max_body_bytes))
        self.check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "not supported by mtad-trt: a list of prompts (send one prompt per request)",
                               param="prompt", code="unsupported")
            prompt = prompt[0]
        prompt_ids = await self.tokenize(self.encoder.encode, prompt) if isinstance(prompt, str) else list(prompt)
        shape = CompletionShape(self.model_name, prompt_ids, req.return_token_ids, rid=f"cmpl-{uuid.uuid4().hex}")
        return await self.generate(http, req, prompt_ids, COMPLETIONS_DEFAULT_MAX_TOKENS, shape)


class ChatServing(OpenAIServing):
    async def create(self, http: Request) -> Response:
        req = parse(ChatCompletionRequest, await read_json(http, self.settings.max_body_bytes))
        self.check_model(req.model)
        try:
            prompt_ids = await self.tokenize(self.encoder.encode_chat, req.chat_messages())
        except MtadError:
            raise
        except Exception as e:  # a chat template is code: its own refusals (e.g. role order) are input errors
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from e
        shape = ChatShape(self.model_name, prompt_ids, req.return_token_ids, rid=f"chatcmpl-{uuid.uuid4().hex}")
        return await self.generate(http, req, prompt_ids, None, shape)


async def read_json(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (checked before reading when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body ({declared} bytes) exceeds the limit of {limit} bytes",
                       code="body_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
    except ClientDisconnect as e:
        raise ApiError(400, "the client disconnected while sending the body") from e
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    return bytes(body)


def usage(job: Job) -> dict[str, int]:
    n_in, n_out = len(job.handle.request.prompt_ids), job.handle.stats.generated_tokens
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def mtad_stats(job: Job) -> dict[str, Any]:
    return {**job.handle.stats.to_dict(), "queue_s": job.handle.request.queue_s}


def finish_reason(job: Job) -> str:
    reason = job.handle.stats.finish_reason
    return reason if reason in ("stop", "length") else "stop"


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"
