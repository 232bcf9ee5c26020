"""Codex (npm `@openai/codex`): OpenAI Responses only, JSON lines from `codex exec --json`.

Its whole configuration is a config.toml in a CODEX_HOME under the private HOME: a `flow`
provider whose key Codex reads from an environment variable holding the proxy's token, and
every side channel it has (analytics, feedback, update checks, plugins, apps, hooks, web
search) off. A repository's own `.codex/config.toml` is read only for a trusted project, and
flow marks the checkout untrusted; even a trusted project may not set the provider.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.agents.cli.base import Launch, base_env, find
from orchestrator.proxy import Proxy

TOKEN_ENV = "FLOW_PROXY_TOKEN"
CODEX_DIR = ".codex"
SCHEMA_FILE = "review-schema.json"
LAST_MESSAGE_FILE = "last-message.json"
OFF_FEATURES = (
    "apps",
    "goals",
    "hooks",
    "image_generation",
    "in_app_updates",
    "plugin_sharing",
    "plugins",
    "remote_plugin",
    "skill_mcp_dependency_install",
)
"""Features that reach beyond the checkout and the proxy, or spend calls flow did not ask for."""

Table = dict[str, Any]


def toml(table: Table, prefix: str = "") -> str:
    """A TOML document of strings, booleans, ints and nested tables (JSON strings are valid
    TOML basic strings)."""
    flat = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines = [*flat, ""] if flat else []
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            lines.append(f"[{name}]")
            lines.append(toml(value, name))
    return "\n".join(lines)


class Codex:
    name = "codex"
    dialect = "responses"
    droppings: tuple[str, ...] = ()
    # A ChatGPT-plan login: the user's ~/.codex (auth.json and their own config.toml).
    login_files: tuple[str, ...] = (".codex",)

    def __init__(self, command: str = "codex", extra_args: list[str] | None = None):
        self.command = command
        self.extra_args = list(extra_args or [])

    def config(self, proxy: Proxy, model_id: str, checkout: Path) -> Table:
        return {
            "model": model_id,
            "model_provider": "flow",
            "approval_policy": "never",
            "check_for_update_on_startup": False,
            "web_search": "disabled",
            "model_providers": {
                "flow": {
                    "name": "flow",
                    "base_url": f"{proxy.base_url}/v1",
                    "env_key": TOKEN_ENV,
                    "wire_api": "responses",
                    # flow's door retries; a retry here would be a second billed call.
                    "request_max_retries": 0,
                    "stream_max_retries": 0,
                }
            },
            "analytics": {"enabled": False},
            "feedback": {"enabled": False},
            "history": {"persistence": "none"},
            "features": {name: False for name in OFF_FEATURES},
            "agents": {"enabled": False},  # no sub-agents: one builder, one conversation
            "projects": {str(checkout): {"trust_level": "untrusted"}},
        }

    def _launch(
        self,
        prompt: str,
        proxy: Proxy,
        model_id: str,
        checkout: Path,
        home: Path,
        mode: list[str],
        files: dict[str, str] | None = None,
    ) -> Launch:
        codex_home = home / CODEX_DIR
        env = base_env(home)
        env.update({TOKEN_ENV: proxy.token, "CODEX_HOME": str(codex_home)})
        exe = find(self.command) or self.command
        argv = [exe, "exec", "--json", "--ephemeral", "--skip-git-repo-check", "--strict-config"]
        # Command-line settings outrank every config layer, a project's included.
        argv += ["--ignore-rules", "-C", str(checkout), "-m", model_id]
        argv += ["-c", 'model_provider="flow"', *mode]
        config = toml(self.config(proxy, model_id, checkout))
        return Launch(
            argv=[*argv, *self.extra_args, "--", prompt],
            env=env,
            files={f"{CODEX_DIR}/config.toml": config, **(files or {})},
        )

    def launch(self, task: str, proxy: Proxy, model_id: str, checkout: Path, home: Path) -> Launch:
        # flow confines the CLI itself (bubblewrap), so Codex's own sandbox would only nest.
        mode = ["--dangerously-bypass-approvals-and-sandbox"]
        return self._launch(task, proxy, model_id, checkout, home, mode)

    def login_launch(self, task: str, model_id: str, checkout: Path, home: Path) -> Launch | None:
        env = base_env(home)
        env["CODEX_HOME"] = str(home / ".codex")  # the user's own, lent to the private HOME
        exe = find(self.command) or self.command
        argv = [exe, "exec", "--json", "--ephemeral", "--skip-git-repo-check", "-C", str(checkout)]
        argv += ["-m", model_id, "--dangerously-bypass-approvals-and-sandbox"]
        argv += ["-c", "analytics.enabled=false", "-c", "check_for_update_on_startup=false"]
        return Launch(argv=[*argv, *self.extra_args, "--", task], env=env)

    def review(
        self,
        task: str,
        proxy: Proxy,
        model_id: str,
        checkout: Path,
        home: Path,
        schema: dict[str, object],
    ) -> Launch | None:
        codex_home = home / CODEX_DIR
        mode = ["--sandbox", "read-only"]
        mode += ["--output-schema", str(codex_home / SCHEMA_FILE)]
        mode += ["--output-last-message", str(codex_home / LAST_MESSAGE_FILE)]
        files = {f"{CODEX_DIR}/{SCHEMA_FILE}": json.dumps(schema)}
        return self._launch(task, proxy, model_id, checkout, home, mode, files)

    def review_result(self, events: list[dict[str, object]], stdout: bytes) -> object | None:
        for text in reversed(_agent_messages(events)):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
        return None

    def self_reported(self, events: list[dict[str, object]]) -> tuple[int, int, float] | None:
        prompt = completion = 0
        for event in events:
            usage = event.get("usage")
            if event.get("type") == "turn.completed" and isinstance(usage, dict):
                prompt += int(usage.get("input_tokens") or 0)
                completion += int(usage.get("output_tokens") or 0)
        # Codex reports no price: the cost is unknown, not zero, but the protocol wants one.
        return (prompt, completion, 0.0) if prompt or completion else None

    def failed(self, events: list[dict[str, object]]) -> str | None:
        """`turn.failed`, or an `error` no completed turn came after (item-level `error`
        items are warnings, such as Codex not knowing the model's metadata)."""
        said = None
        for event in events:
            kind = event.get("type")
            if kind == "turn.failed":
                return json.dumps(event.get("error") or event)[:300]
            if kind == "error":
                said = str(event.get("message") or event)[:300]
            elif kind == "turn.completed":
                said = None
        return said


def _agent_messages(events: list[dict[str, object]]) -> list[str]:
    texts = []
    for event in events:
        item = event.get("item")
        if event.get("type") != "item.completed" or not isinstance(item, dict):
            continue
        if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
            texts.append(item["text"])
    return texts
