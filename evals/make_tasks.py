"""Write the repo-local evaluation tasks' data (evals/tasks/*/test.jsonl), deterministically.

Self-written items (no third-party data): `python evals/make_tasks.py` rewrites both files the same
way every time. The task definitions (the YAML files beside the data) are lm-evaluation-harness's
format; docs/serve.md ("Evaluating a served model") runs them against `mtad-trt serve`.

- mtad_arith_mc: 40 multiple-choice arithmetic questions (log-likelihood: each choice scored).
- mtad_complete: 32 short completions (generation: greedy text until a newline, exact match).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).parent / "tasks"


def arith_mc(n: int = 40, seed: int = 22) -> list[dict]:
    rng = random.Random(seed)
    items = []
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    while len(items) < n:
        sym, fn = ops[len(items) % 3]
        a, b = rng.randint(2, 30), rng.randint(2, 12)
        answer = fn(a, b)
        wrong = {answer + d for d in rng.sample([-10, -2, -1, 1, 2, 10], 3)}
        if len(wrong) < 3 or answer in wrong:
            continue
        choices = sorted(wrong | {answer})
        items.append({"question": f"What is {a} {sym} {b}?", "choices": [str(c) for c in choices],
                      "answer": choices.index(answer)})
    return items


def complete(seed: int = 22) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(12):  # arithmetic sequences: the next number
        start, step = rng.randint(1, 20), rng.randint(1, 9)
        seq = [start + i * step for i in range(4)]
        items.append({"prompt": "Next number: " + ", ".join(map(str, seq)) + ",", "answer": str(start + 4 * step)})
    for _ in range(10):  # the alphabet: the next letter
        i = rng.randint(0, 20)
        run = string.ascii_lowercase[i : i + 4]
        items.append({"prompt": "Next letter: " + " ".join(run), "answer": string.ascii_lowercase[i + 4]})
    words = ["cat", "blue", "river", "seven", "apple", "stone", "green", "house", "north", "quiet"]
    for w in words:  # a word said three times: the fourth
        items.append({"prompt": f"Repeat: {w} {w} {w}", "answer": w})
    return items


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    write(HERE / "mtad_arith_mc" / "test.jsonl", arith_mc())
    write(HERE / "mtad_complete" / "test.jsonl", complete())
    print("wrote", *(p.relative_to(HERE.parent.parent) for p in sorted(HERE.glob("*/test.jsonl"))))
