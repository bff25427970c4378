"""Futures that support both `.result()` and `await`, like the tinker SDK's `APIFuture`.

Work submitted to a client runs on that client's single worker thread, so requests execute strictly
in submission order (Tinker's per-model `seq_id` ordering contract) while the caller goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """A handle to a result computed in order on a worker (or lazily, on first `result()`)."""

    def __init__(
        self,
        future: concurrent.futures.Future[T],
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._future = future
        self._on_wait = on_wait

    def result(self, timeout: float | None = None) -> T:
        if self._on_wait is not None and not self._future.done():
            self._on_wait()
        return self._future.result(timeout=timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        if self._on_wait is not None and not self._future.done():
            await asyncio.get_running_loop().run_in_executor(None, self._on_wait)
        wrapped = asyncio.wrap_future(self._future)
        return await asyncio.wait_for(wrapped, timeout)

    def done(self) -> bool:
        return self._future.done()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


class OrderedWorker:
    """One thread that runs submitted calls in order; exceptions surface at `result()`."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[[], T]) -> APIFuture[T]:
        return APIFuture(self._pool.submit(fn))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def completed(value: T) -> APIFuture[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return APIFuture(future)
