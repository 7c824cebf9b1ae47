"""The bench report: markdown tables with intervals, plots and the JSON record on disk."""

from __future__ import annotations

import json
from pathlib import Path

from mtad_trt.bench.journal import jsonable


def _fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def _ci(iv: dict | None, spec=".3f", est: str = "estimate") -> str:
    if not iv:
        return "–"
    return f"{format(iv[est], spec)} [{format(iv['lo'], spec)}, {format(iv['hi'], spec)}]"


def _pct(iv: dict | None) -> str:
    """A ratio interval as a percentage change: 0.78 [0.74, 0.82] -> −22.0% [−26.0, −18.0]."""
    if not iv:
        return "–"
    return f"{100 * (iv['estimate'] - 1):+.1f}% [{100 * (iv['lo'] - 1):+.1f}, {100 * (iv['hi'] - 1):+.1f}]"


def _speed(sp: dict | None) -> str:
    if not sp:
        return "–"
    return f"{sp['median']:.2f}× [{sp['p25']:.2f}, {sp['p75']:.2f}]"


def _geo(sp: dict | None) -> str:
    if not sp:
        return "–"
    return f"{sp['geomean']:.2f}× [{sp['geomean_lo']:.2f}, {sp['geomean_hi']:.2f}]"


def _run_time(t: dict | None) -> str:
    if not t:
        return "- run time: not recorded"
    return (f"- run time: generation {t['generate_s'] / 60:.1f} min (Σ timing windows {t['windows_s'] / 60:.1f} min, "
            f"{t['generate_sessions']} session(s)), scoring {t['score_s'] / 60:.1f} min "
            f"({t['score_sessions']} session(s)); time between sessions not counted")


