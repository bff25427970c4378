"""The real tinker SDK through refused requests: every refusal (400/404) leaves the TrainingClient
usable, and changes no weights, no gradients and no optimizer state.

The SDK numbers a TrainingClient's requests on the client (`seq_id = 1, 2, ...`) and never reuses
one; a refused request must therefore still consume its seq_id on the server, or every later
request on that client waits for it forever (`Retrying request ... because of try_again`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

tinker = pytest.importorskip("tinker")
from server_harness import LiveServer  # noqa: E402
from tinker import types  # noqa: E402

RANK = 4
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def training(service: Any) -> Any:
    return service.create_lora_training_client("tiny", rank=RANK, seed=3).result()


def _datum(ids: list[int], **extra: list[float]) -> types.Datum:
    inputs: dict[str, Any] = {"target_tokens": ids[1:], **extra}
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)


def _rl_datum(ids: list[int]) -> types.Datum:
    n = len(ids) - 1
    return _datum(ids, logprobs=[-2.0] * n, advantages=[1.0] * n)


def _soft_datum(ids: list[int]) -> types.Datum:
    """target_tokens and weights [T, 2]: two candidate tokens per position."""
    pairs = torch.tensor([[t, (t + 1) % 10] for t in ids[1:]])
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(pairs),
            "weights": types.TensorData.from_torch(torch.full(pairs.shape, 0.5)),
        },
    )


def _image_datum(ids: list[int]) -> types.Datum:
    """A vision-language datum: text tokens then a (2-token) image chunk."""
    chunks = [
        types.EncodedTextChunk(tokens=ids[:-1]),
        types.ImageChunk(data=b"\x89PNG not really", format="png", expected_tokens=2),
    ]
    return types.Datum(
        model_input=types.ModelInput(chunks=chunks),
        loss_fn_inputs={"target_tokens": [*ids[1:], 0, 0]},
    )


def _forward_lp(training: Any, ids: list[int]) -> list[float]:
    out = training.forward([_datum(ids)], "cross_entropy").result(timeout=TIMEOUT)
    return list(out.loss_fn_outputs[0]["logprobs"].tolist())


def _optimizer_state(live: LiveServer, model_id: str) -> dict[str, Any]:
    state = live.backend.models[model_id].engine.optimizer.state_dict()["state"]
    return {k: {n: v.clone() for n, v in s.items()} for k, s in state.items()}


def _ids(training: Any) -> list[int]:
    return list(training.get_tokenizer().encode("12+7=19"))


# Each refusal: (name, call that the server refuses, a word the error must contain).
REFUSALS: list[tuple[str, Callable[[Any, list[int], int], Any], str]] = [
    (
        "unknown_loss_fn",
        lambda tc, ids, vocab: tc.forward_backward([_datum(ids)], "custom"),
        "custom",
    ),
    (
        "out_of_vocab_token",
        lambda tc, ids, vocab: tc.forward_backward([_datum([*ids, vocab + 5])], "cross_entropy"),
        "token ids",
    ),
    (
        "unknown_loss_fn_config_key",
        lambda tc, ids, vocab: tc.forward_backward([_rl_datum(ids)], "cispo", {"bogus": 1.0}),
        "bogus",
    ),
    (
        "missing_loss_fn_inputs",
        lambda tc, ids, vocab: tc.forward_backward([_datum(ids)], "importance_sampling"),
        "advantages",
    ),
    (
        "over_max_context_length",
        lambda tc, ids, vocab: tc.forward_backward([_datum(ids * 150)], "cross_entropy"),
        "exceed max_context_length=1024",
    ),
    (
        "soft_targets_with_another_loss",
        lambda tc, ids, vocab: tc.forward_backward([_soft_datum(ids)], "importance_sampling"),
        "soft targets",
    ),
    (
        "image_chunk",
        lambda tc, ids, vocab: tc.forward_backward([_image_datum(ids)], "cross_entropy"),
        "only encoded_text chunks",
    ),
    (
        "stable_reinforce",
        lambda tc, ids, vocab: tc.forward_backward([_rl_datum(ids)], "stable_reinforce"),
        "stable_reinforce' is not available on this server.*loss_fn='cispo'",
    ),
    (
        "ttl_out_of_range",
        lambda tc, ids, vocab: tc.save_state("short", ttl_seconds=10),
        "ttl_seconds must be in",
    ),
    (
        "load_state_unknown_path",
        lambda tc, ids, vocab: tc.load_state("tinker://nope/weights/x"),
        "unknown training run",
    ),
]


def test_each_refused_request_consumes_its_seq_id_and_changes_nothing(
    live: LiveServer, training: Any
) -> None:
    """For every refusal class: the SDK call raises with the server's reason, the next valid
    request on the same TrainingClient completes (it would hang if the refused seq_id were left
    open), and weights, accumulated gradients and Adam moments are unchanged."""
    ids = _ids(training)
    served = live.backend.models[training.model_id]
    vocab = served.vocab_size
    # One real step first, so the optimizer has moments that a refused request could disturb.
    training.forward_backward([_datum(ids)], "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    assert _optimizer_state(live, training.model_id), "the step created no Adam state"
    for name, refuse, message in REFUSALS:
        before = _forward_lp(training, ids)
        moments = _optimizer_state(live, training.model_id)
        with pytest.raises(tinker.APIStatusError, match=message):
            refuse(training, ids, vocab).result(timeout=TIMEOUT)
        assert _forward_lp(training, ids) == pytest.approx(before, abs=0), name
        assert all(p.grad is None or not p.grad.any() for p in served.engine.model.parameters()), (
            f"{name}: a refused request left gradients behind"
        )
        after = _optimizer_state(live, training.model_id)
        assert after.keys() == moments.keys(), name
        for key, slots in moments.items():
            for slot, value in slots.items():
                assert torch.equal(after[key][slot], value), f"{name}: Adam {slot} changed"
    # The client still trains after all of them: a valid step moves the weights.
    before = _forward_lp(training, ids)
    training.forward_backward([_datum(ids)], "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    assert _forward_lp(training, ids) != pytest.approx(before, abs=1e-4)


def test_record_stability_info_is_refused_at_the_first_sample_with_the_cispo_answer(
    training: Any,
) -> None:
    """The cookbook's default (loss_fn="stable_reinforce") samples with record_stability_info=True
    first: that request already names what StableReinforce is, why it is absent, and what to pass
    instead; the same client samples fine without it."""
    ids = _ids(training)
    prompt = types.ModelInput.from_ints(ids[:5])
    params = types.SamplingParams(max_tokens=3, seed=1)
    recording = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    with pytest.raises(tinker.APIStatusError) as error:
        recording.sample(prompt, 1, params).result(timeout=TIMEOUT)
    message = str(error.value)
    for part in ("record_stability_info", "alpha loss", "does not publish", "loss_fn=cispo"):
        assert part in message, part
    plain = training.save_weights_and_get_sampling_client().result()
    sampled = plain.sample(prompt, 1, params).result(timeout=TIMEOUT).sequences[0].tokens
    assert 1 <= len(sampled) <= 3


def test_max_context_length_is_reported_and_a_sample_past_it_is_refused(
    service: Any, training: Any
) -> None:
    """get_server_capabilities reports the model's max_position_embeddings, and a sample request
    whose prompt + max_tokens would run past it gets 400 naming the limit (it used to be accepted
    and sampled past the model's context)."""
    caps = service.get_server_capabilities()
    (tiny,) = [m for m in caps.supported_models if m.model_name == "tiny"]
    assert tiny.max_context_length == 1024
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(_ids(training))
    with pytest.raises(tinker.APIStatusError, match="max_context_length=1024"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=32768)).result(timeout=TIMEOUT)
    fits = types.SamplingParams(max_tokens=1024 - prompt.length, seed=0, stop=["\n"])
    assert sampler.sample(prompt, 1, fits).result(timeout=TIMEOUT).sequences


def test_a_base_model_the_server_does_not_offer_is_refused_naming_the_offered_ones(
    service: Any,
) -> None:
    with pytest.raises(tinker.APIStatusError, match=r"this server offers \['tiny'\]"):
        service.create_lora_training_client("Qwen/Qwen3-8B", rank=4).result(timeout=TIMEOUT)
