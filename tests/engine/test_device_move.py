"""The engine collates micro-batches on the CPU; the model's inputs and the loss's inputs must
reach the model's device (an accelerator under torchrun with NCCL, or one process on CUDA).

No GPU here: the model's device is reported as "meta" (a device that is not the CPU), the scoring
returns logprobs on it, and the loss records where its inputs are. What runs on a real GPU is left
to a GPU run (docs/distributed.md, "Only on accelerators").
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cispo.engine import engine as engine_module
from cispo.ops import FusedLogprobOutput
from tests.train.helpers import random_datums, tiny_engine

META = torch.device("meta")


class _Recorded(Exception):
    """Stops the call once the loss has seen its inputs."""


def test_micro_batch_and_loss_inputs_reach_the_models_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = tiny_engine(micro_batch_size=2)
    seen: dict[str, torch.device] = {}

    def scores(*args: torch.Tensor, **kwargs: Any) -> FusedLogprobOutput:
        for name, tensor in zip(
            ("input_ids", "attention_mask", "targets", "loss_mask"), args[:4], strict=True
        ):
            seen[f"model/{name}"] = tensor.device
        return FusedLogprobOutput(logprobs=torch.zeros(args[0].shape, device=META), entropy=None)

    def loss(inputs: Any, config: Any, **kwargs: Any) -> Any:
        for name in ("logprobs", "loss_mask", "advantages", "sampler_logprobs", "old_logprobs"):
            seen[f"loss/{name}"] = getattr(inputs, name).device
        raise _Recorded

    monkeypatch.setattr(engine_module, "_model_device", lambda model: META)
    monkeypatch.setattr(engine, "_token_logprobs", scores)
    monkeypatch.setattr(engine_module, "compute_loss", loss)
    with pytest.raises(_Recorded):
        engine.forward_backward(random_datums(5, seed=1), "cispo", {"reduction": "token_mean"})
    assert len(seen) == 9, sorted(seen)  # 4 model inputs, 5 loss inputs, each present
    assert {name: str(d) for name, d in seen.items() if d != META} == {}


def test_on_the_cpu_the_move_returns_the_batch_itself() -> None:
    batch = engine_module._collate(random_datums(3, seed=2))
    assert engine_module._to_device(batch, torch.device("cpu")) is batch
    assert engine_module._model_device(tiny_engine().model) == torch.device("cpu")
