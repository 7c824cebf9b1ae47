"""`mtad-trt serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one `Pipeline`.

Shape, and why:

- **One worker thread owns the Pipeline.** A Pipeline holds one KV cache per role (batch row 0)
  and serves one request at a time, so the server does not try to share it: requests wait in a
  bounded FIFO (fair order, `max_queue` deep; full -> 429 with Retry-After) and one thread runs
  them in turn. Batching concurrent sequences into batch rows is not built (docs/serve.md).
- **Generation never runs on the event loop.** The worker iterates `Pipeline.stream` and hands
  each piece to the request's handler (a locked list; `loop.call_soon_threadsafe` wakes the loop),
  so the loop keeps accepting, validating and streaming while the model computes. Tokenizing a
  prompt (seconds for 1 MiB) runs on a tokenizer thread, also off the loop.
- **Cancellation is closing the stream.** A client that disconnects sets its job's cancel flag;
  the worker checks it between decoder rounds and closes the stream iterator (which cancels the
  generation in the decoder driver), so the next request starts at once.
- **Refuse before queueing.** Everything a request can get wrong (JSON, schema, model name,
  unsupported OpenAI options, settings, capacity) is checked before it queues and answered with
  OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`; only valid work queues.
- **Drain on SIGTERM.** New requests get 503, uvicorn stops listening and waits (bounded) for the
  in-flight and queued requests, then the worker stops.

`create_app(pipeline, settings)` builds the app without sockets (tests, embedding); `serve(...)`
loads an engine folder and runs uvicorn; `ServerThread` runs an app on a loopback port in a
background thread (tests, notebooks, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mtad_trt import __version__
from mtad_trt.decoders import Stats
from mtad_trt.errors import CapacityError, MtadError
from mtad_trt.params import DECODERS
from mtad_trt.pipeline import Piece, split_settings

log = logging.getLogger("mtad_trt.server")

# Settings a request may carry as extra body fields, besides the OpenAI ones mapped onto settings.
EXTRA_FIELDS = ("top_k", "decoder", "gamma", "beam_width", "threshold", "reference", "ignore_eos",
                "stop_token_ids", "return_token_ids")
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerSettings:
    """What `serve` and `create_app` are configured with (the CLI flags, minus the engine loading)."""

    model_name: str | None = None  # served model id; default: the engine folder's name
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 64  # requests waiting for the worker (the running one not counted)
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # the Retry-After header of a 429
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight and queued requests may still run
    defaults: dict[str, Any] = field(default_factory=dict)  # settings a request does not give (decoder, gamma...)


# -- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP refusal in OpenAI's error shape; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _as_api_error(exc: BaseException) -> ApiError:
    """Map anything a handler or the worker raised onto the error a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CapacityError):
        return ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, MtadError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", code="internal_error")


