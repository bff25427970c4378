"""The sampler worker: a separate process with its own copy of the weights, producing batches.

The trainer publishes weights as `cispo.engine.weight_sync` version directories (safetensors +
manifest, renamed into place) with a version (trainer rounds done); the worker loads the newest
into its `Sampler` through a `WeightReceiver` (stale versions and skipped tensors refused) before
each batch, scores a fixed probe batch, reports that with the sampler's weight fingerprint
(`SyncReport`), and samples the batch with `cispo.rollout.rollouts.collect_rollout` (same data
stream and sampling seeds as the in-process source). `cispo.asynchronous.staleness.StalenessGate`
paces it through `WeightChannel`'s shared counters. Messages go back on one queue, in order: a
batch's `SyncReport` always precedes it. The trainer's side is
`cispo.asynchronous.source.WorkerSource`.

Why directories and not shared-memory buffers (as before) or a queue: one format for every
sampler (another process here, vLLM, a sampler on another node reading a shared file system), a
version is whole or absent (the rename), and the worker reads only the newest version when it
starts a batch. The cost is one file write and read per sync, unsynced (the directory is private
to the run and removed with the worker). A `torch.multiprocessing` "spawn" context: forking after
torch has started threads is unsafe.
Shutdown: the worker ignores SIGINT (Ctrl-C reaches the whole process group; the trainer owns
shutdown), stops when asked or when its parent dies, and `SamplerWorker.close` joins it, then
terminates and kills it if it does not exit.

Left out: partial rollouts (weights change only between batches), several workers, a remote sampler.
"""

from __future__ import annotations

import math
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing
from torch import Tensor

from cispo.asynchronous.staleness import NO_WEIGHTS, StalenessGate
from cispo.client.service import SamplingClient
from cispo.config import TrainConfig
from cispo.engine.engine import freeze_heap
from cispo.engine.sampler import HFSampler, Sampler
from cispo.engine.weight_sync import (  # one WeightSyncError for every weight-sync path
    WeightReceiver,
    WeightSyncError,
    publish_weights,
    version_dir,
)
from cispo.models import load_bundle
from cispo.rollout.rollouts import Rollout, collect_rollout
from cispo.tasks import make_task

SPAWN = torch.multiprocessing.get_context("spawn")
_POLL_S = 0.5  # how often a waiting side re-checks for stop requests and dead peers


class WorkerError(RuntimeError):
    """The sampler worker failed or vanished."""


@dataclass(frozen=True)
class SyncReport:
    """What the worker saw right after loading weights `version`."""

    version: int
    fingerprint: float
    probe_logprobs: list[list[float]]  # [N][T_i - 1], `compute_logprobs` of the probe sequences
    seconds: float  # time to copy the weights in


@dataclass(frozen=True)
class WorkerFailure:
    traceback: str


def join_publish(root: Path, version: int, weights: Mapping[str, Tensor]) -> None:
    """`publish_weights` as the channel calls it: two versions kept, not fsynced. Under torchrun
    every rank calls it at the same point (rank 0 from `WeightChannel.publish`, under the
    channel's lock; rank 0 writes, the others only join its checks and barrier)."""
    publish_weights(root, version, weights, keep_last=2, durable=False)


