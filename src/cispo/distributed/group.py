"""The process group: set-up from torchrun's environment, and the few collectives the engine needs.

World size 1 (no `WORLD_SIZE`, or `WORLD_SIZE=1`) creates no process group, and every helper
here is then the identity on its input, so one code path serves one process and many.

Launch: `torchrun --nproc-per-node N script.py` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `init_from_env()` reads them. Backend: NCCL when CUDA is available, gloo otherwise.

Every rank must issue the same collectives in the same order: a collective called on one rank
only (a probe forward, a log line that all-reduces) hangs the whole group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "ProcessGroupInfo",
    "active",
    "all_reduce_totals",
    "barrier",
    "broadcast_object",
    "current_rank",
    "current_world_size",
    "full_value",
    "gather_objects",
    "init_from_env",
    "rank_share",
    "share_bounds",
]


@dataclass(frozen=True)
class ProcessGroupInfo:
    """Where this process stands in the job."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    local_rank: int
    """Rank within this node (the CUDA device index)."""
    world_size: int
    """Number of processes; 1 means no process group."""
    backend: str | None
    """"nccl", "gloo", or None without a process group."""
    device: torch.device
    """cuda:local_rank under NCCL, else cpu."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def init_from_env(backend: str | None = None) -> ProcessGroupInfo:
    """Join the process group torchrun describes in the environment (idempotent).

    backend: "gloo" or "nccl"; None picks NCCL when CUDA is available, gloo otherwise. With a world
    size of 1 no group is created and `backend` is None in the result.
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    size = _env_int("WORLD_SIZE", 1)
    global_rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= global_rank < size:
        raise ValueError(f"RANK={global_rank} must be in [0, WORLD_SIZE={size})")
    if size == 1:
        return ProcessGroupInfo(0, 0, 1, None, torch.device("cpu"))
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    device = torch.device("cuda", local) if chosen == "nccl" else torch.device("cpu")
    if chosen == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            chosen,
            device_id=device if chosen == "nccl" else None,
            world_size=size,
            rank=global_rank,
        )
    return ProcessGroupInfo(global_rank, local, size, chosen, device)


def active() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_world_size() -> int:
    """Ranks in the process group; 1 without one."""
    return dist.get_world_size() if active() else 1


def current_rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if active() else 0


def share_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous share of `count` items.

    The first `count % world_size` ranks take one item more; concatenating the shares in rank order
    gives the items back in order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_share(
    items: Sequence[T], rank: int | None = None, world_size: int | None = None
) -> list[T]:
    """This rank's contiguous, deterministic share of `items` (see `share_bounds`).

    Every rank must get at least one item (a rank with nothing to run would still have to join
    every forward's collectives), so fewer items than ranks is an error.
    """
    r = current_rank() if rank is None else rank
    w = current_world_size() if world_size is None else world_size
    if len(items) < w:
        raise ValueError(
            f"{len(items)} items cannot be shared over world_size={w} ranks: need at least {w}"
        )
    start, stop = share_bounds(len(items), r, w)
    return list(items[start:stop])


def all_reduce_totals(
    tokens: float, sequences: float, micro_batches: int
) -> tuple[float, float, int]:
    """(Σ tokens, Σ sequences, max micro_batches) over the ranks, in one collective.

    Float64 keeps integer counts exact up to 2^53. Without a process group: the inputs.
    """
    if not active():
        return tokens, sequences, micro_batches
    local = torch.tensor([tokens, sequences, float(micro_batches)], dtype=torch.float64)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered)  # [W, 3]
    return float(table[:, 0].sum()), float(table[:, 1].sum()), int(table[:, 2].max())


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; `[value]` without a process group."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: T) -> T:
    """Rank 0's `value` (picklable) on every rank; `value` itself without a process group.

    Every rank calls it; what the other ranks pass is ignored (None is fine)."""
    if not active():
        return value
    box: list[Any] = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def barrier() -> None:
    """Wait for every rank; nothing without a process group."""
    if active():
        dist.barrier()


def full_value(tensor: Tensor) -> Tensor:
    """A DTensor's full (replicated) value as a plain tensor; a plain tensor unchanged.

    A norm over DTensor gradients is itself a DTensor: `float()` needs the full tensor first.
    """
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor
