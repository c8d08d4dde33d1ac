"""The product as a user installs it: a wheel in a fresh environment outside the checkout, every job run from a
temporary folder; and a base-only environment where the jobs that need an extra say which one."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.markers import Marker
from PIL import Image

from blindnet.serve.client import free_port

# builds the wheel and fresh venvs (minutes): a release check, run by CI's second stage
pytestmark = pytest.mark.release

REPO = Path(__file__).resolve().parents[1]
JOBS = ("segment", "convert", "info", "train", "evaluate", "export", "serve", "demo", "bench")
# The base install's requirements, as the installed distribution declares them (pyproject.toml's dependencies).
BASE_REQUIREMENTS = tuple(r for r in md.requires("blindnet") or () if "extra ==" not in r)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout)
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the tree: setuptools writes a build/ folder next to the sources it builds.
    src = tmp_path_factory.mktemp("src") / "blindnet"
    anywhere = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "*.onnx"
    )

    def junk(folder: str, names: list[str]) -> set[str]:
        top = {"runs", "outputs", "data"} if Path(folder) == REPO else set()  # the user's own folders at the top
        return set(anywhere(folder, names)) | (top & set(names))

    shutil.copytree(REPO, src, ignore=junk)
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = dist.glob("blindnet-*.whl")
    return whl


def _site_dirs_of_this_interpreter() -> list[str]:
    """The folders this interpreter imports installed packages from, whatever it is: a venv (with or without system
    site-packages), a system or pyenv interpreter, a user install."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _new_venv(root: Path) -> Path:
    """A venv at ``root`` that sees the packages of the interpreter running the tests, not only of its base.

    ``python -m venv --system-site-packages`` run from inside a venv exposes the *base* interpreter's packages, not
    the venv's (where pip put the dependencies), so the environment is made plain and a ``.pth`` file adds this
    interpreter's site folders after its own. Entries of a ``.pth`` file are added to ``sys.path`` without running
    the ``.pth`` files inside them, so an editable install of the checkout stays invisible, and the venv's own
    site-packages (where the wheel goes) come first.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    py = root / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "test-host-site.pth").write_text("\n".join(_site_dirs_of_this_interpreter()) + "\n")
    return py


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from the test interpreter's site folders."""
    root = tmp_path_factory.mktemp("venv")
    py = _new_venv(root)
    # The venv has no pip of its own: the venv's python imports this interpreter's pip through the .pth file, and
    # pip installs into the running prefix, the venv (an install of blindnet outside it is left alone).
    out = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _source_modules() -> set[str]:
    """Every module of the source tree as the wheel must hold it (``train/x.py`` -> ``blindnet/train/x.py``)."""
    folders = {
        "blindnet": "blindnet",
        "train": "blindnet/train",
        "export": "blindnet/export",
        "serve": "blindnet/serve",
        "demo": "blindnet/demo",
        "benchmarks": "blindnet/benchmarks",
    }
    found = set()
    for folder, target in folders.items():
        for path in (REPO / folder).rglob("*.py"):
            found.add(f"{target}/{path.relative_to(REPO / folder).as_posix()}")
    return found


