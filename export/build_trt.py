"""Build TensorRT plans for an engine folder (`mtad-trt build`), TensorRT 10.x and 11.x.

Planning and building are separate. The planning functions (`plan_profiles`, `choose_flags`,
`plan_role`) are pure — shapes from the manifest, flags from the TensorRT major version, and
every refusal — so they are tested on machines without TensorRT. `build_plans` then makes the
documented API calls:

    Builder -> create_network(flags) -> OnnxParser.parse_from_file (external data)
    -> builder config (workspace, precision flags, timing cache, two optimization profiles)
    -> build_serialized_network -> <role>/model.plan (via a temp file) + manifest plan entry

Precision: TensorRT 11 is strongly typed only, so the precision is the ONNX graph's dtype.
TensorRT 10 additionally allows the weakly typed route (an fp32 graph built with FP16/BF16
builder flags), which is deprecated since 10.12 but is what JetPack 6 (TensorRT 10.3) has.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtad_trt.backends.kvcache import bucket_sizes
from mtad_trt.backends.trt_plans import (
    PROFILE_DECODE,
    PROFILE_PREFILL,
    import_tensorrt,
    machine_info,
    rebuild_command,
    trt_major,
)
from mtad_trt.contract import ModelSpec
from mtad_trt.errors import MtadError
from mtad_trt.folder.manifest import Manifest, RoleEntry, sha256_file

log = logging.getLogger("mtad_trt")

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
Shape = list[int]


@dataclass
class BuildFlags:
    network: list[str] = field(default_factory=list)  # NetworkDefinitionCreationFlag names
    builder: list[str] = field(default_factory=list)  # BuilderFlag names to set
    clear: list[str] = field(default_factory=list)  # BuilderFlag names to clear
    strongly_typed: bool = False


@dataclass
class RolePlan:
    """Everything needed to build one role's plan, decided before TensorRT is touched."""

    role: str
    onnx: Path
    plan_rel: str  # relative to the engine folder
    profiles: list[dict[str, Any]]
    flags: BuildFlags
    settings: dict[str, Any]  # precision, max_batch, max_seq_len, max_decode_tokens, max_prefill_tokens


