"""The loss registry: one table, `LOSSES`, from a loss name to everything that name means.

Each `LossEntry` holds the objective's config class (whose `name` is the table key), the
per-token term `compute_loss` runs, the objective-specific `loss_fn_config` keys
`make_loss_config` accepts, the builder from a Tinker-style flat dict to the config, and the
`LossInputs` fields the objective reads. `make_loss_config`, `compute_loss`, `required_inputs`
and the server's advertised loss list all read this table; adding a loss means adding a config
class in `config.py` and one entry here.

A term maps the cleaned inputs (masked and non-finite positions already zeroed, all [B, T]) to
the per-token loss [B, T], the analytic d loss_t / d logp_t [B, T] (for the fork-token metric)
and the objective's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from cispo.losses import metrics, objectives
from cispo.losses.config import (
    CispoConfig,
    CrossEntropyConfig,
    DroConfig,
    GSPOConfig,
    ImportanceSamplingConfig,
    ObjectiveConfig,
    PPOConfig,
    ReinforceConfig,
    as_number,
    check_range,
)

Clean = dict[str, Tensor]
"""LossInputs fields by name, [B, T] each, zero at inactive positions."""


@dataclass(frozen=True)
class Term:
    loss: Tensor
    """[B, T] per-token objective, not reduced."""
    grad_coef: Tensor
    """[B, T] d loss_t / d logp_t, analytic, for the fork-token metric."""
    metrics: dict[str, float]


C = TypeVar("C", bound=ObjectiveConfig)


@dataclass(frozen=True, kw_only=True)
class LossEntry(Generic[C]):
    config_type: type[C]
    """The objective's config class; its `name` ClassVar is this entry's key in LOSSES."""
    term: Callable[[Clean, Tensor, C], Term]
    """(cleaned inputs, active mask [B, T], config) -> per-token Term."""
    keys: tuple[str, ...]
    """Objective-specific loss_fn_config keys (besides the common ones in make_config.py)."""
    build: Callable[[Mapping[str, Any]], C]
    """Flat Tinker-style dict (only `keys` present) -> config. Missing keys take the defaults."""
    reads_advantages: bool = True
    """Whether the objective reads LossInputs.advantages (all but cross_entropy)."""

    @property
    def name(self) -> str:
        return self.config_type.name


def anchor_field(anchor: str) -> str:
    """The LossInputs field a ratio's denominator comes from."""
    return "old_logprobs" if anchor == "old" else "sampler_logprobs"


# --------------------------------------------------------------------------------------------
# Per-token terms.


def _cispo(x: Clean, mask: Tensor, cfg: CispoConfig) -> Term:
    lp, anchor, adv = x["logprobs"], x[anchor_field(cfg.anchor)], x["advantages"]
    log_ratio = objectives.token_log_ratio(lp, anchor)
    loss = objectives.cispo(lp, anchor, adv, ratio_min=cfg.ratio_min, ratio_max=cfg.ratio_max)
    weight = torch.exp(log_ratio.detach()).clamp(cfg.ratio_min, cfg.ratio_max)
    m = metrics.cispo_metrics(log_ratio, mask, ratio_min=cfg.ratio_min, ratio_max=cfg.ratio_max)
    return Term(loss, -weight * adv, m)


def _ppo(x: Clean, mask: Tensor, cfg: PPOConfig) -> Term:
    """PPO on the token ratio; GSPO (a PPOConfig subclass) on the sequence ratio."""
    lp, anchor, adv = x["logprobs"], x[anchor_field(cfg.anchor)], x["advantages"]
    if cfg.ratio_level == "sequence":
        log_ratio = objectives.sequence_log_ratio(lp, anchor, mask)
    else:
        log_ratio = objectives.token_log_ratio(lp, anchor)
    loss = objectives.clipped_surrogate(
        log_ratio, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip_c=cfg.dual_clip_c
    )
    ratio = torch.exp(log_ratio.detach())
    # The gradient is -r·A except where a clip binds (then 0).
    binding = ((ratio > 1 + cfg.eps_high) & (adv > 0)) | ((ratio < 1 - cfg.eps_low) & (adv < 0))
    if cfg.dual_clip_c is not None:
        binding = binding | ((ratio > cfg.dual_clip_c) & (adv < 0))
    coef = torch.where(binding, 0.0, -ratio * adv)
    m = metrics.ppo_clip_metrics(
        log_ratio,
        adv,
        mask,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        dual_clip_c=cfg.dual_clip_c,
    )
    return Term(loss, coef, m)


