"""The builder's tools, confined to one worktree."""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orchestrator.llm.messages import ToolCall, ToolSpec
from orchestrator.proc import run_shell, sandbox_env

MAX_READ_BYTES = 200_000
MAX_LIST = 400
MAX_MATCHES = 200


class ToolError(Exception):
    """A tool refused or failed; the message goes back to the model."""


class Submitted(Exception):
    """The builder called finish()."""

    def __init__(self, summary: str):
        super().__init__(summary)
        self.summary = summary


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_S = {"type": "string"}
TOOL_SPECS = [
    ToolSpec(
        name="read_file",
        description="Read a text file of the repository.",
        parameters=_schema({"path": _S}, ["path"]),
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
        description="Run a shell command in the repository root (timeout, output capped).",
        parameters=_schema({"command": _S}, ["command"]),
    ),
    ToolSpec(
        name="finish",
        description="Finish: the work is done; summarise what you changed.",
        parameters=_schema({"summary": _S}, ["summary"]),
    ),
]


class Tools:
    """Implements the tool protocol inside `root`; nothing outside it is readable or writable."""

    def __init__(self, root: Path, *, command_timeout_s: float, output_cap: int):
        self.root = root.resolve()
        self.command_timeout_s = command_timeout_s
        self.output_cap = output_cap
        self._handlers: dict[str, Callable[..., Awaitable[str]]] = {
            "read_file": self.read_file,
            "list_files": self.list_files,
            "search": self.search,
            "write_file": self.write_file,
            "edit_file": self.edit_file,
            "run": self.run,
            "finish": self.finish,
        }

    def resolve(self, path: str) -> Path:
        """The real path of `path` inside the worktree, or ToolError."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string relative to the repository root")
        if "\x00" in path:
            raise ToolError("path contains a NUL byte")
        candidate = Path(os.path.realpath(self.root / path))
        if candidate != self.root and self.root not in candidate.parents:
            raise ToolError(f"{path}: outside the repository; use a path relative to its root")
        rel = candidate.relative_to(self.root)
        if rel.parts and rel.parts[0] == ".git":
            raise ToolError(f"{path}: git internals are off limits")
        return candidate

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
        except TypeError as err:
            raise ToolError(f"bad arguments for {call.name}: {err}") from None

    async def read_file(self, path: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path}: no such file")
        data = target.read_bytes()[:MAX_READ_BYTES]
        if b"\x00" in data:
            raise ToolError(f"{path}: binary file")
        return data.decode("utf-8", errors="replace")

    async def list_files(self, path: str = ".") -> str:
        base = self.resolve(path)
        if not base.is_dir():
            raise ToolError(f"{path}: not a directory")
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
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
            regex = re.compile(pattern)
        except re.error as err:
            raise ToolError(f"bad regular expression: {err}") from None
        base = self.resolve(path)
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        hits: list[str] = []
        for file in files:
            rel = file.relative_to(self.root)
            if rel.parts and rel.parts[0] == ".git":
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for no, line in enumerate(text.splitlines(), 1):
                if regex.search(line):
                    hits.append(f"{rel}:{no}: {line[:200]}")
                    if len(hits) >= MAX_MATCHES:
                        return "\n".join(hits) + "\n[… more matches omitted]"
        return "\n".join(hits) or "no matches"

    async def write_file(self, path: str, content: str) -> str:
        target = self.resolve(path)
        if target.is_dir():
            raise ToolError(f"{path}: is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        return f"wrote {len(content.encode())} bytes to {target.relative_to(self.root)}"

    async def edit_file(self, path: str, old: str, new: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path}: no such file")
        text = target.read_text(encoding="utf-8")
        count = text.count(old) if old else 0
        if count != 1:
            raise ToolError(f"{path}: `old` must match exactly once (found {count} matches)")
        target.write_text(text.replace(old, new, 1), encoding="utf-8")
        return f"edited {target.relative_to(self.root)}"

    async def run(self, command: str) -> str:
        result = await run_shell(
            command,
            self.root,
            timeout_s=self.command_timeout_s,
            output_cap=self.output_cap,
            env=sandbox_env(),
        )
        status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        return f"[{status}]\n{result.output}"

    async def finish(self, summary: str = "") -> str:
        raise Submitted(str(summary))
