"""fused_logprobs vs naive_logprobs: values and gradients, fp32 to 1e-5, bf16 within a bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from cispo.ops import fused_logprobs, naive_logprobs, vocab_block_size

FP32_RTOL = FP32_ATOL = 1e-5
BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significand bits, round to nearest


def _inputs(
    n: int, v: int, h: int, *, scale: float = 2.0, seed: int = 0, bias: bool = True
) -> dict[str, Tensor | None]:
    """hidden [N, H], weight [V, H] with logits of std ≈ scale, bias [V], targets [N], grads [N]."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(n, h, generator=gen),
        "weight": torch.randn(v, h, generator=gen) * scale / math.sqrt(h),
        "bias": torch.randn(v, generator=gen) if bias else None,
        "targets": torch.randint(0, v, (n,), generator=gen),
        "g_lp": torch.randn(n, generator=gen),
        "g_ent": torch.randn(n, generator=gen),
    }


def _run(
    fn: str,
    x: dict[str, Tensor | None],
    *,
    use_lp: bool = True,
    use_ent: bool = True,
    dtype: torch.dtype = torch.float32,
    **kwargs: object,
) -> dict[str, Tensor | None]:
    """Values and gradients of L = Σ g_lp·logprob + Σ g_ent·entropy (either term optional)."""
    # Fresh leaves each run: the dict's tensors are shared between the naive and fused runs.
    hidden = x["hidden"].to(dtype).clone().requires_grad_()  # type: ignore[union-attr]
    weight = x["weight"].to(dtype).clone().requires_grad_()  # type: ignore[union-attr]
    bias = x["bias"].to(dtype).clone().requires_grad_() if x["bias"] is not None else None
    targets = x["targets"]
    assert targets is not None
    if fn == "fused":
        out = fused_logprobs(hidden, weight, targets, bias=bias, with_entropy=use_ent, **kwargs)  # type: ignore[arg-type]
    else:
        out = naive_logprobs(hidden, weight, targets, bias=bias, with_entropy=use_ent, **kwargs)  # type: ignore[arg-type]
    g_lp, g_ent = x["g_lp"], x["g_ent"]
    assert g_lp is not None and g_ent is not None
    loss = torch.zeros(())
    if use_lp:
        loss = loss + (out.logprobs * g_lp).sum()
    if use_ent:
        assert out.entropy is not None
        loss = loss + (out.entropy * g_ent).sum()
    torch.autograd.backward(loss)
    return {
        "logprobs": out.logprobs.detach(),
        "entropy": out.entropy.detach() if out.entropy is not None else None,
        "hidden": hidden.grad,
        "weight": weight.grad,
        "bias": bias.grad if bias is not None else None,
    }


def _assert_all_close(got: dict[str, Tensor | None], want: dict[str, Tensor | None]) -> None:
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            got_value = got[key]
            assert got_value is not None, key
            torch.testing.assert_close(got_value, value, rtol=FP32_RTOL, atol=FP32_ATOL, msg=key)


