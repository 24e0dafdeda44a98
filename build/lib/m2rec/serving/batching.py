"""Adaptive batching in the serving process: requests that arrive while a batch is running wait, then go together
into the next batch. An idle server runs a lone request at once; the busier it is, the larger the batches."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import Executor
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)
Query = TypeVar("Query")
Result = TypeVar("Result")


class AdaptiveBatcher(Generic[Query, Result]):
    """`await batcher(query)` -> the result of `handler([... query ...])`, the handler running on `executor`
    (one thread: the model and the feature store are used by one batch at a time)."""

    def __init__(self, handler: Callable[[list[Query]], Sequence[Result]], executor: Executor,
                 max_batch_size: int = 64, on_batch: Callable[[int], None] | None = None):
        self.handler, self.executor, self.max_batch_size, self.on_batch = handler, executor, max_batch_size, on_batch
        self._waiting: deque[tuple[Query, asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None

    async def __call__(self, query: Query) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((query, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        """Take up to max_batch_size waiting queries, run them, repeat until nobody waits."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch_size))]
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.handler, [query for query, _ in batch])
            except Exception as err:  # every caller of the batch gets the error; later batches still run
                log.exception("a batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():  # a caller that went away has a cancelled future
                    future.set_result(result)
