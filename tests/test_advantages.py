"""Advantage estimators: hand-worked values, properties, and a plain-loop reference."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cispo.advantages import ESTIMATORS, compute_advantages

NAN = math.nan
MEAN_CENTRED = ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"]
GROUP_BASELINE = ["grpo", "dr_grpo", "rloo", "loo", "reinforce_pp_baseline"]


def adv(rewards: list[list[float]], estimator: str, **params: float) -> torch.Tensor:
    out = compute_advantages(torch.tensor(rewards, dtype=torch.float64), estimator, **params)
    return out.advantages


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9
    )


# --- Hand-worked values ------------------------------------------------------------------------


def test_grpo_unbiased_z_score_by_hand() -> None:
    # r = [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25],
    # unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std = 0.5 -> A = dev / 0.5.
    close(adv([[1, 0, 0, 0]], "grpo", eps=0.0), [[1.5, -0.5, -0.5, -0.5]])
    # eps is added to std: 0.75 / 0.6 = 1.25, -0.25 / 0.6 = -0.41666...
    close(adv([[1, 0, 0, 0]], "grpo", eps=0.1), [[1.25, -0.25 / 0.6, -0.25 / 0.6, -0.25 / 0.6]])


def test_grpo_biased_std_by_hand() -> None:
    # Population var = 0.75 / 4 = 0.1875, std = sqrt(3)/4 -> A = [sqrt(3), -1/sqrt(3) x3].
    s3 = math.sqrt(3)
    close(adv([[1, 0, 0, 0]], "grpo", eps=0.0, unbiased=False), [[s3, -1 / s3, -1 / s3, -1 / s3]])


def test_grpo_default_eps_is_1e_minus_6() -> None:
    # Same group as above: 0.75 / (0.5 + 1e-6).
    assert adv([[1, 0, 0, 0]], "grpo")[0, 0].item() == pytest.approx(0.75 / 0.500001, rel=1e-12)


def test_dr_grpo_only_centres() -> None:
    # mean = 0.25; groups are independent: second group [3, 1] has mean 2.
    close(
        adv([[1, 0, 0, 0], [3, 1, 2, 2]], "dr_grpo"), [[0.75, -0.25, -0.25, -0.25], [1, -1, 0, 0]]
    )


def test_rloo_subtracts_mean_of_the_others() -> None:
    # r_0 = 1, others {0, 0, 0} -> 1 - 0 = 1; r_1 = 0, others {1, 0, 0} -> 0 - 1/3.
    third = 1 / 3
    close(adv([[1, 0, 0, 0]], "rloo"), [[1, -third, -third, -third]])


def test_loo_population_std_option_divides_only_where_it_is_positive() -> None:
    # unbiased=False: population std of the others.
    # r = [1, 0, 0, 0]:
    # i = 0: others {0, 0, 0}: b = 0, std = 0 -> no division: A = 1 - 0 = 1.
    # i = 1: others {1, 0, 0}: b = 1/3, var = 1/3 - 1/9 = 2/9, std = sqrt(2)/3
    #        -> A = (0 - 1/3) / (sqrt(2)/3) = -1/sqrt(2).
    h = 1 / math.sqrt(2)
    close(adv([[1, 0, 0, 0]], "loo", eps=0.0, unbiased=False), [[1, -h, -h, -h]])
    # r = [1, 1, 0, 0]: i = 0: others {1, 0, 0}: b = 1/3, std = sqrt(2)/3 -> (2/3)/(sqrt(2)/3)
    # = sqrt(2); by symmetry the zeros get -sqrt(2).
    r2 = math.sqrt(2)
    close(adv([[1, 1, 0, 0]], "loo", eps=0.0, unbiased=False), [[r2, r2, -r2, -r2]])


def test_loo_default_is_nemo_rl_bessel_corrected_leave_one_out_std() -> None:
    # NeMo-RL, nemo_rl/algorithms/utils.py, calculate_baseline_and_std_per_prompt: with n valid
    # rewards, num_valid = n - 1 others, var = (mean_sq - mean^2) * num_valid / (num_valid - 1);
    # GRPOAdvantageEstimator divides (r - b) by (std + 1e-6) where std > 0.
    # r = [0, 1, 2, 3], n = 4, 3 others each:
    # i = 0: others {1, 2, 3}: b = 2, mean_sq = 14/3, var_pop = 14/3 - 4 = 2/3,
    #        var = 2/3 * 3/2 = 1, std = 1 -> A_0 = (0 - 2) / (1 + 1e-6).
    #        (The population std sqrt(2/3) would give -2.449.)
    # i = 1: others {0, 2, 3}: b = 5/3, mean_sq = 13/3, var_pop = 13/3 - 25/9 = 14/9,
    #        var = 14/9 * 3/2 = 7/3 -> A_1 = (1 - 5/3) / (sqrt(7/3) + 1e-6).
    # By symmetry (r -> 3 - r) A_2 = -A_1 and A_3 = -A_0.
    a0 = -2 / (1 + 1e-6)
    a1 = (-2 / 3) / (math.sqrt(7 / 3) + 1e-6)
    close(adv([[0, 1, 2, 3]], "loo"), [[a0, a1, -a1, -a0]])
    # The same row with the population option is measurably different at i = 0.
    assert adv([[0, 1, 2, 3]], "loo", unbiased=False)[0, 0].item() == pytest.approx(
        -2 / (math.sqrt(2 / 3) + 1e-6), rel=1e-12
    )


def test_loo_small_groups_and_nan_rewards_follow_nemo_rl_valid_mask() -> None:
    # NeMo-RL: <= 1 valid reward -> baseline = reward -> A = 0; 2 valid -> one other, its
    # variance 0 times 1/(1 - 1) = inf is NaN, nan_to_num -> std 0 -> A_i = r_i - r_j undivided.
    # A NaN reward here is a sample with valid_mask 0: left out, advantage 0.
    # Rows: [1, NaN, 0] -> n = 2: A = [1 - 0, 0, 0 - 1];  [NaN, 5, NaN] -> n = 1: all 0;
    #       [2, 0.5, NaN] -> n = 2: A = [1.5, -1.5, 0].
    close(
        adv([[1, NAN, 0], [NAN, 5, NAN], [2, 0.5, NAN]], "loo"),
        [[1, 0, -1], [0, 0, 0], [1.5, -1.5, 0]],
    )


def test_loo_unbiased_std_by_hand() -> None:
    # r = [2, 0, 0, 1]; i = 0: others {0, 0, 1}: b = 1/3, unbiased var = (1/9+1/9+4/9)/2 = 1/3
    # -> A_0 = (2 - 1/3) / sqrt(1/3) = (5/3) * sqrt(3).
    a = adv([[2, 0, 0, 1]], "loo", eps=0.0)
    assert a[0, 0].item() == pytest.approx(5 / 3 * math.sqrt(3), rel=1e-12)


def test_loo_does_not_divide_rounding_noise_by_eps() -> None:
    # Others of the last sample are {0.1, 0.1, 0.1}: their float64 mean is 0.10000000000000002,
    # so a `std > 0` test would see std ~1e-17 and divide by ~1e-6. Exactly equal others mean
    # no division: A_3 = 0.7 - 0.1 = 0.6.
    a = adv([[0.1, 0.1, 0.1, 0.7]], "loo")
    assert a[0, 3].item() == pytest.approx(0.6, abs=1e-12)


def test_reinforce_pp_whitens_over_the_whole_batch() -> None:
    # Batch [1, 0, 0, 0] (two prompts of two): mean 0.25, population var 0.1875
    # -> A = (r - 0.25) / sqrt(0.1875) = [sqrt(3), -1/sqrt(3), ...]; no per-group centring.
    s3 = math.sqrt(3)
    close(adv([[1, 0], [0, 0]], "reinforce_pp"), [[s3, -1 / s3], [-1 / s3, -1 / s3]])
    # Unbiased: var = 0.75 / 3 = 0.25, std = 0.5.
    close(adv([[1, 0], [0, 0]], "reinforce_pp", unbiased=True), [[1.5, -0.5], [-0.5, -0.5]])


def test_reinforce_pp_var_min_bounds_the_scale() -> None:
    # r = [1, 0]: population var 0.25 < var_min = 4 -> divide by sqrt(4) = 2: A = [0.25, -0.25].
    close(adv([[1, 0]], "reinforce_pp", var_min=4.0), [[0.25, -0.25]])


def test_reinforce_pp_baseline_centres_per_group_then_whitens_batch() -> None:
    # [[1, 0], [3, 1]] -> centred [[0.5, -0.5], [1, -1]]; population var over the batch
    # (0.25 + 0.25 + 1 + 1) / 4 = 0.625 -> A = x / sqrt(0.625) = x * 1.264911064...
    k = 1 / math.sqrt(0.625)
    close(adv([[1, 0], [3, 1]], "reinforce_pp_baseline"), [[0.5 * k, -0.5 * k], [k, -k]])


def test_nan_reward_is_left_out_of_grpo_statistics_by_hand() -> None:
    # [1, NaN, 0, 0]: valid {1, 0, 0}, mean 1/3, unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3,
    # std = 1/sqrt(3) -> A = [(2/3) * sqrt(3), 0, -(1/3) * sqrt(3), -(1/3) * sqrt(3)].
    out = compute_advantages(torch.tensor([[1.0, NAN, 0.0, 0.0]], dtype=torch.float64), eps=0.0)
    s3 = math.sqrt(3)
    close(out.advantages, [[2 / 3 * s3, 0.0, -s3 / 3, -s3 / 3]])
    assert out.num_nan_rewards == 1
    assert out.metrics["advantage/nan_reward_frac"] == 0.25


def test_counts_zero_variance_groups_and_reports_metrics() -> None:
    # Groups: constant, varied, all NaN (no verdict: not counted), one valid reward (constant).
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [NAN, NAN], [NAN, 0.5]])
    out = compute_advantages(rewards, "grpo")
    assert out.num_zero_std_groups == 2
    assert out.num_nan_rewards == 3
    assert out.metrics["advantage/zero_std_group_frac"] == 0.5
    # Valid advantages: 0, 0, +-0.7071 (std of [1, 0] is 1/sqrt(2)), 0 -> min/max +-1/sqrt(2).
    assert out.metrics["advantage/max"] == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert out.metrics["advantage/min"] == pytest.approx(-1 / math.sqrt(2), rel=1e-5)
    assert out.metrics["advantage/mean"] == pytest.approx(0.0, abs=1e-7)
    assert all(k.startswith("advantage/") for k in out.metrics)
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_keeps_float32_dtype() -> None:
    out = compute_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float32), "loo")
    assert out.advantages.dtype == torch.float32


# --- Errors ------------------------------------------------------------------------------------


def test_unknown_estimator_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown estimator 'ppo'.*grpo, dr_grpo, rloo, loo"):
        compute_advantages(torch.zeros(1, 2), "ppo")


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(ValueError, match=r"\['epsilon'\].*'grpo'.*accepted: \['eps', 'unbiased'\]"):
        compute_advantages(torch.zeros(1, 2), "grpo", epsilon=1e-4)
    with pytest.raises(ValueError, match=r"\['eps'\].*'rloo'.*accepted: none"):
        compute_advantages(torch.zeros(1, 2), "rloo", eps=1e-4)


@pytest.mark.parametrize(
    "rewards", [torch.zeros(4), torch.zeros(2, 2, 2), torch.zeros(2, 2, dtype=torch.long)]
)
def test_rejects_non_2d_or_non_float_rewards(rewards: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"floating \[P, G\]"):
        compute_advantages(rewards)


def test_rejects_infinite_rewards() -> None:
    with pytest.raises(ValueError, match="inf"):
        compute_advantages(torch.tensor([[1.0, math.inf]]))


def test_rejects_negative_eps() -> None:
    with pytest.raises(ValueError, match="eps must be >= 0"):
        compute_advantages(torch.zeros(1, 2), "grpo", eps=-1.0)


# --- Plain-Python reference --------------------------------------------------------------------


def _pstd(xs: list[float], unbiased: bool) -> float:
    if len(xs) - int(unbiased) <= 0 or len(set(xs)) <= 1:
        return 0.0
    return statistics.stdev(xs) if unbiased else statistics.pstdev(xs)


def reference(rows: list[list[float]], estimator: str) -> list[list[float]]:
    """Default parameters of each estimator, one sample at a time."""
    out = []
    for row in rows:
        valid = [x for x in row if not math.isnan(x)]
        n, mean = len(valid), (sum(valid) / len(valid) if valid else 0.0)
        constant = len(set(valid)) <= 1
        res = []
        for i, x in enumerate(row):
            if math.isnan(x) or (constant and estimator != "reinforce_pp"):
                res.append(0.0)
            elif estimator in ("grpo", "dr_grpo", "reinforce_pp_baseline"):
                std = _pstd(valid, unbiased=True) if estimator == "grpo" else 0.0
                res.append((x - mean) / (std + 1e-6) if std > 0 else x - mean)
            elif estimator == "rloo":
                res.append(x - (sum(valid) - x) / (n - 1))
            elif estimator == "loo":
                others = [y for j, y in enumerate(row) if j != i and not math.isnan(y)]
                b, s = sum(others) / len(others), _pstd(others, unbiased=True)
                res.append((x - b) / (s + 1e-6) if s > 0 else x - b)
            else:  # reinforce_pp: filled in below, needs the whole batch
                res.append(x)
        out.append(res)
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        # Whiten over the batch; the baseline variant's values are already centred (mean 0).
        flat_rows = [x for row in rows for x in row]
        pairs = list(zip(flat_rows, [v for res in out for v in res], strict=True))
        valid_all = [v for x, v in pairs if not math.isnan(x)]
        mu = statistics.fmean(valid_all) if estimator == "reinforce_pp" and valid_all else 0.0
        var = statistics.fmean([(v - mu) ** 2 for v in valid_all]) if valid_all else 0.0
        scale = math.sqrt(max(var, 1e-8))
        constant_batch = len(set(valid_all)) <= 1
        flat = [0.0 if math.isnan(x) or constant_batch else (v - mu) / scale for x, v in pairs]
        width = len(rows[0])
        out = [flat[i : i + width] for i in range(0, len(flat), width)]
    return out


# Rewards drawn from a small set so that ties, constant groups and NaN all occur often.
reward_values = st.sampled_from([0.0, 0.0, 1.0, 1.0, 0.5, -2.0, 0.1, 3.25, NAN])


@st.composite
def reward_batches(draw: st.DrawFn, min_group: int = 1) -> list[list[float]]:
    num_prompts = draw(st.integers(1, 4))
    group = draw(st.integers(min_group, 6))
    row = st.lists(reward_values, min_size=group, max_size=group)
    return draw(st.lists(row, min_size=num_prompts, max_size=num_prompts))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@settings(max_examples=150, deadline=None)
@given(rows=reward_batches())
def test_vectorised_matches_plain_loop(estimator: str, rows: list[list[float]]) -> None:
    actual = adv(rows, estimator)
    expected = torch.tensor(reference(rows, estimator), dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@settings(max_examples=100, deadline=None)
@given(rows=reward_batches())
def test_output_is_finite_and_zero_at_nan_rewards(estimator: str, rows: list[list[float]]) -> None:
    rewards = torch.tensor(rows, dtype=torch.float64)
    out = compute_advantages(rewards, estimator)
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[rewards.isnan()] == 0).all()
    assert out.num_nan_rewards == int(rewards.isnan().sum())


@pytest.mark.parametrize("estimator", MEAN_CENTRED)
@settings(max_examples=100, deadline=None)
@given(rows=reward_batches())
def test_mean_centred_group_advantages_sum_to_zero(estimator: str, rows: list[list[float]]) -> None:
    sums = adv(rows, estimator).sum(dim=-1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(rows=reward_batches())
def test_reinforce_pp_batch_advantages_sum_to_zero(rows: list[list[float]]) -> None:
    total = adv(rows, "reinforce_pp").sum()
    assert abs(total.item()) < 1e-9


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@given(
    value=st.floats(-100, 100, allow_nan=False),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 6)),
)
@settings(max_examples=50, deadline=None)
def test_constant_rewards_give_exact_zeros(
    estimator: str, value: float, shape: tuple[int, int]
) -> None:
    out = compute_advantages(torch.full(shape, value, dtype=torch.float64), estimator)
    assert (out.advantages == 0).all()
    assert out.num_zero_std_groups == shape[0]


@pytest.mark.parametrize("estimator", GROUP_BASELINE)
@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.lists(reward_values, min_size=1, max_size=1), min_size=1, max_size=8))
def test_group_of_one_gives_zero(estimator: str, rows: list[list[float]]) -> None:
    assert (adv(rows, estimator) == 0).all()


def test_reinforce_pp_is_not_group_based_so_group_of_one_still_learns() -> None:
    # G = 1, batch [1, 2]: mean 1.5, population std 0.5 -> A = [-1, 1].
    close(adv([[1.0], [2.0]], "reinforce_pp"), [[-1.0], [1.0]])
