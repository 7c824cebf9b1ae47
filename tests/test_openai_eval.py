"""What evaluation tools need from the OpenAI-compatible server: `logprobs` (completions' legacy
shape, chat's `content` shape), `echo` with the prompt's log-probabilities (and `max_tokens: 0`),
several prompts in one request, and `n` choices — parsed by the official `openai` client, streamed
and not, and equal to what the Pipeline itself returns for the same request (`Output.logprobs`,
`Output.prompt_logprobs`, `Pipeline.score`). tests/test_logprobs.py checks the Pipeline's values
against transformers; tests/test_lm_eval.py runs lm-evaluation-harness against this server."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from test_serve import metric, wait_for

from mtad_trt import Pipeline
from mtad_trt.engine.logprobs import TokenLogprob
from mtad_trt.folder.tokenizer import TokenTable
from mtad_trt.serve import ServerSettings, ServerThread, create_app
from mtad_trt.serve.protocol import LOGPROB_FLOOR, ChatShape, ChoiceState, CompletionShape

MODEL = "tiny-pair"
PROMPTS = ["def fib(n):", "The quick brown fox", "import numpy as np\n", "Once upon a time"]
MAX_QUEUE = 16
TOL = 1e-4  # batched vs single-row ORT calls may differ in the last float32 bits


@pytest.fixture(scope="module")
def server_pipeline(pair_engine):
    # 4 rows: a request's several choices share the batch (the reference `pair_pipeline` has 1)
    with Pipeline.load(pair_engine, backend="ort", max_batch=4) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def server(server_pipeline):
    app = create_app(server_pipeline, ServerSettings(model_name=MODEL, max_queue=MAX_QUEUE))
    with ServerThread(app) as url:
        yield SimpleNamespace(url=url, app=app)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(trust_env=False, timeout=60) as hc:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, http_client=hc)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def table(pair_pipeline) -> TokenTable:
    return TokenTable(pair_pipeline.tokenizer)


def approx(values):
    return pytest.approx(values, abs=TOL)


def assert_legacy_equals(lp, ids: list[int], ref: list[TokenLogprob], table: TokenTable, k: int) -> None:
    """A completions `logprobs` object (legacy shape, the generated part) against the Pipeline's."""
    assert lp.tokens == [table.text(t) for t in ids]
    assert [r.token for r in ref] == ids
    assert lp.token_logprobs == approx([r.logprob for r in ref])
    for top, r in zip(lp.top_logprobs, ref, strict=True):
        assert list(top) == [table.text(t) for t, _ in r.top]  # the same k tokens, in the same order
        assert list(top.values()) == approx([v for _, v in r.top])
        assert len(top) == k


def assert_top_is_sorted_and_holds_the_token(tokens, token_lps, tops, k: int) -> None:
    for tok, lp, top in zip(tokens, token_lps, tops, strict=True):
        values = list(top.values())
        assert len(top) == k and values == sorted(values, reverse=True)
        if k and lp > values[-1] + TOL:  # the emitted token is among the k likeliest: it is listed
            assert top[tok] == pytest.approx(lp, abs=TOL)
        if k:
            assert lp <= values[0] + TOL


