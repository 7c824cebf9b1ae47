"""From the journal's records to the report's numbers: per-system summaries and paired statistics.

A pure function of the records (no clock, no model), so a resumed run and an uninterrupted one
with the same records give the same summary, and the bootstrap is seeded.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from mtad_trt.bench import metrics, stats
from mtad_trt.bench.journal import Journal
from mtad_trt.bench.quality import perplexity
from mtad_trt.engine.stats import Stats

BASE = "ar"
CONTROL = "sps"
SPEC = "sps"  # the paper's speed and energy claims are against speculative decoding


def rows_of(journal: Journal, system: str) -> list[dict]:
    """The system's records, gen merged with its score, in run order."""
    out = []
    for key, g in journal.gens.items():
        if key[0] == system:
            s = journal.scores.get(key, {})
            out.append({**{k: v for k, v in g.items() if k not in ("type", "system")},
                        **{k: v for k, v in s.items() if k not in ("type", "system", "prompt_id", "seed")}})
    return sorted(out, key=lambda r: (r["unit"], r["prompt_index"], r["seed"]))


def _decoder_summary(rows: list[dict], windows: list[dict]) -> dict:
    total = Stats.total([Stats.from_dict(r["stats"]) for r in rows])
    gen = total.generated_tokens
    lat = metrics.summarize_latencies(metrics.RequestTiming(**r["timing"]) for r in rows)
    scored = [r for r in rows if r.get("scored_tokens")]
    means = [[r["mean_logprob"]] for r in scored]
    window_s = sum(w["window_s"] for w in windows)
    out = {
        "requests": len(rows),
        "generated_tokens": gen,
        "tokens_per_s": total.tokens_per_s,  # per request: Σ tokens / Σ request wall times
        "aggregate_tokens_per_s": gen / window_s if window_s else None,  # Σ tokens / Σ timing windows
        "tokens_per_s_per_request": lat.output_tokens_per_s,
        "ttft_s": lat.ttft_s,
        "tpot_s": lat.tpot_s,
        "tokens_per_target_call": total.tokens_per_target_call,
        "acceptance_rate": total.acceptance_rate if total.iterations and total.gamma else None,
        "accepted_per_position": [x / total.iterations for x in total.accepted_per_position] if total.iterations else [],
        "perplexity": perplexity(means) if means else None,  # the paper's: mean over samples
        "perplexity_token_weighted": (math.exp(-sum(r["logprob_sum"] for r in scored) / sum(r["scored_tokens"] for r in scored))
                                      if scored else None),  # = quality.token_weighted_perplexity
        "scored_requests": len(scored),
        "time_split_s": {"prefill_s": total.prefill_s, "draft_s": total.draft_s, "verify_s": total.verify_s,
                         "other_s": sum(Stats.from_dict(r["stats"]).other_s for r in rows)},
    }
    _energy(out, windows, gen)
    passes = [r["passed"] for r in rows if "passed" in r]
    if passes:
        out["pass_at_1"] = float(np.mean(passes))
    return out


def _peer_summary(rows: list[dict], windows: list[dict]) -> dict:
    gen = sum(r["generated_tokens"] for r in rows)
    window_s = sum(w["window_s"] for w in windows)
    decode = [r["decode_tokens_per_s"] for r in rows if r.get("decode_tokens_per_s")]
    ttft = [r["ttft_s"] for r in rows if r.get("ttft_s") is not None]
    out = {"requests": len(rows), "generated_tokens": gen, "tokens_per_s": gen / window_s if window_s else 0.0,
           "aggregate_tokens_per_s": gen / window_s if window_s else None,
           "decode_tokens_per_s_p50": float(np.median(decode)) if decode else None,
           "ttft_s": {"p50": float(np.median(ttft))} if ttft else None,
           "note": next((w.get("note") for w in windows if w.get("note")), "")}
    _energy(out, windows, gen)
    return out


def _energy(out: dict, windows: list[dict], tokens: int) -> None:
    joules = [w.get("joules") for w in windows]
    if windows and all(j is not None for j in joules) and tokens:
        out["energy_joules"] = float(sum(joules))
        out["joules_per_token"] = float(sum(joules)) / tokens


def _windows(journal: Journal, system: str) -> list[dict]:
    return [w for (s, _), w in sorted(journal.windows.items(), key=lambda kv: kv[0][1]) if s == system]


def _rates(windows: list[dict], per: str = "s") -> dict[int, float]:
    if per == "s":
        return {w["unit"]: w["tokens"] / w["window_s"] for w in windows if w["window_s"] > 0}
    return {w["unit"]: w["tokens"] / w["joules"] for w in windows if w.get("joules")}  # tokens per joule


