"""Claims about the engine's one datum check (`cispo.engine.validation.validate_datums`): every
class of bad datum raises `DatumError` naming the datum index and the field, before the engine
touches any state. tests/server/test_same_refusal.py sends the same cases through the server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from cispo.engine import DatumError, Engine
from cispo.engine.validation import context_length, vocab_size
from cispo.types import Datum, ModelInput
from tests.train.helpers import grads, tiny_engine

IDS = [5, 6, 7, 8, 9]  # model_input; targets are IDS shifted by one
N = len(IDS)


def _ok(**extra: Any) -> dict[str, Any]:
    """A valid cross_entropy datum spec: model_input ids and loss_fn_inputs (tensors)."""
    return {"ids": IDS, "target_tokens": torch.tensor([*IDS[1:], 10]), **extra}


def _soft(**extra: Any) -> dict[str, Any]:
    """Soft targets [T, 2] with weights [T, 2]."""
    pairs = torch.tensor([[t, t + 1] for t in IDS])
    return {"ids": IDS, "target_tokens": pairs, "weights": torch.full((N, 2), 0.5), **extra}


def _rl(**extra: Any) -> dict[str, Any]:
    return _ok(logprobs=torch.full((N,), -1.0), advantages=torch.ones(N), **extra)


@dataclass(frozen=True)
class Refusal:
    name: str
    build: Callable[[int, int], list[dict[str, Any]]]
    """(vocab size, max context length) -> datum specs; the bad one is the last."""
    loss_fn: str
    index: int | None
    field: str
    message: str
    """A fragment of the message (a regex)."""


REFUSALS = [
    Refusal("no_datums", lambda v, c: [], "cross_entropy", None, "datums", "at least one datum"),
    Refusal(
        "empty_model_input",
        lambda v, c: [_ok(), {"ids": [], "target_tokens": torch.zeros(0, dtype=torch.long)}],
        "cross_entropy",
        1,
        "model_input",
        "model_input is empty",
    ),
    Refusal(
        "over_max_context_length",
        lambda v, c: [_ok(), _ok(ids=[5] * (c + 1), target_tokens=torch.full((c + 1,), 5))],
        "cross_entropy",
        1,
        "model_input",
        r"1025 tokens exceed max_context_length=1024",
    ),
    Refusal(
        "no_target_tokens",
        lambda v, c: [{"ids": IDS, "weights": torch.ones(N)}],
        "cross_entropy",
        0,
        "loss_fn_inputs",
        "needs 'target_tokens'",
    ),
    Refusal(
        "target_tokens_length",
        lambda v, c: [_ok(), _ok(target_tokens=torch.tensor(IDS[:3]))],
        "cross_entropy",
        1,
        "loss_fn_inputs['target_tokens']",
        "target_tokens has 3 entries, model_input has 5",
    ),
    Refusal(
        "model_input_out_of_vocab",
        lambda v, c: [_ok(), _ok(ids=[5, 6, v + 3, 8, 9])],
        "cross_entropy",
        1,
        "model_input",
        r"token ids must be in \[0, \d+\); model_input has \d+",
    ),
    Refusal(
        "target_out_of_vocab",
        lambda v, c: [_ok(), _ok(target_tokens=torch.tensor([6, 7, 8, 9, v]))],
        "cross_entropy",
        1,
        "loss_fn_inputs['target_tokens']",
        r"token ids must be in \[0, \d+\); loss_fn_inputs\['target_tokens'\] has \d+",
    ),
    Refusal(
        "negative_target",
        lambda v, c: [_ok(target_tokens=torch.tensor([6, 7, -1, 9, 10]))],
        "cross_entropy",
        0,
        "loss_fn_inputs['target_tokens']",
        r"has -1",
    ),
    Refusal(
        "weights_length",
        lambda v, c: [_ok(weights=torch.ones(N)), _ok(weights=torch.ones(N - 1))],
        "cross_entropy",
        1,
        "loss_fn_inputs['weights']",
        r"loss_fn_inputs\['weights'\] has 4 entries, expected 5",
    ),
    Refusal(
        "mask_length",
        lambda v, c: [_rl(mask=torch.ones(N + 2))],
        "importance_sampling",
        0,
        "loss_fn_inputs['mask']",
        r"loss_fn_inputs\['mask'\] has 7 entries, expected 5",
    ),
    Refusal(
        "missing_advantages",
        lambda v, c: [_rl(), _ok(logprobs=torch.full((N,), -1.0))],
        "importance_sampling",
        1,
        "loss_fn_inputs",
        r"loss_fn='importance_sampling' needs loss_fn_inputs \[.advantages",
    ),
    Refusal(
        "missing_sampler_logprobs",
        lambda v, c: [_ok(advantages=torch.ones(N))],
        "importance_sampling",
        0,
        "loss_fn_inputs",
        r"sampler_logprobs.*is the 'logprobs' key",
    ),
    Refusal(
        "keys_differ",
        lambda v, c: [_ok(weights=torch.ones(N)), _ok()],
        "cross_entropy",
        1,
        "loss_fn_inputs",
        "all datums in one call must carry the same loss_fn_inputs keys",
    ),
    Refusal(
        "soft_targets_with_another_loss",
        lambda v, c: [_soft(advantages=torch.ones(N, 2), logprobs=torch.zeros(N, 2))],
        "importance_sampling",
        0,
        "loss_fn_inputs['target_tokens']",
        r"soft targets.*loss_fn='importance_sampling'",
    ),
    Refusal(
        "soft_targets_without_matching_weights",
        lambda v, c: [_soft(), _soft(weights=torch.ones(N, 3))],
        "cross_entropy",
        1,
        "loss_fn_inputs['target_tokens']",
        r"soft targets.*weights shape \[5, 3\]",
    ),
    Refusal(
        "soft_targets_with_a_mask",
        lambda v, c: [_soft(mask=torch.ones(N, 2))],
        "cross_entropy",
        0,
        "loss_fn_inputs['target_tokens']",
        r"soft targets.*other keys \['mask'\]",
    ),
]


def datums_of(specs: list[dict[str, Any]]) -> list[Datum]:
    return [
        Datum(
            model_input=ModelInput.from_ints(list(spec["ids"])),
            loss_fn_inputs={k: v for k, v in spec.items() if k != "ids"},
        )
        for spec in specs
    ]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def test_the_tiny_model_has_the_limits_the_cases_are_built_for(engine: Engine) -> None:
    assert context_length(engine.model) == 1024
    assert 11 < vocab_size(engine.model) < 1000


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.name)
def test_each_bad_datum_raises_datum_error_naming_its_index_and_field_and_changes_nothing(
    engine: Engine, case: Refusal
) -> None:
    """forward_backward refuses the datums with DatumError (index, field, message) and leaves the
    gradients accumulated before the call, the RNG and the train/eval mode as they were;
    Engine.check, what the server runs before queueing, raises the very same error."""
    engine.model.zero_grad(set_to_none=True)
    engine.forward_backward(datums_of([_ok()]), "cross_entropy")
    before, rng = grads(engine), torch.get_rng_state()
    assert before, "the valid call accumulated no gradient"
    engine.model.eval()
    datums = datums_of(case.build(vocab_size(engine.model), context_length(engine.model) or 0))
    with pytest.raises(DatumError, match=case.message) as raised:
        engine.forward_backward(datums, case.loss_fn)
    assert (raised.value.index, raised.value.field) == (case.index, case.field)
    prefix = "" if case.index is None else f"datum {case.index}: "
    assert str(raised.value).startswith(prefix), str(raised.value)
    with pytest.raises(DatumError) as checked:
        engine.check(datums, case.loss_fn)
    assert str(checked.value) == str(raised.value)
    after = grads(engine)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng) and not engine.model.training


def test_a_bad_loss_config_is_a_value_error_but_not_a_datum_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match="bogus") as raised:
        engine.forward_backward(datums_of([_rl()]), "cispo", {"bogus": 1.0})
    assert not isinstance(raised.value, DatumError)


def test_soft_targets_in_process_equal_the_sum_of_their_columns(engine: Engine) -> None:
    """The engine takes soft targets [T, K] itself: logprobs come back [T, K], column k equal to
    the ordinary datum with target_tokens[:, k], and the loss is the sum of the columns'."""
    soft = _soft(weights=torch.tensor([[0.25, 0.75]] * N))
    out = engine.forward_backward(datums_of([soft]), "cross_entropy", forward_only=True)
    logprobs = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert logprobs.shape == (N, 2)
    total = 0.0
    for k in range(2):
        column = {
            "ids": IDS,
            "target_tokens": soft["target_tokens"][:, k],
            "weights": soft["weights"][:, k],
        }
        one = engine.forward_backward(datums_of([column]), "cross_entropy", forward_only=True)
        torch.testing.assert_close(logprobs[:, k], one.loss_fn_outputs[0]["logprobs"].to_torch())
        total += one.metrics["loss:sum"]
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
