"""A planted key must not appear in anything flow writes or prints, even when every model
echoes it back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import flow_in

from orchestrator.demo import prepare_demo
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.testing.server import ChatServer, scripted_handler

KEY = "sk-planted-secret-9f8e7d6c5b4a"
DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"


def leaky(script: Path, replies: list[dict[str, Any]]) -> Path:
    script.write_text(yaml.safe_dump({"replies": replies}))
    return script


def test_a_planted_key_appears_nowhere(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    good = yaml.safe_load((DEMO / "scripts" / "builder_good.yaml").read_text())["replies"]
    planner = leaky(
        tmp_path / "planner.yaml",
        [
            {
                "tool_calls": [
                    {
                        "name": "submit_plan",
                        "arguments": {
                            "summary": f"Use {KEY} to add median",
                            "steps": [f"step with {KEY}"],
                        },
                    }
                ]
            }
        ],
    )
    builder = leaky(
        tmp_path / "builder.yaml",
        [
            {
                "content": f"I see the key {KEY}",
                "reasoning_content": f"thinking about {KEY}",
                "tool_calls": [{"name": "run", "arguments": {"command": f"echo {KEY}; env"}}],
            },
            *good[1:3],
            {"tool_calls": [{"name": "finish", "arguments": {"summary": f"done, key {KEY}"}}]},
        ],
    )
    writer = leaky(
        tmp_path / "writer.yaml",
        [
            {
                "tool_calls": [
                    {
                        "name": "write_file",
                        "arguments": {
                            "path": "stats.py",
                            "content": (DEMO / "repo" / "stats.py").read_text()
                            + f"\nAPI_KEY = '{KEY}'\n"
                            + good[1]["tool_calls"][0]["arguments"]["new"],
                        },
                    }
                ]
            },
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "wrote it"}}]},
        ],
    )
    reviewer = leaky(
        tmp_path / "reviewer.yaml",
        [
            {
                "tool_calls": [
                    {
                        "name": "submit_review",
                        "arguments": {
                            "score": 8,
                            "verdict": "approve",
                            "summary": f"fine, saw {KEY}",
                            "findings": [KEY],
                        },
                    }
                ]
            }
        ],
    )
    scripts = {
        "planner": ScriptedModel("planner", planner),
        "builder": ScriptedModel("builder", builder),
        "writer": ScriptedModel("writer", writer),
        "rev-a": ScriptedModel("rev-a", reviewer),
        "rev-b": ScriptedModel("rev-b", reviewer),
    }
    spec = demo.spec.read_text().replace(
        "  - python3 -m unittest -q", f"  - echo {KEY} && python3 -m unittest -q"
    )
    demo.spec.write_text(spec)
    cache = tmp_path / "cache"
    with ChatServer(scripted_handler(scripts)) as srv:
        price = {"input": 1, "output": 2}
        fam = {"planner": "p", "builder": "b", "writer": "w", "rev-a": "x", "rev-b": "y"}
        models = {
            n: {"provider": "local", "id": n, "family": f, "price": price} for n, f in fam.items()
        }
        config = tmp_path / "secret.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "providers": {
                        "local": {
                            "api": "openai",
                            "base_url": srv.base_url,
                            "api_key": "PLANTED_API_KEY",
                        }
                    },
                    "models": models,
                    "stages": {
                        "planner": {"model": "planner"},
                        "builders": [{"model": "builder"}, {"model": "writer"}],
                        "reviewers": [{"model": "rev-a"}, {"model": "rev-b"}],
                    },
                }
            )
        )
        out = flow_in(
            demo.repo,
            "run",
            str(demo.spec),
            "--config",
            str(config),
            "--json",
            env={"PLANTED_API_KEY": KEY, "FLOW_CACHE_DIR": str(cache)},
        )
        sent = json.dumps(srv.requests)
    assert out.returncode == 0, out.stderr
    assert KEY in sent  # the models really did echo it, and it came back in their context...
    # ...but nothing flow wrote or printed holds it.
    assert KEY not in out.stdout and KEY not in out.stderr
    written = [p for p in (demo.repo / ".flow").rglob("*") if p.is_file()]
    written += [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.name == "report.md" for p in written)
    assert any(p.suffix == ".jsonl" for p in written)
    assert any(p.name.startswith("checkpoints.sqlite") for p in written)
    leaks = [str(p) for p in written if KEY.encode() in p.read_bytes()]
    assert leaks == []
    history = subprocess.run(
        ["git", "log", "--all", "-p", "--format=%B"],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Flow-Run:" in history and KEY not in history
    summary = json.loads(next((demo.repo / ".flow" / "runs").glob("*/run.json")).read_text())
    writer_cand = next(c for c in summary["candidates"] if c["model"] == "writer")
    assert writer_cand["status"] == "failed" and "secret" in writer_cand["error"]
    assert (
        "[REDACTED]" in (demo.repo / ".flow" / "runs" / summary["run_id"] / "report.md").read_text()
    )