def _assert_fused_equals_naive(
    x: dict[str, Tensor | None],
    temperature: float,
    chunk_size: int,
    vocab_chunk_size: int | None,
) -> None:
    """Values and gradients of the fused kernel with these tiles equal the naive path's."""
    want = _run("naive", x, temperature=temperature)
    got = _run(
        "fused",
        x,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    _assert_all_close(got, want)


@pytest.mark.parametrize(
    ("chunk_size", "vocab_chunk_size"),
    [(1, 1), (7, 10), (16, 32), (50, None), (64, 103), (1024, None), (7, 200)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_equals_naive_in_fp32_for_every_tile_shape(
    chunk_size: int, vocab_chunk_size: int | None, temperature: float
) -> None:
    # N = 50 is not a multiple of 7 or 16; V = 103 is prime, so no vocab block divides it.
    _assert_fused_equals_naive(_inputs(50, 103, 24), temperature, chunk_size, vocab_chunk_size)


@pytest.mark.parametrize(("use_lp", "use_ent"), [(True, False), (False, True)])
def test_fused_gradient_from_one_output_alone_equals_naive(use_lp: bool, use_ent: bool) -> None:
    # (False, True) is a pure entropy bonus: the backward gets grad_logprobs = None.
    x = _inputs(33, 61, 8)
    want = _run("naive", x, use_lp=use_lp, use_ent=use_ent, temperature=1.3)
    got = _run(
        "fused", x, use_lp=use_lp, use_ent=use_ent, temperature=1.3, chunk_size=10,
        vocab_chunk_size=16,
    )  # fmt: skip
    _assert_all_close(got, want)


def test_fused_without_entropy_returns_none_and_naive_gradients() -> None:
    x = _inputs(20, 40, 8, bias=False)
    want = _run("naive", x, use_ent=False)
    got = _run("fused", x, use_ent=False, chunk_size=6)
    assert got["entropy"] is None
    _assert_all_close(got, want)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 70),
    h=st.integers(1, 12),
    chunk_size=st.integers(1, 45),
    vocab_chunk_size=st.integers(1, 80),
    temperature=st.floats(0.3, 2.0),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_naive_for_random_shapes(
    n: int,
    v: int,
    h: int,
    chunk_size: int,
    vocab_chunk_size: int,
    temperature: float,
    bias: bool,
    seed: int,
) -> None:
    x = _inputs(n, v, h, seed=seed, bias=bias)
    _assert_fused_equals_naive(x, temperature, chunk_size, vocab_chunk_size)


def test_fused_backward_passes_gradcheck_in_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])

    def f(hid: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        out = fused_logprobs(
            hid,
            w,
            targets,
            bias=b,
            temperature=0.8,
            chunk_size=2,
            vocab_chunk_size=3,
            with_entropy=True,
        )
        assert out.entropy is not None
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-6)


def test_temperature_divides_logits_before_softmax_closed_form() -> None:
    # One token, V = 3, logits (1, 2, 3), T = 2 → z = (0.5, 1, 1.5).
    # Σ e^z = 1.64872 + 2.71828 + 4.48169 = 8.84869, lse = 2.18026.
    # logprob[target 2] = 1.5 − 2.18026 = −0.68026.
    # p = (0.18632, 0.30720, 0.50648); H = −Σ p log p = 0.31307 + 0.36257 + 0.34454 = 1.02019.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[1.0], [2.0], [3.0]])
    for fn in (fused_logprobs, naive_logprobs):
        out = fn(hidden, weight, torch.tensor([2]), temperature=2.0, with_entropy=True)
        assert out.logprobs.item() == pytest.approx(-0.68026, abs=2e-5)
        assert out.entropy is not None
        assert out.entropy.item() == pytest.approx(1.02019, abs=2e-5)


def test_minus_inf_bias_gives_finite_values_and_naive_gradients() -> None:
    # A −inf bias bans vocab entries (p = 0). p·log p must count as 0, and no NaN may reach a
    # gradient, though log p = −inf there.
    x = _inputs(30, 50, 8)
    banned = torch.arange(0, 50, 3)
    bias = x["bias"]
    assert bias is not None
    bias[banned] = -math.inf
    bias[:3] = -math.inf  # the whole first vocab block: the online max starts at −inf
    targets = x["targets"]
    assert targets is not None
    targets[torch.isin(targets, banned) | (targets < 3)] = 4  # 4 is not banned
    banned = torch.cat([banned, torch.tensor([1, 2])])
    want = _run("naive", x, temperature=0.9)
    got = _run("fused", x, temperature=0.9, chunk_size=8, vocab_chunk_size=7)
    for key in ("logprobs", "entropy", "hidden", "weight"):
        assert torch.isfinite(got[key]).all(), key  # type: ignore[arg-type]
    bias_grad = got["bias"]
    assert bias_grad is not None
    assert torch.isfinite(bias_grad).all()
    assert (bias_grad[banned] == 0).all()
    _assert_all_close(got, want)


