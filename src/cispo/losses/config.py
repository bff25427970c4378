"""Typed configs for the objectives, with converters from every bound convention in the field.

Each objective has a frozen, kw_only config whose class carries its one registry name
(`CispoConfig.name == "cispo"`); `LossConfig` bundles one of them with the reduction, the
train-vs-sampler correction, the KL and entropy terms and the non-finite policy, and takes its
name from the objective. `cispo.losses.registry.LOSSES` maps each name to its config class,
per-token term and Tinker keys; `make_loss_config` builds a `LossConfig` from a name and flat dict.

Every number is checked in `__post_init__`: NaN is always an error, and the error names the
field, the value and the allowed range.

Two conventions for the CISPO/PPO band exist under similar names (see docs/losses.md):
absolute bounds on r (TRL/ms-swift `epsilon_high`, Tinker `clip_*_threshold`) and additive
offsets from 1 (verl, NeMo-RL, slime/miles, AReaL, SkyRL). `CispoConfig` stores absolute bounds;
the converters say which convention they read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Anchor = Literal["old", "sampler"]
RatioLevel = Literal["token", "sequence"]

ANCHORS: tuple[str, ...] = ("old", "sampler")
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
REDUCTION_NAMES: tuple[str, ...] = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "sum",
)
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
NONFINITE_POLICIES: tuple[str, ...] = ("zero", "raise")
CORRECTION_KINDS: tuple[str, ...] = ("tis", "mis")
SEQUENCE_STATS: tuple[str, ...] = ("product", "geometric_mean")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _check_anchor(anchor: str) -> None:
    _check_choice("anchor", anchor, ANCHORS)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def as_number(value: Any) -> Any:
    """A number (or numeric string, as the wire may send) as float; anything else unchanged, for
    `check_range` to name. bool stays bool (rejected there)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_range(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ValueError naming `name`, `value` and the interval unless low <=/< value <=/< high.

    NaN and non-numbers are always rejected; +-inf only where the interval is closed at +-inf.
    """
    interval = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} is not a number; allowed range {interval}")
    if math.isnan(value):
        raise ValueError(f"{name}=nan is NaN; allowed range {interval}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        raise ValueError(f"{name}={value!r} is outside the allowed range {interval}")


@dataclass(frozen=True, kw_only=True)
class CispoConfig:
    """CISPO weight band, in absolute bounds on r (not offsets from 1)."""

    name: ClassVar[str] = "cispo"

    ratio_min: float = 0.0
    """Lower bound on the detached weight. 0 = one-sided (no lower bound; MiniMax-M1, ScaleRL)."""
    ratio_max: float = 4.0
    """Upper bound on the weight. 4 is Tinker's default; ScaleRL found 4, 5 and 8 equivalent."""
    anchor: Anchor = "sampler"
    """Denominator of r: "sampler" (Tinker) or "old" (trainer recompute; needed by corrections)."""
    ratio_level: RatioLevel = "token"
    """Only "token": the CISPO weight multiplies one token's log-probability."""
    allow_degenerate: bool = False
    """Accept a band that excludes r = 1 (cap below 1 or floor above 1)."""

    def __post_init__(self) -> None:
        _check_anchor(self.anchor)
        if self.ratio_level != "token":
            raise ValueError(
                f"ratio_level={self.ratio_level!r}: CISPO weights each token's log-probability "
                "by its own detached ratio, so a sequence-level ratio is not defined for it; "
                "use loss_fn='gspo' for a sequence-level clipped ratio"
            )
        # Always rejected: these do not describe a band at all.
        if isinstance(self.ratio_min, int | float) and self.ratio_min < 0:
            raise ValueError(
                f"ratio_min={self.ratio_min} is negative; r = exp(...) > 0, so use 0 for no lower "
                "bound. Did you pass an additive offset? Use CispoConfig.from_additive."
            )
        check_range("ratio_min", self.ratio_min, 0.0, math.inf, high_open=True)
        check_range("ratio_max", self.ratio_max, 0.0, math.inf)
        if self.ratio_min > self.ratio_max:
            raise ValueError(f"ratio_min={self.ratio_min} > ratio_max={self.ratio_max}: empty band")
        if self.allow_degenerate:
            return
        if self.ratio_max < 1:
            raise ValueError(
                f"ratio_max={self.ratio_max} < 1 caps every weight below 1, even on-policy (r=1), "
                "shrinking every update. This is the TRL/ms-swift trap: loss_type='cispo' with "
                "epsilon_high unset caps at epsilon=0.2. Use ratio_max >= 1 (4 or 5 is usual), "
                "or pass allow_degenerate=True."
            )
        if self.ratio_min > 1:
            raise ValueError(
                f"ratio_min={self.ratio_min} > 1 floors every weight above 1, even on-policy "
                "(r = 1), so every token is up-weighted. "
                "Use ratio_min <= 1 (0 is usual), or pass allow_degenerate=True."
            )

    @classmethod
    def from_additive(
        cls,
        eps_low: float,
        eps_high: float,
        *,
        anchor: Anchor = "old",
        allow_degenerate: bool = False,
    ) -> CispoConfig:
        """From additive offsets: band [max(0, 1 - eps_low), 1 + eps_high].

        The convention of miles/slime (eps_clip, eps_clip_high), verl (clip_ratio_low/high),
        NeMo-RL (ratio_clip_min/max), AReaL (eps_clip, eps_clip_higher) and SkyRL-train
        (cispo_eps_clip_low/high). eps_low >= 1 means no lower bound (r > 0 anyway).
        These systems anchor r on the trainer's old logprobs, hence anchor="old".
        """
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"additive offsets must be >= 0, got ({eps_low}, {eps_high})")
        return cls(
            ratio_min=max(0.0, 1.0 - eps_low),
            ratio_max=1.0 + eps_high,
            anchor=anchor,
            allow_degenerate=allow_degenerate,
        )

    @classmethod
    def from_verl(cls, clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2) -> CispoConfig:
        """verl `actor.clip_ratio_low/high` (additive; defaults 0.2/0.2 give [0.8, 1.2])."""
        return cls.from_additive(clip_ratio_low, clip_ratio_high)

    @classmethod
    def from_nemo_rl(cls, ratio_clip_min: float = 0.2, ratio_clip_max: float = 0.2) -> CispoConfig:
        """NeMo-RL `loss_fn.ratio_clip_min/max` (additive; CISPO recipe 1.0/5.0 gives [0, 6])."""
        return cls.from_additive(ratio_clip_min, ratio_clip_max)

    @classmethod
    def from_slime(cls, eps_clip: float = 0.2, eps_clip_high: float | None = None) -> CispoConfig:
        """slime/miles `--eps-clip/--eps-clip-high` (additive; eps_clip_high None -> eps_clip)."""
        return cls.from_additive(eps_clip, eps_clip if eps_clip_high is None else eps_clip_high)

    @classmethod
    def from_areal(cls, eps_clip: float = 0.2, eps_clip_higher: float | None = None) -> CispoConfig:
        """AReaL `actor.eps_clip/eps_clip_higher` (additive; AReaL requires eps_clip_higher > 0)."""
        if eps_clip_higher is None or eps_clip_higher <= 0:
            raise ValueError(f"AReaL CISPO requires eps_clip_higher > 0, got {eps_clip_higher}")
        return cls.from_additive(eps_clip, eps_clip_higher)

    @classmethod
    def from_skyrl(
        cls, cispo_eps_clip_low: float = 1.0, cispo_eps_clip_high: float = 4.0
    ) -> CispoConfig:
        """SkyRL-train `cispo_eps_clip_low/high` (additive; defaults 1.0/4.0 give [0, 5])."""
        return cls.from_additive(cispo_eps_clip_low, cispo_eps_clip_high)

    @classmethod
    def from_absolute_cap(
        cls, epsilon_high: float, *, anchor: Anchor = "old", allow_degenerate: bool = False
    ) -> CispoConfig:
        """TRL / ms-swift / Liger `epsilon_high` for loss_type="cispo": band [0, epsilon_high].

        An absolute cap, unlike the same name for their PPO losses. TRL's unset value falls
        back to epsilon = 0.2, a cap below 1 that is rejected here unless allowed.
        """
        return cls(
            ratio_min=0.0, ratio_max=epsilon_high, anchor=anchor, allow_degenerate=allow_degenerate
        )

    @classmethod
    def from_tinker(
        cls, clip_low_threshold: float = 0.0, clip_high_threshold: float = 4.0
    ) -> CispoConfig:
        """Tinker `loss_fn_config` clip_low/high_threshold: absolute, anchored on the sampler."""
        return cls(ratio_min=clip_low_threshold, ratio_max=clip_high_threshold, anchor="sampler")

    def describe(self) -> str:
        """The effective band, e.g. "CISPO weight band [0, 4] (one-sided: no lower bound)"."""
        band = f"CISPO weight band [{_fmt(self.ratio_min)}, {_fmt(self.ratio_max)}]"
        if self.ratio_max < 1 or self.ratio_min > 1:
            note = "degenerate: excludes r = 1"
        elif self.ratio_min == 0:
            note = "one-sided: no lower bound"
        else:
            note = "two-sided"
        return f"{band} ({note}), anchor={self.anchor}"


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """Clipped surrogate on the token ratio (PPO, GRPO, DAPO clip-higher, dual-clip): additive
    offsets. The sequence-level ratio is `GSPOConfig`."""

    name: ClassVar[str] = "ppo"

    eps_low: float = 0.2
    """r is clipped below at 1 - eps_low, in [0, 1]."""
    eps_high: float = 0.2
    """r is clipped above at 1 + eps_high, in [0, inf] (DAPO clip-higher: 0.28)."""
    dual_clip_c: float | None = None
    """Dual-clip bound c in (1, inf) for A < 0 (arXiv:1912.09729); None = off."""
    anchor: Anchor = "sampler"
    """Denominator of r: "sampler" (Tinker) or "old" (trainer recompute)."""

    @property
    def ratio_level(self) -> RatioLevel:
        """Always "token" (GSPOConfig's is "sequence"): fixed by the class, one name per config."""
        return "token"

    def __post_init__(self) -> None:
        _check_anchor(self.anchor)
        check_range("eps_low", self.eps_low, 0.0, 1.0)
        check_range("eps_high", self.eps_high, 0.0, math.inf)
        if self.dual_clip_c is not None:
            check_range(
                "dual_clip_c", self.dual_clip_c, 1.0, math.inf, low_open=True, high_open=True
            )

    def describe(self) -> str:
        """E.g. "PPO clip [0.8, 1.2] (token ratio), anchor=sampler"."""
        lo, hi = _fmt(1.0 - self.eps_low), _fmt(1.0 + self.eps_high)
        dual = "" if self.dual_clip_c is None else f", dual clip c={_fmt(self.dual_clip_c)}"
        kind = self.name.upper()
        return f"{kind} clip [{lo}, {hi}] ({self.ratio_level} ratio){dual}, anchor={self.anchor}"

    @classmethod
    def grpo(cls, eps: float = 0.2, *, anchor: Anchor = "old") -> PPOConfig:
        """GRPO (arXiv:2402.03300): symmetric clip 1 ± eps."""
        return cls(eps_low=eps, eps_high=eps, anchor=anchor)

    @classmethod
    def dapo(
        cls, eps_low: float = 0.2, eps_high: float = 0.28, *, anchor: Anchor = "old"
    ) -> PPOConfig:
        """DAPO clip-higher (arXiv:2503.14476): asymmetric clip [1 - 0.2, 1 + 0.28]."""
        return cls(eps_low=eps_low, eps_high=eps_high, anchor=anchor)

    @classmethod
    def gspo(
        cls, eps_low: float = 3e-4, eps_high: float = 4e-4, *, anchor: Anchor = "old"
    ) -> GSPOConfig:
        """GSPO (arXiv:2507.18071): sequence-level ratio, clip range (3e-4, 4e-4) from the paper."""
        return GSPOConfig(eps_low=eps_low, eps_high=eps_high, anchor=anchor)

    @classmethod
    def from_tinker(
        cls, clip_low_threshold: float = 0.8, clip_high_threshold: float = 1.2
    ) -> PPOConfig:
        """Tinker `ppo` loss_fn_config: absolute thresholds (defaults 0.8/1.2), sampler anchor."""
        return cls(
            eps_low=1.0 - clip_low_threshold, eps_high=clip_high_threshold - 1.0, anchor="sampler"
        )


