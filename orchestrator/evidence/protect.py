"""Protected paths: a candidate cannot change what its checks test.

A candidate's patch is split file by file. The parts that touch a protected file are not part
of the candidate: the checks run without them and the commit leaves them out. By default a
file is protected when it is

- a test file that exists at the base (`TEST_FILES`): editing, deleting, renaming or changing
  the mode of the user's tests is how a candidate forges a pass; new test files are kept;
- test-runner configuration or fixtures (`RUNNER_FILES`), new or old: a new `conftest.py` or
  `pytest.ini` can skip every test as surely as an edited one;
- a runner's section of a shared file (`SECTIONS`: `[tool.pytest.ini_options]` of
  pyproject.toml, `scripts.test`/`jest` of package.json, …): the file's change is dropped only
  when that section changed, so dependency edits stay possible;
- a file that a check's command line names (`pytest tests/test_cli.py`), or the file its
  program reads its targets from (`Makefile` for `make`, package.json's scripts for `npm`).

A spec's `protect:` (globs) replaces all of this: its globs protect new and existing files
alike; `protect: []` protects nothing.
"""

from __future__ import annotations

import configparser
import itertools
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

TEST_FILES = (
    "tests/**",
    "test/**",
    "**/tests/**",
    "**/test/**",
    "spec/**",
    "**/__tests__/**",
    "**/testdata/**",
    "test_*.py",
    "*_test.py",
    "tests.py",
    "*_test.go",
    "*.test.[jt]s",
    "*.test.[jt]sx",
    "*.test.[mc]js",
    "*.spec.[jt]s",
    "*.spec.[jt]sx",
    "*Test.java",
    "*Tests.java",
    "*Test.kt",
    "*_spec.rb",
    "*_test.rb",
    "*Test.php",
    "*_test.exs",
)
"""Where the common ecosystems keep tests: directories first, then file-name conventions
(pytest and unittest, go test, Jest/Vitest/Mocha, JUnit, RSpec/minitest, PHPUnit, ExUnit)."""

RUNNER_FILES = (
    "conftest.py",
    "pytest.ini",
    ".pytest.ini",
    "tox.ini",
    "noxfile.py",
    "jest.config.*",
    "jest.setup.*",
    "vitest.config.*",
    "vitest.workspace.*",
    ".mocharc*",
    "karma.conf.*",
    "playwright.config.*",
    "cypress.config.*",
    "phpunit.xml*",
    ".rspec",
    "**/spec_helper.rb",
    "**/test_helper.rb",
)
"""Test-runner configuration and shared fixtures: they decide what a test run collects,
skips and how it reports, so they are protected whether or not they exist at the base."""

SECTIONS: dict[str, tuple[str, ...]] = {
    "pyproject.toml": ("tool.pytest", "tool.pytest.ini_options"),
    "setup.cfg": ("tool:pytest",),
    "package.json": ("scripts.test", "jest", "mocha", "vitest"),
}
"""Shared files whose named sections configure a test runner."""

PROGRAM_FILES = {
    "make": ("Makefile", "makefile", "GNUmakefile"),
    "npm": ("package.json",),
    "pnpm": ("package.json",),
    "yarn": ("package.json",),
    "just": ("justfile", "Justfile"),
    "tox": ("tox.ini",),
    "nox": ("noxfile.py",),
}
"""Where a check's program reads what `make test` or `npm test` means."""


@dataclass(frozen=True)
class Protection:
    """Which paths a candidate may not change, decided from the spec and the base tree."""

    globs: tuple[str, ...] | None
    """The spec's own `protect:` globs; None means the defaults."""
    base_files: frozenset[str]
    named: frozenset[str]
    """Files the checks' command lines name (defaults only)."""

    def protects(
        self, path: str, old: Callable[[], bytes | None], new: Callable[[], bytes | None]
    ) -> bool:
        """Whether a change of `path` (contents read lazily) is dropped from the candidate."""
        if self.globs is not None:
            return any(_match(g, path) for g in self.globs)
        if path in self.named:
            return True
        if path in self.base_files and any(_match(g, path) for g in TEST_FILES):
            return True
        if any(_match(g, path) for g in RUNNER_FILES):
            return True
        keys = SECTIONS.get(path.rsplit("/", 1)[-1])
        return keys is not None and _sections(path, old(), keys) != _sections(path, new(), keys)

    @property
    def active(self) -> bool:
        return self.globs is None or bool(self.globs)


