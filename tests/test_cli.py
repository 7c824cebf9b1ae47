"""Bad input gets one line on stderr, a non-zero exit, no traceback, and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny import make_tokenizer, save_tiny


def cli(*args, stdin=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mtad_trt.cli", *args], capture_output=True, text=True, env=env, input=stdin, timeout=300)


def assert_clean_error(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), res.stderr
    for n in needles:
        assert n in err[-1], err[-1]


def test_missing_path(tmp_path):
    res = cli("export", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))
    assert_clean_error(res, "no such model")
    assert not (tmp_path / "e").exists()


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 100)
    res = cli("export", "--target", str(f), "--out", str(tmp_path / "e"))
    assert_clean_error(res, "neither a model folder nor a .gguf")
    g = tmp_path / "fake.gguf"
    g.write_bytes(b"nope")
    assert_clean_error(cli("export", "--target", str(g), "--out", str(tmp_path / "e")), "not a GGUF file")


def test_mismatched_tokenizers(tmp_path, qwen_target):
    other = save_tiny(tmp_path / "other", "qwen2", 1, 9, make_tokenizer(variant=1))
    res = cli("export", "--draft", str(other), "--target", str(qwen_target), "--out", str(tmp_path / "e"))
    assert_clean_error(res, "tokenizers differ")
    assert not (tmp_path / "e").exists()


def test_existing_output_needs_force(tmp_path, qwen_target):
    (tmp_path / "e").mkdir()
    res = cli("export", "--target", str(qwen_target), "--out", str(tmp_path / "e"))
    assert_clean_error(res, "already exists", "--force")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path, qwen_target):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert_clean_error(cli("export", "--target", str(qwen_target), "--out", str(ro / "e")), "cannot")


def test_unwritable_output_path_under_a_file(tmp_path, qwen_target):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(cli("export", "--target", str(qwen_target), "--out", str(blocker / "e")), "cannot")


def test_prompt_longer_than_capacity(pair_engine):
    long = "hello world " * 400
    res = cli("generate", "--engines", str(pair_engine), "--prompt", long, "--decoder", "ar")
    assert_clean_error(res, "capacity of 256")


def test_missing_engine_folder(tmp_path):
    assert_clean_error(cli("generate", "--engines", str(tmp_path / "none"), "--prompt", "x"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_error(cli("generate", "--engines", str(tmp_path / "empty"), "--prompt", "x"), "no manifest.json")


def test_trt_backend_without_gpu(pair_engine):
    res = cli("generate", "--engines", str(pair_engine), "--prompt", "x", "--backend", "trt")
    assert_clean_error(res, "GPU")


def test_bad_settings(pair_engine):
    assert_clean_error(cli("generate", "--engines", str(pair_engine), "--prompt", "x", "--threshold", "0"), "threshold")
    assert_clean_error(cli("generate", "--engines", str(pair_engine), "--prompt", "x", "--gamma", "0"), "gamma")


def test_generate_json(pair_engine, pair_pipeline):
    res = cli("generate", "--engines", str(pair_engine), "--prompt", "def fib(n):", "--decoder", "mmtad",
              "--max-new-tokens", "12", "--temperature", "0", "--gamma", "3", "--beam-width", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["backend"] == "ort-cpu"
    # greedy MMTAD is greedy target decoding (spec P1): the library's plain AR output, token for token
    ref = pair_pipeline.generate("def fib(n):", decoder="ar", temperature=0, max_new_tokens=12)
    assert out["token_ids"] == ref.token_ids and len(ref.token_ids) == 12
    st = out["stats"]
    assert (st["decoder"], st["gamma"], st["beam_width"], st["generated_tokens"]) == ("mmtad", 3, 2, 12)
    # the bookkeeping adds up (spec P10): one target call and γ draft calls per round, B·γ drafted
    # tokens per round, n+1 tokens out of each round (the last one may be cut at max_new_tokens)
    assert st["target_calls"] == st["iterations"] and st["draft_calls"] == 3 * st["iterations"]
    assert st["drafted_tokens"] == 6 * st["iterations"]
    assert 0 <= st["accepted_tokens"] + st["iterations"] - 12 <= 3
    assert st["tokens_per_target_call"] == pytest.approx(12 / st["target_calls"], rel=1e-12)
    assert st["acceptance_rate"] == pytest.approx(st["accepted_tokens"] / (3 * st["iterations"]), rel=1e-12)
    assert st["wall_s"] > 0


def test_a_failing_model_step_is_one_error_line(pair_engine):
    """An ONNX Runtime error inside a step (here: injected on the 3rd target call) ends the request
    with one `error:` line and a non-zero exit, not a traceback."""
    code = (
        "import sys; from mtad_trt.backends.ort import OrtRunner; real = OrtRunner.step; n = [0]\n"
        "def step(self, inputs, first_row=0):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3: raise RuntimeError('[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code')\n"
        "    return real(self, inputs, first_row)\n"
        "OrtRunner.step = step\n"
        "from mtad_trt.cli import main; sys.argv = ['mtad-trt', *sys.argv[1:]]; main()\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-c", code, "generate", str(pair_engine), "--decoder", "ar",
                          "--prompt", "hello", "--max-new-tokens", "10", "--backend", "ort"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert_clean_error(res, "target model's step failed", "RUNTIME_EXCEPTION")