@dataclass(frozen=True, kw_only=True)
class GSPOConfig(PPOConfig):
    """GSPO (arXiv:2507.18071): the clipped surrogate on the sequence-level ratio, GSPO-token
    form: log s_i,t = sg(mean_t log r_t) + logp_t - sg(logp_t). Defaults: the paper's clip range."""

    name: ClassVar[str] = "gspo"

    eps_low: float = 3e-4
    """s is clipped below at 1 - eps_low, in [0, 1]."""
    eps_high: float = 4e-4
    """s is clipped above at 1 + eps_high, in [0, inf]."""

    @property
    def ratio_level(self) -> RatioLevel:
        """Always "sequence": the geometric mean of the sequence's token ratios."""
        return "sequence"


@dataclass(frozen=True, kw_only=True)
class ImportanceSamplingConfig:
    """Tinker `importance_sampling`: loss_t = -r_t * A_t (r not detached)."""

    name: ClassVar[str] = "importance_sampling"

    anchor: Anchor = "sampler"
    """Denominator of r."""
    ratio_min: float = 0.0
    """Absolute lower clamp on r (0 = none). Outside the band the gradient is 0."""
    ratio_max: float = math.inf
    """Absolute upper clamp on r (inf = none, Tinker's documented form)."""

    def __post_init__(self) -> None:
        _check_anchor(self.anchor)
        check_range("ratio_min", self.ratio_min, 0.0, math.inf, high_open=True)
        check_range("ratio_max", self.ratio_max, 0.0, math.inf)
        if not self.ratio_min <= self.ratio_max:
            raise ValueError(
                f"need 0 <= ratio_min <= ratio_max, got [{self.ratio_min}, {self.ratio_max}]"
            )