def plan_profiles(
    spec: ModelSpec,
    max_batch: int = 1,
    max_seq_len: int | None = None,
    max_decode_tokens: int = 32,
    max_prefill_tokens: int | None = None,
    smallest_bucket: int = 128,
    decode_opt_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Two optimization profiles, [{"name", "shapes": {input: [min, opt, max]}}], prefill first.

    S ranges over the runtime's cache buckets (`bucket_sizes`), the mask's last axis is S+T, K
    stays within max_decode_tokens in both (a prompt needs logits for its last token only, and a
    K as wide as a long prompt would make TensorRT reserve a [B, K, vocab] LM-head activation).
    Decode/verify is tuned (opt) at `decode_opt_tokens` (default: its full width) and full batch;
    1 tunes it for the draft's single-token steps instead (to be measured: docs/gpu.md).
    """
    s_max = spec.max_seq_len if max_seq_len is None else max_seq_len
    if s_max > spec.max_seq_len:
        raise MtadError(f"max_seq_len {s_max} exceeds the graph's KV capacity {spec.max_seq_len}")
    if min(max_batch, max_decode_tokens, s_max) < 1:
        raise MtadError("max_batch, max_decode_tokens and max_seq_len must be >= 1")
    t_prefill = s_max if max_prefill_tokens is None else min(max_prefill_tokens, s_max)
    if t_prefill < 1:
        raise MtadError("max_prefill_tokens must be >= 1")
    w = max_decode_tokens
    w_opt = w if decode_opt_tokens is None else decode_opt_tokens
    if not 1 <= w_opt <= w:
        raise MtadError(f"decode_opt_tokens must be between 1 and max_decode_tokens ({w}), not {w_opt}")
    buckets = bucket_sizes(s_max, smallest_bucket)
    s_min = buckets[0]

    def bucket_for(t: int) -> int:
        return next(b for b in buckets if b >= t)

    dims = spec.io_dims()  # the contract's named axes, evaluated at each profile point

    def shapes(b: tuple[int, int, int], t: tuple[int, int, int], k: tuple[int, int, int], s: tuple[int, int, int]):
        def point(i: int, name: str) -> Shape:
            axes = {"B": b[i], "T": t[i], "K": k[i], "S": s[i], "S+T": s[i] + t[i]}
            return [axes[d] if isinstance(d, str) else d for d in dims[name]]

        return {name: [point(i, name) for i in range(3)] for name in spec.input_names}

    t_opt = min(t_prefill, 256)
    k_max = min(max_decode_tokens, t_prefill)
    prefill = shapes((1, 1, max_batch), (1, t_opt, t_prefill), (1, 1, k_max), (s_min, bucket_for(t_opt), s_max))
    decode = shapes((1, max_batch, max_batch), (1, w_opt, w), (1, w_opt, w), (s_min, buckets[len(buckets) // 2], s_max))
    return [{"name": PROFILE_PREFILL, "shapes": prefill}, {"name": PROFILE_DECODE, "shapes": decode}]


def choose_flags(major: int, graph_dtype: str, precision: str) -> BuildFlags:
    """Network/builder flags for this TensorRT major version, or a refusal saying what to do.

    Strong typing (precision = graph dtype) whenever it can give the precision asked for; the
    weakly typed FP16/BF16 flags only on TensorRT 10 for an fp32 graph. STRONGLY_TYPED is
    accepted (and ignored) by 11.x, required to opt in on 10.x; EXPLICIT_BATCH is never set
    (deprecated and ignored since 10.0).
    """
    if precision not in PRECISIONS:
        raise MtadError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if major < 10:
        raise MtadError(f"TensorRT {major}.x is not supported: mtad-trt uses the TensorRT 10/11 named-tensor API; install TensorRT 10 or newer")
    want = PRECISIONS[precision]
    # Keep fp32 really fp32 (TensorRT enables TF32 matmuls by default); harmless if the flag is gone.
    clear = ["TF32"] if want == "float32" else []
    if want == graph_dtype:
        return BuildFlags(network=["STRONGLY_TYPED"], clear=clear, strongly_typed=True)
    if graph_dtype == "float32" and major == 10:
        return BuildFlags(builder=[precision.upper()], strongly_typed=False)
    if graph_dtype == "float32":
        raise MtadError(
            f"TensorRT {major}.x builds strongly typed networks only, so the precision is the graph's dtype "
            f"(float32): re-export the engine with `mtad-trt export ... --dtype {precision}`, or build with --precision fp32"
        )
    raise MtadError(
        f"the graph is {graph_dtype}: a {precision} plan cannot be built from it; "
        f"build with --precision {_precision_of(graph_dtype)}, or re-export the engine with `mtad-trt export ... --dtype {precision}`"
    )


def _precision_of(dtype: str) -> str:
    return next(p for p, d in PRECISIONS.items() if d == dtype)


def plan_role(
    folder: Path,
    role: str,
    entry: RoleEntry,
    major: int,
    precision: str,
    max_batch: int,
    max_seq_len: int | None,
    max_decode_tokens: int,
    max_prefill_tokens: int | None,
    decode_opt_tokens: int | None = None,
) -> RolePlan:
    """Every check and decision for one role's build; raises MtadError before any TensorRT work."""
    scheme = entry.quantization.get("scheme", "none")
    if scheme != "none":
        raise MtadError(
            f"the {role} graph is quantized ({scheme}): its MatMulNBits/int8 operators are ONNX Runtime "
            "contrib ops that TensorRT cannot parse; export an unquantized engine for TensorRT"
        )
    onnx = folder / entry.onnx
    if not onnx.is_file():
        raise MtadError(f"missing graph {onnx}: re-export the engine")
    flags = choose_flags(major, entry.spec.dtype, precision)
    profiles = plan_profiles(entry.spec, max_batch, max_seq_len, max_decode_tokens, max_prefill_tokens,
                             decode_opt_tokens=decode_opt_tokens)
    s_max = entry.spec.max_seq_len if max_seq_len is None else max_seq_len
    settings = {
        "precision": precision,
        "max_batch": max_batch,
        "max_seq_len": s_max,
        "max_decode_tokens": max_decode_tokens,
        "max_prefill_tokens": min(max_prefill_tokens or s_max, s_max),
    }
    if decode_opt_tokens is not None:  # recorded (and in the rebuild command) only when not the default
        settings["decode_opt_tokens"] = decode_opt_tokens
    return RolePlan(role, onnx, f"{role}/model.plan", profiles, flags, settings)


def default_timing_cache(folder: Path, trt_version: str, cc: str) -> Path:
    """Per TensorRT version and GPU architecture: a cache from another one would be rejected."""
    return folder / f"timing-trt{trt_version}-sm{cc.replace('.', '')}.cache"


def _write_atomic(path: Path, data: Any) -> None:
    """Write via a temp file in the same folder + rename: a crash never leaves a half plan."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)  # bytes, or TensorRT's IHostMemory (a buffer)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flag_bits(enum: Any, names: list[str]) -> int:
    return sum(1 << int(getattr(enum, n)) for n in names if hasattr(enum, n))


def _parser_error(err: Any) -> str:
    """IParserError's description (`desc()`), with the failing node and its operator where TensorRT
    names them (node_name / node_operator exist since 10.0), so the message says what to change."""
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where = f"{node} ({op})" if node and op else node or op
    return f"{where}: {desc}" if where else desc


def _parser_errors(parser: Any, most: int = 5) -> str:
    """The parser's first `most` errors and how many more, on one line however many nodes failed."""
    count = int(parser.num_errors)
    errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(min(count, most)))
    more = f" (and {count - most} more)" if count > most else ""
    return f"{errors}{more}" if errors else "no details (see the TensorRT log above)"


