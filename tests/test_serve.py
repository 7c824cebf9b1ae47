"""The OpenAI-compatible server on a real loopback socket, driven by the official `openai` client
(and httpx for what the client would not send): results equal `Pipeline.generate`, every bad
input gets OpenAI's error shape and a 4xx, concurrency keeps outputs and fairness, a client that
disconnects frees the worker, and SIGTERM drains."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import stopped_cleanly, wait_healthy

from mtad_trt import Pipeline
from mtad_trt.serve import ServerSettings, ServerThread, create_app

MODEL = "tiny-pair"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["def fib(n):", "The quick brown fox", "import numpy as np\n", "Once upon a time"]


@pytest.fixture(scope="module")
def server_pipeline(pair_engine):
    with Pipeline.load(pair_engine, backend="ort") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def server(server_pipeline):
    app = create_app(server_pipeline, ServerSettings(model_name=MODEL, api_key=KEY, max_queue=32))
    with ServerThread(app) as url:
        yield SimpleNamespace(url=url, app=app)


@pytest.fixture(scope="module")
def client(server):
    # trust_env=False: never route loopback traffic through a proxy from the environment.
    with httpx.Client(trust_env=False, timeout=60) as hc:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, http_client=hc)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, trust_env=False, timeout=60) as c:
        yield c


def metric(http: httpx.Client, name: str, default: float | None = None, **labels) -> float:
    """One sample of the /metrics text; a missing sample fails the test unless `default` is given
    (a labelled counter appears only once something has counted it)."""
    text = http.get("/metrics").text
    want = {"model_name": MODEL, **labels}
    for line in text.splitlines():
        m = re.match(r"^([\w:]+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == want:
            return float(m.group(3))
    assert default is not None, f"{name}{labels} is not in /metrics"
    return default


def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- the happy paths, through the official client -------------------------------------------------
def test_completion_greedy_equals_generate(client, pair_pipeline):
    for prompt in PROMPTS[:2]:
        ref = pair_pipeline.generate(prompt, temperature=0, max_new_tokens=24, ignore_eos=True)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        c = r.choices[0]
        assert c.text == ref.text
        assert c.model_extra["token_ids"] == ref.token_ids
        assert r.model_extra["prompt_token_ids"] == ref.prompt_ids
        assert c.finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_ids), 24)
        mtad = r.model_extra["mtad"]
        assert mtad["decoder"] == "mtad" and mtad["generated_tokens"] == 24
        # one target call per round, and each round emits its accepted tokens + 1 (the last may be cut)
        assert mtad["target_calls"] == mtad["iterations"] > 0
        assert 0 <= mtad["accepted_tokens"] + mtad["iterations"] - 24 <= mtad["gamma"]


def test_completion_accepts_token_ids(client, pair_pipeline):
    ids = pair_pipeline.encode(PROMPTS[2])
    ref = pair_pipeline.generate(ids, temperature=0, max_new_tokens=10, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text


def test_chat_greedy_equals_generate(client, pair_pipeline):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "def fib(n):"}]
    ref = pair_pipeline.generate(pair_pipeline.encode_chat(msgs), temperature=0, max_new_tokens=20, ignore_eos=True)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(ref.prompt_ids)


def test_streaming_chat_with_usage(client, pair_pipeline):
    msgs = [{"role": "user", "content": "Hello world!"}]
    ref = pair_pipeline.generate(pair_pipeline.encode_chat(msgs), temperature=0, max_new_tokens=25, ignore_eos=True)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=25, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["mtad"]["generated_tokens"] == 25
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 25
    assert last.usage.total_tokens == len(ref.prompt_ids) + 25
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completion_equals_generate(client, pair_pipeline):
    ref = pair_pipeline.generate(PROMPTS[3], temperature=0, max_new_tokens=30, ignore_eos=True)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == ref.token_ids


def test_stop_sequences(client, pair_pipeline):
    full = pair_pipeline.generate(PROMPTS[0], temperature=0, max_new_tokens=30, ignore_eos=True)
    stop = full.text[5:8]
    assert stop
    cut = full.text[: full.text.find(stop)]
    for stops in (stop, [stop, "never-there"]):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stops)
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop], stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=2, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 2


@pytest.mark.parametrize("extra", [
    {"decoder": "ar"},
    {"decoder": "sps", "gamma": 2},
    {"decoder": "mtad", "gamma": 3, "beam_width": 2, "threshold": 0.3},
    {"decoder": "mmtad", "gamma": 2, "beam_width": 3},
])
def test_per_request_decoder_settings(client, pair_pipeline, extra):
    greedy = pair_pipeline.generate(PROMPTS[0], decoder="ar", temperature=0, max_new_tokens=16, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                  extra_body={**extra, "ignore_eos": True})
    assert r.choices[0].text == greedy.text  # P1: every decoder is greedy target decoding at T=0
    mtad = r.model_extra["mtad"]
    assert mtad["decoder"] == extra["decoder"]
    if "gamma" in extra:
        assert mtad["gamma"] == extra["gamma"]
    # sampled, seeded: the server must pass every setting through (equal to the library's result)
    sampled = dict(temperature=0.8, top_p=0.95, top_k=5, seed=11)
    ref = pair_pipeline.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, **sampled, **extra)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0.8, top_p=0.95,
                                  seed=11, extra_body={**extra, "top_k": 5, "ignore_eos": True})
    assert r.choices[0].text == ref.text


def test_models_health_version_metrics(server, client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get("/health").status_code == 200
    v = http.get("/version").json()
    assert v["model"] == MODEL and v["version"]
    client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"decoder": "mtad"})
    text = http.get("/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", "spec_decode_num_accepted_tokens_per_pos_total",
                 "request_success_total"):
        assert f"mtad_trt:{name}" in text, name


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: {(name, labels): value}."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(r"^([\w:]+)(?:\{(.*)\})? (\S+)$", line)
        if m:
            out[m.group(1), frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))] = float(m.group(3))
    return out


@pytest.mark.parametrize("extra", [
    {"decoder": "mmtad", "gamma": 3, "beam_width": 2, "threshold": 0.01},
    {"decoder": "ar"},
])
def test_metrics_count_what_a_request_did(client, http, extra):
    # The counters move by exactly this request's statistics (nothing else runs meanwhile).
    before = scrape(http)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=1.0, seed=3,
                                  extra_body={**extra, "ignore_eos": True})
    after = scrape(http)
    st = r.model_extra["mtad"]

    def delta(name, **labels):
        key = (f"mtad_trt:{name}", frozenset({"model_name": MODEL, **labels}.items()))
        assert key in after, key
        return after[key] - before.get(key, 0.0)

    assert st["generated_tokens"] == r.usage.completion_tokens == 20
    assert delta("prompt_tokens_total") == r.usage.prompt_tokens == st["prompt_tokens"] > 0
    assert delta("generation_tokens_total") == 20
    assert delta("request_success_total", finished_reason="length") == 1
    for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                 "request_time_per_output_token_seconds"):
        assert delta(f"{hist}_count") == 1, hist
    rounds = st["iterations"] if extra["decoder"] != "ar" else st["target_calls"]
    assert delta("inter_token_latency_seconds_count") == rounds - 1  # one output event per round
    assert delta("iteration_batch_size_count") == rounds == delta("iteration_batch_size_sum")  # batch of 1
    if extra["decoder"] == "ar":  # no speculation: the spec-decode counters stay put
        for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                     "spec_decode_num_accepted_tokens_total"):
            assert delta(name) == 0, name
        return
    assert st["accepted_tokens"] > 0  # (τ = 0.01: the per-position counters have something to count)
    assert delta("spec_decode_num_drafts_total") == st["iterations"] > 0
    assert delta("spec_decode_num_draft_tokens_total") == st["drafted_tokens"] == st["iterations"] * 3 * 2
    assert delta("spec_decode_num_accepted_tokens_total") == st["accepted_tokens"]
    per_pos = st["accepted_per_position"]
    assert [delta("spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(len(per_pos))] \
        == per_pos
    assert 0 <= st["accepted_tokens"] + st["iterations"] - 20 <= 3  # n+1 tokens a round; the last may be cut


# -- bad input ------------------------------------------------------------------------------------
def _body(**kw):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}


BAD = [
    # (id, path, raw body or JSON object, status, substring of the message, param)
    ("malformed-json", "/v1/completions", b'{"model": ', 400, "not valid JSON", None),
    ("not-utf8", "/v1/completions", b"\xff\xfe\x00", 400, "not valid JSON", None),
    ("not-an-object", "/v1/completions", [1, 2], 422, "object", None),
    ("missing-model", "/v1/completions", {"prompt": "hi"}, 422, "model", "model"),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 422, "prompt", "prompt"),
    ("bad-type", "/v1/completions", _body(max_tokens="many"), 422, "max_tokens", "max_tokens"),
    ("bool-as-int", "/v1/completions", _body(max_tokens=True), 422, "max_tokens", "max_tokens"),
    ("negative-temperature", "/v1/completions", _body(temperature=-1), 422, "temperature", "temperature"),
    ("top-p-zero", "/v1/completions", _body(top_p=0), 422, "top_p", "top_p"),
    ("bad-decoder", "/v1/completions", _body(decoder="magic"), 422, "decoder", "decoder"),
    ("gamma-zero", "/v1/completions", _body(gamma=0), 422, "gamma", "gamma"),
    ("unknown-field", "/v1/completions", _body(gama=3), 422, "gama", "gama"),
    ("nan", "/v1/completions", b'{"model": "tiny-pair", "prompt": "hi", "temperature": NaN}', 422, "temperature",
     "temperature"),
    ("unknown-model", "/v1/completions", _body(model="gpt-4"), 404, "gpt-4", "model"),
    ("over-capacity", "/v1/completions", _body(max_tokens=1000), 400, "capacity of 256", "max_tokens"),
    ("prompt-over-capacity", "/v1/completions", _body(prompt=[5] * 300), 400, "capacity", "max_tokens"),
    ("empty-prompt", "/v1/completions", _body(prompt=""), 400, "empty", None),
    ("token-out-of-vocab", "/v1/completions", _body(prompt=[1, 99999]), 400, "vocabulary", "prompt"),
    ("best-of", "/v1/completions", _body(best_of=2), 400, "best_of", "best_of"),
    ("penalty", "/v1/completions", _body(presence_penalty=0.5), 400, "presence_penalty", "presence_penalty"),
    ("chat-no-messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 422, "messages", "messages"),
    ("chat-bad-role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     422, "role", "messages"),
    ("chat-tools", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools", "tools"),
    ("chat-image", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "non-text", "messages.0.content"),
]


def assert_openai_error(r: httpx.Response, status: int, needle: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if needle:
        assert needle in err["message"], err["message"]
    if param:
        assert err["param"] == param, err


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests(http, case):
    _, path, body, status, needle, param = case
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert_openai_error(r, status, needle, param)


def test_unknown_routes_and_models(http):
    assert_openai_error(http.get("/v1/nothing"), 404, "no such route")
    assert_openai_error(http.get("/v1/models/gpt-4"), 404, "gpt-4", "model")
    assert_openai_error(http.get("/v1/completions"), 405, "not allowed")


def test_body_size_limit(http):
    big = json.dumps(_body(prompt="a" * (1 << 20))).encode()
    assert_openai_error(http.post("/v1/completions", content=big), 413, "limit of 1048576 bytes")

    def chunked():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i: i + 65536]

    assert_openai_error(http.post("/v1/completions", content=chunked()), 413, "limit")
    assert http.get("/health").status_code == 200


def test_api_key(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as c:
        assert_openai_error(c.post("/v1/completions", json=_body()), 401, "API key")
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "API key")
        assert c.get("/health").status_code == 200  # probes and scrapes need no key
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models", headers=AUTH).status_code == 200
    with httpx.Client(trust_env=False) as hc:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0, http_client=hc)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = {
    "model": st.sampled_from([MODEL, MODEL, "other"]) | _JSON,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-3, 400), max_size=8) | _JSON,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": st.text(max_size=20)}),
        max_size=3) | _JSON,
    "temperature": st.floats(-1, 3) | _JSON,
    "top_p": st.floats(-0.5, 1.5) | _JSON,
    "top_k": st.integers(-2, 400) | _JSON,
    "seed": st.integers(-5, 2**70) | _JSON,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | _JSON,
    "stop_token_ids": st.lists(st.integers(-5, 10**6), max_size=3) | _JSON,
    "decoder": st.sampled_from(["ar", "sps", "mtad", "mmtad", "bogus"]) | _JSON,
    "gamma": st.integers(-1, 12) | _JSON,
    "beam_width": st.integers(-1, 12) | _JSON,
    "threshold": st.floats(-1, 5) | _JSON,
    "stream": st.booleans() | _JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _JSON,
    "n": st.integers(-1, 3) | _JSON,
    "logprobs": _JSON,
    "echo": _JSON,
    "tools": _JSON,
    "ignore_eos": _JSON,
}
# max_tokens is always present and mostly small, so that accepted bodies stay quick to generate.
_BODIES = st.fixed_dictionaries({"max_tokens": st.integers(-3, 8) | st.sampled_from(["4", 4.5, True, 10**12])},
                                optional=_FIELDS)


def test_fuzzed_bodies_never_5xx(server):
    with httpx.Client(base_url=server.url, headers=AUTH, trust_env=False, timeout=60) as c:

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
               body=_BODIES | st.binary(max_size=64), extra=st.dictionaries(st.text(max_size=6), _JSON, max_size=2))
        def run(path, body, extra):
            if isinstance(body, dict):
                body = {**extra, **body}
                with c.stream("POST", path, json=body) as r:
                    text = r.read().decode()
                assert r.status_code < 500, (body, text)
                if r.status_code == 200 and text.startswith("data:"):
                    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, (body, text)
                elif r.status_code >= 400:
                    assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
            else:
                r = c.post(path, content=body)
                assert 400 <= r.status_code < 500, (body, r.text)

        run()
    with httpx.Client(base_url=server.url, trust_env=False) as c:
        assert c.get("/health").status_code == 200


# -- concurrency ----------------------------------------------------------------------------------
def _stream_text(client, i: int) -> tuple[str, int]:
    """Request i of a mixed set: both endpoints, every decoder, greedy and seeded sampling."""
    decoder = ["ar", "sps", "mtad", "mmtad"][i % 4]
    sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "seed": i}
    extra = {"decoder": decoder, "ignore_eos": True, "gamma": 1 + i % 3}
    if i % 3 == 0:
        s = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[i % 4]}],
                                           max_tokens=12 + i, stream=True, stream_options={"include_usage": True},
                                           extra_body=extra, **sampling)
        chunks = list(s)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.completion_tokens
    s = client.completions.create(model=MODEL, prompt=PROMPTS[i % 4], max_tokens=12 + i, stream=True,
                                  stream_options={"include_usage": True}, extra_body=extra, **sampling)
    chunks = list(s)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens


def _streams_at_once(client: openai.OpenAI, n: int) -> list:
    """`_stream_text(client, i)` for i < n, all n clients released together by a barrier."""
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        return _stream_text(client, i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_16_concurrent_streams_equal_sequential(client, http):
    sequential = [_stream_text(client, i) for i in range(16)]
    assert all(n == 12 + i for i, (_, n) in enumerate(sequential))
    assert _streams_at_once(client, 16) == sequential
    wait_for(lambda: metric(http, "mtad_trt:num_requests_running") == 0)
    assert metric(http, "mtad_trt:num_requests_waiting") == 0


def _histogram(http: httpx.Client, name: str) -> dict[str, float]:
    """{le: cumulative count} of one histogram in /metrics (the model_name label only)."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(rf'^{re.escape(name)}_bucket\{{le="([^"]+)",model_name="{MODEL}"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_16_concurrent_streams_share_batch_rows(pair_engine, client):
    """Continuous batching through the server: 16 clients at once on 4 batch rows give what they get
    one at a time (from the batch-1 server), and the iterations really ran several rows at once."""
    sequential = [_stream_text(client, i) for i in range(16)]
    with Pipeline.load(pair_engine, backend="ort", max_batch=4) as pipe:
        app = create_app(pipe, ServerSettings(model_name=MODEL, api_key=KEY, max_queue=32))
        with ServerThread(app) as url, httpx.Client(trust_env=False, timeout=60) as hc, \
                httpx.Client(base_url=url, headers=AUTH, trust_env=False, timeout=60) as http:
            batched = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, http_client=hc)
            assert _streams_at_once(batched, 16) == sequential
            sizes = _histogram(http, "mtad_trt:iteration_batch_size")
            assert sizes["+Inf"] > sizes["1.0"] > 0  # some iterations ran 1 row, others more
            assert sizes["4.0"] == sizes["+Inf"]  # never more than the 4 rows
            wait_for(lambda: metric(http, "mtad_trt:num_requests_running") == 0)


def test_a_failing_step_is_a_500_for_its_request_and_the_server_goes_on(server_pipeline, monkeypatch):
    runner = server_pipeline.target
    real, calls = runner.step, []

    def step(inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
        return real(inputs)

    monkeypatch.setattr(runner, "step", step)
    app = create_app(server_pipeline, ServerSettings(model_name=MODEL))
    with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        r = c.post("/v1/completions", json=_body(max_tokens=8, decoder="ar", ignore_eos=True))
        assert_openai_error(r, 500, "step failed")
        assert r.json()["error"]["code"] == "step_failed" and "RUNTIME_EXCEPTION" in r.json()["error"]["message"]
        ok = c.post("/v1/completions", json=_body(max_tokens=8, decoder="ar", ignore_eos=True))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        assert c.get("/health").status_code == 200


def test_disconnect_cancels_and_frees_worker(server, http):
    long = _body(prompt=PROMPTS[0], max_tokens=180, ignore_eos=True, decoder="mmtad", gamma=8, beam_width=8)
    cancelled = metric(http, "mtad_trt:request_success_total", default=0.0, finished_reason="cancelled")
    generated = metric(http, "mtad_trt:generation_tokens_total")
    with httpx.Client(base_url=server.url, headers=AUTH, trust_env=False, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data:"))
    # the stream was abandoned after its first chunk: the generation stops and the worker is free
    wait_for(lambda: metric(http, "mtad_trt:request_success_total", default=0.0, finished_reason="cancelled") == cancelled + 1)
    wait_for(lambda: metric(http, "mtad_trt:num_requests_running") == 0)
    # the same for a non-streaming request whose client closes the socket
    host, port = server.url.removeprefix("http://").split(":")
    raw = json.dumps(long).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
        wait_for(lambda: metric(http, "mtad_trt:num_requests_running") == 1)
    wait_for(lambda: metric(http, "mtad_trt:request_success_total", default=0.0, finished_reason="cancelled") == cancelled + 2)
    wait_for(lambda: metric(http, "mtad_trt:num_requests_running") == 0)
    # both stopped early: their tokens (counted when they end) fall short of the 2 x 180 asked for
    assert metric(http, "mtad_trt:generation_tokens_total") - generated < 2 * 180
    r = http.post("/v1/completions", json=_body(max_tokens=5, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


class Gated:
    """The real pipeline, but every target call waits for `gate` (so queue states are deterministic),
    and the order in which requests take a row is recorded."""

    def __init__(self, pipe: Pipeline, monkeypatch) -> None:
        self.gate, self.order = threading.Event(), []
        sched, runner = pipe.scheduler, pipe.target
        real_start, real_step = sched._start, runner.step

        def start(req):
            self.order.append(list(req.prompt_ids))
            real_start(req)

        def step(inputs):
            assert self.gate.wait(30)
            return real_step(inputs)

        monkeypatch.setattr(sched, "_start", start)
        monkeypatch.setattr(runner, "step", step)


def test_queue_full_429_and_fifo_order(server_pipeline, monkeypatch):
    gated = Gated(server_pipeline, monkeypatch)
    app = create_app(server_pipeline, ServerSettings(model_name=MODEL, max_queue=3, retry_after_s=2))
    with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as c, \
            ThreadPoolExecutor(4) as pool:
        prompts = [[10 + i, 20, 30] for i in range(4)]
        futures = []
        for i, p in enumerate(prompts):  # one running (held at the gate) + three waiting: the queue is full
            futures.append(pool.submit(c.post, "/v1/completions", json=_body(prompt=p, max_tokens=3)))
            wait_for(lambda i=i: metric(c, "mtad_trt:num_requests_waiting") == i and len(gated.order) == 1)
        r = c.post("/v1/completions", json=_body(max_tokens=3))
        assert_openai_error(r, 429, "queue is full")
        assert r.headers["Retry-After"] == "2"
        gated.gate.set()
        assert [f.result().status_code for f in futures] == [200] * 4
        assert gated.order == prompts  # first come, first served
        assert c.post("/v1/completions", json=_body(max_tokens=3)).status_code == 200


def test_waiting_client_that_disconnects_leaves_the_queue(server_pipeline, monkeypatch):
    gated = Gated(server_pipeline, monkeypatch)
    app = create_app(server_pipeline, ServerSettings(model_name=MODEL, max_queue=4))
    with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as c, \
            ThreadPoolExecutor(1) as pool:
        running = pool.submit(c.post, "/v1/completions", json=_body(prompt=[7, 8], max_tokens=3))
        wait_for(lambda: len(gated.order) == 1)
        host, port = url.removeprefix("http://").split(":")
        raw = json.dumps(_body(prompt=[9, 9], max_tokens=3, stream=True)).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            wait_for(lambda: metric(c, "mtad_trt:num_requests_waiting") == 1)
        wait_for(lambda: metric(c, "mtad_trt:num_requests_waiting") == 0)
        assert metric(c, "mtad_trt:request_success_total", finished_reason="cancelled") == 1
        gated.gate.set()
        assert running.result().status_code == 200
        assert gated.order == [[7, 8]]  # the abandoned request never ran


def test_draining_refuses_new_requests(server_pipeline):
    app = create_app(server_pipeline, ServerSettings(model_name=MODEL))
    with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        assert c.get("/health").status_code == 200
        app.state.mtad.begin_drain()
        assert_openai_error(c.post("/v1/completions", json=_body()), 503, "shutting down")
        assert c.get("/health").status_code == 503
        assert c.get("/metrics").status_code == 200  # a last scrape still works


def test_cli_serve_refuses_bad_options(pair_engine):
    from click.testing import CliRunner

    from mtad_trt.cli import main

    runner = CliRunner()
    assert "--max-queue" in runner.invoke(main, ["serve", "--help"]).output
    for args, needle in ((["--max-queue", "0"], "--max-queue must be >= 1"), (["--gamma", "0"], "gamma must be >= 1"),
                         (["--max-batch", "0"], "--max-batch must be >= 1")):
        res = runner.invoke(main, ["serve", "--engines", str(pair_engine), *args])
        lines = res.output.strip().splitlines()  # one error line, before any server starts
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_exits(pair_engine, tmp_path):
    port = _free_port()
    code = (f"from mtad_trt.serve import ServerSettings, serve; serve(ServerSettings({str(pair_engine)!r}, "
            f"backend='ort', drain_timeout_s=20), port={port}, log_level='warning')")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:  # a file, not a pipe: a chatty server can never block on it
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
            wait_healthy(c, proc, log)
            body = {"model": pair_engine.name, "prompt": "hi", "max_tokens": 180, "ignore_eos": True,
                    "decoder": "mmtad", "gamma": 8, "beam_width": 8, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                proc.send_signal(signal.SIGTERM)
                # new work is refused: the listener closes (connection refused) or the app says 503
                with httpx.Client(base_url=url, trust_env=False, timeout=5) as fresh:
                    time.sleep(0.3)
                    try:
                        assert fresh.post("/v1/completions", json={**body, "stream": False}).status_code == 503
                    except httpx.TransportError:
                        pass
                rest = [first, *(line for line in lines if line.startswith("data:"))]
            assert rest[-1] == "data: [DONE]"
            final = json.loads(rest[-2].removeprefix("data: "))
            assert final["choices"][0]["finish_reason"] == "length"  # finished, not cancelled
            assert final["mtad"]["generated_tokens"] == 180
        stopped_cleanly(proc, log, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
