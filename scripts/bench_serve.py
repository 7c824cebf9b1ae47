#!/usr/bin/env python3
"""Load generator for `mtad-trt serve`: N concurrent streaming clients, M requests each.

    python scripts/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 8 \\
        --max-tokens 64 --ignore-eos [--prompts FILE] [--chat] [--extra '{"decoder": "mtad"}']

For each concurrency level it prints one table row and, at the end, the same numbers as JSON:
requests/s and output tokens/s over the level's wall time, and p50/p99 of time to first token
(TTFT), inter-token latency (ITL: the gap between successive streamed chunks that carry tokens,
i.e. per decoder round, as vLLM counts it; a speculative round carries several tokens), time
per output token (TPOT, per request: (e2e - TTFT) / (tokens - 1)) and end-to-end latency.

Why it asks for `return_token_ids`: the server then sends a chunk for every decoder round, even
one whose text is still held back (an incomplete UTF-8 character, a possible stop string), so
the client sees every round's arrival time and token count. Usage comes from the final usage
chunk (`stream_options.include_usage`).

Where the time went (from the server's /metrics, as deltas over each level): model-call seconds
per model and phase (prefill, draft, target) with their calls, rows and rows x T, iteration time
outside model calls ("host"), and prefix-cache queries / hits in tokens.

`--long-prompt-tokens L`: one more request, with a prompt of about L tokens, starts one second
into the level; the row reports the other streams' inter-token latency p99 while its prefill
runs (between its start and its first token) beside their p99 outside that window.

Loopback only unless --allow-remote: this is a load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mtad_trt.bench.metrics import percentiles

BUILTIN_PROMPTS = [
    "def fib(n):",
    "The quick brown fox",
    "import numpy as np\n",
    "Once upon a time",
    "Write a function that checks whether a string is a palindrome.",
    "class Stack:\n    def __init__(self):",
    "Explain speculative decoding in one paragraph.",
    "for i in range(10):",
]


@dataclass
class Result:
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float = 0.0
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)  # between successive token-carrying chunks
    chunk_at: list[float] = field(default_factory=list)  # perf_counter() of every token-carrying chunk
    started_at: float = 0.0
    mtad: dict = field(default_factory=dict)  # the request's stats (what γ/B the runtime used)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.tokens > 0

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


async def one_request(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    res = Result()
    t0 = res.started_at = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", path, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:200]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error")
                    continue
                if obj.get("usage"):
                    res.tokens = obj["usage"]["completion_tokens"]
                if obj.get("mtad"):
                    res.mtad = obj["mtad"]
                if obj.get("choices") and obj["choices"][0].get("token_ids"):
                    now = time.perf_counter()
                    res.chunk_at.append(now)
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.gaps_s.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    res.e2e_s = time.perf_counter() - t0
    return res


def _p(values: list[float], q: int) -> float | None:
    return percentiles(values, (q,))[f"p{q}"] if values else None


def summarize(concurrency: int, results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.gaps_s]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.tokens for r in ok)
    rounds = sum(len(r.gaps_s) + 1 for r in ok)
    errors = [f"{r.status} {r.error}" for r in results if not r.ok]
    rounds_spec = sum(r.mtad.get("iterations", 0) for r in ok)
    plain = sum(r.mtad.get("plain_steps", 0) for r in ok)
    return {
        # what the speculation policy used: mean γ per speculative round, share of plain steps
        "mean_gamma": sum(r.mtad.get("draft_positions", 0) for r in ok) / rounds_spec if rounds_spec else 0.0,
        "plain_step_share": plain / (plain + rounds_spec) if plain + rounds_spec else 0.0,
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "tokens_per_chunk": tokens / rounds if rounds else 0.0,
        **{f"{name}_{q}_ms": (v * 1e3 if (v := _p(vals, int(q[1:]))) is not None else None)
           for name, vals in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)) for q in ("p50", "p99")},
    }


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The counters of where time goes (see the module docstring), keyed by sample line."""
    keep = ("mtad_trt:model_call", "mtad_trt:iteration_host_seconds_total", "mtad_trt:iteration_time_seconds_sum",
            "mtad_trt:prefix_cache_")
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(keep):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict:
    """Deltas of the scraped counters: per (role, phase) seconds, calls, mean rows, mean rows x T."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    names = {"mtad_trt:model_call_seconds_total": "seconds", "mtad_trt:model_calls_total": "calls",
             "mtad_trt:model_call_rows_total": "rows", "mtad_trt:model_call_tokens_total": "tokens"}
    calls: dict[str, dict] = {}
    for key, v in delta.items():
        name = key.split("{", 1)[0]
        if name not in names:
            continue
        labels = dict(part.split("=", 1) for part in key[key.index("{") + 1 : -1].replace('"', "").split(","))
        calls.setdefault(f"{labels['role']}/{labels['phase']}", {})[names[name]] = v
    for c in calls.values():
        n = c.get("calls", 0.0)
        c["mean_rows"] = c.get("rows", 0.0) / n if n else 0.0
        c["mean_tokens"] = c.get("tokens", 0.0) / n if n else 0.0
    pick = lambda prefix: next((v for k, v in delta.items() if k.startswith(prefix)), 0.0)  # noqa: E731
    return {"calls": calls, "iteration_s": pick("mtad_trt:iteration_time_seconds_sum"),
            "host_s": pick("mtad_trt:iteration_host_seconds_total"),
            "prefix_cache_queries": pick("mtad_trt:prefix_cache_queries_total"),
            "prefix_cache_hits": pick("mtad_trt:prefix_cache_hits_total")}


def during(results: list[Result], start: float, end: float) -> dict:
    """Other streams' ITL p99 inside [start, end] (a long prefill) and outside it."""
    inside, outside = [], []
    for r in results:
        for a, b in zip(r.chunk_at, r.chunk_at[1:], strict=False):
            (inside if a < end and b > start else outside).append(b - a)
    p = lambda xs: _p(xs, 99) * 1e3 if xs else None  # noqa: E731
    return {"itl_p99_during_long_prefill_ms": p(inside), "itl_p99_otherwise_ms": p(outside),
            "gaps_during_long_prefill": len(inside)}


