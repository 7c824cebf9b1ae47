"""Peers: other runtimes run in the same bench, interleaved with our decoders, same prompts and threads.

- `hf`: transformers assisted generation (`generate(assistant_model=draft)`), float32 eager.
- `hf-ar`: plain transformers `generate` with the target alone.
- `ort-genai`: ONNX Runtime GenAI (`pip install 'mtad-trt[peers-ort]'`), its model builder run once on
  the target's converted HF folder (`-p int4 -e cpu`, cached under the mtad-trt cache folder), or
  the folder given with --peer-ort-model.
- `llama.cpp`: the target's Q4_K_M GGUF through `llama-cpp-python`, which must be built as
  docs/results.md says (a native build crashes on these VMs); --peer-gguf names another file.
- `optimum` is not run in-process: optimum-onnx pins transformers < 4.58 while mtad-trt needs 5.x.

Every peer decodes autoregressively with the run's sampling settings (T, top-k, top-p, seed) up to
max_new_tokens, stopping at EOS (HumanEval stop strings are not applied: peers are timed, not
scored). A peer that cannot run refuses when it opens, before any generation, naming the fix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mtad_trt.errors import MtadError
from mtad_trt.folder.manifest import Manifest

PEERS = ("hf", "hf-ar", "ort-genai", "llama.cpp")
ORT_GENAI_INSTALL = "pip install 'onnxruntime-genai==0.18.0'  (or: pip install 'mtad-trt[peers-ort]')"
LLAMACPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
                    "pip install --no-binary llama-cpp-python 'llama-cpp-python==0.3.36'")


def timing_row(t0: float, times: list[float], token_ids: list[int] | None = None) -> dict:
    """A peer request's numbers from its start and the arrival time of every token."""
    n = len(times)
    row = {"generated_tokens": n, "e2e_s": (times[-1] - t0) if n else 0.0, "ttft_s": (times[0] - t0) if n else None,
           "decode_tokens_per_s": (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None}
    if token_ids is not None:
        row["token_ids"] = token_ids
    return row


def _source_folder(cfg, role: str = "target") -> Path:
    src = Manifest.load(cfg.engines).role(role).source
    path = Path(src.get("path") or "")
    if not src.get("path") or not path.exists():
        raise MtadError(f"the engine manifest does not record an existing source for the {role}; cannot load the peer")
    return path


class HfPeer:
    def __init__(self, cfg, assisted: bool) -> None:
        import torch

        from mtad_trt.folder.checkpoint import load_model, open_path

        torch.set_num_threads(cfg.threads)
        manifest = Manifest.load(cfg.engines)

        def load(role):
            ckpt = open_path(str(_source_folder(cfg, role)))
            return load_model(ckpt, "float32")

        self.target = load("target")
        self.draft = load("draft") if assisted else None
        self.name, self.cfg = ("hf" if assisted else "hf-ar"), cfg
        self.note = "transformers eager float32" + (" assisted generation" if assisted else "")
        sample = cfg.temperature > 0
        self.kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, pad_token_id=manifest.pad_token_id or 0)
        if sample:
            self.kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
        if self.draft is not None:
            self.kwargs.update(assistant_model=self.draft, num_assistant_tokens=cfg.gamma,
                               num_assistant_tokens_schedule="constant")

    def generate(self, ids: list[int], seed: int, max_new: int | None = None) -> dict:
        import torch

        torch.manual_seed(seed)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = self.target.generate(torch.tensor([ids]), **{**self.kwargs, "max_new_tokens": max_new or self.cfg.max_new_tokens})
            t1 = time.perf_counter()
        n = int(out.shape[1] - len(ids))
        return {"generated_tokens": n, "e2e_s": t1 - t0, "ttft_s": None, "decode_tokens_per_s": None,
                "token_ids": [int(t) for t in out[0, len(ids):]]}

    def close(self) -> None:
        self.target = self.draft = None


