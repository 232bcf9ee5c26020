"""An agent CLI's only way out of its sandbox: a port on the sandbox's own loopback, forwarded
to its proxy's Unix socket (bound in read-only). It starts the CLI as its child and exits
with the CLI's status, so the sandbox ends when the CLI does.

Run as a script, standard library only: `python -I bridge.py SOCKET PORT -- ARGV...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the reply may still be on its way back


async def _forward(socket: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(socket)
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        for w in (writer, up_writer):
            with contextlib.suppress(OSError):
                w.close()


async def main(socket: str, port: int, argv: list[str]) -> int:
    server = await asyncio.start_server(
        lambda r, w: _forward(socket, r, w), "127.0.0.1", port, reuse_address=True
    )
    child = await asyncio.create_subprocess_exec(*argv)
    code = await child.wait()
    server.close()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--")
    sock, port_text = args[:split]
    sys.exit(asyncio.run(main(sock, int(port_text), args[split + 1 :])))
