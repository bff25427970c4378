"""Reductions from a per-token loss [B, T] to a scalar, separate from the objectives.

Each takes the *global* normaliser (num_tokens or num_sequences over the whole optimizer batch,
across micro-batches and data-parallel ranks) so that summing micro-batch losses gives the same
gradient as one batch. When it is None the local count is used, which is right only for a
single micro-batch.

Empty sequences (no active token) contribute 0 and are NOT counted in the local num_sequences
fallback (verl's seq-mean-token-mean does the same). A caller passing num_sequences should count
non-empty sequences too. Masked positions are selected out with torch.where, so a NaN or inf
there never reaches the result or its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked(loss: Tensor, loss_mask: Tensor) -> Tensor:
    return torch.where(loss_mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def _nonempty_sequences(loss_mask: Tensor) -> float:
    return float(loss_mask.any(dim=-1).sum().item())


def _safe(count: float) -> float:
    # An all-masked batch has a zero numerator; dividing by 1 keeps the result 0, not NaN.
    return count if count > 0 else 1.0


def token_mean(loss: Tensor, loss_mask: Tensor, *, num_tokens: float | None = None) -> Tensor:
    """Σ_{b,t} m ℓ / N_tok, N_tok = global active-token count (DAPO, CISPO, verl token-mean)."""
    count = float(loss_mask.sum().item()) if num_tokens is None else num_tokens
    return _masked(loss, loss_mask).sum() / _safe(count)


def seq_mean_token_mean(
    loss: Tensor, loss_mask: Tensor, *, num_sequences: float | None = None
) -> Tensor:
    """Σ_b (Σ_t m ℓ / Σ_t m) / N_seq (GRPO, arXiv:2402.03300; verl seq-mean-token-mean)."""
    per_seq = _masked(loss, loss_mask).sum(dim=-1) / loss_mask.sum(dim=-1).clamp(min=1)
    count = _nonempty_sequences(loss_mask) if num_sequences is None else num_sequences
    return per_seq.sum() / _safe(count)


def seq_mean_token_sum(
    loss: Tensor, loss_mask: Tensor, *, num_sequences: float | None = None
) -> Tensor:
    """Σ_b Σ_t m ℓ / N_seq (verl seq-mean-token-sum)."""
    count = _nonempty_sequences(loss_mask) if num_sequences is None else num_sequences
    return _masked(loss, loss_mask).sum() / _safe(count)


def seq_mean_token_sum_norm(
    loss: Tensor, loss_mask: Tensor, *, max_len: int, num_sequences: float | None = None
) -> Tensor:
    """Dr.GRPO constant normaliser: Σ_b Σ_t m ℓ / (N_seq · L), L = max_len (arXiv:2503.20783)."""
    count = _nonempty_sequences(loss_mask) if num_sequences is None else num_sequences
    return _masked(loss, loss_mask).sum() / (_safe(count) * max_len)


def token_sum(loss: Tensor, loss_mask: Tensor) -> Tensor:
    """Σ_{b,t} m ℓ, no normalisation (Tinker's `loss:sum`; registry name "sum")."""
    return _masked(loss, loss_mask).sum()


def reduce(
    name: str,
    loss: Tensor,
    loss_mask: Tensor,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Apply the reduction called `name` (see config.REDUCTION_NAMES)."""
    if name == "token_mean":
        return token_mean(loss, loss_mask, num_tokens=num_tokens)
    if name == "seq_mean_token_mean":
        return seq_mean_token_mean(loss, loss_mask, num_sequences=num_sequences)
    if name == "seq_mean_token_sum":
        return seq_mean_token_sum(loss, loss_mask, num_sequences=num_sequences)
    if name == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("seq_mean_token_sum_norm needs max_len")
        return seq_mean_token_sum_norm(
            loss, loss_mask, max_len=max_len, num_sequences=num_sequences
        )
    if name == "sum":
        return token_sum(loss, loss_mask)
    raise ValueError(
        f"reduction={name!r} is not one of ['token_mean', 'seq_mean_token_mean', "
        "'seq_mean_token_sum', 'seq_mean_token_sum_norm', 'sum']"
    )
