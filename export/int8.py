"""INT8 for the CPU: static Q/DQ quantisation of an exported ONNX model, calibrated and checked on generated scenes.

One file serves two runtimes: ONNX Runtime's CPU provider runs the Q/DQ graph with integer kernels, and TensorRT
builds an INT8 engine from the same Q/DQ nodes (explicit quantisation). That is why the format is QDQ with signed
int8 activations *and* weights, activations symmetric (zero point 0) and weights per output channel: TensorRT
accepts only that form. ONNX Runtime's x86 kernels want uint8 activations, so the runtime shifts the activation zero
points to 128 when it loads the file (:func:`blindnet.export.ort.unsigned_activations`, exact).

Two choices keep the labels close to float32, at no cost in speed (the measurements behind them are in
``benchmarks/results/README.md``, "CPU paths"):

- Weights use 7 of their 8 bits (``reduce_range``). x86 CPUs without VNNI multiply uint8 by int8 with an
  instruction that adds pairs of products into a saturating int16; full-range weights overflow it on bright inputs.
- Every InstanceNorm layer and the node feeding it stay float ("float islands"). InstanceNorm divides each channel
  by its own spread in this image, so a channel that one global activation scale quantises coarsely comes out as
  amplified rounding noise.

The parity check runs the float32 and the int8 graphs on held-out generated scenes (seeds disjoint from the
calibration scenes) and reports label agreement with the float32 graph and the mIoU change against the scenes'
ground-truth masks; the report is stored next to the file like the float parity report (``<file>.check.json``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from blindnet.data.synthetic import APPEARANCES, render_scene
from blindnet.export.ort import META_PREFIX, io_spec_from_session, ort_session, prepare_input
from blindnet.io import atomic_write
from blindnet.metrics import ConfusionMatrix

#: Acceptance: labels agree with float32 on >= 98% of pixels, mIoU drops by <= 1 point on held-out scenes.
INT8_MIN_AGREEMENT = 0.98
INT8_MAX_MIOU_DROP = 1.0
#: Calibration and held-out scenes come from disjoint seed ranges.
CALIBRATION_SEED = 10_000
HELD_OUT_SEED = 20_000
#: What a cached INT8 export is calibrated and checked on: scenes at this (H, W) (a module setting so that tests can
#: shrink it).
SCENE_SIZE = (256, 512)
CALIBRATION_SCENES = 16
HELD_OUT_SCENES = 8
#: Names the quantisation recipe in cached file names, so a cache made by an older recipe is not reused.
INT8_RECIPE = "qdq2"
#: Ops left in float together with the node that feeds them (see the module docstring).
FLOAT_ISLAND_OPS = ("InstanceNormalization",)


def generated_scenes(count: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` generated street scenes: images ``count x H x W x 3`` uint8 and masks ``count x H x W`` uint8.

    The appearance (noon, night, fog, ...) cycles with the index so that calibration covers every style.
    """
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    scene = seed
    while len(images) < count:
        name = APPEARANCES[len(images) % len(APPEARANCES)]
        try:
            views, mask = render_scene(scene, size[0], size[1], appearances=[name])
        except cv2.error:
            # A few seeds make the renderer's sky band empty (a renderer bug); any other scene serves as well.
            views = None
        scene += 1
        if views is not None:
            images.append(views[name])
            masks.append(mask)
    return np.stack(images), np.stack(masks)


