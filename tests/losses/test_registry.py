"""The loss registry is the single source of loss names, and every number is range-checked."""

import math
import re
from typing import Any, get_args

import pytest
import torch

from cispo.losses import (
    LOSSES,
    CispoConfig,
    CorrectionConfig,
    DroConfig,
    GSPOConfig,
    ImportanceSamplingConfig,
    LossConfig,
    LossInputs,
    OPSMConfig,
    PPOConfig,
    ReinforceConfig,
    compute_loss,
    make_loss_config,
    required_inputs,
)
from cispo.losses.config import ObjectiveConfig
from cispo.losses.make_config import COMMON_KEYS
from cispo.losses.registry import entry_of

NAN, INF = math.nan, math.inf
# The one key some losses need: DRO has no default beta (Tinker documents none).
NEEDED: dict[str, dict[str, float]] = {"dro": {"beta": 0.1}}


# --- One table -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_name_round_trips_through_make_loss_config(name: str) -> None:
    cfg = make_loss_config(name, NEEDED.get(name))
    assert cfg.name == name
    assert type(cfg.objective) is LOSSES[name].config_type
    assert LossConfig(objective=cfg.objective).name == name


def test_every_config_class_maps_to_exactly_one_name() -> None:
    classes = [entry.config_type for entry in LOSSES.values()]
    assert len(set(classes)) == len(classes) == len(LOSSES)
    # The annotation union lists the same classes as the table, no more, no fewer.
    assert set(get_args(ObjectiveConfig)) == set(classes)
    for name, entry in LOSSES.items():
        assert entry.config_type.name == name
    # GSPO is a PPO subclass but has its own name: lookup is by exact class.
    assert issubclass(GSPOConfig, PPOConfig)
    assert entry_of(GSPOConfig()).name == "gspo" and entry_of(PPOConfig()).name == "ppo"


def test_unknown_name_error_lists_the_registry_names() -> None:
    expected = f"unknown loss_fn 'grpo'; valid: {sorted(LOSSES)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_loss_config("grpo")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_make_loss_config_accepts_exactly_the_entry_keys_plus_common_keys(name: str) -> None:
    own = set(LOSSES[name].keys)
    for other in LOSSES.values():
        for key in set(other.keys) - own - set(COMMON_KEYS):
            with pytest.raises(ValueError, match=f"unknown key '{key}' for loss_fn='{name}'"):
                make_loss_config(name, {**NEEDED.get(name, {}), key: 1.0})


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compute_loss_runs_the_registry_term_of_the_config_class(name: str) -> None:
    # Sum reduction, no extra terms: the loss is the sum of the entry's per-token term.
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(2, 3, generator=gen, dtype=torch.float64) - 0.1
    inputs = {
        "logprobs": lp,
        "sampler_logprobs": lp + 0.3 * torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(2, 3, generator=gen, dtype=torch.float64),
    }
    mask = torch.ones(2, 3, dtype=torch.bool)
    cfg = make_loss_config(name, NEEDED.get(name))
    assert set(required_inputs(cfg)) <= {*inputs, "weights"}
    out = compute_loss(LossInputs(loss_mask=mask, **inputs), cfg)
    term = LOSSES[name].term(inputs, mask, cfg.objective)
    assert out.loss.item() == pytest.approx(term.loss.sum().item(), rel=1e-12, abs=1e-12)
    assert out.metrics["loss/value"] == pytest.approx(out.loss.item())


def test_required_inputs_come_from_the_entry() -> None:
    assert "advantages" not in required_inputs(make_loss_config("cross_entropy"))
    assert set(required_inputs(make_loss_config("reinforce"))) == {"advantages"}
    assert set(required_inputs(make_loss_config("gspo", anchor="old"))) == {
        "advantages",
        "old_logprobs",
    }


def test_train_loss_settings_build_every_registered_loss_by_name() -> None:
    from cispo.config import LossSettings

    for name in sorted(set(LOSSES) - set(NEEDED)):
        settings = LossSettings(name=name)
        assert make_loss_config(name, settings.loss_fn_config()).name == name
    with pytest.raises(ValueError, match=re.escape("loss.name = 'grpo'")) as refused:
        LossSettings(name="grpo")
    assert all(repr(name) in str(refused.value) for name in LOSSES)  # the registry's names


