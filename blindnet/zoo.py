"""Models by name: the published BlindNet weights, the shipped demo model, and the ImageNet backbones.

``--checkpoint NAME`` (every job) and ``Predictor.from_checkpoint(NAME)`` go through :func:`checkpoint_path`: a name in
:data:`MODELS` becomes a file in the cache, downloaded, converted and checked on first use; any other value is a path.
``blindnet models`` lists the entries (:func:`describe`) with their terms and whether they are cached.

First use of a converted entry (``blindnet-r50-gtav``): the file is downloaded once with a progress bar into a
temporary folder inside the cache, its SHA-256 is computed, it is converted (:func:`convert_official_checkpoint`: the
variant is checked, every shape must fit) and one forward pass must give finite logits of the right shape. Only then
is the deployable file moved into place, and a record (``<name>.json``: source, SHA-256 of the download, of the stored
file, the variant check, the terms) written last: a cache entry exists exactly when its record does, so an
interrupted, wrong or corrupt download leaves none. Offline, the error names the URL and the command that registers a
file fetched by hand (``blindnet convert FILE --name NAME``, :func:`register`).

Cache: ``$BLINDNET_CACHE/models`` (default ``~/.cache/blindnet/models``); the backbone weights go where torchvision
would fetch them (``torch.hub.get_dir()/checkpoints``), so a training run finds them there. The download URL of any
entry can be replaced with ``BLINDNET_MODEL_URL_<NAME>`` (upper case, ``-`` as ``_``), e.g. for a mirror inside a
network without Google Drive; the record keeps the URL used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import torch

from blindnet.checkpoint import CheckpointError, convert_official_checkpoint, load_model
from blindnet.io import atomic_write, file_sha256
from blindnet.modelnames import MODEL_NAMES, is_model_name

#: The original project's page: its README's Terms of Use and its LICENSE file.
ORIGINAL_REPOSITORY = "https://github.com/root0yang/BlindNet"
PUBLISHED_NAME = "blindnet-r50-gtav"
SHIPPED_NAME = "demo-synthetic"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default.safetensors"
URL_OVERRIDE_PREFIX = "BLINDNET_MODEL_URL_"
#: Seconds a download may wait for the server's next bytes before it fails (both the HTTP and the Drive route): a
#: stalled server must end in an error that says how to fetch the file by hand, not in a job that never returns.
DOWNLOAD_TIMEOUT_S = 60.0
_ORIGINAL_TERMS = (
    "the original README's Terms of Use say non-commercial use only, CC BY-NC-SA 4.0, while its LICENSE file is "
    f"BSD-3-Clause; the two disagree, so check with the authors before commercial use ({ORIGINAL_REPOSITORY})"
)
_TORCHVISION_TERMS = "torchvision's weights (BSD-3-Clause code; trained on ImageNet-1k, whose terms are non-commercial)"


class ZooError(CheckpointError):
    """A model name that cannot be served: unknown, offline, a refused download, or not a segmentation model."""


@dataclass(frozen=True)
class ModelEntry:
    """One named model.

    Attributes:
        name: what ``--checkpoint`` takes.
        kind: ``"converted"`` (an original-format file, converted on first use), ``"shipped"`` (inside the
            package) or ``"backbone"`` (ImageNet encoder weights for training, not a segmentation model).
        url: where the file is downloaded from (``BLINDNET_MODEL_URL_<NAME>`` replaces it).
        source: the page that publishes it.
        recipe, data, scores, size, terms: what ``blindnet models`` prints.
        backbone, output_stride, instance_norm: the network a converted file holds (the original stores no config).
        sha256: the download's known SHA-256, when published; None: recorded on first download, not checked.
    """

    name: str
    kind: str
    url: str
    source: str
    recipe: str
    data: str
    scores: str
    size: str
    terms: str
    backbone: str = "resnet50"
    output_stride: int = 16
    instance_norm: bool | None = True
    sha256: str | None = None


def _backbone(name: str, backbone: str, url: str, top1: float, size: str) -> ModelEntry:
    return ModelEntry(
        name=name,
        kind="backbone",
        url=url,
        source="https://pytorch.org/vision/stable/models.html",
        recipe=f"torchvision {backbone} IMAGENET1K_V1: the initialisation the paper presets start from",
        data="ImageNet-1k classification",
        scores=f"ImageNet-1k top-1 {top1} (torchvision)",
        size=size,
        terms=_TORCHVISION_TERMS,
        backbone=backbone,
        instance_norm=None,
    )


# name -> entry. A plain dict: one entry per name.
MODELS: dict[str, ModelEntry] = {
    PUBLISHED_NAME: ModelEntry(
        name=PUBLISHED_NAME,
        kind="converted",
        url="https://drive.google.com/uc?id=1Kkdl_2xjE9iooA1Is5VWcjeRcuzaJ8Pi",
        source=ORIGINAL_REPOSITORY,
        recipe="BlindNet (CVPR 2024), DeepLabV3+ ResNet-50 output stride 16 with 3 InstanceNorm layers, the authors' run",
        data="GTAV (synthetic game frames), 19 Cityscapes classes; never saw real photos",
        scores="mIoU on Cityscapes, BDD100K and Mapillary as reported in the paper (trained on GTAV); not re-measured here",
        size="download ~0.2-0.4 GB (a training snapshot); stored 161 MB (40.35 M parameters, float32)",
        terms=_ORIGINAL_TERMS,
    ),
    SHIPPED_NAME: ModelEntry(
        name=SHIPPED_NAME,
        kind="shipped",
        url="",
        source="blindnet/weights/MODEL_CARD.md (inside the package)",
        recipe="the default: ShuffleNetV2 DeepLabV3+ trained by `blindnet train` in minutes (see the model card)",
        data="procedural street scenes only (noon and sunset); meaningless on real photos",
        scores="held-out procedural scenes only (model card)",
        size="20 MB (float16)",
        terms="this package's licence (MIT)",
        backbone="shufflenetv2",
        instance_norm=None,
    ),
    "imagenet-resnet50": _backbone(
        "imagenet-resnet50", "resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth", 76.13, "98 MB"
    ),
    "imagenet-mobilenetv2": _backbone(
        "imagenet-mobilenetv2",
        "mobilenetv2",
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        71.878,
        "14 MB",
    ),
    "imagenet-shufflenetv2": _backbone(
        "imagenet-shufflenetv2",
        "shufflenetv2",
        "https://download.pytorch.org/models/shufflenetv2_x1-5666bf0f80.pth",
        69.362,
        "9 MB",
    ),
}


if tuple(MODELS) != MODEL_NAMES:  # the light list the CLIs check arguments with must name exactly these
    raise ImportError(f"blindnet.modelnames.MODEL_NAMES {MODEL_NAMES} differs from blindnet.zoo.MODELS {tuple(MODELS)}")


# ---- where things are --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$BLINDNET_CACHE`` or ``~/.cache/blindnet``: everything blindnet derives or downloads."""
    return Path(os.environ.get("BLINDNET_CACHE") or Path.home() / ".cache" / "blindnet").expanduser()


