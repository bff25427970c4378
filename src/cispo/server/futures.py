"""The futures (promise) protocol and the per-model ordering contract.

Every mutating request is answered at once with `{"request_id": ...}`; the client long-polls
`retrieve_future` until the result is there. `FutureTable` holds those results: JSON dicts, protobuf
bytes, or `{"error", "category"}`. A poll waits up to `poll_timeout` seconds for the result and
otherwise answers `try_again` (the SDK's client timeout is 45 s).

`ModelSequencer` enforces the SDK's ordering contract: a TrainingClient numbers its requests
`seq_id = 1, 2, 3, ...`, may send the chunks of one forward_backward concurrently (first chunk
last), and
expects the server to run them strictly in seq_id order. Requests that arrive early wait in a
buffer; each model runs on its own single worker thread, so submission order is execution order.
A repeated seq_id (a client retry after a lost response) gets the request id of the first one.
A refused request (a 4xx) still consumes its seq_id (`refuse`): the SDK numbers requests on the
client and never reuses a number, so a slot left empty would hold every later request forever.

All methods run on the event loop thread, except the work itself, which runs on the model's worker.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Result = dict[str, Any] | bytes
"""A JSON result or serialized protobuf bytes (ForwardBackwardOutput / SampleResponse)."""


class UserError(ValueError):
    """A request that is valid on the wire but wrong for this server (category "user")."""


class NotFound(LookupError):
    """An unknown session, model, sampler, request or checkpoint, or one another API key owns
    (the same answer either way); the server answers 404."""


@dataclass
class _Entry:
    owner: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Result | None = None


class FutureTable:
    """request_id -> result, filled by workers, read by long polls. Request ids are random
    (uuid4: 122 bits), and each future belongs to the user whose request created it: another
    user's poll gets NotFound, as for an id that never existed. A result is kept for
    `keep_seconds` after it is ready, then forgotten (its id becomes unknown), so a long-running
    server does not hold every result it ever produced."""

    def __init__(self, poll_timeout: float = 30.0, keep_seconds: float = 3600.0) -> None:
        self.poll_timeout = poll_timeout
        self.keep_seconds = keep_seconds
        self._entries: dict[str, _Entry] = {}
        self._done: collections.deque[tuple[float, str]] = collections.deque()

    def create(self, owner: str) -> str:
        cutoff = time.monotonic() - self.keep_seconds
        while self._done and self._done[0][0] < cutoff:
            self._entries.pop(self._done.popleft()[1], None)
        request_id = f"req-{uuid.uuid4().hex}"
        self._entries[request_id] = _Entry(owner)
        return request_id

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, request_id: str, result: Result) -> None:
        entry = self._entries[request_id]
        entry.result = result
        entry.done.set()
        self._done.append((time.monotonic(), request_id))

    def fail(self, request_id: str, error: BaseException) -> None:
        user = (UserError, ValueError, KeyError, NotFound)
        category = "user" if isinstance(error, user) else "server"
        if category == "server":
            logger.exception("request %s failed", request_id, exc_info=error)
        self.resolve(
            request_id, {"error": f"{type(error).__name__}: {error}", "category": category}
        )

    def run_on(
        self,
        executor: concurrent.futures.Executor,
        request_id: str,
        work: Callable[[], Result],
    ) -> None:
        """Run `work` on `executor` and resolve `request_id` with its result or error."""
        loop = asyncio.get_running_loop()

        def wrapped() -> None:
            try:
                result = work()
            except BaseException as error:  # delivered to the client as a failed future
                loop.call_soon_threadsafe(self.fail, request_id, error)
            else:
                loop.call_soon_threadsafe(self.resolve, request_id, result)

        executor.submit(wrapped)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def check(self, request_id: str, owner: str) -> None:
        """NotFound unless `request_id` exists and belongs to `owner` (one message for both)."""
        entry = self._entries.get(request_id)
        if entry is None or entry.owner != owner:
            raise NotFound(f"unknown request_id {request_id!r}")

    async def wait(self, request_id: str, timeout: float | None = None) -> Result | None:
        """The result, or None if it is not ready within the poll timeout."""
        entry = self._entries[request_id]
        if not entry.done.is_set():
            try:
                await asyncio.wait_for(entry.done.wait(), timeout or self.poll_timeout)
            except TimeoutError:
                return None
        return entry.result


@dataclass
class ModelSequencer:
    """Runs one model's requests in seq_id order on one worker thread."""

    name: str
    owner: str
    """The user whose futures this model's requests create."""
    window: int = 1024
    """seq_ids at or beyond `next_seq_id + window` are refused: they would wait (and hold memory)
    for predecessors that may never come. The SDK's lead is the chunk count of one
    forward_backward."""
    next_seq_id: int = 1
    _pending: dict[int, tuple[str, Callable[[], Result]]] = field(default_factory=dict)
    _by_seq_id: dict[int, str] = field(default_factory=dict)
    executor: concurrent.futures.ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"cispo-model-{self.name}"
        )

    def submit(self, table: FutureTable, seq_id: int, work: Callable[[], Result]) -> str:
        """Queue `work` at `seq_id`; returns its request id. UserError for a consumed seq_id."""
        if seq_id in self._by_seq_id:
            return self._by_seq_id[seq_id]  # the client resent a request we already have
        if seq_id < self.next_seq_id:
            raise UserError(
                f"seq_id {seq_id} was already executed for model {self.name} "
                f"(next expected: {self.next_seq_id})"
            )
        if seq_id >= self.next_seq_id + self.window:
            raise UserError(
                f"seq_id {seq_id} is too far ahead for model {self.name}: expected a seq_id in "
                f"[{self.next_seq_id}, {self.next_seq_id + self.window - 1}] "
                f"(next expected: {self.next_seq_id}, window {self.window})"
            )
        request_id = table.create(self.owner)
        self._by_seq_id[seq_id] = request_id
        self._pending[seq_id] = (request_id, work)
        while self.next_seq_id in self._pending:
            rid, fn = self._pending.pop(self.next_seq_id)
            table.run_on(self.executor, rid, fn)
            self.next_seq_id += 1
        # Forget old ids; a retry can only concern recent requests.
        for old in [s for s in self._by_seq_id if s < self.next_seq_id - 1024]:
            del self._by_seq_id[old]
        return request_id

    def refuse(self, table: FutureTable, seq_id: int, error: BaseException) -> None:
        """Consume `seq_id` for a request that was refused before it was queued: its slot runs
        nothing and completes with `error`, so the requests after it are not held behind it. A
        seq_id that is already taken or executed is left alone (it belongs to another request)."""
        if seq_id in self._by_seq_id or seq_id < self.next_seq_id:
            return

        def refused() -> Result:
            raise error

        self.submit(table, seq_id, refused)

    @property
    def waiting(self) -> list[int]:
        """seq_ids that arrived before their predecessors (for tests and diagnostics)."""
        return sorted(self._pending)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)
