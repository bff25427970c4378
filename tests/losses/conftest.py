"""A 2x2 fixture shared by the loss tests, with every number chosen so the arithmetic is short.

Active tokens (row-major) t1, t2 in sequence 0 and t3 in sequence 1; (1, 1) is masked and holds
-inf/NaN on purpose. Ratios r = exp(logp - sampler) are 1, 5, 0.5 and advantages 1, 1, -2.
"""

import math
from dataclasses import dataclass

import pytest
import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Fixture:
    logprobs: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    weights: torch.Tensor


def make_fixture(dtype: torch.dtype = torch.float64) -> Fixture:
    logp = torch.tensor([[-1.0, -0.5], [-2.0, NEG_INF]], dtype=dtype)
    log_r = torch.tensor([[0.0, math.log(5.0)], [-math.log(2.0), 0.0]], dtype=dtype)
    sampler = torch.where(torch.isfinite(logp), logp - log_r, torch.zeros((), dtype=dtype))
    return Fixture(
        logprobs=logp,
        sampler_logprobs=sampler,
        advantages=torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=dtype),
        loss_mask=torch.tensor([[True, True], [True, False]]),
        weights=torch.tensor([[1.0, 2.0], [0.5, float("nan")]], dtype=dtype),
    )


@pytest.fixture
def fx() -> Fixture:
    return make_fixture()