async def run_level(args, concurrency: int, prompts: list[str], body_extra: dict, model: str) -> dict:
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits,
                                 trust_env=False) as client:

        def body(k: int) -> dict:
            prompt = prompts[k % len(prompts)]
            b = {"model": model, "max_tokens": args.max_tokens, "stream": True,
                 "stream_options": {"include_usage": True}, "return_token_ids": True}
            if args.chat:
                b["messages"] = [{"role": "user", "content": prompt}]
            else:
                b["prompt"] = prompt
            if args.temperature is not None:
                b["temperature"] = args.temperature
            if args.ignore_eos:
                b["ignore_eos"] = True
            return {**b, **body_extra}

        await one_request(client, path, body(0))  # warm-up: connection, first-call costs

        async def user(u: int) -> list[Result]:
            return [await one_request(client, path, body(u * args.requests + j)) for j in range(args.requests)]

        async def long_one() -> Result:
            await asyncio.sleep(1.0)
            b = body(0)
            text = " ".join(["word"] * args.long_prompt_tokens)
            b.update({"messages": [{"role": "user", "content": text}]} if args.chat else {"prompt": text})
            return await one_request(client, path, {**b, "max_tokens": 4})

        before = await scrape(client)
        t0 = time.perf_counter()
        jobs = [user(u) for u in range(concurrency)]
        if args.long_prompt_tokens:
            *per_user, long_res = await asyncio.gather(*jobs, long_one())
        else:
            per_user, long_res = await asyncio.gather(*jobs), None
        wall = time.perf_counter() - t0
        after = await scrape(client)
    results = [r for rs in per_user for r in rs]
    row = summarize(concurrency, results, wall)
    row["where_time_went"] = breakdown(before, after)
    if long_res is not None and long_res.ttft_s is not None:
        row["long_prompt"] = {"tokens_asked": args.long_prompt_tokens, "ttft_ms": long_res.ttft_s * 1e3,
                              **during(results, long_res.started_at, long_res.started_at + long_res.ttft_s)}
    return row