# -- request schema -----------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: no "5" -> 5 or true -> 1 coercions; forbid: a misspelt extra field ("gama") is an
    # error naming it, not a silently ignored setting; no NaN/inf reaching the sampler.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields shared by both endpoints: OpenAI's, then mtad-trt's extra settings."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # mtad-trt extras (vLLM-style: non-OpenAI sampling fields go in the body)
    top_k: int | None = Field(None, ge=0)
    decoder: Literal[DECODERS] | None = None  # type: ignore[valid-type]
    gamma: int | None = Field(None, ge=1)
    beam_width: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, gt=0)
    reference: Literal["ancestor", "column"] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False  # vLLM's name: add prompt_token_ids / token_ids to the response

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, what) for OpenAI options that would change the answer but are not implemented:
        refused with 400 rather than silently ignored."""
        out = []
        if self.n != 1:
            out.append(("n", "n > 1"))
        if self.presence_penalty or self.frequency_penalty:
            out.append(("presence_penalty" if self.presence_penalty else "frequency_penalty",
                        "presence_penalty / frequency_penalty"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias"))
        return out


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo"))
        if self.logprobs is not None:
            out.append(("logprobs", "logprobs"))
        if self.best_of is not None and self.best_of > 1:
            out.append(("best_of", "best_of > 1"))
        if self.suffix:
            out.append(("suffix", "suffix"))
        return out


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs is not None:
            out.append(("logprobs", "logprobs"))
        if self.tools or self.functions or self.tool_choice not in (None, "none") \
                or self.function_call not in (None, "none"):
            out.append(("tools", "tools / function calling"))
        if self.response_format and self.response_format.get("type") != "text":
            out.append(("response_format", "response_format other than text"))
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function") or m.tool_calls or m.tool_call_id:
                out.append((f"messages.{i}", f"tool messages (messages[{i}])"))
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                out.append((f"messages.{i}.content", f"non-text content parts (messages[{i}])"))
        return out

    def chat_messages(self) -> list[dict]:
        msgs = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                content = "\n".join(p.text or "" for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        return msgs


def _validation_error(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return ApiError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    msgs, param = [], None
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        param = param or (str(err["loc"][0]) if err["loc"] else None)
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown field '{loc}' (mtad-trt's extra fields: {', '.join(EXTRA_FIELDS)})")
        else:
            msgs.append(f"{loc or 'body'}: {err['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ApiError(422, "; ".join(msgs) + more, param=param, code="invalid_value")


# -- metrics ------------------------------------------------------------------------------------
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """Prometheus metrics named like vLLM's (`vllm:` -> `mtad_trt:`), in a registry of their own.

    A per-app registry (not the global one) lets tests and notebooks build several apps in one
    process without "duplicated timeseries" errors.
    """

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        name = model_name

        def hist(n: str, doc: str) -> Histogram:
            return Histogram(f"mtad_trt:{n}", doc, lab, buckets=_LATENCY_BUCKETS, registry=r).labels(name)

        def count(n: str, doc: str) -> Counter:
            return Counter(f"mtad_trt:{n}", doc, lab, registry=r).labels(name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token (queue wait included).")
        self.itl = hist("inter_token_latency_seconds",
                        "Gap between successive decoder rounds' outputs (a speculative round emits several tokens).")
        self.tpot = hist("request_time_per_output_token_seconds",
                         "Per request: (generation time - time to first token) / (tokens - 1).")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue_time = hist("request_queue_time_seconds", "Time spent waiting for the worker.")
        self.running = Gauge("mtad_trt:num_requests_running", "Requests the worker is generating (0 or 1).",
                             lab, registry=r).labels(name)
        self.waiting = Gauge("mtad_trt:num_requests_waiting", "Requests queued for the worker.",
                             lab, registry=r).labels(name)
        self.prompt_tokens = count("prompt_tokens", "Prompt tokens of started requests.")
        self.generation_tokens = count("generation_tokens", "Generated tokens.")
        self.num_drafts = count("spec_decode_num_drafts", "Speculative draft+verify rounds.")
        self.num_draft_tokens = count("spec_decode_num_draft_tokens", "Drafted tokens put before the target.")
        self.num_accepted = count("spec_decode_num_accepted_tokens", "Drafted tokens the target accepted.")
        self._per_pos = Counter("mtad_trt:spec_decode_num_accepted_tokens_per_pos",
                                "Rounds that accepted at least position+1 drafted tokens.",
                                lab + ["position"], registry=r)
        self._success = Counter("mtad_trt:request_success", "Finished requests by finish reason "
                                "(stop, length, cancelled).", lab + ["finished_reason"], registry=r)
        self._name = name

    def record(self, stats: Stats, e2e_s: float) -> None:
        """Add one finished (or cancelled) request's statistics."""
        self.e2e.observe(e2e_s)
        self.generation_tokens.inc(stats.generated_tokens)
        if stats.generated_tokens > 1:
            self.tpot.observe(max(0.0, stats.wall_s - stats.ttft_s) / (stats.generated_tokens - 1))
        if stats.decoder != "ar" and stats.iterations:
            self.num_drafts.inc(stats.iterations)
            self.num_draft_tokens.inc(stats.drafted_tokens)
            self.num_accepted.inc(stats.accepted_tokens)
            for pos, n in enumerate(stats.accepted_per_position):
                self._per_pos.labels(self._name, str(pos)).inc(n)
        self._success.labels(self._name, stats.finish_reason or "cancelled").inc()

    def record_cancelled_while_waiting(self) -> None:
        self._success.labels(self._name, "cancelled").inc()


