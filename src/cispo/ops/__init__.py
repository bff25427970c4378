"""Memory-bounded logprob/entropy kernels: fused lm_head + log-softmax, chunked over tokens."""

from cispo.ops.fused_logprobs import (
    FusedLogprobOutput,
    default_chunk_rows,
    fused_logprobs,
    naive_logprobs,
)
from cispo.ops.model_logprobs import model_token_logprobs, output_projection

__all__ = [
    "FusedLogprobOutput",
    "default_chunk_rows",
    "fused_logprobs",
    "model_token_logprobs",
    "naive_logprobs",
    "output_projection",
]
