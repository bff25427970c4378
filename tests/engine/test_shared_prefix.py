"""EngineConfig.shared_prefix: each group's prompt forwarded once gives the padded path's logprobs,
losses and gradients for every objective and reduction; groups and micro-batches; the sampler's
one prefill per prompt."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from cispo.datums import rl_datum, sft_datum
from cispo.engine.engine import Engine, EngineConfig, _collate, loss_totals
from cispo.engine.packing import detect_groups, micro_batches, plan_micro_batches
from cispo.engine.sampler import sample
from cispo.models import apply_lora
from cispo.types import AdamParams, Datum, ForwardBackwardOutput, SamplingParams
from tests.train.helpers import grads, tiny_bundle, tiny_engine

TOL = 1e-5
OBJECTIVES: dict[str, dict[str, Any]] = {
    "cispo": {},
    "ppo": {},
    "gspo": {},
    "importance_sampling": {},
    "reinforce": {},
    "dro": {"beta": 0.1},
    "cross_entropy": {},
}
REDUCTIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
REDUCTIONS += ["sum"]


def _group_datums(sizes: tuple[int, ...] = (4, 1, 3), seed: int = 0) -> list[Datum]:
    """Consecutive groups of RL datums on one prompt each, completions of 1-6 tokens."""
    g = torch.Generator().manual_seed(seed)
    datums = []
    for k, size in enumerate(sizes):
        prompt = [1, *torch.randint(4, 40, (3 + 2 * k,), generator=g).tolist()]
        advantages = torch.randn(size, generator=g)
        for i in range(size):
            completion = torch.randint(4, 40, (1 + (i * 3 + k) % 6,), generator=g).tolist()
            sampler = (-torch.rand(len(completion), generator=g) * 3 - 0.5).tolist()
            old = [x + 0.05 * float(torch.randn((), generator=g)) for x in sampler]
            datums.append(
                rl_datum(prompt, completion, sampler, float(advantages[i]), old_logprobs=old)
            )
    return datums


def _pair(**config: Any) -> tuple[Engine, Engine]:
    """Two engines on the same weights: padded, and shared-prefix packed."""
    padded, shared = tiny_engine(shared_prefix=False, **config), tiny_engine(**config)
    assert not padded.shared_prefix and shared.shared_prefix  # the default packs
    return padded, shared


def _assert_same_outputs(a: ForwardBackwardOutput, b: ForwardBackwardOutput) -> None:
    assert len(a.loss_fn_outputs) == len(b.loss_fn_outputs)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        torch.testing.assert_close(
            y["logprobs"].to_torch(), x["logprobs"].to_torch(), rtol=TOL, atol=TOL
        )
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=TOL, abs=TOL)


def _assert_same_grads(a: Engine, b: Engine) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    assert any(bool(g.abs().max() > 1e-4) for g in ga.values())  # a real gradient
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_fn", list(OBJECTIVES))
def test_shared_prefix_loss_logprobs_and_grads_equal_the_padded_path(
    loss_fn: str, reduction: str
) -> None:
    """Every objective × reduction, with global normalisers (this call is a third of the step's
    datums) and micro-batches of at most 3 datums (the group of 4 runs alone)."""
    datums = _group_datums()
    step_tokens, step_seqs = loss_totals(_group_datums(seed=1) + datums + _group_datums(seed=2))
    cfg = {**OBJECTIVES[loss_fn], "reduction": reduction}
    if reduction == "seq_mean_token_sum_norm":
        cfg["max_len"] = 8
    padded, shared = _pair(micro_batch_size=3)
    kw = {"num_tokens": step_tokens, "num_sequences": step_seqs, "temperature": 0.9}
    out_padded = padded.forward_backward(datums, loss_fn, cfg, **kw)  # type: ignore[arg-type]
    out_shared = shared.forward_backward(datums, loss_fn, cfg, **kw)  # type: ignore[arg-type]
    assert out_padded.metrics["loss:sum"] != 0.0
    _assert_same_outputs(out_padded, out_shared)
    _assert_same_grads(padded, shared)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
def test_shared_prefix_with_an_entropy_bonus_and_kl_equals_the_padded_path(fused: bool) -> None:
    """The entropy term (read from the packed hidden states) and a KL to reference logprobs."""
    datums = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={**d.loss_fn_inputs, "ref_logprobs": d.loss_fn_inputs["old_logprobs"]},
        )
        for d in _group_datums((3, 2))
    ]
    cfg = {"reduction": "token_mean", "entropy_coef": 0.01, "kl_coef": 0.05}
    padded, shared = _pair(fused_logprobs=fused, logprob_chunk_size=4)
    _assert_same_outputs(
        padded.forward_backward(datums, "cispo", cfg), shared.forward_backward(datums, "cispo", cfg)
    )
    _assert_same_grads(padded, shared)


def test_several_groups_per_packed_row_equal_the_padded_path() -> None:
    datums = _group_datums((2, 3, 1, 2))
    padded = tiny_engine(shared_prefix=False)
    shared = tiny_engine(shared_prefix=True, packed_row_tokens=64)
    cfg = {"reduction": "seq_mean_token_mean"}
    _assert_same_outputs(
        padded.forward_backward(datums, "ppo", cfg), shared.forward_backward(datums, "ppo", cfg)
    )
    _assert_same_grads(padded, shared)


def test_padding_free_update_of_unrelated_sequences_equals_the_padded_path() -> None:
    """SFT datums with different prompts and lengths: groups of one, packed several per row."""
    g = torch.Generator().manual_seed(4)
    datums = [
        sft_datum(
            [1, *torch.randint(4, 40, (1 + i % 4,), generator=g).tolist()],
            torch.randint(4, 40, (2 + (3 * i) % 5,), generator=g).tolist(),
        )
        for i in range(7)
    ]
    full = _collate(datums)
    assert detect_groups(full.input_ids, full.lengths, full.loss_mask) == [1] * 7
    padded = tiny_engine(micro_batch_size=4, shared_prefix=False)
    packed = tiny_engine(micro_batch_size=4, shared_prefix=True, packed_row_tokens=40)
    _assert_same_outputs(
        padded.forward_backward(datums, "cross_entropy"),
        packed.forward_backward(datums, "cross_entropy"),
    )
    _assert_same_grads(padded, packed)


def test_optimizer_steps_with_shared_prefix_on_and_off_reach_the_same_weights() -> None:
    padded, shared = _pair(micro_batch_size=4)
    start = {k: v.clone() for k, v in padded.model.state_dict().items()}
    cfg = {"reduction": "token_mean"}
    for step in range(3):
        datums = _group_datums((4, 2, 3), seed=10 + step)
        for engine in (padded, shared):
            engine.forward_backward(datums, "cispo", cfg)
            engine.optim_step(AdamParams(learning_rate=1e-3))
    moved = max(float((v - start[k]).abs().max()) for k, v in padded.model.state_dict().items())
    assert moved > 1e-3  # three steps of lr 1e-3 trained the model
    # Adam divides by sqrt(v): a gradient difference of ~1e-7 moves weights by far less than lr.
    for k, v in padded.model.state_dict().items():
        torch.testing.assert_close(shared.model.state_dict()[k], v, rtol=0, atol=1e-5, msg=k)


def _engine_on(model: torch.nn.Module, **config: Any) -> Engine:
    return Engine(model, eos_token_id=None, pad_token_id=0, config=EngineConfig(**config))


def test_shared_prefix_with_lora_adapters_equals_the_padded_path() -> None:
    """LoRA on every decoder linear layer (peft's all-linear), A and B set non-zero."""

    def lora_model() -> torch.nn.Module:
        model = apply_lora(tiny_bundle().model, r=4, alpha=8)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the same adapters in both engines, B non-zero
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return model

    padded = _engine_on(lora_model(), shared_prefix=False, micro_batch_size=3)
    shared = _engine_on(lora_model(), micro_batch_size=3)
    assert shared.shared_prefix
    datums = _group_datums()
    cfg = {"reduction": "seq_mean_token_mean"}
    _assert_same_outputs(
        padded.forward_backward(datums, "cispo", cfg), shared.forward_backward(datums, "cispo", cfg)
    )
    assert grads(padded) and all("lora" in name for name in grads(padded))
    _assert_same_grads(padded, shared)


def test_a_model_the_packed_path_cannot_mask_takes_the_padded_path_and_says_why() -> None:
    """shared_prefix is on by default; a sliding-window model would have its window silently
    replaced by the packed 4D mask, so the engine keeps padded rows (same results as off)."""
    model = tiny_bundle().model
    model.config.use_sliding_window = True  # the Llama forward ignores it; the check must not
    with pytest.warns(UserWarning, match="this model takes padded rows instead"):
        engine = _engine_on(model)
    assert not engine.shared_prefix
    assert "sliding_attention" in str(engine.shared_prefix_off)
    reference = _engine_on(tiny_bundle().model, shared_prefix=False)
    assert reference.shared_prefix_off == "engine.shared_prefix=false"
    datums = _group_datums()
    _assert_same_outputs(
        reference.forward_backward(datums, "cispo"), engine.forward_backward(datums, "cispo")
    )
    _assert_same_grads(reference, engine)


# ---------------------------------------------------------------- groups and micro-batches


def _detect(datums: list[Datum]) -> list[int]:
    full = _collate(datums)
    return detect_groups(full.input_ids, full.lengths, full.loss_mask)


def test_groups_are_runs_of_consecutive_datums_with_the_same_prompt() -> None:
    datums = _group_datums((4, 1, 3))
    assert _detect(datums) == [4, 1, 3]
    # The same prompt again after another group is a new group (groups are consecutive runs).
    assert _detect([*datums[:2], *datums[4:5], *datums[2:4]]) == [2, 1, 2]
    # Datums without a loss mask key count every position: no prompt, each its own group.
    bare = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]},
        )
        for d in datums[:3]
    ]
    assert _detect(bare) == [1, 1, 1]


