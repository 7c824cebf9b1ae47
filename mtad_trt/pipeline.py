"""The embeddable Python API.

    from mtad_trt import Pipeline
    pipe = Pipeline.load("engines/qwen-coder")                       # backend="auto"
    out = pipe.generate("def fib(n):", decoder="mtad", gamma=4, beam_width=4, threshold=0.5)
    for piece in pipe.stream("Hello", decoder="ar", max_new_tokens=32): print(piece.text, end="")

A Pipeline owns one engine per role and one `Sequence` per engine (batch row 0): it serves one
request at a time (a lock enforces it; the server queues in front of it). The lower-level pieces
— `load_engine`, `Sequence`, the decoder generators and `drive` — are the session/step API a C
API would mirror: explicit create/close, buffers allocated at load, no allocation in the step
loop beyond bookkeeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from mtad_trt.backends import choose_backend, load_engine
from mtad_trt.decoders import DECODER_FNS, Stats, drive
from mtad_trt.errors import CapacityError, EngineFolderError, MtadError
from mtad_trt.manifest import Manifest
from mtad_trt.params import DecodeParams, SamplingParams
from mtad_trt.sequence import Sequence

_SP = {f.name for f in fields(SamplingParams)}
_DP = {f.name for f in fields(DecodeParams)}


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


def split_settings(kwargs: dict) -> tuple[SamplingParams, DecodeParams]:
    """Keyword arguments -> validated (SamplingParams, DecodeParams); unknown names are refused."""
    unknown = set(kwargs) - _SP - _DP
    if unknown:
        raise MtadError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    sp = SamplingParams(**{k: v for k, v in kwargs.items() if k in _SP})
    dp = DecodeParams(**{k: v for k, v in kwargs.items() if k in _DP})
    sp.stop_token_ids = tuple(sp.stop_token_ids)
    sp.stop = tuple([sp.stop] if isinstance(sp.stop, str) else sp.stop)
    sp.validate()
    dp.validate()
    return sp, dp


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, tokenizer, target, draft, backend: str) -> None:
        self.folder, self.manifest, self.tokenizer = folder, manifest, tokenizer
        self.backend = backend
        self.target, self.draft = Sequence(target), (Sequence(draft) if draft is not None else None)
        self.eos_ids = set(manifest.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
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
        target = load_engine(folder, manifest, "target", backend, device, threads)
        draft = None
        if load_draft and "draft" in manifest.roles:
            draft = load_engine(folder, manifest, "draft", backend, device, draft_threads or threads)
        return cls(folder, manifest, tokenizer, target, draft, f"{backend}-{device}")

    def close(self) -> None:
        self.target.engine.close()
        if self.draft is not None:
            self.draft.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def capacity(self) -> int:
        cap = self.target.capacity
        return min(cap, self.draft.capacity) if self.draft is not None else cap

    # -- text ----------------------------------------------------------------------------------
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

    # -- generation ----------------------------------------------------------------------------
    def check_fits(self, prompt_len: int, sp: SamplingParams, dp: DecodeParams) -> None:
        """Refuse up front what cannot fit the KV cache (message names the capacity)."""
        if prompt_len == 0:
            raise MtadError("the prompt is empty")
        scratch = 0 if dp.decoder == "ar" else dp.gamma * max(dp.beam_width, 1) + 1
        need = prompt_len + sp.max_new_tokens + scratch
        if need > self.capacity:
            room = self.capacity - prompt_len - scratch
            raise CapacityError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({sp.max_new_tokens}) + decoder scratch ({scratch}) "
                f"exceeds the engine capacity of {self.capacity} tokens"
                + (f"; at most {room} new tokens fit" if room > 0 else "")
            )

    def stream_ids(self, prompt_ids: list[int], stats: Stats | None = None, **settings) -> Iterator[list[int]]:
        """Yield generated token-id chunks. Closing the iterator cancels the request."""
        sp, dp = split_settings(settings)
        if dp.decoder != "ar" and self.draft is None:
            raise MtadError(f"decoder '{dp.decoder}' needs a draft model; this engine folder has none")
        self.check_fits(len(prompt_ids), sp, dp)
        stats = stats if stats is not None else Stats()
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids)
        if not self._lock.acquire(blocking=False):
            raise MtadError("this Pipeline is busy with another request (one at a time; the server queues)")
        try:
            yield from drive(DECODER_FNS[dp.decoder], self.target, self.draft, prompt_ids, sp, dp, stats, stop_ids)
        finally:
            self._lock.release()

    def stream(self, prompt: str | list[int], chat: bool = False, stats: Stats | None = None, **settings) -> Iterator[Piece]:
        """Yield text pieces as tokens arrive; stop strings end the stream before they appear."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        stats = stats if stats is not None else Stats()
        stops = settings.get("stop") or ()
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        hold = max((len(s) for s in stops), default=1) - 1  # chars held back: a stop may still be forming
        gen = self.stream_ids(ids, stats=stats, **settings)
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

    def generate(self, prompt: str | list[int], chat: bool = False, **settings) -> Output:
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        stats = Stats()
        token_ids: list[int] = []
        parts: list[str] = []
        t0 = time.perf_counter()
        for piece in self.stream(ids, stats=stats, **settings):
            token_ids.extend(piece.token_ids)
            parts.append(piece.text)
        stats.wall_s = max(stats.wall_s, time.perf_counter() - t0)
        sp, dp = split_settings(settings)
        return Output("".join(parts), token_ids, ids, stats, stats.finish_reason, _settings(sp, dp))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _settings(sp: SamplingParams, dp: DecodeParams) -> dict:
    d = {f.name: getattr(sp, f.name) for f in fields(sp)}
    d.update({f.name: getattr(dp, f.name) for f in fields(dp) if f.name != "extra"})
    return d


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise EngineFolderError(f"engine folder has no tokenizer at {path}: re-export the engine")
    return AutoTokenizer.from_pretrained(str(path))
