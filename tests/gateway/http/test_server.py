"""uvicorn inside a running loop: bound before it starts (clear bind errors, port 0), the loop's
signal handlers left alone, a graceful stop that closes the port."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.http.server import HttpServer, bind
from moemesh.errors import MoemeshError


async def _hello(request):
    return PlainTextResponse("hello")


APP = Starlette(routes=[Route("/", _hello)])


async def _get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 30)  # hang bound
    writer.close()
    return reply


def test_a_port_in_use_is_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(MoemeshError, match=rf"cannot bind the HTTP API on 127.0.0.1:{port}: .*--http-port"):
            bind("127.0.0.1", port)


def test_serves_in_this_loop_and_stops():
    async def scenario():
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = HttpServer(APP)
        port = await server.start("127.0.0.1", 0, grace_s=1.0)
        reply = await _get(port)
        signal.raise_signal(signal.SIGTERM)  # the loop's handler gets it, not uvicorn
        await asyncio.wait_for(stop.wait(), 30)  # hang bound
        await server.stop()
        with pytest.raises(OSError):
            await _get(port)
        return port, reply

    port, reply = asyncio.run(scenario())
    assert port > 0 and reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello")
