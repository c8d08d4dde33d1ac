"""Type-check the package as it installs: ``python tools/typecheck.py [extra mypy args]``.

The job folders sit at the top of the repository (``train/``, ``serve/``, ...) but install inside ``blindnet``
(``train/`` is ``blindnet.train``: ``[tool.setuptools.package-dir]`` in pyproject.toml), so mypy cannot check the
checkout as it lies. This script builds that installed layout in a temporary folder out of symlinks (``blindnet/``
holds a link to every entry of the repository's ``blindnet/`` plus ``train -> <repo>/train`` and so on) and runs
``python -m mypy -p blindnet`` there with the settings of pyproject.toml's ``[tool.mypy]`` and a cache that persists
in ``<repo>/.mypy_cache``, so a second run only re-reads what changed. The exit status is mypy's.

``tests/test_style.py`` and the pre-commit hook both call :func:`run_mypy`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """Sub-package name -> source folder, for every mapped job folder (``{"blindnet.train": <repo>/train, ...}``).

    Read from ``[tool.setuptools.package-dir]``; the root package (``blindnet`` -> ``blindnet``) is left out.
    """
    with open(repo / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: repo / folder for name, folder in mapping.items() if name != folder}


def build_layout(dest: Path, repo: Path = REPO) -> Path:
    """Write the installed ``blindnet`` package under ``dest`` as symlinks into ``repo``; returns ``dest/blindnet``.

    Raises ValueError when a mapped package is not a direct child of ``blindnet`` or collides with an entry of the
    repository's ``blindnet/`` folder.
    """
    root = dest / "blindnet"
    root.mkdir(parents=True)
    for entry in sorted((repo / "blindnet").iterdir()):
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    for name, folder in package_dirs(repo).items():
        parent, _, leaf = name.rpartition(".")
        if parent != "blindnet":
            raise ValueError(f"package-dir maps {name!r}: only direct children of 'blindnet' are supported")
        link = root / leaf
        if link.exists() or link.is_symlink():
            raise ValueError(f"package-dir maps {name!r} onto {folder}, but blindnet/{leaf} exists too")
        link.symlink_to(folder, target_is_directory=True)
    return root


def run_mypy(*args: str, repo: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mypy -p blindnet`` over the installed layout; stdout and stderr are captured as text.

    The configuration is ``repo/pyproject.toml`` and the cache ``repo/.mypy_cache`` whatever the working folder.
    """
    with tempfile.TemporaryDirectory(prefix="blindnet-typecheck-") as tmp:
        build_layout(Path(tmp), repo)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(repo / "pyproject.toml"),
            "--cache-dir",
            str(repo / ".mypy_cache"),
            "-p",
            "blindnet",
            *args,
        ]
        # MYPYPATH would put a second copy of the sources on the search path; the layout folder is the only one.
        env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
        return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    out = run_mypy(*(sys.argv[1:] if argv is None else argv))
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
