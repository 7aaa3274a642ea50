"""uvicorn's server with Easel's order of shutdown, so clients are told before they are cut.

uvicorn stops in this order: stop listening, wait up to ``timeout_graceful_shutdown`` for the
open connections to finish, cancel what is left (an event stream never finishes by itself: it
was cut mid-way, with a ``CancelledError`` traceback in the log), then run the app's lifespan
shutdown (Easel's drain). :class:`GracefulServer` puts the drain and the end of the streams
between the first two steps:

1. stop listening (new connections are refused);
2. drain the workers while the streams stay open: a client following the running job sees it
   finish, or sees its ``requeued`` event when the drain puts it back;
3. end every stream: the app's ``state.on_stopping`` callbacks run, which give each job event
   stream a ``server-stopping`` event (``EventBus.stop_streams``) and end the web UI's
   heartbeat streams (Gradio's ``stop_event``); each response completes normally and its
   connection closes;
4. uvicorn's own shutdown, which now finds no stream to wait for or cancel, and the lifespan
   shutdown, whose drain has nothing left to do.

A second Ctrl-C during the drain stops waiting for it (uvicorn's forced exit); the running job
stays ``running`` in the database and the next start requeues it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from easel.services import Services

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.services: Services = app.state.services
        self.on_stopping: list[Callable[[], object]] = app.state.on_stopping

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        # a daemon thread, not the loop's executor: a forced exit does not wait for it
        drain = threading.Thread(target=self._drain, name="easel-drain", daemon=True)
        drain.start()
        while drain.is_alive() and not self.force_exit:
            await asyncio.sleep(0.1)
        for callback in self.on_stopping:
            callback()
        await super().shutdown(sockets)

    def _drain(self) -> None:
        try:
            self.services.drain()
        except Exception:
            log.exception("the drain failed")
