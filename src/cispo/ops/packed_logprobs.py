"""Shared-prefix and padding-free packing for the trainer forward: each group's prompt runs once.

An RL step scores G completions of the same prompt. The padded path (`model_token_logprobs`) runs
the prompt G times, one right-padded row per datum. Here a group of G sequences s_1..s_G (model
input tokens) with longest common prefix S = LCP(s_1..s_G) becomes one packed segment

    row:        s[0:S] | s_1[S:] | s_2[S:] | ... | s_G[S:]
    positions:  0..S-1 | S..L_1-1 | S..L_2-1 | ... | S..L_G-1      (restart at S per completion)
    attention:  prefix token i → prefix tokens j ≤ i
                suffix token of s_g → every prefix token, and tokens of s_g's own suffix up to it;
                never another suffix, never another group.

With these positions (RoPE reads `position_ids`) and this mask, the hidden state at every token of
s_g is the one an unpadded forward of s_g alone computes: the same keys/values, the same positions,
only masked-out keys added (weight exactly 0). Token t of sequence b sits at packed position
index[b, t] (< S: the shared one). The loss positions gather their hidden states through that
index, so a prefix position used by several sequences is gathered several times; autograd sums
their gradients (index_select's backward is an index_add). In the usual RL layout
(`cispo.datums`: model_input = prompt + completion[:-1]) the first completion token is predicted
at the LAST prompt position, which is shared: that one hidden state is scored G times against G
different targets. S may reach into the completions when they start alike; that is still exact.

Padding-free packing is the same machinery with `share_prefix=False` (every sequence its own
segment, positions from 0) or with several groups in one row (`row_tokens`): the mask is block
diagonal over groups. Rows of one call are right-padded to the longest; a pad token attends only
to pads (its row of the mask is never empty, so no NaN from an all-masked softmax row).

Shapes: sequences B, max length T; rows R of width W; `allowed()` [R, 1, W, W] bool (True: query
w may attend key w'), built on the model's device; `index` [B, T] int64 into the flattened [R·W]
positions. Cost: the mask is a
dense [W, W] per row and SDPA/eager attention compute all W² scores whatever the mask, so packing
many groups into one row trades padding for masked-out work; `row_tokens=None` (one group per row)
keeps each row's W at S + Σ_g (L_g − S).

What transformers (5.24) accepts: `create_causal_mask` returns a 4D `attention_mask` unchanged
(`masking_utils._preprocess_mask_arguments`: "If the mask is already 4D, simply return as-is").
The SDPA integration passes a bool mask to `scaled_dot_product_attention` (True = attend); the
eager path ADDS the mask to the scores, so it gets the additive form (0 / finfo.min in the model
dtype); a bool mask there would add 0/1. Any other implementation (flash, flex) and models with
sliding-window or other non-full attention layers (a 4D mask would silently replace their window)
are refused.

How it composes:
- Micro-batching: a group is never split across micro-batches (its prefix would run twice and the
  shared hidden state would be split); `cispo.engine.packing` plans micro-batches of whole
  consecutive groups.
- Global token normalisation: the output is per-datum [B, T] logprobs laid out exactly as the
  padded path's, so `cispo.losses.compute_loss` and its reductions see the same tensors and the
  same global `num_tokens` / `num_sequences`; sequence-level ratios (GSPO) and per-sequence
  reductions are unchanged.
- Data parallelism: the group is the unit that goes to a rank. Each rank packs its own groups and
  reduces with the global normalisers, as for the padded path; splitting a group over ranks
  would only lose the sharing, never exactness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from cispo.ops.fused_logprobs import FusedLogprobOutput
from cispo.ops.model_logprobs import decoder_and_head, model_token_logprobs, score_hidden

__all__ = [
    "PackedRows",
    "attention_mask_for",
    "common_prefix_length",
    "pack_rows",
    "packed_token_logprobs",
    "token_logprobs",
    "unsupported_reason",
]

_SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PackedRows:
    """Packed model inputs and the map back to sequence positions."""

    input_ids: Tensor
    """[R, W] int64; 0 past a row's end."""
    position_ids: Tensor
    """[R, W] int64; restart at 0 per group and at S per suffix; 0 on padding."""
    segment: Tensor
    """[R, W] int64; the group a token belongs to (unique over rows); -1 on padding."""
    owner: Tensor
    """[R, W] int64; the sequence whose suffix holds the token; -1 in a prefix; -2 on padding."""
    index: Tensor
    """[B, T] int64; flat position r·W + w of token t of sequence b; 0 past its length."""
    shared: list[int]
    """Prefix length S of each group as packed (the whole sequence for a group of one)."""

    def allowed(self, device: torch.device | None = None) -> Tensor:
        """[R, 1, W, W] bool, built on `device`: True where the query (dim 2) may attend the key
        (dim 3): same group, key not after the query, key in the prefix or in the query's own
        suffix. A pad attends to the pads before it, never to a real token, and vice versa."""
        segment, owner = self.segment.to(device), self.owner.to(device)
        width = segment.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
        same_group = segment[:, :, None] == segment[:, None, :]
        visible = (owner[:, None, :] == -1) | (owner[:, :, None] == owner[:, None, :])
        return (same_group & visible & causal)[:, None]

    @property
    def packed_tokens(self) -> int:
        """Positions the model computes (R·W, padding included)."""
        return int(self.input_ids.numel())


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `sequences` (the whole sequence when one)."""
    if not sequences:
        raise ValueError("common_prefix_length needs at least one sequence")
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return n


def pack_rows(
    sequences: Sequence[Sequence[int]],
    group_sizes: Sequence[int],
    *,
    share_prefix: bool = True,
    row_tokens: int | None = None,
) -> PackedRows:
    """Pack `sequences` (consecutive groups of `group_sizes`) into rows; see the module docstring.

    Args:
        sequences: B token lists, each non-empty; group k is the next group_sizes[k] of them.
        share_prefix: run each group's common prefix once (False: every sequence is its own
            segment, positions from 0: padding-free packing only).
        row_tokens: put consecutive groups in one row while its length stays ≤ row_tokens (a
            longer group gets a row of its own); None: one group per row.
    """
    if any(size < 1 for size in group_sizes) or sum(group_sizes) != len(sequences):
        raise ValueError(
            f"group_sizes={list(group_sizes)} must be >= 1 each and sum to the "
            f"{len(sequences)} sequences"
        )
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence needs at least one token")
    if row_tokens is not None and row_tokens < 1:
        raise ValueError(f"row_tokens must be >= 1 or None, got {row_tokens}")

    # Per group: (shared prefix length, the sequences' indices); a group's tokens as packed.
    groups: list[tuple[int, list[int]]] = []
    start = 0
    for size in group_sizes:
        members = list(range(start, start + size))
        start += size
        shared = common_prefix_length([sequences[b] for b in members]) if share_prefix else 0
        groups.append((shared, members))

    def group_tokens(shared: int, members: list[int]) -> int:
        return shared + sum(len(sequences[b]) - shared for b in members)

    rows: list[list[int]] = []  # group indices per row
    used = 0
    for k, (shared, members) in enumerate(groups):
        size = group_tokens(shared, members)
        if rows and row_tokens is not None and used + size <= row_tokens:
            rows[-1].append(k)
            used += size
        else:
            rows.append([k])
            used = size
    width = max(sum(group_tokens(*groups[k]) for k in row) for row in rows)

    # Built as Python lists and converted once: a torch call per sequence would cost more than
    # the packing saves on small models (tests/engine/test_hot_path.py counts them).
    columns: dict[str, list[list[int]]] = {"ids": [], "pos": [], "seg": [], "own": []}
    pads = {"ids": 0, "pos": 0, "seg": -1, "own": -2}
    index_rows: list[list[int]] = [[] for _ in sequences]
    for r, row in enumerate(rows):
        ids: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        own: list[int] = []
        for k in row:
            shared, members = groups[k]
            prefix_index = range(r * width + len(ids), r * width + len(ids) + shared)
            ids.extend(sequences[members[0]][:shared])
            pos.extend(range(shared))
            seg.extend([k] * shared)
            own.extend([-1] * shared)
            for b in members:
                suffix = sequences[b][shared:]
                n = len(suffix)
                start_b = r * width + len(ids)
                index_rows[b] = [*prefix_index, *range(start_b, start_b + n)]
                ids.extend(suffix)
                pos.extend(range(shared, shared + n))
                seg.extend([k] * n)
                own.extend([b] * n)
        for name, values in (("ids", ids), ("pos", pos), ("seg", seg), ("own", own)):
            columns[name].append([*values, *[pads[name]] * (width - len(values))])
    max_len = max(len(s) for s in sequences)
    index = torch.tensor([[*ix, *[0] * (max_len - len(ix))] for ix in index_rows], dtype=torch.long)
    input_ids = torch.tensor(columns["ids"], dtype=torch.long)
    position_ids = torch.tensor(columns["pos"], dtype=torch.long)
    segment = torch.tensor(columns["seg"], dtype=torch.long)
    owner = torch.tensor(columns["own"], dtype=torch.long)
    return PackedRows(
        input_ids=input_ids,
        position_ids=position_ids,
        segment=segment,
        owner=owner,
        index=index,
        shared=[shared for shared, _ in groups],
    )


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot run packed rows exactly (None: it can): an attention implementation
    other than SDPA/eager, or a layer that is not full attention (a custom 4D mask would silently
    replace its window)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _SUPPORTED_ATTENTION:
        return (
            f"config._attn_implementation={implementation!r}: packed sequences need one of "
            f"{list(_SUPPORTED_ATTENTION)} (a custom 4D mask)"
        )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other or getattr(config, "use_sliding_window", False):
        return (
            f"layer types {other or ['sliding_attention']}: a custom 4D mask would replace their "
            "window; packed sequences need full attention in every layer"
        )
    return None


def attention_mask_for(model: nn.Module, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The 4D mask `model`'s attention implementation takes for `allowed` [R, 1, W, W]: the bool
    mask itself for SDPA, the additive 0 / finfo(dtype).min form for eager
    (NotImplementedError, with `unsupported_reason`, for any other model)."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise NotImplementedError(reason)
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    lengths: Sequence[int],
    targets: Tensor,
    loss_mask: Tensor,
    *,
    group_sizes: Sequence[int],
    share_prefix: bool = True,
    row_tokens: int | None = None,
    temperature: float = 1.0,
    fused: bool | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """`model_token_logprobs` on packed rows: same inputs and outputs, each group's prefix once.

    Shapes: input_ids, targets (int64) and loss_mask (bool) are [B, T], sequence b's tokens in
    input_ids[b, :lengths[b]] (right padding, as `cispo.engine` collates); consecutive groups of
    `group_sizes`. Returns logprobs [B, T] and entropy [B, T] or None, fp32, 0 off the loss mask.
    """
    loss_mask = loss_mask.bool()
    batch, width = input_ids.shape
    if len(lengths) != batch or any(not 1 <= n <= width for n in lengths):
        raise ValueError(f"lengths={list(lengths)} must hold one length in [1, {width}] per row")
    valid = (
        torch.arange(width, device=loss_mask.device)[None, :]
        < torch.tensor(lengths, device=loss_mask.device)[:, None]
    )
    if bool((loss_mask & ~valid).any()):
        raise ValueError("loss_mask marks positions past a sequence's length")
    decoder, head = decoder_and_head(model)
    rows_cpu = input_ids.detach().cpu().tolist()
    sequences = [row[:n] for row, n in zip(rows_cpu, lengths, strict=True)]
    packed = pack_rows(sequences, group_sizes, share_prefix=share_prefix, row_tokens=row_tokens)
    device = input_ids.device
    # The additive (eager) mask must be in the hidden states' dtype: the embedding's.
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = getattr(get_embeddings() if callable(get_embeddings) else None, "weight", None)
    dtype = (
        embedding.dtype
        if isinstance(embedding, Tensor)
        else next(p.dtype for p in model.parameters() if p.is_floating_point())
    )
    mask = attention_mask_for(model, packed.allowed(device), dtype)
    hidden = decoder(
        input_ids=packed.input_ids.to(device),
        attention_mask=mask,
        position_ids=packed.position_ids.to(device),
    ).last_hidden_state
    hidden = cast(Tensor, hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R·W, H]
    index = torch.zeros(batch, width, dtype=torch.long)
    index[:, : packed.index.shape[1]] = packed.index
    index = index.to(device)  # [B, T]
    out = score_hidden(
        head,
        flat.index_select(0, index[loss_mask]),  # [N, H]; shared positions repeat
        targets[loss_mask],
        temperature=temperature,
        fused=fused,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )

    def scatter(values: Tensor) -> Tensor:  # [N] -> [B, T], 0 off the mask, differentiable
        zeros = torch.zeros(loss_mask.shape, dtype=values.dtype, device=values.device)
        return zeros.index_put((loss_mask,), values)

    entropy = scatter(out.entropy) if out.entropy is not None else None
    return FusedLogprobOutput(logprobs=scatter(out.logprobs), entropy=entropy)


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    targets: Tensor,
    loss_mask: Tensor,
    *,
    groups: Sequence[int] | None,
    row_tokens: int | None = None,
    temperature: float = 1.0,
    fused: bool | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """Per-token logprobs [B, T] of right-padded rows: `packed_token_logprobs` over `groups`, or
    `model_token_logprobs` on the padded rows when `groups` is None. Same output either way.
    The one entry point of the engine and of the FSDP root (`cispo.distributed.fsdp`)."""
    if groups is None:
        return model_token_logprobs(
            model,
            input_ids,
            attention_mask,
            targets,
            loss_mask,
            temperature=temperature,
            fused=fused,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
        )
    lengths = (
        attention_mask.sum(dim=1).tolist()
        if attention_mask is not None
        else [input_ids.shape[1]] * input_ids.shape[0]
    )
    return packed_token_logprobs(
        model,
        input_ids,
        lengths,
        targets,
        loss_mask,
        group_sizes=groups,
        row_tokens=row_tokens,
        temperature=temperature,
        fused=fused,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
