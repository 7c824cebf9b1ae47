"""The OpenAI-compatible request schemas (pydantic) and the response bodies built from results.

Strict on purpose: no "5" -> 5 coercions, an unknown field ("gama") is an error naming it rather
than a silently ignored setting, and OpenAI options that would change the answer but are not
implemented are refused (400) rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mtad_trt.params import DECODERS

# Settings a request may carry as extra body fields (vLLM-style), besides the OpenAI ones.
EXTRA_FIELDS = ("top_k", "decoder", "gamma", "beam_width", "threshold", "reference", "ignore_eos",
                "stop_token_ids", "return_token_ids")
# Request fields that map one-to-one onto runtime settings of the same name.
SETTING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                  "decoder", "gamma", "beam_width", "threshold", "reference")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def runtime_settings(self) -> dict[str, Any]:
        """The runtime settings this request asks for (the server's defaults fill in the rest)."""
        out = {name: getattr(self, name) for name in SETTING_FIELDS if getattr(self, name) is not None}
        if self.requested_max_tokens is not None:
            out["max_new_tokens"] = self.requested_max_tokens
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

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
