"""Claims about the per-step hot path: building datums, collating them for the engine and
counting their loss tokens run no Python loop over tokens (their Python work grows with the
number of datums, not with their lengths)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from cispo.datums import rl_datum, sft_datum
from cispo.engine.engine import _collate, loss_totals
from cispo.rollout.rollouts import output_logprobs
from cispo.types import TensorData
from tests.train.helpers import random_datums, tiny_engine

DATUMS = 8


def _cispo_lines(fn: Callable[[], Any]) -> int:
    """Python lines executed inside the cispo package while `fn` runs (every iteration of a
    Python loop or comprehension is at least one)."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if "/cispo/" not in frame.f_code.co_filename:
            return None  # torch, transformers, the test: not traced line by line
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def _datums(completion: int) -> list[Any]:
    return [
        rl_datum(
            list(range(1, 6 + i % 3)),
            [7] * completion,
            [-0.5] * completion,
            0.5 - i % 2,
            old_logprobs=[-0.4] * completion,
        )
        for i in range(DATUMS)
    ]


def test_building_an_rl_datum_runs_no_python_loop_over_its_tokens() -> None:
    short = _cispo_lines(
        lambda: rl_datum([1, 2, 3], [7] * 4, [-0.5] * 4, 1.0, old_logprobs=[-0.5] * 4)
    )
    long = _cispo_lines(
        lambda: rl_datum([1, 2, 3], [7] * 400, [-0.5] * 400, 1.0, old_logprobs=[-0.5] * 400)
    )
    assert short > 0, "vacuous: the tracer saw no line of rl_datum"
    assert long == short
    assert _cispo_lines(lambda: sft_datum([1, 2, 3], [7] * 400)) == _cispo_lines(
        lambda: sft_datum([1, 2, 3], [7] * 4)
    )


def test_collating_datums_runs_no_python_loop_over_their_tokens() -> None:
    short, long = _datums(4), _datums(400)
    lines = _cispo_lines(lambda: _collate(short))
    assert lines > DATUMS, "vacuous: the tracer saw no per-datum work in _collate"
    assert _cispo_lines(lambda: _collate(long)) == lines


def test_counting_loss_tokens_runs_no_python_loop_over_tokens() -> None:
    short, long = _datums(4), _datums(400)
    assert _cispo_lines(lambda: loss_totals(long)) == _cispo_lines(lambda: loss_totals(short))
    assert loss_totals(long) == (400.0 * DATUMS, float(DATUMS))


def test_output_logprobs_runs_no_python_loop_over_tokens() -> None:
    def outputs(n: int) -> list[dict[str, TensorData]]:
        return [{"logprobs": TensorData.from_torch(torch.full((n,), -0.5))}] * DATUMS

    short, long = outputs(4), outputs(400)
    assert _cispo_lines(lambda: output_logprobs(long)) == _cispo_lines(
        lambda: output_logprobs(short)
    )
    assert output_logprobs(short) == [[-0.5] * 4] * DATUMS


def test_collate_still_pads_and_masks_like_the_datums_say() -> None:
    datums = _datums(3)
    batch = _collate(datums)
    for i, datum in enumerate(datums):
        n = datum.model_input.length
        assert batch.lengths[i] == n
        assert batch.input_ids[i, :n].tolist() == datum.model_input.to_ints()
        assert not bool(batch.attention_mask[i, n:].any())
        assert batch.targets[i, :n].tolist() == datum.loss_fn_inputs["target_tokens"].data
        want_mask = [x > 0 for x in datum.loss_fn_inputs["mask"].data]
        assert batch.loss_mask[i, :n].tolist() == want_mask
        for key in ("logprobs", "advantages", "old_logprobs"):
            want = torch.tensor(datum.loss_fn_inputs[key].data, dtype=torch.float32)
            assert torch.equal(batch.fields[key][i, :n], want), key
            assert not bool(batch.fields[key][i, n:].any())


class _TorchCalls(TorchFunctionMode):
    """Counts torch functions and Tensor methods called from Python while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _torch_calls(datums: list[Any], **config: Any) -> int:
    """Torch calls of one forward_backward on a fresh engine (a second call on the same engine
    would also add to the gradients the first left)."""
    engine = tiny_engine(micro_batch_size=64, **config)
    assert engine.config.shared_prefix == config.get("shared_prefix", True)
    with _TorchCalls() as calls:
        out = engine.forward_backward(datums, "cispo", {"reduction": "token_mean"})
    assert len(out.loss_fn_outputs) == len(datums)
    return calls.count


def _groups(group_size: int) -> list[Any]:
    """Two prompts, each with `group_size` completions of the same lengths whatever the size."""
    datums = []
    for g, prompt in enumerate(([5, 6, 7], [8, 9])):
        for j in range(group_size):
            n = 1 + j % 2  # completion lengths 1, 2, 1, 2, ...: same padding for every size
            datums.append(rl_datum(prompt, [10 + g] * n, [-0.5] * n, 1.0 - 2 * (j % 2)))
    return datums


def test_forward_backward_runs_no_torch_call_per_datum_on_padded_rows() -> None:
    """The model, the loss, the metrics and the per-datum output logprobs cost the same number
    of torch calls for 4 datums as for 12 in one micro-batch: the outputs are one tensor-to-list
    conversion per micro-batch, sliced per datum in Python."""
    few = _torch_calls(random_datums(4), shared_prefix=False)
    assert few > 10, "vacuous: the counter saw no torch call"
    assert _torch_calls(random_datums(4) * 3, shared_prefix=False) == few  # same widths, 3×


def test_shared_prefix_forward_backward_runs_no_torch_call_per_datum_of_a_group() -> None:
    """With the shared-prefix path (the default) the work per call grows with the number of
    groups (each is packed into its own row), not with the datums in a group: two groups of 2
    and two groups of 8 cost the same number of torch calls."""
    few = _torch_calls(_groups(2))
    assert few > 10, "vacuous: the counter saw no torch call"
    assert _torch_calls(_groups(8)) == few
