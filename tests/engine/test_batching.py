"""Claims about `cispo.engine.batching.run_sample_batches`, the one batching of pending sample
requests (the client's `SamplingClient.flush` and the server's sampling thread both call it)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
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
        self.streams: list[list[int] | None] = []
        self.fail_on = fail_on

    def sample(
        self,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        stream_ids: Sequence[int] | None = None,
    ) -> list[list[SampledSequence]]:
        self.calls.append((prompts, num_samples, params))
        self.streams.append(None if stream_ids is None else list(stream_ids))
        if self.fail_on in prompts:
            raise ValueError("this batch fails")
        return super().sample(prompts, num_samples, params, stream_ids)


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
    # A seeded request runs on stream 0: its samples are those of the prompt sampled alone.
    assert a.streams[0] == [0, 0]
    direct = _sampler(bundle).sample([PROMPTS[0], PROMPTS[2]], 2, p1, [0, 0])
    assert [s.tokens for s in got[0]] == [s.tokens for s in direct[0]]
    assert [s.tokens for s in got[2]] == [s.tokens for s in direct[1]]
    (alone,) = _sampler(bundle).sample([PROMPTS[2]], 2, p1)
    assert [s.tokens for s in got[2]] == [s.tokens for s in alone]
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


def _run(requests: list[SampleRequest]) -> list[list[SampledSequence]]:
    got: dict[int, list[SampledSequence]] = {}
    run_sample_batches(
        [(r, i) for i, r in enumerate(requests)],
        lambda i, seqs: got.__setitem__(i, seqs),
        lambda i, error: pytest.fail(f"request {i} failed: {error}"),
    )
    return [got[i] for i in range(len(requests))]


def _view(seqs: list[SampledSequence]) -> list[tuple[list[int], str]]:
    return [(s.tokens, s.stop_reason) for s in seqs]


def test_a_seeded_requests_samples_do_not_depend_on_what_it_is_batched_with_or_the_order(
    bundle: Any,
) -> None:
    sampler = _sampler(bundle)
    params = SamplingParams(max_tokens=6, seed=11, temperature=1.0)
    (alone,) = _run([SampleRequest(sampler, PROMPTS[1], 3, params)])
    mixed = _run([SampleRequest(sampler, p, 3, params) for p in (PROMPTS[0], PROMPTS[1])])
    reordered = _run([SampleRequest(sampler, p, 3, params) for p in reversed(PROMPTS)])
    assert len(sampler.calls) == 3 and len(sampler.calls[2][0]) == 3  # batched, not one by one
    for other in (mixed[1], reordered[1]):
        assert _view(other) == _view(alone)
        for a, b in zip(other, alone, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(s.tokens) for s in alone}) > 1, "the group's samples are all the same"
    # Another stream id (in-process callers only) gives other samples for the same request.
    (other_stream,) = _run([SampleRequest(sampler, PROMPTS[1], 3, params, stream_id=7)])
    assert _view(other_stream) != _view(alone)


def test_unseeded_requests_for_the_same_prompt_in_one_batch_get_different_samples(
    bundle: Any,
) -> None:
    sampler = _sampler(bundle)
    params = SamplingParams(max_tokens=8, temperature=1.0)
    first, second = _run([SampleRequest(sampler, PROMPTS[0], 2, params) for _ in range(2)])
    assert len(sampler.calls) == 1 and sampler.streams == [None]
    assert _view(first) != _view(second)
