"""Contract tests of `cispo.engine.vllm_sampler.VLLMSampler` against a fake engine that emits
vLLM-shaped outputs (tests/engine/fake_vllm.py), and the `gpu` tests against real vLLM, which
skip without CUDA or vllm (never run here). The sampler conformance suite runs the adapter too
(tests/engine/test_sampler_protocol.py, "vllm-fake")."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from cispo.datums import rl_datum
from cispo.engine.engine import Engine
from cispo.engine.vllm_sampler import LOGPROBS_MODE, VLLMSampler, vllm_sampling_kwargs
from cispo.models import ModelBundle
from cispo.types import SamplingParams
from tests.engine.fake_vllm import (
    CompletionOutput,
    FakeLLM,
    FakeSamplingParams,
    Logprob,
    RequestOutput,
)
from tests.train.helpers import tiny_bundle

PROMPTS = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]


def _sampler(bundle: ModelBundle, mode: str = LOGPROBS_MODE) -> VLLMSampler:
    model = copy.deepcopy(bundle.model)
    engine = FakeLLM(model, eos_token_id=bundle.tokenizer.eos_token_id, logprobs_mode=mode)
    return VLLMSampler(
        engine, weight_names=model.state_dict().keys(), sampling_params_cls=FakeSamplingParams
    )


def _trainer(bundle: ModelBundle, groups: list[list], temperature: float) -> list[torch.Tensor]:
    engine = Engine(bundle.model, eos_token_id=None, pad_token_id=0)
    datums = [
        rl_datum(p, s.tokens, s.logprobs, 1.0)
        for p, g in zip(PROMPTS, groups, strict=True)
        for s in g
    ]
    out = engine.forward_backward(
        datums, "importance_sampling", forward_only=True, temperature=temperature
    )
    return [
        o["logprobs"].to_torch()[d.loss_fn_inputs["mask"].to_torch() > 0]
        for d, o in zip(datums, out.loss_fn_outputs, strict=True)
    ]


def test_processed_logprobs_are_the_trainers_and_vllms_default_raw_ones_are_not() -> None:
    """At T = 0.7, "processed_logprobs" = log softmax(logits / T) (the trainer's, 1e-5 per
    token); vLLM's default "raw_logprobs" is taken before the temperature and misses it by
    more than 0.05: the mode the adapter requires is the one that matters."""
    bundle = tiny_bundle()
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=2, stop=[])
    for mode, close in (("processed_logprobs", True), ("raw_logprobs", False)):
        groups = _sampler(bundle, mode).sample(PROMPTS, 3, params)
        trainer = _trainer(bundle, groups, 0.7)
        sampled = [torch.tensor(s.logprobs) for g in groups for s in g]
        worst = max(float((s - t).abs().max()) for s, t in zip(sampled, trainer, strict=True))
        assert (worst <= 1e-5) if close else (worst > 5e-2), (mode, worst)


@pytest.mark.parametrize(("field", "value"), [("top_k", 5), ("top_p", 0.9)])
def test_top_k_and_top_p_are_refused_naming_the_field(field: str, value: float) -> None:
    sampler = _sampler(tiny_bundle())
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=0, **{field: value})
    with pytest.raises(ValueError, match=f"{field}={value}"):
        sampler.sample(PROMPTS, 2, params)


def test_sampling_params_map_onto_vllms() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.5, seed=9, stop=[3, "##"])
    assert vllm_sampling_kwargs(params, 4) == {
        "n": 4,
        "temperature": 0.5,
        "max_tokens": 7,
        "seed": 9,
        "logprobs": 0,
        "detokenize": True,
        "stop_token_ids": [3],
        "stop": ["##"],
    }
    no_stop = vllm_sampling_kwargs(SamplingParams(max_tokens=2, stop=[]), 1)
    assert no_stop["ignore_eos"] is True and "stop_token_ids" not in no_stop


class _Canned:
    """An engine that returns fixed vLLM-shaped outputs."""

    def __init__(self, outputs: list[RequestOutput]) -> None:
        self.outputs = outputs

    def generate(self, prompts: list[dict[str, list[int]]], sampling_params: object) -> list:
        return self.outputs

    def load_weights(self, weights: object) -> None:
        raise AssertionError("not used")

    def fingerprint(self) -> float:
        return 0.0


def _completion(index: int, logprobs: list | None, reason: str | None) -> CompletionOutput:
    return CompletionOutput(index, "", [5, 6], -1.5, logprobs, reason)


def test_vllm_outputs_become_sampled_sequences_in_index_order() -> None:
    # Each position's dict holds the sampled token and other top tokens, as vLLM's may.
    lp = [{5: Logprob(-0.5, 1), 9: Logprob(-1.0, 2)}, {7: Logprob(-0.1, 1), 6: Logprob(-1.0, 2)}]
    out = RequestOutput(
        "0", None, [1], None, [_completion(1, lp, "length"), _completion(0, lp, "stop")], True
    )
    sampler = VLLMSampler(_Canned([out]), weight_names=[], sampling_params_cls=FakeSamplingParams)
    (group,) = sampler.sample([[1]], 2, SamplingParams(max_tokens=2))
    assert [s.stop_reason for s in group] == ["stop", "length"]  # sorted by index
    assert group[0].tokens == [5, 6] and group[0].logprobs == [-0.5, -1.0]


@pytest.mark.parametrize(
    ("logprobs", "reason", "message"),
    [
        (None, "stop", "logprobs_mode='processed_logprobs'"),
        ([{5: Logprob(-0.5)}, {6: Logprob(-0.2)}], "abort", "abort"),
        ([{5: Logprob(-0.5)}, {7: Logprob(-0.2)}], "length", "lack a sampled token"),
    ],
)
def test_malformed_vllm_outputs_are_errors(
    logprobs: list | None, reason: str, message: str
) -> None:
    out = RequestOutput("0", None, [1], None, [_completion(0, logprobs, reason)], True)
    sampler = VLLMSampler(_Canned([out]), weight_names=[], sampling_params_cls=FakeSamplingParams)
    with pytest.raises(RuntimeError, match=message):
        sampler.sample([[1]], 1, SamplingParams(max_tokens=2))


# ------------------------------------------------------------------ real vLLM (never run here)


def _real_vllm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@pytest.mark.gpu
@pytest.mark.skipif(
    not _real_vllm_available(), reason="needs CUDA and vllm (pip install cispo[vllm])"
)
def test_real_vllm_sampled_logprobs_are_the_trainers(tmp_path: Path) -> None:
    """Real vLLM in float32 on an exported tiny model: sampled logprobs within 1e-3 of the
    trainer's at T = 0.7, and load_weights moves vLLM to the trainer's new weights."""
    bundle = tiny_bundle()
    bundle.model.save_pretrained(str(tmp_path))
    bundle.tokenizer.save_pretrained(str(tmp_path))
    sampler = VLLMSampler.from_pretrained(
        str(tmp_path), dtype="float32", max_logprobs=-1, enforce_eager=True
    )
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=2, stop=[])
    groups = sampler.sample(PROMPTS, 3, params)
    trainer = _trainer(bundle, groups, 0.7)
    sampled = [torch.tensor(s.logprobs) for g in groups for s in g]
    for s, t in zip(sampled, trainer, strict=True):
        torch.testing.assert_close(s, t, atol=1e-3, rtol=0)


def test_each_stream_gets_its_own_vllm_seed_and_stream_0_the_requests_seed() -> None:
    """With a seed, prompt i's vLLM request is seeded with `stream_seed(seed, stream_ids[i])`:
    the same prompt on two streams samples differently, on equal streams identically, and
    stream 0 is the request's own seed (vLLM's per-request seed, what the server sends)."""
    bundle = tiny_bundle()
    sampler = _sampler(bundle)
    engine = sampler.engine
    assert isinstance(engine, FakeLLM)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=4, stop=[])
    same = [PROMPTS[0], PROMPTS[0]]
    two_streams = sampler.sample(same, 3, params, [0, 5])
    one_stream = sampler.sample(same, 3, params, [5, 5])
    assert two_streams[0] != two_streams[1] and one_stream[0] == one_stream[1]
    assert two_streams[1] == one_stream[0]
    direct = engine.generate(
        [{"prompt_token_ids": PROMPTS[0]}],
        FakeSamplingParams(**vllm_sampling_kwargs(params, 3)),  # seed=4 itself
    )
    assert [list(c.token_ids) for c in direct[0].outputs] == [s.tokens for s in two_streams[0]]
    with pytest.raises(ValueError, match=r"stream_ids has 1 entries for 2 prompts"):
        sampler.sample(same, 3, params, [0])
