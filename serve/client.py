"""A small client-side codec for this server: KServe v2 infer requests and answers (binary or JSON), plain uploads.

No HTTP here: the functions build request bodies and headers and read answers, so any HTTP client (httpx, urllib,
an asyncio load generator) can use them. ``tritonclient.http`` speaks the same protocol; this module exists so that
tests and benchmarks need no Triton client and can also build the malformed variants they send on purpose.

Example::

    import httpx
    from blindnet.serve import client

    body, headers = client.encode_infer(images)                       # N x H x W x 3 uint8, binary tensors
    r = httpx.post(f"{url}/v2/models/blindnet/infer", content=body, headers=headers)
    labels = client.decode_infer(r.content, r.headers)["labels"]      # N x H x W
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

#: Header naming the length of the JSON part of a binary v2 body (the binary tensor data follows it).
HEADER_LENGTH = "Inference-Header-Content-Length"
_DTYPES = {"UINT8": np.uint8, "INT32": np.int32, "FP32": np.float32}


def infer_path(model: str = "blindnet", version: str | None = None) -> str:
    """The URL path of a v2 infer request."""
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def encode_infer(
    images: np.ndarray,
    *,
    binary: bool = True,
    outputs: Sequence[str] = ("labels",),
    binary_outputs: bool = True,
    request_id: str | None = None,
    input_name: str = "images",
    datatype: str = "UINT8",
) -> tuple[bytes, dict[str, str]]:
    """``(body, headers)`` of a v2 infer request for ``images`` (``N x H x W x 3`` uint8).

    ``binary``: tensor data after the JSON header (the binary tensor extension) or as a JSON ``data`` list.
    ``outputs``: the outputs to ask for (``labels``, ``logits``), each binary or JSON per ``binary_outputs``.
    ``input_name``, ``datatype``: what the input declares (other values than the defaults make a request the server
    refuses, for tests).
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    spec: dict[str, Any] = {"name": input_name, "shape": list(images.shape), "datatype": datatype}
    raw = b""
    if binary:
        raw = images.tobytes()
        spec["parameters"] = {"binary_data_size": len(raw)}
    else:
        spec["data"] = images.reshape(-1).tolist()
    request: dict[str, Any] = {
        "inputs": [spec],
        "outputs": [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs],
    }
    if request_id is not None:
        request["id"] = request_id
    header = json.dumps(request, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers[HEADER_LENGTH] = str(len(header))
    return header + raw, headers


def decode_infer(content: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The output arrays of a v2 infer answer, by name (binary or JSON data, in the shape and dtype it declares)."""
    length = _header(headers, HEADER_LENGTH)
    hlen = int(length) if length is not None else len(content)
    answer = json.loads(content[:hlen])
    arrays: dict[str, np.ndarray] = {}
    offset = hlen
    for out in answer["outputs"]:
        dtype = _DTYPES[out["datatype"]]
        if "data" in out:
            arrays[out["name"]] = np.asarray(out["data"], dtype).reshape(out["shape"])
            continue
        size = out["parameters"]["binary_data_size"]
        arrays[out["name"]] = np.frombuffer(content[offset : offset + size], dtype).reshape(out["shape"])
        offset += size
    return arrays


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def encode_upload(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """An ``H x W x 3`` uint8 RGB image as a file for ``/v1/segment`` (the raw request body)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def decode_png(content: bytes) -> np.ndarray:
    """The array in a PNG answer of ``/v1/segment`` (``H x W`` class ids, or ``H x W x 3`` colours)."""
    with Image.open(io.BytesIO(content)) as img:
        return np.asarray(img)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (to start a local server on; another process could
    still take it before the server binds, so a server that fails to bind should be retried on a new port)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
