"""The embeddable Python API: load an engine folder, generate, stream or score text.

    from mtad_trt import Pipeline
    pipe = Pipeline.load("engines/qwen-coder")                       # backend="auto"
    out = pipe.generate("def fib(n):", decoder="mtad", gamma=4, beam_width=4, threshold=0.5)
    for piece in pipe.stream("Hello", decoder="ar", max_new_tokens=32): print(piece.text, end="")

Every rule about a request — which settings exist, what fits the KV cache, which decoders need a
draft model — lives here (and in `params`), so the server, the bench and the CLI never repeat it:
they call `info`, `prepare`, `stream_request` and `score`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtad_trt.backends import choose_backend, load_runner
from mtad_trt.decoders import DECODER_FNS, drive
from mtad_trt.errors import CapacityError, EngineFolderError, MtadError
from mtad_trt.manifest import Manifest
from mtad_trt.params import DecodeParams, SamplingParams, settings_dict, split_settings
from mtad_trt.rows import Row
from mtad_trt.scoring import token_logprobs
from mtad_trt.stats import Stats


@dataclass
class Piece:
    """One streamed increment: new token ids and the text they complete."""

    token_ids: list[int]
    text: str


@dataclass
class Output:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: Stats
    finish_reason: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
            "settings": self.settings,
        }


@dataclass(frozen=True)
class ModelInfo:
    """What a front end (server, bench) may know about a loaded engine folder."""

    name: str  # the engine folder's name
    backend: str  # "ort-cpu", "torch-cuda", "trt-cuda"
    max_model_len: int  # capacity: the most tokens (prompt + output + scratch) a request may use
    vocab_size: int
    has_draft: bool


@dataclass
class Request:
    """A request whose settings were validated and fitted (`Pipeline.prepare`)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    decode: DecodeParams

    @property
    def settings(self) -> dict[str, Any]:
        return settings_dict(self.sampling, self.decode)


