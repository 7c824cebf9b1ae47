"""What `mtad-trt serve` is configured with: one object, built once, read everywhere.

The CLI builds a `ServerSettings` from its flags, a Ray serve config's `args` are its fields, and
the single-process server, the app and every Ray replica read that same object: how to load the
engines (`load`), what the HTTP layer enforces (queue, body size, API key, drain) and the
request defaults. Plain JSON values, so Ray can ship it to replicas as a dict.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtad_trt.engine.params import split_settings
from mtad_trt.errors import MtadError

if TYPE_CHECKING:
    from mtad_trt.pipeline import Pipeline

log = logging.getLogger("mtad_trt.serve")


@dataclass
class ServerSettings:
    """The server's settings: engine loading, HTTP limits and the defaults requests inherit."""

    engines: str = ""  # the engine folder (same path on every node that runs a replica)
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None  # None: the machine's physical cores (backends.host)
    max_batch: int | None = None  # None: what fits memory, at most 16 (backends.default_max_batch)
    prefill_chunk: int | None = None  # None: the runtime's default
    spec_policy: str = "auto"
    throughput_first: bool = False  # the auto policy may run MTAD/MMTAD as plain steps (γ = 0)
    prefix_cache_mb: float | None = None  # None: min(512, 1/8 of available memory); 0: off
    model_name: str | None = None  # served model id; default: the engine folder's name
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 64  # requests waiting for a batch row (the running ones not counted)
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # the Retry-After header of a 429
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight and queued requests may still run
    defaults: dict[str, Any] = field(default_factory=dict)  # settings a request does not give (decoder, gamma...)
    wedge_timeout_s: float = 120.0  # a Ray replica's health check fails after this long without progress

    def validate(self) -> None:
        """Refuse bad settings at startup (before the slow engine load), not per request."""
        if self.max_queue < 1:
            raise MtadError(f"--max-queue must be >= 1, got {self.max_queue}")
        if self.max_batch is not None and self.max_batch < 1:
            raise MtadError(f"--max-batch must be >= 1, got {self.max_batch}")
        split_settings(dict(self.defaults))

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ServerSettings:
        """From a serve config's `args` (or what `to_dict` shipped): unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise MtadError(f"unknown mtad-trt server setting(s): {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
        return cls(**args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_environment(self) -> ServerSettings:
        """The API key from MTAD_TRT_API_KEY when none was given (a replica's own environment)."""
        if self.api_key:
            return self
        return ServerSettings(**{**self.to_dict(), "api_key": os.environ.get("MTAD_TRT_API_KEY") or None})

    def served_name(self, fallback: str) -> str:
        return self.model_name or (Path(self.engines).name if self.engines else fallback)

    def load(self) -> Pipeline:
        """Load the engine folder as these settings say (one Pipeline per process or replica)."""
        from mtad_trt.pipeline import Pipeline

        if not self.engines:
            raise MtadError("the server settings name no engine folder ('engines')")
        return Pipeline.load(self.engines, backend=self.backend, device=self.device, threads=self.threads,
                             max_batch=self.max_batch, prefill_chunk=self.prefill_chunk,
                             spec_policy=self.spec_policy, prefix_cache_mb=self.prefix_cache_mb,
                             keep_joint_verification=not self.throughput_first)

    def warn_if_exposed(self, host: str) -> None:
        """One warning when the server listens beyond loopback with no API key."""
        if not is_loopback(host) and not self.api_key:
            log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
