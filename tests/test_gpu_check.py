"""scripts/gpu_check.sh starts and runs end to end: its CPU dry run (torch path, tiny models); the
speed estimate reads tokens per target call from the bench records the docs cite, and refuses to
start without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402  (a script, not a package)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.log").is_file() and data["failures"] == []
    phases = data["phases"]
    assert phases["env"]["device"] == "cpu" and phases["trt"] == {"skipped": "dry run"}
    shapes = ("1x1", "1x4", "1x5", "1x17", "4x1", "4x5")
    for role in ("draft", "target"):
        torch_phase = phases[f"torch/{role}/float32"]
        parity = torch_phase["graphs_vs_eager"]
        assert parity["steps"] == 19 and parity["finite"] and parity["max_abs_ref"] > 0
        batched = torch_phase["graphs_vs_eager_rows4"]  # four rows of different lengths, every step compared
        assert batched["steps"] == 10 and batched["finite"] and batched["max_abs_ref"] > 0
        for mode in ("graphs_off", "graphs_on"):
            for shape in shapes:
                assert torch_phase["steps"][mode][shape]["ms"] > 0
        timed = torch_phase["steps"]["graphs_vs_eager"]  # every timed step, 4-row ones included
        assert set(timed) == set(shapes) and all(t["finite"] and t["max_abs_ref"] > 0 for t in timed.values())
    est = phases["estimate"]
    rows = est["rows"]
    assert {(r["decoder"], r["prompts"]) for r in rows} == {
        (d, p) for d in ("ar", "sps", "mtad", "mmtad") for p in ("humaneval", "prose")
    }
    acc = gpu_check.load_acceptance()
    assert est["acceptance"]["tokens_per_target_call"] == acc["tokens_per_target_call"]
    assert all(r["tokens_per_target_call"] == acc["tokens_per_target_call"][r["prompts"]][r["decoder"]] for r in rows)
    assert "First GPU speed estimate (DRY RUN" in p.stdout and "docs/data/issue13/prose-40x2/bench.json" in p.stdout


def test_acceptance_comes_from_the_cited_bench_records() -> None:
    """The figures are the bench records' own (docs/results.md §3), not numbers copied into the script."""
    acc = gpu_check.load_acceptance()
    results = docs_bench("humaneval")["results"]
    for decoder in ("ar", "sps", "mtad", "mmtad"):
        assert acc["tokens_per_target_call"]["humaneval"][decoder] == results[decoder]["summary"]["tokens_per_target_call"]
    assert round(acc["tokens_per_target_call"]["humaneval"]["mtad"], 2) == 4.15  # docs/results.md's table
    assert round(acc["tokens_per_target_call"]["prose"]["mmtad"], 2) == 3.22
    assert (acc["gamma"], acc["beam_width"]) == (4, 4)
    assert acc["sources"]["prose"]["path"] == "docs/data/issue13/prose-40x2/bench.json"
    assert all(path in (ROOT / "docs/results.md").read_text()
               for path in ("docs/data/issue13/prose-40x2/", "docs/data/issue13/humaneval-164/"))


def docs_bench(prompts: str) -> dict:
    return json.loads((ROOT / gpu_check.ACCEPTANCE_FILES[prompts]).read_text())


def test_missing_or_incomplete_acceptance_data_is_refused(tmp_path) -> None:
    with pytest.raises(gpu_check.AcceptanceDataError, match=r"missing .*gone\.json: the speed estimate reads tokens per "
                                                            r"target call .*`git checkout -- docs/data`"):
        gpu_check.load_acceptance({"humaneval": "gone.json"}, root=tmp_path)
    record = docs_bench("prose")
    del record["results"]["mmtad"]
    (tmp_path / "partial.json").write_text(json.dumps(record))
    with pytest.raises(gpu_check.AcceptanceDataError, match="partial.json has no tokens_per_target_call for decoder 'mmtad'"):
        gpu_check.load_acceptance({"prose": "partial.json"}, root=tmp_path)
    other = docs_bench("prose")
    other["settings"]["gamma"] = 6
    (tmp_path / "gamma6.json").write_text(json.dumps(other))
    with pytest.raises(gpu_check.AcceptanceDataError, match=r"need step shapes \[\(1, 7\), \(1, 25\)\]"):
        gpu_check.load_acceptance({"prose": "gamma6.json"}, root=tmp_path)
    (tmp_path / "good.json").write_text(json.dumps(docs_bench("prose")))
    with pytest.raises(gpu_check.AcceptanceDataError, match="disagree on \\(gamma, beam_width\\)"):
        gpu_check.load_acceptance({"prose": "good.json", "other": "gamma6.json"}, root=tmp_path)


def test_the_check_does_not_start_without_acceptance_data(tmp_path, monkeypatch, capsys) -> None:
    """Refused before the first phase, so a GPU session does not spend its minutes and then fail."""
    monkeypatch.setattr(gpu_check, "ACCEPTANCE_FILES", {"humaneval": "docs/data/no-such-run/bench.json"})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--out", str(tmp_path)])
    assert gpu_check.main() == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "gpu_check.json").exists()
