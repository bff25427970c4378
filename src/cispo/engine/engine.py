"""The engine: owns the model and the optimizer; runs forward/backward, optimizer steps, sampling.

Everything above it (the client API, the RL loop, the server) speaks Tinker's vocabulary: datums in,
per-token trainer logprobs and metrics out. The engine never knows which algorithm produced a datum:
the loss named in the call reads the datum's `loss_fn_inputs` (prime-rl's "algorithm-blind"
trainer).

Contracts:
- `forward_backward` accumulates gradients (several calls before one `optim_step` add up) and
  splits the datums into micro-batches of `micro_batch_size` sequences. Each micro-batch's loss is
  reduced with the *global* token (or sequence) count of the whole call, so the micro-batch size
  never changes the update.
- Trainer logprobs are `log_softmax(logits / temperature)[target]` in float32, the same quantity
  the sampler reports (`cispo.engine.sampler`), so on-policy `r = exp(trainer - sampler) = 1`.
- The loss mask of a datum is `loss_fn_inputs["mask"]` if given, else `weights > 0` if given, else
  every position of the datum (Tinker's semantics, where masking is done by zero advantages or
  weights).
- `sampler()` reads the trainer's own parameters (no copy: sample-then-train holds one model);
  an `optim_step` or `load_state` that finds a sampler of the old version still held gives that
  sampler a frozen copy first, so a held sampler always samples from its own version's weights.
  Sampling and training calls never overlap (one lock), so the two may come from two threads.
- Under a process group (torchrun, `cispo.distributed`), each rank passes its share of the datums;
  the model is sharded with FSDP2, the normalisers are summed over the ranks and the merged
  metrics are the same on every rank, so the gradient is the single-process one
  (docs/distributed.md).
- Memory: every forward_backward, optim_step and shared sampling pass ends by giving the heap
  memory it freed back to the OS (`EngineConfig.trim_heap`, `cispo.engine.heap`), so freed
  activations and sampler caches do not stay resident between calls.
"""

from __future__ import annotations

import copy
import gc
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from cispo import distributed
from cispo.checkpoint import load_checkpoint, save_named_state
from cispo.engine.heap import MMAP_THRESHOLD_MAX, set_mmap_threshold, trim_heap
from cispo.engine.packing import micro_batches, packing_unsupported, token_logprobs
from cispo.engine.sampler import HFSampler
from cispo.engine.validation import (
    collapse_soft_targets,
    context_length,
    expand_soft_targets,
    validate_datums,
    vocab_size,
)
from cispo.losses import LossConfig, LossInputs, compute_loss
from cispo.ops import FusedLogprobOutput
from cispo.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    SampledSequence,
    SamplingParams,
    TensorData,
)

# Keys of `loss_fn_inputs` that are per-token float tensors read by the losses.
_FLOAT_KEYS = ("logprobs", "advantages", "weights", "old_logprobs", "ref_logprobs")


ADAMW_IMPLS = ("for-loop", "foreach", "fused")
"""`EngineConfig.adamw_impl` values."""


