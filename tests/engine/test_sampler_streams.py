"""Per-row random streams of the HF sampler: the uniforms' quality (`stream_uniforms`) and the
batch invariance they buy (a row's sample is a function of its prompt, seed, stream id and
sample index, whatever else is in the batch)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from cispo.engine import sampler as sampler_module
from cispo.engine.sampler import HFSampler, sample, stream_seed, stream_uniforms
from cispo.types import SampledSequence, SamplingParams
from tests.engine.test_sampler import EOS, PAD, PROMPTS_P_T, TOK, _model

# Ten of the tiny model's likelier characters stop a row, so rows finish at different steps and
# are dropped from the batch.
STOPS: list[int] = TOK.encode("qXZ]>-&'1e", add_special_tokens=False)
PROMPTS = [*PROMPTS_P_T, TOK.encode("3*4="), TOK.encode("abc")]


def _chi2_quantile(q_z: float, dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + q_z * math.sqrt(a)) ** 3


Z_999 = 3.090  # the standard normal's 0.999 quantile: each check fails 1 time in 1000 by chance


def _ks_statistic(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of u and the uniform CDF."""
    x = np.sort(u)
    n = len(x)
    i = np.arange(1, n + 1)
    return float(max((i / n - x).max(), (x - (i - 1) / n).max()))


def _chi2(counts: np.ndarray, expected: float) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_stream_uniforms_are_uniform_on_0_1_by_ks_and_chi_square() -> None:
    u = stream_uniforms(12345, list(range(64)), 8, range(256)).ravel()  # 131,072 draws
    n = len(u)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    # KS at level 0.001: sqrt(n)·D exceeds 1.949 with probability 0.001 for uniform draws.
    assert math.sqrt(n) * _ks_statistic(u) < 1.949
    counts = np.bincount((u * 1000).astype(int), minlength=1000)
    assert _chi2(counts, n / 1000) < _chi2_quantile(Z_999, 999)
    # 53 bits each: no two of 131k draws coincide (expected collisions ~1e-6).
    assert len(np.unique(u)) == n


@pytest.mark.parametrize("neighbour", ["seed", "stream", "sample", "step"])
def test_neighbouring_keys_give_independent_looking_uniforms(neighbour: str) -> None:
    """u at (seed, stream, g, t) against u at the key with one component + 1: uncorrelated,
    and the pairs fill the unit square evenly (2-D chi-square on 20 × 20 cells)."""
    seed, streams, G, steps = 7, list(range(0, 128, 2)), 8, range(0, 128, 2)
    base = stream_uniforms(seed, streams, G, steps)  # [64·8, 64]
    if neighbour == "seed":
        other = stream_uniforms(seed + 1, streams, G, steps)
    elif neighbour == "stream":
        other = stream_uniforms(seed, [s + 1 for s in streams], G, steps)
    elif neighbour == "sample":
        other = stream_uniforms(seed, streams, G + 1, steps).reshape(len(streams), G + 1, -1)
        base = base.reshape(len(streams), G, -1)[:, :-1]
        other = other[:, 1:G]
    else:
        other = stream_uniforms(seed, streams, G, range(1, 129, 2))
    x, y = base.ravel(), other.ravel()
    n = len(x)
    assert abs(float(np.corrcoef(x, y)[0, 1])) < Z_999 / math.sqrt(n)
    cells = np.bincount((x * 20).astype(int) * 20 + (y * 20).astype(int), minlength=400)
    assert _chi2(cells, n / 400) < _chi2_quantile(Z_999, 399)


def test_a_uniform_is_a_function_of_its_own_key_only() -> None:
    """The same (seed, stream, g, t) gives the same value whatever the other streams, the number
    of samples or the window of steps in the call; and equal stream ids give equal rows."""
    whole = stream_uniforms(3, [4, 9, 4], 5, range(0, 12))  # [15, 12]
    part = stream_uniforms(3, [9], 2, range(5, 9))  # stream 9, samples 0-1, steps 5-8
    np.testing.assert_array_equal(part, whole[5:7, 5:9])
    np.testing.assert_array_equal(whole[0:5], whole[10:15])
    assert not np.array_equal(whole[0:5], whole[5:10])
    assert stream_seed(42, 0) == 42 and stream_seed(42, 1) != stream_seed(42, 2)
    assert 0 <= stream_seed(42, 2**64 - 1) < 2**63


def _kw(**extra: Any) -> dict[str, Any]:
    return {"eos_token_id": EOS, "pad_token_id": PAD, **extra}


