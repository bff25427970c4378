"""The engine: one model and its optimizer, below the client and the server.

- `engine.py`: `Engine` (forward_backward / optim_step / sample / state), collation of `Datum`s into
  padded tensors, metrics merging, engine state save/load.
- `sampler.py`: the `Sampler` protocol (what the client, the async worker and the server sample
  through) and its first implementation, `HFSampler`: the KV-cached HF sampler (`sample`,
  `compute_logprobs`).
- `batching.py`: `run_sample_batches`, the batching of pending sample requests (one `sample` per
  group of compatible requests) that the client's `SamplingClient` and the server both use.
- `validation.py`: `validate_datums` (what `Engine.check` and the server run before a
  forward_backward) and its `DatumError`; soft targets [T, K] as K ordinary datums.
- `heap.py`: giving freed heap memory back to the OS (glibc's malloc_trim / mallopt; no-ops
  elsewhere), which the engine does after each call (`EngineConfig.trim_heap`).
- `sharded_state.py`: an engine's state as a sharded DCP checkpoint, and the HF export, under
  torchrun (`cispo.distributed`; docs/distributed.md).

`cispo.client` (in process) and `cispo.server` (over HTTP) both sit on it; nothing here imports
them.
"""

from cispo.engine.engine import (
    Engine,
    EngineConfig,
    freeze_heap,
    load_engine_state,
    loss_totals,
    merge_metrics,
    save_engine_state,
)
from cispo.engine.sampler import HFSampler, Sampler, compute_logprobs, sample, weight_fingerprint
from cispo.engine.validation import DatumError, validate_datums

__all__ = [
    "DatumError",
    "Engine",
    "EngineConfig",
    "HFSampler",
    "Sampler",
    "compute_logprobs",
    "freeze_heap",
    "load_engine_state",
    "loss_totals",
    "merge_metrics",
    "sample",
    "save_engine_state",
    "validate_datums",
    "weight_fingerprint",
]
