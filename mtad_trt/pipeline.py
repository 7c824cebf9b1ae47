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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtad_trt.backends import available_bytes, check_memory, choose_backend, default_max_batch, load_runner
from mtad_trt.backends.host import default_threads
from mtad_trt.backends.rows import Row
from mtad_trt.engine.logprobs import TokenLogprob
from mtad_trt.engine.params import split_settings
from mtad_trt.engine.policy import make_policy
from mtad_trt.engine.prefix_cache import PrefixCache
from mtad_trt.engine.request import Piece, Request
from mtad_trt.engine.scheduler import Scheduler, Update
from mtad_trt.engine.scoring import token_logprobs
from mtad_trt.engine.stats import Stats
from mtad_trt.errors import CapacityError, MtadError
from mtad_trt.folder.manifest import Manifest
from mtad_trt.folder.tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per scheduler step (see docs/serve.md for what it costs)


@dataclass
class Output:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: Stats
    finish_reason: str
    settings: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # per token id, when `logprobs=k` was asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt id (first None), when asked

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
    max_batch: int = 1  # requests that run at once (batch rows)
    prefix_cache_bytes: int = 0  # the prefix cache's pool (0: off)


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
    """One runner per role and a scheduler over their batch rows (`max_batch` requests at once).

    `generate` / `stream` run the scheduler in the caller's thread (one caller at a time: a lock
    enforces it); `generate` over a list of prompts batches them. A server drives the same
    scheduler from a thread of its own (`client.RuntimeClient`). `Pipeline.load` is the usual way in.
    """

    def __init__(self, folder: Path, manifest: Manifest, tokenizer, target, draft, backend: str,
                 max_batch: int = 1, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, spec_policy: str = "fixed",
                 threads: int | None = None, prefix_cache: PrefixCache | None = None,
                 keep_joint_verification: bool = True) -> None:
        self.folder, self.manifest, self.tokenizer = folder, manifest, tokenizer
        self.backend = backend
        self.target, self.draft = target, draft
        self.eos_ids = set(manifest.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        policy = make_policy(spec_policy, target, draft, max_batch, folder, threads,
                             keep_joint_verification=keep_joint_verification)
        self.scheduler = Scheduler(target, draft, tokenizer, self.eos_ids, max_batch, prefill_chunk,
                                   policy=policy, prefix_cache=prefix_cache)
        self.threads = threads
        self.choices: dict[str, str] = {}  # what Pipeline.load picked by rule, and why (front ends log it)
        self._encoder = Encoder(tokenizer)
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        folder: str | Path,
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        draft_threads: int | None = None,
        load_draft: bool = True,
        max_batch: int | None = 1,
        prefill_chunk: int | None = None,
        spec_policy: str = "fixed",
        prefix_cache_mb: float | None = None,
        keep_joint_verification: bool = True,
    ) -> Pipeline:
        """Load an engine folder. `None` picks by rule (recorded in `choices`): `threads` = the
        physical cores (`backends.host`), `max_batch` = what fits memory (`backends.default_max_batch`),
        `prefix_cache_mb` = min(512, 1/8 of available memory); 0 turns the prefix cache off.
        `keep_joint_verification=False` lets the `auto` policy run MTAD/MMTAD requests as plain
        steps (γ = 0) when that is faster (a throughput-first server)."""
        folder = Path(folder)
        manifest = Manifest.load(folder)
        if max_batch is not None and max_batch < 1:
            raise MtadError(f"--max-batch must be >= 1, got {max_batch}")
        backend, device = choose_backend(manifest, backend, device)
        roles = ["target"] + (["draft"] if load_draft and "draft" in manifest.roles else [])
        choices = {}
        if threads is None:
            threads = default_threads()
            choices["threads"] = f"{threads} (the physical cores this process may use)"
        if max_batch is None:
            max_batch, choices["max_batch"] = default_max_batch(manifest, roles, device, folder)
        check_memory(manifest, roles, max_batch, device, folder)
        prefix = _prefix_cache(prefix_cache_mb, choices)
        tokenizer = Tokenizer(folder / manifest.tokenizer)
        target = load_runner(folder, manifest, "target", backend, device, threads, batch=max_batch)
        draft = None
        if "draft" in roles:
            draft = load_runner(folder, manifest, "draft", backend, device, draft_threads or threads, batch=max_batch)
        pipe = cls(folder, manifest, tokenizer, target, draft, f"{backend}-{device}", max_batch,
                   prefill_chunk or DEFAULT_PREFILL_CHUNK, spec_policy, threads, prefix, keep_joint_verification)
        pipe.choices = choices
        return pipe

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.scheduler.prefix_cache

    def close(self) -> None:
        self.target.close()
        if self.draft is not None:
            self.draft.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what a front end may know ---------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The most tokens a request may use: prompt + output + decoder scratch."""
        cap = self.target.spec.max_seq_len
        return min(cap, self.draft.spec.max_seq_len) if self.draft is not None else cap

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.folder.name,
            backend=self.backend,
            max_model_len=self.capacity,
            vocab_size=min(e.spec.vocab_size for e in self.manifest.roles.values()),
            has_draft=self.draft is not None,
            max_batch=self.max_batch,
            prefix_cache_bytes=self.prefix_cache.capacity_bytes if self.prefix_cache is not None else 0,
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
    def prepare(self, prompt_ids: list[int], default_max_new_tokens: int | None = None,
                defaults: dict | None = None, **settings) -> Request:
        """Validate settings and refuse up front what cannot run or fit (messages name the limit).

        Without `max_new_tokens` in `settings`, the request gets what fits the capacity, capped
        at `default_max_new_tokens` when given (OpenAI's completions default is 16). `settings`
        are the request's own, and fixed: a speculation policy may move only what the request left
        unset (`defaults`, e.g. a server's --gamma, fill in the rest without fixing it).
        """
        fixed = frozenset(settings)
        settings = {**(defaults or {}), **settings}
        if not prompt_ids:
            raise MtadError("the prompt is empty", param="prompt")
        vocab = self.info().vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise MtadError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        sp, dp = split_settings(settings)
        scoring_only = settings.get("max_new_tokens") == 0  # the prompt's log-probs alone: target only
        if dp.speculative and self.draft is None and not scoring_only:
            raise MtadError(f"decoder '{dp.decoder}' needs a draft model; this engine folder has none", param="decoder")
        scratch = 0 if scoring_only else dp.scratch_slots
        room = self.capacity - len(prompt_ids) - scratch
        if "max_new_tokens" not in settings:
            sp.max_new_tokens = max(1, room if default_max_new_tokens is None else min(default_max_new_tokens, room))
        if sp.max_new_tokens > room:
            raise CapacityError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({sp.max_new_tokens}) + decoder scratch ({scratch}) "
                f"exceeds the engine capacity of {self.capacity} tokens"
                + (f"; at most {room} new tokens fit" if room > 0 else "")
            )
        return Request(list(prompt_ids), sp, dp, fixed=fixed)

    def run(self, requests: list[Request]) -> Iterator[Update]:
        """Run prepared requests to the end as one batch, yielding each step's updates.
        Closing the iterator cancels whatever has not finished."""
        with self._lock:
            try:
                incoming = list(requests)
                while not all(r.finished for r in requests):
                    yield from self.scheduler.iterate(incoming).updates
                    incoming = []
            finally:
                for req in requests:
                    self.scheduler.abort(req)

    def stream_request(self, req: Request) -> Iterator[Piece]:
        """Yield text pieces of a prepared request; stop strings end it before they appear.
        Closing the iterator cancels the request."""
        for update in self.run([req]):
            if update.request.error is not None:
                raise update.request.error
            if update.piece is not None:
                yield update.piece

    def stream_ids(self, prompt_ids: list[int], **settings) -> Iterator[list[int]]:
        """Yield generated token-id chunks. Closing the iterator cancels the request."""
        return (p.token_ids for p in self.stream_request(self.prepare(prompt_ids, **settings)) if p.token_ids)

    def stream(self, prompt: str | list[int], chat: bool = False, stats: Stats | None = None, **settings) -> Iterator[Piece]:
        """Yield text pieces as tokens arrive; stop strings end the stream before they appear.
        `stats`, when given, is filled in as the request runs."""
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        req = self.prepare(ids, **settings)
        if stats is not None:
            req.stats = stats
        return self.stream_request(req)

    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], chat: bool = False,
                 settings: list[dict] | None = None, **common) -> Output | list[Output]:
        """One prompt -> one Output. A list of prompts -> a list of Outputs, run as one batch of up
        to `max_batch` rows (like vLLM's LLM.generate); `settings` gives per-prompt settings
        (e.g. seeds) on top of the common ones."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompts = [self.encode(p, chat=chat) if isinstance(p, str) else list(p) for p in prompt]
            per = settings or [{} for _ in prompts]
            if len(per) != len(prompts):
                raise MtadError(f"{len(prompts)} prompts but {len(per)} settings")
            reqs = [self.prepare(ids, **{**common, **s}) for ids, s in zip(prompts, per, strict=True)]
            for _ in self.run(reqs):
                pass
            return [self._output(r) for r in reqs]
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        req = self.prepare(ids, **common)
        text = "".join(p.text for p in self.stream_request(req))
        return self._output(req, text)

    def _output(self, req: Request, text: str | None = None) -> Output:
        if req.error is not None:
            raise req.error
        if text is None:
            text = req.detok.text if req.detok is not None else ""
        return Output(text, list(req.output_ids), list(req.prompt_ids), req.stats, req.stats.finish_reason,
                      req.settings, list(req.output_logprobs) if req.sampling.logprobs is not None else None,
                      req.prompt_logprobs)

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
            if self.scheduler.busy:
                raise MtadError("cannot score while requests are running on this Pipeline")
            return token_logprobs(Row(self.target), prompt_ids, continuation)


PREFIX_CACHE_DEFAULT_MB = 512


def _prefix_cache(size_mb: float | None, choices: dict[str, str]) -> PrefixCache | None:
    """The prefix cache's pool (host memory, whatever the device): the size asked, or by rule."""
    have = available_bytes("cpu")
    if size_mb is None:
        size = PREFIX_CACHE_DEFAULT_MB * 2**20 if have is None else min(PREFIX_CACHE_DEFAULT_MB * 2**20, have // 8)
        choices["prefix_cache_mb"] = f"{size / 2**20:.0f} (MiB: min({PREFIX_CACHE_DEFAULT_MB}, 1/8 of available memory))"
        return PrefixCache(size)
    if size_mb < 0:
        raise MtadError(f"--prefix-cache-mb must be >= 0, got {size_mb:g}")
    if size_mb == 0:
        return None
    size = int(size_mb * 2**20)
    if have is not None and size > have:
        raise CapacityError(f"a prefix cache of {size_mb:g} MiB does not fit: {have / 2**20:.0f} MiB of host memory "
                            "is available (lower --prefix-cache-mb, or 0 to turn it off)")
    return PrefixCache(size)
