"""Validation of a forward_backward call's datums: one function, used by the engine and the server.

`validate_datums` checks everything the engine's collation and losses rely on, before any state is
touched; `Engine.forward_backward` calls it first, and the server calls the same function (through
`Engine.check`) before it queues a request, so a bad datum gets the same message in process and
over HTTP (where it is a 400). A bad datum raises `DatumError`, which names the datum index and the
field; a bad loss name or config raises the `ValueError`/`TypeError` of `make_loss_config`.

Soft targets (Tinker's cross_entropy with `target_tokens` and `weights` of shape [T, K]) are
accepted here and run as K ordinary datums (`expand_soft_targets` / `collapse_soft_targets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cispo.losses import LossConfig, make_loss_config, required_inputs
from cispo.types import Datum, TensorData

# loss_fn_inputs keys the engine reads, and the LossInputs field each feeds.
INPUT_KEYS = {
    "logprobs": "sampler_logprobs",
    "advantages": "advantages",
    "weights": "weights",
    "old_logprobs": "old_logprobs",
    "ref_logprobs": "ref_logprobs",
    "mask": "mask",
}


class DatumError(ValueError):
    """A datum (or the list of datums) the engine cannot train on. `index` is the datum's
    position in the call (None when the call as a whole is wrong), `field` what is wrong
    ("model_input", "loss_fn_inputs['weights']", ...). The server answers 400 with its message."""

    def __init__(self, message: str, *, index: int | None, field: str) -> None:
        super().__init__(message if index is None else f"datum {index}: {message}")
        self.index = index
        self.field = field


def context_length(model: nn.Module) -> int | None:
    """The model's `max_position_embeddings` (peft wrappers forward `.config`); None if absent."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else None


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output embedding: token ids must be in [0, vocab_size)."""
    return int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]


def _shape(tensor: TensorData) -> list[int]:
    return [int(x) for x in tensor.shape or [len(tensor.data)]]


def validate_datums(
    datums: Sequence[Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, Any] | None,
    *,
    vocab_size: int,
    max_context_length: int | None,
) -> LossConfig:
    """Refuse, naming the datum and the field, anything the engine cannot train on; returns the
    loss config. Checked: the loss name and config; at least one datum; per datum a non-empty
    `model_input` within `max_context_length`; `target_tokens` present, one per model_input
    position ([T]) or soft targets ([T, K], cross_entropy only, with `weights` of the same shape
    and no other input); every token id in [0, vocab_size); every other `loss_fn_inputs` tensor
    one entry per position; the inputs the loss reads (`cispo.losses.required_inputs`); the same
    `loss_fn_inputs` keys on every datum."""
    config = make_loss_config(loss_fn, loss_fn_config)
    if not datums:
        raise DatumError("forward_backward needs at least one datum", index=None, field="datums")
    need = required_inputs(config)
    need.pop("entropy", None)  # computed by the engine
    keys0: set[str] = set(datums[0].loss_fn_inputs)
    # Per set of keys (one in a valid call): the per-position inputs besides the targets, and
    # the inputs the loss needs that it lacks; worked out once, not once per datum.
    by_keys: dict[frozenset[str], tuple[list[str], list[str]]] = {}
    for i, datum in enumerate(datums):
        inputs = datum.loss_fn_inputs
        n = datum.model_input.length
        if n == 0:
            raise DatumError("model_input is empty", index=i, field="model_input")
        if max_context_length is not None and n > max_context_length:
            raise DatumError(
                f"{n} tokens exceed max_context_length={max_context_length} of this model",
                index=i,
                field="model_input",
            )
        if "target_tokens" not in inputs:
            raise DatumError(
                "loss_fn_inputs needs 'target_tokens'", index=i, field="loss_fn_inputs"
            )
        shape = _shape(inputs["target_tokens"])
        if len(shape) > 1:
            _check_soft_targets(i, loss_fn, n, inputs)
        elif shape[0] != n:
            raise DatumError(
                f"target_tokens has {shape[0]} entries, model_input has {n}",
                index=i,
                field="loss_fn_inputs['target_tokens']",
            )
        chunks = datum.model_input.chunks
        for name, ids in (
            ("model_input", chunks[0].tokens if len(chunks) == 1 else datum.model_input.to_ints()),
            ("loss_fn_inputs['target_tokens']", inputs["target_tokens"].data),
        ):
            if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                bad = next(t for t in ids if not 0 <= t < vocab_size)
                raise DatumError(
                    f"token ids must be in [0, {vocab_size}); {name} has {bad}",
                    index=i,
                    field=name,
                )
        width = shape[1] if len(shape) > 1 else 1
        keys = frozenset(inputs)
        if keys not in by_keys:
            present = {INPUT_KEYS[k] for k in keys & INPUT_KEYS.keys()}
            by_keys[keys] = (
                sorted(keys - {"target_tokens"}),
                [f"{name} ({why})" for name, why in need.items() if name not in present],
            )
        others, missing = by_keys[keys]
        for key in others:
            if len(inputs[key].data) != n * width:
                raise DatumError(
                    f"loss_fn_inputs[{key!r}] has {len(inputs[key].data)} entries, expected "
                    f"{n * width} (one per model_input position"
                    f"{f', times K={width}' if width > 1 else ''})",
                    index=i,
                    field=f"loss_fn_inputs[{key!r}]",
                )
        if missing:
            hint = (
                " ('sampler_logprobs' is the 'logprobs' key)"
                if any(m.startswith("sampler_logprobs") for m in missing)
                else ""
            )
            raise DatumError(
                f"loss_fn={loss_fn!r} needs loss_fn_inputs {missing}{hint}",
                index=i,
                field="loss_fn_inputs",
            )
        if keys != keys0:
            raise DatumError(
                f"loss_fn_inputs keys {sorted(inputs)} differ from datum 0's {sorted(keys0)}: "
                "all datums in one call must carry the same loss_fn_inputs keys",
                index=i,
                field="loss_fn_inputs",
            )
    return config


def _check_soft_targets(i: int, loss_fn: str, n: int, inputs: Mapping[str, TensorData]) -> None:
    """Soft targets: target_tokens and weights both [T, K], cross_entropy only."""
    shape = _shape(inputs["target_tokens"])
    extra = sorted(set(inputs) - {"target_tokens", "weights"})
    weights = inputs.get("weights")
    if (
        loss_fn != "cross_entropy"
        or len(shape) != 2
        or shape[0] != n
        or shape[1] < 1
        or weights is None
        or _shape(weights) != shape
        or extra
    ):
        raise DatumError(
            f"target_tokens of shape {shape} (soft targets) need loss_fn="
            f"'cross_entropy', shape [{n}, K] with K >= 1, weights of the same shape, and no "
            f"other loss_fn_inputs; got loss_fn={loss_fn!r}, weights shape "
            f"{None if weights is None else weights.shape}, other keys {extra}",
            index=i,
            field="loss_fn_inputs['target_tokens']",
        )


def _width(targets: TensorData) -> int:
    """K of soft targets (target_tokens [T, K]); 0 for ordinary [T] targets."""
    shape = _shape(targets)
    return shape[1] if len(shape) == 2 else 0


def expand_soft_targets(datums: Sequence[Datum]) -> tuple[list[Datum], list[int]]:
    """Soft-target datums (target_tokens and weights [T, K]) as K ordinary ones, column k each.

    Under cross_entropy's sum reduction, -Σ_t Σ_k w[t,k]·log p(tok[t,k] | prefix_t) is exactly the
    sum of the K column datums' losses, so the engine needs no second code path (it runs the
    prefix K times; the cost of keeping one path). Returns the datums and each input datum's K
    (0 for an ordinary datum).
    """
    out: list[Datum] = []
    widths: list[int] = []
    for datum in datums:
        k = _width(datum.loss_fn_inputs["target_tokens"])
        widths.append(k)
        if not k:
            out.append(datum)
            continue
        tokens = datum.loss_fn_inputs["target_tokens"].data
        weights = datum.loss_fn_inputs["weights"].data
        for j in range(k):
            column = {
                "target_tokens": TensorData(data=list(tokens[j::k]), dtype="int64"),
                "weights": TensorData(data=list(weights[j::k]), dtype="float32"),
            }
            out.append(Datum(model_input=datum.model_input, loss_fn_inputs=column))
    return out, widths


def collapse_soft_targets(
    outputs: list[dict[str, TensorData]], widths: list[int]
) -> list[dict[str, TensorData]]:
    """Inverse of `expand_soft_targets` on the engine's per-datum outputs: [T, K] per soft datum."""
    result: list[dict[str, TensorData]] = []
    at = 0
    for k in widths:
        if not k:
            result.append(outputs[at])
            at += 1
            continue
        columns = outputs[at : at + k]
        at += k
        merged = {}
        for name in columns[0]:
            stacked = torch.stack([c[name].to_torch() for c in columns], dim=1)  # [T, K]
            merged[name] = TensorData.from_torch(stacked)
        result.append(merged)
    return result
