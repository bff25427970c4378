"""fused_topk_logprobs vs the full-softmax reference: same ids, logprobs to 1e-5 in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from tests.train.helpers import SMALL

from cispo.ops.topk_logprobs import (
    fused_topk_logprobs,
    model_topk_logprobs,
    naive_topk_logprobs,
)


@pytest.mark.parametrize(
    ("k", "chunk", "vocab_chunk", "temperature"),
    [(1, 8, 64, 1.0), (5, 8, 64, 0.7), (100, 16, 64, 1.3), (300, 1024, None, 1.0)],
    ids=["k1", "k5_tiled", "k_larger_than_a_vocab_block", "one_tile"],
)
def test_fused_topk_equals_the_full_softmax_reference(
    k: int, chunk: int, vocab_chunk: int | None, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    n, v, h = 37, 1000, 16
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 3 / math.sqrt(h)
    bias = torch.randn(v, generator=gen)
    got_lp, got_ids = fused_topk_logprobs(
        hidden,
        weight,
        k,
        bias=bias,
        temperature=temperature,
        chunk_size=chunk,
        vocab_chunk_size=vocab_chunk,
    )
    want_lp, want_ids = naive_topk_logprobs(hidden, weight, k, bias=bias, temperature=temperature)
    assert got_lp.shape == got_ids.shape == (n, k)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-5)
    assert bool((got_lp[:, :-1] >= got_lp[:, 1:]).all()), "not sorted descending"


def test_k_outside_one_to_vocab_is_refused() -> None:
    hidden, weight = torch.zeros(2, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, vocab size 10\]"):
        fused_topk_logprobs(hidden, weight, 11)
    with pytest.raises(ValueError, match="k must be"):
        fused_topk_logprobs(hidden, weight, 0)


def test_model_topk_matches_log_softmax_of_the_models_logits() -> None:
    from cispo.models import load_bundle

    model = load_bundle("tiny", overrides=SMALL).model.eval()
    tokens = [1, 20, 21, 30, 5, 6, 7, 40]
    got_lp, got_ids = model_topk_logprobs(model, tokens, range(2, 7), 4, temperature=0.8)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, 2:7].float()
    want_lp, want_ids = torch.log_softmax(logits / 0.8, -1).topk(4, -1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-5)