# -- the worker ---------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One queued request: its input, its settings, and the channel back to its handler.

    The channel is a locked list plus an asyncio.Event. The worker wakes the event loop only
    when the list goes from empty to non-empty, and the handler takes everything pending at
    once; so when the worker outruns the loop (fast steps, many tokens) rounds coalesce into
    fewer wake-ups and socket writes instead of piling up one callback per round.
    Events: ("piece", Piece) | ("done", Stats) | ("error", exception).
    """

    prompt_ids: list[int]
    settings: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    streaming: bool = True  # False: the handler wants only the whole text, so send it once at the end
    stats: Stats = field(default_factory=Stats)
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # set by the handler once "done" or "error" arrived
    _pending: list[tuple[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, kind: str, value: Any) -> None:
        """Called from the worker thread: hand one event to the handler's event loop."""
        with self._lock:
            self._pending.append((kind, value))
            wake = len(self._pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self.cancelled.set()

    async def take(self) -> list[tuple[str, Any]]:
        """Called on the event loop: wait for, and return, every event emitted so far."""
        while True:
            with self._lock:
                if self._pending:
                    batch, self._pending = self._pending, []
                    return batch
                self._ready.clear()  # under the lock: an emit after this sets it again
            await self._ready.wait()


class Worker:
    """The only thread that touches the Pipeline; runs queued jobs one at a time, in FIFO order."""

    def __init__(self, pipeline, max_queue: int, metrics: ServerMetrics) -> None:
        self.pipeline, self.max_queue, self.metrics = pipeline, max_queue, metrics
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.running: Job | None = None
        self._thread: threading.Thread | None = None

    @property
    def died(self) -> bool:
        """Started and no longer running while not asked to stop (a bug; /health reports it)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mtad-trt-worker", daemon=True)
                self._thread.start()

    def submit(self, job: Job, retry_after_s: int) -> None:
        self.start()
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
            if len(self._jobs) >= self.max_queue:
                raise ApiError(429, f"the request queue is full ({self.max_queue} waiting); retry later",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after_s)})
            self._jobs.append(job)
            self.metrics.waiting.set(len(self._jobs))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Thread-safe: drop a waiting job, or make the running one stop after its current round."""
        job.cancelled.set()
        with self._cond:
            with contextlib.suppress(ValueError):
                self._jobs.remove(job)
                self.metrics.waiting.set(len(self._jobs))
                self.metrics.record_cancelled_while_waiting()

    def stop(self, timeout_s: float) -> None:
        """Refuse queued jobs (503), let the running one finish within timeout_s, then cancel it."""
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            self._jobs.clear()
            self.metrics.waiting.set(0)
            self._cond.notify_all()
        for job in pending:
            job.emit("error", ApiError(503, "the server is shutting down", "service_unavailable",
                                       code="shutting_down"))
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        running = self.running
        if self._thread.is_alive() and running is not None:
            log.warning("cancelling the running request: drain timeout reached")
            running.cancelled.set()
            self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self.metrics.waiting.set(len(self._jobs))
                self.running = job
            try:
                if job.cancelled.is_set():
                    self.metrics.record_cancelled_while_waiting()
                else:
                    self._execute(job)
            except BaseException as e:  # never let the worker die, nor a handler wait forever
                log.exception("worker failed")
                job.emit("error", e if isinstance(e, Exception) else RuntimeError(repr(e)))
            finally:
                self.running = None

    def _execute(self, job: Job) -> None:
        m = self.metrics
        job.started = time.perf_counter()
        m.queue_time.observe(job.started - job.arrived)
        m.prompt_tokens.inc(len(job.prompt_ids))
        m.running.set(1)
        last = None
        gen: Iterator[Piece] | None = None
        held: list[Piece] = []  # non-streaming: waking the event loop per round would only cost time
        try:
            gen = self.pipeline.stream(job.prompt_ids, stats=job.stats, **job.settings)
            for piece in gen:
                now = time.perf_counter()
                if piece.token_ids:
                    if last is None:
                        m.ttft.observe(now - job.arrived)
                    else:
                        m.itl.observe(now - last)
                    last = now
                if job.streaming:
                    job.emit("piece", piece)
                else:
                    held.append(piece)
                if job.cancelled.is_set():
                    break
            if held:
                job.emit("piece", Piece([t for p in held for t in p.token_ids], "".join(p.text for p in held)))
        except Exception as e:
            if not isinstance(e, MtadError):
                log.exception("generation failed")
            job.emit("error", e)
            return
        finally:
            if gen is not None:
                gen.close()  # cancels the generation if we broke out early
            m.running.set(0)
            m.record(job.stats, time.perf_counter() - job.arrived)
        job.emit("done", job.stats)


# -- the app ------------------------------------------------------------------------------------
class ServerState:
    """Everything the handlers share: the pipeline, its front-end tokenizer copy, worker, metrics."""

    def __init__(self, pipeline, settings: ServerSettings) -> None:
        self.pipeline, self.settings = pipeline, settings
        self.model_name = settings.model_name or Path(pipeline.folder).name
        split_settings(dict(settings.defaults))  # refuse bad server defaults at startup, not per request
        # Prompts are tokenized before queueing (to refuse what cannot fit) while the worker
        # decodes. A 1 MiB prompt takes seconds, so it runs on a thread of its own, not on the
        # event loop (streams keep flowing); and on a tokenizer of its own, so the two threads are
        # never inside one Rust tokenizer object (HF fast tokenizers may raise "Already borrowed").
        self.front = copy.copy(pipeline)
        with contextlib.suppress(Exception):
            self.front.tokenizer = copy.deepcopy(pipeline.tokenizer)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="mtad-trt-tokenize")
        self.vocab_size = min(e.spec.vocab_size for e in pipeline.manifest.roles.values())
        self.metrics = ServerMetrics(self.model_name)
        self.worker = Worker(pipeline, settings.max_queue, self.metrics)
        self.created = int(time.time())
        self.draining = False

    async def tokenize(self, fn, *args) -> list[int]:
        """Run `self.front.encode*` on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def begin_drain(self) -> None:
        """Stop taking requests (503) while those already accepted finish; called on SIGTERM."""
        if not self.draining:
            log.info("draining: refusing new requests, finishing accepted ones")
        self.draining = True

    # -- request preparation (event loop) -------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def settings_for(self, req: _GenerationRequest, max_tokens: int | None) -> dict[str, Any]:
        s = dict(self.settings.defaults)
        for name in ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                     "decoder", "gamma", "beam_width", "threshold", "reference"):
            v = getattr(req, name)
            if v is not None:
                s[name] = v
        if isinstance(s.get("stop"), str):
            s["stop"] = [s["stop"]]
        if max_tokens is not None:
            s["max_new_tokens"] = max_tokens
        return s

    def fit(self, prompt_ids: list[int], settings: dict[str, Any], default_max: int | None) -> dict[str, Any]:
        """Validate settings, pick max_new_tokens when the request gave none, refuse what cannot fit."""
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param="prompt")
        if "max_new_tokens" not in settings:
            sp, dp = split_settings(settings)
            scratch = 0 if dp.decoder == "ar" else dp.gamma * max(dp.beam_width, 1) + 1
            room = self.pipeline.capacity - len(prompt_ids) - scratch
            settings["max_new_tokens"] = max(1, room if default_max is None else min(default_max, room))
        sp, dp = split_settings(settings)
        if dp.decoder != "ar" and getattr(self.pipeline, "draft", None) is None:
            raise ApiError(400, f"decoder '{dp.decoder}' needs a draft model; this engine has none",
                           param="decoder")
        self.pipeline.check_fits(len(prompt_ids), sp, dp)
        return settings


async def _read_json(request: Request, limit: int) -> bytes:
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


def _parse(model_cls: type[_GenerationRequest], raw: bytes) -> _GenerationRequest:
    try:
        req = model_cls.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e) from e
    unsupported = req.unsupported()
    if unsupported:
        raise ApiError(400, f"not supported by mtad-trt: {', '.join(w for _, w in unsupported)}",
                       param=unsupported[0][0], code="unsupported")
    return req


async def _watch_disconnect(request: Request, state: ServerState, job: Job) -> None:
    """Cancel `job` when the client goes away (non-streaming requests; streams are cancelled by
    Starlette, which raises into the response generator)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            state.worker.cancel(job)
            return


