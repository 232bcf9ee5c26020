"""A small terminal for tests: runs a command on a pty and keeps what a screen would show.

It understands what rich's live display writes (carriage return, newline, cursor up, erase
line, hide/show cursor, colours), which is enough to see the lines a person is left with.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


class Screen:
    """Every line ever written, with the cursor's moves applied (no scroll-back limit)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.lines: list[list[str]] = [[]]
        self.row = 0
        self.col = 0

    def feed(self, text: str) -> None:
        text = _OSC.sub("", text)
        pos = 0
        while pos < len(text):
            m = _CSI.match(text, pos)
            if m:
                self._csi(m.group(1), m.group(2))
                pos = m.end()
                continue
            self._char(text[pos])
            pos += 1

    def _csi(self, args: str, op: str) -> None:
        n = int(args) if args.isdigit() else 1
        if op == "A":
            self.row = max(0, self.row - n)
        elif op == "B":
            self._down(n)
        elif op == "K":
            line = self.lines[self.row]
            if args == "2":
                line.clear()
            elif args in ("", "0"):
                del line[self.col :]
        elif op == "G":
            self.col = max(0, n - 1)
        # colours (m), cursor visibility (h/l) and the rest change no text

    def _down(self, n: int) -> None:
        self.row += n
        while len(self.lines) <= self.row:
            self.lines.append([])

    def _char(self, ch: str) -> None:
        if ch == "\r":
            self.col = 0
        elif ch == "\n":
            self._down(1)
            self.col = 0
        elif ch == "\x1b" or (ch < " " and ch != "\t"):
            return
        else:
            if self.col >= self.width:
                self._down(1)
                self.col = 0
            line = self.lines[self.row]
            line.extend(" " * (self.col - len(line)))
            if self.col < len(line):
                line[self.col] = ch
            else:
                line.append(ch)
            self.col += 1

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines).rstrip() + "\n"


def run_on_pty(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    width: int = 100,
    height: int = 40,
    when: Callable[[str], bool] | None = None,
    then: signal.Signals | bytes | None = None,
    timeout: float = 120.0,
) -> tuple[int, Screen]:
    """Run `argv` on a pty of `width` columns; once `when(screen text)` holds, send `then`."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    full_env = {**os.environ, **(env or {}), "TERM": "xterm-256color", "COLUMNS": str(width)}
    full_env.pop("NO_COLOR", None)

    def controlling_tty() -> None:  # the pty is the child's terminal: ^C typed reaches it
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=full_env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_tty,
    )
    os.close(slave)
    screen = Screen(width)
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the pty
                    break
                if not data:
                    break
                screen.feed(data.decode("utf-8", errors="replace"))
            elif proc.poll() is not None:
                break
            if then is not None and not sent and when is not None and when(screen.text()):
                if isinstance(then, bytes):
                    os.write(master, then)  # typed: the terminal echoes it and signals
                else:
                    os.killpg(proc.pid, then)
                sent = True
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return code, screen