def protection_for(
    checks: Iterable[str], protect: list[str] | None, base_files: Iterable[str]
) -> Protection:
    files = frozenset(base_files)
    if protect is not None:
        return Protection(globs=tuple(protect), base_files=files, named=frozenset())
    return Protection(globs=None, base_files=files, named=frozenset(_named(checks, files)))


def _named(checks: Iterable[str], files: frozenset[str]) -> set[str]:
    named: set[str] = set()
    for command in checks:
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        for i, word in enumerate(words):
            path = word.split("::", 1)[0].removeprefix("./")
            if "=" in path and path not in files:
                path = path.split("=", 1)[1].removeprefix("./")
            if path in files:
                named.add(path)
            program = word.rsplit("/", 1)[-1]
            if i == 0 or words[i - 1] in ("&&", "||", ";", "|"):
                named.update(f for f in PROGRAM_FILES.get(program, ()) if f in files)
    return named


def split_patch(patch: bytes, drop: Callable[[str], bool]) -> tuple[bytes, list[str]]:
    """(the patch without the files `drop` names, the dropped paths in patch order).

    The patch is git's: one `diff --git` block per file, renames off, so each block names one
    path and can be kept or dropped whole.
    """
    from orchestrator.workspace import diff_stats

    kept: list[bytes] = []
    dropped: list[str] = []
    for block in _blocks(patch):
        files, _, _ = diff_stats(block)
        if files and drop(files[0]):
            dropped.append(files[0])
        else:
            kept.append(block)
    return b"".join(kept), dropped


def _blocks(patch: bytes) -> list[bytes]:
    starts = [m.start() for m in re.finditer(rb"^diff --git ", patch, re.MULTILINE)]
    if not starts:
        return [patch] if patch.strip() else []
    bounds = [*starts, len(patch)]
    head = patch[: starts[0]]
    blocks = [patch[a:b] for a, b in itertools.pairwise(bounds)]
    if head.strip():
        blocks[0] = head + blocks[0]
    return blocks


def _sections(path: str, raw: bytes | None, keys: tuple[str, ...]) -> object:
    """The runner's sections of a shared file, comparable; an unreadable file is its bytes."""
    if raw is None:
        return None
    name = path.rsplit("/", 1)[-1]
    try:
        text = raw.decode("utf-8")
        if name.endswith(".toml"):
            data: Any = tomllib.loads(text)
            return [_dig(data, k.split(".")) for k in keys]
        if name.endswith(".json"):
            data = json.loads(text)
            return [_dig(data, k.split(".")) for k in keys]
        parser = configparser.RawConfigParser(strict=False, interpolation=None)
        parser.read_string(text)
        return [dict(parser[k]) if parser.has_section(k) else None for k in keys]
    except (UnicodeDecodeError, ValueError, configparser.Error):
        return ("unreadable", raw)


def _dig(data: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _match(glob: str, path: str) -> bool:
    return _compiled(glob).fullmatch(path) is not None


@cache
def _compiled(glob: str) -> re.Pattern[str]:
    """gitignore-like globs: no `/` matches the name in any directory; `**` spans
    directories; `*`, `?` and `[…]` stay inside one path segment."""
    anchored = "/" in glob.rstrip("/")
    body = glob.removeprefix("/")
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = body.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                out.append("[" + body[i + 1 : end].replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    pattern = "".join(out)
    return re.compile(pattern if anchored else f"(?:.*/)?{pattern}")


def is_test_file(path: str) -> bool:
    """Whether `path` is where its ecosystem keeps tests (the TEST_FILES patterns)."""
    return any(_match(g, path) for g in TEST_FILES)
