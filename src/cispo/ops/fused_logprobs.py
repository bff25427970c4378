"""Fused, chunked lm_head + log-softmax: per-token logprobs and entropy without [N, V] logits.

The largest tensor in RL training is the logits, tokens × vocabulary: 16k response tokens × 151,936
(Qwen) is 9.7 GB in fp32, and autograd keeps more (log_softmax output, softmax for the entropy).
`fused_logprobs` goes from final hidden states [N, H] and the output projection [V, H] straight to
the two per-token quantities every objective in `cispo.losses` reads:

    z_i      = (h_i · Wᵀ + b) / temperature                    [V]  fp32, one row chunk at a time
    lse_i    = log Σ_j exp(z_ij)                               fp32 whatever the model dtype
    logprob_i = z_i[target_i] − lse_i                          = log_softmax(logits / T)[target]
    entropy_i = −Σ_j p_ij log p_ij,  p_ij = exp(z_ij − lse_i)

The temperature is applied exactly as the sampler applies it (logits divided by T before the
softmax), so trainer and sampler logprobs are the same quantity. A custom autograd function
saves only hidden, weight, targets and [N] vectors (log-sum-exp, entropy), never logits; its
backward recomputes each chunk's logits and forms

    dL/dz_ij = g_lp_i · (1[j = target_i] − p_ij) − g_ent_i · p_ij (log p_ij + entropy_i)
    dL/dh_i = (dL/dz_i / T) · W      dL/dW = Σ_i (dL/dz_i / T)ᵀ h_i      dL/db = Σ_i dL/dz_i / T

so the extra memory is a few [chunk, V] fp32 buffers in forward and backward, independent of N.
Gradients reach `weight` by ordinary autograd, so a tied embedding, a trainable lm_head or a LoRA'd
head passed as the expression W + s·B·A all work unchanged.

Left out on purpose: chunking over V (an online log-sum-exp), since the row chunk alone keeps a
buffer at 16 MiB for any V up to 4M; top-k logprobs; logit soft-capping and logit scales
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
    "FusedLogprobOutput",
    "default_chunk_rows",
    "fused_logprobs",
    "naive_logprobs",
]

# Memory for one [chunk, V] fp32 buffer when `chunk_size` is None. Forward and backward each hold
# two such buffers (reused across chunks), so the extra peak is ≈ 2 × 16 MiB plus the gradients
# themselves: 128 rows at V = 32,768 and 27 rows at V = 151,936. Small enough for a 10% peak at the
# benchmark's smaller shape; larger budgets bought no speed on CPU (docs/LOG_logprobs.md).
CHUNK_BUDGET_BYTES = 16 * 2**20

# log p is clamped to the most negative finite fp32 before it multiplies p: where a logit is −inf
# (e.g. a −inf bias masking a vocab entry) p = 0 and p·log p must be 0, not 0·(−inf) = NaN.
_FP32_MIN = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class FusedLogprobOutput:
    """Per-token results; shapes are [N] from the kernels and [B, T] from `model_token_logprobs`."""

    logprobs: Tensor
    """log_softmax(logits / temperature)[target], fp32."""
    entropy: Tensor | None
    """Entropy of softmax(logits / temperature) in nats, fp32; None unless asked for."""


def default_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one [rows, V] fp32 buffer fits in `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // (4 * vocab_size))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 models; fp64 stays fp64 (gradcheck runs in it)."""
    return torch.promote_types(dtype, torch.float32)


