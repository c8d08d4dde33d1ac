"""Save a screenshot of the running demo with headless Chromium: ``python -m blindnet.demo.screenshot``.

Launches the app on a free loopback port (the first example is pre-segmented at build time, so the page shows real
output without any clicking), points ``chromium --headless --screenshot`` at it, and writes a PNG. Without
``--checkpoint`` a tiny randomly initialised MobileNetV2 model is used, which shows the layout but not meaningful
labels; pass a trained checkpoint for a screenshot worth publishing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from blindnet.serve.client import free_port

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "demo_screenshot.png"


def find_browser() -> str:
    """Path of a Chromium-family browser; raises FileNotFoundError naming what to install."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no headless browser found (tried {', '.join(BROWSERS)}); e.g. `apt-get install chromium`")


def capture(url: str, out: str | Path, *, size: tuple[int, int] = (1400, 1250), wait_ms: int = 20000) -> Path:
    """Screenshot ``url`` into ``out`` (PNG) with headless Chromium; ``wait_ms`` of virtual time lets the page's
    JavaScript fetch the app config and render before the capture."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blindnet-chromium-") as profile:
        cmd = [
            find_browser(),
            "--headless=new",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def _tiny_predictors() -> dict:
    # Lazy CLI dispatch: PyTorch loads only when the screenshot is taken, not for --help.
    import torch

    from blindnet.backends.torch_backend import TorchBackend
    from blindnet.inference import Predictor
    from blindnet.models import ModelConfig, build_model

    torch.manual_seed(0)
    return {
        "untrained-mobilenetv2 (random weights)": Predictor(
            TorchBackend(build_model(ModelConfig(backbone="mobilenetv2")))
        )
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blindnet.demo.screenshot", description=__doc__)
    p.add_argument("--checkpoint", action="append", metavar="[NAME=]PATH", help="model(s) to show (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")
    p.add_argument("--tab", choices=["image", "video", "robustness"], default="image", help="tab to show")
    p.add_argument("--size", type=int, nargs=2, default=(1400, 1250), metavar=("W", "H"), help="window size")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Lazy CLI dispatch: Gradio reads GRADIO_ANALYTICS_ENABLED when it is first imported, so only after setting it.
    from blindnet.demo.__main__ import model_specs
    from blindnet.demo.app import build_demo, launch
    from blindnet.inference import Predictor

    if args.checkpoint:
        predictors = {name: Predictor.from_checkpoint(path) for name, path in model_specs(args.checkpoint, None)}
    else:
        predictors = _tiny_predictors()
    demo = build_demo(predictors, selected_tab=args.tab)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        path = capture(f"http://127.0.0.1:{port}/", args.out, size=tuple(args.size))
    finally:
        demo.close()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
