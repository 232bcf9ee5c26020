"""A real Ray cluster of several nodes on this machine, on loopback only: `ray start --head`
plus `ray start --address` per worker node, each its own process group (killed by PID).
Every node and the driver use 127.0.0.2: Ray swaps 127.0.0.1 for the machine's outward
address (or, told not to, refuses a second node), but leaves the rest of 127/8 alone.

Every node runs with an environment of its own, free of the tests' keys, and a HOME holding
the file that keeps Ray from asking cloud metadata addresses where it runs; traffic to
anything but loopback goes to a closed port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
HOST = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    keep = ("PATH", "LANG", "TZ", "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_OFFLINE_MODE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_enable_metrics_collection="0",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),  # this checkout of flow
    )
    return env


@dataclass
class Node:
    name: str
    home: Path
    proc: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """Every live process of this node, known by the HOME only this node's processes
        have (Ray starts its workers in process groups of their own)."""
        mark = f"HOME={self.home}".encode() + b"\0"
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    env = (entry / "environ").read_bytes()
                except OSError:
                    continue
                if env.startswith(mark) or b"\0" + mark in env:
                    out.append(int(entry.name))
        return out

    def kill(self) -> None:
        """kill -9 of every process of the node at once: raylet, object store, workers."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Cluster:
    root: Path
    port: int = field(default_factory=_free_port)
    nodes: list[Node] = field(default_factory=list)
    sessions: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fr-")))
    """Ray's own files: short, since its Unix socket paths must stay under 108 bytes."""

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start_head(self) -> Node:
        # No CPUs on the head: the driver and the relay live there, the work on the others.
        return self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0"])

    def add_node(self, name: str, cpus: int = 2) -> Node:
        return self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}"])

    def _start(self, name: str, args: list[str]) -> Node:
        home = self.root / name
        cmd = [
            str(RAY),
            "start",
            "--block",
            f"--node-ip-address={HOST}",
            "--disable-usage-stats",
            *args,
        ]
        if name == "head":
            cmd += ["--include-dashboard=false", f"--temp-dir={self.sessions}"]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the node keeps it
        proc = subprocess.Popen(
            cmd,
            env=quiet_env(home),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node = Node(name, home, proc)
        self.nodes.append(node)
        return node

    def wait_for(self, count: int, timeout_s: float = 90.0) -> None:
        """Until `count` nodes are alive in the cluster (asked of Ray, in a child process)."""
        probe = (
            "import ray,sys,time\n"
            f"ray.init(address='{self.address}', _node_ip_address='{HOST}', "
            "logging_level='error')\n"
            f"end = time.time() + {timeout_s}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    if time.time() > end: sys.exit(1)\n"
            "    time.sleep(0.2)\n"
        )
        env = quiet_env(self.root / "probe")
        probing = subprocess.Popen([sys.executable, "-c", probe], env=env)
        while probing.poll() is None:
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead:
                probing.kill()
                log = (self.root / f"{dead[0].name}.log").read_text(errors="replace")
                raise RuntimeError(f"ray node {dead[0].name} exited:\n{log[-2000:]}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                probing.wait(timeout=1)
        assert probing.returncode == 0, f"fewer than {count} ray nodes came up"

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=30)
            node.kill()
        shutil.rmtree(self.sessions, ignore_errors=True)