def build_results(journal: Journal, systems: tuple[str, ...], n_boot: int = stats.N_BOOT) -> tuple[dict, dict]:
    results, rows, windows = {}, {}, {}
    for s in systems:
        rows[s], windows[s] = rows_of(journal, s), _windows(journal, s)
        if not rows[s]:
            continue
        summ = _peer_summary(rows[s], windows[s]) if s.startswith("peer:") else _decoder_summary(rows[s], windows[s])
        results[s] = {"summary": summ}  # the per-generation rows stay in the journal (records.jsonl)
    decoders = [s for s in results if not s.startswith("peer:")]
    logp = {d: {(r["prompt_id"], r["seed"]): r["mean_logprob"] for r in rows[d] if r.get("mean_logprob") is not None}
            for d in decoders}
    passed = {d: {(r["prompt_id"], r["seed"]): bool(r["passed"]) for r in rows[d] if "passed" in r} for d in decoders}
    boot = dict(n_boot=n_boot)
    paired: dict = {"base": BASE, "n_boot": n_boot, "level": stats.LEVEL, "speed": {}, "speed_vs_sps": {},
                    "energy_vs_sps": {}, "perplexity": {}, "perplexity_ci": {}, "pass_at_1": {}, "pass_vs_ar": {},
                    "acceptance_per_position": {}}
    for d in decoders:
        paired["perplexity_ci"][d] = _ppl_ci(logp[d], n_boot)
        paired["pass_at_1"][d] = stats.pass_rate(passed[d])
        per_prompt: dict[str, tuple[list[int], int]] = {}
        acc = defaultdict(lambda: [[], 0])
        for r in rows[d]:
            st = r["stats"]
            a = acc[r["prompt_id"]]
            a[0] = [x + y for x, y in _zip_pad(a[0], st.get("accepted_per_position", []))]
            a[1] += st.get("iterations", 0)
        per_prompt = {p: (v[0], v[1]) for p, v in acc.items()}
        if any(it for _, it in per_prompt.values()):
            paired["acceptance_per_position"][d] = stats.acceptance_per_position(per_prompt, **boot)
    if BASE in results:
        for s in results:
            if s == BASE:
                continue
            paired["speed"][s] = stats.speed_vs_base(_rates(windows[s]), _rates(windows[BASE]), **boot)
            if s in decoders:
                paired["perplexity"][s] = stats.perplexity_vs_base(logp[s], logp[BASE], **boot)
                if passed[s] and passed[BASE]:
                    paired["pass_vs_ar"][s] = stats.pass_vs_base(passed[s], passed[BASE], **boot)
        paired["control"] = _qualified(stats.control_check(paired["perplexity"], CONTROL), paired["perplexity"])
    if SPEC in results:
        for s in decoders:
            if s not in (SPEC, BASE):
                paired["speed_vs_sps"][s] = stats.speed_vs_base(_rates(windows[s]), _rates(windows[SPEC]), **boot)
                e = stats.speed_vs_base(_rates(windows[s], "J"), _rates(windows[SPEC], "J"), **boot)
                if e is not None:
                    paired["energy_vs_sps"][s] = e  # tokens per joule, d / sps (> 1: d uses less energy)
    return results, paired


def _qualified(control: dict, comparisons: dict) -> dict:
    """A passed control says only that no bias larger than its interval could show was found: add
    the interval's half-width, in perplexity, to the record and to the message."""
    ratio = (comparisons.get(control["decoder"]) or {}).get("ppl_ratio")
    if not ratio:
        return control
    half = 100 * (ratio["hi"] - ratio["lo"]) / 2
    control = {**control, "ppl_half_width_pct": half}
    if control["ok"]:
        control["message"] += (f"; \"passed\" means only that no bias larger than about ±{half:.1f}% in perplexity "
                               "(the interval's half-width) was detected — a smaller one would pass too")
    return control


def _zip_pad(a: list[int], b: list[int]):
    n = max(len(a), len(b))
    return zip(list(a) + [0] * (n - len(a)), list(b) + [0] * (n - len(b)), strict=True)


def _ppl_ci(logp: dict, n_boot: int) -> dict | None:
    """The decoder's own perplexity with a bootstrap interval over prompts (seeds averaged)."""
    per: dict[str, list[float]] = defaultdict(list)
    for (p, _), v in logp.items():
        per[p].append(v)
    if not per:
        return None
    m = np.array([np.mean(per[p]) for p in sorted(per)])
    lo, hi = stats.bootstrap_mean(m, n_boot=n_boot)
    return stats.interval(math.exp(-m.mean()), math.exp(-hi), math.exp(-lo), len(m))


def run_time(journal: Journal) -> dict:
    """How long the run took, from the journal: per phase, the span of each session's lines (plus
    the first line's own duration), summed over sessions; the gaps between sessions are not counted."""
    out = {}
    for phase, recs, dur in (("generate", journal.windows.values(), "window_s"),
                             ("score", journal.scores.values(), "score_s")):
        sessions: dict[float, list[dict]] = defaultdict(list)
        for r in recs:
            if "t" in r:
                sessions[r.get("session", 0.0)].append(r)
        total = 0.0
        for rs in sessions.values():
            rs.sort(key=lambda r: r["t"])
            total += rs[-1]["t"] - rs[0]["t"] + rs[0].get(dur, 0.0)
        out[f"{phase}_s"] = total
        out[f"{phase}_sessions"] = len(sessions)
    out["windows_s"] = float(sum(w["window_s"] for w in journal.windows.values()))
    return out
