"""make_loss_config and the LOSSES registry: Tinker names, keys and defaults."""

import math

import pytest

from cispo.losses import (
    LOSSES,
    CispoConfig,
    DroConfig,
    GSPOConfig,
    ImportanceSamplingConfig,
    PPOConfig,
    make_loss_config,
)


def test_registry_names_match_tinker_and_make_loss_config() -> None:
    tinker = {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}
    assert tinker <= set(LOSSES)
    assert set(LOSSES) == tinker | {"gspo", "reinforce"}


def test_unknown_loss_fn_error_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown loss_fn 'grpo'; valid: \['cispo', 'cross_"):
        make_loss_config("grpo")


def test_unknown_key_error_names_key_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'epsilon_high'.*'clip_high_threshold'"):
        make_loss_config("cispo", {"epsilon_high": 5.0})
    with pytest.raises(ValueError, match="unknown key 'anchor' for loss_fn='reinforce'"):
        make_loss_config("reinforce", {"anchor": "old"})


def test_tinker_cispo_default_is_one_sided_0_4_sampler_anchor_sum() -> None:
    cfg = make_loss_config("cispo")
    assert isinstance(cfg.objective, CispoConfig)
    assert (cfg.objective.ratio_min, cfg.objective.ratio_max) == (0.0, 4.0)
    assert cfg.objective.anchor == "sampler"
    assert cfg.reduction == "sum"


def test_tinker_ppo_default_is_0_8_1_2() -> None:
    cfg = make_loss_config("ppo")
    assert isinstance(cfg.objective, PPOConfig)
    assert (1 - cfg.objective.eps_low, 1 + cfg.objective.eps_high) == pytest.approx((0.8, 1.2))


def test_tinker_thresholds_are_absolute() -> None:
    cfg = make_loss_config("ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.28})
    assert isinstance(cfg.objective, PPOConfig)
    assert (cfg.objective.eps_low, cfg.objective.eps_high) == pytest.approx((0.3, 0.28))
    cispo = make_loss_config("cispo", {"clip_high_threshold": 5.0})
    assert isinstance(cispo.objective, CispoConfig)
    assert cispo.objective.ratio_max == 5.0


def test_importance_sampling_is_unclamped_by_default() -> None:
    cfg = make_loss_config("importance_sampling")
    assert isinstance(cfg.objective, ImportanceSamplingConfig)
    assert (cfg.objective.ratio_min, cfg.objective.ratio_max) == (0.0, math.inf)


def test_dro_requires_beta() -> None:
    with pytest.raises(ValueError, match="needs loss_fn_config\\['beta'\\]"):
        make_loss_config("dro")
    dro = make_loss_config("dro", {"beta": 0.05}).objective
    assert isinstance(dro, DroConfig) and dro.beta == 0.05


def test_both_names_for_one_bound_are_refused() -> None:
    with pytest.raises(ValueError, match="either 'clip_high_threshold' or 'ratio_max'"):
        make_loss_config("cispo", {"clip_high_threshold": 4.0, "ratio_max": 5.0})


def test_overrides_and_reduction_kwarg_win_over_loss_fn_config() -> None:
    cfg = make_loss_config(
        "cispo", {"reduction": "sum", "kl_coef": 0.1}, reduction="token_mean", kl_coef=0.2
    )
    assert (cfg.reduction, cfg.kl_coef) == ("token_mean", 0.2)


def test_correction_keys_build_a_correction_and_need_old_anchor() -> None:
    cfg = make_loss_config(
        "cispo",
        {
            "anchor": "old",
            "correction": "mis",
            "correction_level": "sequence",
            "correction_sequence_stat": "product",
            "correction_ratio_max": 5.0,
        },
    )
    assert cfg.correction is not None
    assert (cfg.correction.kind, cfg.correction.level, cfg.correction.sequence_stat) == (
        "mis",
        "sequence",
        "product",
    )
    with pytest.raises(ValueError, match="corrects twice"):
        make_loss_config("cispo", {"correction": "tis"})
    with pytest.raises(ValueError, match="correction is None"):
        make_loss_config("cispo", {"correction_ratio_max": 5.0})


def test_sequence_level_cispo_through_make_loss_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="use loss_fn='gspo'"):
        make_loss_config("cispo", {"ratio_level": "sequence"})


def test_sequence_level_ppo_through_make_loss_config_points_to_gspo() -> None:
    with pytest.raises(ValueError, match="use loss_fn='gspo'"):
        make_loss_config("ppo", {"ratio_level": "sequence"})
    assert make_loss_config("ppo", {"ratio_level": "token"}).name == "ppo"


def test_gspo_defaults_to_sequence_ratio_with_paper_clip_range() -> None:
    cfg = make_loss_config("gspo")
    assert isinstance(cfg.objective, GSPOConfig)
    assert cfg.objective.ratio_level == "sequence"
    assert (cfg.objective.eps_low, cfg.objective.eps_high) == (3e-4, 4e-4)


def test_loss_config_describe_names_band_and_active_terms() -> None:
    cfg = make_loss_config(
        "cispo", {"anchor": "old", "correction": "tis", "kl_coef": 0.01}, opsm_delta=1e-4
    )
    assert cfg.describe() == (
        "CISPO weight band [0, 4] (one-sided: no lower bound), anchor=old; "
        "correction tis token [0, 2]; opsm delta=0.0001; kl k3 coef 0.01"
    )
    assert make_loss_config("ppo").describe() == "PPO clip [0.8, 1.2] (token ratio), anchor=sampler"
    assert make_loss_config("reinforce").describe() == "reinforce"
