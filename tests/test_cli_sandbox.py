"""An agent CLI is confined like flow's own builder commands: its checkout and private HOME
writable, no network but its proxy, no sight of the user's repository, no process left."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from test_clis import KEY, key, run_builder  # noqa: F401  (key: the autouse fixture)

from orchestrator import sandbox
from orchestrator.llm.messages import Message, ToolSpec
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.workspace import worktree_diff

DAEMON = "sleep 7391"


def probe(server_url: str, user_repo: Path) -> str:
    reach = (
        "import urllib.error, urllib.request\n"
        "try:\n"
        f"    urllib.request.urlopen({server_url!r} + '/v1/models', timeout=3)\n"
        "    print('NET:open')\n"
        "except urllib.error.HTTPError:\n"
        "    print('NET:open')\n"
        "except Exception as e:\n"
        "    print('NET:blocked', type(e).__name__)\n"
    )
    return "\n".join(
        [
            f"python3 -c {reach!r}".replace("\\n", "\n"),
            f"test -e {user_repo}/README.md && echo REPO:visible || echo REPO:hidden",
            f"touch {user_repo}/planted 2>/dev/null",
            "echo HOME:$HOME",
            f"(setsid {DAEMON} >/dev/null 2>&1 &) ; echo DAEMON:started",
        ]
    )


def confined_script(command: str) -> Any:
    def script(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
        if "write" not in {t.name for t in tools}:
            return {"content": "A title"}
        turn = sum(1 for m in messages if m.role == "assistant")
        if turn == 0:
            # In a file: OpenCode's own permissions would refuse a command naming paths
            # outside the checkout, and the point is what the sandbox allows.
            probe = {"filePath": "probe.sh", "content": command + "\n"}
            return {"tool_calls": [{"name": "write", "arguments": probe}]}
        if turn == 1:
            call = {"command": "sh probe.sh", "description": "probe"}
            return {"tool_calls": [{"name": "bash", "arguments": call}]}
        if turn == 2:
            edit = {"filePath": "hello.txt", "content": "hi\n"}
            return {"tool_calls": [{"name": "write", "arguments": edit}]}
        return {"content": "Done."}

    return script


def daemons() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if DAEMON in cmd:
                found.append(cmd)
    return found


def test_opencode_runs_confined(tmp_path: Path) -> None:
    assert sandbox.bwrap() is not None, "bubblewrap must be installed for this test"
    user_repo = tmp_path / "b1" / "user"
    holder: dict[str, str] = {}

    def script(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
        return confined_script(holder["command"])(messages, tools, choice)

    with ChatServer(scripted_handler({"glm-4.7": ScriptedModel("glm-4.7", script)})) as server:
        holder["command"] = probe(server.base_url, user_repo)
        builder, repo, base = run_builder(tmp_path, server, "opencode")
        requests = len(server.requests)
    assert builder.outcome.error is None, builder.outcome.error
    # Every model call went through the proxy (the probe's own try never reached the server).
    assert builder.log.ok_calls == requests
    seen = "\n".join(m.content or "" for m in _tool_results(server))
    assert "NET:blocked" in seen and "NET:open" not in seen, seen
    assert "REPO:hidden" in seen and "REPO:visible" not in seen, seen
    assert "HOME:/tmp/flow-opencode-home-" in seen, seen
    assert not (user_repo / "planted").exists()
    assert daemons() == [], "a process the CLI started outlived it"
    assert b"hello.txt" in worktree_diff(repo, base)
    assert KEY not in seen


def _tool_results(server: ChatServer) -> list[Message]:
    out = []
    for request in server.requests:
        for m in request.get("messages") or []:
            if m.get("role") == "tool":
                content = m.get("content")
                text = content if isinstance(content, str) else str(content)
                out.append(Message(role="tool", content=text, tool_call_id="x"))
    return out


def test_no_provider_key_in_the_cli_environment_even_when_flow_has_it() -> None:
    # The CLI's environment is built from nothing: flow's own (with the key) is not inherited.
    from orchestrator.agents.cli.base import base_env

    env = base_env(Path("/tmp/h"), {"PATH": "/usr/bin", "LOCAL_TEST_KEY": KEY, **os.environ})
    assert KEY not in "".join(env.values())