def stream_logprobs(chunks, index: int = 0) -> dict:
    """A streamed completion's logprobs objects (one per chunk) joined into one."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for ch in c.choices:
            if ch.index == index and ch.logprobs is not None:
                for key in out:
                    out[key] += getattr(ch.logprobs, key)
    return out


# -- token strings ----------------------------------------------------------------------------------
def test_token_table_matches_the_tokenizer(pair_pipeline, table):
    tok = pair_pipeline.tokenizer
    for i in range(len(tok)):
        s, b = table.text(i), table.bytes(i)
        if s.startswith("bytes:"):  # part of a UTF-8 character: shown as its bytes
            assert "\ufffd" in tok.decode([i]) and s == "bytes:" + "".join(f"\\x{x:02x}" for x in b)
        else:
            assert s == tok.decode([i]) and b == s.encode()
    assert len({table.text(i) for i in range(len(tok))}) == len(tok)  # top_logprobs dicts lose nothing
    for text in PROMPTS:
        ids = pair_pipeline.encode(text)
        assert b"".join(table.bytes(i) for i in ids).decode() == text
        assert sum(table.width(i, skip_special=True) for i in ids) == len(text)
    eos = tok.eos_token_id
    assert table.text(eos) == "<|im_end|>" and table.width(eos, skip_special=True) == 0


# -- completions: logprobs ----------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["ar", "mtad"])
@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_equal_the_pipeline(client, pair_pipeline, table, decoder, stream):
    k = 3
    ref = pair_pipeline.generate(PROMPTS[0], decoder=decoder, temperature=0, max_new_tokens=12, ignore_eos=True,
                                 logprobs=k)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=k,
                                  stream=stream, extra_body={"decoder": decoder, "ignore_eos": True})
    if stream:
        chunks = list(r)
        text = "".join(ch.text for c in chunks for ch in c.choices)
        lp = SimpleNamespace(**stream_logprobs(chunks))
    else:
        text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text == ref.text
    assert_legacy_equals(lp, ref.token_ids, ref.logprobs, table, k)
    assert_top_is_sorted_and_holds_the_token(lp.tokens, lp.token_logprobs, lp.top_logprobs, k)
    assert [next(iter(t)) for t in lp.top_logprobs] == lp.tokens  # greedy: each token is its position's likeliest
    widths = [table.width(t, skip_special=True) for t in ref.token_ids]
    assert lp.text_offset == [sum(widths[:i]) for i in range(len(widths))]  # offsets into `text`


def test_sampled_logprobs_list_the_k_likeliest(client, table):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=1.0, seed=3,
                                  logprobs=5, extra_body={"top_k": 0, "top_p": 1.0, "ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 24
    assert_top_is_sorted_and_holds_the_token(lp.tokens, lp.token_logprobs, lp.top_logprobs, 5)
    # the raw target distribution, before temperature / top-k / top-p: a proper log-probability
    assert all(v <= 0 for t in lp.top_logprobs for v in t.values())
    for k in (0, 1, 20):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, logprobs=k)
        assert all(len(t) == k for t in r.choices[0].logprobs.top_logprobs)


# -- chat: logprobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_pipeline(client, pair_pipeline, table, stream):
    msgs = [{"role": "user", "content": "Hello world!"}]
    ref = pair_pipeline.generate(pair_pipeline.encode_chat(msgs), temperature=0, max_new_tokens=10,
                                 ignore_eos=True, logprobs=2)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2, stream=stream, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert text == ref.text
    assert [e.token for e in content] == [table.text(t) for t in ref.token_ids]
    assert [e.bytes for e in content] == [list(table.bytes(t)) for t in ref.token_ids]
    assert [e.logprob for e in content] == approx([x.logprob for x in ref.logprobs])
    for e, x in zip(content, ref.logprobs, strict=True):
        assert [a.token for a in e.top_logprobs] == [table.text(t) for t, _ in x.top]
        assert [a.logprob for a in e.top_logprobs] == approx([v for _, v in x.top])
        assert [a.bytes for a in e.top_logprobs] == [list(table.bytes(t)) for t, _ in x.top]
        assert e.top_logprobs[0].token == e.token  # greedy
    # the bytes of all tokens are the text (no stop string, no special token here)
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace") == text


def test_chat_logprobs_without_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       logprobs=True, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(e.top_logprobs == [] for e in content)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logprobs=False)
    assert r.choices[0].logprobs is None


# -- completions: echo and scoring -------------------------------------------------------------------
@pytest.mark.parametrize("prompt_kind", ["text", "ids"])
def test_echo_gives_the_prompt_logprobs_first(client, pair_pipeline, table, prompt_kind):
    text = PROMPTS[0]
    ids = pair_pipeline.encode(text)
    ref = pair_pipeline.generate(ids, temperature=0, max_new_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    r = client.completions.create(model=MODEL, prompt=text if prompt_kind == "text" else ids, max_tokens=4,
                                  temperature=0, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    c, n = r.choices[0], len(ids)
    assert c.text == text + ref.text
    lp = c.logprobs
    assert len(lp.tokens) == n + 4
    assert lp.tokens[:n] == [table.text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:n] == approx([x.logprob for x in ref.prompt_logprobs[1:]])
    assert lp.token_logprobs[1:n] == approx(list(pair_pipeline.score(ids[:1], ids[1:], cut_at_eos=False)))
    for top, x in zip(lp.top_logprobs[1:n], ref.prompt_logprobs[1:], strict=True):
        assert list(top) == [table.text(t) for t, _ in x.top]
    assert_legacy_equals(SimpleNamespace(**{k: v[n:] for k, v in lp.model_dump().items()}),
                         ref.token_ids, ref.logprobs, table, 2)
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len(text)
    assert [c.text[o:o + len(t)] for o, t in zip(lp.text_offset[:n], lp.tokens[:n], strict=True)] == lp.tokens[:n]
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 4


def test_echo_without_logprobs(client, pair_pipeline):
    ref = pair_pipeline.generate(PROMPTS[1], temperature=0, max_new_tokens=5, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == PROMPTS[1] + ref.text and r.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_scores_the_prompt(client, pair_pipeline, stream):
    ids = pair_pipeline.encode(PROMPTS[2])
    scores = list(pair_pipeline.score(ids[:1], ids[1:], cut_at_eos=False))
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1,
                                  stream=stream, stream_options={"include_usage": True} if stream else None)
    if stream:
        chunks = list(r)
        text = "".join(ch.text for c in chunks for ch in c.choices)
        lp = SimpleNamespace(**stream_logprobs(chunks))
        finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        usage = chunks[-1].usage
    else:
        text, lp, finish, usage = r.choices[0].text, r.choices[0].logprobs, [r.choices[0].finish_reason], r.usage
    assert text == PROMPTS[2]
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == approx(scores)
    assert finish == ["length"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
    # without logprobs: the prompt alone
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPTS[2] and r.choices[0].logprobs is None and r.usage.completion_tokens == 0


# -- several prompts, n choices -----------------------------------------------------------------------
def _single(client, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, **kw).choices[0]


@pytest.mark.parametrize("kind", ["strings", "ids"])
def test_prompt_lists_equal_single_requests(client, pair_pipeline, kind):
    prompts = PROMPTS if kind == "strings" else [pair_pipeline.encode(p) for p in PROMPTS]
    kw = dict(max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.completions.create(model=MODEL, prompt=prompts, **kw)
    assert [c.index for c in r.choices] == list(range(len(prompts)))
    for p, c in zip(prompts, r.choices, strict=True):
        one = _single(client, p, **kw)
        assert c.text == one.text and c.model_extra["token_ids"] == one.model_extra["token_ids"]
        assert c.model_extra["prompt_token_ids"] == (pair_pipeline.encode(p) if kind == "strings" else p)
        assert c.logprobs.tokens == one.logprobs.tokens
        assert c.logprobs.token_logprobs == approx(one.logprobs.token_logprobs)
        assert c.model_extra["mtad"]["generated_tokens"] == 8  # several choices: each carries its stats
    n_in = sum(len(pair_pipeline.encode(p)) for p in PROMPTS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_in, 8 * len(prompts))
    assert r.usage.total_tokens == n_in + 8 * len(prompts)
    assert "mtad" not in r.model_extra and "prompt_token_ids" not in r.model_extra


def test_n_greedy_choices_are_identical(client, pair_pipeline):
    ref = pair_pipeline.generate(PROMPTS[3], temperature=0, max_new_tokens=10, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], n=4, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [ref.text] * 4
    # the prompt is counted once (OpenAI's and vLLM's usage), the completions of every choice
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_ids), 40)
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert [x.index for x in c.choices] == [0, 1, 2]
    assert len({x.message.content for x in c.choices}) == 1 and c.usage.completion_tokens == 18


def test_n_seeded_choice_i_uses_seed_plus_i(client, pair_pipeline):
    sampled = dict(max_tokens=12, temperature=0.9, extra_body={"ignore_eos": True, "top_k": 0, "top_p": 1.0})
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=3, seed=7, **sampled)
    texts = [c.text for c in r.choices]
    for i, text in enumerate(texts):
        assert text == _single(client, PROMPTS[0], seed=7 + i, **sampled).text
        ref = pair_pipeline.generate(PROMPTS[0], seed=7 + i, temperature=0.9, top_k=0, top_p=1.0,
                                     max_new_tokens=12, ignore_eos=True)
        assert text == ref.text
    assert len(set(texts)) > 1  # sampled with different seeds
    # several prompts x n: choice p * n + i is prompt p with seed + i
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, seed=7, **sampled)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        p, i = divmod(c.index, 2)
        assert c.text == _single(client, PROMPTS[p], seed=7 + i, **sampled).text
    # chat too
    msgs = [{"role": "user", "content": "hi"}]
    c = client.chat.completions.create(model=MODEL, messages=msgs, n=2, seed=5, **sampled)
    for x in c.choices:
        one = client.chat.completions.create(model=MODEL, messages=msgs, seed=5 + x.index, **sampled)
        assert x.message.content == one.choices[0].message.content


def test_streaming_several_choices(client):
    kw = dict(max_tokens=10, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    full = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, echo=True, **kw)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, echo=True, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    for c in full.choices:
        assert "".join(ch.text for x in chunks for ch in x.choices if ch.index == c.index) == c.text
        got = stream_logprobs(chunks, c.index)
        assert got["tokens"] == c.logprobs.tokens and got["text_offset"] == c.logprobs.text_offset
        assert got["token_logprobs"][1:] == approx(c.logprobs.token_logprobs[1:])
        finish = [x for x in chunks for ch in x.choices if ch.index == c.index and ch.finish_reason]
        assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
        assert finish[0].model_extra["mtad"]["generated_tokens"] == 10
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                               max_tokens=5, temperature=0, stream=True, logprobs=True,
                                               extra_body={"ignore_eos": True}))
    for i in (0, 1):
        assert sum(len(ch.logprobs.content) for x in chat for ch in x.choices if ch.index == i and ch.logprobs) == 5
        assert chat[0].choices[0].delta.role == "assistant"


def test_server_started_with_processed_logprobs(pair_engine):
    """`serve --logprobs-mode processed` (a server default): at temperature 0 the drawn token is
    certain (0.0) and every other token is outside the one-hot support (sent as the floor)."""
    with Pipeline.load(pair_engine, backend="ort") as pipe:
        app = create_app(pipe, ServerSettings(model_name=MODEL, defaults={"logprobs_mode": "processed"}))
        with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4,
                                                "temperature": 0, "logprobs": 2, "ignore_eos": True})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [0.0] * 4
    assert [list(top.values()) for top in lp["top_logprobs"]] == [[0.0, LOGPROB_FLOOR]] * 4


# -- the formatting, offline --------------------------------------------------------------------------
def test_infinite_logprobs_are_sent_as_a_floor(table):
    lp = TokenLogprob(5, -math.inf, ((6, -1.0), (5, -math.inf)))
    c = ChoiceState(0, 0, [1, 2], "")
    legacy = CompletionShape("m", False, 2, table).chunk(c, "x", None, [5], [lp])["choices"][0]["logprobs"]
    assert legacy["token_logprobs"] == [LOGPROB_FLOOR] and list(legacy["top_logprobs"][0].values()) == [-1.0, LOGPROB_FLOOR]
    chat = ChatShape("m", False, 2, table).chunk(c, "x", None, [5], [lp])["choices"][0]["logprobs"]["content"]
    assert chat[0]["logprob"] == LOGPROB_FLOOR and chat[0]["top_logprobs"][1]["logprob"] == LOGPROB_FLOOR


# -- bad input ----------------------------------------------------------------------------------------
def _c(**kw):
    return "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def _chat(**kw):
    return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                    **kw}


BAD = [
    # (id, (path, body), substring of the message, param)
    ("logprobs-over-20", _c(logprobs=21), "between 0 and 20", "logprobs"),
    ("logprobs-negative", _c(logprobs=-1), "between 0 and 20", "logprobs"),
    ("top-logprobs-over-20", _chat(logprobs=True, top_logprobs=21), "between 0 and 20", "top_logprobs"),
    ("top-logprobs-negative", _chat(logprobs=True, top_logprobs=-1), "between 0 and 20", "top_logprobs"),
    ("top-logprobs-without-logprobs", _chat(top_logprobs=2), "needs logprobs", "top_logprobs"),
    ("top-logprobs-with-logprobs-false", _chat(logprobs=False, top_logprobs=2), "needs logprobs", "top_logprobs"),
    ("top-logprobs-on-completions", _c(top_logprobs=2), "/v1/chat/completions field", "top_logprobs"),
    ("echo-on-chat", _chat(echo=True), "/v1/completions field", "echo"),
    ("prompt-on-chat", _chat(prompt="x"), "/v1/completions field", "prompt"),
    ("messages-on-completions", _c(messages=[]), "/v1/chat/completions field", "messages"),
    ("mixed-strings-and-ids", _c(prompt=["a", [1, 2]]), "mixes", "prompt"),
    ("mixed-string-and-id", _c(prompt=["a", 1]), "mixes", "prompt"),
    ("mixed-id-and-id-list", _c(prompt=[1, [2]]), "mixes", "prompt"),
    ("empty-prompt-list", _c(prompt=[]), "empty", "prompt"),
    ("empty-prompt-in-list", _c(prompt=["hi", ""]), "prompt 1: ", "prompt"),
    ("token-out-of-vocab-in-list", _c(prompt=[[1, 2], [99999]]), "prompt 1: ", "prompt"),
    ("n-over-limit", _c(n=MAX_QUEUE + 1), f"at most {MAX_QUEUE}", "n"),
    ("prompts-times-n-over-limit", _c(prompt=["a"] * 5, n=4), "20 choices", "n"),
    ("prompts-over-limit", _c(prompt=["a"] * (MAX_QUEUE + 1)), f"at most {MAX_QUEUE}", "prompt"),
    ("chat-n-over-limit", _chat(n=MAX_QUEUE + 1), f"at most {MAX_QUEUE}", "n"),
    ("max-tokens-0-without-echo", _c(max_tokens=0), "only with echo", "max_tokens"),
    ("max-tokens-0-on-chat", _chat(max_tokens=0), "max_tokens must be >= 1", "max_tokens"),
    ("scoring-over-capacity", _c(prompt=[5] * 300, max_tokens=0, echo=True, logprobs=1), "capacity", "max_tokens"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_400_naming_the_field(http, case):
    _, (path, body), needle, param = case
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err["message"]
    assert err["param"] == param, err


def test_bad_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"echo": True})


# -- a request's choices are queued all or none ----------------------------------------------------------
def test_submit_many_queues_all_or_none(pair_engine, monkeypatch):
    """The runtime takes a request's choices together: when they do not all fit, none is queued
    (so none can start in a row before the refusal, as with one-by-one submission)."""
    from types import SimpleNamespace

    from mtad_trt.client import RuntimeClient
    from mtad_trt.errors import Busy

    with Pipeline.load(pair_engine, backend="ort") as pipe:
        client = RuntimeClient(pipe, max_queue=3)
        monkeypatch.setattr(client, "start", lambda: None)  # no runtime thread: nothing leaves the queue
        sink = SimpleNamespace()
        for t in (5, 6):
            client.submit(pipe.prepare([t, 8], max_new_tokens=2), sink)
        with pytest.raises(Busy, match=r"2 of 3 waiting; this request needs 2 places"):
            client.submit_many([(pipe.prepare([7, 8], max_new_tokens=2), sink),
                                (pipe.prepare([9, 8], max_new_tokens=2), sink)])
        assert client._waiting() == 2 and len(client._handles) == 2  # noqa: SLF001
        assert len(client.submit_many([(pipe.prepare([7, 8], max_new_tokens=2), sink)])) == 1
        assert client._waiting() == 3  # noqa: SLF001
        with pytest.raises(Busy, match=r"queue is full \(3 of 3 waiting\)"):
            client.submit(pipe.prepare([9, 8], max_new_tokens=2), sink)


def test_choices_that_do_not_all_fit_the_queue_are_all_refused(pair_engine, monkeypatch):
    with Pipeline.load(pair_engine, backend="ort") as pipe:  # one row: the rest wait
        gate, order = threading.Event(), []
        real_start, real_step = pipe.scheduler._start, pipe.target.step

        def start(req):
            order.append(list(req.prompt_ids))
            real_start(req)

        monkeypatch.setattr(pipe.scheduler, "_start", start)
        monkeypatch.setattr(pipe.target, "step", lambda inputs: (gate.wait(30), real_step(inputs))[1])
        app = create_app(pipe, ServerSettings(model_name=MODEL, max_queue=3))
        with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=30) as c, \
                ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.post, "/v1/completions", json={"model": MODEL, "prompt": [7, 8], "max_tokens": 2})
            wait_for(lambda: len(order) == 1)
            waiting = pool.submit(c.post, "/v1/completions", json={"model": MODEL, "prompt": [9, 9], "max_tokens": 2})
            wait_for(lambda: metric(c, "mtad_trt:num_requests_waiting") == 1)
            # 3 choices fit the limit (--max-queue 3) but only 2 fit the queue now: none is kept
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6], "n": 3, "max_tokens": 2})
            assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
            wait_for(lambda: metric(c, "mtad_trt:num_requests_waiting") == 1)
            gate.set()
            assert running.result().status_code == 200 and waiting.result().status_code == 200
            assert order == [[7, 8], [9, 9]]  # the refused request's choices never ran
