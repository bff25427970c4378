"""Claims about `Engine.sampler()`'s copy-on-write sharing of the trainer's weights."""

from __future__ import annotations

import copy
import threading
from dataclasses import replace
from pathlib import Path

import torch

from cispo.client import AdamParams, ModelInput, ServiceClient
from cispo.config import RLConfig, SamplingConfig, TaskConfig, TrainConfig
from cispo.engine.sampler import HFSampler
from cispo.rollout.source import InProcessSource
from cispo.tasks import ArithmeticTask, Problem
from cispo.train.update import train_on_rollout
from cispo.types import SamplingParams
from tests.train.helpers import SMALL, random_datums, tiny_engine

PROMPTS = [[1, 20, 21], [1, 22], [1, 23, 24, 25]]
PARAMS = SamplingParams(max_tokens=6, temperature=1.0, seed=5)
ADAM = AdamParams(learning_rate=5e-2)


def _step(engine) -> None:  # type: ignore[no-untyped-def]
    engine.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    engine.optim_step(ADAM)


def test_sampling_then_training_copies_no_weights_and_the_step_still_moves_them() -> None:
    engine = tiny_engine()
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for _ in range(3):
        sampler = engine.sampler()
        assert sampler.model is engine.model  # it reads the trainer's own parameters
        assert sampler.sample(PROMPTS, 2, PARAMS)[0][0].tokens
        del sampler  # the synchronous loop drops its sampler before it trains
        _step(engine)
    assert engine.version == 3
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
    assert engine.sampler_copies == 0


def test_a_held_sampler_keeps_its_versions_weights_through_a_step_with_one_copy() -> None:
    engine = tiny_engine()
    held = engine.sampler()
    before = held.compute_logprobs(PROMPTS)
    samples = held.sample(PROMPTS, 2, PARAMS)
    _step(engine)
    assert engine.sampler_copies == 1
    assert held.version == 0 and held.model is not engine.model
    assert held.compute_logprobs(PROMPTS) == before
    assert [[s.tokens for s in g] for g in held.sample(PROMPTS, 2, PARAMS)] == [
        [s.tokens for s in g] for g in samples
    ]
    fresh = engine.sampler()
    assert fresh.version == 1 and fresh.compute_logprobs(PROMPTS) != before
    _step(engine)  # `held` is detached already: only `fresh` needs a copy now
    assert engine.sampler_copies == 2


def test_shared_sampling_equals_sampling_from_a_frozen_copy() -> None:
    engine = tiny_engine()
    _step(engine)
    frozen = HFSampler(
        copy.deepcopy(engine.model),
        eos_token_id=engine.eos_token_id,
        pad_token_id=engine.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    shared = engine.sampler()
    want, got = frozen.sample(PROMPTS, 3, PARAMS), shared.sample(PROMPTS, 3, PARAMS)
    # Bitwise: the async worker samples from a frozen copy, and lag 0 of the async loop must
    # reproduce the synchronous run exactly (tests/train/test_async.py).
    assert [[s.tokens for s in g] for g in got] == [[s.tokens for s in g] for g in want]
    assert [[s.logprobs for s in g] for g in got] == [[s.logprobs for s in g] for g in want]
    assert shared.compute_logprobs(PROMPTS) == frozen.compute_logprobs(PROMPTS)


def test_shared_sampling_leaves_the_trainers_mode_and_trainable_parameters_alone() -> None:
    engine = tiny_engine()
    engine.model.train()
    engine.sampler().sample(PROMPTS, 2, PARAMS)
    assert engine.model.training and all(m.training for m in engine.model.modules())
    assert all(p.requires_grad for p in engine.model.parameters())
    assert all(p.grad is None for p in engine.model.parameters())  # sampling ran under no_grad


def test_load_weights_on_a_shared_sampler_leaves_the_trainer_untouched() -> None:
    engine = tiny_engine()
    trainer = {k: v.clone() for k, v in engine.model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in trainer.items()}
    sampler = engine.sampler()
    sampler.load_weights(zeros, 9)
    assert sampler.version == 9 and sampler.model is not engine.model
    assert all(torch.equal(v, trainer[k]) for k, v in engine.model.state_dict().items())
    assert all(float(v.abs().sum()) == 0 for v in sampler.model.state_dict().values())


def test_load_state_gives_a_held_sampler_its_copy_first() -> None:
    engine = tiny_engine()
    state = engine.state()
    _step(engine)
    held = engine.sampler()
    before = held.compute_logprobs(PROMPTS)
    engine.load_state(state)
    assert held.compute_logprobs(PROMPTS) == before
    assert engine.sampler().compute_logprobs(PROMPTS) != before


class _LengthTask(ArithmeticTask):
    """Rewards completions of even length: an untrained model gets a reward spread."""

    def score(self, problem: Problem, completion: str) -> float:
        return float(len(completion) % 2 == 0)


def test_the_synchronous_loop_trains_without_copying_the_model(tmp_path: Path) -> None:
    """Three rounds of the in-process source + `train_on_rollout` (the loop's lag-0 path): every
    step trains (datums > 0, weights move) and no sampler copy is ever made."""
    config = TrainConfig(
        task=TaskConfig(digits=1, ops="+"),
        sampling=SamplingConfig(temperature=1.0, max_tokens=4),
        rl=RLConfig(prompts_per_step=8, group_size=4, micro_batch_size=32),
    )
    config = replace(config, optim=replace(config.optim, learning_rate=1e-2))
    service = ServiceClient(checkpoint_root=tmp_path, seed=0)
    training = service.create_lora_training_client("tiny", rank=0, model_overrides=SMALL)
    source = InProcessSource(training, _LengthTask(digits=1, operators="+"), config)
    probe = ModelInput.from_ints([1, 20, 21, 22])
    trained = 0
    for step in range(3):
        before = training.engine.sampler().compute_logprobs([probe.to_ints()])
        rollout = source.next(step)
        train_on_rollout(training, rollout, config)
        trained += len(rollout.datums) > 0
        after = training.engine.sampler().compute_logprobs([probe.to_ints()])
        assert (after != before) == (len(rollout.datums) > 0)
    assert trained > 0, "vacuous: no step had RL datums"
    assert training.engine.sampler_copies == 0
    training.close()


def test_a_step_from_another_thread_waits_for_a_sampling_pass_on_the_shared_weights() -> None:
    """The trainer thread steps while the sampler is half-way through a pass (held there by a
    hook on the first layer): the step waits for the pass, so the pass sees one set of weights
    and equals the same pass without a concurrent step."""
    engine = tiny_engine()
    held = engine.sampler()
    before = held.compute_logprobs(PROMPTS)
    engine.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    in_pass, stepped = threading.Event(), threading.Event()

    def pause(*_: object) -> None:
        if threading.current_thread() is not threading.main_thread() and not in_pass.is_set():
            in_pass.set()
            stepped.wait(timeout=0.5)  # a step that does not wait for the pass lands here

    first_layer = engine.model.model.layers[0]  # type: ignore[union-attr,index]
    hook = first_layer.register_forward_pre_hook(pause)
    out: list[list[list[float]]] = []
    worker = threading.Thread(target=lambda: out.append(held.compute_logprobs(PROMPTS)))
    worker.start()
    assert in_pass.wait(timeout=30)
    engine.optim_step(ADAM)
    stepped.set()
    worker.join(timeout=60)
    hook.remove()
    assert engine.version == 1 and engine.sampler_copies == 1
    assert out == [before]
    assert engine.sampler().compute_logprobs(PROMPTS) != before
