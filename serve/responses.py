"""Response encoding: ``/v1/segment`` images and JSON, KServe v2 infer answers (JSON or binary tensors)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from blindnet.inference import Prediction
from blindnet.serve.jsontext import json_array_text
from blindnet.serve.parsing import OUTPUT_LABELS


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an ``H x W`` uint8 (grayscale) or ``H x W x 3`` uint8 (RGB) array."""
    import cv2

    if array.ndim == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def segment_response(pred: Prediction, fmt: str, *, alpha: float, model_name: str) -> Response:
    """Encode one prediction as ``/v1/segment`` answers it (shared with the Ray Serve deployment)."""
    if fmt == "labels":
        labels = pred.labels
        if labels.dtype != np.uint8:  # > 256 classes: 16-bit PNG keeps the ids
            labels = labels.astype(np.uint16)
        return Response(encode_png(labels), media_type="image/png")
    if fmt == "color":
        return Response(encode_png(pred.colorized()), media_type="image/png")
    if fmt == "overlay":
        return Response(encode_png(pred.overlay(alpha)), media_type="image/png")
    h, w = pred.labels.shape
    return JSONResponse(
        {
            "model_name": model_name,
            "height": h,
            "width": w,
            "num_classes": pred.num_classes,
            "class_shares": pred.class_shares(),
        }
    )


def build_infer_response(
    req: dict[str, Any], preds: list[Prediction], outputs: list[tuple[str, bool]], *, model_name: str, version: str
) -> Response:
    """v2 response; binary outputs go after the JSON header (``Inference-Header-Content-Length``).

    JSON ``data`` is written a chunk at a time (:func:`~blindnet.serve.jsontext.json_array_text`), spliced into the
    header where a placeholder stands, so a large JSON answer never holds the GIL in one long ``json.dumps``.
    """
    out_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    texts: list[bytes] = []
    for name, binary in outputs:
        if name == OUTPUT_LABELS:
            arr = np.stack([p.labels for p in preds])
            dtype = "UINT8" if arr.dtype == np.uint8 else "INT32"
        else:
            arr = np.stack([p.logits for p in preds]).astype(np.float32)  # type: ignore[misc]
            dtype = "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _placeholder(len(texts))
            texts.append(json_array_text(arr))
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": out_json}
    if "id" in req:
        body["id"] = req["id"]
    header = json.dumps(body, separators=(",", ":")).encode()
    for i, text in enumerate(texts):
        header = header.replace(json.dumps(_placeholder(i)).encode(), text, 1)
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def _placeholder(i: int) -> str:
    """Stands for the ``i``-th JSON data array until it is spliced in (no request text can produce it: the id is
    the only request value echoed, and it comes after the outputs)."""
    return f"\x00blindnet-data-{i}\x00"
