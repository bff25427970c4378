"""model_token_logprobs on a tiny Llama equals the model's own log_softmax(logits / T) and grads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

import cispo.ops.model_logprobs as model_logprobs_module
from cispo.ops import FusedLogprobOutput, fused_logprobs, model_token_logprobs, naive_logprobs

TOL = 1e-5
TEMPERATURE = 0.8


def _close(got: Tensor | None, want: Tensor | None, msg: str = "") -> None:
    assert got is not None and want is not None
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=msg or None)


def _tiny_llama(*, tie: bool = False) -> LlamaForCausalLM:
    """The brief's tiny config; LlamaForCausalLM(config) is what AutoModelForCausalLM.from_config
    builds for it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def _batch() -> dict[str, Tensor]:
    """B = 3 sequences of T = 9, the last right-padded; loss mask on 6 + 5 + 3 = 14 tokens."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 9), generator=gen)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[2, 6:] = 0
    loss_mask = torch.zeros(3, 9, dtype=torch.bool)
    loss_mask[:, 3:] = True
    loss_mask[1, 5] = False
    loss_mask &= attention_mask.bool()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": torch.randint(0, 97, (3, 9), generator=gen),
        "loss_mask": loss_mask,
        "g_lp": torch.randn(3, 9, generator=gen),
        "g_ent": torch.randn(3, 9, generator=gen),
    }


def _reference(model: nn.Module, b: dict[str, Tensor]) -> FusedLogprobOutput:
    """The model's own logits: log_softmax(logits / T)[target] and entropy, 0 off the mask."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logp = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)  # [B, T, V]
    logprobs = logp.gather(-1, b["targets"][..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = b["loss_mask"]
    return FusedLogprobOutput(
        logprobs=torch.where(mask, logprobs, 0.0), entropy=torch.where(mask, entropy, 0.0)
    )


def _values_and_grads(
    model: nn.Module, b: dict[str, Tensor], fused: bool | None
) -> tuple[FusedLogprobOutput, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    if fused is None:
        out = _reference(model, b)
    else:
        out = model_token_logprobs(
            model,
            b["input_ids"],
            b["attention_mask"],
            b["targets"],
            b["loss_mask"],
            temperature=TEMPERATURE,
            fused=fused,
            chunk_size=4,  # N = 6 + 5 + 3 = 14 selected tokens: chunks of 4, 4, 4, 2
            with_entropy=True,
        )
    assert out.entropy is not None
    loss = (out.logprobs * b["g_lp"]).sum() + (out.entropy * b["g_ent"]).sum()
    torch.autograd.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_model_token_logprobs_equal_model_logits_with_parameter_gradients(
    fused: bool, tie: bool
) -> None:
    model = _tiny_llama(tie=tie)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    b = _batch()
    want, want_grads = _values_and_grads(model, b, fused=None)
    got, got_grads = _values_and_grads(model, b, fused=fused)
    _close(got.logprobs, want.logprobs)
    _close(got.entropy, want.entropy)
    assert (got.logprobs[~b["loss_mask"]] == 0).all()
    assert got_grads.keys() == want_grads.keys()
    assert "lm_head.weight" in got_grads or tie
    for name, grad in want_grads.items():
        _close(got_grads[name], grad, msg=name)


def test_only_loss_mask_tokens_reach_the_vocabulary_projection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []

    def spy(hidden: Tensor, *args: Any, **kwargs: Any) -> FusedLogprobOutput:
        seen.append(hidden.shape[0])
        return fused_logprobs(hidden, *args, **kwargs)

    monkeypatch.setattr(model_logprobs_module, "fused_logprobs", spy)
    b = _batch()
    model_token_logprobs(
        _tiny_llama(), b["input_ids"], b["attention_mask"], b["targets"], b["loss_mask"],
        fused=True, chunk_size=5,
    )  # fmt: skip
    assert seen == [int(b["loss_mask"].sum())] == [14]


@pytest.mark.parametrize(("budget", "expect_fused"), [(2**24, False), (4 * 14 * 97 - 1, True)])
def test_auto_mode_fuses_only_when_naive_logits_exceed_one_tile(
    monkeypatch: pytest.MonkeyPatch, budget: int, expect_fused: bool
) -> None:
    # N = 14 selected tokens × V = 97 × 4 bytes = 5,432 bytes of naive logits.
    monkeypatch.setattr(model_logprobs_module, "TILE_BUDGET_BYTES", budget)
    calls: list[str] = []

    def recording(name: str, fn: Callable[..., FusedLogprobOutput]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> FusedLogprobOutput:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(model_logprobs_module, "fused_logprobs", recording("fused", fused_logprobs))
    monkeypatch.setattr(model_logprobs_module, "naive_logprobs", recording("naive", naive_logprobs))
    b = _batch()
    model_token_logprobs(
        _tiny_llama(), b["input_ids"], b["attention_mask"], b["targets"], b["loss_mask"]
    )
    assert calls == ["fused" if expect_fused else "naive"]


def test_lora_lm_head_gradients_equal_the_peft_model_forward() -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "lm_head"],
        init_lora_weights=False,  # B ≠ 0, so the head's adapter changes the logits
    )
    model = peft.get_peft_model(_tiny_llama(), config)
    b = _batch()
    want, want_grads = _values_and_grads(model, b, fused=None)
    got, got_grads = _values_and_grads(model, b, fused=True)
    assert any("lm_head.lora_A" in name for name in want_grads)
    assert got_grads.keys() == want_grads.keys()
    _close(got.logprobs, want.logprobs)
    for name, grad in want_grads.items():
        _close(got_grads[name], grad, msg=name)


def test_lora_dropout_on_the_head_in_training_mode_is_refused() -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["lm_head"])
    model = peft.get_peft_model(_tiny_llama(), config).train()
    b = _batch()
    with pytest.raises(NotImplementedError, match="dropout"):
        model_token_logprobs(
            model, b["input_ids"], b["attention_mask"], b["targets"], b["loss_mask"], fused=True
        )


def test_models_that_transform_logits_are_refused() -> None:
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    b = _batch()
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        model_token_logprobs(
            model, b["input_ids"], b["attention_mask"], b["targets"], b["loss_mask"], fused=True
        )
