"""The argument parser every job's command line uses: exact flags only, typos named, defaults shown.

Plain :class:`argparse.ArgumentParser` accepts any unambiguous prefix of a flag (``--ou`` for ``--out``), so a typo
that happens to be a prefix is silently taken, and a mistyped required flag (``--ouput``) is reported as the required
one missing. :class:`JobParser` turns abbreviations off and reports an unknown ``--flag`` first, with the closest
known flag as a suggestion. Its help formatter appends each option's default where the help text does not state it.

Standard library only: the CLIs import this before any job module, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import sys
from collections.abc import Sequence
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs kept as written; ``(default: X)`` added where an option's help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class JobParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``allow_abbrev=False``, :class:`HelpFormatter`, and unknown ``--flags``
    reported before anything else (``unrecognized argument --ouput; did you mean --out?``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        self.check_flags(argv)
        return super().parse_known_args(argv, namespace)

    def check_flags(self, argv: Sequence[str]) -> None:
        """Exit with status 2 and one line naming the first ``--flag`` in ``argv`` this parser does not know."""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        for token in argv:
            if token == "--":
                return
            if not token.startswith("--") or len(token) == 2:
                continue
            flag = token.split("=", 1)[0]
            if flag in self._option_string_actions:
                continue
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            self.error(f"unrecognized argument {flag}" + (f"; did you mean {close[0]}?" if close else ""))


def cuda_device_count() -> int:
    """CUDA devices the driver reports (honouring ``CUDA_VISIBLE_DEVICES``), asked through ``libcuda`` directly.

    Milliseconds instead of the seconds importing PyTorch takes, so that ``--device cuda`` on a machine without a GPU
    fails at once. 0 when there is no driver. A PyTorch built without CUDA can still refuse later.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1" if sys.platform.startswith("linux") else "nvcuda.dll")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


__all__ = ["HelpFormatter", "JobParser", "cuda_device_count"]
