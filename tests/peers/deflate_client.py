"""A WebSocket client with permessage-deflate (Python `websockets`), for tests/ws.rs.

Usage: deflate_client.py ws://127.0.0.1:PORT/path

Connects offering permessage-deflate, checks that the 101 it got accepts it, reads the server's
first message (deflate_server.py names its negotiated extensions in it), then sends text and
binary messages, large and small, and checks each comes back unchanged. Prints one `key: value`
line per fact for the test to assert on, and exits non-zero on the first failure.
"""

import asyncio
import inspect
import sys

from websockets.asyncio.client import connect

# Every step together; the test's own limit is longer, so a failure here is reported as such.
TIMEOUT = 20


def messages():
    # Compressible and incompressible payloads, text and binary, up to 1 MiB.
    noise = bytes((i * 2654435761 >> 13) & 0xFF for i in range(1 << 20))
    return [
        "hello through the proxy",
        "",
        "é ü 中文 " * 1000,
        "a" * (1 << 20),
        b"\x00\x01\x02" * 1000,
        noise,
    ]


async def main(url):
    options = {"compression": "deflate", "max_size": 4 << 20, "open_timeout": 10}
    # Ignore any HTTP proxy from the environment (the parameter exists since websockets 15).
    if "proxy" in inspect.signature(connect).parameters:
        options["proxy"] = None
    async with connect(url, **options) as ws:
        accepted = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        print(f"101 extensions: {accepted}", flush=True)
        negotiated = ",".join(e.name for e in ws.protocol.extensions)
        print(f"client extensions: {negotiated}", flush=True)
        print(f"server says: {await ws.recv()}", flush=True)
        for i, message in enumerate(messages()):
            await ws.send(message)
            back = await ws.recv()
            if back != message:
                raise SystemExit(f"message {i} ({len(message)} long) came back different")
        print(f"round trips: {len(messages())}", flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1]), TIMEOUT))
