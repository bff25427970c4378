"""Data types of the Tinker-style client API, with the same fields and meanings as `tinker.types`.

Mirrors tinker 0.38 (see `docs/architecture.md`): `ModelInput`, `EncodedTextChunk`, `TensorData`,
`Datum`, `AdamParams`, `SamplingParams`, and the response types. Only encoded-text chunks are
supported (no images). `loss_fn_inputs` keys we read beyond Tinker's (`target_tokens`, `logprobs`,
`advantages`, `weights`): `mask` (bool/0-1, True counts in the loss; the cookbook strips it, so it
is optional), `old_logprobs` and `ref_logprobs` (the three-policy accounting of `cispo.losses`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
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


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Mirrors Tinker's `SamplingParams` (fields and meanings)."""

    max_tokens: int | None = None
    """Most tokens to generate per sequence. None: up to the model's max_position_embeddings."""
    seed: int | None = None
    """Seeds a fresh CPU generator for this call; None uses the `generator` argument, else
    torch's global RNG."""
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
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
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


@dataclass(frozen=True)
class AdamParams:
    """AdamW step settings (Tinker's defaults). `grad_clip_norm=0` means no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if not self.learning_rate >= 0:
            raise ValueError(f"AdamParams.learning_rate must be >= 0, got {self.learning_rate}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"AdamParams.{name} must be in [0, 1), got {value}")
        if not self.eps > 0:
            raise ValueError(f"AdamParams.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("AdamParams.weight_decay and grad_clip_norm must be >= 0")


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
