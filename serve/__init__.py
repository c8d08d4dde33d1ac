"""HTTP inference server: dynamic batching, KServe v2 / Triton protocol, ``/v1/segment``, Prometheus metrics.

``python -m blindnet.serve --checkpoint model.safetensors`` runs it; :func:`blindnet.serve.app.create_app` builds the FastAPI app
around any :class:`~blindnet.inference.Predictor` or backend; :mod:`blindnet.serve.ray_serve` runs the same app as Ray Serve
replicas on one machine or a cluster (optional extra ``blindnet[ray]``; ``blindnet serve --ray``).
"""
