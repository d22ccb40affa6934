"""torch.distributed helpers for `torchrun`: gloo on CPU, NCCL on GPU; a no-op in one process."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from saelab.errors import SaelabError

# Rank 0 may harvest a whole activation cache while the others wait at a barrier: the default
# 30-minute collective timeout would kill long harvests. SAELAB_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 24 * 3600


def world() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device: str) -> tuple[int, int]:
    """Join torchrun's process group (once); with CUDA each rank uses the GPU of its LOCAL_RANK."""
    rank, size = world()
    if size > 1 and device.startswith("cuda") and ":" not in device:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" = this rank's own GPU
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        timeout = datetime.timedelta(
            seconds=float(os.environ.get("SAELAB_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        )
        dist.init_process_group(backend=backend, timeout=timeout)
    return rank, size


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: every rank raises if any rank failed, so no rank is left waiting at a barrier.

    The failing rank re-raises its own error; the others raise a SaelabError pointing at it.
    """
    if dist.is_initialized():
        flag = torch.tensor([0.0 if error is None else 1.0], device=_collective_device())
        dist.all_reduce(flag)
        if error is None and float(flag) > 0:
            raise SaelabError("another rank failed (its error is printed above); this rank stops too.")
    if error is not None:
        raise error


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """What DDP does after backward: every rank ends with the mean gradient (one flat all-reduce).

    A parameter without a gradient on this rank counts as a zero gradient, so every rank always
    reduces the same number of elements (a mismatch would hang or garble the all-reduce).
    """
    if not dist.is_initialized():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def sum_tensor_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_object(obj: object) -> list | None:
    """Every rank's `obj` (anything picklable) on rank 0, in rank order; None on the other ranks.

    For per-rank state that rank 0 saves, such as each streaming rank's data position. [obj] in
    one process.
    """
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Give every rank rank `src`'s values (e.g. after rank 0 resampled dead latents)."""
    if dist.is_initialized():
        on_device = tensor.to(_collective_device())
        dist.broadcast(on_device, src)
        tensor.copy_(on_device)
    return tensor


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
