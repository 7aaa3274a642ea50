"""Caps on open event streams: each holds a connection, a task and a subscription for as long
as its job runs, so a client could otherwise hold thousands.

A stream takes a slot before it starts and gives it back when its response ends, however it
ends (the job's final event, the client leaving, the server stopping). Past
``settings.max_streams_per_client`` a client's next stream gets 429, past
``settings.max_streams`` anyone's gets 503, both with ``Retry-After`` and before any byte of a
stream is sent. A client is its API key (all of a key's connections together), or on a
keyless server its IP address. Slots are counted on the event loop, where routes and responses
run, so they need no lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterable, Mapping

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from easel.domain import Principal, QuotaExceeded, ServerBusy

# Streams last as long as jobs run: a few seconds is as good a guess as any for when one ends.
RETRY_AFTER_S = 5


def client_of(principal: Principal, address: str | None) -> str:
    """Whom a stream counts against: the key, or the address of a keyless client."""
    return f"key:{principal.key_id}" if principal.key_id else f"ip:{address or 'local'}"


class Slot:
    """One open stream's place; :meth:`release` gives it back (once, however often called)."""

    def __init__(self, slots: StreamSlots, client: str) -> None:
        self._slots = slots
        self.client = client
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._give_back(self.client)


class StreamSlots:
    def __init__(self, *, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._open: Counter[str] = Counter()
        self._count = 0

    @property
    def open(self) -> int:
        return self._count

    def take(self, client: str) -> Slot:
        """A slot for ``client``, or QuotaExceeded (429) / ServerBusy (503)."""
        if self._open[client] >= self.per_client:
            raise QuotaExceeded(
                f"this client has {self.per_client} event streams open, the most allowed "
                "(settings: max_streams_per_client); close one first",
                retry_after_s=RETRY_AFTER_S,
            )
        if self._count >= self.total:
            raise ServerBusy(
                f"the server has {self.total} event streams open, the most it holds "
                "(settings: max_streams); try again shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        self._open[client] += 1
        self._count += 1
        return Slot(self, client)

    def _give_back(self, client: str) -> None:
        self._count -= 1
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that gives its slot back when it ends."""

    def __init__(
        self, content: AsyncIterable[str], *, slot: Slot, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
