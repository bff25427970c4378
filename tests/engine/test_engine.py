"""Claims about the engine on a real (tiny) transformers model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cispo.datums import rl_datum
from cispo.engine.engine import loss_totals
from cispo.types import AdamParams, SamplingParams
from tests.train.helpers import grads, random_datums, tiny_engine

CISPO = {"reduction": "token_mean", "anchor": "old"}


def test_micro_batch_size_does_not_change_the_gradient_on_a_real_model() -> None:
    datums = random_datums(8)
    one = tiny_engine(micro_batch_size=8)
    eight = tiny_engine(micro_batch_size=1)
    out_one = one.forward_backward(datums, "cispo", CISPO)
    out_eight = eight.forward_backward(datums, "cispo", CISPO)
    g1, g8 = grads(one), grads(eight)
    assert g1.keys() == g8.keys() and g1
    for name in g1:
        torch.testing.assert_close(g8[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)
    assert out_one.metrics["loss:sum"] == pytest.approx(out_eight.metrics["loss:sum"], rel=1e-5)


def test_gradients_accumulate_across_calls_until_optim_step() -> None:
    datums = random_datums(6, seed=1)
    total = sum(float(d.loss_fn_inputs["mask"].to_torch().sum()) for d in datums)
    whole, split = tiny_engine(), tiny_engine()
    whole.forward_backward(datums, "cispo", CISPO)
    split.forward_backward(datums[:2], "cispo", CISPO, num_tokens=total)
    split.forward_backward(datums[2:], "cispo", CISPO, num_tokens=total)
    for name, g in grads(whole).items():
        torch.testing.assert_close(grads(split)[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
def test_a_batch_split_over_two_engines_with_loss_totals_gives_the_whole_gradient(
    reduction: str,
) -> None:
    """The async worker's gradient share: two copies of the weights, each taking part of the
    batch with the whole batch's `loss_totals`, add up to one engine's gradient."""
    datums = random_datums(7, seed=2)  # mixed lengths
    cfg = {**CISPO, "reduction": reduction}
    tokens, sequences = loss_totals(datums)
    assert tokens == sum(float(d.loss_fn_inputs["mask"].to_torch().sum()) for d in datums)
    assert sequences == 7.0
    whole, trainer, worker = tiny_engine(), tiny_engine(), tiny_engine()
    whole.forward_backward(datums, "cispo", cfg)
    for engine, part in ((trainer, datums[:4]), (worker, datums[4:])):
        engine.forward_backward(part, "cispo", cfg, num_tokens=tokens, num_sequences=sequences)
    summed = {name: g + grads(worker)[name] for name, g in grads(trainer).items()}
    for name, g in grads(whole).items():
        torch.testing.assert_close(summed[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_totals_count_only_masked_tokens_and_non_empty_sequences() -> None:
    empty = rl_datum([1, 2], [3], [-1.0], 1.0)
    empty.loss_fn_inputs["mask"].data[:] = [0.0, 0.0]  # type: ignore[index]
    full = rl_datum([1, 2, 3], [4, 5], [-1.0, -1.0], 1.0)
    assert loss_totals([empty, full]) == (2.0, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs_on_policy(temperature: float) -> None:
    engine = tiny_engine()
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]  # mixed lengths: padding is exercised
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=3, stop=[])
    groups = engine.sampler().sample(prompts, 4, params)
    datums = [
        rl_datum(prompt, seq.tokens, seq.logprobs, 1.0)
        for prompt, group in zip(prompts, groups, strict=True)
        for seq in group
    ]
    out = engine.forward_backward(
        datums, "importance_sampling", forward_only=True, temperature=temperature
    )
    diffs = []
    for datum, o in zip(datums, out.loss_fn_outputs, strict=True):
        mask = datum.loss_fn_inputs["mask"].to_torch() > 0
        diffs.append(
            datum.loss_fn_inputs["logprobs"].to_torch()[mask] - o["logprobs"].to_torch()[mask]
        )
    d = torch.cat(diffs)
    assert d.abs().max() < 1e-5  # per token
    assert abs(float(d.mean())) < 1e-6  # k1 sampler-vs-trainer KL


def test_one_cispo_step_raises_logprob_of_positive_and_lowers_negative_advantage() -> None:
    engine = tiny_engine()
    good = rl_datum([1, 10, 11], [12, 13], [-3.0, -3.0], advantage=1.0)
    bad = rl_datum([1, 10, 11], [14, 15], [-3.0, -3.0], advantage=-1.0)

    def completion_logprob(datum):  # type: ignore[no-untyped-def]
        out = engine.forward_backward([datum], "cross_entropy", forward_only=True)
        return float(out.loss_fn_outputs[0]["logprobs"].to_torch()[-2:].sum())

    before = completion_logprob(good), completion_logprob(bad)
    engine.forward_backward([good, bad], "cispo", {"reduction": "token_mean"})
    engine.optim_step(AdamParams(learning_rate=1e-2))
    after = completion_logprob(good), completion_logprob(bad)
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3
    assert engine.version == 1


def test_unknown_loss_name_is_an_error_that_lists_valid_names_and_keeps_no_gradient() -> None:
    engine = tiny_engine()
    with pytest.raises(ValueError, match="cispo"):
        engine.forward_backward(random_datums(2), "cispoo")
    assert grads(engine) == {}


def test_non_finite_gradient_skips_the_step_and_keeps_weights() -> None:
    engine = tiny_engine()
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.forward_backward(random_datums(2), "cispo", CISPO)
    p = next(engine.model.parameters())
    assert p.grad is not None
    p.grad[0] = math.inf
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine.optim_step(AdamParams(learning_rate=1e-2))
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert grads(engine) == {}


def _optimizer_tensors(engine) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    state = engine.optimizer.state_dict()["state"]
    return [v.clone() for st in state.values() for v in st.values()]


def test_a_step_that_would_make_weights_non_finite_is_refused_and_restores_everything() -> None:
    """Finite, in-range AdamParams can still overflow float32 weights (a weight near 3e38 times
    (1 - lr * weight_decay) = -99). The step is refused; weights, Adam moments, step counters,
    gradients and the version are bitwise what they were."""
    engine = tiny_engine()
    datums = random_datums(2)
    engine.forward_backward(datums, "cispo", CISPO)
    engine.optim_step(AdamParams(learning_rate=1e-3))  # Adam state exists from here on
    engine.forward_backward(datums, "cispo", CISPO)
    p = next(p for p in engine.model.parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = 3e38  # after the backward: the gradient stays finite
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    moments, grads_before = _optimizer_tensors(engine), grads(engine)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine.optim_step(AdamParams(learning_rate=10.0, weight_decay=10.0, grad_clip_norm=1e-3))
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = _optimizer_tensors(engine)
    assert len(after) == len(moments) > 0
    assert all(torch.equal(a, b) for a, b in zip(after, moments, strict=True))
    assert grads(engine).keys() == grads_before.keys()
    assert all(torch.equal(grads(engine)[k], g) for k, g in grads_before.items())
    assert groups == [
        {k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups
    ]
    assert engine.version == 1
    out = engine.optim_step(AdamParams(learning_rate=1e-3))  # a sane step still works
    assert engine.version == 2 and math.isfinite(out["optim/grad_norm"])


def test_an_ordinary_step_is_proven_finite_without_the_dry_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-parameter dry run (clones of every parameter and moment) runs only when the
    float64 bound cannot prove the step finite; the extreme step above still gets it."""
    from cispo.engine import engine as engine_module

    calls: list[int] = []
    real = engine_module._dry_run_non_finite

    def counted(*args: object) -> str | None:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "_dry_run_non_finite", counted)
    engine = tiny_engine()
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for _ in range(3):
        engine.forward_backward(random_datums(2), "cispo", CISPO)
        engine.optim_step(AdamParams(learning_rate=1e-3, weight_decay=0.1, grad_clip_norm=1.0))
    assert engine.version == 3 and calls == []
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
    engine.forward_backward(random_datums(2), "cispo", CISPO)
    p = next(p for p in engine.model.parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = 3e38
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine.optim_step(AdamParams(learning_rate=10.0, weight_decay=10.0))
    assert calls == [1] and engine.version == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", math.inf),
        ("learning_rate", math.nan),
        ("learning_rate", 1e308),
        ("learning_rate", -1e-3),
        ("weight_decay", math.nan),
        ("weight_decay", 1e300),
        ("eps", math.inf),
        ("eps", 0.0),
        ("beta1", 1.0),
        ("beta2", math.nan),
        ("grad_clip_norm", math.nan),
        ("grad_clip_norm", math.inf),
        ("learning_rate", "1e-3"),
    ],
)
def test_adam_params_refuse_non_finite_and_absurd_values_naming_the_range(
    field: str, value: object
) -> None:
    with pytest.raises(ValueError, match=rf"AdamParams\.{field} must be .*got"):
        AdamParams(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e-30}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -(2**64)}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_refuse_non_finite_and_out_of_range_values(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def _with_nan_advantages(datum):  # type: ignore[no-untyped-def]
    inputs = dict(datum.loss_fn_inputs)
    adv = inputs["advantages"].data
    inputs["advantages"] = [math.nan] * len(adv)
    return dataclasses.replace(datum, loss_fn_inputs=inputs)


@pytest.mark.parametrize("pending_gradient", [False, True])
def test_a_failing_forward_backward_leaves_gradients_rng_and_weights_exactly_as_before(
    pending_gradient: bool,
) -> None:
    """70 datums, micro-batch 64, NaN advantages only in the last datum with nonfinite="raise":
    the first micro-batch's gradient must not stay accumulated. The next optim_step then gives
    bitwise the weights of an engine that never saw the failed call."""
    datums = random_datums(70, seed=2)
    bad = [*datums[:-1], _with_nan_advantages(datums[-1])]
    raising = {**CISPO, "nonfinite": "raise"}
    engine, reference = tiny_engine(micro_batch_size=64), tiny_engine(micro_batch_size=64)
    for e in (engine, reference):
        e.model.train()
        e.forward_backward(datums[:3], "cispo", CISPO)
        e.optim_step(AdamParams(learning_rate=1e-2))
        if pending_gradient:
            e.forward_backward(datums[3:9], "cispo", CISPO)
    before, rng = grads(engine), torch.get_rng_state()
    with pytest.raises(ValueError, match="non-finite"):
        engine.forward_backward(bad, "cispo", raising)
    after = grads(engine)
    assert after.keys() == before.keys() and bool(after) == pending_gradient
    assert all(torch.equal(after[k], g) for k, g in before.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert engine.model.training
    reference.forward_backward(datums[9:12], "cispo", CISPO)
    engine.forward_backward(datums[9:12], "cispo", CISPO)
    for e in (engine, reference):
        e.optim_step(AdamParams(learning_rate=1e-2))
    want = reference.model.state_dict()
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_state_without_copies_shares_the_live_tensors_and_equals_the_copied_state() -> None:
    """`state(copy_tensors=False)` (what the client's save_state writes from the engine's worker
    thread) holds the parameters and AdamW moments themselves, no second copy; same values."""
    engine = tiny_engine()
    engine.forward_backward(random_datums(4), "cispo", {"reduction": "token_mean"})
    engine.optim_step(AdamParams(learning_rate=1e-3))
    live, copied = engine.state(copy_tensors=False), engine.state()
    params = {p.data_ptr() for p in engine.model.parameters()}
    # every parameter is saved as itself; a tied head's second name is its own copy
    assert params == {t.data_ptr() for t in live["model"].values()} & params
    assert len(live["model"]) == len(copied["model"])
    assert not any(t.data_ptr() in params for t in copied["model"].values())
    moments = {id(s["exp_avg"]) for s in engine.optimizer.state.values()}
    saved = [id(s["exp_avg"]) for s in live["optimizer"]["state"].values()]
    assert moments and set(saved) == moments
    for name, tensor in copied["model"].items():
        assert torch.equal(tensor, live["model"][name]), name
    for key, entry in copied["optimizer"]["state"].items():
        for field, value in entry.items():
            assert torch.equal(value, live["optimizer"]["state"][key][field]), (key, field)
