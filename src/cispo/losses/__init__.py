"""Pure RL objectives for language models: CISPO and the PPO/GRPO family, reductions, corrections.

No model, optimizer or I/O here: tensors in, a scalar loss and float metrics out. Formulas,
defaults, references and the flag map from other frameworks are in docs/losses.md.

    cfg = make_loss_config("cispo", {"clip_high_threshold": 4.0}, reduction="token_mean")
    out = compute_loss(LossInputs(logprobs=lp, loss_mask=m, advantages=a, sampler_logprobs=q), cfg,
                       num_tokens=global_valid_tokens)

`LOSSES` (cispo.losses.registry) is the one table from a loss name to its config class,
per-token term, Tinker keys and required inputs.
"""

from cispo.losses.aggregate import (
    reduce,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
    token_sum,
)
from cispo.losses.compose import LossInputs, LossOutput, compute_loss, required_inputs
from cispo.losses.config import (
    CispoConfig,
    CorrectionConfig,
    CrossEntropyConfig,
    DroConfig,
    GSPOConfig,
    ImportanceSamplingConfig,
    LossConfig,
    OPSMConfig,
    PPOConfig,
    ReinforceConfig,
)
from cispo.losses.make_config import make_loss_config
from cispo.losses.objectives import (
    MAX_LOG_RATIO,
    cispo,
    clipped_surrogate,
    cross_entropy,
    dro,
    importance_sampling,
    reinforce,
)
from cispo.losses.registry import LOSSES, LossEntry

__all__ = [
    "LOSSES",
    "MAX_LOG_RATIO",
    "CispoConfig",
    "CorrectionConfig",
    "CrossEntropyConfig",
    "DroConfig",
    "GSPOConfig",
    "ImportanceSamplingConfig",
    "LossConfig",
    "LossEntry",
    "LossInputs",
    "LossOutput",
    "OPSMConfig",
    "PPOConfig",
    "ReinforceConfig",
    "cispo",
    "clipped_surrogate",
    "compute_loss",
    "cross_entropy",
    "dro",
    "importance_sampling",
    "make_loss_config",
    "reduce",
    "reinforce",
    "required_inputs",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "token_mean",
    "token_sum",
]
