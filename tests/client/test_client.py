"""Claims about the in-process Tinker-style client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from cispo.client import AdamParams, ModelInput, SamplingParams, ServiceClient
from tests.train.helpers import SMALL, random_datums


def _client(tmp_path: Path):  # type: ignore[no-untyped-def]
    service = ServiceClient(checkpoint_root=tmp_path)
    return service.create_lora_training_client("tiny", rank=0, model_overrides=SMALL)


def test_futures_support_result_and_await(tmp_path: Path) -> None:
    training = _client(tmp_path)
    datums = random_datums(3)
    direct = training.forward(datums, "cispo", {"reduction": "token_mean"}).result()

    async def run() -> float:
        out = await training.forward(datums, "cispo", {"reduction": "token_mean"})
        return out.metrics["loss:sum"]

    assert asyncio.run(run()) == direct.metrics["loss:sum"]


def test_calls_run_in_submission_order(tmp_path: Path) -> None:
    """forward_backward → optim_step → forward, submitted back to back without waiting:
    the forward sees the updated weights (it equals a forward after waiting for the step)."""
    a, b = _client(tmp_path / "a"), _client(tmp_path / "b")
    datums = random_datums(4)
    adam = AdamParams(learning_rate=1e-2)
    a.forward_backward(datums, "cispo", {"reduction": "token_mean"})
    a.optim_step(adam)
    queued = a.forward(datums, "cross_entropy")
    b.forward_backward(datums, "cispo", {"reduction": "token_mean"}).result()
    b.optim_step(adam).result()
    waited = b.forward(datums, "cross_entropy").result()
    for x, y in zip(queued.result().loss_fn_outputs, waited.loss_fn_outputs, strict=True):
        assert torch.equal(x["logprobs"].to_torch(), y["logprobs"].to_torch())
    assert a.engine.version == 1


def test_deferred_sampling_batches_requests_and_equals_one_engine_batch(tmp_path: Path) -> None:
    training = _client(tmp_path)
    sampler = training.save_weights_and_get_sampling_client()
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25]]
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=11)
    futures = [sampler.sample(ModelInput.from_ints(p), 3, params) for p in prompts]
    got = [f.result().sequences for f in futures]
    # Seeded requests sample on stream 0 each (cispo.engine.batching).
    want = training.engine.sampler().sample(prompts, 3, params, [0, 0, 0])
    assert [[s.tokens for s in g] for g in got] == [[s.tokens for s in g] for g in want]
    assert [[s.logprobs for s in g] for g in got] == [[s.logprobs for s in g] for g in want]


def test_sampling_client_keeps_its_weights_after_the_trainer_steps(tmp_path: Path) -> None:
    training = _client(tmp_path)
    sampler = training.save_weights_and_get_sampling_client()
    prompt = ModelInput.from_ints([1, 20, 21, 22])
    before = sampler.compute_logprobs(prompt).result()
    training.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    training.optim_step(AdamParams(learning_rate=5e-2)).result()
    assert sampler.compute_logprobs(prompt).result() == before
    fresh = training.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    assert fresh != before


def test_save_state_then_load_state_restores_weights_and_optimizer(tmp_path: Path) -> None:
    """After save → more steps → load, the next step reproduces the step taken right after save."""
    training = _client(tmp_path)
    datums, adam = random_datums(4), AdamParams(learning_rate=1e-2)
    training.forward_backward(datums, "cispo", {"reduction": "token_mean"})
    training.optim_step(adam)
    path = training.save_state("mid", metadata={"note": "x"}).result().path
    training.forward_backward(datums, "cispo", {"reduction": "token_mean"})
    training.optim_step(adam).result()
    after_save = {k: v.clone() for k, v in training.engine.model.state_dict().items()}
    training.forward_backward(datums, "cispo", {"reduction": "token_mean"})
    training.optim_step(adam).result()
    metadata = training.load_state(path).result()
    assert metadata["note"] == "x"
    training.forward_backward(datums, "cispo", {"reduction": "token_mean"})
    training.optim_step(adam).result()
    for k, v in training.engine.model.state_dict().items():
        assert torch.equal(v, after_save[k]), k


def test_get_info_names_the_model_and_counts_its_parameters(tmp_path: Path) -> None:
    full = _client(tmp_path / "full")
    lora = ServiceClient(checkpoint_root=tmp_path / "lora").create_lora_training_client(
        "tiny", rank=4, model_overrides=SMALL
    )
    a, b = full.get_info(), lora.get_info()
    total = sum(p.numel() for p in full.engine.model.parameters())
    assert a.num_parameters == a.num_trainable_parameters == total > 0
    assert not a.is_lora and a.lora_rank is None and a.model_name == "tiny"
    assert a.model_data.arch == "llama"
    assert b.is_lora and b.lora_rank == 4
    assert 0 < b.num_trainable_parameters < total < b.num_parameters  # adapters only; added
    trainable = sum(p.numel() for p in lora.engine.model.parameters() if p.requires_grad)
    assert b.num_trainable_parameters == trainable


def test_get_weights_waits_for_submitted_steps_and_returns_the_current_weights(
    tmp_path: Path,
) -> None:
    training = _client(tmp_path)
    before = {k: v.clone() for k, v in training.get_weights().items()}
    training.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    training.optim_step(AdamParams(learning_rate=5e-2))  # not waited for
    after = training.get_weights()
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert all(torch.equal(after[k], v) for k, v in training.engine.model.state_dict().items())


def test_clients_answer_result_with_themselves_like_the_sdks_client_futures(
    tmp_path: Path,
) -> None:
    """tinker 0.38 returns futures of clients (`create_lora_training_client(...).result()`)."""
    training = _client(tmp_path)
    assert training.result() is training
    sampler = training.save_weights_and_get_sampling_client()
    assert sampler.result() is sampler


def test_close_finishes_submitted_calls_then_refuses_new_ones(tmp_path: Path) -> None:
    service = ServiceClient(checkpoint_root=tmp_path)
    training = service.create_lora_training_client("tiny", rank=0, model_overrides=SMALL)
    pending = training.forward_backward(random_datums(2), "cispo", {"reduction": "token_mean"})
    with pytest.raises(ValueError, match=r"success.*errored.*interrupted.*'finished'"):
        service.close("finished")
    training.optim_step(AdamParams(learning_rate=1e-3)).result()  # a refused close changed nothing
    assert service.close("success").result() is None
    assert pending.done() and training.engine.version == 1
    with pytest.raises(RuntimeError, match="shutdown"):
        training.forward(random_datums(1))
