"""Bounded staleness for asynchronous RL: when the generator may start a batch, and what lag it had.

Versions count trainer steps: version v is the policy after v rounds of updates (one round per
rollout batch, `rl.epochs × rl.minibatches` optimizer steps each). Batch `step` is trained on at
trainer version `step`, so a batch sampled with weights version v has lag `step − v`. Every token
of a batch carries the version of the weights that sampled it; weights only change between
batches (no partial rollouts), so a batch's oldest token is its only version.

The bound is kept by pacing, not by throwing work away: the generator starts batch `step` only
once weights of version ≥ `step − max_staleness` are published, and only while fewer than
`queue_size` finished batches wait for the trainer. Since it always samples with the newest
published weights, a batch can never be older than the bound when the trainer reaches it;
`admits` is the trainer's check of that claim (a refused batch is discarded and counted).

Pure bookkeeping: no process, queue or clock (the worker and `tests/train/test_async.py`'s
random-timing simulation drive it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

NO_WEIGHTS = -1
"""The published version before the trainer has published any weights."""


@dataclass(frozen=True)
class StalenessGate:
    max_staleness: int
    """Most trainer steps a batch's oldest token may lag the trainer when it is trained on."""
    queue_size: int = 1
    """Finished batches that may wait for the trainer."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")

    def may_start(self, step: int, published: int, consumed: int) -> bool:
        """Whether sampling of batch `step` may start now.

        published: newest published weights version (NO_WEIGHTS before the first);
        consumed: batches the trainer has taken so far (batches before `step` not taken wait).
        """
        fresh = published != NO_WEIGHTS and published >= step - self.max_staleness
        room = step - consumed < self.queue_size
        return fresh and room

    def admits(self, step: int, version: int) -> bool:
        """Whether a batch sampled with weights `version` may be trained on at trainer `step`."""
        return 0 <= step - version <= self.max_staleness


@dataclass
class LagStats:
    """Token-weighted lag histogram of a run (lag = trainer version − token's version)."""

    max_staleness: int
    tokens_by_lag: dict[int, int] = field(default_factory=dict)
    discarded: int = 0
    """Batches refused by `StalenessGate.admits` (pacing should keep this at 0)."""

    def add(self, step: int, token_versions: Iterable[tuple[int, int]]) -> dict[str, float]:
        """Record (version, n_tokens) pairs trained on at `step`; returns this step's metrics."""
        hist = dict.fromkeys(range(self.max_staleness + 1), 0)
        for version, n in token_versions:
            hist[step - version] = hist.get(step - version, 0) + n
        for lag, n in hist.items():
            self.tokens_by_lag[lag] = self.tokens_by_lag.get(lag, 0) + n
        total = sum(hist.values()) or 1
        metrics = {f"staleness/lag_{lag}_frac": n / total for lag, n in sorted(hist.items())}
        lags = [lag for lag, n in hist.items() if n]
        metrics["staleness/lag_max"] = float(max(lags, default=0))
        metrics["staleness/discarded"] = float(self.discarded)
        return metrics

    @property
    def mean(self) -> float:
        total = sum(self.tokens_by_lag.values())
        return sum(lag * n for lag, n in self.tokens_by_lag.items()) / total if total else 0.0

    @property
    def max(self) -> int:
        return max((lag for lag, n in self.tokens_by_lag.items() if n), default=0)
