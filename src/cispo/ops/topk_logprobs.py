"""Top-k logprobs from hidden states in [chunk, vocab block] tiles, never materialising [N, V].

For each row i (a position whose next-token distribution is wanted):

    z_i     = (h_i · Wᵀ + b) / temperature                  [V]  fp32, one tile at a time
    lse_i   = log Σ_j exp(z_ij)                             online over vocab blocks
    topk_i  = the k largest z_ij (ids and values)           merged block by block
    out_i   = topk_i.values − lse_i                         = log_softmax(z_i).topk(k)

Per vocab block the running top-k (k values) is concatenated with the block's own top-min(k, Vb)
and reduced back to k, so the extra memory is one [chunk, vocab block] tile plus [chunk, 2k]
(the same tiles, logits and online log-sum-exp as `cispo.ops.fused_logprobs`, so both paths
see identical logits). Inference only: no gradient. Values are sorted descending; ties keep the
smaller token id first only as far as `torch.topk` does (exact ties do not occur in practice with
real-valued logits). `naive_topk_logprobs` is the full-softmax reference.

`model_topk_logprobs` runs a transformers causal LM's decoder on one sequence and returns the top-k
at the positions asked for (the server's `topk_prompt_logprobs` / `topk_sample_logprobs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cispo.ops.fused_logprobs import (
    DEFAULT_CHUNK_SIZE,
    _advance_shift,
    _logits_into,
    _tiles,
    vocab_block_size,
)
from cispo.ops.model_logprobs import decoder_and_head, output_projection

__all__ = ["fused_topk_logprobs", "model_topk_logprobs", "naive_topk_logprobs"]


def _check(hidden: Tensor, weight: Tensor, k: int, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, vocab size {weight.shape[0]}]; got {k}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


@torch.no_grad()
def fused_topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(logprobs [N, k] fp32 descending, token ids [N, k] int64) of log_softmax(z).topk(k).

    Args:
        hidden: [N, H] final hidden states; weight: [V, H] output projection; bias: [V] or None.
        k: entries per row, 1 <= k <= V.
        temperature: logits are divided by it before the softmax (as the sampler does).
        chunk_size / vocab_chunk_size: tile shape, as in `fused_logprobs`.
    """
    _check(hidden, weight, k, temperature)
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = min(DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size, max(n, 1))
    block = vocab_block_size(rows, vocab) if vocab_chunk_size is None else vocab_chunk_size
    block = min(block, vocab)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out_values = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    out_ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    tile = torch.empty(rows, block, dtype=acc, device=hidden.device)
    for r, blocks in _tiles(n, vocab, rows, block):
        c = r.stop - r.start
        best_v = torch.full((c, k), float("-inf"), dtype=acc, device=hidden.device)
        best_i = torch.zeros(c, k, dtype=torch.int64, device=hidden.device)
        shift = torch.zeros(c, dtype=acc, device=hidden.device)
        total = torch.zeros(c, dtype=acc, device=hidden.device)
        for cols in blocks:
            b = None if bias is None else bias[cols]
            z = _logits_into(
                tile[:c, : cols.stop - cols.start], hidden[r], weight[cols], b, temperature
            )
            values, ids = z.topk(min(k, cols.stop - cols.start), dim=1)
            best_v, order = torch.cat([best_v, values], dim=1).topk(k, dim=1)
            best_i = torch.cat([best_i, ids + cols.start], dim=1).gather(1, order)
            new_shift, rescale = _advance_shift(shift, total, z)
            total = rescale * total + torch.exp(z.sub_(new_shift[:, None])).sum(dim=1)
            shift = new_shift
        out_values[r] = (best_v - (shift + total.log())[:, None]).float()
        out_ids[r] = best_i
    return out_values, out_ids


@torch.no_grad()
def naive_topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Reference: full [N, V] logits, log_softmax, topk. Shapes as in `fused_topk_logprobs`."""
    _check(hidden, weight, k, temperature)
    logits = F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))
    values, ids = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
    return values.float(), ids


@torch.no_grad()
def model_topk_logprobs(
    model: nn.Module,
    tokens: list[int],
    positions: range,
    k: int,
    *,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Top-k of the next-token distribution after `tokens[: p + 1]` for each p in `positions`.

    Row r describes the distribution that token `tokens[positions[r] + 1]` was (or would be)
    drawn from. Returns (logprobs [len(positions), k] fp32, ids [len(positions), k] int64).
    """
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokens], device=device)
    hidden = decoder(input_ids=input_ids).last_hidden_state[0]  # [T, H]
    weight, bias = output_projection(head)
    index = torch.tensor(list(positions), dtype=torch.int64, device=device)
    return fused_topk_logprobs(hidden[index], weight, k, bias=bias, temperature=temperature)
