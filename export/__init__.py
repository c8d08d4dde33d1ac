"""``python -m blindnet.export``: turn a checkpoint into deployable artifacts (ONNX, TensorRT, Triton) and verify each one.

Library entry point: :func:`blindnet.export.pipeline.run_export` (the CLI in ``__main__`` only parses arguments and calls it). Nothing here
imports the training code (``blindnet.task`` / ``blindnet.losses``): a deployable checkpoint holds everything needed.
"""
