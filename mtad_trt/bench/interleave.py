"""The order a bench runs in: decoders interleaved per prompt (or per batch), order rotated.

On shared CPU machines the speed of one and the same step drifts by 20-30% within minutes. Running
every decoder over all prompts one after another lets that drift land on one decoder; here the
unit of work is one prompt (or, with --concurrency N, one batch of N prompts), run under every
system (decoders, then peers) before the next unit, and the systems' order is rotated by one per
unit so no system is always first (cold caches) or last. Speed ratios compare systems within a unit.

Jobs are (prompt, seed) pairs in seed-major order: all prompts under the first seed, then all under
the second, so a run stopped halfway still has every prompt at least once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtad_trt.errors import MtadError

SEED_STRIDE = 10_000  # seed index k of prompt i uses seed + i + k * SEED_STRIDE (k=0: the old seed + i)


@dataclass(frozen=True)
class Job:
    prompt_index: int
    prompt_id: str
    seed_index: int
    seed: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt_id, self.seed)


@dataclass(frozen=True)
class Unit:
    index: int
    jobs: tuple[Job, ...]
    order: tuple[str, ...]  # the systems, in the order they run this unit


def jobs(prompt_ids: list[str], seeds: int, base_seed: int) -> list[Job]:
    if seeds < 1:
        raise MtadError(f"--seeds must be >= 1, got {seeds}")
    return [Job(i, pid, k, base_seed + i + k * SEED_STRIDE) for k in range(seeds) for i, pid in enumerate(prompt_ids)]


def rotate(systems: tuple[str, ...], by: int) -> tuple[str, ...]:
    k = by % len(systems)
    return systems[k:] + systems[:k]


def plan(prompt_ids: list[str], systems: tuple[str, ...], seeds: int = 1, base_seed: int = 0,
         batch: int = 1) -> list[Unit]:
    """The units of a run: `batch` consecutive jobs each, every system once per unit, rotated."""
    if not systems:
        raise MtadError("nothing to run: no decoders or peers")
    if batch < 1:
        raise MtadError(f"--concurrency must be >= 1, got {batch}")
    js = jobs(prompt_ids, seeds, base_seed)
    return [Unit(u, tuple(js[i:i + batch]), rotate(systems, u)) for u, i in enumerate(range(0, len(js), batch))]


def describe(batch: int) -> str:
    if batch == 1:
        return "interleaved per prompt: each (prompt, seed) runs under every system before the next, order rotated"
    return (f"interleaved per batch of {batch} prompts (--concurrency {batch}): the same {batch} (prompt, seed) "
            "jobs run under every decoder as one batch, order rotated; peers run them one at a time")
