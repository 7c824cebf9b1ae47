"""Speculation that does not lose under load: pick γ (and B) per iteration from measured costs.

Each iteration the policy chooses one (γ, B) for every running request that did not fix them
(the whole batch switches at once: one shape per call), maximising the expected tokens per
second of the whole batch:

    Σ_r E[1 + a_r] / (Σ_depths t_draft(rows_d, T_d) + t_target(rows, T_verify))

E[a_r] = Σ_{i<γ} α_i, with α_i the running rate at which rounds of that decoder (at that B)
accepted at least i+1 drafted tokens. γ = 0 is a plain target step (1 token, no draft call):
where verifying is not nearly free (a CPU, or a large batch on a GPU), speculation stops paying
and the policy turns it off; when the batch shrinks it turns back on. SpS is lossless, so moving
its γ never changes what it samples; MTAD/MMTAD output depends on γ and B, so the policy moves
only what the request left unset, and each response's stats say what was used.

Costs t(role, rows, T) come from the engine folder's `tuning.json` (`mtad-trt tune`) when it
matches this backend and thread count, else from a short probe at load (a few shapes per model;
the log says how long it took); every real call then refines them (exponential moving average).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtad_trt.backends.rows import pad_inputs
from mtad_trt.backends.runner import ModelRunner
from mtad_trt.contract import StepInputs
from mtad_trt.errors import MtadError

if TYPE_CHECKING:
    from mtad_trt.engine.request import Request
    from mtad_trt.engine.scheduler import StepInfo

log = logging.getLogger("mtad_trt.engine.policy")

POLICIES = ("fixed", "auto")
TUNING_FILE = "tuning.json"


class CostModel:
    """Seconds per call t(role, rows, T), interpolated in the call's token count rows·T.

    On a CPU a call costs about what its tokens cost; on a GPU it is nearly flat until the chip
    saturates — both are a function of rows·T first. Points come from a table and are refined by
    observed calls — except the first call of each (role, rows, T) shape, which is not a step's
    cost but ONNX Runtime's one-time work for a new shape (measured up to 5× a step). Taken as a
    cost, it kept a plain 4-row step priced at 88 ms instead of 60, the policy never chose that
    step again to correct it, and --throughput-first served 4 MTAD streams at 0.66× plain decoding.
    (A new S bucket also costs once per shape; those first calls are still learned, and decay.)
    """

    def __init__(self, points: dict[str, dict[int, float]] | None = None, decay: float = 0.8) -> None:
        self.points: dict[str, dict[int, float]] = defaultdict(dict)
        for role, pts in (points or {}).items():
            self.points[role].update({int(n): float(t) for n, t in pts.items()})
        self.decay = decay
        self._shapes: set[tuple[str, int, int]] = set()  # shapes already called once (bounded: rows x widths)

    def observe(self, role: str, rows: int, t: int, seconds: float) -> None:
        if (role, rows, t) not in self._shapes:
            self._shapes.add((role, rows, t))
            return
        n = rows * t
        old = self.points[role].get(n)
        self.points[role][n] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def cost(self, role: str, rows: int, t: int) -> float:
        pts = self.points.get(role)
        if not pts:
            raise MtadError(f"no step costs known for the {role} model")
        ns = sorted(pts)
        n = rows * t
        if n in pts:
            return pts[n]
        if len(ns) == 1:
            return pts[ns[0]] * n / ns[0]
        lo = max([x for x in ns if x < n], default=ns[0])
        hi = min([x for x in ns if x > n], default=ns[-1])
        if lo == hi:  # outside the measured range: extend the nearest segment
            i = ns.index(lo)
            lo, hi = (ns[i - 1], ns[i]) if i else (ns[0], ns[1])
        slope = (pts[hi] - pts[lo]) / (hi - lo)
        return max(pts[lo] + slope * (n - lo), 1e-6)

    def to_json(self) -> dict:
        return {role: {str(n): t for n, t in sorted(pts.items())} for role, pts in self.points.items()}


class Acceptance:
    """Running per-position acceptance α_i of one (decoder, B): rounds that accepted >= i+1 tokens."""

    def __init__(self, decay: float = 0.98) -> None:
        self.hits: dict[int, float] = defaultdict(float)
        self.trials: dict[int, float] = defaultdict(float)
        self.decay = decay
        self.rounds = 0

    def observe(self, gamma: int, accepted: int) -> None:
        self.rounds += 1
        for i in range(gamma):
            self.hits[i] = self.decay * self.hits[i] + (accepted > i)
            self.trials[i] = self.decay * self.trials[i] + 1

    def expected(self, gamma: int) -> float:
        """E[accepted] for a round of depth γ (positions never tried count as the deepest tried)."""
        out, last = 0.0, 0.0
        for i in range(gamma):
            if self.trials[i] > 0:
                last = self.hits[i] / self.trials[i]
            out += last
        return out

    def rate(self, i: int) -> float:
        """α_i: how often rounds accepted at least i+1 tokens (an untried position: the deepest tried
        one's rate, as in `expected`; nothing tried yet: 1, the costlier assumption)."""
        tried = [j for j in range(i + 1) if self.trials.get(j, 0) > 0]
        return self.hits[tried[-1]] / self.trials[tried[-1]] if tried else 1.0


def probe_costs(runner: ModelRunner, role: str, shapes: list[tuple[int, int]], reps: int = 2) -> dict[int, float]:
    """Time padding-only steps of the given (rows, T) shapes on an idle runner (median of reps)."""
    out: dict[int, list[float]] = defaultdict(list)
    s = runner.reserve(1)
    window = runner.spec.window
    for rows, t in shapes:
        inp = StepInputs.zeros(rows, t, t, s, window=window)
        pad_inputs(inp, s, t)
        inp.logits_index[:] = np.arange(t)
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            runner.step(inp)
            if i:  # the first run is the warm-up
                times.append(time.perf_counter() - t0)
        out[rows * t].append(float(np.median(times)))
    runner.reset()
    return {n: float(np.mean(ts)) for n, ts in out.items()}  # shapes with equal rows·T share a point


def probe_shapes(max_batch: int, widest: int) -> list[tuple[int, int]]:
    rows = sorted({1, max(1, max_batch // 2), max_batch})
    widths = sorted({1, 2, min(5, widest), widest})
    return [(r, t) for r in rows for t in widths]


class SpeculationPolicy:
    """The `auto` policy: called by the scheduler at every iteration boundary."""

    def __init__(self, costs: CostModel, max_gamma: int = 8, margin: float = 1.05, warmup_rounds: int = 8,
                 learn_costs: bool = True, keep_joint_verification: bool = True, history_limit: int = 4096) -> None:
        self.costs, self.max_gamma, self.margin, self.warmup_rounds = costs, max_gamma, margin, warmup_rounds
        self.learn_costs = learn_costs  # refine costs from observed calls (off: the table is taken as given)
        self.acceptance: dict[tuple[str, int], Acceptance] = defaultdict(Acceptance)
        self.choice: tuple[int, int] | None = None  # (γ, B) of the flexible rows, last iteration
        # MTAD / MMTAD are lossy by design: their output quality is why a request asked for them, so
        # the policy may shrink γ and B but keeps γ >= 1 unless the server chose throughput first.
        # SpS is lossless: its γ may go to 0 (plain steps) whenever that is faster.
        self.keep_joint_verification = keep_joint_verification
        self._seen: dict[str, int] = {}  # running request id -> iterations already counted (pruned)
        self.history: deque[tuple[int, int, int]] = deque(maxlen=history_limit)  # (rows, γ, B), recent

    # -- what happened ---------------------------------------------------------------------------
    def _learn(self, running: list[Request], last: StepInfo) -> None:
        for role, phase, rows, t, seconds in last.calls or []:
            if phase != "prefill" and self.learn_costs:
                self.costs.observe(role, rows, t, seconds)
        live = {req.id for req in running}
        for rid in [r for r in self._seen if r not in live]:  # finished requests: forget them
            del self._seen[rid]
        for req in running:
            st = req.state
            if st is None or not req.decode.speculative:
                continue
            done = self._seen.get(req.id, 0)
            if req.stats.iterations > done:  # one round per step at most
                self.acceptance[(req.decode.decoder, st.beam_width)].observe(st.gamma, st.last_accepted)
                self._seen[req.id] = req.stats.iterations

    # -- what to do next -------------------------------------------------------------------------
    def __call__(self, running: list[Request], last: StepInfo) -> None:
        self._learn(running, last)
        flexible = [r for r in running if r.decode.speculative and r.state is not None
                    and not {"gamma", "beam_width"} <= r.fixed]
        if not flexible:
            return
        best = self._choose(running, flexible)
        self.choice = best
        self.history.append((len(running), *best))
        for req in flexible:  # a request's own γ and B (or the defaults it got) are ceilings: they sized its slots
            if "gamma" not in req.fixed:
                req.state.gamma = self._gamma(req, best[0])
            if "beam_width" not in req.fixed and req.decode.decoder != "sps":
                req.state.beam_width = min(best[1], req.decode.beam_width)

    def _choose(self, running: list[Request], flexible: list[Request]) -> tuple[int, int]:
        top_g = min(self.max_gamma, max(r.decode.gamma for r in flexible))
        top_b = max(r.decode.beam_width for r in flexible)
        current = self.choice or (top_g, top_b)
        rounds = sum(self.acceptance[k].rounds for k in self.acceptance)
        if rounds < self.warmup_rounds:  # nothing measured yet: run as asked until acceptance is known
            return current
        widths = sorted({1, *[b for b in (2, 4, 8) if b < top_b], top_b})
        candidates = [(0, top_b)] + [(g, b) for g in range(1, top_g + 1) for b in widths]
        rate = {c: self._throughput(running, flexible, c) for c in candidates}
        best = max(candidates, key=lambda c: rate[c])
        if current in rate and rate[best] < self.margin * rate[current]:
            return current  # hysteresis: do not flap between near-equal choices
        return best

    def _gamma(self, req: Request, gamma: int) -> int:
        """The γ a flexible request runs at when the batch's choice is `gamma`."""
        g = min(gamma, req.decode.gamma)
        if self.keep_joint_verification and req.decode.decoder in ("mtad", "mmtad"):
            g = max(1, g)
        return g

    def _catch_up_width(self, drafting: list[tuple[str, int, int]]) -> float:
        """Expected width of the first draft call of a round: the draft feeds the token the target
        emitted, plus the last drafted token when the whole block was accepted (that one was
        sampled but never fed). One call serves every row, so it is 2 wide when any row accepted
        all: 1 + P(some row did)."""
        none_full = 1.0
        for d, g, b in drafting:
            none_full *= 1.0 - self.acceptance[(d, b)].rate(g - 1)
        return 2.0 - none_full

    def _throughput(self, running: list[Request], flexible: list[Request], choice: tuple[int, int]) -> float:
        shapes = []  # (decoder, γ, B) per running row
        flex = set(map(id, flexible))
        for r in running:
            if not r.decode.speculative:
                shapes.append(("ar", 0, 1))
                continue
            g = self._gamma(r, choice[0]) if id(r) in flex and "gamma" not in r.fixed else r.state.gamma
            b = min(choice[1], r.decode.beam_width) if id(r) in flex and "beam_width" not in r.fixed else r.state.beam_width
            shapes.append((r.decode.decoder, g, 1 if r.decode.decoder == "sps" else b))
        tokens = sum(1 + (self.acceptance[(d, b)].expected(g) if g else 0) for d, g, b in shapes)
        seconds = 0.0
        for depth in range(max(g for _, g, _ in shapes)):
            drafting = [(d, g, b) for d, g, b in shapes if g > depth]
            width = self._catch_up_width(drafting) if depth == 0 else max(b for _, _, b in drafting)
            seconds += self.costs.cost("draft", len(drafting), width)
        verify = max((1 + (g * b if d == "mmtad" else g)) if g else 1 for d, g, b in shapes)
        seconds += self.costs.cost("target", len(shapes), verify)
        return tokens / seconds


# -- making one ----------------------------------------------------------------------------------
def tuning_key(runner: ModelRunner, threads: int | None = None) -> str:
    return f"{runner.name}" + (f"-t{threads}" if threads else "")


def load_tuning(folder: Path, key: str) -> dict[str, dict[int, float]] | None:
    path = Path(folder) / TUNING_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = table.get(key)
    return entry.get("points") if isinstance(entry, dict) else None


def tune(folder: Path, target: ModelRunner, draft: ModelRunner | None, max_batch: int, threads: int | None,
         widths: list[int]) -> dict:
    """Measure step costs for every row bucket up to max_batch and every width, store them in the
    engine folder's tuning.json (one entry per backend + thread count), and return the entry."""
    from mtad_trt.engine.batch import row_buckets

    t0 = time.perf_counter()
    shapes = [(r, t) for r in row_buckets(max_batch) for t in sorted(set(widths))]
    points = {"target": probe_costs(target, "target", shapes)}
    if draft is not None:
        points["draft"] = probe_costs(draft, "draft", shapes)
    entry = {"points": points, "shapes": shapes, "max_batch": max_batch, "seconds": time.perf_counter() - t0,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = Path(folder) / TUNING_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table[tuning_key(target, threads)] = entry
    path.write_text(json.dumps(table, indent=1) + "\n")
    return entry


def make_policy(kind: str, target: ModelRunner, draft: ModelRunner | None, max_batch: int,
                folder: Path | None = None, threads: int | None = None, widest: int = 17,
                keep_joint_verification: bool = True) -> SpeculationPolicy | None:
    if kind not in POLICIES:
        raise MtadError(f"unknown speculation policy '{kind}' (choose from {', '.join(POLICIES)})")
    if kind == "fixed" or draft is None:
        return None
    points = load_tuning(folder, tuning_key(target, threads)) if folder is not None else None
    if points is None:
        t0 = time.perf_counter()
        shapes = probe_shapes(max_batch, widest)
        points = {"target": probe_costs(target, "target", shapes), "draft": probe_costs(draft, "draft", shapes)}
        log.warning("speculation policy: measured %d step shapes per model in %.1f s (store a full table "
                    "with `mtad-trt tune`)", len(shapes), time.perf_counter() - t0)
    return SpeculationPolicy(CostModel(points), keep_joint_verification=keep_joint_verification)
