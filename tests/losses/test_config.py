"""Configs: each converter maps to the band the named system documents; degenerate bands.

Documented meanings (each system's source; docs/losses.md lists the snapshots read):
  additive clamp(r, 1 - eps_low, 1 + eps_high): verl clip_ratio_low/high (defaults 0.2/0.2),
  NeMo-RL ratio_clip_min/max (CISPO recipe 1.0/5.0), slime/miles eps_clip/eps_clip_high
  (recommended 1.0/4.0), AReaL eps_clip/eps_clip_higher (recommended 1.0/4.0),
  SkyRL-train cispo_eps_clip_low/high (defaults 1.0/4.0).
  absolute min(r, epsilon_high): TRL / ms-swift / Liger loss_type="cispo" (docs: 5.0).
  absolute clamp(r, low, high): Tinker clip_low/high_threshold (CISPO default 0.0/4.0).
"""

import math
from typing import Any

import pytest

from cispo.losses import (
    CispoConfig,
    CorrectionConfig,
    GSPOConfig,
    LossConfig,
    PPOConfig,
    ReinforceConfig,
)


@pytest.mark.parametrize(
    ("config", "band"),
    [
        (CispoConfig.from_nemo_rl(ratio_clip_min=1.0, ratio_clip_max=5.0), (0.0, 6.0)),
        (CispoConfig.from_absolute_cap(epsilon_high=5.0), (0.0, 5.0)),  # TRL / ms-swift
        (CispoConfig.from_skyrl(), (0.0, 5.0)),  # defaults 1.0 / 4.0
        (CispoConfig.from_verl(), (0.8, 1.2)),  # defaults 0.2 / 0.2: two-sided, legitimate
        (CispoConfig.from_verl(clip_ratio_low=10.0, clip_ratio_high=0.2), (0.0, 1.2)),
        (CispoConfig.from_slime(eps_clip=1.0, eps_clip_high=4.0), (0.0, 5.0)),
        (CispoConfig.from_slime(eps_clip=0.2), (0.8, 1.2)),  # eps_clip_high None -> eps_clip
        (CispoConfig.from_areal(eps_clip=1.0, eps_clip_higher=4.0), (0.0, 5.0)),
        (CispoConfig.from_tinker(), (0.0, 4.0)),
        (CispoConfig.from_additive(1.0, 4.0), (0.0, 5.0)),  # ScaleRL clip(r, 0, 5)
    ],
)
def test_converter_maps_to_the_band_the_system_documents(
    config: CispoConfig, band: tuple[float, float]
) -> None:
    assert (config.ratio_min, config.ratio_max) == pytest.approx(band)


def test_additive_converters_anchor_on_old_and_tinker_on_sampler() -> None:
    assert CispoConfig.from_nemo_rl(1.0, 5.0).anchor == "old"
    assert CispoConfig.from_tinker().anchor == "sampler"


def test_trl_unset_epsilon_high_trap_is_rejected_with_explanation() -> None:
    # TRL/ms-swift fall back to epsilon_high = epsilon = 0.2 as an absolute cap.
    with pytest.raises(ValueError, match="epsilon_high unset"):
        CispoConfig.from_absolute_cap(epsilon_high=0.2)
    assert CispoConfig.from_absolute_cap(0.2, allow_degenerate=True).ratio_max == 0.2


def test_lower_bound_above_one_is_rejected_unless_allowed() -> None:
    # A floor above 1 up-weights every token, even on-policy (r = 1).
    with pytest.raises(ValueError, match=r"ratio_min=1\.5 > 1"):
        CispoConfig(ratio_min=1.5, ratio_max=6.0)
    assert CispoConfig(ratio_min=1.5, ratio_max=6.0, allow_degenerate=True).ratio_min == 1.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio_min": -0.1}, "negative"),
        ({"ratio_min": 3.0, "ratio_max": 2.0, "allow_degenerate": True}, "empty band"),
        ({"ratio_max": math.nan}, "NaN"),
        ({"anchor": "rollout"}, r"anchor='rollout' is not one of \['old', 'sampler'\]"),
    ],
)
def test_invalid_band_is_always_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CispoConfig(**kwargs)


def test_negative_additive_offsets_are_rejected() -> None:
    with pytest.raises(ValueError, match="offsets must be >= 0"):
        CispoConfig.from_additive(-0.1, 4.0)


def test_areal_requires_positive_eps_clip_higher_like_areal() -> None:
    with pytest.raises(ValueError, match="eps_clip_higher > 0"):
        CispoConfig.from_areal(eps_clip=1.0)


def test_sequence_level_cispo_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="sequence-level ratio is not defined"):
        CispoConfig(ratio_level="sequence")


@pytest.mark.parametrize(
    ("config", "text"),
    [
        (CispoConfig(), "CISPO weight band [0, 4] (one-sided: no lower bound), anchor=sampler"),
        (CispoConfig.from_verl(), "CISPO weight band [0.8, 1.2] (two-sided), anchor=old"),
        (CispoConfig(ratio_max=0.2, allow_degenerate=True), "[0, 0.2] (degenerate"),
    ],
)
def test_describe_prints_the_effective_band(config: CispoConfig, text: str) -> None:
    assert text in config.describe()


def test_ppo_presets_are_settings_of_one_config() -> None:
    assert (PPOConfig.grpo().eps_low, PPOConfig.grpo().eps_high) == (0.2, 0.2)
    assert (PPOConfig.dapo().eps_low, PPOConfig.dapo().eps_high) == (0.2, 0.28)
    assert PPOConfig.gspo().ratio_level == "sequence"
    assert isinstance(PPOConfig.gspo(), GSPOConfig) and PPOConfig.gspo().anchor == "old"
    assert PPOConfig().ratio_level == "token"
    tinker = PPOConfig.from_tinker(0.8, 1.2)
    assert (tinker.eps_low, tinker.eps_high) == pytest.approx((0.2, 0.2))


def test_dual_clip_c_must_exceed_one() -> None:
    with pytest.raises(ValueError, match="dual_clip_c"):
        PPOConfig(dual_clip_c=1.0)


def test_correction_with_sampler_anchor_is_refused_to_avoid_double_correction() -> None:
    with pytest.raises(ValueError, match="corrects twice"):
        LossConfig(objective=CispoConfig(anchor="sampler"), correction=CorrectionConfig())
    ok = LossConfig(objective=CispoConfig(anchor="old"), correction=CorrectionConfig())
    assert ok.correction is not None


def test_loss_config_checks_objective_type_reduction_and_max_len() -> None:
    with pytest.raises(ValueError, match="objective must be one of the loss configs"):
        LossConfig(objective=CorrectionConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction='mean' is not one of"):
        LossConfig(objective=ReinforceConfig(), reduction="mean")
    with pytest.raises(ValueError, match="needs max_len"):
        LossConfig(objective=ReinforceConfig(), reduction="seq_mean_token_sum_norm")


def test_loss_config_name_is_the_objective_class_name_so_it_cannot_disagree() -> None:
    # LossConfig(loss_fn="gspo", objective=PPOConfig()) used to be possible to state wrongly;
    # the name now comes from the objective's class.
    assert LossConfig(objective=PPOConfig()).name == "ppo"
    assert LossConfig(objective=GSPOConfig()).name == "gspo"
    assert LossConfig(objective=PPOConfig.gspo()).name == "gspo"
    assert LossConfig(objective=CispoConfig()).name == "cispo"
