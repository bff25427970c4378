"""Claims about `EngineConfig.adamw_impl`: for-loop, foreach and fused AdamW take the same steps."""

from __future__ import annotations

import pytest
import torch

from cispo.engine.engine import ADAMW_IMPLS, EngineConfig
from cispo.types import AdamParams
from tests.train.helpers import random_datums, tiny_engine

# Five steps of lr 1e-2 with weight decay and clipping: the implementations differ only in float
# rounding order. Measured: fused at most 1.6e-7 from for-loop, foreach bitwise equal on CPU.
# 1e-5 absolute is 1/1000 of one step's movement (lr 1e-2): a wrong formula could not pass.
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0)
STEPS = 5
ATOL = 1e-5


def _trained(impl: str | None) -> dict[str, torch.Tensor]:
    engine = tiny_engine(adamw_impl=impl)
    for step in range(STEPS):
        engine.forward_backward(random_datums(6, seed=step), "cispo", {"reduction": "token_mean"})
        engine.optim_step(ADAM)
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def test_for_loop_foreach_and_fused_adamw_give_the_same_weights_after_five_steps() -> None:
    start = {k: v.clone() for k, v in tiny_engine().model.state_dict().items()}
    results = {impl: _trained(impl) for impl in ADAMW_IMPLS}
    reference = results["for-loop"]
    moved = max(float((reference[k] - start[k]).abs().max()) for k in start)
    assert moved > 100 * ATOL, f"vacuous: the weights moved only {moved}"
    for impl, weights in results.items():
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=ATOL, msg=impl)


def test_each_impl_reaches_torchs_adamw_arguments() -> None:
    for impl, (foreach, fused) in {
        "for-loop": (False, False),
        "foreach": (True, False),
        "fused": (False, True),
    }.items():
        group = tiny_engine(adamw_impl=impl).optimizer.param_groups[0]
        assert (group["foreach"], group["fused"]) == (foreach, fused), impl


def test_loading_a_checkpoint_keeps_the_engines_own_impl() -> None:
    saved = tiny_engine(adamw_impl="for-loop")
    saved.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    saved.optim_step(ADAM)
    engine = tiny_engine(adamw_impl="fused")
    engine.load_state(saved.state())
    assert engine.optimizer.param_groups[0]["fused"] is True
    engine.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    engine.optim_step(ADAM)
    assert engine.version == 2


def test_an_unknown_impl_is_an_error_naming_the_value_and_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"adamw_impl must be one of for-loop, foreach, fused.*'fast'"
    ):
        EngineConfig(adamw_impl="fast")
