"""A TCP relay that holds every chunk it passes for a set time, each way: latency on a link, standing
in for `tc qdisc ... netem delay`, which this kernel lacks (tests/netns.py, `NetnsCluster.delayed`).

    delayrelay.py HOST PORT DELAY_FILE

Connections reach it through an nft `redirect` in the namespace it runs in; it connects on to each
one's original destination (SO_ORIGINAL_DST) and copies bytes both ways, each chunk sent on
DELAY_FILE's number of seconds after it came in (read for every chunk, so a test changes the delay
while connections stay open; chunks keep their order). One line per event goes to stdout: "ready",
then "open", "sent" or "answered" (a chunk held and passed on, to the destination or back) and "close".
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from pathlib import Path

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def say(event: str) -> None:
    print(event, flush=True)


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: Path,
    loop: asyncio.AbstractEventLoop,
    way: str,
) -> None:
    """Copy reader to writer, each chunk `delay` seconds late; end the writer once reader ends."""
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        last = 0.0
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            last = max(loop.time() + float(delay.read_text() or 0), last)  # never overtakes
            held.put_nowait((last, data))
            if not data:
                return

    taker = asyncio.create_task(take())
    try:
        while True:
            due, data = await held.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                return
            writer.write(data)
            await writer.drain()
            say(way)
    except OSError:
        pass
    finally:
        taker.cancel()
        writer.close()


async def relay(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, delay: Path
) -> None:
    sock = client_writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    if (socket.inet_ntoa(packed), port) == sock.getsockname()[:2]:  # reached directly: nowhere to go
        client_writer.close()
        return
    try:
        reader, writer = await asyncio.open_connection(socket.inet_ntoa(packed), port)
    except OSError:
        client_writer.close()
        return
    say("open")
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        pipe(client_reader, writer, delay, loop, "sent"), pipe(reader, client_writer, delay, loop, "answered")
    )
    say("close")


async def main(host: str, port: int, delay: Path) -> None:
    server = await asyncio.start_server(lambda r, w: relay(r, w, delay), host, port)
    say("ready")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