def _logits_into(
    out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float
) -> Tensor:
    """out[C, V] ← (h · Wᵀ + b) / T; the matmul runs in the model's dtype.

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


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        targets: Tensor,  # [N] int64
        bias: Tensor | None,  # [V]
        temperature: float,
        chunk_rows: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        acc, dev = _accumulation_dtype(hidden.dtype), hidden.device
        logprobs = torch.empty(n, dtype=acc, device=dev)
        shift = torch.empty(n, dtype=acc, device=dev)
        log_total = torch.empty(n, dtype=acc, device=dev)
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=dev)
        # Two [chunk, V] buffers reused by every chunk: no allocator churn or page faults per chunk.
        rows_max = min(chunk_rows, n)
        z_buf = torch.empty(rows_max, vocab, dtype=acc, device=dev)
        p_buf = torch.empty(rows_max, vocab, dtype=acc, device=dev)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            c = rows.stop - start
            z = _logits_into(z_buf[:c], hidden[rows], weight, bias, temperature)  # [C, V]
            # lse = shift + log_total, the two kept apart: log p = (z − shift) − log_total is
            # accurate where p ≈ 1, while z − lse carries lse's rounding at ulp(|z|), which
            # (1 − p) and the entropy gradient of a peaked row would amplify. A row whose max
            # is ±inf shifts by 0.
            shift_c = z.amax(dim=1)
            shift_c = torch.where(torch.isfinite(shift_c), shift_c, 0.0)
            z.sub_(shift_c[:, None])
            p = torch.exp(z, out=p_buf[:c])  # unnormalised softmax
            total = p.sum(dim=1)
            log_total_c = total.log()
            shift[rows], log_total[rows] = shift_c, log_total_c
            logprobs[rows] = z.gather(1, targets[rows, None]).squeeze(1) - log_total_c
            if with_entropy:
                logp = z.sub_(log_total_c[:, None]).clamp_(min=_FP32_MIN)
                entropy[rows] = -p.mul_(logp).sum(dim=1) / total
        del z_buf, p_buf
        ctx.save_for_backward(hidden, weight, targets, bias, shift, log_total, entropy)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
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
        chunk_rows: int = ctx.chunk_rows
        if not ctx.with_entropy:
            grad_entropy = None
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 7

        n, vocab = hidden.shape[0], weight.shape[0]
        acc, dev = _accumulation_dtype(hidden.dtype), hidden.device
        same_dtype = hidden.dtype == weight.dtype == acc
        grad_hidden = (
            torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_hidden else None
        )
        # fp32 accumulators over chunks, cast to the parameter dtype at the end.
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if need_weight else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=acc, device=dev)
            if need_bias and bias is not None
            else None
        )
        rows_max = min(chunk_rows, n)
        z_buf = torch.empty(rows_max, vocab, dtype=acc, device=dev)
        p_buf = torch.empty(rows_max, vocab, dtype=acc, device=dev)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            c = rows.stop - start
            h = hidden[rows]
            logp = _logits_into(z_buf[:c], h, weight, bias, temperature)
            logp.sub_(shift[rows, None]).sub_(log_total[rows, None])
            p = torch.exp(logp, out=p_buf[:c])  # [C, V] softmax
            # grad_z = g_lp·(onehot − p) − g_ent·p·(log p + H), built in place in one buffer.
            if grad_entropy is not None:
                grad_z = logp.clamp_(min=_FP32_MIN).mul_(p)  # p log p (0 where p = 0)
                grad_z.addcmul_(p, entropy[rows, None]).mul_(grad_entropy[rows, None])
                if grad_logprobs is not None:
                    grad_z.addcmul_(p, grad_logprobs[rows, None])
                grad_z.neg_()
            else:
                assert grad_logprobs is not None
                grad_z = p.mul_(-grad_logprobs[rows, None])
            if grad_logprobs is not None:
                grad_z.scatter_add_(1, targets[rows, None], grad_logprobs[rows, None])
            if temperature != 1.0:
                grad_z.div_(temperature)  # d z / d logits = 1 / T
            if grad_hidden is not None:
                if same_dtype:
                    torch.mm(grad_z, weight, out=grad_hidden[rows])
                else:
                    grad_hidden[rows] = grad_z.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
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
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """Target logprobs (and entropy) from hidden states, chunked over tokens; no [N, V] tensor.

    logprob_i = log_softmax((h_i · Wᵀ + b) / T)[target_i],   entropy_i = −Σ_j p_ij log p_ij.
    The log-sum-exp is accumulated in fp32 whatever the dtype of `hidden` and `weight`. Extra
    memory is O(chunk_size × V) in forward and backward; gradients flow to hidden, weight and bias
    from both outputs (an entropy bonus works). In fp32 values and gradients equal
    `naive_logprobs` to 1e-5.

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
        chunk_size: tokens per chunk; None picks `default_chunk_rows(V)` (a 16 MiB fp32 budget).
        with_entropy: also return the entropy.

    Returns:
        FusedLogprobOutput with logprobs [N] fp32 and entropy [N] fp32 or None.
    """
    _check_inputs(hidden, weight, targets, temperature)
    chunk_rows = default_chunk_rows(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk_rows < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    apply: Callable[..., tuple[Tensor, Tensor]] = _FusedLogprobs.apply
    logprobs, entropy = apply(
        hidden, weight, targets, bias, float(temperature), chunk_rows, with_entropy
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
