"""The bench report: markdown table, plots and the JSON record on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        f"# mtad-trt bench — {record['created']}",
        "",
        f"- engine: `{s['engines']}` (manifest sha256 {record['engine_manifest_sha256'][:12]}), backend {record['backend']}",
        f"- machine: {record['machine']['processor']}, {record['machine']['cpus']} CPUs, GPU: {record['machine']['gpu'] or 'none'}",
        f"- prompts: {s['prompts']} × {s['n']}, {s['max_new_tokens']} new tokens, T={s['temperature']}, "
        f"top-k {s['top_k']}, top-p {s['top_p']}, γ={s['gamma']}, B={s['beam_width']}, τ={s['threshold']}, seed {s['seed']}",
        f"- energy: {record['energy_method']}",
        f"- perplexity scored by: `{s.get('score_engines') or s['engines']}` target (raw softmax, EOS-truncated)",
        "",
        "| decoder | tok/s | TTFT p50 s | TPOT p50 ms | tokens/target call | acceptance | PPL (target) | PPL token-weighted | pass@1 | J/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in record["results"].items():
        m = res["summary"]
        tpot = m.get("tpot_s") or {}
        if name.startswith("peer:"):
            lines.append(f"| {name} | {_fmt(m['tokens_per_s'])} | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {_fmt(m['tokens_per_s'])} | {_fmt((m.get('ttft_s') or {}).get('p50'), '.3f')} | "
            f"{_fmt(tpot.get('p50', None) and 1000 * tpot['p50'], '.1f')} | {_fmt(m.get('tokens_per_target_call'))} | "
            f"{_fmt(m.get('acceptance_rate'))} | {_fmt(m.get('perplexity'), '.3f')} | "
            f"{_fmt(m.get('perplexity_token_weighted'), '.3f')} | {_fmt(m.get('pass_at_1'))} | "
            f"{_fmt(m.get('joules_per_token'), '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plots(record: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: v["summary"] for k, v in record["results"].items()}
    names = list(res)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [res[n]["tokens_per_s"] for n in names], color="tab:blue")
    axes[0].set_title("output tokens/s")
    axes[1].bar(names, [res[n].get("perplexity") or 0 for n in names], color="tab:orange")
    axes[1].set_title("perplexity under the target (lower is better)")
    files.append(_save(fig, out / "speed_quality.png"))
    spec = [n for n in names if res[n].get("accepted_per_position")]
    if spec:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in spec:
            ax.plot(range(1, len(res[n]["accepted_per_position"]) + 1), res[n]["accepted_per_position"], marker="o", label=n)
        ax.set_xlabel("draft position")
        ax.set_ylabel("share of rounds accepting it")
        ax.legend()
        files.append(_save(fig, out / "acceptance_per_position.png"))
    measured = [n for n in names if res[n].get("joules_per_token")]
    if measured:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(measured, [res[n]["joules_per_token"] for n in measured], color="tab:green")
        ax.set_title("energy per output token (J)")
        files.append(_save(fig, out / "energy_per_token.png"))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(record: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    (out / "summary.md").write_text(markdown(record))
    return [out / "bench.json", out / "summary.md", *plots(record, out)]


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)
