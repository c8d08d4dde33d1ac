"""Which model file a job runs: the path it was given or the model shipped inside the package, and the cache of
files derived from a checkpoint (its ONNX export, INT8 Q/DQ export and TensorRT engines), each made once.

The shipped model is small and trained on procedural street scenes only, so whenever it is the model in use, the
user is told so once, in one line with its card and the published model's name (CLI flag and Python call). A model
name (``blindnet-r50-gtav``, see :mod:`blindnet.zoo`) resolves to its cached file, fetched on first use.

Cache entries are keyed by the checkpoint's content (not its name) and the export settings, are written atomically,
and are parity-checked like every export; an entry that failed its check is never used. The SHA-256 of an entry that
passed is recorded next to it and compared on every use: a changed, swapped or truncated entry is made again (one
line says so).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from blindnet.backends.tensorrt_backend import current_platform, import_tensorrt
from blindnet.checkpoint import CheckpointError, load_model, read_metadata
from blindnet.export.int8 import CALIBRATION_SCENES, HELD_OUT_SCENES, INT8_RECIPE, SCENE_SIZE, check_int8, quantize_int8
from blindnet.export.onnx import ExportError, export_onnx, verify_onnx
from blindnet.export.tensorrt import build_engine
from blindnet.io import atomic_write, file_sha256
from blindnet.zoo import MODELS, PUBLISHED_NAME, SHIPPED_CHECKPOINT, SHIPPED_NAME, cache_root, checkpoint_path

WEIGHTS_DIR = SHIPPED_CHECKPOINT.parent
DEFAULT_CHECKPOINT = SHIPPED_CHECKPOINT
MODEL_CARD = WEIGHTS_DIR / "MODEL_CARD.md"
#: One line: what runs, where its card is, and how to get the published model from the CLI and from Python.
SHIPPED_MODEL_NOTICE = (
    "using the shipped demo model ({what}, synthetic scenes only; card: {card}). Real photos: "
    f"--checkpoint {PUBLISHED_NAME}, or Predictor.from_checkpoint({PUBLISHED_NAME!r}) in Python"
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


def shipped_model_notice(path: Path = DEFAULT_CHECKPOINT) -> str:
    """The line that announces the shipped model: its backbone and recipe (from the file's header), and its card.

    The recipe is named because the default is whichever model scored best, which need not be a BlindNet one.
    """
    try:
        meta = read_metadata(path)
        backbone = json.loads(meta["model_config"])["backbone"]
        what = f"recipe `{meta['config_name']}`" if "config_name" in meta else backbone
    except (OSError, ValueError, KeyError, CheckpointError):
        what = "ShuffleNetV2"
    return SHIPPED_MODEL_NOTICE.format(what=what, card=path.parent / MODEL_CARD.name)


@functools.cache
def _notice_shipped_model() -> None:
    # Once per process: a server or a demo resolves the model many times.
    log.warning(shipped_model_notice())


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The file a ``--checkpoint`` value means.

    None or the shipped model's name: the shipped default (announced once per process). A model name
    (:data:`blindnet.zoo.MODELS`): its cached file, downloaded, converted and checked on first use. Anything else:
    the path itself, which must exist (its loader reports a corrupt file); a missing bare word is reported with the
    model names, since it was most likely meant as one.

    Raises:
        CheckpointError: a missing file or an unknown bare name. blindnet.zoo.ZooError (a CheckpointError): a
            backbone-only entry, or a model that cannot be fetched.
    """
    if path is None or (str(path) == SHIPPED_NAME and not Path(str(path)).exists()):
        _notice_shipped_model()
        return default_checkpoint()
    resolved = checkpoint_path(path)
    if not resolved.exists():
        text = str(path)
        if "/" not in text and "\\" not in text and "." not in text:
            raise CheckpointError(
                f"{text!r} is neither a file nor a model name; model names: {', '.join(MODELS)} (`blindnet models`)"
            )
        # Here, not in whichever backend opens it first: every backend reports a missing file the same way.
        raise CheckpointError(f"checkpoint not found: {resolved}")
    return resolved


def is_shipped_model(path: str | Path | None) -> bool:
    """Whether ``path`` (None meaning the default) is the model shipped inside the package."""
    return path is None or str(path) == SHIPPED_NAME or Path(path).resolve() == DEFAULT_CHECKPOINT


# ---- the cache of exported files -------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$BLINDNET_CACHE`` or ``~/.cache/blindnet`` (the same root as the model cache, :func:`blindnet.zoo.cache_root`)."""
    return cache_root()


def checkpoint_digest(checkpoint: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of the file's bytes: the cache key of everything derived from it."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_onnx_path(checkpoint: str | Path, *, fp16: bool = False, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`cached_onnx_for_checkpoint` keeps the export of ``checkpoint`` (content hash + export settings)."""
    checkpoint = Path(checkpoint)
    key = (
        f"{checkpoint.stem}-{checkpoint_digest(checkpoint)}-{'fp16' if fp16 else 'fp32'}-u8nhwc-"
        f"torch{torch.__version__}"
    )
    return Path(cache_dir or default_cache_dir() / "onnx") / f"{key}.onnx"


def check_report_passed(artifact: str | Path) -> bool:
    """Whether ``<artifact>.check.json`` exists and records a passed parity check."""
    report = Path(artifact).with_name(Path(artifact).name + ".check.json")
    try:
        return bool(json.loads(report.read_text()).get("passed"))
    except (OSError, ValueError):
        return False


def _digest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".sha256")


def record_digest(artifact: Path) -> None:
    """Record the content hash of a cache entry that has just passed its check (``<artifact>.sha256``)."""
    text = f"{file_sha256(artifact)}  {artifact.name}\n"
    atomic_write(_digest_path(artifact), lambda tmp: Path(tmp).write_text(text))


def verified_entry(artifact: Path) -> bool | None:
    """Whether a cache entry still holds the bytes that passed its check: True (same hash), False (changed,
    swapped or truncated since: the entry is removed, with one line saying so), None (no hash recorded: an entry
    from before hashes were kept, or one never checked).

    Why: a cached export is used without a second look, so a truncated file (a full disk, a killed copy) or another
    model's file put in its place would otherwise run silently, or make every later run fall back to PyTorch.
    """
    try:
        recorded = _digest_path(artifact).read_text().split()[0]
    except (OSError, IndexError):
        return None
    if artifact.exists() and file_sha256(artifact) == recorded:
        return True
    log.warning(
        "cached %s is not the file that passed its check (changed or truncated since); making it again", artifact.name
    )
    for stale in (artifact, _digest_path(artifact), artifact.with_name(artifact.name + ".check.json")):
        stale.unlink(missing_ok=True)
    return False


def cached_onnx_for_checkpoint(
    checkpoint: str | Path,
    *,
    fp16: bool = False,
    cache_dir: str | Path | None = None,
    exporter: str = "auto",
    verify: bool = True,
) -> Path:
    """Export ``checkpoint`` to ONNX once; later calls with the same file content and options reuse the file.

    With ``verify`` (the default) the file is parity-checked against PyTorch like every export (the report is stored
    next to it as ``<file>.check.json``); a file that fails is deleted and :class:`ExportError` is raised, so a cache
    entry in use has always passed.
    """
    checkpoint = Path(checkpoint)
    target = cached_onnx_path(checkpoint, fp16=fp16, cache_dir=cache_dir)
    state = verified_entry(target) if target.exists() or _digest_path(target).exists() else None
    if target.exists() and (not verify or (state is True and check_report_passed(target))):
        return target
    model = load_model(checkpoint)  # raises CheckpointError with a clear message for missing/corrupt files
    if not target.exists():
        log.warning(
            "exporting %s to ONNX once and checking it against PyTorch (cached in %s)", checkpoint.name, target.parent
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        # Export to a temporary sibling and rename: a concurrent reader never sees half a file.
        atomic_write(
            target, lambda tmp: export_onnx(model, Path(tmp), normalize_input=True, fp16=fp16, exporter=exporter)
        )
    if verify:
        report = verify_onnx(target, model, verbose=False)
        if not report.passed:
            target.unlink(missing_ok=True)
            raise ExportError(f"cached export of {checkpoint} failed its parity check: {report.summary()}")
        record_digest(target)
    return target


def cached_int8_for_checkpoint(
    checkpoint: str | Path, *, cache_dir: str | Path | None = None, exporter: str = "auto"
) -> Path:
    """The INT8 Q/DQ export of ``checkpoint``, made once next to its cached float32 export and checked on first use.

    The check's result is stored next to the file; a miss of the thresholds is printed as a warning, not an error,
    since INT8 was asked for explicitly and the report says by how much it differs.
    """
    float_onnx = cached_onnx_for_checkpoint(checkpoint, cache_dir=cache_dir, exporter=exporter)
    target = float_onnx.with_name(float_onnx.name.replace("-fp32-", f"-int8{INT8_RECIPE}-"))
    state = verified_entry(target) if target.exists() or _digest_path(target).exists() else None
    if state is True and target.with_name(target.name + ".check.json").exists():
        return target
    log.warning("quantising %s to INT8 once, calibrated and checked on generated scenes", float_onnx.name)
    quantize_int8(float_onnx, target, calibration=CALIBRATION_SCENES, size=SCENE_SIZE)
    report = check_int8(target, float_onnx, scenes=HELD_OUT_SCENES, size=SCENE_SIZE)
    if not report["passed"]:
        log.warning(
            "%s: INT8 differs from float32 beyond the thresholds on held-out generated scenes (label agreement %.4f, "
            "mIoU change %+.2f points; the report is next to the file)",
            target.name,
            report["label_agreement"],
            report["miou_change"],
        )
    record_digest(target)
    return target


def cached_engine(path: str | Path, *, precision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A TensorRT engine for a checkpoint or an ``.onnx`` file, built once for this GPU and TensorRT version.

    A checkpoint goes through its cached ONNX export first (float16 unless ``precision="float32"``); the engine is
    named by that file, the GPU, the TensorRT version and the precision, so a different GPU never reuses it.
    """
    import_tensorrt()  # fail early, with the installation hint, before any export work
    path = Path(path)
    precision = precision or "float16"
    onnx_path = (
        path
        if path.suffix.lower() == ".onnx"
        else cached_onnx_for_checkpoint(path, fp16=precision == "float16", cache_dir=cache_dir)
    )
    plat = current_platform()
    tag = f"{plat['gpu_name'].replace(' ', '_')}-trt{plat['tensorrt_version']}-{precision}"
    engine = Path(cache_dir or default_cache_dir() / "tensorrt") / f"{onnx_path.stem}-{tag}.plan"
    state = verified_entry(engine) if engine.exists() or _digest_path(engine).exists() else None
    if not engine.exists():
        build_engine(onnx_path, engine, precision=precision, timing_cache=engine.parent / "timing.cache")
        record_digest(engine)
    elif state is None:  # built before hashes were kept: TensorRT refuses a corrupt plan when loading it
        record_digest(engine)
    return engine
