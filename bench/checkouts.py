"""What flow's checkouts cost against one plain checkout of the same repository.

    python bench/checkouts.py [--files 1000 10000 50000] [--builders 3] [--scale 10000]

The demo repository (orchestrator/demo) gets F generated files (~5 KB each, 100 per
directory) in one commit. flow then runs the demo spec once with instant scripted models
(`flow run`, in a subprocess, as a user would) and N builders, each the demo's careful
builder. The reference is one `git clone --shared --no-checkout` + `git checkout` of the same
repository: the least any tool must pay to give one process a private copy of the files.

Printed per size: flow's wall time, the reference's, and their ratio (goal: <= 1.5 at 50k files
with N=3). Then the same run with 6 builders against 1 on --scale files (goal: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.demo import DemoPaths, prepare_demo, remove_demo

FILE_BYTES = 5000
PER_DIR = 100


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def grow(repo: Path, files: int) -> None:
    """F files of FILE_BYTES under gen/, committed on top of the demo's first commit."""
    line = b"x" * 99 + b"\n"
    body = line * (FILE_BYTES // len(line))
    for i in range(files):
        d = repo / "gen" / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}.txt").write_bytes(b"%d\n" % i + body)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{files} generated files")


def config(demo: DemoPaths, builders: int) -> Path:
    data: dict[str, Any] = yaml.safe_load(demo.config.read_text())
    data["stages"]["builders"] = [{"model": "glm-sim"}] * builders
    path = demo.root / f"bench-{builders}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def flow_run(demo: DemoPaths, builders: int, branch: str) -> float:
    spec = demo.root / f"{branch.replace('/', '-')}.md"
    spec.write_text(demo.spec.read_text().replace(f"branch: {demo.branch}", f"branch: {branch}"))
    cmd = [sys.executable, "-m", "orchestrator", "run", str(spec), "--config"]
    cmd.append(str(config(demo, builders)))
    env = os.environ | {"FLOW_CACHE_DIR": str(demo.root / "cache")}
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=demo.repo, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    runs = sorted((demo.repo / ".flow" / "runs").glob("*/run.json"), key=os.path.getmtime)
    outcome = json.loads(runs[-1].read_text()).get("outcome") if runs else None
    if out.returncode != 0:
        raise SystemExit(f"flow run failed ({out.returncode}, {outcome}): {out.stderr[-800:]}")
    return wall


def plain_checkout(demo: DemoPaths) -> float:
    dest = demo.root / "plain"
    start = time.monotonic()
    git(demo.root, "clone", "-q", "--shared", "--no-checkout", str(demo.repo), str(dest))
    git(dest, "checkout", "-q", "--detach", "HEAD")
    wall = time.monotonic() - start
    shutil.rmtree(dest)
    return wall


def sized(files: int, parent: Path) -> DemoPaths:
    demo = prepare_demo(parent)
    grow(demo.repo, files)
    return demo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, nargs="*", default=[1000, 10000, 50000])
    ap.add_argument("--builders", type=int, default=3)
    ap.add_argument("--scale", type=int, default=10000, help="files for N=6 against N=1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flow-bench-co-") as tmp:
        print(f"| files | flow N={args.builders} s | plain checkout s | ratio |")
        print("|---|---|---|---|")
        for files in args.files:
            demo = sized(files, Path(tmp))
            plain = plain_checkout(demo)
            wall = flow_run(demo, args.builders, "flow/bench")
            print(f"| {files} | {wall:.2f} | {plain:.2f} | {wall / plain:.1f}x |", flush=True)
            remove_demo(demo)
        if args.scale:
            demo = sized(args.scale, Path(tmp))
            one = flow_run(demo, 1, "flow/one")
            six = flow_run(demo, 6, "flow/six")
            print(f"\nfiles={args.scale} N=1 {one:.2f}s N=6 {six:.2f}s ratio {six / one:.2f}x")
            remove_demo(demo)


if __name__ == "__main__":
    main()