def adamw_flags(impl: str | None) -> tuple[bool | None, bool | None]:
    """torch.optim.AdamW's (`foreach`, `fused`) arguments for an `EngineConfig.adamw_impl`."""
    flags: dict[str | None, tuple[bool | None, bool | None]] = {
        None: (None, None),
        "for-loop": (False, False),
        "foreach": (True, False),
        "fused": (False, True),
    }
    return flags[impl]


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    micro_batch_size: int = 64
    """Sequences per forward/backward pass; gradients accumulate across micro-batches."""
    fused_logprobs: bool | None = None
    """Compute logprobs tile by tile from hidden states (`cispo.ops`), never materialising
    [tokens, vocab] logits. None: fuse when the naive logits would exceed one tile; False: the
    naive reference path."""
    logprob_chunk_size: int | None = None
    """Tokens per tile of the fused path (None: `cispo.ops` default)."""
    shared_prefix: bool = True
    """Run each group's common prompt once per forward, padding-free (`cispo.engine.packing`);
    micro-batches then hold whole groups of consecutive same-prompt datums (a group larger than
    micro_batch_size runs alone; datums that share no prompt are groups of one). Same logprobs,
    losses and gradients as False (one right-padded row per datum) to float rounding, sharded
    (FSDP2) or not. Needs SDPA or eager attention with full-attention layers: on any other model
    the engine warns and takes the padded path (`Engine.shared_prefix` False,
    `shared_prefix_off` says why). On by default: faster at every measured size (docs/LOG.md)."""
    packed_row_tokens: int | None = None
    """With shared_prefix: pack consecutive groups into one row up to this many tokens (None: one
    group per row)."""
    bf16: bool = False
    """Under a process group on CUDA (NCCL): FSDP2 mixed precision, bf16 compute and fp32
    gradient reduction (`cispo.distributed.fsdp`). Refused without one and on CPU."""
    adamw_impl: str | None = "fused"
    """torch.optim.AdamW's implementation: "for-loop" (one parameter at a time), "foreach"
    (multi-tensor ops over all parameters), "fused" (one fused kernel; CPU too since torch 2.4;
    sharded DTensor parameters too). The same update to float rounding
    (tests/engine/test_adamw_impl.py). Default "fused": the fastest on CPU (docs/LOG.md).
    None: torch's own choice (for-loop on CPU, foreach on CUDA)."""
    trim_heap: bool = False
    """After every forward_backward, optim_step and sampling pass on the shared weights (and once
    at construction, after the model was loaded), give the heap memory freed since back to the
    OS (`cispo.engine.heap.trim_heap`, glibc's malloc_trim; a no-op elsewhere). Without it
    glibc keeps freed activations and sampler caches resident. Cost: the returned pages fault in
    again when reused, +34% on a tiny model's forward_backward, ~2% on SmolLM2-135M's step
    (docs/LOG.md, 2026-11-30 third and fifth entries), so it is off unless asked for."""
    mmap_threshold: int | None = None
    """Bytes: during each forward_backward, glibc's mmap threshold is fixed to this
    (`cispo.engine.heap.set_mmap_threshold`), so every block this large or larger is unmapped
    as soon as the backward frees it instead of leaving a hole in the heap; after the call, 32
    MiB (glibc's maximum, where its dynamic threshold ends up). Process-wide while it lasts.
    Lower peak RSS for page faults on every re-allocation (docs/LOG.md, 2026-11-30 third
    entry). None: glibc's dynamic threshold throughout."""

    def __post_init__(self) -> None:
        if self.adamw_impl is not None and self.adamw_impl not in ADAMW_IMPLS:
            raise ValueError(
                f"adamw_impl must be one of {', '.join(ADAMW_IMPLS)} or None, "
                f"got {self.adamw_impl!r}"
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}")
        if self.packed_row_tokens is not None and self.packed_row_tokens < 1:
            raise ValueError(f"packed_row_tokens must be >= 1, got {self.packed_row_tokens}")
        if self.mmap_threshold is not None and not 0 <= self.mmap_threshold <= MMAP_THRESHOLD_MAX:
            raise ValueError(
                f"mmap_threshold must be None or in 0..{MMAP_THRESHOLD_MAX} bytes, "
                f"got {self.mmap_threshold}"
            )


@dataclass(frozen=True)
class _Batch:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T] bool, True on real tokens
    targets: Tensor  # [B, T]
    loss_mask: Tensor  # [B, T] bool
    fields: dict[str, Tensor]  # name -> [B, T] float
    lengths: list[int]


def _collate(datums: Sequence[Datum]) -> _Batch:
    """Right-pad datums into [B, T] tensors: one tensor build per key over the datums' lists
    chained end to end, so the Python work is per datum and key, never per token.

    The datums are valid ones (`cispo.engine.validation.validate_datums`, which
    `Engine.forward_backward` runs first) with ordinary [T] targets."""
    lengths = [d.model_input.length for d in datums]
    width = max(lengths)
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    keys = set(datums[0].loss_fn_inputs)

    def padded(rows: Iterable[Iterable[float]], dtype: torch.dtype) -> Tensor:
        out = torch.zeros(len(datums), width, dtype=dtype)
        out[valid] = torch.tensor(list(chain.from_iterable(rows)), dtype=dtype)
        return out

    def field(key: str, dtype: torch.dtype) -> Tensor:
        return padded((d.loss_fn_inputs[key].data for d in datums), dtype)

    input_ids = padded((t.tokens for d in datums for t in d.model_input.chunks), torch.long)
    targets = field("target_tokens", torch.long)
    mask_key = _mask_key(keys)
    loss_mask = valid.clone() if mask_key is None else field(mask_key, torch.float32) > 0
    fields = {key: field(key, torch.float32) for key in _FLOAT_KEYS if key in keys}
    return _Batch(input_ids, valid, targets, loss_mask, fields, lengths)


def _mask_key(keys: Set[str]) -> str | None:
    """Which `loss_fn_inputs` key marks the loss tokens (None: every position counts)."""
    return "mask" if "mask" in keys else "weights" if "weights" in keys else None


def loss_totals(datums: Sequence[Datum]) -> tuple[float, float]:
    """(loss tokens, sequences with at least one loss token) of `datums`: the normalisers
    `forward_backward` uses when one optimizer step's datums are split over several calls (or
    processes), passed to each call as `num_tokens` / `num_sequences`."""
    tokens = sequences = 0
    for datum in datums:
        key = _mask_key(set(datum.loss_fn_inputs))
        count = (
            datum.model_input.length
            if key is None
            else int((torch.tensor(datum.loss_fn_inputs[key].data) > 0).sum())
        )
        tokens += count
        sequences += count > 0
    return float(tokens), float(sequences)


