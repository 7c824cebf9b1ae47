"""Prometheus metrics named like vLLM's (`vllm:` -> `mtad_trt:`), fed by the runtime's events.

`ServerMetrics` is an `Observer` of the runtime client: the runtime says what happened to a
request (waiting, started, tokens, finished, dropped) and this module turns it into samples.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mtad_trt.client import Handle
from mtad_trt.engine.stats import Stats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """Prometheus metrics named like vLLM's (`vllm:` -> `mtad_trt:`), in a registry of their own.

    A per-app registry (not the global one) lets tests and notebooks build several apps in one
    process without "duplicated timeseries" errors.
    """

    def __init__(self, model_name: str, prefix_cache: bool = False) -> None:
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
        self.queue_time = hist("request_queue_time_seconds", "Time spent waiting for the runtime.")
        self.running = Gauge("mtad_trt:num_requests_running", "Requests the runtime is generating.",
                             lab, registry=r).labels(name)
        self.waiting_gauge = Gauge("mtad_trt:num_requests_waiting", "Requests queued for the runtime.",
                             lab, registry=r).labels(name)
        self.batch_size = Histogram("mtad_trt:iteration_batch_size", "Requests running in one scheduler iteration.",
                                    lab, buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r).labels(name)
        self.iteration_time = hist("iteration_time_seconds",
                                   "One scheduler iteration (prefill chunk + draft calls + verify) for the whole batch.")
        self.prompt_tokens = count("prompt_tokens", "Prompt tokens of started requests.")
        self.generation_tokens = count("generation_tokens", "Generated tokens.")
        self.num_drafts = count("spec_decode_num_drafts", "Speculative draft+verify rounds.")
        self.num_draft_tokens = count("spec_decode_num_draft_tokens", "Drafted tokens put before the target.")
        self.num_accepted = count("spec_decode_num_accepted_tokens", "Drafted tokens the target accepted.")
        self._per_pos = Counter("mtad_trt:spec_decode_num_accepted_tokens_per_pos",
                                "Rounds that accepted at least position+1 drafted tokens.",
                                lab + ["position"], registry=r)
        self.prefix_cache = prefix_cache
        self.prefix_queries = count("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = count("prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled).")
        call_labels = lab + ["role", "phase"]
        self._call_seconds = Counter("mtad_trt:model_call_seconds", "Time in model calls, by model and phase "
                                     "(prefill, draft, target): with iteration_time, where a batch's time goes.",
                                     call_labels, registry=r)
        self._call_count = Counter("mtad_trt:model_calls", "Model calls, by model and phase.", call_labels, registry=r)
        self._call_rows = Counter("mtad_trt:model_call_rows", "Batch rows that carried a request, summed over calls.",
                                  call_labels, registry=r)
        self._call_tokens = Counter("mtad_trt:model_call_tokens", "rows x T fed, summed over calls (T = the widest "
                                    "row's tokens: narrower rows are padded to it).", call_labels, registry=r)
        self.host_seconds = count("iteration_host_seconds", "Iteration time outside model calls (scheduling, "
                                  "sampling, detokenizing, cache copies).")
        self._success = Counter("mtad_trt:request_success", "Finished requests by finish reason "
                                "(stop, length, cancelled).", lab + ["finished_reason"], registry=r)
        self._name = name
        self._lock = threading.Lock()
        self._running = 0
        self._last: dict[int, float] = {}  # handle id -> time its last tokens arrived (dropped at the end)
        self._iteration_s = 0.0

    def record(self, stats: Stats, e2e_s: float) -> None:
        """Add one finished (or cancelled) request's statistics."""
        self.e2e.observe(e2e_s)
        self.generation_tokens.inc(stats.generated_tokens)
        if self.prefix_cache and stats.prompt_tokens:
            self.prefix_queries.inc(stats.prompt_tokens)
            self.prefix_hits.inc(stats.cached_tokens)
        if stats.generated_tokens > 1:
            self.tpot.observe(max(0.0, stats.wall_s - stats.ttft_s) / (stats.generated_tokens - 1))
        if stats.decoder != "ar" and stats.iterations:
            self.num_drafts.inc(stats.iterations)
            self.num_draft_tokens.inc(stats.drafted_tokens)
            self.num_accepted.inc(stats.accepted_tokens)
            for pos, n in enumerate(stats.accepted_per_position):
                self._per_pos.labels(self._name, str(pos)).inc(n)
        self._success.labels(self._name, stats.finish_reason or "cancelled").inc()

    # -- the runtime's events (client.Observer) ---------------------------------------------------
    def waiting(self, n: int) -> None:
        self.waiting_gauge.set(n)

    def started(self, handle: Handle) -> None:
        req = handle.request
        self.queue_time.observe(req.started - req.arrived)
        self.prompt_tokens.inc(len(req.prompt_ids))
        with self._lock:
            self._running += 1
            self.running.set(self._running)

    def tokens(self, handle: Handle, count: int, now: float) -> None:
        last = self._last.get(id(handle))
        if last is None:
            self.ttft.observe(now - handle.request.arrived)
        else:
            self.itl.observe(now - last)
        self._last[id(handle)] = now

    def finished(self, handle: Handle) -> None:
        self._last.pop(id(handle), None)
        with self._lock:
            self._running -= 1
            self.running.set(self._running)
        self.record(handle.stats, time.perf_counter() - handle.request.arrived)

    def dropped(self, handle: Handle) -> None:
        self._success.labels(self._name, "cancelled").inc()

    def iteration(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.iteration_time.observe(seconds)
        self._iteration_s = seconds

    def model_calls(self, calls: list[tuple[str, str, int, int, float]]) -> None:
        in_calls = 0.0
        for role, phase, rows, t, seconds in calls:
            labels = (self._name, role, phase)
            self._call_seconds.labels(*labels).inc(seconds)
            self._call_count.labels(*labels).inc()
            self._call_rows.labels(*labels).inc(rows)
            self._call_tokens.labels(*labels).inc(rows * t)
            in_calls += seconds
        self.host_seconds.inc(max(0.0, self._iteration_s - in_calls))
