"""A WebSocket echo server with permessage-deflate (Python `websockets`), for tests/ws.rs.

Listens on 127.0.0.1 on a port the system picks and prints that port on the first line of
stdout. Each connection first gets one text message naming the extensions this server
negotiated ("extensions: permessage-deflate"), then every message it sends comes back unchanged.
Runs until stdin is closed (the test ends or drops its end of the pipe), and never longer than
LIFETIME seconds, so an abandoned server cannot outlive its test run.
"""

import asyncio
import os
import sys

from websockets.asyncio.server import serve

# Far longer than any test needs; only a test that died without closing stdin meets it.
LIFETIME = 120


async def echo(ws):
    names = ",".join(e.name for e in ws.protocol.extensions)
    await ws.send(f"extensions: {names}")
    async for message in ws:
        await ws.send(message)


async def main():
    # max_size: the test sends 1 MiB messages; the default cap is exactly 1 MiB of payload.
    async with serve(echo, "127.0.0.1", 0, compression="deflate", max_size=4 << 20) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(stdin_closed, LIFETIME)
        except asyncio.TimeoutError:
            pass


if __name__ == "__main__":
    code = 0
    try:
        asyncio.run(main())
    except BaseException as e:  # report, then exit without waiting for the stdin thread
        print(f"deflate_server: {e!r}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)
