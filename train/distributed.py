"""Process-group setup from ``torchrun`` environment variables, and SyncBN that also works on CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU"), so on CPU the BatchNorm layers
are converted to :class:`CPUSyncBatchNorm`, which all-reduces the per-channel sums with a differentiable all-reduce. That keeps "the same code on CPU" true: a 2-process gloo run normalises
over the global batch exactly like one process with the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from blindnet.models import StyleNorm


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun`` (single- or multi-node); defaults: one process."""
    try:
        return DistInfo(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as exc:
        raise RuntimeError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc


def init_distributed(device_type: str) -> DistInfo:
    """Initialise the default process group when launched with ``WORLD_SIZE > 1`` (nccl on CUDA, gloo otherwise).

    ``MASTER_ADDR``/``MASTER_PORT`` come from ``torchrun`` (``--rdzv-endpoint`` for multi-node). Safe to call when a
    group already exists (tests spawn processes and initialise it themselves).
    """
    info = env_dist_info()
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    if info.world_size > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def current_dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_dist_info().local_rank)
    return DistInfo()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward all-reduces the gradient too, so each rank's input receives the
    gradient of *every* rank's loss through the shared statistics (what CUDA SyncBN's backward does)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _sync_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Global per-channel mean and biased variance of ``x`` (``N x C x ...``) over all ranks, differentiably.

    Two passes (mean, then the mean squared deviation) rather than ``E[x^2] - E[x]^2``: the one-pass form cancels
    catastrophically in float32 when a channel's mean is large against its spread.
    """
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.to(_stats_dtype(x))
    n_local = xf.new_tensor([float(x.numel() // x.shape[1])])
    s = _AllReduceSum.apply(torch.cat([xf.sum(dims), n_local]))
    n = s[-1]
    mean = s[:-1] / n
    var = _AllReduceSum.apply(((xf - mean.view(shape)) ** 2).sum(dims)) / n
    return mean, var, int(n.item())


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (their sums lose too much), the input's own dtype when wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    return ((x.to(_stats_dtype(x)) - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)).to(x.dtype)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank of the default group; works with gloo on CPU.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``; outside training or without a process group
    it *is* ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        mean, var, n = _sync_moments(x)
        if self.track_running_stats:
            tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
            assert tracked is not None and running_mean is not None and running_var is not None  # tracked stats exist
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                unbiased = var * (n / max(n - 1, 1))
                running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = _normalise(x, mean, var, self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class SyncStyleNorm(StyleNorm):
    """The original's training-time behaviour of its InstanceNorm layers under PyTorch 1.2 (``docs/original_implementation.md``, "Training recipe").

    With ``train_stats="batch"`` the layer normalises over the whole *global* batch (SyncBatchNorm with
    ``affine=False, track_running_stats=False``), not just this rank's images. Eval is per instance, as in
    :class:`StyleNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.train_stats == "batch" and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        mean, var, _ = _sync_moments(x)
        return _normalise(x, mean, var, 1e-5)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Turn every BatchNorm into its synchronised form, in place where possible; returns the converted module.

    Must run *before* the optimizer is built (the original converted after, which on old PyTorch could leave the
    optimizer holding the replaced layers' parameters). Parameters are reused, not copied, so either order works with
    this implementation, but we still convert first. InstanceNorm (``StyleNorm``) layers stay per-instance unless the
    model asked for ``in_train_stats="batch"``, in which case they become :class:`SyncStyleNorm` (global batch).
    """
    if device_type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    else:
        module = _convert_cpu(module)
    _convert_style(module)
    return module


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight = module.weight  # same Parameter objects: nothing is left behind in an optimizer
            new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = _convert_cpu(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _convert_style(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is StyleNorm and m.train_stats == "batch":
            m.__class__ = SyncStyleNorm  # no state of its own: swapping the class is a faithful conversion
