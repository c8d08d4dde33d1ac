"""Runtimes for the deployable network behind one contract.

* :mod:`~blindnet.backends.base`: the :class:`~blindnet.backends.base.Backend` contract, ImageNet normalisation and
  the labels dtype rule;
* :mod:`~blindnet.backends.torch_backend`, :mod:`~blindnet.backends.onnxruntime_backend`,
  :mod:`~blindnet.backends.tensorrt_backend`: the three runtimes (running only; exporting and engine building live in
  :mod:`blindnet.export`);
* :mod:`~blindnet.backends.select`: backend names -> constructors, and ``auto``, the fastest correct path here.

This file imports nothing, so importing one runtime never pulls in the others or the exporter, and the command-line
parsers can offer the backend names without loading any of them.
"""

#: The names :data:`blindnet.backends.select.BACKENDS` builds, in the order the CLIs offer them (``auto`` first: the
#: default).
BACKEND_NAMES: tuple[str, ...] = ("auto", "torch", "onnx", "tensorrt")
