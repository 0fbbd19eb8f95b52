"""Dynamic batching inside the server process: requests arriving together share one engine call.

KServe's own batcher is the Go agent sidecar of an InferenceService (``spec.predictor.batcher``); it does
not exist on a laptop or in the tests, and it batches OIP instances, not our files. So the adapter
batches itself like TorchServe's frontend does (up to ``batchSize`` rows, waiting at most
``maxBatchDelay`` ms after the first, the archive's model-config.yaml values): a small asyncio queue,
written here because no library offers "collect awaitables for N ms, run them in one thread call".
The engine runs in one worker thread, so a model never computes two batches at once (as one
TorchServe worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class Batcher:
    """``await submit(item)`` -> that item's answer of ``run(items)``; ``run`` returns one answer per item."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_size: int, max_delay_ms: float) -> None:
        self.run = run
        self.max_size = max(1, int(max_size))
        self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # of the last batches (bounded), for the tests and the logs

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None:  # created in the server's event loop, on first use
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._loop())
        future = loop.create_future()
        await self.queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.max_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-100:]
            if len(batch) > 1:
                log.info("dynamic batch of %d rows", len(batch))
            try:
                answers = await loop.run_in_executor(self.executor, self.run, [item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 -- run() answers every item; a bug must still release them
                answers = [err] * len(batch)
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
