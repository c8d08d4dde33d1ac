"""HTTP inference server: dynamic batching, KServe v2 / Triton protocol, ``/v1/segment``, Prometheus metrics.

``python -m serve --checkpoint model.safetensors`` runs it; :func:`serve.app.create_app` builds the FastAPI app
around any :class:`~blindnet.inference.Predictor` or backend; :mod:`serve.ray_serve` scales the same Predictor out
on Ray Serve (optional extra ``blindnet[ray]``).
"""

from serve.app import BackgroundServer, ServeConfig, create_app
from serve.batcher import DynamicBatcher, QueueFullError

__all__ = ["BackgroundServer", "DynamicBatcher", "QueueFullError", "ServeConfig", "create_app"]