class Encoder:
    """Prompt encoding with a tokenizer of its own, for a thread that is not the generating one.

    HF fast tokenizers are Rust objects that may raise "Already borrowed" when two threads use
    one at once, so a front end that tokenizes while the runtime decodes holds its own copy.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_chat(msgs)
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise MtadError("this engine's tokenizer has no chat template; send a plain prompt instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]


class Pipeline:
    """One runner per role and one batch row (row 0) on each: one request at a time (a lock
    enforces it; the server queues in front of it). `Pipeline.load` is the usual way in."""

    def __init__(self, folder: Path, manifest: Manifest, tokenizer, target, draft, backend: str) -> None:
        self.folder, self.manifest, self.tokenizer = folder, manifest, tokenizer
        self.backend = backend
        self.target, self.draft = Row(target), (Row(draft) if draft is not None else None)
        self.eos_ids = set(manifest.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self._encoder = Encoder(tokenizer)
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        folder: str | Path,
        backend: str = "auto",
        device: str = "auto",
        threads: int = 1,
        draft_threads: int | None = None,
        load_draft: bool = True,
    ) -> Pipeline:
        folder = Path(folder)
        manifest = Manifest.load(folder)
        backend, device = choose_backend(manifest, backend, device)
        tokenizer = load_tokenizer(folder / manifest.tokenizer)
        target = load_runner(folder, manifest, "target", backend, device, threads)
        draft = None
        if load_draft and "draft" in manifest.roles:
            draft = load_runner(folder, manifest, "draft", backend, device, draft_threads or threads)
        return cls(folder, manifest, tokenizer, target, draft, f"{backend}-{device}")

    def close(self) -> None:
        self.target.runner.close()
        if self.draft is not None:
            self.draft.runner.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what a front end may know ---------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The most tokens a request may use: prompt + output + decoder scratch."""
        cap = self.target.capacity
        return min(cap, self.draft.capacity) if self.draft is not None else cap

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.folder.name,
            backend=self.backend,
            max_model_len=self.capacity,
            vocab_size=min(e.spec.vocab_size for e in self.manifest.roles.values()),
            has_draft=self.draft is not None,
        )

    def encoder(self) -> Encoder:
        """An encoder with its own tokenizer copy (see `Encoder`)."""
        return Encoder(copy.deepcopy(self.tokenizer))

    # -- text ----------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        return self._encoder.encode(prompt, chat, system)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._encoder.encode_chat(messages)

    # -- requests ------------------------------------------------------------------------------
    def prepare(self, prompt_ids: list[int], default_max_new_tokens: int | None = None, **settings) -> Request:
        """Validate settings and refuse up front what cannot run or fit (messages name the limit).

        Without `max_new_tokens` in `settings`, the request gets what fits the capacity, capped
        at `default_max_new_tokens` when given (OpenAI's completions default is 16).
        """
        if not prompt_ids:
            raise MtadError("the prompt is empty", param="prompt")
        vocab = self.info().vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise MtadError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        sp, dp = split_settings(settings)
        if dp.speculative and self.draft is None:
            raise MtadError(f"decoder '{dp.decoder}' needs a draft model; this engine folder has none", param="decoder")
        scratch = dp.scratch_slots
        room = self.capacity - len(prompt_ids) - scratch
        if "max_new_tokens" not in settings:
            sp.max_new_tokens = max(1, room if default_max_new_tokens is None else min(default_max_new_tokens, room))
        if sp.max_new_tokens > room:
            raise CapacityError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({sp.max_new_tokens}) + decoder scratch ({scratch}) "
                f"exceeds the engine capacity of {self.capacity} tokens"
                + (f"; at most {room} new tokens fit" if room > 0 else "")
            )
        return Request(list(prompt_ids), sp, dp)

    def stream_request(self, req: Request, stats: Stats | None = None) -> Iterator[Piece]:
        """Yield text pieces of a prepared request; stop strings end it before they appear.
        Closing the iterator cancels the request."""
        stats = stats if stats is not None else Stats()
        stops = req.sampling.stop
        hold = max((len(s) for s in stops), default=1) - 1  # chars held back: a stop may still be forming
        gen = self._token_chunks(req, stats)
        out: list[int] = []
        sent = 0
        try:
            for chunk in gen:
                out.extend(chunk)
                text = self._decode(out)
                cut = _find_stop(text, stops)
                if cut is not None:
                    stats.finish_reason = "stop"
                    if cut > sent:
                        yield Piece(chunk, text[sent:cut])
                    return
                safe = len(text) - hold if stops else len(text)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield Piece(chunk, text[sent:safe])
                    sent = safe
                else:
                    yield Piece(chunk, "")
            text = self._decode(out)
            if len(text) > sent:
                yield Piece([], text[sent:])
        finally:
            gen.close()

    def _token_chunks(self, req: Request, stats: Stats) -> Iterator[list[int]]:
        sp, dp = req.sampling, req.decode
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids)
        if not self._lock.acquire(blocking=False):
            raise MtadError("this Pipeline is busy with another request (one at a time; the server queues)")
        try:
            yield from drive(DECODER_FNS[dp.decoder], self.target, self.draft, req.prompt_ids, sp, dp, stats, stop_ids)
        finally:
            self._lock.release()

    def stream_ids(self, prompt_ids: list[int], stats: Stats | None = None, **settings) -> Iterator[list[int]]:
        """Yield generated token-id chunks (no detokenizing). Closing the iterator cancels the request."""
        return self._token_chunks(self.prepare(prompt_ids, **settings), stats if stats is not None else Stats())

    def stream(self, prompt: str | list[int], chat: bool = False, stats: Stats | None = None, **settings) -> Iterator[Piece]:
        """Yield text pieces as tokens arrive; stop strings end the stream before they appear."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        return self.stream_request(self.prepare(ids, **settings), stats)

    def generate(self, prompt: str | list[int], chat: bool = False, **settings) -> Output:
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        req = self.prepare(ids, **settings)
        stats = Stats()
        token_ids: list[int] = []
        parts: list[str] = []
        t0 = time.perf_counter()
        for piece in self.stream_request(req, stats):
            token_ids.extend(piece.token_ids)
            parts.append(piece.text)
        stats.wall_s = max(stats.wall_s, time.perf_counter() - t0)
        return Output("".join(parts), token_ids, ids, stats, stats.finish_reason, req.settings)

    # -- scoring -------------------------------------------------------------------------------
    def score(self, prompt_ids: list[int], continuation: list[int], cut_at_eos: bool = True) -> np.ndarray:
        """Raw-target log-probs of `continuation` after `prompt_ids` (no temperature, top-k or top-p).

        With cut_at_eos the continuation ends before its first EOS (the EOS itself is not scored),
        which is how generated text is judged: nothing after EOS was meant to be read.
        """
        if cut_at_eos:
            continuation = continuation[: next((i for i, t in enumerate(continuation) if t in self.eos_ids),
                                               len(continuation))]
        if not continuation:
            return np.zeros(0)
        with self._lock:
            return token_logprobs(self.target, prompt_ids, continuation)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise EngineFolderError(f"engine folder has no tokenizer at {path}: re-export the engine")
    return AutoTokenizer.from_pretrained(str(path))