def _check_same(
    got: list[list[SampledSequence]], want: list[list[SampledSequence]], tol: float = 1e-5
) -> None:
    assert len(got) == len(want)
    for seqs_g, seqs_w in zip(got, want, strict=True):
        for g, w in zip(seqs_g, seqs_w, strict=True):
            assert g.tokens == w.tokens and g.stop_reason == w.stop_reason
            assert g.logprobs == pytest.approx(w.logprobs, abs=tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_a_subset_with_its_stream_ids_equals_those_rows_of_the_whole_batch(
    temperature: float,
) -> None:
    model = _model()
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=21, stop=STOPS)
    whole = sample(model, PROMPTS, 4, params, **_kw())
    lengths = {len(s.tokens) for sg in whole for s in sg}
    assert len(lengths) > 2, "rows should finish at different steps (and be dropped)"
    subset = [3, 0, 4]  # out of order, and without the others
    part = sample(model, [PROMPTS[i] for i in subset], 4, params, **_kw(stream_ids=subset))
    _check_same(part, [whole[i] for i in subset])
    # Rank-style slices (what each rank of a torchrun run samples) give the whole batch back.
    slices = [range(0, 3), range(3, 5)]
    joined = [
        group
        for s in slices
        for group in sample(model, [PROMPTS[i] for i in s], 4, params, **_kw(stream_ids=list(s)))
    ]
    _check_same(joined, whole)


def test_a_seeded_prompts_samples_do_not_depend_on_the_other_prompts_or_their_order() -> None:
    model = _model()
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=4, stop=STOPS)
    (alone,) = sample(model, [PROMPTS[1]], 3, params, **_kw(stream_ids=[0]))
    batched = sample(model, PROMPTS, 3, params, **_kw(stream_ids=[0] * len(PROMPTS)))
    backwards = sample(model, PROMPTS[::-1], 3, params, **_kw(stream_ids=[0] * len(PROMPTS)))
    _check_same([batched[1]], [alone])
    _check_same([backwards[len(PROMPTS) - 2]], [alone])
    assert len({tuple(s.tokens) for s in alone}) > 1, "the samples of the group are all the same"


def test_same_seed_and_streams_same_samples_and_another_seed_or_stream_different() -> None:
    model = _model()

    def run(seed: int | None, streams: list[int] | None = None, **kw: Any) -> Any:
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=seed, stop=STOPS)
        return sample(model, PROMPTS, 2, params, **_kw(stream_ids=streams, **kw))

    a = run(5)
    assert a == run(5) and a == run(5, list(range(len(PROMPTS))))  # default: stream id = index
    assert a != run(6)
    other_streams = run(5, [10, 11, 12, 13, 14])
    assert all(x != y for x, y in zip(a, other_streams, strict=True))
    # Unseeded: the base seed is one draw from the generator, so equal generators reproduce.
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert run(None, generator=g1) == run(None, generator=g2)
    assert run(None, generator=g1) != run(None, generator=torch.Generator().manual_seed(10))


def test_tables_cut_into_chunks_of_steps_give_the_same_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long `max_tokens` computes the uniforms a chunk of steps at a time; the samples are
    those of one table (here chunks of 3 steps against the default 256)."""
    model = _model()
    params = SamplingParams(max_tokens=11, temperature=1.0, seed=8, stop=STOPS)
    one_table = sample(model, PROMPTS, 3, params, **_kw())
    monkeypatch.setattr(sampler_module, "_UNIFORM_CHUNK", 3)
    _check_same(sample(model, PROMPTS, 3, params, **_kw()), one_table, tol=0.0)


@pytest.mark.parametrize(
    ("streams", "match"),
    [
        ([0, 1], r"stream_ids has 2 entries for 3 prompts"),
        ([0, -1, 2], r"stream_ids\[1\]=-1 must be in \[0, 2\^64\)"),
        ([0, 2**64, 2], r"stream_ids\[1\]=18446744073709551616 must be in"),
        ([0, True, 2], r"stream_ids\[1\] must be an integer, got True"),
        ([0, 1.0, 2], r"stream_ids\[1\] must be an integer, got 1.0"),
    ],
)
def test_bad_stream_ids_are_refused_naming_the_field(streams: list[Any], match: str) -> None:
    model = _model()
    sampler = HFSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    state = sampler.generator.get_state()
    with pytest.raises(ValueError, match=match):
        sampler.sample(PROMPTS_P_T, 1, SamplingParams(max_tokens=2), streams)
    assert torch.equal(sampler.generator.get_state(), state)  # nothing drawn
