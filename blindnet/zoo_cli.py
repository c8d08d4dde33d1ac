"""``blindnet models``: every model name with its source, recipe, data, reported scores, size, terms and cache state.

    blindnet models                         # the list
    blindnet models --json                  # the same, machine-readable
    blindnet models --fetch blindnet-r50-gtav   # download, convert and check now (e.g. before going offline)
    blindnet models --remove blindnet-r50-gtav  # drop a converted model from the cache

This module imports only the standard library at the top, so ``blindnet models --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from blindnet.cliparse import JobParser

_FIELDS = (("recipe", "recipe"), ("data", "data"), ("scores", "scores"), ("size", "size"), ("terms", "terms"))


def build_parser(prog: str = "blindnet models") -> argparse.ArgumentParser:
    """The ``blindnet models`` command line."""
    p = JobParser(
        prog=prog,
        description="List the models that --checkpoint NAME (and Predictor.from_checkpoint(NAME)) accepts.",
        epilog="Cache: $BLINDNET_CACHE/models (default ~/.cache/blindnet/models); a download URL can be replaced "
        "with BLINDNET_MODEL_URL_<NAME> (e.g. BLINDNET_MODEL_URL_BLINDNET_R50_GTAV=https://mirror/file.pth).",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--fetch", metavar="NAME", help="download (and convert and check) NAME now")
    p.add_argument("--remove", metavar="NAME", help="delete a converted model from the cache")
    return p


def format_entry(info: dict) -> str:
    """The text block ``blindnet models`` prints for one :func:`blindnet.zoo.describe` result."""
    state = "cached" if info["cached"] else "not cached: downloaded on first use"
    if info["kind"] == "shipped":
        state = "inside the package (the default)"
    lines = [f"{info['name']}  [{info['kind']}; {state}]"]
    lines += [f"  {label + ':':<8} {info[key]}" for key, label in _FIELDS]
    lines.append(f"  {'source:':<8} {info['source']}")
    if info.get("url"):
        lines.append(f"  {'url:':<8} {info['url']}")
    if info["cached"] or info["kind"] != "converted":
        lines.append(f"  {'file:':<8} {info['file']}")
    if info.get("sha256"):
        lines.append(f"  {'sha256:':<8} {info['sha256']} (of the downloaded file)")
    if info.get("register"):
        lines.append(f"  {'offline:':<8} download the url by hand, then: {info['register']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "blindnet models") -> int:
    """List, fetch or remove models; exit 0, or 2 with one line on error (unknown name, offline, refused file)."""
    args = build_parser(prog).parse_args(argv)
    # Lazy CLI dispatch: the zoo imports PyTorch, which `blindnet models --help` must not wait for.
    from blindnet import zoo

    try:
        if args.fetch:
            path = zoo.checkpoint_path(args.fetch) if zoo.entry(args.fetch).kind != "backbone" else None
            path = path or zoo.fetch(args.fetch)
            print(f"{args.fetch}: {path}")
            return 0
        if args.remove:
            removed = zoo.remove(args.remove)
            print(f"{args.remove}: {'removed from the cache' if removed else 'was not in the cache'}")
            return 0
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # ZooError is a RuntimeError
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    infos = [zoo.describe(name) for name in zoo.MODELS]
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n\n".join(format_entry(i) for i in infos))
        print(f"\ncache: {zoo.models_dir()}  (use a name with --checkpoint NAME, or Predictor.from_checkpoint(NAME))")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
