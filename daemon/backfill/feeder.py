"""The feeder: a small async Ray actor on the driver's node that hands planned chunks to
the actors, so that one actor pool (one model load per actor) serves the whole run
while the driver leases and plans chunk after chunk.

Ray Data's input is a list of tokens; an actor exchanges each token here for the next
chunk the driver planned (waiting until there is one). A token asked for again -- Ray
retried a dead actor's batch -- gets the same chunk again, until the driver has
recorded its results (:meth:`Feeder.forget`). After :meth:`Feeder.close`, tokens with
no chunk get an empty one. A plain class: the driver wraps it with ``ray.remote``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Feeder:
    def __init__(self) -> None:
        self.ready: deque[list[Any]] = deque()
        self.given: dict[int, list[Any]] = {}
        self.closed = False
        self.retakes = 0  # tokens asked for again (Ray retried their batch)
        self._cond = asyncio.Condition()

    async def put(self, rows: list[Any]) -> int:
        """Add a planned chunk; the number of chunks waiting for a token."""
        async with self._cond:
            self.ready.append(rows)
            self._cond.notify_all()
            return len(self.ready)

    async def close(self) -> None:
        """No more chunks: tokens without one get an empty chunk."""
        async with self._cond:
            self.closed = True
            self._cond.notify_all()

    async def depth(self) -> int:
        return len(self.ready)

    async def wait_room(self, depth: int) -> int:
        """Return once fewer than ``depth`` chunks wait (or the feeder is closed): the
        driver leases and plans the next chunk only then, without polling."""
        async with self._cond:
            await self._cond.wait_for(lambda: len(self.ready) < depth or self.closed)
            return len(self.ready)

    async def take(self, token: int) -> list[Any]:
        if token in self.given:
            self.retakes += 1
            return self.given[token]
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self.ready) or self.closed)
            if token in self.given:  # a retry arrived while this one waited
                self.retakes += 1
                return self.given[token]
            rows = self.ready.popleft() if self.ready else []
            self.given[token] = rows
            self._cond.notify_all()  # room for the next chunk (wait_room)
            return rows

    async def forget(self, tokens: list[int]) -> None:
        for t in tokens:
            self.given.pop(t, None)

    async def stats(self) -> dict[str, int]:
        return {"ready": len(self.ready), "given": len(self.given), "retakes": self.retakes}
