"""The sampler worker: a separate process with its own copy of the weights, producing batches.

The trainer publishes weights into shared-memory buffers (`WeightChannel`) with a version (trainer
steps done); the worker copies the newest into its model before each batch, scores a fixed probe
batch, reports that (`SyncReport`), and samples the batch with `cispo.train.loop.collect_rollout`
(same data stream and sampling seeds as the synchronous loop).
`cispo.asynchronous.staleness.StalenessGate` paces it. Messages go back on one queue, in order: a
batch's `SyncReport` always precedes it.

With a `GradChannel` (`asynchronous.worker_grad_share > 0`) the worker also computes its share of
each batch's gradient at the weights the trainer's update starts from and leaves it in shared
buffers, announced by a `GradReport` (`_produce` has the order of work).

Why shared memory and not a queue for weights: one in-place copy per sync on each side, no
pickling, and the worker reads the newest weights only when it starts a batch (a version it never
read costs nothing). A `torch.multiprocessing` "spawn" context: forking after torch has started
threads is unsafe.
Shutdown: the worker ignores SIGINT (Ctrl-C reaches the whole process group; the trainer owns
shutdown), stops when asked or when its parent dies, and `SamplerWorker.close` joins it, then
terminates and kills it if it does not exit.

Left out: partial rollouts (weights change only between batches), several workers, a remote sampler.
"""

from __future__ import annotations

import math
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing
from torch import Tensor, nn

from cispo.asynchronous.staleness import NO_WEIGHTS, StalenessGate
from cispo.client.service import SamplingClient
from cispo.config import TrainConfig
from cispo.engine.engine import Engine, EngineConfig, freeze_heap, loss_totals
from cispo.engine.sampler import compute_logprobs
from cispo.models import load_bundle
from cispo.rollout.rollouts import (
    Rollout,
    collect_rollout,
    minibatch_size,
    output_logprobs,
    with_old_logprobs,
)
from cispo.tasks import make_task
from cispo.types import ForwardBackwardOutput

SPAWN = torch.multiprocessing.get_context("spawn")
_POLL_S = 0.5  # how often a waiting side re-checks for stop requests and dead peers


class WorkerError(RuntimeError):
    """The sampler worker failed or vanished."""


class WeightSyncError(RuntimeError):
    """The weight-sync canary fired: the sampler's weights are not the trainer's."""


def weight_fingerprint(state: Mapping[str, Tensor]) -> float:
    """Sum of every entry in float64, in state_dict order: equal on both sides of an exact copy."""
    return float(sum(float(t.detach().double().sum()) for t in state.values()))


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


def _shared_copy(tensor: Tensor) -> Tensor:
    copy = tensor.detach().clone()
    copy.share_memory_()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    return copy


class WeightChannel:
    """Shared-memory weights + published version + consumed count, under one condition variable."""

    def __init__(self, weights: Mapping[str, Tensor], *, consumed: int = 0) -> None:
        self._buffers = {k: _shared_copy(v) for k, v in weights.items()}
        self._cond = SPAWN.Condition()
        self._published = SPAWN.RawValue("q", NO_WEIGHTS)
        self._consumed = SPAWN.RawValue("q", consumed)
        self._stopped = SPAWN.RawValue("b", 0)

    # ---------------------------------------------------------------- trainer side
    def publish(self, weights: Mapping[str, Tensor], version: int) -> None:
        with self._cond, torch.no_grad():
            for name, buffer in self._buffers.items():
                buffer.copy_(weights[name])
            self._published.value = version
            self._cond.notify_all()

    def mark_consumed(self, count: int) -> None:
        with self._cond:
            self._consumed.value = count
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped.value = 1
            self._cond.notify_all()

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

    def load_into(self, model: nn.Module) -> int:
        """Copy the newest published weights into `model`; returns their version."""
        with self._cond, torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(self._buffers[name])
            return int(self._published.value)


def loss_fn_config(config: TrainConfig) -> dict[str, Any]:
    """The loss config of the async loop: `config.loss`'s plus the train-vs-sampler correction."""
    out = config.loss.loss_fn_config()
    run = config.asynchronous
    if run.correction != "none":
        out |= {"correction": run.correction, "correction_ratio_max": run.correction_ratio_max}
    return out


