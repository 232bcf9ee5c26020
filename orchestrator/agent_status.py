"""Which agent CLIs are installed, and which stage entries cannot run: for validate, models
and the run's preflight. Light on purpose (no proxy, no litellm): validate stays fast."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import LoadedConfig

CLI_PATH_ENV = "FLOW_CLI_PATH"
"""Directories searched first for agent CLIs (set by .ci/run to its cache)."""

INSTALL = {
    "opencode": "npm install -g opencode-ai",
    "claude": "npm install -g @anthropic-ai/claude-code",
    "codex": "npm install -g @openai/codex",
    "aider": "pipx install aider-chat (or: uv tool install aider-chat)",
}
DIALECT = {
    "opencode": "OpenAI chat",
    "claude": "Anthropic messages",
    "codex": "OpenAI Responses",
    "aider": "OpenAI chat",
}
_VERSION_TIMEOUT_S = 15.0


def find(command: str, environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    path = os.pathsep.join(p for p in (env.get(CLI_PATH_ENV, ""), env.get("PATH", "")) if p)
    return shutil.which(command, path=path)


@dataclass
class CliStatus:
    name: str
    command: str
    path: str | None
    version: str | None
    used_by: list[str]

    @property
    def problem(self) -> str | None:
        if self.path is None:
            return f"{self.command!r} is not installed; install it: {INSTALL[self.name]}"
        if self.version is None:
            return f"`{self.command} --version` did not answer"
        return None


def _version(path: str) -> str | None:
    """`PATH --version`, remembered per binary (its real path, size and mtime): an aider
    start takes seconds, and validate should not."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return None
    key = f"{real}:{info.st_size}:{info.st_mtime_ns}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return str(known[key])
    version = _ask_version(path)
    if version is not None and isinstance(known, dict):
        known[key] = version
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known), encoding="utf-8")
    return version


def _cache_file() -> Path:
    from orchestrator.workspace import cache_root

    return cache_root() / "cli-versions.json"


def _ask_version(path: str) -> str | None:
    try:
        out = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if out.returncode == 0 and text else None


def statuses(loaded: LoadedConfig, names: list[str] | None = None) -> list[CliStatus]:
    """The CLIs the config uses (or `names`), each with its path and `--version`."""
    from orchestrator.config import AGENT_CLIS

    used: dict[str, list[str]] = {}
    for where, entry in loaded.agent_entries():
        assert entry.agent is not None
        used.setdefault(entry.agent, []).append(where)
    wanted = names if names is not None else [n for n in AGENT_CLIS if n in used]
    found = []
    for name in wanted:
        settings = loaded.config.agents.get(name)
        command = (settings.command if settings else None) or name
        found.append(CliStatus(name, command, find(command), None, used.get(name, [])))
    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = pool.map(lambda s: _version(s.path) if s.path else None, found)
        for status, version in zip(found, versions, strict=True):
            status.version = version
    return found


def check_agents(loaded: LoadedConfig) -> list[str]:
    """Refuse entries whose CLI cannot run; return the warnings (runs on a user's login)."""
    source = loaded.path or "agents.yaml"
    for status in statuses(loaded):
        where = status.used_by[0]
        if status.problem:
            raise ConfigError(f"{source}: {where}.agent: {status.problem}")
        settings = loaded.config.agents.get(status.name)
        expected = settings.version if settings else None
        if expected and status.version and expected not in status.version:
            raise ConfigError(
                f"{source}: agents.{status.name}.version: expected {expected!r}, but "
                f"`{status.command} --version` says {status.version!r}; install that version "
                "or change the expectation"
            )
    return login_warnings(loaded)


def login_warnings(loaded: LoadedConfig) -> list[str]:
    return [
        f"{where}: {entry.agent} runs on your own login (login: true): flow cannot meter or "
        "cap its calls; the report shows the CLI's own usage, marked as such"
        for where, entry in loaded.agent_entries()
        if entry.login
    ]
