"""The command line: the only place that prints or exits."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

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


@app.command()
def batch(
    specs: Annotated[list[Path], typer.Argument(help="spec files or OpenSpec change folders")],
    budget: Annotated[float, typer.Option(min=0, help="hard cap for the whole batch, USD")],
    per_spec: Annotated[float | None, typer.Option(min=0, help="hard cap per spec, USD")] = None,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="specs run at once")] = 2,
    until: Annotated[str | None, typer.Option(help="start no new spec after HH:MM")] = None,
    builders: Annotated[int | None, typer.Option(min=1, max=32)] = None,
    config: ConfigOpt = None,
    repo: RepoOpt = None,
    as_json: JsonOpt = False,
    new: Annotated[bool, typer.Option("--new", help="start over instead of resuming")] = False,
) -> None:
    """Run many specs under one budget; running the same command again resumes it."""
    import asyncio

    from orchestrator.batch import BatchOptions, run_batch
    from orchestrator.config import load_config
    from orchestrator.workspace import Repo

    repository = Repo.open(repo or Path.cwd())
    loaded = load_config(_config_path(config, repository.root))
    options = BatchOptions(
        budget_usd=budget,
        per_spec_usd=per_spec,
        parallel=parallel,
        until=until,
        builders=builders,
        new=new,
    )
    result = asyncio.run(
        _with_view(as_json, True, lambda sink: run_batch(specs, loaded, repository, sink, options))
    )
    raise typer.Exit(result.exit_code)


def _with_view(as_json: bool, is_batch: bool, job: Any) -> Any:
    """Run `job(sink)` under the live view (or the JSON-lines sink)."""
    from rich.console import Console

    from orchestrator.ui import BatchView, JsonSink, LiveView

    async def go() -> Any:
        if as_json:
            return await job(JsonSink())
        view = BatchView(Console()) if is_batch else LiveView(Console())
        with view:
            return await job(view)

    return go()


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="a run id or a batch id (see `flow status`)")],
    repo: RepoOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Finish an interrupted run or batch; finished work is not redone or paid for again."""
    import asyncio

    from orchestrator.batch import BatchOptions, run_batch
    from orchestrator.config import load_config
    from orchestrator.runner import RunOptions, flow_dir, run_spec
    from orchestrator.spec import load_spec
    from orchestrator.store import Store
    from orchestrator.workspace import Repo

    repository = Repo.open(repo or Path.cwd())
    store = Store(flow_dir(repository) / "ledger.sqlite")
    try:
        run_rec, batch_rec = store.run(run_id), store.batch(run_id)
        items = store.items(run_id) if batch_rec else []
    finally:
        store.close()
    if batch_rec is not None:
        if not batch_rec.config_path:
            raise FlowError(f"batch {run_id} has no recorded config; run `flow batch` again")
        loaded = load_config(Path(batch_rec.config_path))
        options = BatchOptions(**{**batch_rec.options, "new": False})
        paths = [Path(i.spec_path) for i in items]
        result = asyncio.run(
            _with_view(
                as_json,
                True,
                lambda sink: run_batch(paths, loaded, repository, sink, options, resume_id=run_id),
            )
        )
        raise typer.Exit(result.exit_code)
    if run_rec is None:
        raise FlowError(f"no run or batch {run_id!r} in {repository.root}; see `flow status`")
    if run_rec.status != "running" and run_rec.live_status != "interrupted":
        typer.echo(f"run {run_id} already finished: {run_rec.status}")
        raise typer.Exit(0 if run_rec.status == "applied" else 1)
    spec = load_spec(Path(run_rec.spec_path))
    if spec.digest != run_rec.spec_digest:
        raise FlowError(
            f"{run_rec.spec_path}: changed since run {run_id} started; "
            "restore it or start a new run"
        )
    if not run_rec.config_path:
        raise FlowError(f"run {run_id} has no recorded config; start a new run")
    loaded = load_config(Path(run_rec.config_path))
    run_options = RunOptions(**run_rec.options)
    res = asyncio.run(
        _with_view(
            as_json,
            False,
            lambda sink: run_spec(spec, loaded, repository, sink, run_options, run_id=run_id),
        )
    )
    raise typer.Exit(res.exit_code)


@app.command()
def status(repo: RepoOpt = None, as_json: JsonOpt = False) -> None:
    """Runs and batches of this repository, live or finished."""
    import json

    from rich.console import Console

    from orchestrator.runner import flow_dir
    from orchestrator.store import Store
    from orchestrator.ui import status_tables
    from orchestrator.workspace import Repo

    repository = Repo.open(repo or Path.cwd())
    store = Store(flow_dir(repository) / "ledger.sqlite")
    try:
        runs, batches = store.runs(limit=30), store.batches(limit=10)
        counts = {b.batch_id: len(store.items(b.batch_id)) for b in batches}
    finally:
        store.close()
    if as_json:
        for b in batches:
            typer.echo(json.dumps({"type": "batch", **b.model_dump(), "live": b.live_status}))
        for r in runs:
            typer.echo(json.dumps({"type": "run", **r.model_dump(), "live": r.live_status}))
        return
    for table in status_tables(runs, batches, counts):
        Console().print(table)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="a run id or a batch id")],
    repo: RepoOpt = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print raw markdown")] = False,
) -> None:
    """Show the report of a run or a batch (terminal, or --markdown)."""
    from rich.console import Console
    from rich.markdown import Markdown

    from orchestrator.ledger import Ledger
    from orchestrator.report import write_batch_report
    from orchestrator.runner import flow_dir
    from orchestrator.store import Store
    from orchestrator.workspace import Repo

    repository = Repo.open(repo or Path.cwd())
    fdir = flow_dir(repository)
    path = fdir / "runs" / run_id / "report.md"
    if not path.exists():
        store, ledger = Store(fdir / "ledger.sqlite"), Ledger(fdir / "ledger.sqlite")
        try:
            if store.batch(run_id) is None:
                raise FlowError(f"no report for {run_id!r} in {fdir}; see `flow status`")
            path = write_batch_report(fdir, run_id, store, ledger)
        finally:
            store.close()
            ledger.close()
    text = path.read_text(encoding="utf-8")
    if markdown:
        typer.echo(text, nl=False)
    else:
        Console().print(Markdown(text))


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