def recomputes_old_logprobs(config: TrainConfig, lag: int) -> bool:
    """Whether a batch trained `lag` versions after it was sampled gets fresh `old_logprobs`."""
    run = config.asynchronous
    return config.rl.recompute_old_logprobs or (
        lag > 0 and run.recompute_old_logprobs and config.loss.anchor == "old"
    )


def worker_share_count(num_datums: int, share: float) -> int:
    """How many of a batch's datums (the last ones) the worker computes the gradient of."""
    return math.floor(num_datums * share)


@dataclass(frozen=True)
class GradReport:
    """The worker's part of step `step`'s gradient is in the `GradChannel` buffers."""

    step: int
    count: int  # datums it covered: the last `count` of the first minibatch
    metrics: dict[str, float]  # its forward_backward metrics
    seconds: float
    fingerprint: float = 0.0
    """`GradChannel.fingerprint()` right after the worker wrote its gradient."""
    old_logprobs: list[list[float]] | None = None
    """Recomputed old logprobs (at the round's starting weights) of the datums from its share on
    to the end of the batch, for the round's later optimizer steps; None when not needed."""


def balanced_share(
    sampled: float, first: float, later: float, recomputed: float, *, gen_cost: float
) -> float:
    """The share s of the first optimizer step's work to give the worker.

    In units of one forward + backward pass over one position (a forward alone costs a third):
    `first` is the first step's work, `later` the work of the round's later steps (trainer only),
    `recomputed` the positions whose old logprobs the worker recomputes for them; the worker also
    samples `sampled` tokens at `gen_cost` each. Two conditions:

    - equal work:  trainer (1 − s)·first + later = worker c·sampled + s·first + recomputed / 3
      ⇒  s_work = (first + later − c·sampled − recomputed / 3) / (2·first);
    - no waiting:  the worker's report (its recompute, then its share; it samples afterwards)
      must be ready when the trainer finishes its part of the first step:
      recomputed / 3 + s·first ≤ (1 − s)·first  ⇒  s_ready = (first − recomputed / 3) / (2·first).

    s = min(s_work, s_ready), clipped to [0, 1]. Examples: first = 4000, sampled = 3000, c = 0.3,
    nothing later: s = min(3100, 4000) / 8000 = 0.3875; with later = recomputed = 4000:
    s = min(5766.7, 2666.7) / 8000 = 0.3333.
    """
    if first <= 0:
        return 0.0
    work = first + later - gen_cost * sampled - recomputed / 3
    ready = first - recomputed / 3
    return min(1.0, max(0.0, min(work, ready) / (2 * first)))


def share_layout(rollout: Rollout, config: TrainConfig, recompute: bool) -> tuple[int, int]:
    """(datums per minibatch, datums of the first minibatch the worker takes: its last ones).

    Both processes call it on the same batch and get the same answer."""
    datums, run = rollout.datums, config.asynchronous
    per = minibatch_size(len(datums), config)
    share = run.worker_grad_share
    if run.worker_grad_split == "tokens" and per:
        positions = [d.model_input.length for d in datums]
        first, rest, epochs = sum(positions[:per]), sum(positions[per:]), config.rl.epochs
        balanced = balanced_share(
            rollout.metrics.get("rl/tokens", 0.0),
            first * (4 / 3 if recompute else 1.0),  # a recompute adds a forward pass
            rest + (first + rest) * (epochs - 1),
            rest if later_steps_need_old_logprobs(config, recompute) else 0.0,
            gen_cost=run.worker_gen_cost,
        )
        share = min(share, balanced)
    return per, worker_share_count(per, share)


def later_steps_need_old_logprobs(config: TrainConfig, recompute: bool) -> bool:
    """Whether a round has optimizer steps after its first that read recomputed old logprobs."""
    return recompute and config.rl.epochs * config.rl.minibatches > 1