def test_micro_batches_hold_whole_groups_and_a_large_group_alone() -> None:
    assert plan_micro_batches([4, 1, 3, 2], 4) == [(0, 4, [4]), (4, 8, [1, 3]), (8, 10, [2])]
    assert plan_micro_batches([2, 2, 2], 5) == [(0, 4, [2, 2]), (4, 6, [2])]
    assert plan_micro_batches([6], 2) == [(0, 6, [6])]
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        plan_micro_batches([1], 0)
    full = _collate(_group_datums((4, 1, 3)))
    plan = micro_batches(full.input_ids, full.lengths, full.loss_mask, 3, shared=False)
    assert plan == [(0, 3, None), (3, 6, None), (6, 8, None)]


def test_packed_row_tokens_below_one_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="packed_row_tokens must be >= 1, got 0"):
        tiny_engine(shared_prefix=True, packed_row_tokens=0)


# ---------------------------------------------------------------- sampling


def test_sampler_prefills_each_prompt_once_then_decodes_one_token_per_row() -> None:
    """The prefill forward holds P rows (not P·G); every later forward feeds one token per row,
    whose cache came from repeating the prefill's G times. That its logprobs equal a full
    teacher-forced forward is tests/engine/test_sampler.py's
    test_sampler_logprobs_equal_trainer_full_sequence_logprobs."""
    engine = tiny_engine()
    model = engine.sampler_model()
    shapes: list[tuple[int, ...]] = []

    def record(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids: Tensor = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        shapes.append(tuple(ids.shape))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    prompts = [[1, 20, 21, 22, 23], [1, 22], [1, 23, 24]]
    params = SamplingParams(max_tokens=4, seed=0, stop=[])
    groups = sample(model, prompts, 8, params, eos_token_id=None, pad_token_id=0)
    handle.remove()
    assert [len(g) for g in groups] == [8, 8, 8]
    assert shapes[0] == (3, 5)  # one prefill: P = 3 prompts, left-padded to 5
    assert shapes[1:] and all(s == (24, 1) for s in shapes[1:])  # P·G rows, one new token


def test_shared_prefix_trainer_logprobs_equal_the_sampler_logprobs_on_policy() -> None:
    engine = tiny_engine(shared_prefix=True)
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3)
    groups = engine.sampler().sample(prompts, 4, params)
    datums = [
        rl_datum(prompt, seq.tokens, seq.logprobs, 1.0)
        for prompt, group in zip(prompts, groups, strict=True)
        for seq in group
    ]
    assert _detect(datums) == [4, 4, 4]
    out = engine.forward_backward(datums, "importance_sampling", forward_only=True, temperature=0.8)
    diffs = []
    for datum, o in zip(datums, out.loss_fn_outputs, strict=True):
        mask = datum.loss_fn_inputs["mask"].to_torch() > 0
        diffs.append(
            datum.loss_fn_inputs["logprobs"].to_torch()[mask] - o["logprobs"].to_torch()[mask]
        )
    d = torch.cat(diffs)
    assert d.numel() > 20
    assert d.abs().max() < TOL
