"""Running a long operation in a worker thread while its progress streams
back over a gRPC server-streaming call.

The operation gets an `emit` callable; the RPC generator relays what it emits
and ends with the operation's final message. If the client goes away, the
operation is asked to cancel (it is never abandoned half-way: its own
cleanup runs in its thread).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping

from vmigrate.proto import agent_pb2

Emit = Callable[[agent_pb2.Progress], None]
_DONE = object()


def relay(operation: Callable[[Emit], agent_pb2.Progress],
          cancel: threading.Event | None = None,
          name: str = "operation") -> Iterator[agent_pb2.Progress]:
    q: queue.Queue = queue.Queue()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["final"] = operation(q.put)
        except BaseException as e:  # handed to the RPC thread, re-raised there
            outcome["error"] = e
        finally:
            q.put(_DONE)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            yield item
    except GeneratorExit:
        if cancel is not None:
            cancel.set()
        worker.join()
        raise
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    yield outcome["final"]  # type: ignore[misc]


class Stopwatch:
    """Records, under a name, the milliseconds since its previous call."""

    def __init__(self, into: MutableMapping[str, float]) -> None:
        self.into = into
        self.last = time.monotonic()

    def __call__(self, name: str) -> float:
        now = time.monotonic()
        ms = (now - self.last) * 1000
        self.into[name] = ms
        self.last = now
        return ms
