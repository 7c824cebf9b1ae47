"""lm-evaluation-harness against a live `mtad-trt serve` (the `eval` extra): its `local-completions`
model runs the repo's two tasks (evals/tasks: a multiple-choice task scored by log-likelihood and a
generation task) on the tiny engine, and every score and generation it got over HTTP equals what
the Pipeline computes offline for the same tokens. Skipped where lm_eval is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mtad_trt import Pipeline
from mtad_trt.serve import ServerSettings, ServerThread, create_app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                       reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')"),
]

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "evals" / "tasks"
MODEL = "tiny-pair"


@pytest.fixture(scope="module")
def results(pair_engine, tmp_path_factory):
    """Both tasks, run once through lm_eval.simple_evaluate against a live server."""
    with pytest.MonkeyPatch.context() as mp:
        # no hub: the tasks' data are local JSON files, the tokenizer the engine folder's
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))  # read when datasets is imported
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.chdir(REPO)  # the task files name their data relative to the repository root
        import lm_eval
        from lm_eval.tasks import TaskManager

        with Pipeline.load(pair_engine, backend="ort", max_batch=4) as pipe:
            app = create_app(pipe, ServerSettings(model_name=MODEL, max_queue=16))
            with ServerThread(app) as url:
                out = lm_eval.simple_evaluate(
                    model="local-completions",
                    model_args={
                        "model": MODEL,
                        "base_url": f"{url}/v1/completions",
                        "tokenizer": str(Path(pair_engine) / "tokenizer"),
                        "tokenizer_backend": "huggingface",
                        "tokenized_requests": True,  # lm-eval's default: prompts as token-id lists
                        "batch_size": 4,  # 4 prompts a request: the server's prompt lists
                        "max_length": 256,  # the engine's capacity
                        "max_retries": 1,
                    },
                    tasks=["mtad_arith_mc", "mtad_complete"],
                    task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                    log_samples=True,
                    bootstrap_iters=0,
                )
    assert out is not None
    return out


def encode_pair(pipe: Pipeline, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal model: trailing spaces of the context move to the
    continuation, the whole is encoded once and split at the context's length."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    tok = pipe.tokenizer
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def test_both_tasks_complete(results):
    r = results["results"]
    assert r["mtad_arith_mc"]["sample_len"] == 40 and 0 <= r["mtad_arith_mc"]["acc,none"] <= 1
    assert r["mtad_complete"]["sample_len"] == 32 and 0 <= r["mtad_complete"]["exact_match,first_word"] <= 1
    assert len(results["samples"]["mtad_arith_mc"]) == 40 and len(results["samples"]["mtad_complete"]) == 32


def test_loglikelihoods_equal_offline_scoring(results, pair_pipeline):
    samples = results["samples"]["mtad_arith_mc"]
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            ll, greedy = resp[0]
            ctx, cont = encode_pair(pair_pipeline, context, continuation)
            scores = pair_pipeline.score(ctx, cont, cut_at_eos=False)
            assert ll == pytest.approx(float(scores.sum()), abs=1e-4), (context, continuation)
            # is_greedy: every continuation token is its position's likeliest (the runtime's own argmax)
            ids = ctx + cont
            ref = pair_pipeline.generate(ids, max_new_tokens=0, prompt_logprobs=1)
            top1 = [lp.top[0][0] for lp in ref.prompt_logprobs[len(ctx):]]
            assert greedy == (top1 == cont)
            checked += 1
    assert checked == 160
    # the accuracy lm-eval reports is the argmax of those scores
    acc = sum(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in samples)
    assert results["results"]["mtad_arith_mc"]["acc,none"] == pytest.approx(acc / len(samples))


def test_generations_equal_the_pipeline(results, pair_pipeline):
    eos = pair_pipeline.tokenizer.decode([pair_pipeline.tokenizer.eos_token_id])
    for s in results["samples"]["mtad_complete"]:
        (context, kwargs), = s["arguments"]
        ids = pair_pipeline.tokenizer.encode(context, add_special_tokens=False)
        ref = pair_pipeline.generate(ids, temperature=0, max_new_tokens=kwargs["max_gen_toks"], stop=["\n", eos])
        assert s["resps"] == [[ref.text]], context
