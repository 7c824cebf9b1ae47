"""Packaging for the machines that deploy (issue 19, part 5).

`pip install mtad-trt` is the ONNX Runtime runtime: `generate` and `serve` on `--backend ort` run in
a process where importing torch or transformers fails (an import hook in a `sitecustomize.py` on
PYTHONPATH), and where both are installed neither gets imported. The engine's tokenizer, read
without transformers, encodes, decodes and renders chat templates as transformers does. What needs
an extra says which, in one line. The wheel installs export/ and cli.py as mtad_trt.export and
mtad_trt.cli.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from servers import stopped_cleanly, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "transformers")

SITECUSTOMIZE = f'''
import sys

BLOCKED = {BLOCKED!r}


class BlockOptional:
    """A meta-path finder that makes these packages uninstallable-looking: importing them fails."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by tests/test_packaging.py)", name=name)
        return None


sys.meta_path.insert(0, BlockOptional())
'''


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a process in which `import torch` / `import transformers` fail."""
    hook = tmp_path_factory.mktemp("no-torch")
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_the_hook_blocks_torch_and_transformers(no_torch_env):
    for mod in BLOCKED:
        res = run(["-c", f"import {mod}"], no_torch_env)
        assert res.returncode != 0 and "blocked by tests/test_packaging.py" in res.stderr, res.stderr


def test_generate_runs_without_torch(no_torch_env, pair_engine, pair_pipeline):
    for chat in (False, True):
        args = ["-m", "mtad_trt.cli", "generate", str(pair_engine), "--backend", "ort", "--decoder", "mtad",
                "--max-new-tokens", "12", "--seed", "0", "--prompt", "def fib(n):", "--json", *(["--chat"] if chat else [])]
        res = run(args, no_torch_env)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["backend"] == "ort-cpu"
        # the same tokens as in this process, where torch and transformers are importable
        want = pair_pipeline.generate("def fib(n):", chat=chat, decoder="mtad", max_new_tokens=12, seed=0)
        assert out["token_ids"] == want.token_ids and out["text"] == want.text
    # streaming text and `--backend auto`, which must not need torch to pick ONNX Runtime on a CPU
    res = run(["-m", "mtad_trt.cli", "generate", str(pair_engine), "--max-new-tokens", "4", "--prompt", "hi"],
              no_torch_env)
    assert res.returncode == 0 and "[ort-cpu " in res.stderr, res.stderr


IMPORTS_AFTER_GENERATE = """
import sys
from mtad_trt import Pipeline

with Pipeline.load(sys.argv[1], backend=sys.argv[2]) as pipe:
    pipe.generate("def fib(n):", decoder="mtad", max_new_tokens=8, seed=0)
    pipe.generate("hello", chat=True, decoder="ar", max_new_tokens=4, seed=0)
    pipe.score(pipe.encode("hello"), pipe.encode(" world"))
print({m: m in sys.modules for m in ("torch", "transformers")})
"""


@pytest.mark.parametrize("backend", ["ort", "auto"])
def test_pipeline_imports_neither_torch_nor_transformers(pair_engine, backend):
    """Where both are installed (this environment), the ONNX Runtime path still imports neither."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    res = run(["-c", IMPORTS_AFTER_GENERATE, str(pair_engine), backend], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str({"torch": False, "transformers": False})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_runs_without_torch(no_torch_env, pair_engine, tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:  # a file, not a pipe: a chatty server never blocks on it
        proc = subprocess.Popen([sys.executable, "-m", "mtad_trt.cli", "serve", str(pair_engine), "--backend", "ort",
                                 "--port", str(port)], env=no_torch_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60) as c:
            wait_healthy(c, proc, log)
            r = c.post("/v1/completions", json={"model": pair_engine.name, "prompt": "def fib(n):", "max_tokens": 8,
                                                "seed": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
            r = c.post("/v1/chat/completions", json={"model": pair_engine.name, "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        stopped_cleanly(proc, log, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args,line", [
    (["generate", "{engine}", "--backend", "torch", "--prompt", "x"],
     "error: --backend torch needs torch, transformers, not installed here: pip install 'mtad-trt[torch]'"),
    (["generate", "{engine}", "--backend", "trt", "--prompt", "x"],
     "error: --backend trt needs torch, not installed here: pip install 'mtad-trt[torch]'"),
    (["generate", "{engine}", "--device", "cuda", "--prompt", "x"],
     "error: --device cuda needs torch, not installed here: pip install 'mtad-trt[torch]'"),
    (["export", "--target", "{engine}", "--out", "{tmp}/e"],
     "error: mtad-trt export needs torch, transformers, not installed here: pip install 'mtad-trt[export]'"),
    (["build", "{engine}"], "error: mtad-trt build needs torch, not installed here: pip install 'mtad-trt[torch]'"),
])
def test_what_needs_an_extra_says_which_in_one_line(no_torch_env, pair_engine, tmp_path, args, line):
    args = [a.format(engine=pair_engine, tmp=tmp_path) for a in args]
    res = run(["-m", "mtad_trt.cli", *args], no_torch_env)
    assert res.returncode == 1 and res.stderr.strip() == line, res.stderr
    assert not (tmp_path / "e").exists()


def test_missing_module_mid_command_names_its_extra(monkeypatch):
    from mtad_trt import extras

    monkeypatch.setattr(extras, "importable", lambda m: m not in ("torch", "gguf"))
    line = extras.missing_module_line
    assert line(ModuleNotFoundError("x", name="gguf.quants")) == "gguf is not installed: pip install 'mtad-trt[export]'"
    assert line(ModuleNotFoundError("x", name="torch")) == "torch is not installed: pip install 'mtad-trt[torch]'"
    assert line(ModuleNotFoundError("x", name="torch"), stage="export") == \
        "torch is not installed: pip install 'mtad-trt[export]'"
    assert line(ModuleNotFoundError("x", name="transformers.models")) is None  # installed: a real bug, raised
    assert line(ModuleNotFoundError("x", name="not_an_extra")) is None


def test_models_fetch_without_torch_is_one_line(no_torch_env, tmp_path):
    """A command that reaches a missing module mid-way (here: the GGUF -> HF conversion) says which
    extra, in one line (`cli.friendly`)."""
    code = ("import sys\n"
            "import mtad_trt.export.registry as registry\n"
            "from mtad_trt import cli\n"
            "def fetch(name, progress=None):\n"
            "    import transformers  # what the conversion imports, blocked here\n"
            "registry.fetch = fetch\n"
            "sys.argv = ['mtad-trt', 'models', 'fetch', 'smollm2-135m']\n"
            "cli.main()\n")
    res = run(["-c", code], no_torch_env)
    assert res.returncode == 1 and res.stderr.strip() == \
        "error: transformers is not installed: pip install 'mtad-trt[export]'", res.stderr


# -- the tokenizer, without transformers ----------------------------------------------------------
TEXTS = ["def fib(n):\n    return n", "Hello world!", "  two  spaces\tand\ttabs\n\n", "", "ünïcödé ✓ 数字",
         "<|im_start|>user\nhi<|im_end|>", "x<|endoftext|>y", "The quick brown fox. It's done, isn't it ?"]
# A template that uses what Hub templates use: loop controls, namespace, tojson, raise_exception,
# the special-token variables, whitespace control; rendered by both and compared.
RICH_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{{ bos_token or '' }}"
    "{%- for m in messages %}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{%- if m['role'] == 'system' and loop.index0 > 0 %}{% continue %}{% endif %}"
    "{%- set ns.n = ns.n + 1 %}\n"
    "  <|im_start|>{{ m['role'] }} {{ ns.n }} {{ {'k': m['content']} | tojson }}\n"
    "{{ m['content'] | trim }}<|im_end|>\n"
    "{%- endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{{ eos_token if tools is none and documents is none else '' }}"
)
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Write fib  "},
     {"role": "assistant", "content": "def fib(n): …"}, {"role": "user", "content": "ünïcödé <|im_end|>"}],
]


def _both(folder: Path):
    from transformers import AutoTokenizer

    from mtad_trt.folder.tokenizer import Tokenizer

    return AutoTokenizer.from_pretrained(str(folder)), Tokenizer(folder)


@pytest.mark.parametrize("template", ["engine", "rich"])
def test_tokenizer_matches_transformers(pair_engine, tmp_path, template):
    folder = pair_engine / "tokenizer"
    if template == "rich":
        folder = Path(shutil.copytree(folder, tmp_path / "tokenizer"))
        (folder / "chat_template.jinja").write_text(RICH_TEMPLATE)
    hf, ours = _both(folder)
    assert ours.eos_token_id == hf.eos_token_id and ours.pad_token_id == hf.pad_token_id
    assert ours.get_vocab() == hf.get_vocab() and len(ours) == len(hf)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
    ids = hf.encode("".join(TEXTS))
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        for n in range(1, len(ids), 7):  # prefixes: what the streaming detokenizer decodes
            assert ours.decode(ids[:n], skip_special_tokens=skip) == hf.decode(ids[:n], skip_special_tokens=skip)
    for chat in CHATS:
        for gen in (True, False):
            want = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == want
            want_ids = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "input_ids") else want_ids
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == list(want_ids)
    if template == "rich":
        bad = [{"role": "tool", "content": "x"}]
        with pytest.raises(Exception, match="bad role"):
            hf.apply_chat_template(bad, tokenize=False)
        with pytest.raises(Exception, match="bad role"):
            ours.apply_chat_template(bad, tokenize=False)


def test_template_sandbox_refuses_what_transformers_refuses(pair_engine, tmp_path):
    folder = Path(shutil.copytree(pair_engine / "tokenizer", tmp_path / "tokenizer"))
    (folder / "chat_template.jinja").write_text("{% set ns = namespace() %}{% set ns._x = 1 %}"
                                                "{{ messages.__class__ }}")
    hf, ours = _both(folder)
    for tok in (hf, ours):
        with pytest.raises(Exception):  # noqa: B017 - jinja's SecurityError in both
            tok.apply_chat_template(CHATS[0], tokenize=False)


# -- the installed layout -------------------------------------------------------------------------
def _package_folders() -> set[str]:
    found = set()
    for top, name in (("mtad_trt", "mtad_trt"), ("export", "mtad_trt.export")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _package_folders() | {"mtad_trt.cli"}
    assert cfg["package-dir"] == {"mtad_trt.export": "export", "mtad_trt.cli": "cli"}
    assert not (ROOT / "mtad_trt" / "export").exists() and not (ROOT / "mtad_trt" / "cli.py").exists()
    assert "torch" not in " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


@pytest.mark.slow
def test_wheel_installs_export_and_cli_inside_the_package(tmp_path):
    """A non-editable build: export/ -> mtad_trt/export/, cli.py -> mtad_trt/cli.py, nothing top-level."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "cli.py"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mtad_trt", "export"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("mtad_trt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"mtad_trt", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert "mtad_trt/cli.py" in names and "mtad_trt/export/__init__.py" in names
    for f in (ROOT / "export").glob("*.py"):
        assert f"mtad_trt/export/{f.name}" in names
    assert zipfile.ZipFile(wheel).read("mtad_trt/cli.py") == (ROOT / "cli.py").read_bytes()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not any(p in line for line in core for p in ("torch", "transformers", "onnx ", "onnxscript"))
    # the unpacked wheel imports as installed (ahead of this checkout's editable install)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import mtad_trt.cli, mtad_trt.export.registry; print(mtad_trt.cli.__file__, mtad_trt.export.__file__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert all(p.startswith(str(site)) for p in res.stdout.split()), res.stdout
    res = subprocess.run([sys.executable, "-m", "mtad_trt.cli", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert res.returncode == 0 and "generate" in res.stdout, res.stderr
