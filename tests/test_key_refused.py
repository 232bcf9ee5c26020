"""A provider that refuses its key ends that provider's work only (issue 8.11): the other
builders finish and are kept, the run stops as resumable (exit 3) naming the key variable,
and after the key is fixed `flow resume` buys none of the finished work again.

Two test servers, each with its own bill: one for GLM (it accepts only the right key), one
for every other model."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import yaml
from conftest import flow_in, git

from orchestrator.demo import prepare_demo
from orchestrator.testing.demo_http import demo_scripts
from orchestrator.testing.server import ChatServer, scripted_handler

PRICES = (2e-6, 8e-6)
WRONG = "sk-glm-wrong-key-0001"
RIGHT = "sk-glm-right-key-0002"
OTHER = "sk-other-key-0003"
BUILDERS = ("minimax-sim", "kimi-sim")  # the builders whose provider takes its key


def billed(srv: ChatServer) -> Counter[str]:
    """What the server billed, per model."""
    return Counter(str(request.get("model")) for request, _ in srv.bill_of)


def test_a_refused_key_keeps_the_others_work_and_resume_buys_it_once(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    cfg = yaml.safe_load(demo.config.read_text())
    scripts = demo_scripts(demo)
    with (
        ChatServer(scripted_handler(scripts), prices=PRICES, keys=[RIGHT]) as glm,
        ChatServer(scripted_handler(scripts), prices=PRICES, keys=[OTHER], latency_s=0.2) as other,
    ):
        config = tmp_path / "http.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "providers": {
                        "glm": {
                            "api": "openai",
                            "base_url": glm.base_url,
                            "api_key": "GLM_API_KEY",
                        },
                        "other": {
                            "api": "openai",
                            "base_url": other.base_url,
                            "api_key": "OTHER_API_KEY",
                        },
                    },
                    "models": {
                        name: {
                            "provider": "glm" if name == "glm-sim" else "other",
                            "id": name,
                            "family": m["family"],
                            "price": m["price"],
                        }
                        for name, m in cfg["models"].items()
                    },
                    "stages": cfg["stages"],
                }
            )
        )
        env = {"GLM_API_KEY": WRONG, "OTHER_API_KEY": OTHER}
        first = flow_in(
            demo.repo, "run", str(demo.spec), "--config", str(config), "--json", env=env
        )

        assert first.returncode == 3, first.stdout[-2000:] + first.stderr
        message = first.stderr.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        assert "GLM_API_KEY" in message and "flow resume" in message, message
        for text in (first.stdout, first.stderr):
            assert WRONG not in text and RIGHT not in text and OTHER not in text
        assert glm.unauthorized >= 1 and glm.bills == []
        # The other builders were not cancelled: each ran its whole script and was billed.
        before = billed(other)
        for name in BUILDERS:
            turns = len(yaml.safe_load(Path(scripts[name].source).read_text())["replies"])
            assert before[name] == turns, (name, before)
        assert not set(before) & {"gpt-sim", "claude-sim"}  # no review before the stop
        db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
        run_id, status = db.execute("SELECT run_id, status FROM runs").fetchone()
        db.close()
        assert status == "interrupted"
        assert run_id in message
        assert "flow/add-median" not in git(demo.repo, "branch", "--list")

        env["GLM_API_KEY"] = RIGHT  # the fix the message asked for
        resumed = flow_in(demo.repo, "resume", run_id, "--json", env=env)
        after = billed(other)

    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr
    assert "def median" in git(demo.repo, "show", "flow/add-median:stats.py")
    # Nothing the other provider had answered was bought again: only the reviews are new.
    new = after - before
    assert set(new) == {"gpt-sim", "claude-sim"}, new
    assert all(after[name] == before[name] for name in (*BUILDERS, "flash-sim"))
    glm_turns = len(yaml.safe_load(Path(scripts["glm-sim"].source).read_text())["replies"])
    assert billed(glm) == Counter({"glm-sim": glm_turns})
    summary = json.loads((demo.repo / ".flow" / "runs" / run_id / "run.json").read_text())
    kept = {c["model"]: c["status"] for c in summary["candidates"]}
    assert set(kept) == {"glm-sim", *BUILDERS}, kept
