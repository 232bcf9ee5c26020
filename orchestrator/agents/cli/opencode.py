"""OpenCode (npm `opencode-ai`): chat completions, JSON lines on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.agents.cli.base import Launch, base_env, find
from orchestrator.proxy import Proxy

TOKEN_ENV = "FLOW_PROXY_TOKEN"
_QUIET = (
    "OPENCODE_DISABLE_PROJECT_CONFIG",
    "OPENCODE_DISABLE_AUTOUPDATE",
    "OPENCODE_DISABLE_MODELS_FETCH",
    "OPENCODE_DISABLE_SHARE",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS",
    "OPENCODE_DISABLE_LSP_DOWNLOAD",
)
"""No project config, update, catalogue fetch, sharing, default plugins or LSP downloads."""


class OpenCode:
    name = "opencode"
    dialect = "chat"
    droppings: tuple[str, ...] = ()
    login_files: tuple[str, ...] = (".local/share/opencode/auth.json", ".config/opencode")

    def __init__(self, command: str = "opencode", extra_args: list[str] | None = None):
        self.command = command
        self.extra_args = list(extra_args or [])

    def config(self, proxy: Proxy, model_id: str) -> dict[str, object]:
        return {
            "$schema": "https://opencode.ai/config.json",
            "autoupdate": False,
            "share": "disabled",
            "provider": {
                "flow": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "flow",
                    # The token is read from the environment, so no file holds even that.
                    "options": {
                        "baseURL": f"{proxy.base_url}/v1",
                        "apiKey": f"{{env:{TOKEN_ENV}}}",
                    },
                    "models": {
                        model_id: {
                            "name": model_id,
                            "limit": {"context": 200000, "output": 32000},
                            "cost": {"input": 0, "output": 0},
                        }
                    },
                }
            },
            "permission": {
                "edit": "allow",
                "bash": "allow",
                "webfetch": "deny",
                "external_directory": "deny",
            },
        }

    def launch(self, task: str, proxy: Proxy, model_id: str, checkout: Path, home: Path) -> Launch:
        env = base_env(home)
        env.update(
            {
                TOKEN_ENV: proxy.token,
                "OPENCODE_CONFIG_CONTENT": json.dumps(self.config(proxy, model_id)),
                **{k: "1" for k in _QUIET},
            }
        )
        exe = find(self.command) or self.command
        argv = [exe, "run", "--format", "json", "--pure", "-m", f"flow/{model_id}"]
        return Launch(argv=[*argv, *self.extra_args, task], env=env)

    def login_launch(self, task: str, model_id: str, checkout: Path, home: Path) -> Launch | None:
        # The user's own OpenCode providers (auth.json), the model named as OpenCode knows it.
        env = base_env(home)
        env.update({k: "1" for k in _QUIET})
        exe = find(self.command) or self.command
        argv = [exe, "run", "--format", "json", "--pure", "-m", model_id]
        return Launch(argv=[*argv, *self.extra_args, task], env=env)

    def review(
        self,
        task: str,
        proxy: Proxy,
        model_id: str,
        checkout: Path,
        home: Path,
        schema: dict[str, object],
    ) -> Launch | None:
        return None  # no structured output: OpenCode builds, it does not review

    def review_result(self, events: list[dict[str, object]], stdout: bytes) -> object | None:
        return None

    def self_reported(self, events: list[dict[str, object]]) -> tuple[int, int, float] | None:
        prompt = completion = 0
        cost = 0.0
        for event in events:
            part = event.get("part")
            if event.get("type") == "step_finish" and isinstance(part, dict):
                tokens = part.get("tokens") or {}
                prompt += int(tokens.get("input") or 0)
                completion += int(tokens.get("output") or 0)
                cost += float(part.get("cost") or 0.0)
        return (prompt, completion, cost) if prompt or completion else None

    def failed(self, events: list[dict[str, object]]) -> str | None:
        for event in events:
            if event.get("type") == "error":
                return json.dumps(event.get("error") or event)[:300]
        return None
