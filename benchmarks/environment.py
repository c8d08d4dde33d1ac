"""Where a benchmark ran: the device, CPU, driver, clocks and library versions that make a number reproducible."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return ""


def environment_info(device: str) -> dict[str, Any]:
    """Facts that make a number reproducible: device, driver, clocks, library versions, threads."""
    info: dict[str, Any] = {
        "device_type": device,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model_name(),
        "threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "cuda": torch.version.cuda or "",
        "cudnn": "",
        "driver": "",
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_name=torch.cuda.get_device_name(0),
            cudnn=str(torch.backends.cudnn.version() or ""),
            driver=_nvidia_smi("driver_version"),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            # Clocks and power limit as found (we never change them); a throttled card explains odd numbers.
            clocks=_nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"),
        )
    else:
        info["device_name"] = info["cpu"]
    return info


def device_slug(info: dict[str, Any]) -> str:
    """File-name-safe device id: ``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"\(r\)|\(tm\)", "", str(info.get("device_name", "")).lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{info['device_type']}-{name or 'unknown'}"
