"""The OpenAI-compatible request schemas (pydantic) and the response bodies built from results.

Strict on purpose: no "5" -> 5 coercions, an unknown field ("gama") is an error naming it rather
than a silently ignored setting, and OpenAI options that would change the answer but are not
implemented are refused (400) rather than ignored.

Log-probabilities (`logprobs` on both endpoints, `echo` on completions) are the runtime's
(`mtad_trt.engine.logprobs`): the log-softmax of the target model's raw logits at the position
that emitted each token, before temperature, top-k and top-p (vLLM's default "raw" logprobs). The
shapes here only format them: OpenAI's legacy completions object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and the chat object (`content: [{token, logprob, bytes, top_logprobs}]`).
"""

from __future__ import annotations

import abc
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mtad_trt.engine.logprobs import TokenLogprob
from mtad_trt.engine.params import DECODERS, MAX_LOGPROBS
from mtad_trt.folder.tokenizer import TokenTable

# Settings a request may carry as extra body fields (vLLM-style), besides the OpenAI ones.
EXTRA_FIELDS = ("top_k", "decoder", "gamma", "beam_width", "threshold", "reference", "ignore_eos",
                "stop_token_ids", "return_token_ids")
# Request fields that map one-to-one onto runtime settings of the same name.
SETTING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                  "decoder", "gamma", "beam_width", "threshold", "reference")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
LOGPROB_FLOOR = -9999.0  # what a -inf (or NaN) log-probability is sent as: JSON has no infinities (vLLM's value)
SEED_SPACE = 2**64  # seeds are 64-bit: choice i of a seeded request uses (seed + i) mod 2**64


