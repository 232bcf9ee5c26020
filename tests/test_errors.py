"""Errors that point at the right place: the layer (file and line, `--set`, a spec's
`models:`) that set a bad value, the provider that cannot be reached, the batch that is
finished, the budget that holds, the python the checks run under."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import flow_in

from orchestrator.config import parse_config
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.errors import ProviderError
from orchestrator.ledger import Ledger
from orchestrator.llm.door import CONNECT_RETRIES, Door
from orchestrator.llm.messages import Message
from orchestrator.proc import checks_env, run_shell
from orchestrator.protocols import ListSink
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, scripted_handler


@pytest.fixture
def demo(tmp_path: Path) -> DemoPaths:
    return prepare_demo(tmp_path)


def validate(demo: DemoPaths, *extra: str) -> subprocess.CompletedProcess[str]:
    return flow_in(demo.repo, "validate", str(demo.spec), "--config", str(demo.config), *extra)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- layers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "expect"),
    [
        ("budget.per_run_usd=lots", "budget.per_run_usd: Input should be a valid number"),
        ("budget.per_rn_usd=1", "did you mean 'per_run_usd'?"),
        ("stages.planner.modle=x", "did you mean 'model'?"),
        ("stages.planner.model=ghost", "unknown model 'ghost'"),
        ("stages.planner.model=openrouter/no-price", "no known price"),
        ("models.glm-sim.provider=nowhere", "models.glm-sim"),
    ],
)
def test_a_set_error_names_the_set_not_agents_yaml(
    demo: DemoPaths, assignment: str, expect: str
) -> None:
    line = one_line(validate(demo, "--set", assignment))
    assert line.startswith(f"flow: --set {assignment}: "), line
    assert expect in line and "agents.yaml" not in line


def test_a_specs_models_error_names_the_spec(demo: DemoPaths) -> None:
    text = demo.spec.read_text()
    demo.spec.write_text(text.replace("branch: flow/add-median\n", "branch: flow/add-median\n"
                                      "models:\n  planner: ghost-model\n", 1))  # fmt: skip
    line = one_line(validate(demo))
    assert line.startswith(f"flow: {demo.spec}: models: "), line
    assert "ghost-model" in line and "agents.yaml" not in line
    # A spec's reviewers that leave a builder without a reviewer of another family: the
    # spec's layer is to blame, not agents.yaml's builders.
    demo.spec.write_text(text.replace("branch: flow/add-median\n", "branch: flow/add-median\n"
                                      "models:\n  reviewers: [glm-sim]\n", 1))  # fmt: skip
    line = one_line(validate(demo))
    assert line.startswith(f"flow: {demo.spec}: models: "), line
    assert "no reviewer of another family" in line


def test_agents_yaml_errors_give_the_line_and_a_did_you_mean(demo: DemoPaths) -> None:
    lines = demo.config.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip() == "family: zhipu")
    lines[at] = lines[at].replace("family:", "famly:")
    demo.config.write_text("\n".join(lines) + "\n")
    line = one_line(validate(demo))
    assert line.startswith(f"flow: {demo.config}:{at + 1}: models.glm-sim.famly: "), line
    assert "did you mean 'family'?" in line
    # A key nothing resembles lists what is allowed there instead.
    lines[at] = lines[at].replace("famly:", "colour:")
    demo.config.write_text("\n".join(lines) + "\n")
    line = one_line(validate(demo))
    assert f"{demo.config}:{at + 1}:" in line and "known keys here:" in line and "family" in line
    # A bad value: the line of its key.
    data = demo.config.read_text().replace("colour: zhipu", "family: zhipu")
    data = data.replace("per_run_usd: 1.0", "per_run_usd: lots")
    demo.config.write_text(data)
    at = next(i for i, ln in enumerate(data.splitlines()) if "per_run_usd" in ln)
    line = one_line(validate(demo))
    assert line.startswith(f"flow: {demo.config}:{at + 1}: budget.per_run_usd: "), line


# ---- an unreachable provider ------------------------------------------------------------


def test_an_unreachable_provider_says_cannot_connect_retries_once_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNREACHABLE_TEST_KEY", "sk-unreachable-0001")
    url = f"http://127.0.0.1:{closed_port()}/v1"
    loaded = parse_config(
        {
            "providers": {
                "far": {"base_url": url, "api_key": "UNREACHABLE_TEST_KEY", "retries": 5}
            },
            "models": {"m": {"provider": "far", "id": "m", "price": {"input": 1, "output": 1}}},
            "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
        }
    )
    ledger = Ledger(tmp_path / "ledger.sqlite")
    events = ListSink()
    door = Door(loaded, run_id="r", ledger=ledger, events=events)
    door.backoff_base_s = 0.01
    with pytest.raises(ProviderError) as caught:
        asyncio.run(door.complete("m", [Message.user("hi")], stage="plan"))
    message = str(caught.value)
    assert f"cannot connect to {url}" in message and "provider 'far'" in message
    assert "connection refused" in message and "HTTP 500" not in message
    rows = ledger.rows()
    assert [r.outcome for r in rows] == ["retry"] * CONNECT_RETRIES + ["error"]  # not 5
    assert sum(r.cost_usd for r in rows) == 0  # nothing was sent, nothing is counted
    notes = [e.message for e in events.events if getattr(e, "kind", "") == "notice"]
    assert notes and all("cannot connect to" in n and "HTTP" not in n for n in notes)
    ledger.close()


def test_a_run_whose_reviewer_cannot_be_reached_applies_nothing_and_says_why(
    demo: DemoPaths,
) -> None:
    with ChatServer(scripted_handler(demo_scripts(demo))) as srv:
        cfg = http_config(demo, srv.base_url)
        cfg["providers"]["gone"] = {"base_url": f"http://127.0.0.1:{closed_port()}/v1"}
        for name in ("gpt-sim", "claude-sim"):
            cfg["models"][name]["provider"] = "gone"
        path = demo.root / "http.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = flow_in(demo.repo, "run", str(demo.spec), "--config", str(path), "--json")
    events = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    finished = next(e for e in events if e["kind"] == "run_finished")
    assert finished["outcome"] != "applied" and out.returncode == 1
    reviews = [e for e in events if e["kind"] == "review"]
    assert reviews and all("cannot connect to http://127.0.0.1:" in e["error"] for e in reviews)
    assert not any("HTTP 500" in (e.get("error") or "") for e in reviews)


# ---- batches ------------------------------------------------------------------------------


def batch_args(demo: DemoPaths, *extra: str) -> list[str]:
    return ["batch", str(demo.spec), "--config", str(demo.config), *extra]


def test_a_past_until_is_refused(demo: DemoPaths) -> None:
    line = one_line(flow_in(demo.repo, *batch_args(demo, "--budget", "1", "--until",
                                                   "2020-01-01T07:30")))  # fmt: skip
    assert "--until" in line and "in the past" in line
    assert not (demo.repo / ".flow" / "runs").is_dir() or not any(
        (demo.repo / ".flow" / "runs").iterdir()
    )


def test_rerunning_a_finished_batch_says_so_and_shows_its_summary(demo: DemoPaths) -> None:
    first = flow_in(demo.repo, *batch_args(demo, "--budget", "1"))
    assert first.returncode == 0, first.stderr
    again = flow_in(demo.repo, *batch_args(demo, "--budget", "1"), env={"COLUMNS": "300"})
    assert again.returncode == 0, again.stderr
    assert "is finished" in again.stdout and "nothing is run again" in again.stdout
    assert "1 applied" in again.stdout and "report:" in again.stdout
    assert "resuming" not in again.stdout


def test_a_resumed_batch_with_another_budget_says_which_holds(demo: DemoPaths) -> None:
    """The batch is interrupted for real (SIGTERM once its first run started), then run
    again with a higher and then a lower --budget."""
    second = demo.root / "spec2.md"
    second.write_text(demo.spec.read_text().replace("flow/add-median", "flow/add-median-2"))
    args = [*batch_args(demo, "--budget", "1", "--parallel", "1"), str(second), "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=demo.repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"kind":"run_started"' in line.replace(" ", ""):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    higher = flow_in(demo.repo, *[a if a != "1" else "3" for a in args])
    notices = [json.loads(ln) for ln in higher.stdout.splitlines() if '"notice"' in ln]
    said = " ".join(n["message"] for n in notices)
    assert "--budget $3.0000 is ignored" in said and "keeps its budget of $1.0000" in said
    started = next(json.loads(ln) for ln in higher.stdout.splitlines() if "batch_started" in ln)
    assert started["budget_usd"] == 1.0 and started["resumed"]


# ---- checks run under the project's python, not flow's ------------------------------------------


def test_checks_do_not_inherit_flows_virtualenv(tmp_path: Path) -> None:
    assert sys.prefix != sys.base_prefix, "the tests run from flow's virtualenv"
    venv_bin = str(Path(sys.prefix) / "bin")
    activated = {
        **os.environ,
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": sys.prefix,
    }
    env = checks_env(environ=activated)
    assert "VIRTUAL_ENV" not in env and venv_bin not in env["PATH"].split(":")
    out = asyncio.run(
        run_shell(
            "python3 -c 'import sys; print(sys.prefix)'",
            tmp_path,
            timeout_s=60,
            output_cap=4000,
            env=env,
            isolate_user=True,
        )
    )
    assert out.exit_code == 0, out.output
    assert out.output.strip() != sys.prefix and out.output.strip()
    # The user's own virtualenv, activated, stays (it is not flow's).
    own = tmp_path / "project-venv"
    mine = checks_env(environ={**activated, "VIRTUAL_ENV": str(own), "PATH": f"{own}/bin:/bin"})
    assert mine["VIRTUAL_ENV"] == str(own) and mine["PATH"].startswith(f"{own}/bin")
    # A virtualenv inside the project is the project's own, even if flow runs from it.
    inside = checks_env(environ=activated, project=Path(sys.prefix).parent)
    assert inside["VIRTUAL_ENV"] == sys.prefix and venv_bin in inside["PATH"].split(":")