def test_target_on_a_banned_entry_gives_minus_inf_logprob_and_finite_gradients() -> None:
    x = _inputs(6, 11, 4)
    bias = x["bias"]
    assert bias is not None
    bias[5] = -math.inf
    x["targets"] = torch.tensor([5, 0, 5, 2, 3, 4])
    want = _run("naive", x)
    got = _run("fused", x, chunk_size=4, vocab_chunk_size=4)
    assert torch.equal(got["logprobs"][[0, 2]], torch.full((2,), -math.inf))  # type: ignore[index]
    for key in ("hidden", "weight"):
        assert torch.isfinite(got[key]).all(), key  # type: ignore[arg-type]
    _assert_all_close(got, want)


def test_huge_logits_stay_finite_and_match_naive() -> None:
    # Logits of order 1e3 overflow exp() without the max shift; relative agreement is what fp32
    # matmuls of that size give (absolute ulp of 1e3 is 6e-5).
    x = _inputs(25, 40, 8, scale=2000.0, bias=False)
    want = _run("naive", x)
    got = _run("fused", x, chunk_size=6, vocab_chunk_size=9)
    for key, value in want.items():
        if value is None:  # no bias
            continue
        assert torch.isfinite(got[key]).all(), key  # type: ignore[arg-type]
        scale = value.abs().max().clamp(min=1.0)
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5 * scale.item())


def test_bf16_logprobs_within_documented_bound_of_fp32_reference() -> None:
    # Bound (docstring of fused_logprobs): the only bf16 error is the rounding of each logit,
    # |δz| ≤ u·|z| with u = 2^-8, and log_softmax is 1-Lipschitz per entry in the max norm, so
    # |δ logprob| ≤ 2u·max_j|z_j| and, to first order, |δ entropy| ≤ 2u·max_j|z_j|·H.
    x = _inputs(200, 1000, 64, scale=6.0, bias=False)
    hidden, weight = x["hidden"].bfloat16(), x["weight"].bfloat16()  # type: ignore[union-attr]
    targets = x["targets"]
    assert targets is not None
    ref = naive_logprobs(hidden.float(), weight.float(), targets, with_entropy=True)
    got = fused_logprobs(
        hidden, weight, targets, chunk_size=37, vocab_chunk_size=300, with_entropy=True
    )
    assert got.logprobs.dtype == torch.float32
    z_max = (hidden.float() @ weight.float().t()).abs().amax(1)
    assert (got.logprobs - ref.logprobs).abs().max() > 0  # bf16 really differs from fp32
    assert ((got.logprobs - ref.logprobs).abs() <= 2 * BF16_UNIT_ROUNDOFF * z_max).all()
    assert got.entropy is not None and ref.entropy is not None
    ent_bound = 2 * BF16_UNIT_ROUNDOFF * z_max * ref.entropy + 1e-4
    assert ((got.entropy - ref.entropy).abs() <= ent_bound).all()


def test_bf16_gradients_within_two_percent_of_fp32_and_match_naive_bf16() -> None:
    # Gradients: relative Frobenius error vs the fp32 reference ≤ 2% (measured ≈ 0.5%), and the
    # fused and naive bf16 paths agree to 1% (both round logits and dL/dz to bf16 the same way).
    x = _inputs(120, 500, 32, scale=3.0)
    # Inputs rounded to bf16 first, so the fp32 reference differs only in the arithmetic.
    x_b = {
        k: (v.bfloat16().float() if v is not None and v.is_floating_point() else v)
        for k, v in x.items()
    }
    ref = _run("naive", x_b)
    got = _run("fused", x_b, dtype=torch.bfloat16, chunk_size=50, vocab_chunk_size=128)
    naive_b = _run("naive", x_b, dtype=torch.bfloat16)
    for key in ("hidden", "weight", "bias"):
        g, r, nb = got[key], ref[key], naive_b[key]
        assert g is not None and r is not None and nb is not None
        assert g.dtype == torch.bfloat16
        rel = ((g.float() - r).norm() / r.norm()).item()
        assert rel <= 2e-2, (key, rel)
        assert ((g.float() - nb.float()).norm() / nb.float().norm()).item() <= 1e-2, key


