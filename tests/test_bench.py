"""The bench's record, report and plots on a tiny engine (a short real run)."""

from __future__ import annotations

import json

import pytest

from mtad_trt.bench.report import write_report
from mtad_trt.bench.run import RECORD_VERSION, BenchConfig, run_bench
from mtad_trt.errors import MtadError


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in
                              enumerate(["def fib(n):", "The quick brown fox", "import numpy"])) + "\n")
    return path


def test_bench_record_and_report(pair_engine, prompt_file, tmp_path):
    cfg = BenchConfig(engines=str(pair_engine), decoders=("ar", "mtad", "mmtad"), prompts=str(prompt_file), n=3,
                      max_new_tokens=12, energy="none", out=str(tmp_path))
    record = run_bench(cfg)
    files = write_report(record, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["record_version"] == RECORD_VERSION
    assert set(saved["results"]) == {"ar", "mtad", "mmtad"}
    for name, res in saved["results"].items():
        s = res["summary"]
        assert s["requests"] == 3 and s["generated_tokens"] == 36
        assert s["perplexity"] > 1
        assert s["ttft_s"]["p50"] > 0 and s["tpot_s"]["p50"] > 0
        assert len(res["rows"]) == 3 and all(r["mean_logprob"] < 0 for r in res["rows"])
        if name != "ar":
            assert len(s["accepted_per_position"]) == 4
            assert s["tokens_per_target_call"] >= 1
    # Same seeds, same prompts: the decoders' perplexities are computed on their own outputs.
    assert saved["energy_method"].startswith("unavailable") or "off" in saved["energy_method"]
    assert "| mmtad |" in (tmp_path / "summary.md").read_text()
    assert any(f.suffix == ".png" for f in files)


def test_bench_refuses_unknown_decoder(pair_engine, prompt_file):
    with pytest.raises(MtadError, match="unknown decoder"):
        run_bench(BenchConfig(engines=str(pair_engine), decoders=("beam",), prompts=str(prompt_file)))


def test_bad_prompt_file(tmp_path, pair_engine):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(MtadError, match="bad.jsonl:1"):
        run_bench(BenchConfig(engines=str(pair_engine), prompts=str(bad)))
