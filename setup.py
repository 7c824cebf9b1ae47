"""The one packaging step pyproject.toml cannot declare (setuptools reads everything else there).

`[tool.setuptools] package-dir` maps a package to a folder (`mtad_trt.export` = `export`). The CLI
is a single file at the top level, cli.py, installed as the module `mtad_trt.cli`: its entry
`"mtad_trt.cli" = "cli"` names a module file, not a folder, and setuptools' build_py maps only
folders. This build_py installs such an entry's `<target>.py` into the parent package. Editable
installs need nothing more: setuptools' editable finder maps `mtad_trt.cli` to `cli` and resolves
`cli.py` itself.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """build_py where a package-dir entry that points at `<name>.py` (no such folder) is a module."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.module_files = {}
        for name in self.packages or ():
            target = self.get_package_dir(name)
            if not os.path.isdir(target) and os.path.isfile(target + ".py"):
                self.module_files[name] = target + ".py"
        self.packages = [p for p in self.packages or () if p not in self.module_files]

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        for name, path in self.module_files.items():
            parent, _, module = name.rpartition(".")
            if parent == package:
                modules.append((package, module, path))
        return modules


setup(cmdclass={"build_py": BuildPy})