class WeightChannel:
    """Published version + consumed count under one condition variable (the pacing), and the
    weights themselves as `cispo.engine.weight_sync` version directories under `root`.

    `publish` writes version k's directory (not fsynced: it lives only as long as the run) and
    then sets the version, both under the lock; `load_into` reads the published version's
    directory under the lock too, so no publish replaces or prunes it mid-read (two versions are
    kept). The reader's `WeightReceiver` refuses a stale version or a skipped tensor
    (`WeightSyncError`) before loading; the fingerprint and probe checks stay on the trainer's
    side (`SyncCanary`, from the worker's `SyncReport`), as before.
    """

    def __init__(self, root: Path, *, consumed: int = 0) -> None:
        self.root = Path(root)
        self._cond = SPAWN.Condition()
        self._published = SPAWN.RawValue("q", NO_WEIGHTS)
        self._consumed = SPAWN.RawValue("q", consumed)
        self._stopped = SPAWN.RawValue("b", 0)
        self._receiver: WeightReceiver | None = None  # the worker's, made on its first load
        self._worker_alive: Callable[[], bool] | None = None  # the trainer's (`watch`)

    # ---------------------------------------------------------------- trainer side
    def watch(self, alive: Callable[[], bool]) -> None:
        """Trainer side: `alive()` tells whether the worker lives (see `_locked`)."""
        self._worker_alive = alive

    @contextmanager
    def _locked(self) -> Iterator[bool]:
        """The lock, trainer side (yields True), or, if the worker died holding it (killed by
        SIGKILL or the OOM killer: it is never released then), no lock (yields False): nobody
        else uses the channel any more, and `SamplerWorker.next_message` reports the death."""
        while not self._cond.acquire(timeout=_POLL_S):
            if self._worker_alive is not None and not self._worker_alive():
                yield False
                return
        try:
            yield True
        finally:
            self._cond.release()

    def publish(self, weights: Mapping[str, Tensor], version: int) -> None:
        """Write version `version` and let the worker see it. Under torchrun only rank 0 has a
        channel; the other ranks call `join_publish` at the same point (a collective)."""
        with self._locked() as held:
            join_publish(self.root, version, weights)
            self._published.value = version
            if held:
                self._cond.notify_all()

    def mark_consumed(self, count: int) -> None:
        with self._locked() as held:
            self._consumed.value = count
            if held:
                self._cond.notify_all()

    def stop(self) -> None:
        """Ask the worker to stop. Never blocks for long: a worker killed (SIGKILL, the OOM
        killer) while holding the lock never releases it, so the flag is set without the lock (a
        waiting worker re-checks it every `_POLL_S`) and the lock is only tried, to wake it now."""
        self._stopped.value = 1
        if self._cond.acquire(timeout=_POLL_S):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()

    # ---------------------------------------------------------------- worker side
    def wait_to_start(self, gate: StalenessGate, step: int) -> bool:
        """Block until `gate` lets batch `step` start (True) or the run stops (False)."""
        return self.wait_until(lambda pub, con: gate.may_start(step, pub, con))

    def wait_until(self, ready: Callable[[int, int], bool]) -> bool:
        """Block until `ready(published, consumed)` (True) or the run stops (False)."""
        parent = SPAWN.parent_process()
        with self._cond:
            while True:
                if self._stopped.value or (parent is not None and not parent.is_alive()):
                    return False
                if ready(self._published.value, self._consumed.value):
                    return True
                self._cond.wait(timeout=_POLL_S)

    def published(self) -> int:
        with self._cond:
            return int(self._published.value)

    def load_into(self, sampler: Sampler) -> int:
        """Load the newest published version into `sampler` through a `WeightReceiver` (under
        the lock, so that no publish replaces it mid-read); returns its version."""
        with self._cond:
            version = int(self._published.value)
            if self._receiver is None or self._receiver.sampler is not sampler:
                # The fingerprint goes to the trainer's SyncCanary in the SyncReport instead.
                self._receiver = WeightReceiver(sampler, check_fingerprint=False)
            self._receiver.load(version_dir(self.root, version))
            return version

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_receiver"] = None  # the trainer's side never has one; the worker makes its own
        state["_worker_alive"] = None  # the trainer's view of the worker process
        return state


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest |a − b| over ragged rows (NaN if any entry is NaN)."""
    out = 0.0
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            d = abs(x - y)
            if math.isnan(d):
                return math.nan
            out = max(out, d)
    return out


class SyncCanary:
    """Checks each `SyncReport` against what the trainer published; raises `WeightSyncError`.

    Two failures: the probe logprobs differ by more than `threshold` (max |sampler − trainer| over
    the probe tokens), or the trainer's weights changed since the sampler's previous sync but the
    sampler's did not (a silent no-op sync, which a small update could hide from the first check).
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._expected: dict[int, tuple[float, list[list[float]]]] = {}
        self._last: tuple[int, float] | None = None  # (version, sampler fingerprint)

    def expect(self, version: int, fingerprint: float, probe_logprobs: list[list[float]]) -> None:
        self._expected[version] = (fingerprint, probe_logprobs)

    def check(self, report: SyncReport) -> dict[str, float]:
        if report.version not in self._expected:
            raise WeightSyncError(
                f"the sampler loaded weights version {report.version}, which the "
                f"trainer never published (published: {sorted(self._expected)})"
            )
        trainer_fp, trainer_lps = self._expected[report.version]
        if self._last is not None:
            last_version, last_sampler_fp = self._last
            if (
                trainer_fp != self._expected[last_version][0]
                and report.fingerprint == last_sampler_fp
            ):
                raise WeightSyncError(
                    f"weight sync to version {report.version} did not change the sampler's weights "
                    f"(fingerprint {report.fingerprint!r}, as at version {last_version}) although "
                    f"the trainer's changed: the sampler would silently sample from stale weights"
                )
        diff = max_abs_diff(report.probe_logprobs, trainer_lps)
        if not diff <= self.threshold:
            raise WeightSyncError(
                f"after weight sync to version {report.version}, sampler and trainer disagree on "
                f"the probe batch: max |logprob difference| = {diff:.3g} > "
                f"asynchronous.canary_threshold = {self.threshold:g}"
            )
        self._expected = {v: e for v, e in self._expected.items() if v >= report.version}
        self._last = (report.version, report.fingerprint)
        return {"canary/max_abs_logprob_diff": diff, "time/weight_load": report.seconds}


@dataclass(frozen=True)
class _WorkerSpec:
    config: TrainConfig
    start: int
    probe_tokens: list[list[int]]