def markdown(record: dict) -> str:
    s, paired = record["settings"], record.get("paired", {})
    level = f"{paired.get('level', 0.95):.0%}"
    lines = [
        f"# mtad-trt bench — {record['created']}",
        "",
        f"- engine: `{s['engines']}` (manifest sha256 {record['engine_manifest_sha256'][:12]}), backend {record['backend']}",
        f"- machine: {record['machine']['processor']}, {record['machine']['cpus']} CPUs, GPU: {record['machine']['gpu'] or 'none'}",
        f"- prompts: {s['prompts']} × {s['n']}, {s.get('seeds', 1)} seed(s) each, {s['max_new_tokens']} new tokens, "
        f"T={s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}, γ={s['gamma']}, B={s['beam_width']}, "
        f"τ={s['threshold']}, base seed {s['seed']}, {s['threads']} thread(s)",
        f"- order: {record.get('interleaving', 'decoders one after another')} ({record.get('units', '?')} units)",
        f"- energy: {record['energy_method']}",
        _run_time(record.get("run_time")),
        f"- perplexity scored by: `{s.get('score_engines') or s['engines']}` target (raw softmax, EOS-truncated); "
        "PPL is the paper's exp(−mean of per-sample mean log-probs)",
        f"- intervals: {level}, percentile bootstrap over prompts ({paired.get('n_boot', '?')} resamples, seeds "
        "averaged within a prompt, paired with `ar` on the same (prompt, seed)); pass@1: Wilson",
        "",
    ]
    control = paired.get("control")
    if control:
        lines += [f"**Control:** {control['message']}.", ""]
    lines += [
        "| decoder | tok/s | vs ar: median [IQR] | TTFT p50 s | TPOT p50 ms | tokens/target call | acceptance | "
        f"PPL [{level}] | PPL vs ar [{level}] | pass@1 [Wilson] | Δpass@1 vs ar | J/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peers = []
    for name, res in record["results"].items():
        m = res["summary"]
        if name.startswith("peer:"):
            peers.append((name, m))
            continue
        tpot = m.get("tpot_s") or {}
        ppl_vs = (paired.get("perplexity", {}).get(name) or {}).get("ppl_ratio")
        dpass = paired.get("pass_vs_ar", {}).get(name)
        lines.append(
            f"| {name} | {_fmt(m.get('aggregate_tokens_per_s') or m['tokens_per_s'])} | "
            f"{'1 (base)' if name == 'ar' else _speed(paired.get('speed', {}).get(name))} | "
            f"{_fmt((m.get('ttft_s') or {}).get('p50'), '.3f')} | "
            f"{_fmt(tpot.get('p50', None) and 1000 * tpot['p50'], '.1f')} | {_fmt(m.get('tokens_per_target_call'))} | "
            f"{_fmt(m.get('acceptance_rate'))} | {_ci(paired.get('perplexity_ci', {}).get(name))} | "
            f"{'–' if name == 'ar' else _pct(ppl_vs)} | {_ci(paired.get('pass_at_1', {}).get(name), '.2f')} | "
            f"{_ci(dpass, '+.2f') if dpass else '–'} | {_fmt(m.get('joules_per_token'), '.3f')} |"
        )
    lines += ["", "tok/s: generated tokens / Σ timing windows (prefill included). vs ar: per-unit ratio of tok/s to "
              "`ar` in the same interleaving unit, median and interquartile range."]
    vs_sps = paired.get("speed_vs_sps", {})
    if vs_sps:
        lines += ["", "**Against speculative sampling (`sps`), the paper's comparison** (per-unit ratios; "
                  f"geometric mean with its {level} interval)", "",
                  "| decoder | speed vs sps: median [IQR] | speed vs sps: geomean [CI] | energy vs sps (tok/J ratio) |",
                  "|---|---|---|---|"]
        for name, sp in vs_sps.items():
            e = paired.get("energy_vs_sps", {}).get(name)
            lines.append(f"| {name} | {_speed(sp)} | {_geo(sp)} | {_geo(e) if e else 'not measured'} |")
    if peers:
        lines += ["", "**Peers** (autoregressive, same prompts, seeds and threads, interleaved with the decoders)", "",
                  "| peer | tok/s | decode tok/s p50 | TTFT p50 s | vs ar: median [IQR] | what |", "|---|---|---|---|---|---|"]
        for name, m in peers:
            lines.append(f"| {name} | {_fmt(m['tokens_per_s'])} | {_fmt(m.get('decode_tokens_per_s_p50'))} | "
                         f"{_fmt((m.get('ttft_s') or {}).get('p50'), '.3f')} | {_speed(paired.get('speed', {}).get(name))} | "
                         f"{m.get('note', '')} |")
    acc = paired.get("acceptance_per_position", {})
    if acc:
        lines += ["", f"**Acceptance per draft position** (share of rounds accepting position i, {level} interval)", ""]
        for name, pos in acc.items():
            lines.append(f"- {name}: " + ", ".join(_ci(p, '.2f') for p in pos))
    return "\n".join(lines) + "\n"


def plots(record: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: v["summary"] for k, v in record["results"].items()}
    paired = record.get("paired", {})
    decoders = [n for n in res if not n.startswith("peer:")]
    color = {n: f"C{i}" for i, n in enumerate(decoders)}  # one colour per decoder in every plot
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in decoders:  # left: absolute tok/s vs perplexity with its interval
        ci = paired.get("perplexity_ci", {}).get(n)
        x = res[n].get("aggregate_tokens_per_s") or res[n]["tokens_per_s"]
        if ci:
            axes[0].errorbar([x], [ci["estimate"]], yerr=[[ci["estimate"] - ci["lo"]], [ci["hi"] - ci["estimate"]]],
                             fmt="o", capsize=4, label=n, color=color[n])
    axes[0].set_xlabel("output tokens/s")
    axes[0].set_ylabel("perplexity under the target")
    axes[0].set_title("perplexity vs speed (95% CI)")
    for n in decoders:  # right: both as paired ratios to ar
        if n == "ar":
            axes[1].plot([1], [1], "s", color=color[n], label="ar (base)")
            continue
        sp, pr = paired.get("speed", {}).get(n), (paired.get("perplexity", {}).get(n) or {}).get("ppl_ratio")
        if sp and pr:
            axes[1].errorbar([sp["median"]], [pr["estimate"]],
                             xerr=[[sp["median"] - sp["p25"]], [sp["p75"] - sp["median"]]],
                             yerr=[[pr["estimate"] - pr["lo"]], [pr["hi"] - pr["estimate"]]], fmt="o", capsize=4, label=n,
                             color=color[n])
    axes[1].axhline(1, color="grey", lw=0.5)
    axes[1].axvline(1, color="grey", lw=0.5)
    axes[1].set_xlabel("speed / ar (median, IQR)")
    axes[1].set_ylabel("PPL / ar (95% CI)")
    axes[1].set_title("paired with ar")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    files.append(_save(fig, out / "speed_quality.png"))
    acc = paired.get("acceptance_per_position", {})
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, pos in acc.items():
            xs = range(1, len(pos) + 1)
            ax.errorbar(xs, [p["estimate"] for p in pos], yerr=[[p["estimate"] - p["lo"] for p in pos],
                                                                 [p["hi"] - p["estimate"] for p in pos]],
                        marker="o", capsize=3, label=n, color=color.get(n))
        ax.set_xticks(range(1, max(len(p) for p in acc.values()) + 1))
        ax.set_xlabel("draft position")
        ax.set_ylabel("share of rounds accepting it (95% CI)")
        ax.legend()
        files.append(_save(fig, out / "acceptance_per_position.png"))
    measured = [n for n in res if res[n].get("joules_per_token")]
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


def record_json(record: dict) -> str:
    """bench.json's text: objects one key per line (readable, diffable), lists of numbers or strings
    on one line. The record holds summaries only; the per-generation rows (token ids and all) are in
    the journal, records.jsonl, beside it."""
    return _dumps(json.loads(json.dumps(record, default=jsonable)), 0) + "\n"


def _dumps(x, depth: int) -> str:
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(x, dict) and x:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
        return "[\n" + ",\n".join(inner + _dumps(v, depth + 1) for v in x) + "\n" + pad + "]"
    return json.dumps(x)


def write_report(record: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(record_json(record))
    (out / "summary.md").write_text(markdown(record))
    return [out / "bench.json", out / "summary.md", *plots(record, out)]
