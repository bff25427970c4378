"""Protobuf codec: `ForwardBackwardRequest` in, `ForwardBackwardOutput` / `SampleResponse` out.

The message classes come from the installed `tinker` SDK (`tinker.proto.tinker_public_pb2`,
Apache-2.0) instead of a vendored copy: the schema must match the SDK that talks to us byte for
byte, the server needs that SDK pinned anyway (`cispo[serve]`), and one copy cannot drift from
the other.

Tensors on the wire: dense little-endian bytes with a dtype and shape, or sparse CSR (values + int64
row/column indices), which is densified here after its declared shape, row pointers and
column indices are checked (a declared size must equal the datum's token count and stay under a
configured maximum before anything is allocated). Token chunks are int32 bytes. Only
encoded-text chunks are accepted; image and audio chunks are refused with a message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from cispo.types import Datum, ForwardBackwardOutput, ModelInput, SampledSequence, TensorData

_NUMPY_DTYPE: dict[Any, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}


class WireError(ValueError):
    """A request that cannot be decoded; the server answers 400 with this message."""


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    datums: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool


_SOFT_TARGET_KEYS = frozenset({"target_tokens", "weights"})


def _tensor(name: str, msg: pb.Tensor, where: str, length: int, max_values: int) -> TensorData:
    """One `loss_fn_inputs` tensor of a datum with `length` tokens, as `TensorData`.

    The declared shape is checked (non-negative, at most `max_values` values; a sparse one exactly
    `length` values) before anything is allocated: a sparse tensor is densified into `prod(shape)`
    values, so a few bytes declaring [1, 10**8] would otherwise allocate gigabytes. Whether the
    values fit the datum and the loss is the engine's check (`Engine.check`), run next.
    """
    field = f"{where}: loss_fn_inputs[{name!r}]"
    np_dtype = _NUMPY_DTYPE.get(msg.dtype)
    if np_dtype is None:
        raise WireError(f"{field}: unsupported dtype {msg.dtype}; allowed: float32, int64, int32")
    dtype = "int64" if np_dtype.kind == "i" else "float32"
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise WireError(f"{field}: shape {shape} has a negative dimension")
    declared = math.prod(shape) if shape else None
    if declared is not None and declared > max_values:
        raise WireError(
            f"{field}: shape {shape} declares {declared} values; the limit is {max_values}"
        )
    # One value per token, or one row of K per token for the soft targets of cross_entropy
    # (`target_tokens` and `weights` of shape [T, K], as the cookbook's off-policy distillation).
    soft = name in _SOFT_TARGET_KEYS and len(shape) == 2 and shape[0] == length
    expected = length * shape[1] if soft else length
    sparse = msg.HasField("sparse_csr")
    if sparse and declared != expected:
        raise WireError(
            f"{field}: sparse shape {shape} declares {declared} values; this datum has {length} "
            f"tokens, so it must hold exactly {expected} (one per model_input token, or [T, K])"
        )
    try:
        if sparse:
            flat = _densify(field, msg.sparse_csr, shape, np_dtype)
        else:
            flat = np.frombuffer(msg.dense, dtype=np_dtype)
    except ValueError as error:  # bytes not a multiple of the item size
        raise WireError(f"{field}: {error}") from error
    if declared is not None and declared != flat.size:
        raise WireError(f"{field}: shape {shape} but {flat.size} values")
    data = flat.astype(np.int64 if dtype == "int64" else np.float32).tolist()
    return TensorData(data=data, dtype=dtype, shape=shape or [flat.size])  # type: ignore[arg-type]


def _densify(
    field: str, csr: pb.SparseCsr, shape: list[int], np_dtype: np.dtype[Any]
) -> np.ndarray:
    """A CSR tensor (values, row pointers, column indices) as the flat dense array.

    `shape` has already been checked against the datum length, so the allocation is bounded.
    Row pointers must start at 0, never decrease and end at the number of values; column indices
    must lie in [0, shape[1]).
    """
    if len(shape) != 2:
        raise WireError(f"{field}: a sparse CSR tensor must be 2-D, got shape {shape}")
    values = np.frombuffer(csr.values, dtype=np_dtype)
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    col = np.frombuffer(csr.col_indices, dtype="<i8")
    rows, cols = shape
    if len(crow) != rows + 1:
        raise WireError(f"{field}: {len(crow)} row pointers for {rows} rows (need {rows + 1})")
    if len(col) != len(values):
        raise WireError(f"{field}: {len(col)} column indices for {len(values)} values")
    if crow[0] != 0 or crow[-1] != len(values) or bool(np.any(np.diff(crow) < 0)):
        raise WireError(
            f"{field}: row pointers must start at 0, never decrease and end at the number of "
            f"values ({len(values)}), got {crow[:8].tolist()}{'...' if len(crow) > 8 else ''}"
        )
    if len(col) and (int(col.min()) < 0 or int(col.max()) >= cols):
        low, high = int(col.min()), int(col.max())
        raise WireError(f"{field}: column indices must be in [0, {cols}), got {low}..{high}")
    dense = np.zeros(rows * cols, dtype=np_dtype)
    row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(crow))
    dense[row_of * cols + col] = values
    return dense


def _tokens(raw: bytes, where: str) -> list[int]:
    if len(raw) % 4:
        raise WireError(f"{where}: token bytes are not int32 ({len(raw)} bytes)")
    return cast(list[int], np.frombuffer(raw, dtype="<i4").tolist())


MAX_TENSOR_VALUES = 1 << 24
"""Default cap on the values one `loss_fn_inputs` tensor may declare (16M: a 64 MiB float32)."""


def decode_forward_backward(
    body: bytes, *, max_tensor_values: int = MAX_TENSOR_VALUES
) -> ForwardBackwardCall:
    """Parse a `ForwardBackwardRequest`; raises WireError on anything malformed.

    CPU-bound (protobuf parse, token and tensor conversion): the server runs it off the event
    loop. Memory is bounded by the body size: every declared tensor size is checked against its
    datum's token count and `max_tensor_values` before anything is allocated.
    """
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as error:
        raise WireError(f"malformed ForwardBackwardRequest protobuf: {error}") from error
    if not msg.model_id:
        raise WireError("ForwardBackwardRequest.model_id is empty")
    datums: list[Datum] = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"datum {i}: only encoded_text chunks are supported, got {kind}")
            tokens.extend(_tokens(chunk.encoded_text.tokens, f"datum {i}"))
        inputs = {
            name: _tensor(name, t, f"datum {i}", len(tokens), max_tensor_values)
            for name, t in datum.loss_fn_inputs.items()
        }
        datums.append(Datum(model_input=ModelInput.from_ints(tokens), loss_fn_inputs=inputs))
    # The SDK writes floats to both maps and strings only to v2; v2 wins where both are set.
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        which = value.WhichOneof("value")
        if which == "number":
            config[key] = float(value.number)
        elif which == "text":
            config[key] = value.text
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        datums=datums,
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=bool(msg.forward_only),
    )


def _batched(
    arrays: Sequence[np.ndarray], dtype: Any, trailing: Sequence[int] = ()
) -> pb.BatchedTensor:
    """Concatenate per-datum arrays (row-major); offsets are byte offsets, num_datums + 1 of
    them; `trailing` is the shape after the first (per-datum length) dimension."""
    np_dtype = _NUMPY_DTYPE[dtype]
    parts = [np.ascontiguousarray(a, dtype=np_dtype) for a in arrays]
    offsets = np.zeros(len(parts) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([p.nbytes for p in parts])
    data = b"".join(p.tobytes() for p in parts)
    msg = pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=dtype)
    msg.trailing_shape.extend(int(d) for d in trailing)
    return msg


def _trailing(out: Mapping[str, TensorData]) -> tuple[int, ...]:
    """The shape after the first dimension of a datum's outputs (they all share it)."""
    first = next(iter(out.values()), None)
    return () if first is None else tuple(first.shape or [])[1:]


