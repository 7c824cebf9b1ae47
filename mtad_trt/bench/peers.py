"""Peers run on the same prompts as mtad-trt, for ratios in the bench report.

- `hf`: transformers assisted generation (`generate(assistant_model=draft)`) with the same draft and
  target weights (float32, eager, same thread count): the simplest thing users would otherwise run.
- `hf-ar`: plain transformers `generate` with the target alone.
- `optimum` is not run in-process: optimum-onnx pins transformers < 4.58 while mtad-trt needs 5.x;
  run it in a separate environment (docs/results.md says how) and compare the JSON records.
"""

from __future__ import annotations

import time

from mtad_trt.errors import MtadError
from mtad_trt.manifest import Manifest

PEERS = ("hf", "hf-ar")


def _load_hf(manifest: Manifest, role: str):
    from mtad_trt.checkpoint import load_model, open_path

    src = manifest.role(role).source
    path = src.get("path")
    if not path:
        raise MtadError(f"the engine manifest does not record where the {role} came from; cannot load the peer")
    ckpt = open_path(path)
    if ckpt is None:
        raise MtadError(f"the {role} model's source {path} no longer exists; cannot load the peer")
    return load_model(ckpt, "float32")


def run_peer(peer: str, cfg, items, encoded: list[list[int]]) -> dict:
    if peer == "optimum":
        raise MtadError("the optimum peer needs its own environment (optimum-onnx pins transformers < 4.58); "
                        "see docs/results.md")
    if peer not in PEERS:
        raise MtadError(f"unknown peer '{peer}' (choose from {', '.join(PEERS)})")
    import torch

    torch.set_num_threads(cfg.threads)
    manifest = Manifest.load(cfg.engines)
    target = _load_hf(manifest, "target")
    draft = _load_hf(manifest, "draft") if peer == "hf" else None
    sample = cfg.temperature > 0
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, pad_token_id=manifest.pad_token_id or 0)
    if sample:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    if draft is not None:
        kwargs.update(assistant_model=draft, num_assistant_tokens=cfg.gamma,
                      num_assistant_tokens_schedule="constant")
    rows = []
    with torch.no_grad():
        x = torch.tensor([encoded[0]])
        target.generate(x, **{**kwargs, "max_new_tokens": 4})  # warm-up
        for i, ids in enumerate(encoded):
            torch.manual_seed(cfg.seed + i)
            t0 = time.perf_counter()
            out = target.generate(torch.tensor([ids]), **kwargs)
            wall = time.perf_counter() - t0
            rows.append({"prompt_id": items[i].id, "generated_tokens": int(out.shape[1] - len(ids)), "wall_s": wall})
    gen = sum(r["generated_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    return {"summary": {"requests": len(rows), "generated_tokens": gen, "tokens_per_s": gen / wall if wall else 0.0,
                        "peer": peer, "note": "transformers eager float32" + (" assisted generation" if draft else "")},
            "rows": rows}
