"""The running bridge: the pipeline and its transport on one event loop.

`Bridge.run()` is for a caller that owns the loop (`chat-bridge serve`, next to the embedded
broker); `start()` / `stop()` run it on a thread of its own (tests, embedding in other programs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable

from .pipeline import Pipeline
from .transport import Disconnected, Event, Listener, Transport

# Publishes events in-process (the embedded broker): (topic, payload, retain) in order -> a future
# that completes once the broker has taken them all.
Publisher = Callable[[list[tuple[str, bytes, bool]]], "concurrent.futures.Future[None]"]


class InProcessEvents:
    """Commands through `commands` (the embedded broker's in-process gate, or an MQTT transport; either
    acknowledges after commit); events handed straight to the embedded broker, in order, one
    hand-over per burst of events."""

    def __init__(self, commands: Transport, publisher: Publisher) -> None:
        self.commands = commands
        self.publisher = publisher
        self._batch: list[tuple[Event, asyncio.Future[None]]] = []

    def start(self, listener: Listener) -> None:
        self.commands.start(listener)

    def resubscribe(self) -> None:
        self.commands.resubscribe()

    def reconnect(self) -> None:
        self.commands.reconnect()

    def publish(self, event: Event) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._batch.append((event, future))
        if len(self._batch) == 1:
            loop.call_soon(self._hand_batch)
        return future

    def _hand_batch(self) -> None:
        batch, self._batch = self._batch, []
        ephemeral = getattr(self.publisher, "ephemeral", None)
        if ephemeral is not None and any(not e.qos for e, _ in batch):
            # QoS 0 (typing), forced so by the broker's own call; nothing waits for them
            ephemeral([(e.topic, e.payload) for e, _ in batch if not e.qos])
            for e, future in batch:
                if not e.qos:
                    future.set_result(None)
            batch = [(e, f) for e, f in batch if e.qos]
            if not batch:
                return
        handed = self.publisher([(e.topic, e.payload, e.retain) for e, _ in batch])
        if handed.done():  # taken already (the embedded broker on this loop)
            error = handed.exception()
            for _, future in batch:
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(Disconnected(f"the embedded broker did not take it: {error}"))
            return
        taken = asyncio.wrap_future(handed)

        def settle(done: asyncio.Future[None]) -> None:
            error = None if done.cancelled() else done.exception()
            for _, future in batch:
                if future.done():
                    continue
                if error is None and not done.cancelled():
                    future.set_result(None)
                else:
                    future.set_exception(Disconnected(f"the embedded broker did not take it: {error}"))

        taken.add_done_callback(settle)

    async def close(self, farewell: Event | None = None) -> None:
        if farewell is not None:
            with contextlib.suppress(Disconnected, TimeoutError):
                await asyncio.wait_for(self.publish(farewell), timeout=5)
        await self.commands.close(None)


class Bridge:
    """The pipeline with its transport; `ready` once it announced `online`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.service = pipeline.service
        self.status = pipeline.status
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()

        async def mark_ready() -> None:
            await self.pipeline.ready.wait()
            self.ready.set()

        marker = asyncio.create_task(mark_ready())
        try:
            await self.pipeline.run()
        finally:
            marker.cancel()

    def start(self) -> None:
        """Runs the bridge on a thread with its own event loop."""
        started = threading.Event()

        def main() -> None:
            async def go() -> None:
                task = asyncio.create_task(self.run())
                started.set()
                await task

            asyncio.run(go())

        self._thread = threading.Thread(target=main, name="bridge-loop", daemon=True)
        self._thread.start()
        started.wait(10)

    def stop(self) -> None:
        """Finishes the batch in hand, forgets what the broker took, announces `offline`, disconnects."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just ended
                loop.call_soon_threadsafe(self.pipeline.stop)
        if self._thread is not None:
            self._thread.join(30)