def encode_forward_backward(output: ForwardBackwardOutput) -> bytes:
    """`ArrayRecord`s holding every per-datum output field, plus `name:reduction` metrics: one
    record per run of consecutive datums whose outputs share a trailing shape (soft targets give
    [T, K] logprobs; the SDK reads each record as rectangular)."""
    outputs = output.loss_fn_outputs
    runs: list[list[dict[str, TensorData]]] = []
    for out in outputs:
        if runs and _trailing(runs[-1][-1]) == _trailing(out):
            runs[-1].append(out)
        else:
            runs.append([out])
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for run in runs or [[]]:
        record = pb.ArrayRecord(type_tag=output.loss_fn_output_type, num_datums=len(run))
        trailing = _trailing(run[0]) if run else ()
        for name in sorted({k for out in run for k in out}):
            values = [out[name] for out in run]
            dtype = pb.DTYPE_INT64 if values[0].dtype == "int64" else pb.DTYPE_FLOAT32
            arrays = [np.asarray(v.data) for v in values]
            record.fields[name].CopyFrom(_batched(arrays, dtype, trailing))
        msg.loss_fn_outputs.append(record)
    for key, value in output.metrics.items():
        msg.metrics[key] = float(value)
    return cast(bytes, msg.SerializeToString())


def sdk_metric_name(name: str) -> str:
    """Our metric names as the SDK's `name:reduction` (it splits on the one ':' to merge chunks).

    `loss:sum` stays; `.../min`, `.../max` reduce by min/max; counts and token totals add up;
    everything else is a mean (the engine already token-weights it within one call).
    """
    if ":" in name:
        return name
    if name.endswith(("min", "/min")):
        return f"{name}:min"
    if name.endswith(("max", "/max")):
        return f"{name}:max"
    if name.endswith(("count", "/num_tokens")):
        return f"{name}:sum"
    return f"{name}:mean"