class _Calibration:
    """ONNX Runtime calibration reader: one generated scene per call, already in the graph's input format."""

    def __init__(self, inputs: list[np.ndarray], input_name: str) -> None:
        self._items = iter([{input_name: x} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


@contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """Keep ONNX Runtime's quantiser off the console unless the application configured logging itself.

    The quantiser logs through the root logger; the first such call would also configure it (``basicConfig``), and
    every later message of this package would then carry a ``WARNING:blindnet:`` prefix. Its only message here
    suggests its optional pre-processing, which leaves these graphs and their labels unchanged (measured).
    """
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


def float_islands(proto: Any) -> list[str]:
    """Names of the nodes :func:`quantize_int8` keeps in float: each ``FLOAT_ISLAND_OPS`` node and its producer."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    names = []
    for node in proto.graph.node:
        if node.op_type in FLOAT_ISLAND_OPS:
            feeding = producer.get(node.input[0])
            names += [node.name] + ([feeding.name] if feeding is not None else [])
    return names


def quantize_int8(
    float_onnx: str | Path,
    out_path: str | Path,
    *,
    calibration: int = 16,
    size: tuple[int, int] = (256, 512),
    seed: int = CALIBRATION_SEED,
    method: str = "MinMax",
) -> Path:
    """Write the Q/DQ INT8 version of ``float_onnx`` (a float32 export) to ``out_path``.

    Args:
        float_onnx: float32 graph from :func:`~blindnet.export.onnx.export_onnx`.
        out_path: destination ``.onnx``.
        calibration: generated scenes used to calibrate activation ranges (min/max).
        size: ``(H, W)`` of the calibration scenes.
        seed: first scene seed (held-out checks use another range).
        method: ONNX Runtime calibration method (``MinMax``, ``Percentile``, ``Entropy``; MinMax measured best
            on the BlindNet ShuffleNetV2 that was the default then).
    """
    # onnxruntime is an optional extra: imported only when a quantisation is asked for.
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    float_onnx, out_path = Path(float_onnx), Path(out_path)
    spec = io_spec_from_session(ort_session(float_onnx))
    if spec["precision"] != "float32":
        raise ValueError(f"{float_onnx}: INT8 quantisation starts from a float32 export, got {spec['precision']}")
    islands = float_islands(onnx.load(str(float_onnx)))
    images, _ = generated_scenes(calibration, size, seed)
    reader = _Calibration([prepare_input(images[i : i + 1], spec) for i in range(len(images))], spec["input_name"])

    def write(tmp: str) -> None:
        with _quiet_quantiser():
            quantize_static(
                str(float_onnx),
                tmp,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                nodes_to_exclude=islands,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
                # Symmetric activations (zero point 0): the form TensorRT's explicit INT8 needs; ORT runs it as well.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        proto = onnx.load(tmp)
        for entry in proto.metadata_props:
            if entry.key == META_PREFIX + "precision":
                entry.value = "int8"
        onnx.save(proto, tmp)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, write)
    return out_path


def _labels(sess: Any, images: np.ndarray, desc: str = "int8 check") -> np.ndarray:
    spec = io_spec_from_session(sess)
    steps = tqdm(range(len(images)), desc=desc, unit="img", leave=False, disable=None)  # only on a terminal
    out = np.concatenate(
        [
            sess.run([spec["output_name"]], {spec["input_name"]: prepare_input(images[i : i + 1], spec)})[0]
            for i in steps
        ]
    )
    return out if spec["output_kind"] == "labels" else out.argmax(1)


def _miou(labels: np.ndarray, masks: np.ndarray, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    cm.update(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(masks.astype(np.int64)))
    return 100.0 * cm.miou()


def _ort_version() -> str:
    import onnxruntime as ort  # optional dependency; either the CPU or the GPU package provides the module

    return ort.__version__


def check_int8(
    int8_onnx: str | Path,
    float_onnx: str | Path,
    *,
    scenes: int = 8,
    size: tuple[int, int] = (256, 512),
    seed: int = HELD_OUT_SEED,
    write_report: bool = True,
    min_label_agreement: float = INT8_MIN_AGREEMENT,
) -> dict[str, Any]:
    """Compare the INT8 graph with its float32 source on held-out generated scenes.

    ``passed`` needs label agreement >= ``min_label_agreement`` and an mIoU drop <= ``INT8_MAX_MIOU_DROP`` points.

    Returns (and stores as ``<int8_onnx>.check.json``) a dict with ``label_agreement`` (fraction of pixels whose
    int8 label equals the float32 label), ``miou_float32``/``miou_int8`` (percent, against the scenes' masks),
    ``miou_change`` (int8 minus float32, points), the thresholds and ``passed``.
    """
    t0 = time.perf_counter()
    sessions = [ort_session(p) for p in (float_onnx, int8_onnx)]
    num_classes = io_spec_from_session(sessions[0])["num_classes"]
    images, masks = generated_scenes(scenes, size, seed)
    ref, q = (_labels(s, images, f"int8 check ({name})") for s, name in zip(sessions, ("float32", "int8")))
    agreement = float((ref == q).mean())
    miou_f, miou_q = _miou(ref, masks, num_classes), _miou(q, masks, num_classes)
    report = {
        "path": str(int8_onnx),
        "reference": str(float_onnx),
        "runtime": f"onnxruntime {_ort_version()}",
        "precision": "int8",
        "format": "QDQ, int8 activations (symmetric), per-channel int8 weights (7-bit range), InstanceNorm in float",
        "recipe": INT8_RECIPE,
        "held_out_scenes": scenes,
        "size": list(size),
        "seed": seed,
        "label_agreement": agreement,
        "miou_float32": miou_f,
        "miou_int8": miou_q,
        "miou_change": miou_q - miou_f,
        "thresholds": {"min_label_agreement": min_label_agreement, "max_miou_drop": INT8_MAX_MIOU_DROP},
        "passed": agreement >= min_label_agreement and miou_f - miou_q <= INT8_MAX_MIOU_DROP,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if write_report:
        target = Path(int8_onnx).with_name(Path(int8_onnx).name + ".check.json")
        text = json.dumps(report, indent=2)
        atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return report