class SamplerWorker:
    """Trainer-side handle: starts the worker, publishes weights, returns its messages, stops it."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        start: int,
        probe_tokens: list[list[int]],
    ) -> None:
        # Version directories in a private temporary directory, removed by `close`.
        self.weights_root = Path(tempfile.mkdtemp(prefix="cispo-weights-"))
        self.channel = WeightChannel(self.weights_root, consumed=start)
        self.messages: Any = SPAWN.Queue()
        self.timeout_s = config.asynchronous.worker_timeout_s
        self.process = SPAWN.Process(
            target=_worker_main,
            name="cispo-sampler",
            daemon=True,
            args=(_WorkerSpec(config, start, probe_tokens), self.channel, self.messages),
        )
        self.channel.watch(self.process.is_alive)
        self.pid: int | None = None

    def start(self) -> None:
        # An ignored SIGINT survives exec, so a Ctrl-C during the worker's imports cannot kill it
        # either; the worker then keeps ignoring it (`_worker_main`).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.process.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self.pid = self.process.pid

    def publish(self, weights: Mapping[str, Tensor], version: int) -> None:
        self.channel.publish(weights, version)

    def mark_consumed(self, count: int) -> None:
        self.channel.mark_consumed(count)

    def next_message(self) -> SyncReport | Rollout:
        """The worker's next message; raises `WorkerError` if it failed, died or went silent."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                payload = self.messages.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise WorkerError(
                        f"the sampler worker (pid {self.pid}) exited with code "
                        f"{self.process.exitcode} without reporting an error"
                    ) from None
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"the sampler worker sent nothing for {self.timeout_s:g} s "
                        "(asynchronous.worker_timeout_s)"
                    ) from None
                continue
            message: SyncReport | Rollout | WorkerFailure = pickle.loads(payload)
            if isinstance(message, WorkerFailure):
                raise WorkerError(f"the sampler worker failed:\n{message.traceback}")
            return message

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop and join the worker (terminate, then kill, if it does not exit in `timeout_s`)."""
        if self.pid is None:
            return
        self.channel.stop()
        deadline = time.monotonic() + timeout_s
        while self.process.is_alive() and time.monotonic() < deadline:
            self._drain()  # a child blocked on a full pipe cannot exit
            self.process.join(timeout=0.05)
        for end in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                end()
                self.process.join(timeout=2.0)
        self._drain()
        self.messages.close()
        self.messages.cancel_join_thread()
        shutil.rmtree(self.weights_root, ignore_errors=True)

    def _drain(self) -> None:
        try:
            while True:
                self.messages.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass

    def __enter__(self) -> SamplerWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main(spec: _WorkerSpec, channel: WeightChannel, messages: Any) -> None:
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C hits the whole group; the trainer stops us
    try:
        _produce(spec, channel, messages)
    except BaseException:  # everything goes back to the trainer, which raises it
        _send(messages, WorkerFailure(traceback.format_exc()))


def _produce(spec: _WorkerSpec, channel: WeightChannel, messages: Any) -> None:
    """Generate batches `spec.start`.. as the gate allows, each with the newest weights."""
    config, run = spec.config, spec.config.asynchronous
    torch.set_num_threads(run.worker_threads)
    bundle = load_bundle(
        config.model.base_model,
        lora_rank=config.model.lora_rank,
        seed=config.run.seed,
        overrides=config.model.overrides(),
    )
    sampler = HFSampler(
        bundle.model,
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
        tokenizer=bundle.tokenizer,
        generator=torch.Generator().manual_seed(config.run.seed),
        version=NO_WEIGHTS,
    )
    task = make_task(config.task.name, **config.task.kwargs())
    gate = StalenessGate(run.max_staleness, run.queue_size)
    freeze_heap()
    cpu0 = time.process_time()
    for step in range(spec.start, config.rl.steps):
        t0 = time.perf_counter()
        if not channel.wait_to_start(gate, step):
            return
        waited = time.perf_counter() - t0
        if channel.published() != sampler.version:
            t = time.perf_counter()
            version = channel.load_into(sampler)
            seconds = time.perf_counter() - t
            probe = sampler.compute_logprobs(
                spec.probe_tokens, temperature=config.sampling.temperature
            )
            _send(messages, SyncReport(version, sampler.fingerprint(), probe, seconds))
        rollout = collect_rollout(SamplingClient(sampler, bundle.tokenizer), task, step, config)
        rollout.metrics["time/generator_wait"] = waited
        rollout.metrics["time/worker_cpu_total"] = time.process_time() - cpu0  # since the 1st batch
        _send(messages, rollout)


def _send(messages: Any, message: SyncReport | Rollout | WorkerFailure) -> None:
    # Pickled by value here: a queue would share tensors through file descriptors that vanish
    # when this process exits before the trainer reads its last batch.
    messages.put(pickle.dumps(message))
