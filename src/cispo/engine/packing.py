"""Groups and micro-batches for the shared-prefix update (`EngineConfig.shared_prefix`).

`cispo.ops.packed_logprobs` runs each group's common prefix once; this module decides what a group
is and which datums go through one forward together:

- `detect_groups`: a group is a maximal run of consecutive datums with the same prompt, where a
  datum's prompt is its model input up to and including its first loss position (the position that
  predicts the first completion token; `cispo.datums` lays RL and SFT datums out this way). The RL
  loop emits a prompt's G datums consecutively, so its groups are found without being told. A
  datum with no loss position, or whose first position is already a loss position (no prompt),
  is a group of its own. Within a group the packed prefix is the longest common prefix of the
  model inputs, which is at least the prompt.
- `plan_micro_batches`: consecutive whole groups, at most `micro_batch_size` datums each; a group
  larger than that is a micro-batch of its own (never split: its prefix would run twice).
- `micro_batches` / `token_logprobs` (from `cispo.ops.packed_logprobs`, where the FSDP root calls
  it too): the two calls `Engine.forward_backward` makes, either way (`shared=False`: fixed-size
  micro-batches and `model_token_logprobs` on padded rows).

Micro-batch boundaries move with the groups, which never changes the update: every micro-batch's
loss is reduced with the global token / sequence counts of the whole call.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cispo.ops.packed_logprobs import token_logprobs, unsupported_reason

__all__ = [
    "detect_groups",
    "micro_batches",
    "packing_unsupported",
    "plan_micro_batches",
    "token_logprobs",
]


def packing_unsupported(model: nn.Module) -> str | None:
    """Why the engine must take the padded path for `model` (None: it may pack)."""
    return unsupported_reason(model)


def detect_groups(input_ids: Tensor, lengths: Sequence[int], loss_mask: Tensor) -> list[int]:
    """Sizes of the consecutive groups of rows of input_ids [B, T] (right-padded to `lengths`)
    that share a prompt; loss_mask [B, T] bool. The sizes sum to B."""
    rows = input_ids.tolist()
    first = loss_mask.int().argmax(dim=1).tolist()  # first True per row (0 when none)
    any_loss = loss_mask.any(dim=1).tolist()
    sizes: list[int] = []
    previous: list[int] | None = None
    for row, n, f, has_loss in zip(rows, lengths, first, any_loss, strict=True):
        prompt = row[: f + 1] if has_loss and f > 0 and f < n else None
        if prompt is not None and prompt == previous:
            sizes[-1] += 1
        else:
            sizes.append(1)
        previous = prompt
    return sizes


def plan_micro_batches(
    group_sizes: Sequence[int], micro_batch_size: int
) -> list[tuple[int, int, list[int]]]:
    """(start, stop, group sizes) of each micro-batch: datums [start, stop) in whole groups."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    plan: list[tuple[int, int, list[int]]] = []
    start = 0
    for size in group_sizes:
        if size < 1:
            raise ValueError(f"group sizes must be >= 1, got {list(group_sizes)}")
        if plan and plan[-1][1] - plan[-1][0] + size <= micro_batch_size:
            first, stop, sizes = plan[-1]
            plan[-1] = (first, stop + size, [*sizes, size])
        else:
            plan.append((start, start + size, [size]))
        start += size
    return plan


def micro_batches(
    input_ids: Tensor,
    lengths: Sequence[int],
    loss_mask: Tensor,
    micro_batch_size: int,
    *,
    shared: bool,
) -> list[tuple[int, int, list[int] | None]]:
    """(start, stop, group sizes or None) per micro-batch of a collated call: whole detected groups
    when `shared`, else [start, start + micro_batch_size) with no groups (the padded path)."""
    if shared:
        groups = detect_groups(input_ids, lengths, loss_mask)
        return [(a, b, sizes) for a, b, sizes in plan_micro_batches(groups, micro_batch_size)]
    batch = len(lengths)
    return [
        (start, min(start + micro_batch_size, batch), None)
        for start in range(0, batch, micro_batch_size)
    ]