# --- Finite and in range -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field", "value", "interval"),
    [
        (lambda v: CispoConfig(ratio_max=v), "ratio_max", NAN, "[0, inf]"),
        (lambda v: CispoConfig(ratio_min=v, ratio_max=INF), "ratio_min", INF, "[0, inf)"),
        (lambda v: PPOConfig(eps_high=v), "eps_high", NAN, "[0, inf]"),
        (lambda v: PPOConfig(eps_high=v), "eps_high", -0.1, "[0, inf]"),
        (lambda v: PPOConfig(eps_low=v), "eps_low", NAN, "[0, 1]"),
        (lambda v: PPOConfig(eps_low=v), "eps_low", 1.5, "[0, 1]"),
        (lambda v: PPOConfig(dual_clip_c=v), "dual_clip_c", NAN, "(1, inf)"),
        (lambda v: PPOConfig(dual_clip_c=v), "dual_clip_c", INF, "(1, inf)"),
        (lambda v: GSPOConfig(eps_high=v), "eps_high", NAN, "[0, inf]"),
        (lambda v: ImportanceSamplingConfig(ratio_max=v), "ratio_max", NAN, "[0, inf]"),
        (lambda v: ImportanceSamplingConfig(ratio_min=v), "ratio_min", NAN, "[0, inf)"),
        (lambda v: DroConfig(beta=v), "beta", NAN, "[0, inf)"),
        (lambda v: DroConfig(beta=v), "beta", INF, "[0, inf)"),
        (lambda v: DroConfig(beta=v), "beta", -1.0, "[0, inf)"),
        (lambda v: CorrectionConfig(ratio_max=v), "correction ratio_max", NAN, "[0, inf]"),
        (lambda v: CorrectionConfig(ratio_min=v), "correction ratio_min", -1.0, "[0, inf)"),
        (lambda v: OPSMConfig(delta=v), "opsm_delta", NAN, "[0, inf)"),
        (lambda v: OPSMConfig(delta=v), "opsm_delta", -1e-4, "[0, inf)"),
        (lambda v: _loss(kl_coef=v), "kl_coef", NAN, "[0, inf)"),
        (lambda v: _loss(kl_coef=v), "kl_coef", INF, "[0, inf)"),
        (lambda v: _loss(kl_coef=v), "kl_coef", -0.1, "[0, inf)"),
        (lambda v: _loss(entropy_coef=v), "entropy_coef", NAN, "[0, inf)"),
        (lambda v: _loss(entropy_coef=v), "entropy_coef", INF, "[0, inf)"),
        (lambda v: _loss(fork_prob_threshold=v), "fork_prob_threshold", NAN, "(0, 1)"),
        (lambda v: _loss(fork_prob_threshold=v), "fork_prob_threshold", 1.0, "(0, 1)"),
    ],
)
def test_every_float_parameter_rejects_nan_and_out_of_range_naming_field_value_and_range(
    build: Any, field: str, value: float, interval: str
) -> None:
    shown = "nan" if math.isnan(value) else repr(value)
    pattern = f"{re.escape(field)}={re.escape(shown)} .*{re.escape(interval)}"
    with pytest.raises(ValueError, match=pattern):
        build(value)


def _loss(**kwargs: Any) -> LossConfig:
    return LossConfig(objective=ReinforceConfig(), **kwargs)


@pytest.mark.parametrize("value", [-5, 0, 2.5, True])
def test_max_len_must_be_a_positive_integer_even_when_unused(value: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"max_len={value!r} must be an integer >= 1")):
        _loss(max_len=value)
    with pytest.raises(ValueError, match="max_len="):
        make_loss_config("cispo", max_len=value)


def test_max_len_sent_as_a_whole_float_is_accepted() -> None:
    # The server's wire decodes every number as a float.
    cfg = make_loss_config("cispo", {"reduction": "seq_mean_token_sum_norm", "max_len": 64.0})
    assert cfg.max_len == 64 and isinstance(cfg.max_len, int)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        # Before: eps_high = NaN - 1 was accepted and the loss came out NaN.
        (
            "ppo",
            {"clip_high_threshold": NAN},
            "clip_high_threshold=nan is NaN; allowed range [1, inf]",
        ),
        (
            "ppo",
            {"clip_low_threshold": 1.5},
            "clip_low_threshold=1.5 is outside the allowed range [0, 1]",
        ),
        (
            "gspo",
            {"clip_high_threshold": 0.5},
            "clip_high_threshold=0.5 is outside the allowed range [1, inf]",
        ),
        (
            "cispo",
            {"clip_high_threshold": NAN},
            "clip_high_threshold=nan is NaN; allowed range [0, inf]",
        ),
        ("importance_sampling", {"clip_low_threshold": NAN}, "clip_low_threshold=nan is NaN"),
        ("dro", {"beta": NAN}, "beta=nan is NaN; allowed range [0, inf]"),
        ("cispo", {"eps_high": 1.0}, "unknown key 'eps_high'"),
        ("ppo", {"eps_high": "x"}, "eps_high='x' is not a number; allowed range [0, inf]"),
        # Before: accepted and ignored.
        ("cispo", {"kl_coef": NAN}, "kl_coef=nan is NaN; allowed range [0, inf)"),
        ("cispo", {"entropy_coef": NAN}, "entropy_coef=nan is NaN; allowed range [0, inf)"),
        ("cispo", {"opsm_delta": NAN}, "opsm_delta=nan is NaN; allowed range [0, inf)"),
        (
            "cispo",
            {"anchor": "old", "correction": "tis", "correction_ratio_max": NAN},
            "correction ratio_max=nan",
        ),
        (
            "reinforce",
            {"fork_prob_threshold": NAN},
            "fork_prob_threshold=nan is NaN; allowed range (0, 1)",
        ),
    ],
)
def test_make_loss_config_names_the_key_the_caller_passed(
    name: str, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_loss_config(name, config)


def test_numbers_in_range_including_open_upper_bounds_are_accepted() -> None:
    assert make_loss_config("importance_sampling").objective == ImportanceSamplingConfig(
        ratio_max=INF
    )
    ppo = make_loss_config("ppo", {"clip_high_threshold": INF, "clip_low_threshold": 0.0})
    assert isinstance(ppo.objective, PPOConfig)
    assert (ppo.objective.eps_low, ppo.objective.eps_high) == (1.0, INF)
    assert make_loss_config("cispo", {"kl_coef": "0.5"}).kl_coef == 0.5  # numeric text, as v2
    assert make_loss_config("cispo", opsm_delta=0).opsm == OPSMConfig(delta=0.0)
