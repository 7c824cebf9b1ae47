"""The bench's journal: `records.jsonl` in --out, one JSON object per line, appended as results come.

A run of hours that is interrupted resumes from it (`--resume`) instead of starting over. Lines:

- `header`: the settings that decide the results (a resumed run must have the same ones);
- `gen`: one request's generation (tokens, text, stats, timing), keyed (system, prompt, seed);
- `window`: the timing/energy window of one (system, unit), written after that unit's `gen`
  lines: it commits them. `gen` lines without their `window` (the run stopped inside the unit)
  are dropped on resume and the unit runs again;
- `score`: the quality of one `gen` record (target log-probs, HumanEval pass), computed after
  generation, outside every timed window;
- `session`: what holds for a whole generation session (e.g. the energy meter and why it cannot
  measure), written once when the session starts generating, so that `window` lines need not
  repeat it.

Every line is flushed and fsynced as it is written; a torn last line (the process died writing
it) is cut off on resume.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from mtad_trt.errors import MtadError

JOURNAL = "records.jsonl"
VERSION = 1


def gen_key(rec: dict) -> tuple[str, str, int]:
    return (rec["system"], rec["prompt_id"], rec["seed"])


class Journal:
    def __init__(self, out: str | Path, header: dict, resume: bool) -> None:
        self.path = Path(out) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.gens: dict[tuple, dict] = {}
        self.windows: dict[tuple[str, int], dict] = {}
        self.scores: dict[tuple, dict] = {}
        self.sessions: list[dict] = []
        self.resumed = 0
        self.session = time.time()  # marks this session's window and score lines (run time per session)
        header = {"type": "header", "version": VERSION, "settings": header}
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise MtadError(f"{self.path} already holds results: pass --resume to continue that run, "
                                "or choose another --out")
            self._load(header)
        else:
            self.path.write_text("")
            self._file = self.path.open("a")
            self._write(header)
            return
        self._file = self.path.open("a")

    # -- reading -------------------------------------------------------------------------------
    def _load(self, header: dict) -> None:
        data = self.path.read_bytes()
        committed_end = 0  # byte offset after the last line that is kept
        pending: list[dict] = []
        pos = 0
        first = True
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:  # a torn last line
                break
            line = data[pos:nl]
            pos = nl + 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if pos >= len(data):
                    break
                lineno = data[:nl].count(b"\n") + 1
                raise MtadError(f"{self.path}: line {lineno} is not JSON; the journal is damaged") from None
            if first:
                first = False
                self._check_header(rec, header)
                committed_end = pos
                continue
            kind = rec.get("type")
            if kind == "gen":
                pending.append(rec)
                continue
            if kind == "window":
                unit = (rec["system"], rec["unit"])
                for g in pending:
                    if (g["system"], g["unit"]) == unit:
                        self.gens[gen_key(g)] = g
                pending = [g for g in pending if (g["system"], g["unit"]) != unit]
                self.windows[unit] = rec
            elif kind == "score":
                self.scores[gen_key(rec)] = rec
            elif kind == "session":
                self.sessions.append(rec)
            else:
                raise MtadError(f"{self.path}: unknown record type {kind!r}")
            if not pending:
                committed_end = pos
        if first:
            raise MtadError(f"{self.path} has no header line; remove it or choose another --out")
        if committed_end < len(data):
            with self.path.open("r+b") as f:  # drop uncommitted gen lines and a torn last line
                f.truncate(committed_end)
        self.resumed = len(self.gens)

    def _check_header(self, rec: dict, header: dict) -> None:
        if rec.get("type") != "header":
            raise MtadError(f"{self.path}: the first line is not a header")
        if rec.get("version") != VERSION:
            raise MtadError(f"{self.path}: journal version {rec.get('version')}, this mtad-trt writes {VERSION}")
        old, new = rec.get("settings", {}), json.loads(json.dumps(header["settings"], default=jsonable))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise MtadError(f"cannot resume {self.path}: settings differ from the interrupted run ({shown})")

    # -- writing -------------------------------------------------------------------------------
    def _write(self, rec: dict) -> None:
        self._file.write(json.dumps(rec, default=jsonable) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def commit_unit(self, system: str, unit: int, gens: list[dict], window: dict) -> None:
        """Append a unit's records for one system and the window line that commits them."""
        for g in gens:
            self._write({"type": "gen", "system": system, "unit": unit, **g})
        w = {"type": "window", "system": system, "unit": unit, **window, "session": self.session, "t": time.time()}
        self._write(w)
        for g in gens:
            self.gens[(system, g["prompt_id"], g["seed"])] = {"type": "gen", "system": system, "unit": unit, **g}
        self.windows[(system, unit)] = w

    def add_session(self, info: dict) -> None:
        """Once per generation session: what every `window` of this session shares."""
        rec = {"type": "session", "session": self.session, "t": time.time(), **info}
        self._write(rec)
        self.sessions.append(rec)

    def add_score(self, key: tuple, score: dict) -> None:
        rec = {"type": "score", "system": key[0], "prompt_id": key[1], "seed": key[2], **score,
               "session": self.session, "t": time.time()}
        self._write(rec)
        self.scores[key] = rec

    def done(self, system: str, unit: int) -> bool:
        return (system, unit) in self.windows

    def close(self) -> None:
        self._file.close()


def jsonable(x):
    """`json.dumps` default: numpy scalars and arrays, and tuples, as plain JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x).__name__)