def models_dir() -> Path:
    """Where converted models are cached: ``<cache_root>/models``."""
    return cache_root() / "models"


def entry(name: str) -> ModelEntry:
    """The entry called ``name``; :class:`ZooError` naming the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ZooError(f"unknown model name {name!r}; known: {', '.join(MODELS)} (`blindnet models`)") from None


def source_url(name: str) -> str:
    """The entry's download URL, or the value of ``BLINDNET_MODEL_URL_<NAME>`` when set."""
    return os.environ.get(url_override_variable(name)) or entry(name).url


def url_override_variable(name: str) -> str:
    """The environment variable that replaces ``name``'s download URL."""
    return URL_OVERRIDE_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def cached_file(name: str) -> Path:
    """Where ``name``'s file is (or will be) kept."""
    e = entry(name)
    if e.kind == "shipped":
        return SHIPPED_CHECKPOINT
    if e.kind == "backbone":
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(e.url).path).name
    return models_dir() / f"{name}.safetensors"


def record_file(name: str) -> Path:
    """The record written last when ``name`` is stored (its presence marks a complete cache entry)."""
    return models_dir() / f"{name}.json"


def is_cached(name: str) -> bool:
    """Whether ``name`` can be used without a download."""
    e = entry(name)
    if e.kind == "converted":
        return record_file(name).exists() and cached_file(name).exists()
    return cached_file(name).exists()


def read_record(name: str) -> dict[str, Any] | None:
    """The stored record of a converted entry (source, SHA-256s, variant check, terms), or None."""
    try:
        return json.loads(record_file(name).read_text())
    except (OSError, ValueError):
        return None


# ---- names wherever a checkpoint is accepted ---------------------------------------------------------------------


def checkpoint_path(ref: str | Path, *, progress: bool = True) -> Path:
    """``ref`` as a checkpoint file: a model name becomes its cached file (fetched on first use), a path stays.

    Raises:
        ZooError: a backbone name (not a segmentation model), or a name that cannot be fetched (see :func:`fetch`).
    """
    if not is_model_name(ref):
        return Path(ref).expanduser()
    e = MODELS[str(ref)]
    if e.kind == "backbone":
        raise ZooError(
            f"{e.name} holds ImageNet {e.backbone} encoder weights for training (model.pretrained_backbone=true), "
            f"not a segmentation model; segmentation models: {', '.join(n for n, m in MODELS.items() if m.kind != 'backbone')}"
        )
    return fetch(e.name, progress=progress)


