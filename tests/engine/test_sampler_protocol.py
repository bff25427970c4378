"""Conformance of every `cispo.engine.sampler.Sampler` implementation to the protocol's contract.

Each test runs once per entry of `IMPLEMENTATIONS`: a factory that builds a sampler from a model
bundle (it may copy the model, move it to a device or hand it to another process). A new sampler
(vLLM, sharded) is added there and must pass everything here. The trainer side is always the
in-process `Engine`: the sampler's logprobs must be the trainer's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch

from cispo.datums import rl_datum
from cispo.engine.engine import Engine
from cispo.engine.sampler import HFSampler, Sampler, weight_fingerprint
from cispo.engine.vllm_sampler import VLLMSampler
from cispo.models import ModelBundle
from cispo.types import AdamParams, SampledSequence, SamplingParams
from tests.engine.fake_vllm import FakeLLM, FakeSamplingParams
from tests.train.helpers import random_datums, tiny_bundle


def _hf(bundle: ModelBundle) -> Sampler:
    return HFSampler(
        copy.deepcopy(bundle.model),
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
        tokenizer=bundle.tokenizer,
    )


def _vllm_fake(bundle: ModelBundle) -> Sampler:
    """`VLLMSampler` over the fake vLLM engine of tests/engine/fake_vllm.py (real vLLM: the
    `gpu` tests of tests/engine/test_vllm_sampler.py)."""
    model = copy.deepcopy(bundle.model)
    return VLLMSampler(
        FakeLLM(model, eos_token_id=bundle.tokenizer.eos_token_id),
        weight_names=model.state_dict().keys(),
        sampling_params_cls=FakeSamplingParams,
    )


IMPLEMENTATIONS: dict[str, Callable[[ModelBundle], Sampler]] = {
    "hf": _hf,
    "vllm-fake": _vllm_fake,
}

PROMPTS = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]  # mixed lengths: padding is exercised


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make(request: pytest.FixtureRequest) -> Callable[[ModelBundle], Sampler]:
    return IMPLEMENTATIONS[request.param]


def _engine(bundle: ModelBundle) -> Engine:
    return Engine(
        bundle.model,
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
        tokenizer=bundle.tokenizer,
    )


def _trainer_logprobs(
    engine: Engine, prompts: list[list[int]], groups: list[list[SampledSequence]], temp: float
) -> list[torch.Tensor]:
    """The engine's (trainer's) logprob of every sampled token, one tensor per sequence."""
    datums = [
        rl_datum(p, s.tokens, s.logprobs, 1.0)
        for p, group in zip(prompts, groups, strict=True)
        for s in group
    ]
    out = engine.forward_backward(
        datums, "importance_sampling", forward_only=True, temperature=temp
    )
    return [
        o["logprobs"].to_torch()[d.loss_fn_inputs["mask"].to_torch() > 0]
        for d, o in zip(datums, out.loss_fn_outputs, strict=True)
    ]


def test_it_implements_the_protocol(make: Callable[[ModelBundle], Sampler]) -> None:
    sampler = make(tiny_bundle())
    assert isinstance(sampler, Sampler)
    assert isinstance(sampler.version, int)


def test_sample_returns_n_sequences_per_prompt_with_one_logprob_per_token(
    make: Callable[[ModelBundle], Sampler],
) -> None:
    sampler = make(tiny_bundle())
    groups = sampler.sample(PROMPTS, 4, SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    assert len(groups) == len(PROMPTS)
    for group in groups:
        assert len(group) == 4
        for seq in group:
            assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
            assert all(x <= 0.0 and x == x for x in seq.logprobs)


def test_stop_reason_is_stop_at_a_stop_token_and_length_at_max_tokens(
    make: Callable[[ModelBundle], Sampler],
) -> None:
    bundle = tiny_bundle()
    sampler = make(bundle)
    stops = set(range(4, len(bundle.tokenizer), 3))  # a third of the vocabulary: both outcomes
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=1, stop=sorted(stops))
    seqs = [s for group in sampler.sample(PROMPTS, 8, params) for s in group]
    ends = stops | {bundle.tokenizer.eos_token_id}
    reasons = {s.stop_reason for s in seqs}
    assert reasons == {"stop", "length"}, reasons  # both seen: the checks below are not vacuous
    for s in seqs:
        assert not ends & set(s.tokens[:-1])  # nothing after the first stop token
        if s.stop_reason == "stop":
            assert s.tokens[-1] in ends
        else:
            assert len(s.tokens) == 5 and s.tokens[-1] not in ends


def test_a_seed_makes_sampling_reproducible_and_another_seed_changes_it(
    make: Callable[[ModelBundle], Sampler],
) -> None:
    sampler = make(tiny_bundle())

    def run(seed: int) -> list[tuple[list[int], list[float]]]:
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed)
        return [(s.tokens, s.logprobs) for g in sampler.sample(PROMPTS, 4, params) for s in g]

    assert run(3) == run(3)
    assert [t for t, _ in run(3)] != [t for t, _ in run(4)]


def test_a_seeded_prompts_samples_depend_on_its_stream_id_not_on_the_other_prompts(
    make: Callable[[ModelBundle], Sampler],
) -> None:
    """Prompt i's samples are a function of (weights, prompt, n, params, stream_ids[i]): the
    same as when it is sampled alone on that stream, in any batch and position; the default
    stream id is the prompt's index."""
    sampler = make(tiny_bundle())
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=6, stop=[])

    def view(groups: list[list[SampledSequence]]) -> list[list[list[int]]]:
        return [[s.tokens for s in g] for g in groups]

    batch = view(sampler.sample(PROMPTS, 3, params, [4, 0, 9]))
    for i, stream in ((0, 4), (1, 0), (2, 9)):
        assert view(sampler.sample([PROMPTS[i]], 3, params, [stream])) == [batch[i]]
    assert view(sampler.sample(PROMPTS[::-1], 3, params, [9, 0, 4])) == batch[::-1]
    assert view(sampler.sample(PROMPTS, 3, params)) == view(
        sampler.sample(PROMPTS, 3, params, [0, 1, 2])
    )
    assert view(sampler.sample([PROMPTS[0]], 3, params, [5])) != [batch[0]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_and_scored_logprobs_are_the_trainers(
    make: Callable[[ModelBundle], Sampler], temperature: float
) -> None:
    """Sampled tokens' logprobs and `compute_logprobs` of prompt + completion both equal the
    trainer's forward logprobs (log softmax(logits / T), float32) to 1e-5 per token."""
    bundle = tiny_bundle()
    sampler = make(bundle)
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=2, stop=[])
    groups = sampler.sample(PROMPTS, 4, params)
    trainer = _trainer_logprobs(_engine(bundle), PROMPTS, groups, temperature)
    sampled = [torch.tensor(s.logprobs) for g in groups for s in g]
    sequences = [p + s.tokens for p, g in zip(PROMPTS, groups, strict=True) for s in g]
    scored = sampler.compute_logprobs(sequences, temperature=temperature)
    assert sum(len(x) for x in trainer) >= 60  # many tokens, not one or two
    for t, s, c, seq in zip(trainer, sampled, scored, sequences, strict=True):
        assert len(c) == len(seq) - 1
        torch.testing.assert_close(s, t, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(c[-len(t) :]), t, atol=1e-5, rtol=0)


