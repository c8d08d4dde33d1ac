"""Deployment code never imports training code (losses, task): checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

# One fresh interpreter per module (about a minute in all): a release check, run by CI's second stage.
pytestmark = pytest.mark.release

# The deployable side of the package, and every module of the deployment folders (walked recursively), except the
# training-step benchmarks (train_step, and cpu_paths which also times the step), which measure training and so must
# import the task, and the Ray replica, which needs the optional 'ray' extra (its own tests cover it).
DEPLOY_MODULES = [
    "blindnet",
    "blindnet.inference",
    "blindnet.checkpoint",
    "blindnet.backends",
    "blindnet.cli",
    "blindnet.segment",
    "blindnet.info",
    "blindnet.resolve",
    "blindnet.export",
    "blindnet.serve",
    "blindnet.demo",
    "blindnet.benchmarks",
]
JOB_PACKAGES = ("backends", "export", "serve", "demo", "benchmarks")
SKIPPED = ("blindnet.benchmarks.train_step", "blindnet.benchmarks.cpu_paths", "blindnet.serve.ray_replica")


@pytest.mark.parametrize("module", DEPLOY_MODULES)
def test_deploy_code_does_not_import_training_code(module: str) -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({module!r})\n"
        f"walk = {module.count('.') == 1 and module.split('.')[1] in JOB_PACKAGES!r}\n"
        "for info in pkgutil.walk_packages(getattr(pkg, '__path__', []) if walk else [], pkg.__name__ + '.'):\n"
        f"    if info.name not in {SKIPPED!r}:\n"
        "        importlib.import_module(info.name)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('blindnet.task', 'blindnet.losses', 'blindnet.train')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} imports training code: {out.stdout.strip()}"
