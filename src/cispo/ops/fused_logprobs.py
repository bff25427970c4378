"""Fused, chunked lm_head + log-softmax: per-token logprobs and entropy without [N, V] logits.

The largest tensor in RL training is the logits, tokens × vocabulary: 16k response tokens × 151,936
(Qwen) is 9.7 GB in fp32, and autograd keeps more (log_softmax output, softmax for the entropy).
`fused_logprobs` goes from final hidden states [N, H] and the output projection [V, H] straight to
the two per-token quantities every objective in `cispo.losses` reads:

    z_i      = (h_i · Wᵀ + b) / temperature                    [V]  fp32, one tile at a time
    lse_i    = log Σ_j exp(z_ij)                               fp32 whatever the model dtype
    logprob_i = z_i[target_i] − lse_i                          = log_softmax(logits / T)[target]
    entropy_i = −Σ_j p_ij log p_ij,  p_ij = exp(z_ij − lse_i)

The temperature is applied exactly as the sampler applies it (logits divided by T before the
softmax), so trainer and sampler logprobs are the same quantity. A custom autograd function
saves only hidden, weight, targets and [N] vectors (log-sum-exp, entropy), never logits; its
backward recomputes each chunk's logits and forms

    dL/dz_ij = g_lp_i · (1[j = target_i] − p_ij) − g_ent_i · p_ij (log p_ij + entropy_i)
    dL/dh_i = (dL/dz_i / T) · W      dL/dW = Σ_i (dL/dz_i / T)ᵀ h_i      dL/db = Σ_i dL/dz_i / T

Work goes in [chunk, vocab block] tiles (1024 × 4096 by default) with an online log-sum-exp over
the vocab blocks, so the extra memory is two 16 MiB fp32 tiles in forward and in backward,
independent of N and V.
Gradients reach `weight` by ordinary autograd, so a tied embedding, a trainable lm_head or a LoRA'd
head passed as the expression W + s·B·A all work unchanged.

Top-k logprobs are in `cispo.ops.topk_logprobs` (same tiles, inference only). Left out on
purpose: logit soft-capping and logit scales
(`model_token_logprobs` refuses models that use them). The naive path, `naive_logprobs`, stays the
reference: full logits, plain autograd.

Run the tests with `pytest tests/ops` and the memory/time benchmark with
`python benchmarks/logprob_memory.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TILE_BUDGET_BYTES",
    "FusedLogprobOutput",
    "fused_logprobs",
    "naive_logprobs",
    "vocab_block_size",
]

# One [chunk, vocab block] fp32 tile. Forward and backward each hold two such tiles (reused), so
# the extra memory is ≈ 32 MiB plus the gradients themselves, whatever N and V. At the default
# 1024-row chunk the vocab block is 4096. Why tiles over V too, not only over rows: with a row
# chunk alone the backward adds each chunk's dL/dW into the full [V, H] gradient, streaming
# 8·V·H bytes per chunk; at V = 151,936 with a 16 MiB [27, V] chunk that made it 2.3× slower than
# naive (docs/LOG.md, fused logprobs entry). A [C, Vb] tile streams only [Vb, H] and [C, H]
# accumulators.
TILE_BUDGET_BYTES = 16 * 2**20
DEFAULT_CHUNK_SIZE = 1024

# (z − shift) is clamped to the most negative finite fp32 before it multiplies p: where a logit is
# −inf (e.g. a −inf bias banning a vocab entry) p = 0 and p·log p must be 0, not 0·(−inf) = NaN.
_FP32_MIN = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class FusedLogprobOutput:
    """Per-token results; shapes are [N] from the kernels and [B, T] from `model_token_logprobs`."""

    logprobs: Tensor
    """log_softmax(logits / temperature)[target], fp32."""
    entropy: Tensor | None
    """Entropy of softmax(logits / temperature) in nats, fp32; None unless asked for."""


def vocab_block_size(rows: int, vocab_size: int, budget_bytes: int = TILE_BUDGET_BYTES) -> int:
    """Vocab entries per tile so that one [rows, block] fp32 tile fits in `budget_bytes`."""
    return min(vocab_size, max(1, budget_bytes // (4 * max(rows, 1))))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 models; fp64 stays fp64 (gradcheck runs in it)."""
    return torch.promote_types(dtype, torch.float32)


def _logits_into(
    out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float
) -> Tensor:
    """out[C, Vb] ← (h · Wᵀ + b) / T for one tile; the matmul runs in the model's dtype.

    An fp32 (or fp64) model writes straight into the reused buffer. A bf16 model runs the matmul
    in bf16 and upcasts its output, which is what `lm_head(h).float()` does in the naive path, so
    both paths see the same logits.
    """
    if h.dtype == weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    else:
        out.copy_(F.linear(h, weight, bias))
    if temperature != 1.0:
        out.div_(temperature)  # divide, not multiply by 1/T: the sampler divides
    return out