def test_wheel_installs_every_job_inside_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    missing = _source_modules() - set(names)
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {sorted(missing)}"
    tops = {n.split("/")[0] for n in names}
    assert tops == {"blindnet", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for needed in (
        "blindnet/train/configs/paper_r50_gtav.yaml",
        "blindnet/train/configs/synthetic_smoke.yaml",
        "blindnet/data/splits/gtav_split_val.txt",
        "blindnet/demo/examples/01_noon.png",
        "blindnet/weights/default.safetensors",
        "blindnet/weights/MODEL_CARD.md",
        "blindnet/serve/__main__.py",
        "blindnet/benchmarks/__main__.py",
    ):
        assert needed in names, needed


def test_every_job_runs_from_an_installed_wheel(venv: Path, tmp_path: Path) -> None:
    bindir = venv / "bin"
    where = _run(
        [str(bindir / "python"), "-c", "import blindnet.train, blindnet; print(blindnet.train.__file__)"], tmp_path
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout
    walk = _run(
        [
            str(bindir / "python"),
            "-c",
            "import blindnet, pkgutil\n"
            "for m in pkgutil.walk_packages(blindnet.__path__, 'blindnet.'):\n    print(m.name)",
        ],
        tmp_path,
    )
    assert "blindnet.backends.select" in walk.stdout.split(), walk.stdout + walk.stderr
    for job in JOBS:
        res = _run([str(bindir / "blindnet"), job, "--help"], tmp_path, timeout=60)
        assert res.returncode == 0 and "usage: blindnet" in res.stdout, (job, res.stderr[-2000:])
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    res = _run([str(bindir / "blindnet"), "segment", str(image), "--out", "seg"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shipped demo model" in res.stderr
    assert np.array(Image.open(tmp_path / "seg" / "street_labels.png")).shape == (40, 56)

    res = _run(
        [
            str(bindir / "blindnet"),
            "train",
            "--config",
            "synthetic_smoke",
            "--out",
            "run",
            "--set",
            "optim.max_iter=1",
            "--set",
            "runtime.progress=false",
            "--set",
            "eval.interval=0",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "config.yaml").is_file()

    res = _run(
        [
            str(bindir / "blindnet"),
            "export",
            "--checkpoint",
            "run/model.safetensors",
            "--format",
            "onnx",
            "--exporter",
            "torchscript",
            "--out",
            "exp",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = _run([str(bindir / "blindnet"), "info", "exp/model.onnx"], tmp_path)
    assert info.returncode == 0, info.stderr[-2000:]
    described = json.loads(info.stdout)
    assert described["kind"] == "onnx" and described["parity_check"]["passed"] is True
    _serve_one_request(bindir, tmp_path, image)


def _serve_one_request(bindir: Path, cwd: Path, image: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(bindir / "blindnet"), "serve", "--port", str(port), "--log-level", "warning"],
        cwd=cwd,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                time.sleep(0.5)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/segment", data=image.read_bytes(), headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
            body = r.read()
        assert body
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def _closure(requirements: tuple[str, ...]) -> set[str]:
    """The installed distributions ``requirements`` pull in (markers evaluated here, extras ignored)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            if ";" in req and not _marker_holds(req.split(";", 1)[1]):
                continue
            todo.append(req)
    return seen


def _marker_holds(marker: str) -> bool:
    return Marker(marker).evaluate()


def _base_only_site(tmp: Path) -> Path:
    """A folder of links to the files of the base dependencies only, as a base install would have them."""
    site = tmp / "site"
    site.mkdir()
    for name in _closure(BASE_REQUIREMENTS):
        dist = md.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            src = Path(dist.locate_file(top))
            if top.endswith(".dist-info") or ".." in f.parts or not src.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(src)
    return site


def test_base_install_segments_and_every_other_job_names_its_extra(wheel: Path, tmp_path: Path) -> None:
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    purelib = Path(
        subprocess.run(
            [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (purelib / "base.pth").write_text(str(_base_only_site(tmp_path)) + "\n")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)
    py = str(root / "bin" / "python")
    probe = _run(
        [
            py,
            "-c",
            "import importlib.util as u; print([m for m in ('fastapi', 'gradio', 'onnx', "
            "'onnxruntime', 'tensorboard', 'matplotlib') if u.find_spec(m)])",
        ],
        tmp_path,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # really a base-only environment
    image = tmp_path / "tiny.png"
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(image)
    res = _run([py, "-m", "blindnet", "segment", str(image), "--out", "seg"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "seg" / "tiny_labels.png").is_file()
    hints = {
        "train": "blindnet[train]",
        "export": "blindnet[export,cpu]",
        "serve": "blindnet[serve]",
        "demo": "blindnet[demo]",
        "bench": "blindnet[bench,cpu]",
    }
    args = {
        "train": ["--config", "synthetic_smoke"],
        "export": ["--out", "x"],
        "serve": [],
        "demo": [],
        "bench": ["--quick"],
    }
    for job, hint in hints.items():
        res = _run([py, "-m", "blindnet", job, *args[job]], tmp_path, timeout=120)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode != 0 and len(lines) == 1 and hint in lines[0], (job, res.stderr[-2000:])
