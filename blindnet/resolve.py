"""Which model file a job uses: the path it was given, or the model shipped inside the package.

The shipped model is small and trained on procedural street scenes only, so whenever it is the model in use, the
user is told so once, with the two ways to get a model for real footage.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "default.safetensors"
SHIPPED_MODEL_NOTICE = (
    "using the shipped demo model (ShuffleNetV2, trained on procedural street scenes only); for real footage convert "
    "official BlindNet weights (`blindnet convert`) or train one (`blindnet train`), then pass --checkpoint"
)

log = logging.getLogger("blindnet")


def default_checkpoint() -> Path:
    """Path of the checkpoint shipped inside the package (used whenever no ``--checkpoint`` is given)."""
    if not DEFAULT_CHECKPOINT.exists():
        raise FileNotFoundError(
            f"the default checkpoint {DEFAULT_CHECKPOINT} is missing from this installation; "
            "pass --checkpoint PATH or reinstall blindnet"
        )
    return DEFAULT_CHECKPOINT


@functools.cache
def _notice_shipped_model() -> None:
    # Once per process: a server or a demo resolves the model many times.
    log.warning(SHIPPED_MODEL_NOTICE)


def resolve_checkpoint(path: str | Path | None) -> Path:
    """``path`` itself (which must exist), or the shipped default when None (announced once per process)."""
    if path is None:
        _notice_shipped_model()
        return default_checkpoint()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model file")
    return p


def is_shipped_model(path: str | Path | None) -> bool:
    """Whether ``path`` (None meaning the default) is the model shipped inside the package."""
    return path is None or Path(path).resolve() == DEFAULT_CHECKPOINT
