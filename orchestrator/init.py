"""`flow init`: a commented agents.yaml and an example spec, with the repository's test command."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from orchestrator.errors import FlowError
from orchestrator.layers import BUILTIN

_PYTEST_HINTS = ("pytest.ini", "conftest.py", "tests/conftest.py")
_PYTHON_MANIFESTS = ("pyproject.toml", "setup.cfg", "tox.ini", "setup.py", "requirements-dev.txt")


def _mentions(root: Path, names: tuple[str, ...], word: str) -> bool:
    for name in names:
        path = root / name
        if path.is_file() and word in path.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def _node_command(root: Path) -> str | None:
    try:
        package = json.loads((root / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    scripts = package.get("scripts") if isinstance(package, dict) else None
    if not isinstance(scripts, dict) or "test" not in scripts:
        return None
    if (root / "pnpm-lock.yaml").is_file():
        return "pnpm test"
    if (root / "yarn.lock").is_file():
        return "yarn test"
    return "npm test"


def _python_command(root: Path) -> str | None:
    if any((root / n).is_file() for n in _PYTEST_HINTS) or _mentions(
        root, _PYTHON_MANIFESTS, "pytest"
    ):
        return "python -m pytest -q"
    if any(root.glob("test*.py")) or any(root.glob("tests/test*.py")):
        return "python -m unittest discover -q" + (" -s tests" if (root / "tests").is_dir() else "")
    return None


def _make_command(root: Path) -> str | None:
    path = root / "Makefile"
    if path.is_file() and re.search(r"^test\s*:", path.read_text(errors="replace"), re.M):
        return "make test"
    return None


def detect_test_command(root: Path) -> str | None:
    """The repository's test command, judged from its files (None when nothing says)."""
    if (root / "Cargo.toml").is_file():
        return "cargo test"
    if (root / "go.mod").is_file():
        return "go test ./..."
    return _node_command(root) or _python_command(root) or _make_command(root)


def _providers_comment() -> str:
    lines = [
        "# Built-in providers (`provider: NAME`), each with the variable its key is read from:"
    ]
    for name, entry in BUILTIN["providers"].items():
        lines.append(f"#   {name:<11} {entry['api_key']:<20} {entry['base_url']}")
    lines.append("# Redefine one under `providers:` to change its URL (e.g. a China-region plan).")
    return "\n".join(lines)


AGENTS_YAML = """\
# flow's per-stage model routing (written by `flow init`; adjust freely).
# `flow validate specs/example.md` checks it without calling any model.
# `api_key` names an environment variable, never the key itself.
{providers}
models:
  deepseek:                        # cheap and capable: plans, builds and reviews
    provider: deepseek
    id: deepseek-chat
    price: {{input: 0.28, output: 0.42}}   # USD per million tokens; check the vendor's page
    max_output_tokens: 8192
  glm:                             # GLM Coding Plan: flat rate, so an explicit zero price
    provider: zhipu
    id: glm-4.6
    price: {{input: 0, output: 0}}
    max_output_tokens: 16384
  kimi:
    provider: moonshot
    id: kimi-k2-0905-preview
    price: {{input: 0.6, output: 2.5}}
    max_output_tokens: 16384
  # A litellm model string needs no provider and is priced by litellm, e.g.:
  # sonnet: {{id: anthropic/claude-sonnet-4-5}}      # reads ANTHROPIC_API_KEY
  # gpt:    {{id: gpt-5}}                            # reads OPENAI_API_KEY
stages:
  planner:   {{model: deepseek}}
  builders:  [{{model: glm, count: 2}}, {{model: deepseek}}]
  # Reviewers never review their own family (here: the provider), so a glm candidate is
  # reviewed by kimi and deepseek, a deepseek candidate by kimi.
  reviewers: [{{model: kimi}}, {{model: deepseek}}]
budget:
  per_run_usd: 2.0                 # hard cap per `flow run`; `--budget` overrides it
"""

EXAMPLE_SPEC = """\
---
title: Example change written by flow init
{checks}
---
# Example change written by flow init

Describe the change: what, why, and the constraints a reviewer should hold it to.
Then `flow validate specs/example.md` and `flow run specs/example.md`.

## Requirements
### Requirement: Describe one behaviour
The project SHALL do the thing this spec asks for.

#### Scenario: the usual case
- WHEN a user does the usual thing
- THEN the observable outcome follows
"""


def init_files(root: Path) -> dict[Path, str]:
    """The files `flow init` writes at a repository root, and their contents."""
    command = detect_test_command(root)
    checks = (
        f"checks:                          # must pass in each candidate's checkout\n  - {command}"
        if command
        else "checks: []                       # no test command found: add yours here"
    )
    return {
        root / "agents.yaml": AGENTS_YAML.format(providers=_providers_comment()),
        root / "specs" / "example.md": EXAMPLE_SPEC.format(checks=checks),
    }


def repository_root(where: Path) -> Path:
    """The work tree's top directory (a repository without commits is fine here)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=where,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as err:
        raise FlowError(f"{where}: cannot run git ({err.strerror})") from None
    if out.returncode != 0:
        raise FlowError(
            f"{where} is not inside a git repository; run `git init` there or pass --repo"
        )
    return Path(out.stdout.strip())


def write_init(root: Path) -> tuple[list[Path], list[Path]]:
    """Write each file that does not exist yet; never overwrite. Returns (written, left)."""
    written, left = [], []
    for path, text in init_files(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("x", encoding="utf-8") as out:  # "x": an existing file is kept
                out.write(text)
        except FileExistsError:
            left.append(path)
            continue
        written.append(path)
    if not written:
        names = " and ".join(str(p.relative_to(root)) for p in left)
        raise FlowError(f"{names} already exist; flow init never overwrites (move them away)")
    return written, left