class GradChannel:
    """Shared-memory gradient buffers, one per trainable parameter: worker → trainer.

    Protocol: the worker writes its gradient, then sends a `GradReport` on the message queue; the
    trainer adds the buffers into its `.grad` only after reading that report, and the worker
    writes again only for a later step, which needs weights the trainer publishes after that.
    """

    def __init__(self, model: nn.Module) -> None:
        self._buffers = {
            name: _shared_copy(torch.zeros_like(p))
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def write_from(self, model: nn.Module) -> float:
        """Worker: move the `.grad` of `model`'s parameters into the buffers (zeros if None);
        returns the buffers' fingerprint, which the trainer checks before using them."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self._buffers:
                    if p.grad is None:
                        self._buffers[name].zero_()
                    else:
                        self._buffers[name].copy_(p.grad)
                    p.grad = None
        return self.fingerprint()

    def fingerprint(self) -> float:
        """`weight_fingerprint` of the buffers: equal on both sides when the transfer worked."""
        return weight_fingerprint(self._buffers)

    def add_into(self, model: nn.Module) -> None:
        """Trainer: `.grad += buffer` for every trainable parameter of `model`."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self._buffers:
                    if p.grad is None:
                        p.grad = self._buffers[name].clone()
                    else:
                        p.grad.add_(self._buffers[name])


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
        weights: Mapping[str, Tensor],
        grads: GradChannel | None = None,
    ) -> None:
        self.channel = WeightChannel(weights, consumed=start)
        self.grads = grads
        self.messages: Any = SPAWN.Queue()
        self.timeout_s = config.asynchronous.worker_timeout_s
        self.process = SPAWN.Process(
            target=_worker_main,
            name="cispo-sampler",
            daemon=True,
            args=(_WorkerSpec(config, start, probe_tokens), self.channel, self.messages, grads),
        )
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

    def next_message(self) -> SyncReport | Rollout | GradReport:
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
            message: SyncReport | Rollout | GradReport | WorkerFailure = pickle.loads(payload)
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


def _worker_main(
    spec: _WorkerSpec, channel: WeightChannel, messages: Any, grads: GradChannel | None
) -> None:
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C hits the whole group; the trainer stops us
    try:
        _produce(spec, channel, messages, grads)
    except BaseException:  # everything goes back to the trainer, which raises it
        _send(messages, WorkerFailure(traceback.format_exc()))


def _produce(
    spec: _WorkerSpec, channel: WeightChannel, messages: Any, grads: GradChannel | None
) -> None:
    """Generate batches `spec.start`.. as the gate allows; with a `GradChannel`, also compute the
    worker's share of each batch's gradient once the weights that batch is trained at (version =
    its step) are published. That share goes first: the trainer waits for it, while the next
    batch is only needed at the next step."""
    config, run = spec.config, spec.config.asynchronous
    torch.set_num_threads(run.worker_threads)
    bundle = load_bundle(
        config.model.base_model,
        lora_rank=config.model.lora_rank,
        seed=config.run.seed,
        overrides=config.model.overrides(),
    )
    engine = Engine(
        bundle.model,
        eos_token_id=bundle.tokenizer.eos_token_id,
        pad_token_id=int(bundle.tokenizer.pad_token_id or 0),
        tokenizer=bundle.tokenizer,
        config=EngineConfig(micro_batch_size=config.rl.micro_batch_size),
        seed=config.run.seed,
    )
    model = bundle.model.eval()
    if grads is None:
        for p in model.parameters():
            p.requires_grad_(False)
    task = make_task(config.task.name, **config.task.kwargs())
    gate = StalenessGate(run.max_staleness, run.queue_size)
    loaded = NO_WEIGHTS
    pending: dict[int, Rollout] = {}  # generated batches whose gradient share is still due
    step = spec.start  # the next batch to generate
    freeze_heap()
    cpu0 = time.process_time()

    def load_newest() -> int:
        t = time.perf_counter()
        version = channel.load_into(model)
        seconds = time.perf_counter() - t
        probe = compute_logprobs(model, spec.probe_tokens, temperature=config.sampling.temperature)
        fingerprint = weight_fingerprint(model.state_dict())
        _send(messages, SyncReport(version, fingerprint, probe, seconds))
        return version

    while step < config.rl.steps or pending:
        t0 = time.perf_counter()
        due = min(pending) if pending else None

        def ready(published: int, consumed: int, due: int | None = due, step: int = step) -> bool:
            share_due = due is not None and published == due
            return share_due or (
                step < config.rl.steps and gate.may_start(step, published, consumed)
            )

        if not channel.wait_until(ready):
            return
        waited = time.perf_counter() - t0
        if channel.published() != loaded:
            loaded = load_newest()
        if due is not None and loaded == due:
            assert grads is not None  # `pending` is filled only when there is a GradChannel
            _send(messages, _gradient_share(engine, pending.pop(due), config, grads))
            model.eval()
            continue
        engine.version = loaded  # SamplingClient stamps its rollouts with the engine's version
        rollout = collect_rollout(SamplingClient(engine, model, bundle), task, step, config)
        rollout.metrics["time/generator_wait"] = waited
        rollout.metrics["time/worker_cpu_total"] = time.process_time() - cpu0  # since the 1st batch
        _send(messages, rollout)
        if grads is not None:
            pending[step] = rollout
        step += 1


