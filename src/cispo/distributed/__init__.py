"""Scale-out on torch.distributed: process group, FSDP2 sharding, collectives, DCP checkpoints.

- `group.py`: set-up from torchrun's environment (world size 1 = no process group), the loss
  totals all-reduce, metric gathering, each rank's share of the datums.
- `fsdp.py`: `shard_model` (FSDP2 per decoder layer + a `TokenLogprobs` root), bf16 on CUDA.
- `checkpoint.py`: sharded model + optimizer state with torch.distributed.checkpoint (DCP), every
  rank's RNG, and a Hugging Face safetensors export written by rank 0.

Sits below `cispo.engine`, which shards its model when a process group is active
(docs/distributed.md).
"""

from cispo.distributed.fsdp import TokenLogprobs, decoder_layers, full_state_dict, shard_model
from cispo.distributed.group import (
    ProcessGroupInfo,
    active,
    all_reduce_totals,
    barrier,
    broadcast_object,
    current_rank,
    current_world_size,
    full_value,
    gather_objects,
    init_from_env,
    rank_share,
    share_bounds,
)

__all__ = [
    "ProcessGroupInfo",
    "TokenLogprobs",
    "active",
    "all_reduce_totals",
    "barrier",
    "broadcast_object",
    "current_rank",
    "current_world_size",
    "decoder_layers",
    "full_state_dict",
    "full_value",
    "gather_objects",
    "init_from_env",
    "rank_share",
    "shard_model",
    "share_bounds",
]
