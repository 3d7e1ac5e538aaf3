"""uvicorn inside the gateway's event loop, next to the grpc.aio server.

The gateway owns the process's signals (SIGINT / SIGTERM set its stop event), so uvicorn's own
signal capture is turned off (`_InLoop`). The socket is bound here, before uvicorn starts, so a
port in use is a clear MoemeshError at start-up (uvicorn would call sys.exit inside a task) and
port 0 gives the bound port at once. `stop(grace)` lets streams in flight finish for `grace`
seconds, then cancels them (each cancelled generation is cancelled on its worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from moemesh.errors import MoemeshError

log = logging.getLogger(__name__)


class _InLoop(uvicorn.Server):
    """uvicorn in a loop and a process that someone else runs: no signal handlers of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = any free port); MoemeshError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address, family=family)
    except OSError as exc:
        raise MoemeshError(f"cannot bind the HTTP API on {host}:{port}: {exc.strerror or exc} "
                           "(choose another --http-port, or -1 to turn HTTP off)") from None


class HttpServer:
    """One uvicorn server for `app`, started with `start` and stopped with `stop`, in this loop."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.port = 0
        self._server: _InLoop | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int, grace_s: float, max_concurrent: int | None = None) -> int:
        """Bind and serve in the background; the bound port. Over `max_concurrent` connections and
        requests at once, uvicorn answers 503 before any handler (like grpc's --max-concurrent-rpcs)."""
        sock = bind(host, port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=math.ceil(grace_s), limit_concurrency=max_concurrent)
        self._server = _InLoop(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let responses in flight finish within the grace, then cancel them."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("the HTTP server failed")
