"""Per-token trainer logprobs from a transformers causal LM, scoring only loss-mask tokens.

`model_token_logprobs` runs the decoder (the model without its lm_head) to get final hidden states
[B, T, H], keeps the loss-mask rows [N, H], and sends only those through the vocabulary projection,
fused (`fused_logprobs`, memory O(tile)) or naive (`naive_logprobs`, full [N, V] logits).
It takes a model as an argument and owns none: no optimizer, no I/O.

The output projection is read from `model.get_output_embeddings()`: a plain `nn.Linear` (its weight
may be tied to the input embeddings; gradients then reach the embedding through the same tensor) or
a peft LoRA `Linear`, which becomes the differentiable expression W + Σ_adapters s·B·A (one extra
[V, H] tensor while it lives, as a merge would need). Left out: LoRA variants (DoRA and friends),
LoRA dropout in training mode on the head (the fused path cannot drop per token), and models whose
logits are post-processed (soft-capping, logit scales); those raise rather than silently giving a
different distribution from the sampler's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from cispo.ops.fused_logprobs import (
    TILE_BUDGET_BYTES,
    FusedLogprobOutput,
    fused_logprobs,
    naive_logprobs,
)

__all__ = ["decoder_and_head", "model_token_logprobs", "output_projection", "score_hidden"]

# Config fields of transformers models whose lm_head output is transformed before the softmax.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def output_projection(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The head's effective (weight [V, H], bias [V] | None), differentiable w.r.t. its parameters.

    nn.Linear: (W, b).  peft lora.Linear: (W + Σ_a s_a·B_a·A_a, b + Σ_a s_a·bias(B_a)) over the
    active, unmerged adapters, which is what its forward computes when dropout is off.
    """
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    base = getattr(head, "base_layer", None)
    if isinstance(base, nn.Linear) and hasattr(head, "get_delta_weight"):
        weight: Tensor = base.weight
        bias: Tensor | None = base.bias
        if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
            return weight, bias
        lora_a = cast(nn.ModuleDict, head.lora_A)
        lora_b = cast(nn.ModuleDict, head.lora_B)
        for name in cast(list[str], head.active_adapters):
            if name not in lora_a:
                continue
            if name in cast(dict[str, object], getattr(head, "lora_variant", {})):
                raise NotImplementedError(f"LoRA variant on the lm_head (adapter {name!r})")
            dropout = cast(nn.ModuleDict, head.lora_dropout)[name]
            if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                raise NotImplementedError(
                    f"lm_head LoRA dropout p={dropout.p} in training mode (adapter {name!r}): "
                    "use lora_dropout=0 for the head or fused=False with the model's own forward"
                )
            weight = weight + cast(Callable[[str], Tensor], head.get_delta_weight)(name)
            b_bias = cast(nn.Linear, lora_b[name]).bias
            if b_bias is not None:
                scaling = cast(dict[str, float], head.scaling)[name]
                bias = b_bias * scaling if bias is None else bias + b_bias * scaling
        return weight, bias
    raise TypeError(f"unsupported output projection {type(head).__name__}")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model's decoder (no lm_head) and its output projection module; refuses models whose
    logits are transformed before the softmax."""
    config = getattr(model, "config", None)
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"config.{field}={value}: logits are transformed")
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not callable(get_decoder) or not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no get_decoder()/get_output_embeddings()")
    return cast(nn.Module, get_decoder()), head


def score_hidden(
    head: nn.Module,
    selected: Tensor,
    selected_targets: Tensor,
    *,
    temperature: float = 1.0,
    fused: bool | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """Logprobs (and entropy) [N] of `selected_targets` [N] from final hidden states [N, H]
    through `head`, fused or naive as in `model_token_logprobs`."""
    weight, bias = output_projection(head)
    num_tokens, vocab_size = selected.shape[0], weight.shape[0]
    if fused is None:
        fused = 4 * num_tokens * vocab_size > TILE_BUDGET_BYTES
    if fused:
        return fused_logprobs(
            selected,
            weight,
            selected_targets,
            bias=bias,
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
        )
    return naive_logprobs(
        selected,
        weight,
        selected_targets,
        bias=bias,
        temperature=temperature,
        with_entropy=with_entropy,
    )


def model_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    targets: Tensor,
    loss_mask: Tensor,
    *,
    temperature: float = 1.0,
    fused: bool | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> FusedLogprobOutput:
    """Trainer logprobs log_softmax(logits / T)[target] and entropy at loss-mask positions.

    Shapes: input_ids, attention_mask, targets (int64) and loss_mask (bool) are [B, T];
    targets[b, t] is the token scored at position t. Returns logprobs [B, T] and entropy [B, T] or
    None, fp32, 0 where loss_mask is False; only the N = loss_mask.sum() selected rows see the
    vocabulary.

    Args:
        model: a transformers causal LM (or a peft model wrapping one).
        fused: True for `fused_logprobs`, False for the naive reference; None (default) fuses when
            the naive [N, V] fp32 logits would be larger than one fused tile (TILE_BUDGET_BYTES),
            i.e. when fusing bounds memory that the naive path would not.
        chunk_size: tokens per tile for the fused path; None means the kernel's default (1024).
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss_mask = loss_mask.bool()
    out = score_hidden(
        head,
        cast(Tensor, hidden)[loss_mask],  # [N, H]
        targets[loss_mask],  # [N]
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