def ort_genai_folder(cfg) -> Path:
    """The ORT GenAI model folder: --peer-ort-model, or the model builder's int4 CPU export of the
    target's HF folder, built once into the cache (minutes for the 1.5B target; outside any timing)."""
    if cfg.peer_ort_model:
        path = Path(cfg.peer_ort_model)
        if not (path / "genai_config.json").is_file():
            raise MtadError(f"--peer-ort-model {path} has no genai_config.json (build it with "
                            "python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p int4 -e cpu)")
        return path
    from mtad_trt.export.registry import cache_dir

    src = _source_folder(cfg)
    if not (src / "config.json").is_file():
        raise MtadError(f"the target's source {src} is not a Hugging Face folder; build the ORT GenAI model "
                        "yourself and pass --peer-ort-model")
    out = cache_dir() / "ort-genai" / f"{src.name}-int4-cpu"
    if (out / "genai_config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp),
           "-p", "int4", "-e", "cpu", "-c", str(tmp / "cache")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode or not (tmp / "genai_config.json").is_file():
        raise MtadError(f"the ORT GenAI model builder failed ({' '.join(cmd)}): {res.stderr.strip()[-500:]}")
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    tmp.rename(out)
    return out


class OrtGenAiPeer:
    name = "ort-genai"

    def __init__(self, cfg) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise MtadError(f"the ort-genai peer needs onnxruntime-genai: {ORT_GENAI_INSTALL}") from None
        self.og, self.cfg = og, cfg
        folder = ort_genai_folder(cfg)
        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        threads = {"intra_op_num_threads": cfg.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.folder = folder
        self.note = f"ONNX Runtime GenAI {og.__version__}, {folder.name}"

    def generate(self, ids: list[int], seed: int, max_new: int | None = None) -> dict:
        og, cfg = self.og, self.cfg
        max_new = max_new or cfg.max_new_tokens
        params = og.GeneratorParams(self.model)
        opts = dict(max_length=len(ids) + max_new, do_sample=cfg.temperature > 0, random_seed=seed)
        if cfg.temperature > 0:
            opts.update(temperature=cfg.temperature, top_p=cfg.top_p, **({"top_k": cfg.top_k} if cfg.top_k else {}))
        params.set_search_options(**opts)
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        times, out = [], []
        while not gen.is_done() and len(out) < max_new:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            times.append(time.perf_counter())
        del gen
        return timing_row(t0, times, out)

    def close(self) -> None:
        self.model = None


def llamacpp_gguf(cfg) -> Path:
    """--peer-gguf, or the GGUF the target's converted folder was made from (`models fetch`)."""
    if cfg.peer_gguf:
        path = Path(cfg.peer_gguf).expanduser()
    else:
        src = _source_folder(cfg)
        if src.suffix == ".gguf":
            path = src
        else:
            meta = src / "mtad_trt_source.json"
            if not meta.is_file():
                raise MtadError(f"no GGUF is recorded for the target ({src}); pass --peer-gguf FILE.gguf")
            from mtad_trt.export.registry import gguf_path

            path = gguf_path(json.loads(meta.read_text())["name"])
    if not path.is_file():
        raise MtadError(f"the llama.cpp peer's GGUF {path} does not exist (mtad-trt models fetch, or --peer-gguf)")
    return path


class LlamaCppPeer:
    name = "llama.cpp"

    def __init__(self, cfg) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise MtadError("the llama.cpp peer needs llama-cpp-python, built without AMX on these VMs "
                            f"(docs/results.md section 4): {LLAMACPP_INSTALL}") from None
        gguf = llamacpp_gguf(cfg)
        self.cfg = cfg
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=cfg.threads, n_threads_batch=cfg.threads,
                                   n_ctx=2048, verbose=False)
        self.note = f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}"

    def generate(self, ids: list[int], seed: int, max_new: int | None = None) -> dict:
        cfg = self.cfg
        self.llm.reset()
        sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if cfg.temperature > 0 else \
            dict(temperature=0.0)
        t0, times = time.perf_counter(), []
        for _ in self.llm.create_completion(ids, max_tokens=max_new or cfg.max_new_tokens, seed=seed, stream=True, **sampling):
            times.append(time.perf_counter())
        return timing_row(t0, times)

    def close(self) -> None:
        self.llm = None


def open_peer(name: str, cfg):
    if name == "optimum":
        raise MtadError("the optimum peer needs its own environment (optimum-onnx pins transformers < 4.58); "
                        "see docs/results.md")
    if name not in PEERS:
        raise MtadError(f"unknown peer '{name}' (choose from {', '.join(PEERS)})")
    if name in ("hf", "hf-ar"):
        from mtad_trt.extras import TORCH, require

        require(f"the {name} peer", "torch", TORCH)
        return HfPeer(cfg, assisted=name == "hf")
    if name == "ort-genai":
        return OrtGenAiPeer(cfg)
    return LlamaCppPeer(cfg)