class _Strict(BaseModel):
    # strict: no "5" -> 5 or true -> 1 coercions; forbid: a misspelt extra field ("gama") is an
    # error naming it, not a silently ignored setting; no NaN/inf reaching the sampler.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields shared by both endpoints: OpenAI's, then mtad-trt's extra settings."""

    # Fields of the other endpoint: refused with a 400 that says where they belong, not as unknown.
    OTHER_ENDPOINT: ClassVar[dict[str, str]] = {}

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: completions with echo only (scoring the prompt)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_SPACE)
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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """k for each generated token's alternatives when log-probabilities were asked, else None."""
        return None

    def runtime_settings(self) -> dict[str, Any]:
        """The runtime settings this request asks for (the server's defaults fill in the rest)."""
        out = {name: getattr(self, name) for name in SETTING_FIELDS if getattr(self, name) is not None}
        if self.requested_max_tokens is not None:
            out["max_new_tokens"] = self.requested_max_tokens
        if self.logprobs_k is not None:
            out["logprobs"] = self.logprobs_k
        return out

    def choice_settings(self, i: int) -> dict[str, Any]:
        """Choice i's runtime settings: the request's, with seed + i when a seed was given (so
        choice i equals a single request with that seed, and n seeded choices differ)."""
        out = self.runtime_settings()
        if self.seed is not None:
            out["seed"] = (self.seed + i) % SEED_SPACE
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, what) for OpenAI options that would change the answer but are not implemented:
        refused with 400 rather than silently ignored."""
        out = []
        if self.presence_penalty or self.frequency_penalty:
            out.append(("presence_penalty" if self.presence_penalty else "frequency_penalty",
                        "presence_penalty / frequency_penalty"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias"))
        return out

    def invalid(self) -> list[tuple[str, str]]:
        """(param, message) for values the schema lets through but no request may have: a 400."""
        return []


def _check_k(name: str, k: int | None) -> list[tuple[str, str]]:
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        return [(name, f"{name} must be between 0 and {MAX_LOGPROBS}, got {k}")]
    return []


class CompletionRequest(_GenerationRequest):
    OTHER_ENDPOINT: ClassVar[dict[str, str]] = {
        "messages": "'messages' is a /v1/chat/completions field; /v1/completions takes 'prompt'",
        "top_logprobs": "'top_logprobs' is a /v1/chat/completions field; /v1/completions takes "
                        "'logprobs': k (an integer, the alternatives per token)",
        "max_completion_tokens": "'max_completion_tokens' is a /v1/chat/completions field; "
                                 "/v1/completions takes 'max_tokens'",
    }

    # One prompt (a string or a list of token ids) or several (strings, or token-id lists): checked
    # in `invalid` and `prompts`, so a list mixing the two kinds gets a 400 naming it.
    prompt: str | list[int | str | list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    def choice_settings(self, i: int) -> dict[str, Any]:
        out = super().choice_settings(i)
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            # the prompt's log-probs come from the prefill; max_tokens 0 needs them (pure scoring)
            out["prompt_logprobs"] = self.logprobs or 0
        return out

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.best_of is not None and self.best_of > 1:
            out.append(("best_of", "best_of > 1"))
        if self.suffix:
            out.append(("suffix", "suffix"))
        return out

    def invalid(self) -> list[tuple[str, str]]:
        out = _check_k("logprobs", self.logprobs)
        if self.max_tokens == 0 and not self.echo:
            out.append(("max_tokens", "max_tokens 0 is allowed only with echo (scoring the prompt); "
                                      "otherwise it must be >= 1"))
        p = self.prompt
        if isinstance(p, list):
            if not p:
                out.append(("prompt", "the prompt list is empty"))
            else:
                kinds = {"a token id" if isinstance(x, int) else "a string" if isinstance(x, str)
                         else "a list of token ids" for x in p}
                if len(kinds) > 1:
                    out.append(("prompt", "the prompt list mixes " + ", ".join(sorted(kinds)) + ": send a string, "
                                "a list of token ids, a list of strings, or a list of token-id lists"))
        return out

    def prompts(self) -> list[str | list[int]]:
        """The prompts this request holds: one (a string or a token-id list) or several."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


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
    OTHER_ENDPOINT: ClassVar[dict[str, str]] = {
        "echo": "'echo' is a /v1/completions field: chat completions do not echo the prompt "
                "(send the rendered prompt to /v1/completions with echo and logprobs to score it)",
        "prompt": "'prompt' is a /v1/completions field; /v1/chat/completions takes 'messages'",
        "suffix": "'suffix' is a /v1/completions field",
        "best_of": "'best_of' is a /v1/completions field",
    }

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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
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

    def invalid(self) -> list[tuple[str, str]]:
        out = []
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        out += _check_k("top_logprobs", self.top_logprobs)
        if self.max_tokens == 0:
            out.append(("max_tokens", "max_tokens must be >= 1 (0 is for /v1/completions with echo)"))
        return out

    def chat_messages(self) -> list[dict]:
        msgs = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                content = "\n".join(p.text or "" for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        return msgs


def _lp(x: float) -> float:
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


# -- response shapes ---------------------------------------------------------------------------------
@dataclass(eq=False)
class ChoiceState:
    """One choice of a response (one runtime request): what its chunks and body are built from."""

    index: int  # the choice's index: prompt_index * n + i (OpenAI's order)
    prompt_index: int
    prompt_ids: list[int]
    prompt_text: str  # the prompt as sent (a string prompt) or decoded (token ids); echo's text
    job: Any = None  # serve.job.Job, once submitted
    chars: int = 0  # characters of text so far (text_offset of the next streamed token)
    opened: bool = False  # streaming: the chunks sent before the first piece (echo) went out


@dataclass
class Shape(abc.ABC):
    """How one request's chunks and body look; each endpoint has its own."""

    model: str
    return_ids: bool
    logprobs: int | None  # k when the request asked for log-probabilities, else None
    tokens: TokenTable | None = None  # set when logprobs is
    rid: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @abc.abstractmethod
    def first(self, c: ChoiceState) -> list[dict]:
        """Chunks sent for a choice before any event (the chat role, prompt token ids)."""

    def opening(self, c: ChoiceState) -> list[dict]:
        """Chunks sent for a choice at its first event, once its prefill is done (echo)."""
        return []

    @abc.abstractmethod
    def chunk(self, c: ChoiceState, text: str, finish: str | None, ids: list[int] | None,
              lps: list[TokenLogprob] | None) -> dict:
        """One streamed chunk of choice `c` (finish=None until its last)."""

    @abc.abstractmethod
    def choice(self, c: ChoiceState, text: str, finish: str, ids: list[int],
               lps: list[TokenLogprob] | None) -> dict:
        """Choice `c` of the non-streaming response."""

    @property
    @abc.abstractmethod
    def object(self) -> str: ...

    @property
    def chunk_object(self) -> str:
        return self.object

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        return {"id": self.rid, "object": self.chunk_object if chunk else self.object, "created": self.created,
                "model": self.model, "choices": choices}

    def wants_chunk(self, text: str, ids: list[int]) -> bool:
        """Whether a piece makes a chunk: text, or tokens the client asked to see (ids, logprobs)."""
        return bool(text or (ids and (self.return_ids or self.logprobs is not None)))


@dataclass
class CompletionShape(Shape):
    """`text_completion`; `logprobs` in OpenAI's legacy shape, `text_offset` indexing the choice's text."""

    echo: bool = False  # the prompt's text (and its log-probs) come first

    @property
    def object(self) -> str:
        return "text_completion"

    def first(self, c: ChoiceState) -> list[dict]:
        if not self.return_ids:
            return []
        ch = {"index": c.index, "text": "", "logprobs": None, "finish_reason": None, "token_ids": [],
              "prompt_token_ids": c.prompt_ids}
        return [{**self.envelope([ch], chunk=True), "prompt_token_ids": c.prompt_ids}]

    def opening(self, c: ChoiceState) -> list[dict]:
        if not self.echo:
            return []
        lps = self._prompt_logprobs(c) if self.logprobs is not None else None
        logprobs = self._logprobs(c, c.prompt_ids, lps, skip_special=False) if lps is not None else None
        c.chars = len(c.prompt_text)  # generated tokens' offsets index the text sent, whatever the tokenizer
        ch = {"index": c.index, "text": c.prompt_text, "logprobs": logprobs, "finish_reason": None}
        if self.return_ids:
            ch["token_ids"] = []
        return [self.envelope([ch], chunk=True)]

    def chunk(self, c, text, finish, ids, lps) -> dict:
        ch = {"index": c.index, "text": text, "logprobs": None, "finish_reason": finish}
        if self.logprobs is not None and ids:
            ch["logprobs"] = self._logprobs(c, ids, lps, skip_special=True)
        if self.return_ids:
            ch["token_ids"] = ids or []
        return self.envelope([ch], chunk=True)

    def choice(self, c, text, finish, ids, lps) -> dict:
        logprobs = None
        if self.logprobs is not None:
            parts = []
            if self.echo:
                parts.append(self._logprobs(c, c.prompt_ids, self._prompt_logprobs(c), skip_special=False))
                c.chars = len(c.prompt_text)
            parts.append(self._logprobs(c, ids, lps, skip_special=True))
            logprobs = {k: [x for p in parts for x in p[k]] for k in parts[0]}
        ch = {"index": c.index, "text": (c.prompt_text if self.echo else "") + text, "logprobs": logprobs,
              "finish_reason": finish}
        if self.return_ids:
            ch["token_ids"] = ids
            ch["prompt_token_ids"] = c.prompt_ids
        return ch

    @staticmethod
    def _prompt_logprobs(c: ChoiceState) -> list[TokenLogprob | None]:
        lps = c.job.handle.request.prompt_logprobs
        if lps is None or len(lps) != len(c.prompt_ids):
            raise RuntimeError("the runtime returned no prompt log-probabilities for an echo request")
        return lps

    def _logprobs(self, c: ChoiceState, ids: list[int], lps: list[TokenLogprob | None] | None,
                  skip_special: bool) -> dict:
        """The legacy object for `ids` (their logprobs `lps`), advancing the choice's text offset."""
        if lps is None and not ids:
            lps = []
        if lps is None or len(lps) != len(ids):
            raise RuntimeError("the runtime returned no log-probabilities for every token")
        t = self.tokens
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(ids, lps, strict=True):
            out["tokens"].append(t.text(tid))
            out["text_offset"].append(c.chars)
            c.chars += t.width(tid, skip_special)
            if lp is None:  # the prompt's first token: nothing before it to predict it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(lp.logprob))
            top: dict[str, float] = {}
            for alt, v in lp.top:  # descending; distinct ids have distinct strings
                top.setdefault(t.text(alt), _lp(v))
            out["top_logprobs"].append(top)
        return out


class ChatShape(Shape):
    """`chat.completion` / `chat.completion.chunk`; `logprobs` as `{content: [...]}`."""

    @property
    def object(self) -> str:
        return "chat.completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk"

    def first(self, c: ChoiceState) -> list[dict]:
        ch = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        if self.return_ids:
            ch["token_ids"] = []
            ch["prompt_token_ids"] = c.prompt_ids
        out = self.envelope([ch], chunk=True)
        if self.return_ids:
            out["prompt_token_ids"] = c.prompt_ids
        return [out]

    def chunk(self, c, text, finish, ids, lps) -> dict:
        ch = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
        if self.logprobs is not None and ids:
            ch["logprobs"] = {"content": self._content(ids, lps), "refusal": None}
        if self.return_ids:
            ch["token_ids"] = ids or []
        return self.envelope([ch], chunk=True)

    def choice(self, c, text, finish, ids, lps) -> dict:
        ch = {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}
        if self.logprobs is not None:
            ch["logprobs"] = {"content": self._content(ids, lps), "refusal": None}
        if self.return_ids:
            ch["token_ids"] = ids
            ch["prompt_token_ids"] = c.prompt_ids
        return ch

    def _content(self, ids: list[int], lps: list[TokenLogprob] | None) -> list[dict]:
        if lps is None and not ids:
            lps = []
        if lps is None or len(lps) != len(ids):
            raise RuntimeError("the runtime returned no log-probabilities for every token")
        t = self.tokens
        return [{"token": t.text(lp.token), "logprob": _lp(lp.logprob), "bytes": list(t.bytes(lp.token)),
                 "top_logprobs": [{"token": t.text(a), "logprob": _lp(v), "bytes": list(t.bytes(a))}
                                  for a, v in lp.top]}
                for lp in lps]


def sse(obj: dict | str) -> str:
    """One server-sent event: a JSON body (compact) or a literal such as [DONE]."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"
