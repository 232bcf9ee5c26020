"""The command line: the only place that prints or exits."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.errors import FlowError

app = typer.Typer(
    name="flow",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn a written spec into a reviewed commit on a new git branch.",
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="agents.yaml to use (default: agents.yaml at the repository root)"
    ),
]
RepoOpt = Annotated[
    Path | None, typer.Option("--repo", help="the git repository (default: the current directory)")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="print JSON-lines events instead of the live view")
]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    """Turn a written spec into a reviewed commit on a new git branch."""


def _config_path(config: Path | None, repo_root: Path) -> Path:
    return config if config is not None else repo_root / "agents.yaml"


@app.command()
def validate(
    specs: Annotated[list[Path], typer.Argument(help="spec files or OpenSpec change folders")],
    config: ConfigOpt = None,
    repo: RepoOpt = None,
) -> None:
    """Check specs and the config without calling any model."""
    from orchestrator.config import load_config, resolve_api_key
    from orchestrator.spec import load_spec
    from orchestrator.workspace import Repo

    repository = Repo.open(repo or Path.cwd())
    loaded = load_config(_config_path(config, repository.root))
    for model in loaded.models.values():
        resolve_api_key(model)
    for path in specs:
        spec = load_spec(path)
        repository.resolve(spec.base or "HEAD")
        slots = loaded.builder_slots(spec.builders)
        typer.echo(
            f"ok  {path}: {spec.title!r} → {spec.branch}; {len(slots)} builders, "
            f"{len(spec.checks)} checks, {len(spec.requirements)} requirements"
        )
    typer.echo(
        f"ok  {loaded.path}: {len(loaded.models)} models, "
        f"{len(loaded.config.stages.reviewers)} reviewers"
    )


def _execute(
    spec_path: Path,
    config: Path | None,
    repo: Path | None,
    *,
    builders: int | None,
    budget: float | None,
    as_json: bool,
    keep: bool,
) -> int:
    import asyncio

    from rich.console import Console

    from orchestrator.config import load_config
    from orchestrator.runner import RunOptions, run_spec
    from orchestrator.spec import load_spec
    from orchestrator.ui import JsonSink, LiveView
    from orchestrator.workspace import Repo

    repository = Repo.open(repo or Path.cwd())
    spec = load_spec(spec_path)
    loaded = load_config(_config_path(config, repository.root))
    options = RunOptions(builders=builders, budget_usd=budget, keep_worktrees=keep)
    if as_json:
        result = asyncio.run(run_spec(spec, loaded, repository, JsonSink(), options))
    else:
        with LiveView(Console(stderr=False)) as view:
            result = asyncio.run(run_spec(spec, loaded, repository, view, options))
    return result.exit_code


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="the spec file (or OpenSpec change folder)")],
    config: ConfigOpt = None,
    repo: RepoOpt = None,
    builders: Annotated[int | None, typer.Option(min=1, max=32, help="number of builders")] = None,
    budget: Annotated[float | None, typer.Option(min=0, help="hard cap for this run, USD")] = None,
    as_json: JsonOpt = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the worktrees")] = False,
) -> None:
    """Run one spec end to end: plan, build ×N, check, review, select, commit to a branch."""
    raise typer.Exit(
        _execute(spec, config, repo, builders=builders, budget=budget, as_json=as_json, keep=keep)
    )


@app.command()
def demo(
    as_json: JsonOpt = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the worktrees")] = False,
) -> None:
    """Run the whole pipeline offline on a bundled example, with scripted models."""
    from orchestrator.demo import prepare_demo

    where = prepare_demo()
    if not as_json:
        typer.echo(f"demo repository: {where.repo}")
    code = _execute(
        where.spec, where.config, where.repo, builders=None, budget=None, as_json=as_json, keep=keep
    )
    if not as_json:
        typer.echo(f"inspect it: git -C {where.repo} log --stat {where.branch}")
    raise typer.Exit(0 if code == 0 else code)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app()
    except FlowError as err:
        if debug:
            traceback.print_exc()
        typer.echo(f"flow: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("flow: interrupted", err=True)
        sys.exit(130)