def test_fused_saves_no_tensor_of_tokens_times_vocab_size() -> None:
    # The memory claim: autograd keeps only [N, H], [V, H] and [N] tensors, never [N, V].
    n, v, h = 256, 512, 8

    def largest_saved(fn: str) -> int:
        sizes: list[int] = []

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel())
            return t

        x = _inputs(n, v, h)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _run(fn, x, chunk_size=32, vocab_chunk_size=64) if fn == "fused" else _run(fn, x)
        return max(sizes)

    assert largest_saved("naive") >= n * v  # the check can see [N, V]...
    assert largest_saved("fused") <= max(n, v) * h  # ...and the fused path saves none


def test_no_grad_forward_equals_grad_forward() -> None:
    x = _inputs(19, 23, 5)
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    assert hidden is not None and weight is not None and targets is not None
    with torch.no_grad():
        cold = fused_logprobs(hidden, weight, targets, chunk_size=4, with_entropy=True)
    warm = fused_logprobs(hidden.requires_grad_(), weight, targets, chunk_size=4, with_entropy=True)
    assert torch.equal(cold.logprobs, warm.logprobs.detach())
    assert cold.entropy is not None and warm.entropy is not None
    assert torch.equal(cold.entropy, warm.entropy.detach())


def test_default_vocab_block_fills_a_16_mib_tile() -> None:
    # 16 MiB / (4 bytes · rows): 4096 at the default 1024 rows, never more than V, at least 1.
    assert vocab_block_size(1024, 151_936) == 4096
    assert vocab_block_size(14, 97) == 97
    assert vocab_block_size(10**9, 50) == 1


@pytest.mark.parametrize(
    ("chunk_size", "vocab_chunk_size", "temperature", "match"),
    [
        (0, None, 1.0, "chunk_size"),
        (8, 0, 1.0, "vocab_chunk_size"),
        (8, None, 0.0, "temperature"),
        (8, None, -1.0, "temperature"),
    ],
)
def test_invalid_settings_are_rejected(
    chunk_size: int, vocab_chunk_size: int | None, temperature: float, match: str
) -> None:
    hidden, weight, targets = torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        fused_logprobs(
            hidden,
            weight,
            targets,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            temperature=temperature,
        )


def test_frozen_weight_gets_no_gradient_and_hidden_gradient_is_unchanged() -> None:
    # A frozen lm_head (LoRA elsewhere): the backward skips dL/dW but dL/dh must not change.
    x = _inputs(21, 30, 6, bias=False)
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    assert hidden is not None and weight is not None and targets is not None
    grads = []
    for fn in (naive_logprobs, fused_logprobs):
        h = hidden.clone().requires_grad_()
        out = fn(h, weight, targets, with_entropy=True)  # fused: one [21, 30] tile
        assert out.entropy is not None
        torch.autograd.backward((out.logprobs + 0.1 * out.entropy).sum())
        grads.append(h.grad)
    assert not weight.requires_grad and weight.grad is None
    torch.testing.assert_close(grads[1], grads[0], rtol=FP32_RTOL, atol=FP32_ATOL)


def test_zero_tokens_give_empty_outputs_and_zero_gradients() -> None:
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    out = fused_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert out.logprobs.shape == (0,)
    assert out.entropy is not None
    torch.autograd.backward(out.logprobs.sum() + out.entropy.sum())
    assert weight.grad is not None and (weight.grad == 0).all()
