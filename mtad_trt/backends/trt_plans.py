"""TensorRT plans: importing TensorRT, and which plan in an engine folder may run on this machine.

A serialized plan only deserializes under the TensorRT version that built it, and its kernels
were chosen for one GPU, so the manifest records both and a plan that does not match is refused
with the `mtad-trt build` command that rebuilds it. `tensorrt` is imported lazily, only through
`import_tensorrt`: everything else in mtad-trt runs without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mtad_trt.errors import BackendUnavailable
from mtad_trt.folder.manifest import Manifest

log = logging.getLogger("mtad_trt")

PROFILE_PREFILL, PROFILE_DECODE = "prefill", "decode"  # the optimization profiles every plan has

INSTALL_HINT = (
    "install it with `pip install tensorrt` (wheels come from NVIDIA's index, "
    "--extra-index-url https://pypi.nvidia.com), or on Jetson use the JetPack's TensorRT "
    "(apt install python3-libnvinfer, JetPack 6 = TensorRT 10.3)"
)
def import_tensorrt() -> Any:
    """The `tensorrt` module, or BackendUnavailable with one line saying how to get it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a placeholder wheel / missing libnvinfer raising anything
        raise BackendUnavailable(f"TensorRT is not usable here ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise BackendUnavailable(f"the installed `tensorrt` package is a placeholder, not TensorRT; {INSTALL_HINT}")
    return trt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def machine_info(trt: Any) -> tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability "8.7") of this machine's GPU 0."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs an NVIDIA GPU with CUDA; torch sees none here")
    major, minor = torch.cuda.get_device_capability(0)
    return str(trt.__version__), torch.cuda.get_device_name(0).strip(), f"{major}.{minor}"


def rebuild_command(plan: dict[str, Any], folder: str | Path = "ENGINE_FOLDER") -> str:
    """The `mtad-trt build` command line that reproduces this plan's settings on this machine."""
    parts = ["mtad-trt", "build", str(folder)]
    for key, flag in (
        ("precision", "--precision"),
        ("max_batch", "--max-batch"),
        ("max_seq_len", "--max-seq-len"),
        ("max_decode_tokens", "--max-decode-tokens"),
        ("max_prefill_tokens", "--max-prefill-tokens"),
        ("decode_opt_tokens", "--decode-opt-tokens"),
    ):
        if plan.get(key) is not None:
            parts += [flag, str(plan[key])]
    return " ".join(parts)


def check_plan_compat(
    plan: dict[str, Any], trt_version: str, gpu_name: str, cc: str, folder: str | Path = "ENGINE_FOLDER"
) -> str | None:
    """None when the plan can run here; else why not, ending with the command that rebuilds it.

    A serialized engine only deserializes under the TensorRT version that built it, and its
    kernels were chosen for one GPU: both must match exactly.
    """
    built_v, built_gpu, built_cc = plan.get("tensorrt_version"), plan.get("gpu_name"), plan.get("compute_capability")
    problems = []
    if built_v != trt_version:
        problems.append(f"TensorRT {built_v} (this machine has {trt_version})")
    if built_cc != cc:
        problems.append(f"compute capability {built_cc} (this GPU has {cc})")
    if str(built_gpu or "").strip() != gpu_name.strip():
        problems.append(f"GPU '{built_gpu}' (this GPU is '{gpu_name}')")
    if not problems:
        return None
    return (
        f"plan {plan.get('path', '?')} was built for {' and '.join(problems)}; "
        f"rebuild it here with `{rebuild_command(plan, folder)}`"
    )


def profile_problems(engine: Any, profiles: list[dict[str, Any]], inputs: list[str]) -> list[str]:
    """How the manifest's profile list differs from the plan's own profiles (empty: they agree).

    Compares the count, that the runtime's profiles are all named, and for every profile index
    and input the [min, opt, max] shapes the manifest records with `get_tensor_profile_shape`.
    """
    names = [p.get("name") for p in profiles]
    problems = [f"the manifest lists no '{n}' profile" for n in (PROFILE_PREFILL, PROFILE_DECODE) if n not in names]
    count = int(engine.num_optimization_profiles)
    if count != len(profiles):
        problems.append(f"the plan has {count} optimization profiles, the manifest lists {len(profiles)} ({', '.join(map(str, names))})")
    for i, prof in enumerate(profiles[:count]):
        shapes = prof.get("shapes", {})
        for name in inputs:
            got = [[int(d) for d in dims] for dims in engine.get_tensor_profile_shape(name, i)]
            want = shapes.get(name)
            if want is None or [list(map(int, w)) for w in want] != got:
                problems.append(f"profile {i} ({prof.get('name')}) {name}: plan [min, opt, max] {got}, manifest {want}")
    return problems


def select_plan(
    plans: list[dict[str, Any]], trt_version: str, gpu_name: str, cc: str, folder: str | Path = "ENGINE_FOLDER"
) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest compatible plan entry (or None) and the reasons the others were refused."""
    reasons = []
    for plan in reversed(plans):
        why = check_plan_compat(plan, trt_version, gpu_name, cc, folder)
        if why is None:
            return plan, reasons
        reasons.append(why)
    return None, reasons


def usable_plans(manifest: Manifest) -> dict[str, dict[str, Any]] | None:
    """{role: plan entry} when every role has a plan that runs on this machine, else None.

    Used by backend auto-selection: no TensorRT, no GPU or no matching plan all mean "not trt".
    """
    try:
        info = machine_info(import_tensorrt())
    except BackendUnavailable as e:
        log.debug("no TensorRT backend: %s", e)
        return None
    out = {}
    for role, entry in manifest.roles.items():
        plan, reasons = select_plan(entry.plans, *info)
        if plan is None:
            log.info("no usable TensorRT plan for %s: %s", role, "; ".join(reasons) or "none built")
            return None
        out[role] = plan
    return out or None
