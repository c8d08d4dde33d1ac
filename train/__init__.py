"""Training and evaluation of BlindNet (``blindnet train`` / ``python -m blindnet.train``, ``blindnet evaluate`` /
``python -m blindnet.train.evaluate``).

Library entry points: :func:`blindnet.train.loop.train`, :func:`blindnet.train.evaluate.evaluate` and
:func:`blindnet.train.config.load_config`. This file imports nothing, so ``--help`` answers before PyTorch loads.
"""