def _importance_sampling(x: Clean, mask: Tensor, cfg: ImportanceSamplingConfig) -> Term:
    lp, anchor, adv = x["logprobs"], x[anchor_field(cfg.anchor)], x["advantages"]
    log_ratio = objectives.token_log_ratio(lp, anchor)
    loss = objectives.importance_sampling(
        log_ratio, adv, ratio_min=cfg.ratio_min, ratio_max=cfg.ratio_max
    )
    ratio = torch.exp(log_ratio.detach())
    inside = (ratio >= cfg.ratio_min) & (ratio <= cfg.ratio_max)
    coef = torch.where(inside, -ratio * adv, 0.0)
    return Term(loss, coef, metrics.mean_metric("is/ratio_mean", ratio, mask))


def _reinforce(x: Clean, mask: Tensor, cfg: ReinforceConfig) -> Term:
    return Term(objectives.reinforce(x["logprobs"], x["advantages"]), -x["advantages"], {})


def _cross_entropy(x: Clean, mask: Tensor, cfg: CrossEntropyConfig) -> Term:
    weights = x.get("weights", torch.ones_like(x["logprobs"]))
    loss = objectives.cross_entropy(x["logprobs"], weights)
    return Term(loss, -weights, metrics.mean_metric("sft/nll", -x["logprobs"], mask))


def _dro(x: Clean, mask: Tensor, cfg: DroConfig) -> Term:
    lp, anchor, adv = x["logprobs"], x[anchor_field(cfg.anchor)], x["advantages"]
    loss = objectives.dro(lp, anchor, adv, beta=cfg.beta)
    coef = -(adv - cfg.beta * (lp.detach() - anchor))
    return Term(loss, coef, {})


# --------------------------------------------------------------------------------------------
# Builders: Tinker semantics (sampler anchor, absolute clip_*_threshold) plus our own keys.

_TINKER_CLIP = ("clip_low_threshold", "clip_high_threshold")
_INF = math.inf


def _pick_band(cfg: Mapping[str, Any], ours: tuple[str, str]) -> None:
    """Tinker's absolute keys and our own name the same bound; refuse both at once."""
    for a, o in zip(_TINKER_CLIP, ours, strict=True):
        if a in cfg and o in cfg:
            raise ValueError(f"pass either {a!r} or {o!r}, not both")


