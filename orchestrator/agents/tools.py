"""The builder's tools, confined to one worktree.

The file tools resolve every path (symlinks included) and refuse anything outside the
worktree or inside its `.git`; they read only regular files with no other hard link, and
write by renaming a new file into place, never through a symlink, hard link, FIFO or
device. `run` is a shell command, confined only by `run_shell`'s network namespace and
scrubbed environment: it can touch whatever files the user running flow can.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import regex

from orchestrator import overlay, pools, sandbox
from orchestrator.llm.messages import ToolCall, ToolSpec
from orchestrator.proc import run_shell, sandbox_env

MAX_READ_BYTES = 200_000
MAX_EDIT_BYTES = 5_000_000
MAX_SEARCH_BYTES = 1_000_000
"""Per file; the rest of a longer file is not searched."""
MAX_PATH_CHARS = 1024
MAX_LINKS = 40
MAX_LIST = 400
MAX_MATCHES = 200
SEARCH_TIMEOUT_S = 10.0
"""Wall-clock bound on one `search` call, over all its files."""


class ToolError(Exception):
    """A tool refused or failed; the message goes back to the model."""


class Submitted(Exception):
    """The builder called finish() (or a tester submit_tests(): then `tests` is set)."""

    def __init__(self, summary: str, tests: list[dict[str, str]] | None = None):
        super().__init__(summary)
        self.summary = summary
        self.tests = tests


MAX_HELD_OUT = 20
"""The most tests one tester may submit."""


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_S = {"type": "string"}
TOOL_SPECS = [
    ToolSpec(
        name="read_file",
        description=(
            "Read a text file of the repository; long files come in pages: pass `offset` "
            "(a byte offset, as the previous page's last line says) to read on."
        ),
        parameters=_schema({"path": _S, "offset": {"type": "integer", "minimum": 0}}, ["path"]),
    ),
    ToolSpec(
        name="list_files",
        description="List files under a directory (recursive).",
        parameters=_schema({"path": _S}, []),
    ),
    ToolSpec(
        name="search",
        description="Search files for a regular expression; returns file:line: text.",
        parameters=_schema({"pattern": _S, "path": _S}, ["pattern"]),
    ),
    ToolSpec(
        name="write_file",
        description="Create or overwrite a file with the given content.",
        parameters=_schema({"path": _S, "content": _S}, ["path", "content"]),
    ),
    ToolSpec(
        name="edit_file",
        description="Replace the exact text `old` (which must occur exactly once) with `new`.",
        parameters=_schema({"path": _S, "old": _S, "new": _S}, ["path", "old", "new"]),
    ),
    ToolSpec(
        name="run",
        description=(
            "Run a shell command in the repository root (timeout, output capped). "
            "Expect no network access: install and download nothing."
        ),
        parameters=_schema({"command": _S}, ["command"]),
    ),
    ToolSpec(
        name="finish",
        description="Finish: the work is done; summarise what you changed.",
        parameters=_schema({"summary": _S}, ["summary"]),
    ),
]


SUBMIT_TESTS = ToolSpec(
    name="submit_tests",
    description=(
        "Finish: name the tests you wrote, one shell command per test that runs exactly that "
        "test from the repository root (e.g. `python -m pytest -q tests/test_x.py::test_y`)."
    ),
    parameters=_schema(
        {
            "tests": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_HELD_OUT,
                "items": _schema({"name": _S, "command": _S}, ["name", "command"]),
            }
        },
        ["tests"],
    ),
)
TESTER_TOOL_SPECS = [t for t in TOOL_SPECS if t.name != "finish"] + [SUBMIT_TESTS]


class Tools:
    """Implements the tool protocol inside `root`; nothing outside it is readable or writable."""

    def __init__(
        self,
        root: Path,
        *,
        command_timeout_s: float,
        output_cap: int,
        search_timeout_s: float = SEARCH_TIMEOUT_S,
        tester: bool = False,
    ):
        self.name = root.resolve()
        """The checkout as its programs see it; `root` is where flow's Python reaches it (the
        same, but for an overlay view: orchestrator/overlay.py)."""
        self.root = overlay.host(self.name)
        self.search_timeout_s = search_timeout_s
        self.command_timeout_s = command_timeout_s
        self.output_cap = output_cap
        self._handlers: dict[str, Callable[..., Awaitable[str]]] = {
            "read_file": self.read_file,
            "list_files": self.list_files,
            "search": self.search,
            "write_file": self.write_file,
            "edit_file": self.edit_file,
            "run": self.run,
        }
        if tester:
            self._handlers["submit_tests"] = self.submit_tests
        else:
            self._handlers["finish"] = self.finish

    def resolve(self, path: str) -> Path:
        """The real path of `path` inside the worktree, or ToolError."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string relative to the repository root")
        if "\x00" in path:
            raise ToolError("path contains a NUL byte")
        if len(path) > MAX_PATH_CHARS or any(len(p.encode()) > 255 for p in path.split("/")):
            raise ToolError(f"{path[:60]}…: path too long")
        if self.root == self.name:
            candidate = Path(os.path.realpath(self.root / path))
            if candidate != self.root and self.root not in candidate.parents:
                raise ToolError(f"{path}: outside the repository; use a path relative to its root")
        else:
            candidate = self._resolve_in_view(path)
        rel = candidate.relative_to(self.root)
        if rel.parts and rel.parts[0] == ".git":
            raise ToolError(f"{path}: git internals are off limits")
        return candidate

    def _resolve_in_view(self, path: str) -> Path:
        """`path` resolved as realpath would inside the checkout, through `self.root`: there
        realpath itself would leave the view (/proc/<pid>/root reads as `/`)."""
        outside = ToolError(f"{path}: outside the repository; use a path relative to its root")
        todo = self._inside(path, outside)
        done: list[str] = []
        links = 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise outside
                done.pop()
                continue
            here = self.root.joinpath(*done, part)
            try:
                is_link = stat.S_ISLNK(os.lstat(here).st_mode)
            except OSError:
                is_link = False
            if not is_link:
                done.append(part)
                continue
            links += 1
            if links > MAX_LINKS:
                raise ToolError(f"{path}: too many levels of symbolic links")
            target = os.readlink(here)
            if os.path.isabs(target):
                todo.extend(self._inside(target, outside))
                done = []
            else:
                todo.extend(reversed(Path(target).parts))
        return self.root.joinpath(*done)

    def _inside(self, path: str, outside: ToolError) -> list[str]:
        """The parts of `path` below the checkout, last first; an absolute path must name it."""
        given = Path(path)
        if given.is_absolute():
            if given != self.name and self.name not in given.parents:
                raise outside
            given = given.relative_to(self.name)
        return list(reversed(given.parts))

    async def dispatch(self, call: ToolCall) -> str:
        handler = self._handlers.get(call.name)
        if handler is None:
            raise ToolError(f"unknown tool {call.name!r}; available: {', '.join(self._handlers)}")
        try:
            args = call.parsed()
        except ValueError as err:
            raise ToolError(f"arguments are not a valid JSON object: {err}") from None
        try:
            return await handler(**args)
        except (Submitted, ToolError):
            raise
        except TypeError as err:
            raise ToolError(f"bad arguments for {call.name}: {err}") from None
        except OSError as err:  # e.g. a symlink loop, a full disk: the model may try otherwise
            raise ToolError(f"{call.name} failed: {err.strerror or err}") from None
        except Exception as err:  # e.g. `content: null`: the model's mistake, never the run's
            raise ToolError(f"{call.name} failed: {type(err).__name__}: {err}") from None

    async def read_file(self, path: str, offset: int = 0) -> str:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ToolError("offset must be a non-negative integer (a byte offset)")
        data = _read_regular(self.resolve(path), path, offset + MAX_READ_BYTES + 1)
        if b"\x00" in data:
            raise ToolError(f"{path}: binary file")
        page = data[offset : offset + MAX_READ_BYTES]
        if len(data) <= offset + MAX_READ_BYTES:
            return page.decode("utf-8", errors="replace")
        # Cut at a line end, so the next page starts on a whole line and no character splits.
        end = page.rfind(b"\n") + 1 or len(page)
        nxt = offset + end
        return page[:end].decode("utf-8", errors="replace") + (
            f"\n[… cut: the file goes on past byte {nxt}; read_file(path, offset={nxt}) "
            "reads on. Do not rewrite this file whole from this page: use edit_file]"
        )

    async def list_files(self, path: str = ".") -> str:
        base = self.resolve(path)
        if not base.is_dir():
            raise ToolError(f"{path}: not a directory")
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):  # never descends into a symlink
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for name in sorted(filenames):
                if name == ".git":  # a worktree's .git is a file pointing at git internals
                    continue
                out.append(str((Path(dirpath) / name).relative_to(self.root)))
                if len(out) >= MAX_LIST:
                    return "\n".join(out) + f"\n[… truncated at {MAX_LIST} files]"
        return "\n".join(out) or "(empty)"

    async def search(self, pattern: str, path: str = ".") -> str:
        try:
            compiled = regex.compile(pattern)
        except (regex.error, OverflowError, ValueError) as err:
            raise ToolError(f"bad regular expression: {err}") from None
        base = self.resolve(path)
        stop = threading.Event()
        try:
            # Off the event loop, with the GIL released while matching (concurrent=True):
            # every other builder and run of this process goes on meanwhile.
            return await pools.work(
                _search, compiled, base, self.root, time.monotonic() + self.search_timeout_s, stop
            )
        except TimeoutError:
            raise ToolError(
                f"search for {pattern!r} was stopped after {self.search_timeout_s:g} s "
                "(the pattern backtracks catastrophically, e.g. nested repeats like (a|aa)+); "
                "use a simpler pattern"
            ) from None
        finally:
            stop.set()  # a cancelled builder's search ends at the next line, not at its time-out

    async def write_file(self, path: str, content: str) -> str:
        target = self.resolve(path)
        if target.is_dir():
            raise ToolError(f"{path}: is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode("utf-8", errors="replace")
        _write_regular(target, data)
        return f"wrote {len(data)} bytes to {target.relative_to(self.root)}"

    async def edit_file(self, path: str, old: str, new: str) -> str:
        target = self.resolve(path)
        data = _read_regular(target, path, MAX_EDIT_BYTES + 1)
        if len(data) > MAX_EDIT_BYTES:
            raise ToolError(f"{path}: over {MAX_EDIT_BYTES} bytes; edit it with `run`")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{path}: not UTF-8 text; edit it with `run`") from None
        count = text.count(old) if old else 0
        if count != 1:
            raise ToolError(f"{path}: `old` must match exactly once (found {count} matches)")
        _write_regular(target, text.replace(old, new, 1).encode("utf-8", errors="replace"))
        return f"edited {target.relative_to(self.root)}"

    async def run(self, command: str) -> str:
        # `git config --global/--system` writes to the clone, not to the user's own config.
        own = str(self.name / ".git" / "flow-user.gitconfig")
        confine = None
        if await pools.work(sandbox.bwrap) is not None:
            confine = sandbox.confined(self.name, sandbox.borrowed_objects(self.name))
        result = await run_shell(
            command,
            self.name,
            timeout_s=self.command_timeout_s,
            output_cap=self.output_cap,
            env=sandbox_env({"GIT_CONFIG_GLOBAL": own, "GIT_CONFIG_SYSTEM": own}),
            isolate_network=True,
            confine=confine,
        )
        status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        return f"[{status}]\n{result.output}"

    async def finish(self, summary: str = "") -> str:
        raise Submitted(str(summary))

    async def submit_tests(self, tests: list[dict[str, str]]) -> str:
        if not isinstance(tests, list) or not tests:
            raise ToolError("tests must be a non-empty list of {name, command}")
        if len(tests) > MAX_HELD_OUT:
            raise ToolError(f"at most {MAX_HELD_OUT} tests; merge some")
        clean = []
        for i, t in enumerate(tests):
            name = t.get("name") if isinstance(t, dict) else None
            command = t.get("command") if isinstance(t, dict) else None
            if not isinstance(name, str) or not isinstance(command, str) or not command.strip():
                raise ToolError(f"tests[{i}]: needs a name and a non-empty command")
            clean.append({"name": name.strip()[:200] or f"test {i + 1}", "command": command})
        raise Submitted(f"{len(clean)} tests", clean)


def _read_regular(target: Path, shown: str, limit: int) -> bytes:
    """At most `limit` bytes of a regular file; FIFOs, devices and hard links are refused."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        raise ToolError(f"{shown}: no such file") from None
    except OSError as err:
        raise ToolError(f"{shown}: cannot be read ({err.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ToolError(f"{shown}: is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ToolError(f"{shown}: not a regular file")
        if info.st_nlink > 1:  # its other name may be anywhere, outside the worktree too
            raise ToolError(f"{shown}: has other hard links; copy it with `run` to read it")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(limit)
    finally:
        os.close(fd)


def _write_regular(target: Path, data: bytes) -> None:
    """Put `data` at `target` by renaming a new file over it (its mode is kept).

    A rename replaces the directory entry itself: whatever was there (a symlink, a hard
    link to a file elsewhere, a FIFO) is replaced, never written through.
    """
    try:
        old = os.lstat(target).st_mode
    except FileNotFoundError:
        old = 0
    mode = stat.S_IMODE(old) if stat.S_ISREG(old) else 0o644
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".flow-write-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _search(
    compiled: regex.Pattern[str], base: Path, root: Path, deadline: float, stop: threading.Event
) -> str:
    """The `search` tool's work, in a worker thread: matching lines as `file:line: text`.

    Every match gets what is left of `deadline` as its time-out (TimeoutError past it), so the
    whole call is bounded however many files and lines there are.
    """
    hits: list[str] = []
    for file in _regular_files(base):
        rel = file.relative_to(root)
        try:
            data = _read_regular(file, str(rel), MAX_SEARCH_BYTES)
        except ToolError:  # vanished or replaced since the walk
            continue
        if b"\x00" in data:
            continue
        for no, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                raise TimeoutError
            if compiled.search(line, timeout=left, concurrent=True):
                hits.append(f"{rel}:{no}: {line[:200]}")
                if len(hits) >= MAX_MATCHES:
                    return "\n".join(hits) + "\n[… more matches omitted]"
    return "\n".join(hits) or "no matches"


def _regular_files(base: Path) -> Iterator[Path]:
    """`base` if a regular file, else the regular files under it, sorted; no symlinks, no .git."""
    if base.is_file():
        yield base
        return
    for dirpath, dirnames, filenames in os.walk(base):  # never descends into a symlink
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            file = Path(dirpath) / name
            try:
                regular = stat.S_ISREG(file.lstat().st_mode)
            except OSError:  # gone since the listing
                continue
            if regular and name != ".git":
                yield file
