"""The engine folder's `manifest.json`: what each graph is, where it came from, how it was checked.

An engine folder is self-describing (docs/graph-contract.md §1): a runtime needs nothing but the folder.
This module is the single reader/writer of the manifest so that every consumer (backends,
pipeline, build, bench) sees the same validated view.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtad_trt.contract import ModelSpec
from mtad_trt.errors import EngineFolderError

FORMAT_VERSION = 1
ROLES = ("draft", "target")


@dataclass
class RoleEntry:
    """One model (draft or target) in the engine folder."""

    spec: ModelSpec
    onnx: str  # path relative to the engine folder
    onnx_sha256: str = ""
    source: dict[str, Any] = field(default_factory=dict)  # path, sha256, kind (hf|gguf|default)
    parity: dict[str, Any] = field(default_factory=dict)  # max_abs_diff per case, tolerance, passed
    quantization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    plans: list[dict[str, Any]] = field(default_factory=list)  # TensorRT plans, one per build
    export: dict[str, Any] = field(default_factory=dict)  # data sha256 and bytes, per-stage time and peak RSS


@dataclass
class Manifest:
    roles: dict[str, RoleEntry]
    mtad_trt_version: str = ""
    format_version: int = FORMAT_VERSION
    tokenizer: str = "tokenizer"
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    created: str = ""
    export_settings: dict[str, Any] = field(default_factory=dict)

    # -- IO -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, folder: Path) -> None:
        (Path(folder) / "manifest.json").write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        folder = Path(folder)
        path = folder / "manifest.json"
        if not folder.exists():
            raise EngineFolderError(f"engine folder {folder} does not exist (create it with `mtad-trt export`)")
        if not path.is_file():
            raise EngineFolderError(f"{folder} is not an engine folder: no manifest.json (create one with `mtad-trt export`)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineFolderError(f"{path} is not valid JSON: {e}") from None
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineFolderError(
                f"{path} has format version {version}, this mtad-trt reads {FORMAT_VERSION}: re-export the engine"
            )
        try:
            roles = {
                name: RoleEntry(spec=ModelSpec(**entry.pop("spec")), **entry)
                for name, entry in raw.pop("roles").items()
            }
            return cls(roles=roles, **raw)
        except (TypeError, KeyError) as e:
            raise EngineFolderError(f"{path} is malformed ({e}): re-export the engine") from None

    def role(self, name: str) -> RoleEntry:
        if name not in self.roles:
            have = ", ".join(sorted(self.roles)) or "none"
            raise EngineFolderError(f"engine folder has no '{name}' model (it has: {have})")
        return self.roles[name]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 so multi-GB weights never sit in memory at once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
