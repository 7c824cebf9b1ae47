"""Shared fixtures: tiny random model folders and their exported engine folders (session-scoped:
exporting takes a few seconds per model, so each engine is built once per test run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from tiny import make_tokenizer, save_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run by default where CUDA is available and are skipped (with the reason) where not."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def qwen_target(tiny_dir, tokenizer) -> Path:
    return save_tiny(tiny_dir / "qwen-target", "qwen2", layers=2, seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def qwen_draft(tiny_dir, tokenizer) -> Path:
    return save_tiny(tiny_dir / "qwen-draft", "qwen2", layers=1, seed=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama_target(tiny_dir, tokenizer) -> Path:
    return save_tiny(tiny_dir / "llama-target", "llama", layers=2, seed=3, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def pair_engine(tiny_dir, qwen_draft, qwen_target) -> Path:
    """A draft/target engine folder of two different tiny Qwen2 models."""
    from mtad_trt.export.pair import export_pair

    out = tiny_dir / "engines" / "pair"
    export_pair(str(qwen_draft), str(qwen_target), out, max_seq_len=256)
    return out


@pytest.fixture(scope="session")
def self_engine(tiny_dir, qwen_target) -> Path:
    """Draft identical to target (spec property P4)."""
    from mtad_trt.export.pair import export_pair

    out = tiny_dir / "engines" / "self"
    export_pair(str(qwen_target), str(qwen_target), out, max_seq_len=256)
    return out


@pytest.fixture(scope="session")
def pair_pipeline(pair_engine):
    from mtad_trt import Pipeline

    with Pipeline.load(pair_engine, backend="ort") as pipe:
        yield pipe


@pytest.fixture(scope="session")
def self_pipeline(self_engine):
    from mtad_trt import Pipeline

    with Pipeline.load(self_engine, backend="ort") as pipe:
        yield pipe