async def _events(state: ServerState, job: Job) -> AsyncIterator[list[Piece]]:
    """The job's pieces in batches as they arrive (all that are pending at each wake-up); raises
    the worker's error; cancels the job if the consumer goes away first."""
    try:
        while not job.finished:
            pieces = []
            for kind, value in await job.take():
                if kind == "piece":
                    pieces.append(value)
                elif kind == "error":
                    job.finished = True
                    if pieces:
                        yield pieces
                    raise value
                else:
                    job.finished = True
            if pieces:
                yield pieces
    finally:
        if not job.finished:
            state.worker.cancel(job)


def _usage(job: Job) -> dict[str, int]:
    n_out = job.stats.generated_tokens
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_out,
            "total_tokens": len(job.prompt_ids) + n_out}


def _mtad(job: Job) -> dict[str, Any]:
    return {**job.stats.to_dict(), "queue_s": max(0.0, job.started - job.arrived) if job.started else 0.0}


def _finish_reason(job: Job) -> str:
    return job.stats.finish_reason if job.stats.finish_reason in ("stop", "length") else "stop"


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _Gate:
    """Pure ASGI middleware (streaming- and cancellation-safe, unlike BaseHTTPMiddleware): 503
    while draining, 401 on /v1/* without the API key."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            err = None
            if self.state.draining and path != "/metrics":
                err = ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down",
                               headers={"Connection": "close"})
            elif self.state.settings.api_key and path.startswith("/v1"):
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode(), self.state.settings.api_key.encode()):
                    err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if err is not None:
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(pipeline, settings: ServerSettings | None = None) -> FastAPI:
    """An OpenAI-compatible app over `pipeline`. The worker thread starts with the app's lifespan
    (or at the first request) and stops, after draining, when the lifespan ends."""
    state = ServerState(pipeline, settings or ServerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        yield
        state.begin_drain()
        await asyncio.get_running_loop().run_in_executor(None, state.worker.stop, 5.0)
        state.close()

    app = FastAPI(title="mtad-trt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.mtad = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(MtadError)
    async def _mtad_error(request: Request, exc: MtadError) -> JSONResponse:
        return _as_api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg, code = f"no such route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return ApiError(exc.status_code, msg, code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0]["loc"]) if errs else None
        return ApiError(422, f"{loc}: {errs[0]['msg']}" if errs else "invalid request", param=loc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _as_api_error(exc).response()

    # -- read-only endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if state.worker.died:
            raise ApiError(503, "the worker thread has stopped", "service_unavailable", code="worker_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__, "model": state.model_name, "backend": getattr(pipeline, "backend", "")}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mtad-trt",
                "max_model_len": pipeline.capacity}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        state.check_model(model)
        return model_card()

    # -- generation ---------------------------------------------------------------------------
    async def submit(request: Request, prompt_ids: list[int], settings: dict, streaming: bool) -> Job:
        job = Job(prompt_ids, settings, asyncio.get_running_loop(), streaming)
        state.worker.submit(job, state.settings.retry_after_s)
        return job

    async def collect(request: Request, job: Job) -> tuple[str, list[int]]:
        watcher = asyncio.create_task(_watch_disconnect(request, state, job))
        try:
            parts, ids = [], []
            async for pieces in _events(state, job):
                for piece in pieces:
                    parts.append(piece.text)
                    ids.extend(piece.token_ids)
            return "".join(parts), ids
        finally:
            watcher.cancel()

    def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_events(job: Job, make_chunk, first: list[dict], include_usage: bool,
                            return_ids: bool) -> AsyncIterator[str]:
        """SSE: `first` chunks, one chunk per non-empty piece, a finish chunk (with `mtad`), an
        optional usage chunk, then [DONE]. Errors after the headers go out as an error event."""
        extra = {"usage": None} if include_usage else {}
        try:
            for c in first:
                yield _sse({**c, **extra})
            async for pieces in _events(state, job):
                out = [_sse({**make_chunk(p.text, None, p.token_ids if return_ids else None), **extra})
                       for p in pieces if p.text or (return_ids and p.token_ids)]
                if out:
                    yield "".join(out)  # one write for everything that arrived together
            yield _sse({**make_chunk("", _finish_reason(job), [] if return_ids else None), **extra,
                        "mtad": _mtad(job)})
            if include_usage:
                final = make_chunk("", None, None)
                yield _sse({**final, "choices": [], "usage": _usage(job), "mtad": _mtad(job)})
        except Exception as e:  # noqa: BLE001 - reported to the client in-stream
            yield _sse(_as_api_error(e).body())
        yield _sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await _read_json(request, state.settings.max_body_bytes))
        state.check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "not supported by mtad-trt: a list of prompts (send one prompt per request)",
                               param="prompt", code="unsupported")
            prompt = prompt[0]
        prompt_ids = await state.tokenize(state.front.encode, prompt) if isinstance(prompt, str) else list(prompt)
        settings = state.fit(prompt_ids, state.settings_for(req, req.max_tokens), _COMPLETIONS_DEFAULT_MAX_TOKENS)
        job = await submit(request, prompt_ids, settings, req.stream)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, ids: list[int] | None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if ids is not None:
                choice["token_ids"] = ids
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [choice]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [{**chunk("", None, []), "prompt_token_ids": prompt_ids}] if req.return_token_ids else []
            return stream_response(stream_events(job, chunk, first, include_usage, req.return_token_ids))
        text, ids = await collect(request, job)
        body = chunk(text, _finish_reason(job), ids if req.return_token_ids else None)
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt_ids
        return JSONResponse({**body, "usage": _usage(job), "mtad": _mtad(job)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatCompletionRequest, await _read_json(request, state.settings.max_body_bytes))
        state.check_model(req.model)
        try:
            prompt_ids = await state.tokenize(state.front.encode_chat, req.chat_messages())
        except MtadError:
            raise
        except Exception as e:  # a chat template is code: its own refusals (e.g. role order) are input errors
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from e
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        settings = state.fit(prompt_ids, state.settings_for(req, max_tokens), None)
        job = await submit(request, prompt_ids, settings, req.stream)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, ids: list[int] | None, delta: dict | None = None) -> dict:
            choice = {"index": 0, "delta": delta if delta is not None else ({"content": text} if text else {}),
                      "logprobs": None, "finish_reason": finish}
            if ids is not None:
                choice["token_ids"] = ids
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [choice]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = chunk("", None, [] if req.return_token_ids else None, delta={"role": "assistant", "content": ""})
            if req.return_token_ids:
                first["prompt_token_ids"] = prompt_ids
            return stream_response(stream_events(job, chunk, [first], include_usage, req.return_token_ids))
        text, ids = await collect(request, job)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": _finish_reason(job)}
        body = {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [choice]}
        if req.return_token_ids:
            choice["token_ids"] = ids
            body["prompt_token_ids"] = prompt_ids
        return JSONResponse({**body, "usage": _usage(job), "mtad": _mtad(job)})

    return app


# -- running it ---------------------------------------------------------------------------------
class _DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT the app starts refusing new requests (503)
    before uvicorn closes the listener and waits (timeout_graceful_shutdown) for in-flight ones."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        self._state.begin_drain()
        super().handle_exit(sig, frame)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    engines: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    threads: int = 1,
    decoder: str = "mtad",
    gamma: int = 4,
    beam_width: int = 4,
    threshold: float = 0.5,
    max_queue: int = 64,
    model_name: str | None = None,
    max_body_bytes: int = 1 << 20,
    drain_timeout_s: float = 30.0,
    log_level: str = "info",
) -> None:
    """Load `engines` and serve it until SIGTERM/SIGINT (then drain for up to drain_timeout_s).

    Binds loopback unless `host` says otherwise. Like uvicorn, re-raises the signal that stopped
    it once the drain is done, so a supervisor sees "terminated by SIGTERM".
    """
    from mtad_trt.pipeline import Pipeline

    if max_queue < 1:
        raise MtadError(f"--max-queue must be >= 1, got {max_queue}")
    defaults = dict(decoder=decoder, gamma=gamma, beam_width=beam_width, threshold=threshold)
    split_settings(defaults)
    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    pipeline = Pipeline.load(engines, backend=backend, device=device, threads=threads)
    try:
        app = create_app(pipeline, ServerSettings(model_name=model_name, api_key=api_key, max_queue=max_queue,
                                                  max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout_s,
                                                  defaults=defaults))
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=drain_timeout_s)
        _DrainingServer(config, app.state.mtad).run()
    finally:
        pipeline.close()


class ServerThread:
    """Run an app on a loopback port in a background thread: `with ServerThread(app) as url: ...`.

    The socket is bound before the thread starts (port 0 = a free port), so `url` is usable at
    once and no two servers race for a port.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        bound = self.sock.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
