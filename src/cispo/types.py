"""Data types of the Tinker-style client API, with the same fields and meanings as `tinker.types`.

Mirrors tinker 0.38 (see `docs/architecture.md`): `ModelInput`, `EncodedTextChunk`, `TensorData`,
`Datum`, `AdamParams`, `SamplingParams`, and the response types. Only encoded-text chunks are
supported (no images). `loss_fn_inputs` keys we read beyond Tinker's (`target_tokens`, `logprobs`,
`advantages`, `weights`): `mask` (bool/0-1, True counts in the loss; the cookbook strips it, so it
is optional), `old_logprobs` and `ref_logprobs` (the three-policy accounting of `cispo.losses`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from numbers import Integral, Real
from typing import Literal

import torch

__all__ = [
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "ModelInput",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsResponse",
    "TensorData",
]


SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds `torch.Generator.manual_seed` accepts; anything else fails inside torch."""
TEMPERATURE_RANGE = (1e-6, 1e6)
"""Positive temperatures allowed (0 is greedy). Below 1e-6, logits / temperature overflow float32
for logits of a few thousand; above 1e6 sampling is uniform to float precision anyway."""


def check_seed(name: str, seed: int) -> None:
    """ValueError naming `name` unless `seed` is an int torch can seed a generator with."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not low <= seed <= high:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64 - 1], got {seed!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Mirrors Tinker's `SamplingParams` (fields and meanings)."""

    max_tokens: int | None = None
    """Most tokens to generate per sequence. None: up to the model's max_position_embeddings."""
    seed: int | None = None
    """The base seed of the call's per-row random streams (`cispo.engine.sampler`); None: one
    integer drawn from the sampler's generator, else from torch's global RNG."""
    stop: str | list[str] | list[int] | None = None
    """Stop strings or stop token ids, in addition to eos. None: eos only. []: nothing stops a
    sequence but max_tokens (Tinker's meaning). The token that completes a stop is kept."""
    temperature: float = 1.0
    """Logits are divided by it. 0 means greedy (argmax; logprobs then at temperature 1)."""
    top_k: int = -1
    """Sample among the k most likely tokens; -1 means all."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p; 1 means all."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "seed", "top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.seed is not None:
            check_seed("seed", self.seed)
        low, high = TEMPERATURE_RANGE
        if not (self.temperature == 0 or low <= self.temperature <= high):
            # NaN fails both tests; so do inf and the tiny values whose logits/temperature
            # overflow float32 (softmax of inf is NaN).
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number in [{low}, {high}], "
                f"got {self.temperature!r}"
            )
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a finite number in (0, 1], got {self.top_p!r}")
        if self.stop == "" or (isinstance(self.stop, list) and "" in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True, kw_only=True)
class SampledSequence:
    tokens: list[int]
    """Completion tokens [T], without the prompt; includes the token that ended it (eos/stop)."""
    logprobs: list[float]
    """[T] sampler logprobs: log softmax(logits / temperature)[token], float32, full vocab."""
    stop_reason: Literal["stop", "length"]
    """"stop": eos, a stop token or a stop string ended it; "length": max_tokens did."""


Dtype = Literal["int64", "float32"]
_INT_KEYS = frozenset({"target_tokens"})


@dataclass(frozen=True)
class EncodedTextChunk:
    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ModelInput:
    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        if len(self.chunks) == 1:
            return list(self.chunks[0].tokens)
        return list(chain.from_iterable(chunk.tokens for chunk in self.chunks))

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


@dataclass(frozen=True)
class TensorData:
    """A flat tensor on the wire: `data` in row-major order, `shape` (None = 1-D)."""

    data: list[int] | list[float]
    dtype: Dtype
    shape: list[int] | None = None

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        dtype: Dtype = "int64" if not tensor.is_floating_point() else "float32"
        flat = tensor.detach().cpu().reshape(-1)
        data = flat.tolist() if dtype == "int64" else flat.float().tolist()
        return cls(data=data, dtype=dtype, shape=list(tensor.shape))

    def to_torch(self) -> torch.Tensor:
        dtype = torch.int64 if self.dtype == "int64" else torch.float32
        out = torch.tensor(self.data, dtype=dtype)
        return out.reshape(self.shape) if self.shape is not None else out

    def tolist(self) -> list[int] | list[float]:
        return list(self.data)


def as_tensor_data(key: str, value: object) -> TensorData:
    """`value` (TensorData, tensor or list) as TensorData; list dtypes follow Tinker's key rule."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, Sequence):
        dtype: Dtype = "int64" if key in _INT_KEYS else "float32"
        data = list(map(int if dtype == "int64" else float, value))  # no per-token bytecode
        return TensorData(data=data, dtype=dtype, shape=[len(data)])
    raise TypeError(
        f"loss_fn_inputs[{key!r}] must be a TensorData, torch.Tensor or list, got {type(value)}"
    )


