"""The bench on a tiny engine: record and report, interleaving, resume after an interruption, peers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mtad_trt.bench.journal import JOURNAL
from mtad_trt.bench.report import markdown, write_report
from mtad_trt.bench.run import RECORD_VERSION, BenchConfig, run_bench
from mtad_trt.errors import MtadError


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in
                              enumerate(["def fib(n):", "The quick brown fox", "import numpy"])) + "\n")
    return path


def _cfg(engine, prompt_file, out, **kw) -> BenchConfig:
    base = dict(engines=str(engine), decoders=("ar", "sps", "mtad"), prompts=str(prompt_file), n=3, seeds=2,
                max_new_tokens=8, energy="none", out=str(out), n_boot=500)
    return BenchConfig(**{**base, **kw})


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]


def _rows(out) -> dict[str, list[dict]]:
    """Per system, the journal's gen records merged with their scores, in run order (bench.json
    keeps only the summaries)."""
    lines = _lines(out)
    scores = {(r["system"], r["prompt_id"], r["seed"]): r for r in lines if r["type"] == "score"}
    rows: dict[str, list[dict]] = {}
    for g in (r for r in lines if r["type"] == "gen"):
        rows.setdefault(g["system"], []).append({**g, **scores.get((g["system"], g["prompt_id"], g["seed"]), {})})
    return {k: sorted(v, key=lambda r: (r["unit"], r["prompt_index"], r["seed"])) for k, v in rows.items()}


def test_bench_record_and_report(pair_engine, prompt_file, tmp_path):
    cfg = _cfg(pair_engine, prompt_file, tmp_path, decoders=("ar", "sps", "mtad", "mmtad"), peers=("hf-ar",),
               max_new_tokens=12, seeds=1)
    calls = []
    record = run_bench(cfg, lambda phase, done, total: calls.append((phase, done, total)))
    files = write_report(record, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["record_version"] == RECORD_VERSION
    assert set(saved["results"]) == {"ar", "sps", "mtad", "mmtad", "peer:hf-ar"}
    # every figure recomputed from the rows and timing windows the bench wrote
    windows: dict[str, dict[int, dict]] = {}
    for r in _lines(tmp_path):
        if r["type"] == "window":
            windows.setdefault(r["system"], {})[r["unit"]] = r
    journal_rows = _rows(tmp_path)
    for name, res in saved["results"].items():
        s, rows, win = res["summary"], journal_rows[name], windows[name]
        assert s["requests"] == len(rows) == 3 and sorted(win) == [0, 1, 2]
        if name.startswith("peer:"):
            gen = sum(r["generated_tokens"] for r in rows)
            assert s["generated_tokens"] == gen == sum(w["tokens"] for w in win.values()) > 0
            assert s["tokens_per_s"] == pytest.approx(gen / sum(w["window_s"] for w in win.values()), rel=1e-12)
            assert "transformers" in s["note"]
            continue
        st = [r["stats"] for r in rows]
        assert [x["generated_tokens"] for x in st] == [len(r["token_ids"]) for r in rows] == [12] * 3
        assert s["generated_tokens"] == 36 == sum(w["tokens"] for w in win.values())
        assert s["tokens_per_target_call"] == pytest.approx(36 / sum(x["target_calls"] for x in st), rel=1e-12)
        if name == "ar":
            assert s["tokens_per_target_call"] == 1.0  # one target step per token
        else:
            iters = sum(x["iterations"] for x in st)
            assert s["acceptance_rate"] == pytest.approx(sum(x["accepted_tokens"] for x in st)
                                                         / sum(x["draft_positions"] for x in st), rel=1e-12)
            per_pos = np.sum([x["accepted_per_position"] + [0] * (4 - len(x["accepted_per_position"])) for x in st], 0)
            assert s["accepted_per_position"] == pytest.approx(list(per_pos / iters), rel=1e-12)
            assert [a["estimate"] for a in saved["paired"]["acceptance_per_position"][name]] == \
                pytest.approx(s["accepted_per_position"], rel=1e-12)
        assert all(r["scored_tokens"] == 12 and r["mean_logprob"] < 0 for r in rows)
        assert [r["mean_logprob"] for r in rows] == pytest.approx([r["logprob_sum"] / 12 for r in rows], rel=1e-12)
        assert s["perplexity"] == pytest.approx(math.exp(-np.mean([r["mean_logprob"] for r in rows])), rel=1e-12)
        assert s["perplexity_token_weighted"] == pytest.approx(math.exp(-sum(r["logprob_sum"] for r in rows) / 36),
                                                               rel=1e-12)
        tm = [r["timing"] for r in rows]
        assert s["ttft_s"]["p50"] == pytest.approx(np.median([t["ttft_s"] for t in tm]), rel=1e-12)
        assert s["tpot_s"]["p50"] == pytest.approx(np.median([(t["e2e_s"] - t["ttft_s"]) / 11 for t in tm]), rel=1e-12)
    paired = saved["paired"]
    assert set(paired["speed"]) == {"sps", "mtad", "mmtad", "peer:hf-ar"}
    for name, sp in paired["speed"].items():  # per-unit tok/s ratios to ar in the same unit
        ratios = [windows[name][u]["tokens"] / windows[name][u]["window_s"]
                  / (windows["ar"][u]["tokens"] / windows["ar"][u]["window_s"]) for u in range(3)]
        assert sp["units"] == 3
        assert (sp["p25"], sp["median"], sp["p75"]) == pytest.approx(tuple(np.percentile(ratios, [25, 50, 75])),
                                                                       rel=1e-12)
    logp = {name: {r["prompt_id"]: r["mean_logprob"] for r in journal_rows[name]} for name in saved["results"]
            if not name.startswith("peer:")}
    for d in ("sps", "mtad", "mmtad"):
        c = paired["perplexity"][d]
        delta = np.mean([logp[d][p] - logp["ar"][p] for p in logp["ar"]])  # one seed: one pair per prompt
        assert c["prompts"] == 3 and c["delta_mean_logprob"]["estimate"] == pytest.approx(delta, rel=1e-12)
        assert c["ppl_ratio"]["estimate"] == pytest.approx(math.exp(-delta), rel=1e-12)
        assert c["ppl_ratio"]["lo"] <= c["ppl_ratio"]["estimate"] <= c["ppl_ratio"]["hi"]
        assert len(paired["acceptance_per_position"][d]) == 4
    assert set(paired["speed_vs_sps"]) == {"mtad", "mmtad"}
    sps_delta = paired["perplexity"]["sps"]["delta_mean_logprob"]
    assert paired["control"]["decoder"] == "sps"
    assert paired["control"]["ok"] is (sps_delta["lo"] <= 0 <= sps_delta["hi"])  # the control reads the interval
    ratio = paired["perplexity"]["sps"]["ppl_ratio"]  # a pass says how large a bias could have gone unseen
    assert paired["control"]["ppl_half_width_pct"] == pytest.approx(50 * (ratio["hi"] - ratio["lo"]), rel=1e-12)
    assert ("no bias larger than" in paired["control"]["message"]) is paired["control"]["ok"]
    # progress: one tick per (system, request) and per scored output, ending at the totals
    assert ("generate", 15, 15) in calls and ("score", 12, 12) in calls
    text = (tmp_path / "summary.md").read_text()
    assert "| mmtad |" in text and "**Control:**" in text and "interleaved per prompt" in text
    assert "peer:hf-ar" in text and "Acceptance per draft position" in text
    assert {f.name for f in files} >= {"speed_quality.png", "acceptance_per_position.png"}


def test_systems_run_interleaved_and_rotated(pair_engine, prompt_file, tmp_path):
    run_bench(_cfg(pair_engine, prompt_file, tmp_path, seeds=1))
    windows = [(r["unit"], r["system"]) for r in _lines(tmp_path) if r["type"] == "window"]
    assert windows == [(0, "ar"), (0, "sps"), (0, "mtad"), (1, "sps"), (1, "mtad"), (1, "ar"),
                       (2, "mtad"), (2, "ar"), (2, "sps")]


def test_concurrency_interleaves_per_batch(pair_engine, prompt_file, tmp_path):
    record = run_bench(_cfg(pair_engine, prompt_file, tmp_path, decoders=("ar", "mtad"), seeds=1, concurrency=2))
    lines = _lines(tmp_path)
    assert [(r["unit"], r["system"]) for r in lines if r["type"] == "window"] == [
        (0, "ar"), (0, "mtad"), (1, "mtad"), (1, "ar")]
    assert [r["requests"] for r in lines if r["type"] == "window"] == [2, 2, 1, 1]
    assert "batch of 2" in record["interleaving"] and "batch of 2" in markdown(record)


class Interrupt(Exception):
    pass


def _interrupt_at(phase: str, at: int):
    def progress(p, done, total):
        if p == phase and done == at:
            raise Interrupt

    return progress


def _deterministic(record: dict, out_dir) -> dict:
    """What must not depend on where a run was interrupted (everything but the clock)."""
    keep = ("requests", "generated_tokens", "tokens_per_target_call", "acceptance_rate", "accepted_per_position",
            "perplexity", "perplexity_token_weighted", "scored_requests")
    out = {}
    rows = _rows(out_dir)
    for name, res in record["results"].items():
        out[name] = {k: res["summary"].get(k) for k in keep}
        out[name]["rows"] = sorted((r["prompt_id"], r["seed"], r["token_ids"], r["mean_logprob"]) for r in rows[name])
    p = record["paired"]
    out["paired"] = {k: p[k] for k in ("perplexity", "perplexity_ci", "control", "acceptance_per_position")}
    return out


def test_resume_after_interruption(pair_engine, prompt_file, tmp_path):
    full = run_bench(_cfg(pair_engine, prompt_file, tmp_path / "full"))
    out = tmp_path / "cut"
    cfg = _cfg(pair_engine, prompt_file, out)
    with pytest.raises(Interrupt):  # killed after 5 of 18 generation records
        run_bench(cfg, _interrupt_at("generate", 5))
    assert sum(r["type"] == "gen" for r in _lines(out)) == 5
    # the process also died inside the next unit: an uncommitted gen line and a torn line
    gen = next(r for r in _lines(out) if r["type"] == "gen")
    with (out / JOURNAL).open("a") as f:
        f.write(json.dumps({**gen, "unit": 5, "system": "mtad"}) + "\n")
        f.write('{"type": "gen", "system": "sps", "prompt_')
    with pytest.raises(MtadError, match="--resume"):
        run_bench(cfg)  # never overwrites a journal by accident
    with pytest.raises(MtadError, match="settings differ.*max_new_tokens"):
        run_bench(_cfg(pair_engine, prompt_file, out, max_new_tokens=9, resume=True))
    with pytest.raises(Interrupt):  # resumed, then killed again while scoring
        run_bench(_cfg(pair_engine, prompt_file, out, resume=True), _interrupt_at("score", 7))
    ticks = []
    record = run_bench(_cfg(pair_engine, prompt_file, out, resume=True), lambda *a: ticks.append(a))
    assert ticks[0] == ("generate", 18, 18) and ticks[1] == ("score", 7, 18)  # nothing left to generate
    lines = _lines(out)
    gens = [(r["system"], r["prompt_id"], r["seed"]) for r in lines if r["type"] == "gen"]
    scores = [(r["system"], r["prompt_id"], r["seed"]) for r in lines if r["type"] == "score"]
    expected = {(s, p, seed) for s in ("ar", "sps", "mtad") for i, p in enumerate(["0", "1", "2"])
                for seed in (i, i + 10000)}
    assert len(gens) == len(set(gens)) == 18 and set(gens) == expected  # no duplicate, none missing
    assert len(scores) == len(set(scores)) == 18 and set(scores) == expected
    assert sum(r["type"] == "window" for r in lines) == 18
    assert _deterministic(record, out) == _deterministic(full, tmp_path / "full")
    assert record["journal"]["resumed_records"] == 18
    t = record["run_time"]  # the killed sessions' work counts, the gaps between sessions do not
    assert t["generate_sessions"] == 2 and t["score_sessions"] == 2
    assert sum(r["type"] == "session" for r in lines) == 2  # one per session that generated, not per window
    assert t["windows_s"] == pytest.approx(sum(r["window_s"] for r in lines if r["type"] == "window"), rel=1e-12)
    assert 0 < t["windows_s"] <= t["generate_s"] and t["score_s"] > 0
    assert "2 session(s)" in markdown(record)


def test_journal_resume_of_a_finished_run_only_rebuilds_the_report(pair_engine, prompt_file, tmp_path):
    first = run_bench(_cfg(pair_engine, prompt_file, tmp_path, seeds=1))
    size = (tmp_path / JOURNAL).stat().st_size
    again = run_bench(_cfg(pair_engine, prompt_file, tmp_path, seeds=1, resume=True))
    assert (tmp_path / JOURNAL).stat().st_size == size
    assert _deterministic(again, tmp_path) == _deterministic(first, tmp_path)


def test_bench_json_keeps_summaries_not_rows(pair_engine, prompt_file, tmp_path):
    """bench.json points to the journal for the per-generation rows instead of repeating them, and
    stays small: its size does not grow with the number of generations or tokens."""
    sizes = []
    for n, seeds, tokens in ((2, 1, 4), (3, 2, 16)):
        out = tmp_path / f"{n}x{seeds}x{tokens}"
        write_report(run_bench(_cfg(pair_engine, prompt_file, out, n=n, seeds=seeds, max_new_tokens=tokens)), out)
        text = (out / "bench.json").read_text()
        saved = json.loads(text)
        assert saved["journal"]["file"] == JOURNAL and (out / saved["journal"]["file"]).is_file()
        assert all(set(res) == {"summary"} for res in saved["results"].values())
        assert "token_ids" not in text and '"text"' not in text
        gens = sum(r["type"] == "gen" for r in _lines(out))
        assert gens == 3 * n * seeds
        # lists of numbers sit on one line: no line holds a lone number
        assert not any(line.strip().rstrip(",").lstrip("-").replace(".", "", 1).isdigit() for line in text.splitlines())
        sizes.append((len(text), len(text.splitlines())))
    (small, small_lines), (big, big_lines) = sizes  # 6 generations of 4 tokens, then 18 of 16
    assert big < 16_000 and big_lines < 500
    assert big - small < 1_000 and abs(big_lines - small_lines) < 20  # nothing per generation or per token


def test_energy_unavailable_is_recorded_once(pair_engine, prompt_file, tmp_path):
    """An unavailable meter says why once per run (a session line in the journal, one line in
    bench.json and in summary.md), not in every (unit, system) window."""
    record = run_bench(_cfg(pair_engine, prompt_file, tmp_path, decoders=("ar", "sps"), max_new_tokens=4))
    write_report(record, tmp_path)
    why = "unavailable: energy measurement turned off"
    journal = (tmp_path / JOURNAL).read_text()
    assert journal.count(why) == 1 and journal.count("unavailable:") == 1  # ':' - tmp_path holds the word
    windows = [r for r in _lines(tmp_path) if r["type"] == "window"]
    assert len(windows) == 12 and all(w["joules"] is None and "energy" not in w for w in windows)
    assert [r["energy_method"] for r in _lines(tmp_path) if r["type"] == "session"] == [record["energy_method"]]
    assert record["energy_method"].startswith(why)
    text = (tmp_path / "bench.json").read_text()
    assert text.count("unavailable:") == 1
    assert (tmp_path / "summary.md").read_text().count("unavailable:") == 1


def test_peers_refuse_before_generating(pair_engine, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where llama-cpp-python is not built
    with pytest.raises(MtadError, match=r"llama-cpp-python.*CMAKE_ARGS=.*pip install"):
        run_bench(_cfg(pair_engine, prompt_file, tmp_path / "l", peers=("llama.cpp",)))
    assert [r["type"] for r in _lines(tmp_path / "l")] == ["header"]
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(MtadError, match=r"onnxruntime-genai.*pip install"):
        run_bench(_cfg(pair_engine, prompt_file, tmp_path / "o", peers=("ort-genai",)))
    with pytest.raises(MtadError, match="unknown peer"):
        run_bench(_cfg(pair_engine, prompt_file, tmp_path / "u", peers=("vllm",)))


def test_llamacpp_peer_needs_a_gguf(pair_engine, prompt_file, tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))  # installed, but no GGUF known
    with pytest.raises(MtadError, match="--peer-gguf"):
        run_bench(_cfg(pair_engine, prompt_file, tmp_path, peers=("llama.cpp",)))


def test_ort_genai_peer(pair_engine, prompt_file, tmp_path, monkeypatch):
    """Runs where onnxruntime-genai is installed (the `peers` extra): its model builder on the tiny
    target's HF folder, int4, then AR decoding interleaved with ours."""
    pytest.importorskip("onnxruntime_genai")
    monkeypatch.setenv("MTAD_TRT_HOME", str(tmp_path / "home"))
    record = run_bench(_cfg(pair_engine, prompt_file, tmp_path / "out", decoders=("ar",), seeds=1,
                            peers=("ort-genai",)))
    s = record["results"]["peer:ort-genai"]["summary"]
    assert s["requests"] == 3 and s["generated_tokens"] > 0 and "ONNX Runtime GenAI" in s["note"]
    assert record["paired"]["speed"]["peer:ort-genai"]["units"] == 3
    assert (tmp_path / "home" / "ort-genai").is_dir()


