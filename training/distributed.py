"""Multi-process training under ``torchrun``: process group and the feature all-gather of the global batch.

Launch (one node, G GPUs; or CPU processes with the gloo backend)::

    torchrun --nproc_per_node=G -m training --preset cifar10-fast ...
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=G \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m training ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup`
reads them, picks NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and
gloo on the CPU.  ``--batch-size`` is the *global* batch: every rank embeds
``batch / world`` images (both views of each) and the loss uses negatives
from the whole global batch.

The global loss
---------------
All ranks' features ``[v1_r (b rows); v2_r (b rows)]`` are all-gathered into
the global layout ``[v1_0 .. v1_{W-1}; v2_0 .. v2_{W-1}]`` (:func:`global_keys`,
``2N`` rows, positives at ``(i + N) mod 2N``), exactly the batch a single
process would see; :class:`training.criterion.InvaSpreadCriterion` computes each
rank's share of the loss against those keys and scales it for DDP.  With
detached keys (the authors' mode) no gradient flows through the gather; in the
full-gradient mode the gather is :class:`AllGatherWithGrad`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistContext", "DistributedSetupError", "AllGatherWithGrad", "all_gather_features", "global_keys", "setup",
           "cleanup"]


class DistributedSetupError(ValueError):
    """Bad launch settings (printed as one line by the CLI)."""


@dataclass
class DistContext:
    """Where this process sits in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_mean(self, x: Tensor) -> Tensor:
        """Mean of a tensor over ranks (returns ``x`` itself in a single process)."""
        if not self.enabled:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / self.world_size

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's boolean, on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
        dist.broadcast(t, src=0)
        return bool(t.item())


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device | None]:
    """Join the process group if launched with ``WORLD_SIZE > 1``.

    Returns the context and this process's device (``None`` in a single
    process: the caller resolves ``--device`` itself).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), None
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise DistributedSetupError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are missing; launch with torchrun") from None
    if device_name not in ("auto", "cuda", "cpu"):
        raise DistributedSetupError(
            f"--device {device_name}: under torchrun every process uses cuda:LOCAL_RANK; "
            f"pass --device auto, cuda or cpu"
        )
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not use_cuda:
        raise DistributedSetupError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here; lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend), device


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


class AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``[m, D]`` tensor along dim 0 -> ``[W * m, D]``, with gradient.

    Backward: the upstream gradient of the gathered tensor is summed over all
    ranks (each rank's loss used every rank's rows) and this rank's slice is
    returned.  All ranks must pass tensors of the same shape.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_features(x: Tensor, ctx: DistContext, with_grad: bool) -> Tensor:
    """``[m, D]`` on each rank -> ``[W * m, D]`` in rank order (gradient-carrying when ``with_grad``)."""
    if not ctx.enabled:
        return x
    if with_grad:
        return AllGatherWithGrad.apply(x)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def global_keys(features: Tensor, ctx: DistContext, with_grad: bool) -> Tensor:
    """Local ``[v1_r; v2_r]`` (2b rows) -> global keys ``[all v1; all v2]`` (2N = 2Wb rows)."""
    b, d = features.shape[0] // 2, features.shape[1]
    gathered = all_gather_features(features, ctx, with_grad)  # [W * 2b, D]: [v1_0; v2_0; v1_1; v2_1; ...]
    return gathered.view(ctx.world_size, 2, b, d).transpose(0, 1).reshape(2 * ctx.world_size * b, d)