def sdk_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {sdk_metric_name(k): float(v) for k, v in metrics.items()}


TOPK_EMPTY_LOGPROB = -99999.0
"""The SDK's sentinel for an empty top-k cell (with token id 0): `tinker.types.topk_logprobs`."""

TopK = tuple[np.ndarray, np.ndarray]
"""(logprobs [N, k] float32, token ids [N, k] int), NaN logprob rows meaning "no entry"."""


def _topk(msg: pb.TopkLogprobs, topk: TopK) -> None:
    logprobs, ids = np.asarray(topk[0], dtype="<f4"), np.asarray(topk[1], dtype="<i4")
    empty = np.isnan(logprobs)
    msg.logprobs = np.where(empty, TOPK_EMPTY_LOGPROB, logprobs).astype("<f4").tobytes()
    msg.token_ids = np.where(empty, 0, ids).astype("<i4").tobytes()
    msg.length, msg.k = int(logprobs.shape[0]), int(logprobs.shape[1])


def encode_sample_response(
    sequences: Sequence[SampledSequence],
    prompt_logprobs: Sequence[float | None] | None,
    *,
    topk_prompt: TopK | None = None,
    topk_sample: Sequence[TopK] | None = None,
) -> bytes:
    """`topk_prompt`: one row per prompt token (row 0, which has no context, empty);
    `topk_sample`: per sequence, one row per sampled token."""
    msg = pb.SampleResponse()
    for i, seq in enumerate(sequences):
        out = msg.sequences.add()
        out.stop_reason = (
            pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        )
        out.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        out.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
        if topk_sample is not None:
            _topk(out.topk_sampled_logprobs, topk_sample[i])
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if topk_prompt is not None:
        _topk(msg.topk_prompt_logprobs, topk_prompt)
    return cast(bytes, msg.SerializeToString())