def print_table(rows: list[dict]) -> None:
    cols = [("N", "concurrency", "{:>3}"), ("reqs", "requests", "{:>5}"), ("err", "errors", "{:>4}"),
            ("req/s", "requests_per_s", "{:>7.2f}"), ("out tok/s", "output_tokens_per_s", "{:>9.1f}"),
            ("tok/chunk", "tokens_per_chunk", "{:>9.2f}"),
            ("TTFT p50", "ttft_p50_ms", "{:>9.1f}"), ("TTFT p99", "ttft_p99_ms", "{:>9.1f}"),
            ("ITL p50", "itl_p50_ms", "{:>8.2f}"), ("ITL p99", "itl_p99_ms", "{:>8.2f}"),
            ("TPOT p50", "tpot_p50_ms", "{:>9.2f}"), ("e2e p50", "e2e_p50_ms", "{:>8.1f}"),
            ("e2e p99", "e2e_p99_ms", "{:>8.1f}"), ("mean γ", "mean_gamma", "{:>6.2f}"),
            ("plain", "plain_step_share", "{:>5.2f}")]
    print(" | ".join(h for h, _, _ in cols) + "   (latencies in ms)")
    for row in rows:
        cells = []
        for h, key, fmt in cols:
            v = row[key]
            cells.append(fmt.format(v) if v is not None else f"{'-':>{len(h)}}")
        print(" | ".join(c.rjust(len(h)) for c, (h, _, _) in zip(cells, cols, strict=True)))


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = False
    if not loop:
        sys.exit(f"error: {url} is not a loopback address (pass --allow-remote to load a remote server)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL.")
    ap.add_argument("--concurrency", default="1,4,16", help="Comma-separated client counts N.")
    ap.add_argument("--requests", type=int, default=8, help="Requests per client M (sequential).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=None, help="Default: the server's.")
    ap.add_argument("--ignore-eos", action="store_true", help="Generate exactly --max-tokens tokens.")
    ap.add_argument("--chat", action="store_true", help="Use /v1/chat/completions.")
    ap.add_argument("--prompts", type=Path, help="Text file, one prompt per line (default: built-in prompts).")
    ap.add_argument("--extra", default="{}", help='Extra JSON body fields, e.g. \'{"decoder": "mtad", "gamma": 4}\'.')
    ap.add_argument("--model", help="Model id (default: the server's first model).")
    ap.add_argument("--api-key", help="Bearer key, when the server was started with --api-key.")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, help="Also write the JSON here.")
    ap.add_argument("--long-prompt-tokens", type=int, default=0,
                    help="Also send one request with a prompt of about this many tokens, 1 s into each level.")
    ap.add_argument("--allow-remote", action="store_true")
    args = ap.parse_args(argv)
    if not args.allow_remote:
        _check_loopback(args.url)
    prompts = BUILTIN_PROMPTS
    if args.prompts:
        prompts = [line for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            sys.exit(f"error: {args.prompts} has no prompts")
    extra = json.loads(args.extra)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(f"{args.url}/v1/models", headers=headers, trust_env=False, timeout=30).json()
    except httpx.HTTPError as e:
        sys.exit(f"error: cannot reach {args.url}: {e}")
    model = args.model or models["data"][0]["id"]
    rows = [asyncio.run(run_level(args, n, prompts, extra, model)) for n in levels]
    print_table(rows)
    out = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
           "chat": args.chat, "extra": extra, "temperature": args.temperature, "ignore_eos": args.ignore_eos,
           "levels": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