def _build_one(trt: Any, plan: RolePlan, timing_cache: Path, workspace_mb: int | None) -> tuple[Any, float]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_flag_bits(trt.NetworkDefinitionCreationFlag, plan.flags.network))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): the weights live in external data files next to the graph
    if not parser.parse_from_file(str(plan.onnx)):
        raise MtadError(f"TensorRT could not parse {plan.onnx}: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in plan.flags.builder:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.flags.clear:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    for prof in plan.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof["shapes"].items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    old = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(old)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    took = time.perf_counter() - start
    if serialized is None:
        raise MtadError(f"TensorRT failed to build a plan for {plan.onnx} (see its log above)")
    _write_atomic(timing_cache, config.get_timing_cache().serialize())
    return serialized, took


def build_plans(
    engine_folder: str | Path,
    precision: str = "fp16",
    max_batch: int = 1,
    max_seq_len: int | None = None,
    timing_cache: str | Path | None = None,
    workspace_mb: int | None = None,
    max_decode_tokens: int = 32,
    max_prefill_tokens: int | None = None,
    roles: list[str] | None = None,
    decode_opt_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Build `<role>/model.plan` for each role (default: all) and record them in the manifest.

    Returns {role: plan entry}. Everything is planned (and refused) before the first build, so a
    bad setting never leaves one role built and the other not.
    """
    folder = Path(engine_folder)
    manifest = Manifest.load(folder)
    names = roles or list(manifest.roles)
    for r in names:  # refusable without TensorRT: say so before asking for it
        scheme = manifest.role(r).quantization.get("scheme", "none")
        if scheme != "none":
            raise MtadError(
                f"the {r} graph is {scheme}-quantized with ONNX Runtime-only operators (MatMulNBits), which "
                "TensorRT cannot build; export a float engine for TensorRT (mtad-trt export --quantize none)"
            )
    trt = import_tensorrt()
    trt_version, gpu_name, cc = machine_info(trt)
    major = trt_major(trt_version)
    plans = [
        plan_role(folder, r, manifest.role(r), major, precision, max_batch, max_seq_len, max_decode_tokens,
                  max_prefill_tokens, decode_opt_tokens)
        for r in names
    ]
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(folder, trt_version, cc)
    out = {}
    for plan in plans:
        log.info("building the TensorRT plan for %s (%s, TensorRT %s, %s)", plan.role, precision, trt_version, gpu_name)
        serialized, took = _build_one(trt, plan, cache_path, workspace_mb)
        plan_path = folder / plan.plan_rel
        _write_atomic(plan_path, serialized)
        entry = {
            "path": plan.plan_rel,
            "sha256": sha256_file(plan_path),
            "tensorrt_version": trt_version,
            "cuda_version": torch.version.cuda,
            "gpu_name": gpu_name,
            "compute_capability": cc,
            **plan.settings,
            "strongly_typed": plan.flags.strongly_typed,
            "flags": {"network": plan.flags.network, "builder": plan.flags.builder, "cleared": plan.flags.clear},
            "profiles": plan.profiles,
            "timing_cache": str(cache_path),
            "workspace_mb": workspace_mb,
            "build_seconds": round(took, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        role_entry = manifest.role(plan.role)
        # the file was overwritten: an older entry for the same path would describe a plan that is gone
        role_entry.plans = [p for p in role_entry.plans if p.get("path") != plan.plan_rel] + [entry]
        manifest.save(folder)
        out[plan.role] = entry
        log.info("wrote %s in %.0f s; run it with --backend trt (rebuild: %s)", plan_path, took, rebuild_command(entry, folder))
    return out
