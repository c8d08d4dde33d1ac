"""Which optional dependencies (pip extras) each job needs, and the one-line hint when they are missing.

The base install runs ``segment``, ``convert`` and ``info`` with PyTorch; every other job names its extra here. The
check looks modules up without importing them, so it costs nothing when they are present.
"""

from __future__ import annotations

import importlib.util

# what -> (the extra(s) to install, the modules that must be importable). A plain dict: one line per job.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", ("tensorboard", "matplotlib")),
    "evaluate": ("train", ("matplotlib",)),
    "export": ("export,cpu", ("onnx", "onnxscript", "onnxruntime")),
    "serve": ("serve", ("fastapi", "uvicorn", "multipart", "prometheus_client")),
    "demo": ("demo", ("gradio", "matplotlib")),
    "bench": ("bench,cpu", ("onnx", "onnxscript", "onnxruntime", "matplotlib")),
    "onnx": ("cpu", ("onnx", "onnxruntime")),
    "ray": ("ray", ("ray", "fastapi", "uvicorn")),
}


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The names in ``modules`` that cannot be imported here."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module stubbed out as None
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(job: str, what: str | None = None) -> None:
    """Exit with one line naming the extra to install when ``what`` (default: ``job``)'s modules are missing."""
    extra, modules = EXTRAS[what or job]
    missing = missing_modules(modules)
    if missing:
        gpu = " (on an NVIDIA GPU machine use 'gpu' instead of 'cpu')" if "cpu" in extra.split(",") else ""
        raise SystemExit(
            f"blindnet {job}: needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'blindnet[{extra}]'{gpu}"
        )
