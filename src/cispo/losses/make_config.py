"""make_loss_config: a LossConfig from a Tinker-style `loss_fn` name and flat `loss_fn_config`.

Tinker semantics by default: ratios anchored on the sampler logprobs, reduction "sum", and
Tinker's absolute `clip_low_threshold` / `clip_high_threshold` (defaults: ppo 0.8/1.2,
cispo 0.0/4.0). Our own keys (anchor, reduction, corrections, KL, entropy, ...) go in the same
dict or as keyword overrides. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cispo.losses.config import CorrectionConfig, LossConfig, OPSMConfig, as_number
from cispo.losses.registry import loss_entry

# Keys every loss accepts; each loss's own keys are `LOSSES[name].keys` (cispo.losses.registry).
COMMON_KEYS = (
    "reduction",
    "max_len",
    "kl_coef",
    "kl_estimator",
    "entropy_coef",
    "nonfinite",
    "fork_prob_threshold",
    "correction",  # "tis" | "mis" | None
    "correction_level",
    "correction_sequence_stat",
    "correction_ratio_min",
    "correction_ratio_max",
    "opsm_delta",  # float | None
)


def _int(value: Any) -> Any:
    """max_len arrives as a float from the wire: 64.0 -> 64; anything else as is."""
    number = as_number(value)
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return number


def make_loss_config(
    loss_fn: str,
    loss_fn_config: Mapping[str, Any] | None = None,
    *,
    reduction: str | None = None,
    **overrides: Any,
) -> LossConfig:
    """Build a LossConfig. `overrides` take the same keys as `loss_fn_config` and win over it.

    `loss_fn` is looked up in `cispo.losses.registry.LOSSES`, whose entry lists the loss's own
    keys and builds its config. Raises ValueError for an unknown loss_fn or key, naming it and
    listing the valid ones, and for a number outside its range, naming key, value and range.
    """
    entry = loss_entry(loss_fn)
    cfg: dict[str, Any] = {**(loss_fn_config or {}), **overrides}
    if reduction is not None:
        cfg["reduction"] = reduction
    valid = set(COMMON_KEYS) | set(entry.keys)
    for key in cfg:
        if key not in valid:
            raise ValueError(
                f"unknown key {key!r} for loss_fn={loss_fn!r}; valid keys: {sorted(valid)}"
            )
    correction_keys = [k for k in cfg if k.startswith("correction_")]
    correction: CorrectionConfig | None = None
    if cfg.get("correction") is not None:
        correction = CorrectionConfig(
            kind=cfg["correction"],
            level=cfg.get("correction_level", "token"),
            sequence_stat=cfg.get("correction_sequence_stat", "geometric_mean"),
            ratio_min=as_number(cfg.get("correction_ratio_min", 0.0)),
            ratio_max=as_number(cfg.get("correction_ratio_max", 2.0)),
        )
    elif correction_keys:
        raise ValueError(f"{correction_keys} given but correction is None; set 'correction'")
    opsm_delta = cfg.get("opsm_delta")
    return LossConfig(
        objective=entry.build({k: v for k, v in cfg.items() if k in entry.keys}),
        reduction=cfg.get("reduction", "sum"),
        max_len=_int(cfg.get("max_len")),
        correction=correction,
        opsm=None if opsm_delta is None else OPSMConfig(delta=as_number(opsm_delta)),
        kl_coef=as_number(cfg.get("kl_coef", 0.0)),
        kl_estimator=cfg.get("kl_estimator", "k3"),
        entropy_coef=as_number(cfg.get("entropy_coef", 0.0)),
        nonfinite=cfg.get("nonfinite", "zero"),
        fork_prob_threshold=as_number(cfg.get("fork_prob_threshold", 0.1)),
    )