def test_load_weights_takes_the_trainers_weights_and_version(
    make: Callable[[ModelBundle], Sampler],
) -> None:
    bundle = tiny_bundle()
    sampler = make(bundle)
    engine = _engine(tiny_bundle())  # same seed: the sampler's weights, until the step below
    assert sampler.fingerprint() == weight_fingerprint(engine.model.state_dict())
    engine.forward_backward(random_datums(6), "cispo", {"reduction": "token_mean"})
    engine.optim_step(AdamParams(learning_rate=5e-2))
    trained = engine.model.state_dict()
    before = sampler.compute_logprobs([PROMPTS[2]])[0]
    sampler.load_weights(trained, 7)
    assert sampler.version == 7
    assert sampler.fingerprint() == weight_fingerprint(trained)  # exact copy
    after = sampler.compute_logprobs([PROMPTS[2]])[0]
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-3  # not vacuous
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, stop=[])
    groups = sampler.sample(PROMPTS, 2, params)
    seqs = [s for group in groups for s in group]
    for t, seq in zip(_trainer_logprobs(engine, PROMPTS, groups, 1.0), seqs, strict=True):
        torch.testing.assert_close(torch.tensor(seq.logprobs), t, atol=1e-5, rtol=0)


def test_load_weights_that_do_not_fit_is_an_error_that_loads_nothing(
    make: Callable[[ModelBundle], Sampler],
) -> None:
    bundle = tiny_bundle()
    sampler = make(bundle)
    fingerprint, version = sampler.fingerprint(), sampler.version
    state = {k: v + 1.0 for k, v in tiny_bundle().model.state_dict().items()}
    name = sorted(state)[-1]
    del state[name]
    with pytest.raises(ValueError, match=re.escape(name)):
        sampler.load_weights(state, version + 1)
    assert sampler.fingerprint() == fingerprint and sampler.version == version


def test_a_closed_sampler_refuses_work(make: Callable[[ModelBundle], Sampler]) -> None:
    sampler = make(tiny_bundle())
    sampler.close()
    with pytest.raises(RuntimeError):
        sampler.sample(PROMPTS, 1, SamplingParams(max_tokens=2, seed=0))
