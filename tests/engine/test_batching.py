"""Claims about `cispo.engine.batching.run_sample_batches`, the one batching of pending sample
requests (the client's `SamplingClient.flush` and the server's sampling thread both call it)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cispo.engine.batching import SampleRequest, run_sample_batches
from cispo.engine.sampler import HFSampler
from cispo.types import SampledSequence, SamplingParams
from tests.train.helpers import tiny_bundle

PROMPTS = [[1, 20, 21], [1, 22], [1, 23, 24, 25]]


class Recording(HFSampler):
    """An HFSampler that records each `sample` call and fails on a chosen prompt."""

    def __init__(self, *args: Any, fail_on: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[list[int]], int, SamplingParams]] = []
        self.fail_on = fail_on

    def sample(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams
    ) -> list[list[SampledSequence]]:
        self.calls.append((prompts, num_samples, params))
        if self.fail_on in prompts:
            raise ValueError("this batch fails")
        return super().sample(prompts, num_samples, params)


@pytest.fixture(scope="module")
def bundle() -> Any:
    return tiny_bundle()


def _sampler(bundle: Any, **kwargs: Any) -> Recording:
    return Recording(
        copy.deepcopy(bundle.model),
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
        **kwargs,
    )


def test_compatible_requests_run_as_one_sample_call_per_group_in_arrival_order(
    bundle: Any,
) -> None:
    """Same sampler, num_samples and params: one call (whose result is the direct call's); a
    different params, num_samples or sampler: its own call. Results go back to their waiters."""
    a, b = _sampler(bundle), _sampler(bundle)
    p1 = SamplingParams(max_tokens=4, seed=3)
    p2 = SamplingParams(max_tokens=4, seed=3, stop=[7])
    requests = [
        SampleRequest(a, PROMPTS[0], 2, p1),
        SampleRequest(a, PROMPTS[1], 2, p2),
        SampleRequest(a, PROMPTS[2], 2, p1),
        SampleRequest(b, PROMPTS[1], 2, p1),
        SampleRequest(a, PROMPTS[1], 3, p1),
    ]
    got: dict[int, list[SampledSequence]] = {}
    run_sample_batches(
        [(r, i) for i, r in enumerate(requests)],
        lambda i, seqs: got.__setitem__(i, seqs),
        lambda i, error: pytest.fail(f"request {i} failed: {error}"),
    )
    assert [(c[0], c[1]) for c in a.calls] == [
        ([PROMPTS[0], PROMPTS[2]], 2),
        ([PROMPTS[1]], 2),
        ([PROMPTS[1]], 3),
    ]
    assert [(c[0], c[1]) for c in b.calls] == [([PROMPTS[1]], 2)]
    direct = _sampler(bundle).sample([PROMPTS[0], PROMPTS[2]], 2, p1)
    assert [s.tokens for s in got[0]] == [s.tokens for s in direct[0]]
    assert [s.tokens for s in got[2]] == [s.tokens for s in direct[1]]
    assert sorted(got) == [0, 1, 2, 3, 4] and all(len(got[i]) == 2 for i in range(4))
    assert len(got[4]) == 3


def test_a_failing_group_fails_each_of_its_waiters_and_the_other_groups_still_run(
    bundle: Any,
) -> None:
    sampler = _sampler(bundle, fail_on=PROMPTS[1])
    good, bad = SamplingParams(max_tokens=3, seed=1), SamplingParams(max_tokens=3, seed=2)
    requests = [
        SampleRequest(sampler, PROMPTS[1], 1, bad),
        SampleRequest(sampler, PROMPTS[0], 1, good),
        SampleRequest(sampler, PROMPTS[2], 1, bad),
    ]
    delivered: list[int] = []
    failed: dict[int, str] = {}
    run_sample_batches(
        [(r, i) for i, r in enumerate(requests)],
        lambda i, seqs: delivered.append(i),
        lambda i, error: failed.__setitem__(i, str(error)),
    )
    assert delivered == [1]
    assert failed == {0: "this batch fails", 2: "this batch fails"}


def test_a_waiter_whose_delivery_fails_gets_its_error_and_the_others_their_samples(
    bundle: Any,
) -> None:
    sampler = _sampler(bundle)
    params = SamplingParams(max_tokens=3, seed=1)
    failed: dict[int, str] = {}
    delivered: list[int] = []

    def deliver(i: int, seqs: list[SampledSequence]) -> None:
        if i == 0:
            raise RuntimeError("encoding failed")
        delivered.append(i)

    run_sample_batches(
        [(SampleRequest(sampler, p, 1, params), i) for i, p in enumerate(PROMPTS)],
        deliver,
        lambda i, error: failed.__setitem__(i, str(error)),
    )
    assert len(sampler.calls) == 1 and delivered == [1, 2]
    assert failed == {0: "encoding failed"}
