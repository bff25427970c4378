"""Completions and advantages → `Datum`s, the only thing the trainer sees (pure; no model, no I/O).

Layout (tinker-cookbook's, `rl/data_processing.py`): for a prompt `p` (length L) and a sampled
completion `c`, `model_input = p + c[:-1]` and position i predicts `target_tokens[i]`, so
`target_tokens = p[1:] + c`. The first L-1 positions are prompt: `mask` 0, `advantages` 0,
`logprobs` 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from cispo.types import Datum, ModelInput, TensorData


def rl_datum(
    prompt_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    sampler_logprobs: Sequence[float],
    advantage: float,
    *,
    old_logprobs: Sequence[float] | None = None,
) -> Datum:
    """One RL datum; `sampler_logprobs[t]` is the sampler's logprob of `completion_tokens[t]`."""
    if len(prompt_tokens) < 1:
        raise ValueError("prompt_tokens must hold at least one token (e.g. BOS)")
    if len(completion_tokens) < 1:
        raise ValueError("completion_tokens is empty: nothing to train on")
    if len(sampler_logprobs) != len(completion_tokens):
        raise ValueError(
            f"sampler_logprobs has {len(sampler_logprobs)} entries for "
            f"{len(completion_tokens)} completion tokens"
        )
    pad = len(prompt_tokens) - 1
    n = len(completion_tokens)
    inputs: dict[str, list[float] | list[int]] = {
        "target_tokens": list(map(int, [*prompt_tokens[1:], *completion_tokens])),
        "logprobs": [0.0] * pad + list(map(float, sampler_logprobs)),
        "advantages": [0.0] * pad + [float(advantage)] * n,
        "mask": [0.0] * pad + [1.0] * n,
    }
    if old_logprobs is not None:
        if len(old_logprobs) != n:
            raise ValueError(f"old_logprobs has {len(old_logprobs)} entries for {n} tokens")
        inputs["old_logprobs"] = [0.0] * pad + list(map(float, old_logprobs))
    return Datum(
        model_input=ModelInput.from_ints([*prompt_tokens, *completion_tokens[:-1]]),
        loss_fn_inputs=_tensors(inputs),
    )


def sft_datum(prompt_tokens: Sequence[int], answer_tokens: Sequence[int]) -> Datum:
    """A supervised datum for `cross_entropy`: weight 1 on the answer tokens, 0 on the prompt."""
    if len(prompt_tokens) < 1 or len(answer_tokens) < 1:
        raise ValueError("sft_datum needs a non-empty prompt and answer")
    pad = len(prompt_tokens) - 1
    return Datum(
        model_input=ModelInput.from_ints([*prompt_tokens, *answer_tokens[:-1]]),
        loss_fn_inputs=_tensors(
            {
                "target_tokens": list(map(int, [*prompt_tokens[1:], *answer_tokens])),
                "weights": [0.0] * pad + [1.0] * len(answer_tokens),
            }
        ),
    )


def _tensors(inputs: dict[str, list[float] | list[int]]) -> dict[str, TensorData]:
    """`inputs` (fresh lists of Python ints for target_tokens, floats otherwise) wrapped as 1-D
    TensorData without another copy (`as_tensor_data` would convert every entry again)."""
    return {
        key: TensorData(
            data=values, dtype="int64" if key == "target_tokens" else "float32", shape=[len(values)]
        )
        for key, values in inputs.items()
    }


def completion_logprobs(datum: Datum, trainer_logprobs: Sequence[float]) -> list[float]:
    """The completion part of a per-position logprob list laid out like `datum`."""
    mask = datum.loss_fn_inputs["mask"].tolist()
    return [float(lp) for lp, m in zip(trainer_logprobs, mask, strict=True) if m > 0]
