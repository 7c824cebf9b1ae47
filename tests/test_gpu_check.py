"""scripts/gpu_check.sh starts and runs end to end: its CPU dry run (torch path, tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    for role in ("draft", "target"):
        torch_phase = phases[f"torch/{role}/float32"]
        parity = torch_phase["graphs_vs_eager"]
        assert parity["steps"] == 19 and parity["finite"] and parity["max_abs_ref"] > 0
        for mode in ("graphs_off", "graphs_on"):
            for shape in ("1x1", "1x4", "1x5", "1x17", "4x1", "4x5"):
                assert torch_phase["steps"][mode][shape]["ms"] > 0
    rows = phases["estimate"]["rows"]
    assert {(r["decoder"], r["prompts"]) for r in rows} == {
        (d, p) for d in ("ar", "sps", "mtad", "mmtad") for p in ("humaneval", "prose")
    }
    assert "First GPU speed estimate (DRY RUN" in p.stdout