@dataclass(frozen=True, kw_only=True)
class ReinforceConfig:
    """REINFORCE: loss_t = -A_t * logp_t. Reads no anchor."""

    name: ClassVar[str] = "reinforce"


@dataclass(frozen=True, kw_only=True)
class CrossEntropyConfig:
    """Weighted NLL for SFT: loss_t = -weights_t * logp_t (weights default to 1)."""

    name: ClassVar[str] = "cross_entropy"


@dataclass(frozen=True, kw_only=True)
class DroConfig:
    """DRO (Tinker/verl form): loss_t = -(logp_t * A_t - beta/2 * (logp_t - q_t)^2)."""

    name: ClassVar[str] = "dro"

    beta: float
    """Quadratic penalty on the log-ratio to the anchor; Tinker's loss_fn_config key "beta"."""
    anchor: Anchor = "sampler"
    """Which logprobs are q: "sampler" (Tinker) or "old" (verl)."""

    def __post_init__(self) -> None:
        _check_anchor(self.anchor)
        check_range("beta", self.beta, 0.0, math.inf, high_open=True)


# The objective config classes, for type annotations. Their names and everything a name means
# live in one table, cispo.losses.registry.LOSSES (a test checks the two agree).
ObjectiveConfig = (
    CispoConfig
    | PPOConfig
    | GSPOConfig
    | ImportanceSamplingConfig
    | ReinforceConfig
    | CrossEntropyConfig
    | DroConfig
)