def test_bench_refuses_unknown_decoder(pair_engine, prompt_file, tmp_path):
    with pytest.raises(MtadError, match="unknown decoder"):
        run_bench(BenchConfig(engines=str(pair_engine), decoders=("beam",), prompts=str(prompt_file), out=str(tmp_path)))


def test_bad_prompt_file(tmp_path, pair_engine):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(MtadError, match="bad.jsonl:1"):
        run_bench(BenchConfig(engines=str(pair_engine), prompts=str(bad), out=str(tmp_path)))


def test_cli_bench_seeds_and_resume(pair_engine, prompt_file, tmp_path):
    args = [sys.executable, "-m", "mtad_trt.cli", "bench", str(pair_engine), "--decoders", "ar,sps",
            "--prompts", str(prompt_file), "--n", "2", "--seeds", "2", "--max-new-tokens", "6", "--energy", "none",
            "--n-boot", "200", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "**Control:**" in res.stdout and "2 seed(s)" in res.stdout
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert sum(json.loads(x)["type"] == "gen" for x in (tmp_path / JOURNAL).read_text().splitlines()) == 8


def test_llamacpp_peer(pair_engine, prompt_file, tmp_path):
    """Runs where llama-cpp-python is built (docs/results.md section 4) and the SmolLM2 GGUF is
    fetched: the peer only times decoding from our token ids, so any GGUF will do here."""
    pytest.importorskip("llama_cpp")
    from mtad_trt.export.registry import gguf_path

    gguf = gguf_path("smollm2-135m")
    if not gguf.is_file():
        pytest.skip(f"no {gguf} (mtad-trt models fetch smollm2-135m)")
    record = run_bench(_cfg(pair_engine, prompt_file, tmp_path, decoders=("ar",), seeds=1, peers=("llama.cpp",),
                            peer_gguf=str(gguf)))
    s = record["results"]["peer:llama.cpp"]["summary"]
    assert s["requests"] == 3 and s["generated_tokens"] > 0 and "llama-cpp-python" in s["note"]
    assert s["decode_tokens_per_s_p50"] > 0 and record["paired"]["speed"]["peer:llama.cpp"]["units"] == 3
