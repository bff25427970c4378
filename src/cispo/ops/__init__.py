"""Memory-bounded logprob/entropy kernels: fused lm_head + log-softmax in [tokens, vocab] tiles."""

from cispo.ops.fused_logprobs import (
    DEFAULT_CHUNK_SIZE,
    TILE_BUDGET_BYTES,
    FusedLogprobOutput,
    fused_logprobs,
    naive_logprobs,
    vocab_block_size,
)
from cispo.ops.model_logprobs import model_token_logprobs, output_projection

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TILE_BUDGET_BYTES",
    "FusedLogprobOutput",
    "fused_logprobs",
    "model_token_logprobs",
    "naive_logprobs",
    "output_projection",
    "vocab_block_size",
]
