"""flow batch on a real Ray cluster of several nodes on this machine
(orchestrator/testing/raycluster.py): the driver keeps the door, the ledger, the caps and the
keys; builds and checks run on the worker nodes. Judged by the test server's own count and
bill, the user's repository, the nodes' processes and files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.executors.node import sweep
from orchestrator.testing import ChatServer, ServerReply, scripted_handler
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.raycluster import RAY, Cluster, quiet_env
from tests.conftest import assert_untouched, git, repo_state

KEY = "sk-ray-test-4f1c9a77e2b04d5e"
PRICE = (3.0, 15.0)  # USD per million input and output tokens, in flow's config
BILL = (PRICE[0] / 1e6, PRICE[1] / 1e6)  # the same per token, for the server's own bill
BRANCH = "branch: flow/add-median"


def test_ray_is_installed() -> None:
    """The Ray tests need Ray and its `ray` command (the `[ray]` extra); never skipped."""
    import ray

    assert ray.__version__ == "2.60.0"
    assert RAY.exists(), f"{RAY} is missing: pip install -e '.[dev]'"


@pytest.fixture
def demo(tmp_path: Path) -> DemoPaths:
    return prepare_demo(tmp_path)


def write_batch(
    demo: DemoPaths, base_url: str, n: int, concurrency: int
) -> tuple[Path, list[Path]]:
    data = http_config(demo, base_url, max_concurrency=concurrency, timeout_s=120)
    data["providers"]["local"]["api_key"] = "LOCAL_TEST_KEY"
    for model in data["models"].values():
        model["price"] = {"input": PRICE[0], "output": PRICE[1]}
    config = demo.root / "ray-agents.yaml"
    config.write_text(yaml.safe_dump(data))
    text = demo.spec.read_text()
    assert BRANCH in text
    specs = []
    for i in range(n):
        path = demo.root / f"spec-{i}.md"
        path.write_text(text.replace(BRANCH, f"{BRANCH}-{i}"))
        specs.append(path)
    return config, specs


def flow_batch(
    demo: DemoPaths, config: Path, specs: list[Path], budget: float, ray: list[str], tmp: Path
) -> subprocess.Popen[str]:
    env = quiet_env(tmp / "driver-home")
    env.update(LOCAL_TEST_KEY=KEY, XDG_CACHE_HOME=str(tmp / "driver-cache"))
    cmd = [sys.executable, "-m", "orchestrator", "batch", *map(str, specs), "--budget", str(budget)]
    cmd += ["--config", str(config), "--json", "--parallel", str(len(specs)), *ray]
    return subprocess.Popen(
        cmd, cwd=demo.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], timeout_s: float = 300) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def environ_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def files_holding(root: Path, secret: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


def medians(repo: Path, n: int) -> list[bool]:
    return ["def median" in git(repo, "show", f"flow/add-median-{i}:stats.py") for i in range(n)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    c.root.mkdir(parents=True)
    try:
        # One at a time: nodes starting together on one machine race for the names of
        # their sockets in the session directory they share.
        c.start_head()
        c.wait_for(1)
        c.add_node("node-a")
        c.wait_for(2)
        c.add_node("node-b")
        c.wait_for(3)
        yield c
    finally:
        c.stop()


def test_a_batch_on_two_ray_nodes_keeps_every_promise(
    demo: DemoPaths, cluster: Cluster, tmp_path: Path
) -> None:
    before = repo_state(demo.repo)
    handler = scripted_handler(demo_scripts(demo))
    with ChatServer(handler, max_concurrency=2, prices=BILL, keys=[KEY]) as srv:
        config, specs = write_batch(demo, srv.base_url, 3, concurrency=2)
        events = finish(flow_batch(demo, config, specs, 1.0, ["--ray", cluster.address], tmp_path))
    done = [e for e in events if e["kind"] == "batch_finished"]
    assert done and done[0]["applied"] == 3, done
    # Each branch once, each holding the fix; the user's work tree, index and HEAD untouched.
    assert medians(demo.repo, 3) == [True, True, True]
    assert git(demo.repo, "branch", "--list", "flow/*").count("flow/add-median-") == 3
    assert_untouched(before, repo_state(demo.repo))
    # The provider's plan and the money, by the server's own count.
    assert srv.max_in_flight <= 2 and srv.rejected == 0
    assert 0 < srv.billed_usd <= 1.0
    assert srv.unauthorized == 0
    # The work ran on the worker nodes (each copy of the base is a node's own), not here.
    bases = [list((n.home / ".cache" / "flow" / "ray-bases").glob("*.git")) for n in cluster.nodes]
    assert bases[0] == [] and any(bases[1:]), bases
    assert not (tmp_path / "driver-cache" / "flow" / "ray-bases").exists()
    checks = [e for e in events if e["kind"] == "check"]
    assert len(checks) >= 3 and any(e["passed"] for e in checks)
    # No key in any node's processes or files: the driver alone held it.
    for node in cluster.nodes:
        pids = node.pids()
        assert pids, f"{node.name} has no process left to inspect"
        assert not [p for p in pids if KEY.encode() in environ_of(p)], node.name
        assert files_holding(node.home, KEY.encode()) == [], node.name
    assert files_holding(cluster.sessions, KEY.encode()) == []


class Gate:
    """Holds one request (the builder's second call) until the test lets it go."""

    def __init__(self, inner: Any, model: str, nth: int) -> None:
        self.inner, self.model, self.nth = inner, model, nth
        self.seen = 0
        self.hit, self.release = threading.Event(), threading.Event()
        self.bodies: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        with self._lock:
            self.bodies.append(json.dumps(request, sort_keys=True))
            mine = request.get("model") == self.model
            self.seen += mine
            hold = mine and self.seen == self.nth
        if hold:
            self.hit.set()
            assert self.release.wait(180), "the test never let the held request go"
        return self.inner(request)


def test_a_worker_node_killed_mid_build_buys_no_reply_twice(
    demo: DemoPaths, tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path / "cluster")
    cluster.root.mkdir(parents=True)
    gate = Gate(scripted_handler(demo_scripts(demo)), "glm-sim", nth=2)
    try:
        cluster.start_head()
        cluster.wait_for(1)
        node_a = cluster.add_node("node-a")
        cluster.wait_for(2)
        with ChatServer(gate, max_concurrency=2, prices=BILL, keys=[KEY]) as srv:
            config, specs = write_batch(demo, srv.base_url, 1, concurrency=2)
            proc = flow_batch(demo, config, specs, 1.0, ["--ray", cluster.address], tmp_path)
            assert gate.hit.wait(180), "the builder's second call never came"
            node_a.kill()  # mid-build: its first reply paid, its second in flight
            node_b = cluster.add_node("node-b")
            gate.release.set()
            events = finish(proc)
            left = sorted((node_a.home / ".cache" / "flow" / "ray-work").iterdir())
    finally:
        gate.release.set()
        cluster.stop()
    assert [e["applied"] for e in events if e["kind"] == "batch_finished"] == [1]
    assert medians(demo.repo, 1) == [True]
    lost = [e for e in events if e["kind"] == "notice" and "node was lost" in e["message"]]
    assert lost, "the driver did not say it started lost work again"
    # Every request reached the provider once: replies paid for before the node died came
    # from the ledger, the one in flight was waited for.
    assert len(gate.bodies) == len(set(gate.bodies)), "a reply was bought twice"
    assert srv.billed_usd <= 1.0
    # The killed node's checkouts stay until it returns: its next work sweeps them first.
    assert left, "the killed node left no scratch to clean"
    assert sorted(sweep(node_a.home / ".cache" / "flow" / "ray-work")) == left
    assert list((node_b.home / ".cache" / "flow" / "ray-work").iterdir()) == []


def test_bare_ray_starts_a_local_instance_without_the_keys(demo: DemoPaths, tmp_path: Path) -> None:
    gate = Gate(scripted_handler(demo_scripts(demo)), "glm-sim", nth=1)
    seen: dict[int, bytes] = {}
    with ChatServer(gate, max_concurrency=2, prices=BILL, keys=[KEY]) as srv:
        config, specs = write_batch(demo, srv.base_url, 1, concurrency=2)
        proc = flow_batch(demo, config, specs, 1.0, ["--ray"], tmp_path)
        try:
            assert gate.hit.wait(180), "the builder never called"
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) != proc.pid:
                    env = environ_of(int(entry.name))
                    if b"RAY_USAGE_STATS_ENABLED=0" in env and b"flow-ray-" in env:
                        seen[int(entry.name)] = env
        finally:
            gate.release.set()
        events = finish(proc)
    assert [e["applied"] for e in events if e["kind"] == "batch_finished"] == [1]
    assert len(seen) >= 3, "no Ray processes of flow's local instance were found"
    assert not [p for p, env in seen.items() if KEY.encode() in env]
    assert not [p for p in seen if Path(f"/proc/{p}").exists()], "the local Ray outlived flow"


def test_ray_without_the_extra_is_a_clear_error(demo: DemoPaths, tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from orchestrator.cli import main\n"
        f"sys.argv = ['flow', 'batch', {str(demo.spec)!r}, '--budget', '1', '--ray']\n"
        "main()\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=demo.repo, env=env, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "flow: --ray needs Ray, an optional extra: pip install 'flow-orchestrator[ray]'"
    )
    assert not (demo.repo / ".flow" / "ledger.sqlite").exists(), "the batch started anyway"


def test_bare_ray_before_a_spec_is_the_local_instance() -> None:
    from orchestrator.cli import _bare_ray

    assert _bare_ray(["flow", "batch", "--ray", "a.md"]) == ["flow", "batch", "--ray=local", "a.md"]
    assert _bare_ray(["flow", "batch", "a.md", "--ray"])[-1] == "--ray=local"
    assert _bare_ray(["flow", "batch", "--ray", "10.0.0.5:6379", "a.md"])[2:4] == [
        "--ray",
        "10.0.0.5:6379",
    ]
    assert _bare_ray(["flow", "batch", "--ray", "auto"])[-1] == "auto"