def _number(cfg: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    """cfg[key] (or default) as a float, checked against [low, high] under the caller's key."""
    value = as_number(cfg.get(key, default))
    check_range(key, value, low, high)
    assert isinstance(value, float)  # check_range rejects everything else
    return value


def _anchor(cfg: Mapping[str, Any]) -> Any:
    return cfg.get("anchor", "sampler")


def _build_cispo(cfg: Mapping[str, Any]) -> CispoConfig:
    _pick_band(cfg, ("ratio_min", "ratio_max"))
    low_key = "clip_low_threshold" if "clip_low_threshold" in cfg else "ratio_min"
    high_key = "clip_high_threshold" if "clip_high_threshold" in cfg else "ratio_max"
    return CispoConfig(
        ratio_min=_number(cfg, low_key, 0.0, 0.0, _INF),
        ratio_max=_number(cfg, high_key, 4.0, 0.0, _INF),
        anchor=_anchor(cfg),
        ratio_level=cfg.get("ratio_level", "token"),
        allow_degenerate=bool(cfg.get("allow_degenerate", False)),
    )


def _ppo_kwargs(cfg: Mapping[str, Any], default: PPOConfig) -> dict[str, Any]:
    _pick_band(cfg, ("eps_low", "eps_high"))
    if "clip_low_threshold" in cfg:  # absolute r >= 1 - eps_low, eps_low in [0, 1]
        eps_low = 1.0 - _number(cfg, "clip_low_threshold", 0.0, 0.0, 1.0)
    else:
        eps_low = _number(cfg, "eps_low", default.eps_low, 0.0, 1.0)
    if "clip_high_threshold" in cfg:  # absolute r <= 1 + eps_high, eps_high >= 0
        eps_high = _number(cfg, "clip_high_threshold", 1.0, 1.0, _INF) - 1.0
    else:
        eps_high = _number(cfg, "eps_high", default.eps_high, 0.0, _INF)
    level = cfg.get("ratio_level", default.ratio_level)
    if level != default.ratio_level:
        other = "gspo" if level == "sequence" else "ppo"
        raise ValueError(
            f"ratio_level={level!r} is not {default.name}'s ({default.ratio_level!r}); "
            f"use loss_fn={other!r}"
        )
    return {
        "eps_low": eps_low,
        "eps_high": eps_high,
        "dual_clip_c": cfg.get("dual_clip_c"),
        "anchor": _anchor(cfg),
    }


def _build_ppo(cfg: Mapping[str, Any]) -> PPOConfig:
    return PPOConfig(**_ppo_kwargs(cfg, PPOConfig.from_tinker()))


def _build_gspo(cfg: Mapping[str, Any]) -> GSPOConfig:
    return GSPOConfig(**_ppo_kwargs(cfg, GSPOConfig()))


def _build_importance_sampling(cfg: Mapping[str, Any]) -> ImportanceSamplingConfig:
    return ImportanceSamplingConfig(
        anchor=_anchor(cfg),
        ratio_min=_number(cfg, "clip_low_threshold", 0.0, 0.0, _INF),
        ratio_max=_number(cfg, "clip_high_threshold", _INF, 0.0, _INF),
    )


def _build_dro(cfg: Mapping[str, Any]) -> DroConfig:
    if "beta" not in cfg:
        raise ValueError("loss_fn='dro' needs loss_fn_config['beta'] (Tinker's DRO key)")
    return DroConfig(beta=_number(cfg, "beta", 0.0, 0.0, _INF), anchor=_anchor(cfg))


# --------------------------------------------------------------------------------------------

_BAND = ("anchor", *_TINKER_CLIP)
_ENTRIES: tuple[LossEntry[Any], ...] = (
    LossEntry(
        config_type=CispoConfig,
        term=_cispo,
        keys=(*_BAND, "ratio_min", "ratio_max", "ratio_level", "allow_degenerate"),
        build=_build_cispo,
    ),
    LossEntry(
        config_type=PPOConfig,
        term=_ppo,
        keys=(*_BAND, "eps_low", "eps_high", "dual_clip_c", "ratio_level"),
        build=_build_ppo,
    ),
    LossEntry(
        config_type=GSPOConfig,
        term=_ppo,
        keys=(*_BAND, "eps_low", "eps_high", "dual_clip_c"),
        build=_build_gspo,
    ),
    LossEntry(
        config_type=ImportanceSamplingConfig,
        term=_importance_sampling,
        keys=_BAND,
        build=_build_importance_sampling,
    ),
    LossEntry(
        config_type=ReinforceConfig, term=_reinforce, keys=(), build=lambda _: ReinforceConfig()
    ),
    LossEntry(
        config_type=CrossEntropyConfig,
        term=_cross_entropy,
        keys=(),
        build=lambda _: CrossEntropyConfig(),
        reads_advantages=False,
    ),
    LossEntry(config_type=DroConfig, term=_dro, keys=("anchor", "beta"), build=_build_dro),
)

LOSSES: Mapping[str, LossEntry[Any]] = {entry.name: entry for entry in _ENTRIES}
"""Loss name -> entry. Names match Tinker's loss_fn strings where they overlap."""

_BY_TYPE: Mapping[type, LossEntry[Any]] = {entry.config_type: entry for entry in _ENTRIES}


def loss_entry(name: str) -> LossEntry[Any]:
    """The entry for `name`; ValueError listing the registered names if there is none."""
    entry = LOSSES.get(name)
    if entry is None:
        raise ValueError(f"unknown loss_fn {name!r}; valid: {sorted(LOSSES)}")
    return entry


def entry_of(objective: ObjectiveConfig) -> LossEntry[Any]:
    """The entry of a config by its exact class (GSPOConfig is a PPOConfig, but not "ppo")."""
    entry = _BY_TYPE.get(type(objective))
    if entry is None:
        raise ValueError(
            f"{type(objective).__name__} is not a registered loss config; "
            f"registered: {sorted(t.__name__ for t in _BY_TYPE)}"
        )
    return entry


def objective_inputs(objective: ObjectiveConfig) -> dict[str, str]:
    """LossInputs fields the objective itself reads, each with the reason."""
    entry = entry_of(objective)
    need: dict[str, str] = {}
    if entry.reads_advantages:
        need["advantages"] = f"loss_fn={entry.name!r}"
    anchor = getattr(objective, "anchor", None)
    if anchor is not None:
        need[anchor_field(anchor)] = f"anchor={anchor!r} (the ratio's denominator)"
    return need