@dataclass(frozen=True, kw_only=True)
class CorrectionConfig:
    """Train-vs-sampler correction w = exp(old - sampler), detached, multiplied into loss_t.

    kind "tis": truncated IS, w clamped to [ratio_min, ratio_max] (Yao et al. 2025 blog).
    kind "mis": masked IS / IcePop (arXiv:2510.18855): w kept inside the band, 0 outside.
    """

    kind: Literal["tis", "mis"] = "tis"
    """"tis" (truncate) or "mis" (mask)."""
    level: RatioLevel = "token"
    """"token": one weight per token; "sequence": one weight per sequence, broadcast over T."""
    sequence_stat: Literal["product", "geometric_mean"] = "geometric_mean"
    """Sequence weight: "product" exp(Σ_t δ_t) (TRL, verl, SkyRL) or "geometric_mean"
    exp(mean_t δ_t) (ms-swift, NeMo seq-mask-tis). Only read when level="sequence"."""
    ratio_min: float = 0.0
    """Absolute lower bound on w."""
    ratio_max: float = 2.0
    """Absolute upper bound on w (slime tis_clip and verl rollout_is_threshold default 2.0)."""

    def __post_init__(self) -> None:
        _check_choice("correction kind", self.kind, CORRECTION_KINDS)
        _check_choice("correction level", self.level, RATIO_LEVELS)
        _check_choice("sequence_stat", self.sequence_stat, SEQUENCE_STATS)
        check_range("correction ratio_min", self.ratio_min, 0.0, math.inf, high_open=True)
        check_range("correction ratio_max", self.ratio_max, 0.0, math.inf)
        if not self.ratio_min <= self.ratio_max:
            raise ValueError(
                f"correction band needs 0 <= ratio_min <= ratio_max, got "
                f"[{self.ratio_min}, {self.ratio_max}]"
            )