@dataclass(frozen=True)
class Datum:
    """One training sequence: position i of `model_input` predicts `target_tokens[i]`."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        converted = {k: as_tensor_data(k, v) for k, v in self.loss_fn_inputs.items()}
        object.__setattr__(self, "loss_fn_inputs", converted)


ADAM_RANGES: dict[str, tuple[float, float, str]] = {
    "learning_rate": (0.0, 10.0, "[0, 10]"),
    "beta1": (0.0, 1.0, "[0, 1)"),
    "beta2": (0.0, 1.0, "[0, 1)"),
    "eps": (0.0, 1.0, "(0, 1]"),
    "weight_decay": (0.0, 10.0, "[0, 10]"),
    "grad_clip_norm": (0.0, 1e30, "[0, 1e30] (0 = off)"),
}
"""Allowed range of each `AdamParams` field (low, high, as written in errors). Every value must
also be a finite float: NaN, inf and 1e999 are refused. The upper bounds are far past any useful
setting (Tinker's defaults are lr 1e-4, weight decay 0) and exclude the values that overflow
float32 weights in one step (lr 1e308, weight_decay 1e300)."""


@dataclass(frozen=True)
class AdamParams:
    """AdamW step settings (Tinker's defaults). `grad_clip_norm=0` means no clipping.

    Each field must be a finite number in its `ADAM_RANGES` range; anything else is a ValueError
    naming the field, the value and the range.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name, (low, high, allowed) in ADAM_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"AdamParams.{name} must be a number in {allowed}, got {value!r}")
            number = float(value)
            ok = math.isfinite(number) and low <= number <= high
            if name in ("beta1", "beta2"):
                ok = ok and number < high
            elif name == "eps":
                ok = ok and number > low
            if not ok:
                raise ValueError(
                    f"AdamParams.{name} must be a finite number in {allowed}, got {value!r}"
                )


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Per-datum outputs (`logprobs` of the targets under the trainer) and merged metrics.

    Metric keys follow Tinker's `name:reduction` form (`loss:sum`) where Tinker defines them, and
    our `namespace/name` form otherwise.
    """

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class OptimStepResponse:
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class SaveWeightsResponse:
    path: str


@dataclass(frozen=True, kw_only=True)
class ModelData:
    arch: str | None = None
    """The architecture (`config.model_type`: "llama", "qwen2")."""
    model_name: str | None = None
    tokenizer_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class GetInfoResponse:
    """Tinker's `TrainingClient.get_info()` answer, with parameter counts added (our extension)."""

    model_data: ModelData
    model_id: str
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    num_parameters: int = 0
    """Every parameter of the model (LoRA adapters included)."""
    num_trainable_parameters: int = 0
    """The parameters the optimizer updates."""


@dataclass(frozen=True)
class SampleResponse:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


def datum_inputs(datum: Datum) -> Mapping[str, torch.Tensor]:
    """The loss_fn_inputs of a datum as tensors."""
    return {k: v.to_torch() for k, v in datum.loss_fn_inputs.items()}
