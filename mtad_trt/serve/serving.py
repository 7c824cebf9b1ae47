"""The serving logic both generation endpoints share, and what each adds.

One path for `/v1/completions` and `/v1/chat/completions`: read and parse the body, check the
model name, tokenize (off the event loop), let the runtime validate and fit the settings, submit,
then stream SSE chunks or collect one body. The two endpoints differ only in how a prompt is
built and how a chunk or a body looks (`CompletionServing`, `ChatServing`).

A request with several prompts (completions) or `n` > 1 has several choices, and each choice is
its own runtime request: all are submitted together, so they share the running batch like any
concurrent requests, and choice `prompt_index * n + i` is exactly what a single request for that
prompt would give with seed + i (when a seed is given). The response's `usage` sums them, counting
each prompt once (OpenAI's and vLLM's rule).
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from mtad_trt.client import RuntimeClient
from mtad_trt.engine.request import Piece
from mtad_trt.errors import MtadError
from mtad_trt.folder.tokenizer import TokenTable
from mtad_trt.serve.errors import ApiError, as_api_error, parse
from mtad_trt.serve.job import Job
from mtad_trt.serve.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    ChatShape,
    ChoiceState,
    CompletionRequest,
    CompletionShape,
    Shape,
    sse,
)
from mtad_trt.serve.settings import ServerSettings


class OpenAIServing:
    """What both endpoints share. One per app; the tokenizer thread is its own."""

    def __init__(self, client: RuntimeClient, settings: ServerSettings, model_name: str) -> None:
        self.client, self.settings, self.model_name = client, settings, model_name
        # Prompts are tokenized before queueing (to refuse what cannot fit) while the runtime
        # decodes. A 1 MiB prompt takes seconds, so it runs on a thread of its own, not on the
        # event loop (streams keep flowing), with an encoder of its own (see `pipeline.Encoder`).
        self.encoder = client.encoder()
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="mtad-trt-tokenize")
        self._tokens: TokenTable | None = None  # token strings for logprobs, built at the first use

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    async def tokenize(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def token_table(self) -> TokenTable:
        """Token strings and bytes for logprobs: read from a tokenizer copy of its own (the event
        loop formats responses while the tokenize thread encodes)."""
        if self._tokens is None:
            self._tokens = await self.tokenize(lambda: TokenTable(copy.deepcopy(self.encoder.tokenizer)))
        return self._tokens

    # -- the path both endpoints end in ------------------------------------------------------------
    def prepare(self, req, prompts: list[list[int]], default_max: int | None) -> tuple[list[ChoiceState], list]:
        """One choice per (prompt, i < n), each validated and fitted by the runtime; nothing is
        submitted before all are (a bad prompt refuses the whole request)."""
        n, total = req.n, len(prompts) * req.n
        limit = getattr(self.client, "max_queue", None)
        if limit is not None and total > limit:
            raise ApiError(400, f"this request asks for {total} choices ({len(prompts)} prompt(s) x n={n}); "
                                f"the server takes at most {limit} at once (its --max-queue)",
                           param="n" if n > 1 else "prompt", code="invalid_value")
        choices, prepared = [], []
        for p, ids in enumerate(prompts):
            for i in range(n):
                c = ChoiceState(p * n + i, p, ids, "")
                try:
                    prepared.append(self.client.prepare(ids, default_max, self.settings.defaults, **req.choice_settings(i)))
                except MtadError as e:
                    err = as_api_error(e)
                    if len(prompts) > 1:
                        err.message = f"prompt {p}: {err.message}"
                    raise err from e
                choices.append(c)
        return choices, prepared

    async def run(self, http: Request, req, choices: list[ChoiceState], prepared: list, shape: Shape) -> Response:
        """Submit every choice, then stream or collect."""
        if shape.logprobs is not None:
            shape.tokens = await self.token_table()
        loop = asyncio.get_running_loop()
        jobs = [Job(loop) for _ in choices]
        try:  # all or none: the choices of a request are queued together
            handles = self.client.submit_many(list(zip(prepared, jobs, strict=True)), streaming=req.stream)
        except MtadError as e:
            raise as_api_error(e, self.settings.retry_after_s) from e
        for c, job, handle in zip(choices, jobs, handles, strict=True):
            job.handle, c.job = handle, job
        if req.stream:
            events = self._stream_events(choices, shape, req.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self._collect(http, choices)
        body = shape.envelope([shape.choice(c, text, finish_reason(c.job), ids, lps)
                               for c, (text, ids, lps) in zip(choices, results, strict=True)])
        if req.return_token_ids and len({c.prompt_index for c in choices}) == 1:
            body["prompt_token_ids"] = choices[0].prompt_ids
        body["usage"] = usage(choices)
        if len(choices) == 1:
            body["mtad"] = mtad_stats(choices[0].job)
        else:  # each choice's own statistics ride with it
            for ch, c in zip(body["choices"], choices, strict=True):
                ch["mtad"] = mtad_stats(c.job)
        return JSONResponse(body)

    def _cancel(self, choices: list[ChoiceState]) -> None:
        for c in choices:
            if c.job is not None and c.job.handle is not None and not c.job.finished:
                self.client.cancel(c.job.handle)

    async def _events(self, choices: list[ChoiceState]) -> AsyncIterator[tuple[ChoiceState, list[Piece] | None]]:
        """Every choice's piece batches as they arrive, then (choice, None) once it has finished;
        raises the first error. Closing it early cancels whatever has not finished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: ChoiceState) -> None:
            try:
                async for pieces in c.job.events(self.client):
                    queue.put_nowait((c, pieces, None))
                queue.put_nowait((c, None, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((c, None, e))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            left = len(choices)
            while left:
                c, pieces, err = await queue.get()
                if err is not None:
                    raise err
                if pieces is None:
                    left -= 1
                yield c, pieces
        finally:
            for t in tasks:
                t.cancel()
            self._cancel(choices)

    async def _collect(self, http: Request, choices: list[ChoiceState]) -> list[tuple[str, list[int], list | None]]:
        """Each choice's text, token ids and (when asked) log-probs."""
        watcher = asyncio.create_task(self._watch_disconnect(http, choices))
        out = {id(c): ([], [], []) for c in choices}
        missing = set()
        try:
            async for c, pieces in self._events(choices):
                parts, ids, lps = out[id(c)]
                for piece in pieces or ():
                    parts.append(piece.text)
                    ids.extend(piece.token_ids)
                    if piece.logprobs is not None:
                        lps.extend(piece.logprobs)
                    elif piece.token_ids:
                        missing.add(id(c))
            return [("".join(out[id(c)][0]), out[id(c)][1], None if id(c) in missing else out[id(c)][2])
                    for c in choices]
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, http: Request, choices: list[ChoiceState]) -> None:
        """Cancel a non-streaming request when its client goes away (streams are cancelled by
        Starlette, which raises into the response generator)."""
        while True:
            message = await http.receive()
            if message["type"] == "http.disconnect":
                for c in choices:
                    if c.job is not None and c.job.handle is not None:
                        self.client.cancel(c.job.handle)
                return

    async def _stream_events(self, choices: list[ChoiceState], shape: Shape, include_usage: bool) -> AsyncIterator[str]:
        """SSE: each choice's first chunks, then its chunks as pieces arrive (choices interleave,
        each chunk names its `index`), a finish chunk per choice (with its `mtad`), an optional
        usage chunk, then [DONE]. Errors after the headers go out as an error event."""
        extra = {"usage": None} if include_usage else {}

        def events(objs: list[dict]) -> str:
            return "".join(sse({**o, **extra}) for o in objs)  # one write for everything that arrived together

        try:
            first = [o for c in choices for o in shape.first(c)]
            if first:
                yield events(first)
            async for c, pieces in self._events(choices):
                objs = []
                if not c.opened:  # the prefill is done: echo has the prompt's log-probs now
                    c.opened = True
                    objs += shape.opening(c)
                if pieces is None:
                    objs.append({**shape.chunk(c, "", finish_reason(c.job), [], None), "mtad": mtad_stats(c.job)})
                else:
                    objs += [shape.chunk(c, p.text, None, p.token_ids, p.logprobs)
                             for p in pieces if shape.wants_chunk(p.text, p.token_ids)]
                if objs:
                    yield events(objs)
            if include_usage:
                last = {**shape.envelope([], chunk=True), "usage": usage(choices)}
                if len(choices) == 1:
                    last["mtad"] = mtad_stats(choices[0].job)
                yield sse(last)
        except Exception as e:  # noqa: BLE001 - reported to the client in-stream
            yield sse(as_api_error(e).body())
        yield sse("[DONE]")


class CompletionServing(OpenAIServing):
    async def create(self, http: Request) -> Response:
        req = parse(CompletionRequest, await read_json(http, self.settings.max_body_bytes))
        self.check_model(req.model)
        prompts = req.prompts()
        encode = self.encoder.encode
        ids = await self.tokenize(lambda: [encode(p) if isinstance(p, str) else list(p) for p in prompts])
        choices, prepared = self.prepare(req, ids, COMPLETIONS_DEFAULT_MAX_TOKENS)
        if req.echo:  # the prompt as sent; token ids (valid: the runtime checked them) decoded
            decode = self.encoder.tokenizer.decode
            texts = await self.tokenize(lambda: [p if isinstance(p, str) else decode(p) for p in prompts])
            for c in choices:
                c.prompt_text = texts[c.prompt_index]
        shape = CompletionShape(self.model_name, req.return_token_ids, req.logprobs_k,
                                rid=f"cmpl-{uuid.uuid4().hex}", echo=req.echo)
        return await self.run(http, req, choices, prepared, shape)


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
        choices, prepared = self.prepare(req, [prompt_ids], None)
        shape = ChatShape(self.model_name, req.return_token_ids, req.logprobs_k, rid=f"chatcmpl-{uuid.uuid4().hex}")
        return await self.run(http, req, choices, prepared, shape)


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


def usage(choices: list[ChoiceState]) -> dict[str, Any]:
    """Summed over the choices; each prompt counted once however many choices it has (OpenAI's
    and vLLM's rule), its cached tokens the fewest any of its choices found in the prefix cache."""
    by_prompt: dict[int, list[ChoiceState]] = {}
    for c in choices:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    n_in = sum(len(cs[0].prompt_ids) for cs in by_prompt.values())
    n_out = sum(c.job.handle.stats.generated_tokens for c in choices)
    cached = sum(min(c.job.handle.stats.cached_tokens for c in cs) for cs in by_prompt.values())
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
            "prompt_tokens_details": {"cached_tokens": cached}}


def mtad_stats(job: Job) -> dict[str, Any]:
    return {**job.handle.stats.to_dict(), "queue_s": job.handle.request.queue_s}


def finish_reason(job: Job) -> str:
    reason = job.handle.stats.finish_reason
    return reason if reason in ("stop", "length") else "stop"