def fetch(name: str, *, progress: bool = True) -> Path:
    """The cached file of ``name``, downloading (and, for converted entries, converting and checking) it once.

    Prints what it does to stderr: the URL, the terms, a progress bar, the SHA-256 of what was stored.

    Raises:
        ZooError: offline or blocked (the message names the URL and the manual registration command), a wrong or
            corrupt download (the reason), or the 'zoo' extra missing for a Google Drive download.
    """
    e = entry(name)
    if is_cached(name):
        return cached_file(name)
    if e.kind == "shipped":
        raise ZooError(f"the shipped model {SHIPPED_CHECKPOINT} is missing from this installation; reinstall blindnet")
    url = source_url(name)
    print(f"{name}: downloading once from {url}", file=sys.stderr)
    print(f"{name}: terms: {e.terms}", file=sys.stderr)
    if e.kind == "backbone":
        return _fetch_backbone(e, url, progress)
    models_dir().mkdir(parents=True, exist_ok=True)
    remove_stale_downloads(name)
    # A private folder inside the cache (same file system: the final move is a rename); removed whatever happens.
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{name}-download-") as tmp:
        download = Path(tmp) / "download.pth"
        _download(url, download, name=name, progress=progress)
        return register(name, download, source=url)


#: A download folder this old is left from a killed process (a live download of a few hundred MB takes minutes).
STALE_DOWNLOAD_SECONDS = 24 * 3600