def _to_device(batch: _Batch, device: torch.device) -> _Batch:
    """`batch` with every tensor on `device` (the model's); `batch` itself when already there.

    `_collate` builds on the CPU; the model, and so its logprobs, may be on an accelerator, where
    the loss inputs (mask, advantages, sampler/old/ref logprobs, weights) must be too."""
    if batch.input_ids.device == device:
        return batch
    return _Batch(
        batch.input_ids.to(device),
        batch.attention_mask.to(device),
        batch.targets.to(device),
        batch.loss_mask.to(device),
        {k: v.to(device) for k, v in batch.fields.items()},
        batch.lengths,
    )


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (a sharded one's local shard device); CPU for
    a model without parameters."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def _rows(batch: _Batch, start: int, stop: int) -> _Batch:
    """Sequences [start, stop) of a collated batch, trimmed to their own longest length."""
    lengths = batch.lengths[start:stop]
    width = max(lengths)
    cut = slice(start, stop)
    return _Batch(
        batch.input_ids[cut, :width],
        batch.attention_mask[cut, :width],
        batch.targets[cut, :width],
        batch.loss_mask[cut, :width],
        {k: v[cut, :width] for k, v in batch.fields.items()},
        lengths,
    )


@torch.no_grad()
def _sampler_mismatch(trainer: Tensor, sampler: Tensor, mask: Tensor) -> dict[str, float]:
    """Current trainer vs sampler logprobs on the loss tokens: k1 = mean(q − p) (the cookbook's
    `kl_sample_train_v1`) and max |q − p|. Unlike the losses' `mismatch/*` metrics, which compare
    the anchor (`old_logprobs` when given) with the sampler, this one uses the logprobs just
    computed, so it shows a sampler/trainer disagreement even when old = sampler."""
    d = (sampler - trainer.detach())[mask]
    return {
        "mismatch/kl_sample_train_k1": float(d.mean()),
        "mismatch/abs_logprob_diff_max": float(d.abs().max()),
    }


def merge_metrics(parts: Sequence[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Merge per-micro-batch metrics, each paired with its active-token count.

    Keys ending in `min`/`max` take the min/max, `:sum` keys and `count` keys add up, every other
    key is a token-weighted mean (the same value one big batch would give for per-token means).
    """
    merged: dict[str, float] = {}
    total = sum(w for w, _ in parts) or 1.0
    for key in {k for _, m in parts for k in m}:
        values = [(w, m[key]) for w, m in parts if key in m and math.isfinite(m[key])]
        if not values:
            merged[key] = float("nan")
        elif key.endswith(("min", "/min")):
            merged[key] = min(v for _, v in values)
        elif key.endswith(("max", "/max")):
            merged[key] = max(v for _, v in values)
        elif key.endswith((":sum", "count", "/num_tokens")):
            merged[key] = sum(v for _, v in values)
        else:
            merged[key] = sum(w * v for w, v in values) / total
    return merged


class NonFiniteStep(FloatingPointError, ValueError):
    """An optimizer step refused because it would produce non-finite values (a user error: the
    server reports it with category "user")."""


# A step whose float64 bound on every new value stays below this cannot overflow float32 (3.4e38):
# the margin covers float32 rounding in any order of the same operations.
_SAFE_BOUND = 1e36


def _provably_finite(
    optimizer: torch.optim.Optimizer, options: Mapping[str, Any], clip: Tensor | None
) -> bool:
    """True when AdamW with `options` surely leaves every weight and moment finite; False means
    "cannot tell" (then `_dry_run_non_finite` decides). Bound from the largest magnitudes
    (one max-abs read per tensor, no copies), with clipped gradients g (|g| <= G):
      m' = β1·m + (1-β1)·g          |m'| <= β1·M + (1-β1)·G
      v' = β2·v + (1-β2)·g²          v'  <= β2·V + (1-β2)·G²
      p' = p·(1 - lr·wd) - lr·(m'/bc1) / (sqrt(v'/bc2) + eps)
                                     |p'| <= P·|1 - lr·wd| + lr·|m'| / (bc1·eps)
    with bc_i = 1 - β_i^t > 0 and eps > 0 (AdamParams refuses eps <= 0), so no 0/0 or inf - inf
    can occur when every input is finite and every bound is below `_SAFE_BOUND`."""
    lr, wd, eps = float(options["lr"]), float(options["weight_decay"]), float(options["eps"])
    beta1, beta2 = (float(b) for b in options["betas"])
    scale = 1.0 if clip is None else float(clip)
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [optimizer.state.get(p, {}) for p in params]
        steps = [float(st["step"]) if "step" in st else 0.0 for st in states]
        t = max(steps) + 1.0

        def top(tensors: list[Tensor]) -> float:
            local = [_local(x).detach() for x in tensors]
            # aminmax reads each tensor once without an |x| temporary (~15x faster than
            # x.abs().max() on CPU); a NaN or inf anywhere gives inf, i.e. "cannot tell".
            ends = [abs(float(e)) for x in local if x.numel() for e in torch.aminmax(x)]
            return max(ends, default=0.0) if all(map(math.isfinite, ends)) else math.inf

        big_p = top(params)
        big_g = top([p.grad for p in params if p.grad is not None]) * scale
        big_m = top([st["exp_avg"] for st in states if "exp_avg" in st])
        big_v = top([st["exp_avg_sq"] for st in states if "exp_avg_sq" in st])
        if not all(math.isfinite(x) for x in (big_p, big_g, big_m, big_v)):
            return False
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        if bc1 <= 0.0 or bc2 <= 0.0:
            return False
        m_new = beta1 * big_m + (1.0 - beta1) * big_g
        v_new = beta2 * big_v + (1.0 - beta2) * big_g * big_g
        p_new = big_p * abs(1.0 - lr * wd) + lr * m_new / (bc1 * eps)
        if max(m_new, v_new / bc2, p_new, big_g * big_g) >= _SAFE_BOUND:
            return False
    return True


def _dry_run_non_finite(
    optimizer: torch.optim.Optimizer, options: Mapping[str, Any], clip: Tensor | None
) -> str | None:
    """Where `optimizer.step()` with the group options `options`, after gradients are multiplied
    by `clip`, would leave a non-finite weight or Adam moment; found without touching the
    optimizer, its parameters or their gradients. Each parameter's step runs alone on clones of
    its value, gradient and state with the same options, so with the same kernel: for-loop,
    foreach and fused AdamW are elementwise, and one parameter's result does not depend on the
    others. Memory: one parameter's clones at a time, not a copy of the trainable state."""
    for group in optimizer.param_groups:
        merged = {k: v for k, v in group.items() if k != "params"} | dict(options)
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            probe = p.detach().clone()
            probe.grad = p.grad.detach().clone()
            if clip is not None:
                probe.grad.mul_(clip)  # what clip_grads_with_norm_ multiplies by
            dry = cast(Any, type(optimizer))([probe])  # AdamW: every default then overridden
            dry.param_groups[0].update(merged)
            state = optimizer.state.get(p)
            if state:
                dry.state[probe] = {
                    k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()
                }
            dry.step()
            if not bool(torch.isfinite(_local(probe)).all()):
                return f"parameter {i} (shape {list(p.shape)})"
            for key, value in dry.state[probe].items():
                if isinstance(value, Tensor) and not bool(torch.isfinite(_local(value)).all()):
                    return f"Adam state {key!r} of parameter {i}"
    return None


def _rng_state(params: Sequence[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """The global CPU RNG state and the CUDA RNG state of every device `params` live on (dropout
    draws from them during a training forward)."""
    devices = {p.device.index or 0 for p in params if p.device.type == "cuda"}
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}


def _set_rng_state(state: tuple[Tensor, dict[int, Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in cuda.items():
        torch.cuda.set_rng_state(value, device)


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (no collective); a plain tensor unchanged."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class Engine:
    """Model + optimizer + sampler snapshot. Not thread-safe: the client serialises calls."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_token_id: int | None,
        pad_token_id: int,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        # Under a process group the model is sharded in place with FSDP2 and scored through this
        # root module (docs/distributed.md); without one, None and nothing changes.
        self._sharded: distributed.TokenLogprobs | None = None
        # Sharded: an unsharded copy of the model for the sampler, refreshed from the gathered
        # full weights at each version (`sampler`).
        self._sampler_template: nn.Module | None = None
        self._sampler: HFSampler | None = None  # the sharded case's unsharded sampler
        self.shared_prefix_off = (
            "engine.shared_prefix=false"
            if not self.config.shared_prefix
            else packing_unsupported(model)
        )
        """Why the engine takes the padded path (None: it packs, `shared_prefix`)."""
        if self.config.shared_prefix and self.shared_prefix_off is not None:
            warnings.warn(
                f"EngineConfig.shared_prefix=True: this model takes padded rows instead "
                f"({self.shared_prefix_off})",
                stacklevel=2,
            )
        if distributed.active():
            self._sampler_template = copy.deepcopy(model)
            self._sharded = distributed.shard_model(model, bf16=self.config.bf16)
        elif self.config.bf16:
            raise ValueError("EngineConfig.bf16=True needs a process group on CUDA (torchrun)")
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.version = 0
        """Number of optimizer steps applied; the policy version of sampled tokens."""
        params = [p for p in model.parameters() if p.requires_grad]
        foreach, fused = adamw_flags(self.config.adamw_impl)
        self.optimizer = torch.optim.AdamW(
            params, lr=0.0, betas=(0.9, 0.95), eps=1e-12, foreach=foreach, fused=fused
        )
        self.sample_generator = torch.Generator().manual_seed(seed)
        # Sampling shares the live weights (`sampler()`); `_lock` keeps a sampling pass and a
        # training call from running at once, `_live` is the current shared sampler if anyone
        # still holds it, `_snapshot` the frozen copy `sampler_model()` hands out.
        self._lock = threading.RLock()
        self._live: weakref.ref[SharedSampler] | None = None
        self._snapshot: tuple[int, nn.Module] | None = None
        self.sampler_copies = 0
        """Copies of the model made for sampling (copy-on-write; tests and benchmarks read it)."""
        if self.config.trim_heap:  # what loading the model freed (a GGUF's dequantization)
            trim_heap()

    # ---------------------------------------------------------------- training
    def forward_backward(
        self,
        datums: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        forward_only: bool = False,
        temperature: float = 1.0,
        num_tokens: float | None = None,
        num_sequences: float | None = None,
    ) -> ForwardBackwardOutput:
        """Run the loss on `datums`; accumulate gradients unless `forward_only`.

        `num_tokens` / `num_sequences` override the normalisers of token_mean / seq_mean reductions
        when one optimizer step spans several calls (default: the counts of this call).

        The datums and the loss are checked first (`check`: a bad datum raises `DatumError`,
        naming its index and field), before any state is touched. Soft targets (cross_entropy
        with target_tokens and weights [T, K]) run as K ordinary datums and their outputs come
        back [T, K].

        All or nothing: if any micro-batch fails (a bad datum, `nonfinite="raise"`, out of memory),
        the gradients, the global torch RNG and the train/eval mode are exactly what they were
        before the call. Gradients already accumulated are moved aside (no copy) while this call
        computes its own, and added back when every micro-batch has succeeded; on failure the
        call's partial gradients are dropped and the saved ones put back.
        """
        # The trim runs once this call's locals (the gradients it moved aside) are freed.
        with self._trimmed():
            return self._all_or_nothing(
                datums,
                loss_fn,
                loss_fn_config,
                forward_only=forward_only,
                temperature=temperature,
                num_tokens=num_tokens,
                num_sequences=num_sequences,
            )

    def _all_or_nothing(
        self,
        datums: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None,
        *,
        forward_only: bool,
        temperature: float,
        num_tokens: float | None,
        num_sequences: float | None,
    ) -> ForwardBackwardOutput:
        """`forward_backward` under the engine's lock (no sampling pass on the shared weights
        meanwhile, `sampler()`) and `config.mmap_threshold`."""
        with self._lock, self._mmap_threshold():
            config = self.check(datums, loss_fn, loss_fn_config)
            expanded, widths = expand_soft_targets(datums)
            params = [p for p in self.model.parameters() if p.requires_grad]
            pending = [p.grad for p in params]
            rng = _rng_state(params)
            was_training = self.model.training
            for p in params:
                p.grad = None
            try:
                out = self._forward_backward(
                    expanded,
                    config,
                    forward_only=forward_only,
                    temperature=temperature,
                    num_tokens=num_tokens,
                    num_sequences=num_sequences,
                )
            except BaseException:
                for p, grad in zip(params, pending, strict=True):
                    p.grad = grad
                _set_rng_state(rng)
                self.model.train(was_training)
                raise
            with torch.no_grad():
                for p, grad in zip(params, pending, strict=True):
                    if grad is not None:
                        if p.grad is None:
                            p.grad = grad
                        else:
                            p.grad.add_(grad)
            if any(widths):
                out = ForwardBackwardOutput(
                    loss_fn_output_type=out.loss_fn_output_type,
                    loss_fn_outputs=collapse_soft_targets(out.loss_fn_outputs, widths),
                    metrics=out.metrics,
                )
            return out

    def check(
        self,
        datums: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> LossConfig:
        """`validate_datums` against this model's vocabulary and context length: `DatumError`
        for a bad datum, ValueError/TypeError for a bad loss; returns the loss config. Touches
        no state (the server calls it before queueing a request)."""
        return validate_datums(
            datums,
            loss_fn,
            loss_fn_config,
            vocab_size=vocab_size(self.model),
            max_context_length=context_length(self.model),
        )

    def _forward_backward(
        self,
        datums: Sequence[Datum],
        config: LossConfig,
        *,
        forward_only: bool,
        temperature: float,
        num_tokens: float | None,
        num_sequences: float | None,
    ) -> ForwardBackwardOutput:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for trainer logprobs, got {temperature}")
        full = _collate(datums)
        tokens_total = float(full.loss_mask.sum()) if num_tokens is None else num_tokens
        # Sequences with no active token contribute 0 and are not counted (cispo.losses.aggregate).
        nonempty = float(full.loss_mask.any(dim=1).sum())
        seqs_total = nonempty if num_sequences is None else num_sequences
        self.model.train(not forward_only)
        size = self.config.micro_batch_size
        plan = micro_batches(
            full.input_ids, full.lengths, full.loss_mask, size, shared=self.shared_prefix
        )
        # Under a process group, the normalisers are summed over the ranks (each rank's datums,
        # or its `num_tokens`/`num_sequences`, are its share of the step) and every rank runs as
        # many micro-batches as the busiest one: the extra ones score datum 0 with weight 0, so
        # each rank joins the same FSDP collectives. The loss is multiplied by the world size
        # because FSDP averages gradients over the ranks. Without one, all of this is the identity.
        tokens_total, seqs_total, steps = distributed.all_reduce_totals(
            tokens_total, seqs_total, len(plan)
        )
        world = distributed.current_world_size()
        outputs: list[dict[str, TensorData]] = []
        parts: list[tuple[float, Mapping[str, float]]] = []
        loss_sum = 0.0
        device = _model_device(self.model)
        for index in range(steps):
            padding = index >= len(plan)
            start, stop, groups = (0, 1, None) if padding else plan[index]
            part = _to_device(_rows(full, start, stop), device)  # collated on CPU
            with torch.set_grad_enabled(not forward_only):
                scored = self._token_logprobs(
                    part.input_ids,
                    part.attention_mask,
                    part.targets,
                    part.loss_mask,
                    groups=groups,
                    row_tokens=self.config.packed_row_tokens,
                    temperature=temperature,
                    fused=self.config.fused_logprobs,
                    chunk_size=self.config.logprob_chunk_size,
                    with_entropy=config.entropy_coef != 0.0,
                )
                logprobs, entropy = scored.logprobs, scored.entropy
                inputs = LossInputs(
                    logprobs=logprobs,
                    loss_mask=part.loss_mask,
                    advantages=part.fields.get("advantages"),
                    sampler_logprobs=part.fields.get("logprobs"),
                    old_logprobs=part.fields.get("old_logprobs"),
                    ref_logprobs=part.fields.get("ref_logprobs"),
                    weights=part.fields.get("weights"),
                    entropy=entropy,
                )
                out = compute_loss(
                    inputs, config, num_tokens=tokens_total, num_sequences=seqs_total
                )
                if not forward_only:
                    loss = out.loss if world == 1 else out.loss * (0.0 if padding else world)
                    loss.backward()  # type: ignore[no-untyped-call]
            if padding:
                continue
            loss_sum += float(out.loss.detach())
            part_metrics = dict(out.metrics)
            if "logprobs" in part.fields and bool(part.loss_mask.any()):
                part_metrics |= _sampler_mismatch(logprobs, part.fields["logprobs"], part.loss_mask)
            parts.append((float(part.loss_mask.sum()), part_metrics))
            # One tensor-to-list conversion per micro-batch, then list slices per datum (the
            # same float32 values as converting each datum's row on its own).
            rows = logprobs.detach().float().tolist()
            for row, n in zip(rows, part.lengths, strict=True):
                outputs.append({"logprobs": TensorData(data=row[:n], dtype="float32", shape=[n])})
        seen = float(full.loss_mask.sum())
        if world > 1:  # every rank's micro-batch metrics, merged as one process would
            ranks = distributed.gather_objects((parts, loss_sum, seen))
            parts = [p for rank_parts, _, _ in ranks for p in rank_parts]
            loss_sum, seen = sum(r[1] for r in ranks), sum(r[2] for r in ranks)
        metrics = merge_metrics(parts)
        metrics["loss:sum"] = loss_sum
        metrics["train/num_tokens"] = seen
        return ForwardBackwardOutput(
            loss_fn_output_type="target_token_logprobs", loss_fn_outputs=outputs, metrics=metrics
        )

    def _token_logprobs(
        self,
        *args: Any,
        groups: Sequence[int] | None,
        row_tokens: int | None,
        **kwargs: Any,
    ) -> FusedLogprobOutput:
        """Token logprobs of a micro-batch: `cispo.engine.packing.token_logprobs` (packed rows when
        `groups` is given), or the FSDP root when sharded (which takes the same `groups`)."""
        if self._sharded is None:
            return token_logprobs(self.model, *args, groups=groups, row_tokens=row_tokens, **kwargs)
        logprobs, entropy = self._sharded(*args, groups=groups, row_tokens=row_tokens, **kwargs)
        return FusedLogprobOutput(logprobs=logprobs, entropy=entropy)

    def _trimmed(self) -> AbstractContextManager[None]:
        """`_trimming` when `config.trim_heap`, else nothing."""
        return _trimming() if self.config.trim_heap else nullcontext()

    @contextmanager
    def _mmap_threshold(self) -> Iterator[None]:
        """With `config.mmap_threshold`: glibc's mmap threshold is that for the block and its
        maximum (32 MiB: every smaller block in the heap, as the dynamic threshold ends up)
        after."""
        if self.config.mmap_threshold is None:
            yield
            return
        set_mmap_threshold(self.config.mmap_threshold)
        try:
            yield
        finally:
            set_mmap_threshold(MMAP_THRESHOLD_MAX)

    def _refuse_when_sharded(self, what: str) -> None:
        if self._sharded is not None:
            raise NotImplementedError(
                f"Engine.{what} on a sharded (FSDP2) engine: use cispo.engine.sharded_state "
                "(save_sharded_engine_state / load_sharded_engine_state / export_hf) "
                "(docs/distributed.md)"
            )

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        """Apply the accumulated gradients with AdamW, then zero them.

        Refused (NonFiniteStep) when the gradient norm is not finite (gradients are then cleared:
        they would poison every later step) or when the step would leave a non-finite weight or
        Adam moment: then weights, optimizer state and gradients are untouched. Method: a float64
        bound from each tensor's largest magnitude proves most steps finite
        (`_provably_finite`: one read of the state, no copy); when it cannot, a dry run of each
        parameter's step on clones decides exactly (`_dry_run_non_finite`: the same kernel and
        options, one parameter's memory at a time). The earlier method, a copy of the whole
        trainable state per step, held 4x the trainable parameters (2.2 GB for SmolLM2-135M).
        """
        with self._lock, self._trimmed():
            return self._optim_step(adam)

    def _optim_step(self, adam: AdamParams) -> dict[str, float]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if self._sharded is not None:  # DTensor gradients: a replicated DTensor norm
            norm = distributed.full_value(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else torch.tensor(0.0)
            )
        else:  # torch's own total norm (the clip's), computed once for the metric and the clip
            norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(
                f"non-finite gradient norm ({float(norm)}); "
                "the step was skipped and gradients cleared"
            )
        # The clip is torch's clip_grad_norm_ split in two (its total norm, then the multiply), so
        # that the dry run below multiplies by the very coefficient the real step will use.
        total = norm if adam.grad_clip_norm > 0 else None
        clip = None if total is None else torch.clamp(adam.grad_clip_norm / (total + 1e-6), max=1.0)
        options = {
            "lr": adam.learning_rate,
            "betas": (adam.beta1, adam.beta2),
            "eps": adam.eps,
            "weight_decay": adam.weight_decay,
        }
        bad = (
            None
            if _provably_finite(self.optimizer, options, clip)
            else _dry_run_non_finite(self.optimizer, options, clip)
        )
        if self._sharded is not None:  # every rank checks its shards; all refuse if any must
            bad = next((b for b in distributed.gather_objects(bad) if b is not None), None)
        if bad is not None:
            raise NonFiniteStep(
                f"this optim_step would make {bad} non-finite (learning_rate="
                f"{adam.learning_rate}, weight_decay={adam.weight_decay}, eps={adam.eps}); "
                "refused: weights, optimizer state and gradients are unchanged"
            )
        if total is not None:
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, total)
        for group in self.optimizer.param_groups:
            group.update(options)
        self._release_sampler()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {"optim/grad_norm": float(norm), "optim/lr": adam.learning_rate}

    # ---------------------------------------------------------------- sampling
    def sampler_model(self) -> nn.Module:
        """A frozen copy of the current weights (eval mode, no gradients), one per version, for
        a caller that builds its own sampler on it (the server)."""
        self._refuse_when_sharded("sampler_model")
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = None  # the old copy is freed before the new one is made
            with self._lock:
                self._snapshot = (self.version, self._frozen_copy())
        return self._snapshot[1]

    @property
    def shared_prefix(self) -> bool:
        """Whether `forward_backward` packs each group's shared prompt (`EngineConfig.shared_prefix`
        and a model the packed path serves exactly; else `shared_prefix_off` says why not)."""
        return self.shared_prefix_off is None

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over a process group (FSDP2)."""
        return self._sharded is not None

    def sampler(self) -> HFSampler:
        """An `HFSampler` on the current weights (policy version `self.version`), drawing
        unseeded samples from the engine's checkpointed generator.

        Copy-on-write: the sampler reads the trainer's own parameters (eval mode, no gradients,
        never at the same time as a training call), so sampling then training (the synchronous
        loop) copies nothing. When the weights are about to change (`optim_step`, `load_state`)
        while a sampler of the current version is still held, that sampler first gets a frozen
        copy of them, so a client keeps sampling from its own version's weights.

        Sharded: a collective when the version changed (every rank calls it at the same points):
        the full weights are gathered on every rank and loaded into one unsharded copy of the
        model per rank, so each rank's sampler holds the whole current policy."""
        if self._sampler_template is not None:
            if self._sampler is None or self._sampler.version != self.version:
                full = distributed.full_state_dict(self.model)
                if self._sampler is None:
                    self._sampler = HFSampler(
                        self._sampler_template,
                        eos_token_id=self.eos_token_id,
                        pad_token_id=self.pad_token_id,
                        tokenizer=self.tokenizer,
                        generator=self.sample_generator,
                    )
                self._sampler.load_weights(full, self.version)
            return self._sampler
        live = self._live() if self._live is not None else None
        if live is not None and live.version == self.version and live.shared:
            return live
        live = SharedSampler(
            self.model,
            lock=self._lock,
            after_pass=_trimming if self.config.trim_heap else nullcontext,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tokenizer=self.tokenizer,
            generator=self.sample_generator,
            version=self.version,
        )
        self._live = weakref.ref(live)
        return live

    def _release_sampler(self) -> None:
        """Before the weights change: the held shared sampler (if any) takes a frozen copy."""
        live = self._live() if self._live is not None else None
        self._live = None
        if live is not None and live.shared:
            live.detach(self._frozen_copy())

    def _frozen_copy(self) -> nn.Module:
        """A deep copy of the model without its gradients, in eval mode, parameters frozen."""
        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            model = copy.deepcopy(self.model)
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        for p in model.parameters():
            p.requires_grad_(False)
        self.sampler_copies += 1
        return model.eval()

    # ---------------------------------------------------------------- state
    def state(self, *, copy_tensors: bool = True) -> dict[str, Any]:
        """Weights, optimizer state, version and sample generator.

        copy_tensors=False returns the live tensors (views of the parameters and of the AdamW
        moments), for a caller that writes them out before the engine runs again, as the
        client's `save_state` does on the engine's worker thread: a copy would hold a second
        model and two more moments in memory while the file is written (1.5 GB for SmolLM2-135M).
        Only a tied weight's second name is copied, so the file has the same entries either way.
        """
        self._refuse_when_sharded("state")
        model: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, tensor in self.model.state_dict().items():
            # Without copies, a tied weight's second name still gets its own (one
            # embedding-sized copy), so the file keeps one entry per name either way.
            duplicate = tensor.data_ptr() in seen and tensor.numel() > 0
            seen.add(tensor.data_ptr())
            model[name] = tensor.detach().clone() if copy_tensors or duplicate else tensor.detach()
        optimizer = self.optimizer.state_dict()
        return {
            "model": model,
            "optimizer": copy.deepcopy(optimizer) if copy_tensors else optimizer,
            "version": self.version,
            "sample_generator": self.sample_generator.get_state(),
        }

    def load_state(self, state: Mapping[str, Any], *, optimizer: bool = True) -> None:
        self._refuse_when_sharded("load_state")
        with self._lock:
            self._release_sampler()
            self.model.load_state_dict(state["model"])
        if optimizer and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            foreach, fused = adamw_flags(self.config.adamw_impl)
            for group in self.optimizer.param_groups:  # a checkpoint's groups carry its impl
                group.update(foreach=foreach, fused=fused)
        self.version = int(state.get("version", 0))
        if "sample_generator" in state:
            self.sample_generator.set_state(state["sample_generator"])
        self._snapshot = None


class SharedSampler(HFSampler):
    """An `HFSampler` that reads a training model's live parameters until `detach` gives it a
    frozen copy of its own (`Engine.sampler`'s copy-on-write).

    While shared, every pass holds the engine's lock, runs under no_grad in eval mode and then
    restores the model's mode; `load_weights` detaches first (it would overwrite the trainer's
    weights otherwise). `after_pass` wraps every pass too (the engine's heap trim)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lock: threading.RLock,
        after_pass: Callable[[], AbstractContextManager[None]] = nullcontext,
        **kwargs: Any,
    ) -> None:
        self._lock = lock
        self._after_pass = after_pass
        self.shared = True
        """Whether it still reads the trainer's parameters."""
        super().__init__(model, freeze=False, **kwargs)

    def detach(self, copy_of_weights: nn.Module) -> None:
        """From now on sample from `copy_of_weights` (a frozen copy of the same version)."""
        with self._lock:
            self._model, self.shared = copy_of_weights, False

    def sample(
        self,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        stream_ids: Sequence[int] | None = None,
    ) -> list[list[SampledSequence]]:
        with self._lock, self._after_pass(), _eval_mode(self.model if self.shared else None):
            return super().sample(prompts, num_samples, params, stream_ids)

    def compute_logprobs(
        self, sequences: list[list[int]], *, temperature: float = 1.0
    ) -> list[list[float]]:
        with self._lock, self._after_pass(), _eval_mode(self.model if self.shared else None):
            return super().compute_logprobs(sequences, temperature=temperature)

    def load_weights(self, source: Mapping[str, Tensor], version: int) -> None:
        with self._lock:
            if self.shared:
                model = copy.deepcopy(self.model)
                for p in model.parameters():
                    p.grad = None
                    p.requires_grad_(False)
                self.detach(model.eval())
            super().load_weights(source, version)


@contextmanager
def _eval_mode(model: nn.Module | None) -> Iterator[None]:
    """`model` as a frozen copy would be for the block (eval mode, no parameter requiring grad,
    under no_grad), its training flags and `requires_grad` restored after. Parameters that
    require grad take other kernels in places (sampling logprobs ~5e-7 apart), so a shared pass
    is bitwise the pass of a frozen copy (what the async worker's sampler is)."""
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training


@contextmanager
def _trimming() -> Iterator[None]:
    """Run the block, then give the heap memory it freed back to the OS (`trim_heap`), whether
    it succeeded or raised."""
    try:
        yield
    finally:
        trim_heap()


def freeze_heap() -> None:
    """Move every object alive now (torch, transformers, the model) out of the garbage
    collector's reach. Without it a full collection scans the whole import graph every few
    steps: 150-200 ms pauses on the default run (docs/LOG.md, 2026-11-22 second entry)."""
    gc.collect()
    gc.freeze()


def save_engine_state(
    root: Path,
    name: str,
    state: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    *,
    keep_last: int = 0,
    durable: bool = True,
) -> Path:
    """Write an `Engine.state()` (the optimizer and sampler RNG may be absent: sampler weights)
    as the `cispo.checkpoint` named state `root/name`, with `trainer_state` plus its version."""
    generator = state.get("sample_generator")
    return save_named_state(
        root,
        name,
        model_state=state["model"],
        optimizer_state=state.get("optimizer") or {},
        rng_state={} if generator is None else {"sample_generator": generator},
        trainer_state={"version": int(state.get("version", 0)), **trainer_state},
        keep_last=keep_last,
        durable=durable,
    )


def load_engine_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`Engine.load_state` input, trainer_state) of a directory `save_engine_state` wrote; the
    optimizer is None when it has none."""
    checkpoint = load_checkpoint(path)
    state: dict[str, Any] = {
        "model": checkpoint.model_state,
        "optimizer": checkpoint.optimizer_state or None,
        "version": int(checkpoint.trainer_state.get("version", 0)),
    }
    if "sample_generator" in checkpoint.rng_state:
        state["sample_generator"] = checkpoint.rng_state["sample_generator"]
    return state, dict(checkpoint.trainer_state)
