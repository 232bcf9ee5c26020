"""Claude Code (npm `@anthropic-ai/claude-code`): Anthropic messages, stream-json on stdout.

Only the private HOME's user settings are read (`--setting-sources user`), so a repository's
`.claude/settings*.json` can set neither the provider, nor hooks, nor permissions, and its
`.mcp.json` starts nothing (`--strict-mcp-config` with an empty server list). The token is
given as `ANTHROPIC_API_KEY`, so no login, keychain or `apiKeyHelper` is consulted.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.agents.cli.base import Launch, base_env, find
from orchestrator.proxy import Proxy

READ_ONLY_TOOLS = "Read,Grep,Glob"
# Web tools (the sandbox reaches nothing but the proxy), worktree tools (edits would leave the
# checkout) and scheduling tools (the run ends when Claude does) are no use to a builder.
NOT_FOR_BUILDERS = (
    "WebFetch,WebSearch,EnterWorktree,ExitWorktree,CronCreate,CronDelete,CronList,ScheduleWakeup"
)
BUILD_MODE = ("--permission-mode", "bypassPermissions", "--disallowedTools", NOT_FOR_BUILDERS)
NO_MCP = json.dumps({"mcpServers": {}})

# The private HOME's own settings: nothing but what the flags already say, and no
# co-author trailer in commits the model makes.
SETTINGS = {"includeCoAuthoredBy": False, "cleanupPeriodDays": 1}


_QUIET = {
    # No telemetry, error reports, updates or IDE installs, on a proxy or on a login.
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_IDE_SKIP_AUTO_INSTALL": "1",
    # Bypass mode as root is refused otherwise; flow runs it in its sandbox.
    "IS_SANDBOX": "1",
}


class Claude:
    name = "claude"
    dialect = "anthropic"
    droppings: tuple[str, ...] = ()
    # A Claude Pro/Max login: ~/.claude/.credentials.json and the account in ~/.claude.json.
    login_files: tuple[str, ...] = (".claude", ".claude.json")

    def __init__(self, command: str = "claude", extra_args: list[str] | None = None):
        self.command = command
        self.extra_args = list(extra_args or [])

    def env(self, proxy: Proxy, model_id: str, home: Path) -> dict[str, str]:
        env = base_env(home)
        env.update(
            {
                "ANTHROPIC_BASE_URL": proxy.base_url,
                "ANTHROPIC_API_KEY": proxy.token,
                "ANTHROPIC_MODEL": model_id,
                # Every model Claude Code picks by itself (titles, summaries, subagents).
                "ANTHROPIC_SMALL_FAST_MODEL": model_id,
                "ANTHROPIC_DEFAULT_HAIKU_MODEL": model_id,
                "ANTHROPIC_DEFAULT_SONNET_MODEL": model_id,
                "ANTHROPIC_DEFAULT_OPUS_MODEL": model_id,
                "CLAUDE_CODE_SUBAGENT_MODEL": model_id,
                # flow's door already retried; a retry here would bill a refused budget again.
                "CLAUDE_CODE_MAX_RETRIES": "0",
                # A call may wait for a provider slot behind the door; flow's limit governs.
                "API_TIMEOUT_MS": "3600000",
                "DISABLE_NON_ESSENTIAL_MODEL_CALLS": "1",
                "DISABLE_COST_WARNINGS": "1",
                **_QUIET,
            }
        )
        return env

    def _argv(self, task: str, model_id: str, *mode: str) -> list[str]:
        exe = find(self.command) or self.command
        return [
            exe,
            "-p",
            task,
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            model_id,
            "--setting-sources",
            "user",
            "--strict-mcp-config",
            "--mcp-config",
            NO_MCP,
            "--no-session-persistence",
            *mode,
            *self.extra_args,
        ]

    def _files(self) -> dict[str, str]:
        return {".claude/settings.json": json.dumps(SETTINGS, indent=2)}

    def launch(self, task: str, proxy: Proxy, model_id: str, checkout: Path, home: Path) -> Launch:
        argv = self._argv(task, model_id, *BUILD_MODE)
        return Launch(argv=argv, env=self.env(proxy, model_id, home), files=self._files())

    def login_launch(self, task: str, model_id: str, checkout: Path, home: Path) -> Launch | None:
        # The user's own subscription: no base URL and no key, so Claude Code uses its login.
        env = base_env(home)
        env.update(_QUIET)
        return Launch(argv=self._argv(task, model_id, *BUILD_MODE), env=env)

    def review(
        self,
        task: str,
        proxy: Proxy,
        model_id: str,
        checkout: Path,
        home: Path,
        schema: dict[str, object],
    ) -> Launch | None:
        # Only reading tools exist in the session, so nothing can write whatever is allowed.
        mode = ["--tools", READ_ONLY_TOOLS, "--allowedTools", READ_ONLY_TOOLS]
        mode += ["--permission-mode", "dontAsk", "--json-schema", json.dumps(schema)]
        argv = self._argv(task, model_id, *mode)
        return Launch(argv=argv, env=self.env(proxy, model_id, home), files=self._files())

    @staticmethod
    def _result(events: list[dict[str, object]]) -> dict[str, object] | None:
        results = [e for e in events if e.get("type") == "result"]
        return results[-1] if results else None

    def review_result(self, events: list[dict[str, object]], stdout: bytes) -> object | None:
        result = self._result(events)
        if result is None or result.get("is_error"):
            return None
        return result.get("structured_output")

    def self_reported(self, events: list[dict[str, object]]) -> tuple[int, int, float] | None:
        result = self._result(events)
        if result is None:
            return None
        usage = result.get("usage")
        if not isinstance(usage, dict):
            return None
        prompt = sum(
            int(usage.get(k) or 0)
            for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        )
        cost = result.get("total_cost_usd")
        usd = float(cost) if isinstance(cost, (int, float)) else 0.0
        return prompt, int(usage.get("output_tokens") or 0), usd

    def failed(self, events: list[dict[str, object]]) -> str | None:
        result = self._result(events)
        if result is None:
            return "no result event"
        subtype = str(result.get("subtype") or "")
        if result.get("is_error") or subtype.startswith("error"):
            said = result.get("result") or result.get("errors") or subtype
            return f"{subtype}: {json.dumps(said)[:300]}"
        return None