def remove_stale_downloads(name: str) -> int:
    """Delete the temporary folders of ``name`` that a killed process left (older than a day); returns how many.

    They are never cache entries (no record is written until the end), only space on the disk.
    """
    removed = 0
    for folder in models_dir().glob(f".{name}-*-*"):
        if folder.is_dir() and time.time() - folder.stat().st_mtime > STALE_DOWNLOAD_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def register(name: str, src: str | Path, *, source: str | None = None) -> Path:
    """Convert an original-format file into the cache under ``name`` (``blindnet convert FILE --name NAME``).

    Checks, in order: the SHA-256 (when the entry publishes one), that the file is a checkpoint at all, the variant
    and every shape (conversion), one forward pass; then stores the file and its record. Nothing is stored on failure.

    Returns:
        The stored deployable file.
    """
    e = entry(name)
    if e.kind != "converted":
        raise ZooError(f"{name} is a {e.kind} entry; only converted entries take a file ({PUBLISHED_NAME})")
    src = Path(src)
    if not src.is_file():
        raise ZooError(f"{src}: no such file")
    digest = file_sha256(src)
    origin = source or f"file {src.resolve()}"
    if e.sha256 and digest != e.sha256:
        raise ZooError(f"{origin}: SHA-256 {digest} is not the published {e.sha256}: a different or damaged file")
    models_dir().mkdir(parents=True, exist_ok=True)
    target = cached_file(name)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{name}-convert-") as tmp:
        staged = Path(tmp) / target.name
        try:
            convert_official_checkpoint(
                src,
                staged,
                backbone=e.backbone,
                instance_norm=e.instance_norm,
                output_stride=e.output_stride,
                extra_metadata={"model_name": name, "source": origin, "source_sha256": digest},
            )
            check = check_forward(staged)
        except CheckpointError as exc:
            raise ZooError(f"{origin} was refused as {name}: {exc}") from exc
        os.replace(staged, target)
    record = {
        "name": name,
        "source": origin,
        "sha256": digest,
        "bytes": src.stat().st_size,
        "stored": str(target),
        "stored_sha256": file_sha256(target),
        "check": check,
        "terms": e.terms,
        "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write(record_file(name), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    print(f"{name}: stored {target} (SHA-256 of the downloaded file: {digest})", file=sys.stderr)
    return target


def check_forward(path: str | Path, size: int = 64) -> str:
    """Load a stored file and run one ``1 x 3 x size x size`` forward pass: finite ``num_classes`` logits or an error.

    Returns:
        One line saying what was checked.
    """
    model = load_model(path)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(x)
    expected = (1, model.config.num_classes, size, size)
    finite = bool(torch.isfinite(logits).all())
    if tuple(logits.shape) != expected or not finite:
        raise CheckpointError(
            f"{path}: the forward check gave {tuple(logits.shape)} logits (finite: {finite}), expected finite {expected}"
        )
    cfg = model.config
    variant = "BlindNet (InstanceNorm)" if cfg.instance_norm else "baseline"
    return f"{cfg.backbone} OS{cfg.output_stride} {variant}, {cfg.num_classes} classes: forward pass finite"


# ---- downloading ---------------------------------------------------------------------------------------------------


def manual_hint(name: str, url: str) -> str:
    """The way around a failed download: fetch the file elsewhere, then register it here."""
    return (
        f"download {url} in a browser or on a machine with access, then register it here: "
        f"blindnet convert FILE --name {name}"
    )


def _download(url: str, dst: Path, *, name: str, progress: bool) -> None:
    """Fetch ``url`` into ``dst``: Google Drive through ``gdown`` (its confirmation page and cookies), else HTTP(S)."""
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        if host.endswith(("drive.google.com", "drive.usercontent.google.com")):
            _download_drive(url, dst, name=name, progress=progress)
        else:
            _download_http(url, dst, name=name, progress=progress)
    except ZooError:
        raise
    except (OSError, HTTPException, ValueError) as exc:  # URLError, timeouts and resets are OSErrors
        raise ZooError(f"cannot download {name} from {url} ({_reason(exc)}); {manual_hint(name, url)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _download_http(url: str, dst: Path, *, name: str, progress: bool) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "blindnet"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(dst, "wb") as fh:
        total = int(resp.headers.get("Content-Length") or 0) or None
        done = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress, file=sys.stderr) as bar:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    if total is not None and done != total:
        # http.client does not raise when a server closes early; the length it announced is the check.
        raise ZooError(
            f"the download of {name} from {url} stopped after {done} of {total} bytes; nothing was stored "
            f"(run again, or {manual_hint(name, url)})"
        )


def _download_drive(url: str, dst: Path, *, name: str, progress: bool) -> None:
    try:
        import gdown
    except ImportError:
        raise ZooError(
            f"{name} is on Google Drive: downloading it needs the 'zoo' extra (pip install 'blindnet[zoo]'); "
            f"or {manual_hint(name, url)}"
        ) from None
    try:
        # gdown >= 6 reads uc?id= and /file/d/ links; without a timeout (6.3+) it would wait forever on a stalled server.
        out = gdown.download(url, str(dst), quiet=not progress, timeout=DOWNLOAD_TIMEOUT_S)
    except Exception as exc:  # gdown raises its own error types (FileURLRetrievalError, ...) besides OSErrors
        # Only gdown's first line: the next ones advise its own --continue, which this route does not offer (the
        # partial file goes with the download folder).
        reason = _reason(exc).splitlines()[0]
        raise ZooError(f"cannot download {name} from {url} ({reason}); {manual_hint(name, url)}") from exc
    if not out or not dst.exists():
        raise ZooError(f"cannot download {name} from {url} (Google Drive gave no file); {manual_hint(name, url)}")


def _fetch_backbone(e: ModelEntry, url: str, progress: bool) -> Path:
    """torch.hub's own download (temporary file, then rename; the hash prefix in the file name is checked)."""
    target = cached_file(e.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    match = re.search(r"-([a-f0-9]+)\.", target.name)
    try:
        torch.hub.download_url_to_file(url, str(target), match.group(1) if match else None, progress=progress)
    except (OSError, HTTPException, RuntimeError) as exc:  # RuntimeError: torch.hub's hash mismatch
        target.unlink(missing_ok=True)
        raise ZooError(f"cannot download {e.name} from {url} ({_reason(exc)}); put the file at {target}") from exc
    return target


def backbone_report(backbone: str) -> str:
    """One line for a training run that starts from ImageNet weights: which file, and whether it is already here."""
    name = f"imagenet-{backbone}"
    if name not in MODELS:
        return f"ImageNet weights for {backbone}: no entry in blindnet models"
    path = cached_file(name)
    if path.exists():
        return f"ImageNet weights: {name} ({path})"
    return (
        f"ImageNet weights: {name} is not cached; torchvision downloads it now ({MODELS[name].size}, "
        f"{MODELS[name].url}); offline, fetch it first with `blindnet models --fetch {name}` where there is network "
        f"and copy it to {path}"
    )


# ---- listing -------------------------------------------------------------------------------------------------------


def describe(name: str) -> dict[str, Any]:
    """Everything ``blindnet models`` shows about ``name``: the entry, the URL in use, and the cache state."""
    e = entry(name)
    out = {k: v for k, v in asdict(e).items() if k not in ("output_stride", "instance_norm", "sha256")}
    out["url"] = source_url(name) if e.kind != "shipped" else ""
    out["cached"] = is_cached(name)
    out["file"] = str(cached_file(name))
    if e.kind == "converted":
        out["url_override"] = url_override_variable(name)
        out["register"] = f"blindnet convert FILE --name {name}"
        record = read_record(name) or {}
        if record:
            out["sha256"] = record.get("sha256")
    return out


def remove(name: str) -> bool:
    """Delete a converted entry from the cache (record first: a half-removed entry is not an entry)."""
    if entry(name).kind != "converted":
        return False
    existed = record_file(name).exists()
    record_file(name).unlink(missing_ok=True)
    cached_file(name).unlink(missing_ok=True)
    return existed
