"""Write a checkpoint file the way the original BlindNet/RobustNet training code writes one.

The original's ``evaluate_eval`` saves::

    torch.save({'state_dict': net.state_dict(), 'optimizer': optim.state_dict(), 'scheduler': scheduler.state_dict(),
                'epoch': epoch, 'mean_iu': mean_iu, 'command': ' '.join(sys.argv[1:])}, snapshot)

with ``mean_iu = np.nanmean(iu)`` (a NumPy float64), an SGD optimizer (lr 0.01, momentum 0.9, weight decay 5e-4) over
every parameter of the network, and a ``LambdaLR`` poly schedule stepped every iteration. Its PyTorch 1.2 wrote the
pre-zip ("legacy") format; PyTorch >= 1.6 writes the zip format. Here both come from the real classes: the optimizer
takes one real step (so it holds momentum buffers), the scheduler one step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# What the original's command line looks like (scripts/blindnet_train_r50os16_gtav.sh, abridged).
ORIGINAL_COMMAND = (
    "--dataset gtav_jitter --val_dataset cityscapes bdd100k mapillary --arch network.deepv3.DeepR50V3PlusD "
    "--wt_layer 0 0 1 1 1 0 0 --lr 0.01 --max_iter 40000 --bs_mult 4"
)
MAX_ITER = 40000


def _is_parameter(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def original_snapshot(state: dict[str, torch.Tensor], *, epoch: int = 26) -> dict:
    """The dict the original saves for the network whose ``state_dict()`` is ``state`` (values are not changed)."""
    params = [torch.nn.Parameter(v.detach().clone()) for k, v in state.items() if _is_parameter(k)]
    optim = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda it: (1 - it / MAX_ITER) ** 0.9)
    # One real step: a small loss over every parameter, so each gets a gradient and a momentum buffer.
    loss = sum((p.float() ** 2).mean() for p in params)
    loss.backward()
    optim.step()
    scheduler.step()
    iu = np.array([0.61, 0.25, np.nan, 0.47])  # a class absent from the validation set gives NaN, as in the original
    return {
        "state_dict": state,
        "optimizer": optim.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "mean_iu": np.nanmean(iu),
        "command": ORIGINAL_COMMAND,
    }


def write_original_snapshot(path: str | Path, state: dict[str, torch.Tensor], *, zip_format: bool = True) -> Path:
    """Save ``original_snapshot(state)`` to ``path`` in PyTorch's zip format or the pre-zip format."""
    snapshot = original_snapshot(state)
    assert isinstance(snapshot["mean_iu"], np.float64)  # the value that plain weights_only loading refuses
    torch.save(snapshot, str(path), _use_new_zipfile_serialization=zip_format)
    return Path(path)


def as_numpy1_legacy_file(path: str | Path) -> Path:
    """Rewrite a pre-zip file so its NumPy scalar is named as NumPy 1.x names it (``numpy.core.multiarray``).

    The pre-zip format is a protocol-2 pickle, where a global is the text ``c<module>\\n<name>\\n``; NumPy 2 writes
    ``numpy._core.multiarray``, NumPy 1.x (the original's environment) ``numpy.core.multiarray``. Nothing else differs.
    """
    path = Path(path)
    raw = path.read_bytes()
    new, old = b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n"
    if new in raw:
        path.write_bytes(raw.replace(new, old))
    assert old in path.read_bytes()
    return path