@dataclass(frozen=True, kw_only=True)
class OPSMConfig:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv:2512.02556)."""

    delta: float = 1e-4
    """Drop a sequence iff A < 0 and mean_t(sampler - logp) > delta (slime/miles default 1e-4).
    In [0, inf): a negative delta would drop on-policy sequences (mean 0)."""

    def __post_init__(self) -> None:
        check_range("opsm_delta", self.delta, 0.0, math.inf, high_open=True)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Everything `compute_loss` needs besides tensors."""

    objective: ObjectiveConfig
    """Typed config of the objective; its class names the loss (`name`)."""
    reduction: str = "sum"
    """One of REDUCTION_NAMES; "sum" is Tinker's."""
    max_len: int | None = None
    """Dr.GRPO constant L >= 1; required by seq_mean_token_sum_norm."""
    correction: CorrectionConfig | None = None
    """Train-vs-sampler correction; needs old and sampler logprobs and an "old" anchor."""
    opsm: OPSMConfig | None = None
    """Off-policy sequence masking; needs sampler logprobs and advantages."""
    kl_coef: float = 0.0
    """Coefficient of the KL-to-reference term, in [0, inf) (reads ref_logprobs when > 0)."""
    kl_estimator: str = "k3"
    """"k1", "k2" or "k3" (Schulman, "Approximating KL divergence")."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient in [0, inf): loss_t -= entropy_coef * entropy_t (reads entropy
    when > 0)."""
    nonfinite: str = "zero"
    """Active token with a NaN/inf input: "zero" drops it from the loss (counted in
    loss/nonfinite_tokens), "raise" raises ValueError."""
    fork_prob_threshold: float = 0.1
    """Sampler probability below which a token counts as a fork token in the metrics."""

    @property
    def name(self) -> str:
        """The registry name of the objective, e.g. "cispo" (Tinker's `loss_fn`)."""
        return self.objective.name

    def __post_init__(self) -> None:
        if not isinstance(self.objective, ObjectiveConfig):
            raise ValueError(
                f"objective must be one of the loss configs in cispo.losses.LOSSES, "
                f"got {type(self.objective).__name__}"
            )
        _check_choice("reduction", self.reduction, REDUCTION_NAMES)
        if self.max_len is not None and (
            isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1
        ):
            raise ValueError(f"max_len={self.max_len!r} must be an integer >= 1 or None")
        if self.reduction == "seq_mean_token_sum_norm" and self.max_len is None:
            raise ValueError("reduction='seq_mean_token_sum_norm' needs max_len >= 1 (Dr.GRPO L)")
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_range("kl_coef", self.kl_coef, 0.0, math.inf, high_open=True)
        check_range("entropy_coef", self.entropy_coef, 0.0, math.inf, high_open=True)
        check_range(
            "fork_prob_threshold", self.fork_prob_threshold, 0.0, 1.0, low_open=True, high_open=True
        )
        anchor = getattr(self.objective, "anchor", None)
        if self.correction is not None:
            if anchor == "sampler":
                raise ValueError(
                    "correction with anchor='sampler' corrects twice: r = exp(logp - sampler) "
                    "already includes exp(old - sampler). Use anchor='old' or drop the correction."
                )
            if isinstance(self.objective, CrossEntropyConfig):
                raise ValueError("correction needs sampled tokens; cross_entropy (SFT) has none")

    def describe(self) -> str:
        """One line: the objective's effective band and every optional term that is on."""
        obj = self.objective
        if isinstance(obj, CispoConfig | PPOConfig):
            parts = [obj.describe()]
        else:
            anchor = getattr(obj, "anchor", None)
            parts = [self.name + ("" if anchor is None else f", anchor={anchor}")]
        if (c := self.correction) is not None:
            stat = f" {c.sequence_stat}" if c.level == "sequence" else ""
            band = f"[{_fmt(c.ratio_min)}, {_fmt(c.ratio_max)}]"
            parts.append(f"correction {c.kind} {c.level}{stat} {band}")
        if self.opsm is not None:
            parts.append(f"opsm delta={self.opsm.delta:g}")
        if self.kl_coef > 0:
            parts.append(f"kl {self.kl_estimator} coef {self.kl_coef:g}")
        if self.entropy_coef > 0:
            parts.append(f"entropy coef {self.entropy_coef:g}")
        return "; ".join(parts)
