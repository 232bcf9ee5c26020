"""`login: true`: the CLI runs on its user's own login, not through flow's proxy. flow then
cannot meter it, and says so; the CLI's own usage is recorded, marked as such."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_clis import checkout, config

from orchestrator.agents.cli import CLIS, CliBuilder
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.redact import Redactor
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.workspace import worktree_diff
from tests.clis import scripts

OWN_KEY = "sk-users-own-opencode-login-51c0"


def own_login(home: Path, server_url: str) -> None:
    """What a user who logged OpenCode in to a provider of their own has in HOME."""
    conf = home / ".config" / "opencode"
    conf.mkdir(parents=True)
    provider = {
        "npm": "@ai-sdk/openai-compatible",
        "name": "mine",
        "options": {"baseURL": server_url, "apiKey": OWN_KEY},
        "models": {"glm-4.7": {"name": "glm-4.7"}},
    }
    (conf / "opencode.json").write_text(json.dumps({"provider": {"mine": provider}}))


def test_a_login_builder_uses_the_users_login_and_is_marked_unmetered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_home = tmp_path / "userhome"
    model = ScriptedModel("glm-4.7", scripts.opencode)
    with ChatServer(scripted_handler({"glm-4.7": model})) as server:
        own_login(user_home, server.base_url)
        monkeypatch.setenv("HOME", str(user_home))
        repo, base = checkout(tmp_path / "b")
        ledger = Ledger(tmp_path / "l.db")
        door = Door(config(server.base_url), run_id="r1", ledger=ledger)
        builder = CliBuilder(
            door,
            "glm",
            "mine/glm-4.7",
            CLIS["opencode"](),
            transcript=tmp_path / "t.jsonl",
            redact=Redactor([OWN_KEY]),
            timeout_s=120,
            scope="b0",
            login=True,
        )
        asyncio.run(builder.run("Write hello.txt saying hi.", repo))
    assert builder.outcome.error is None, builder.outcome.error
    assert b"+hi from opencode" in worktree_diff(repo, base)
    # The calls went to the user's own provider with the user's own key, not through flow:
    assert server.authorizations and all(OWN_KEY in a for a in server.authorizations)
    assert builder.log.calls == [] and ledger.rows("r1") == []
    # ... so the outcome is marked unmetered and carries OpenCode's own count of tokens.
    assert builder.outcome.metered is False
    assert builder.outcome.prompt_tokens > 0
    # The user's login files were lent, not copied into flow's records.
    assert OWN_KEY not in (tmp_path / "t.jsonl").read_text()
    assert (user_home / ".config" / "opencode" / "opencode.json").is_file()