def _gradient_share(
    engine: Engine, rollout: Rollout, config: TrainConfig, grads: GradChannel
) -> GradReport:
    """The worker's part of the first optimizer step of `rollout`'s round, at the weights loaded
    now (the trainer's, version = rollout.step): the gradient of the last datums of the first
    minibatch, normalised by that minibatch's totals, and, when the round's later steps need
    recomputed old logprobs, those of every datum from its share on."""
    t = time.perf_counter()
    datums = rollout.datums
    recompute = recomputes_old_logprobs(config, rollout.step - rollout.version)
    per, count = share_layout(rollout, config, recompute)
    metrics: dict[str, float] = {}
    tail_old: list[list[float]] = []
    fingerprint = 0.0
    if count:
        tail = datums[per - count : per]
        out, recomputed = part_gradient(
            engine.forward_backward, tail, loss_totals(datums[:per]), config, recompute
        )
        fingerprint = grads.write_from(engine.model)
        metrics, tail_old = dict(out.metrics), recomputed or []
    old = None
    if later_steps_need_old_logprobs(config, recompute):
        old, rest = tail_old, datums[per:]
        if rest:
            temperature = config.sampling.temperature
            scored = engine.forward_backward(
                rest, "cross_entropy", forward_only=True, temperature=temperature
            )
            old = tail_old + output_logprobs(scored.loss_fn_outputs)
    return GradReport(rollout.step, count, metrics, time.perf_counter() - t, fingerprint, old)


def part_gradient(
    forward_backward: Callable[..., ForwardBackwardOutput],
    part: Sequence[Any],
    totals: tuple[float, float],
    config: TrainConfig,
    recompute: bool,
) -> tuple[ForwardBackwardOutput, list[list[float]] | None]:
    """Accumulate the gradient of `part` of a minibatch whose loss tokens and sequences are
    `totals` (`loss_totals` of the whole minibatch), recomputing its old logprobs first if
    `recompute`; returns the output and the recomputed old logprobs (None if not recomputed).

    `forward_backward` has `Engine.forward_backward`'s signature (the trainer passes its client's
    calls, the worker its engine's), so both sides of the gradient share run the same steps.
    """
    temperature = config.sampling.temperature
    old = None
    if recompute:
        scored = forward_backward(part, "cross_entropy", forward_only=True, temperature=temperature)
        old = output_logprobs(scored.loss_fn_outputs)
        part = with_old_logprobs(part, old)
    out = forward_backward(
        part,
        config.loss.name,
        loss_fn_config(config),
        temperature=temperature,
        num_tokens=totals[0],
        num_sequences=totals[1],
    )
    return out, old


def _send(messages: Any, message: SyncReport | Rollout | GradReport | WorkerFailure) -> None:
    # Pickled by value here: a queue would share tensors through file descriptors that vanish
    # when this process exits before the trainer reads its last batch.
    messages.put(pickle.dumps(message))