def _tiles(n: int, vocab: int, rows: int, block: int) -> list[tuple[slice, list[slice]]]:
    """Row chunks of `rows` and, inside each, vocab blocks of `block` (the last ones shorter)."""
    blocks = [slice(v, min(v + block, vocab)) for v in range(0, vocab, block)]
    return [(slice(i, min(i + rows, n)), blocks) for i in range(0, n, rows)]


def _advance_shift(shift: Tensor, total: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the online log-sum-exp over a tile z [C, Vb] (shift, total: [C]).

    Returns (new_shift, rescale): new_shift = max(shift, max_j z_j), or 0 while that is not
    finite; rescale = e^(shift − new_shift), the factor for what was summed so far, and 0 for rows
    with nothing summed yet (total = 0), never e^(+large)·0. Then
    total ← rescale·total + Σ_j e^(z_j − new_shift) and, at the end, lse = shift + log total.
    """
    new_max = torch.maximum(shift, z.amax(dim=1))
    new_shift = torch.where(torch.isfinite(new_max), new_max, 0.0)
    rescale = torch.where(total > 0, (shift - new_shift).exp(), 0.0)
    return new_shift, rescale


def _in_block(targets: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """(rows whose target lies in vocab block `cols`, that target's column inside the block)."""
    hit = ((targets >= cols.start) & (targets < cols.stop)).nonzero().squeeze(1)
    return hit, targets[hit] - cols.start


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        targets: Tensor,  # [N] int64
        bias: Tensor | None,  # [V]
        temperature: float,
        rows: int,
        block: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        acc, dev = _accumulation_dtype(hidden.dtype), hidden.device
        # Online log-sum-exp per row, relative to a running finite shift (the max so far):
        # total = Σ e^(z − shift) and spread = Σ e^(z − shift)·(z − shift), so at the end
        # lse = shift + log total and entropy = log total − spread / total. Keeping the shift
        # apart from log total makes log p = (z − shift) − log total exact where p ≈ 1, which
        # (1 − p) and the entropy of a peaked row need; a single lse would round at ulp(|z|).
        shift = torch.zeros(n, dtype=acc, device=dev)
        total = torch.zeros(n, dtype=acc, device=dev)
        spread = torch.zeros(n, dtype=acc, device=dev)
        target_logit = torch.empty(n, dtype=acc, device=dev)
        z_buf = torch.empty(min(rows, n), block, dtype=acc, device=dev)
        p_buf = torch.empty(min(rows, n), block, dtype=acc, device=dev)
        for r, blocks in _tiles(n, vocab, rows, block):
            c = r.stop - r.start
            for cols in blocks:
                w = cols.stop - cols.start
                b = bias[cols] if bias is not None else None
                z = _logits_into(z_buf[:c, :w], hidden[r], weight[cols], b, temperature)
                hit, col = _in_block(targets[r], cols)
                target_logit[r.start + hit] = z[hit, col]
                old_total = total[r]
                new_shift, rescale = _advance_shift(shift[r], old_total, z)
                if with_entropy:
                    spread[r] = rescale * (spread[r] + (shift[r] - new_shift) * old_total)
                total[r] = rescale * old_total
                shift[r] = new_shift
                z.sub_(new_shift[:, None])
                p = torch.exp(z, out=p_buf[:c, :w])
                total[r] += p.sum(dim=1)
                if with_entropy:
                    spread[r] += p.mul_(z.clamp_(min=_FP32_MIN)).sum(dim=1)
        log_total = total.log()
        logprobs = (target_logit - shift) - log_total
        entropy = log_total - spread / total if with_entropy else total.new_empty(0)
        del z_buf, p_buf
        ctx.save_for_backward(hidden, weight, targets, bias, shift, log_total, entropy)
        ctx.temperature, ctx.rows, ctx.block = temperature, rows, block
        ctx.with_entropy = with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, bias, shift, log_total, entropy = ctx.saved_tensors
        temperature: float = ctx.temperature
        if not ctx.with_entropy:
            grad_entropy = None
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 8

        n, vocab = hidden.shape[0], weight.shape[0]
        acc, dev = _accumulation_dtype(hidden.dtype), hidden.device
        same_dtype = hidden.dtype == weight.dtype == acc
        # Accumulators in fp32 (fp64 for fp64), cast to the input dtypes at the end.
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=dev) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if need_weight else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=acc, device=dev)
            if need_bias and bias is not None
            else None
        )
        z_buf = torch.empty(min(ctx.rows, n), ctx.block, dtype=acc, device=dev)
        p_buf = torch.empty(min(ctx.rows, n), ctx.block, dtype=acc, device=dev)
        for r, blocks in _tiles(n, vocab, ctx.rows, ctx.block):
            c = r.stop - r.start
            h = hidden[r]
            for cols in blocks:
                w = cols.stop - cols.start
                b = bias[cols] if bias is not None else None
                logp = _logits_into(z_buf[:c, :w], h, weight[cols], b, temperature)
                logp.sub_(shift[r, None]).sub_(log_total[r, None])
                p = torch.exp(logp, out=p_buf[:c, :w])  # [C, Vb] softmax
                # grad_z = g_lp·(onehot − p) − g_ent·p·(log p + H), built in place in one buffer.
                if grad_entropy is not None:
                    grad_z = logp.clamp_(min=_FP32_MIN).mul_(p)  # p log p (0 where p = 0)
                    grad_z.addcmul_(p, entropy[r, None]).mul_(grad_entropy[r, None])
                    if grad_logprobs is not None:
                        grad_z.addcmul_(p, grad_logprobs[r, None])
                    grad_z.neg_()
                else:
                    assert grad_logprobs is not None
                    grad_z = p.mul_(-grad_logprobs[r, None])
                if grad_logprobs is not None:
                    hit, col = _in_block(targets[r], cols)
                    grad_z[hit, col] += grad_logprobs[r.start + hit]
                if temperature != 1.0:
                    grad_z.div_(temperature)  # d z / d logits = 1 / T
                if grad_hidden is not None:
                    if same_dtype:
                        grad_hidden[r].addmm_(grad_z, weight[cols])
                    else:
                        grad_hidden[r] += (grad_z.to(weight.dtype) @ weight[cols]).to(acc)
                if grad_weight is not None:
                    grad_weight[cols].addmm_(grad_z.t(), h.to(acc))
                if grad_bias is not None:
                    grad_bias[cols] += grad_z.sum(dim=0)
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(
            f"targets must be int64 [N={hidden.shape[0]}]; got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def fused_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """Target logprobs (and entropy) from hidden states in [chunk, vocab block] tiles; no [N, V].

    logprob_i = log_softmax((h_i · Wᵀ + b) / T)[target_i],   entropy_i = −Σ_j p_ij log p_ij.
    The log-sum-exp is accumulated in fp32 whatever the dtype of `hidden` and `weight`. Extra
    memory is O(chunk_size × vocab_chunk_size) in forward and backward, independent of N and V,
    plus the gradients themselves. Gradients flow to hidden, weight and bias from both outputs (an
    entropy bonus works). In fp32, values and gradients equal `naive_logprobs` to 1e-5.

    bf16 tolerance: the matmul runs in bf16 and its output, the logits, is rounded once to bf16
    (|δz_j| ≤ u·|z_j|, u = 2^-8); everything after is fp32. log_softmax is 1-Lipschitz per entry in
    the max norm, so against the fp32 reference on the same bf16 inputs
    |δ logprob_i| ≤ 2u·max_j|z_ij| (≈ 0.08 nats at |z| ≤ 10) and, to first order,
    |δ entropy_i| ≤ 2u·max_j|z_ij|·entropy_i; gradients are within 2% in relative Frobenius norm
    (tests/ops/test_fused_logprobs.py checks all three).

    Args:
        hidden: [N, H] final hidden states of the tokens to score (the caller already kept only the
            loss-mask tokens).
        weight: [V, H] output projection; may be tied to the embeddings or be a differentiable
            expression such as W + s·B·A for a LoRA'd head.
        targets: [N] int64 token ids to score.
        bias: [V] optional output bias.
        temperature: the sampler's temperature; logits are divided by it before the softmax.
        chunk_size: tokens per tile; None means DEFAULT_CHUNK_SIZE (1024).
        vocab_chunk_size: vocab entries per tile; None fills `TILE_BUDGET_BYTES` (16 MiB fp32),
            4096 at the default chunk_size.
        with_entropy: also return the entropy.

    Returns:
        FusedLogprobOutput with logprobs [N] fp32 and entropy [N] fp32 or None.
    """
    _check_inputs(hidden, weight, targets, temperature)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk_size < 1 or (vocab_chunk_size is not None and vocab_chunk_size < 1):
        raise ValueError(
            f"chunk_size and vocab_chunk_size must be >= 1; got {chunk_size}, {vocab_chunk_size}"
        )
    vocab = weight.shape[0]
    rows = min(chunk_size, max(hidden.shape[0], 1))
    block = vocab_block_size(rows, vocab) if vocab_chunk_size is None else vocab_chunk_size
    apply: Callable[..., tuple[Tensor, Tensor]] = _FusedLogprobs.apply
    logprobs, entropy = apply(
        hidden, weight, targets, bias, float(temperature), rows, min(block, vocab), with_entropy
    )
    return FusedLogprobOutput(logprobs=logprobs, entropy=entropy if with_entropy else None)


def naive_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """Reference for `fused_logprobs`: full [N, V] logits and plain autograd, same formulas.

    logits = (h · Wᵀ + b).float() / T (fp64 stays fp64);  logp = log_softmax(logits);
    logprob = logp[target];  entropy = −Σ p·log p with p·log p := 0 where log p = −inf.
    Shapes as in `fused_logprobs`.
    """
    _check_inputs(hidden, weight, targets, temperature)
    logits = F.linear(hidden, weight, bias).to(_accumulation_dtype(hidden.dtype))  # [N, V]
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = None
    if with_entropy:
        # where(), not clamp(): its backward sends exactly 0, never 0·(−inf), to masked entries.
        finite_logp = torch.where(torch.isneginf(logp), 0.0, logp)
        entropy = -(logp.exp() * finite_logp).sum(-1)
    return FusedLogprobOutput(logprobs=logprobs, entropy=entropy)
