"""Render a page in Debian's chromium, headless, and see what it shows and what it fetched.

Chromium is pointed at a proxy on 127.0.0.1 that answers every request with 404 and forwards
nothing: whatever the page (or chromium) tries to fetch is recorded, and nothing leaves the
machine.
"""

from __future__ import annotations

import http.server
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
"""Screenshots the browser tests keep (git-ignored; CI can upload the folder)."""

# Chromium's own services, contacted whatever the page is (the component updater, and
# sign-in because Debian's launcher sets Google API keys); never a report's concern.
CHROMIUM_OWN_HOSTS = frozenset({"update.googleapis.com", "accounts.google.com"})

QUIET = [
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-client-side-phishing-detection",
    "--disable-domain-reliability",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter",
]


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does)")
    return found


def chromium_version() -> str:
    out = subprocess.run([chromium(), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def _any(self) -> None:
        target = self.path if self.command != "CONNECT" else f"https://{self.path}"
        self.server.seen.append(target)  # type: ignore[attr-defined]
        self.send_response(404)
        self.end_headers()

    do_GET = do_POST = do_HEAD = do_CONNECT = do_PUT = do_OPTIONS = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Rendered:
    dom: str
    png: Path
    seconds: float
    fetched: list[str] = field(default_factory=list)
    """Every URL the page tried to load (chromium's own services left out)."""


def render(page: Path, png: Path, tmp: Path, width: int = 1280, height: int = 2400) -> Rendered:
    """Load `page` from disk, dump the DOM after load, and screenshot it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    png.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        out = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={tmp / 'chromium-profile'}",
                *QUIET,
                f"--proxy-server=http://127.0.0.1:{server.server_address[1]}",
                "--proxy-bypass-list=<-loopback>",  # loopback goes through the proxy too
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                "--dump-dom",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-2000:]
    seen: list[str] = server.seen  # type: ignore[attr-defined]
    fetched = [u for u in seen if urlsplit(u).hostname not in CHROMIUM_OWN_HOSTS]
    return Rendered(dom=out.stdout, png=png, seconds=seconds, fetched=fetched)


def png_rgb(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered RGB rows of an 8-bit RGB(A) PNG, as chromium writes it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6) and header[12] == 0, "unexpected PNG layout"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(chunks), width * bpp
    rows: list[bytes] = []
    prev = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], raw[start + 1 : start + 1 + stride], prev, bpp)
        rows.append(line if bpp == 3 else bytes(b for i, b in enumerate(line) if i % 4 < 3))
        prev = line
    return width, height, rows


_LOW7 = int.from_bytes(b"\x7f" * 16384, "big")
_HIGH = int.from_bytes(b"\x80" * 16384, "big")


def _add_bytes(x: bytes, y: bytes) -> bytes:
    """Bytewise (x + y) mod 256, whole rows at once (the PNG `Up` filter)."""
    n = len(x)
    low, high = _LOW7 >> (8 * (16384 - n)), _HIGH >> (8 * (16384 - n))
    a, b = int.from_bytes(x, "big"), int.from_bytes(y, "big")
    return (((a & low) + (b & low)) ^ ((a ^ b) & high)).to_bytes(n, "big")


def _unfilter(kind: int, line: bytes, prev: bytes, bpp: int) -> bytes:
    if kind == 0:
        return line
    if kind == 2:
        return _add_bytes(line, prev)
    out = bytearray(line)
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        if kind == 1:
            out[i] = (out[i] + a) & 255
            continue
        b = prev[i]
        if kind == 3:
            out[i] = (out[i] + ((a + b) >> 1)) & 255
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return bytes(out)


def count_colour(rows: list[bytes], rgb: tuple[int, int, int]) -> int:
    """Pixels of exactly this colour (a glyph's core keeps its text colour)."""
    pattern = re.compile(re.escape(bytes(rgb)))
    return sum(1 for row in rows for m in pattern.finditer(row) if m.start() % 3 == 0)


class Texts(HTMLParser):
    """The text under each element with an id or a class of interest, from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[list[str]] = []
        self.by_id: dict[str, str] = {}
        self.diffs: list[str] = []
        self.text: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self._open: list[tuple[str, str | None, bool]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("meta", "br", "img", "input", "link", "hr"):
            return
        found = dict(attrs)
        ident = found.get("id")
        if ident:
            self.ids.add(ident)
        is_diff = "diff" in (found.get("class") or "").split()
        self._open.append((tag, ident, is_diff))
        self.stack.append([])

    def handle_endtag(self, tag: str) -> None:
        if not self._open or tag in ("meta", "br", "img", "input", "link", "hr"):
            return
        _, ident, is_diff = self._open.pop()
        inner = "".join(self.stack.pop())
        if self.stack:
            self.stack[-1].append(inner)
        if ident:
            self.by_id[ident] = inner
        if is_diff:
            self.diffs.append(inner)

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.stack:
            self.stack[-1].append(data)


def parse(dom: str) -> Texts:
    texts = Texts()
    texts.feed(dom)
    return texts
