"""The command line: the only place that prints or exits."""

from __future__ import annotations

import sys
import traceback
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from orchestrator.errors import FlowError

if TYPE_CHECKING:
    from orchestrator.agent_status import CliStatus
    from orchestrator.layers import Layers
    from orchestrator.protocols import EventSink
    from orchestrator.workspace import Repo

T = TypeVar("T")


class _Argument(typer.core.TyperArgument):
    """An argument shown as NAME (or [NAME]), never as a Python type."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        return str(self.name or "").upper() + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = str(self.name or "").upper() + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


class _Option(typer.core.TyperOption):
    """An option's value shown as click would (TEXT, PATH, INTEGER), flags as nothing."""

    def display_type_rich(self, ctx: Any) -> str | None:
        desc = self.type_descriptor
        if self.metavar or self.is_flag or self.count or desc.annotation is bool:
            return self.metavar
        if desc.is_path:
            return "PATH"
        names = {int: "INTEGER", float: "NUMBER"}
        item = typing.get_args(desc.annotation)[0] if desc.is_list else desc.annotation
        return "PATH" if item is Path else names.get(item, "TEXT")


def _plain(param: Any) -> Any:
    if isinstance(param, typer.core.TyperArgument):
        param.__class__ = _Argument
    elif isinstance(param, typer.core.TyperOption):
        param.__class__ = _Option
    return param


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return [_plain(p) for p in super().get_params(ctx)]


class _Group(typer.core.TyperGroup):
    """Renders every parameter plainly, of every command however it was added (help and
    completion options are made after the commands, so this happens when help is shown)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for sub in self.commands.values():
            if type(sub) is typer.core.TyperCommand:
                sub.__class__ = _Command

    def get_params(self, ctx: Any) -> list[Any]:
        return [_plain(p) for p in super().get_params(ctx)]


app = typer.Typer(
    name="flow",
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn a written spec into a reviewed commit on a new git branch.",
)
config_app = typer.Typer(cls=_Group, help="Inspect the merged configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="agents.yaml (default: agents.yaml at the repository "
        "root, over ~/.config/flow/agents.yaml)",
    ),
]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="a named stage assignment from `profiles:`")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="override one value, e.g. --set budget.per_run_usd=5 (repeatable; applied last)",
    ),
]
RepoOpt = Annotated[
    Path | None, typer.Option("--repo", help="the git repository (default: the current directory)")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="print JSON-lines events instead of the live view")
]
KeepOpt = Annotated[bool, typer.Option("--keep", help="keep the builders' checkouts")]
OntoTipOpt = Annotated[
    bool,
    typer.Option(
        "--onto-tip",
        help="if the base branch moved during the run, commit on its tip, and only if the "
        "winner applies there and the checks pass there (else nothing: needs-you); "
        "overrides `apply: {onto: …}` of the spec and agents.yaml",
    ),
]

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="call no model: print the forecast per stage and model (calls, tokens, expected "
        "and worst-case cost) and whether the budget fits; exit 0 the expected cost fits (the "
        "verdict says whether the worst case does), 1 it does not, 2 refused; "
        "with --json one JSON object",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"flow {version('flow-orchestrator')}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print flow's version and exit"
        ),
    ] = False,
) -> None:
    """Turn a written spec into a reviewed commit on a new git branch."""


def _repo(repo: Path | None) -> Repo:
    from orchestrator.workspace import Repo

    return Repo.open(repo or Path.cwd())


def _layers(
    repository: Repo | None, config: Path | None, profile: str | None, sets: list[str] | None
) -> Layers:
    from orchestrator.layers import Layers

    root = repository.root if repository is not None else None
    return Layers.discover(root, config, profile, sets or [])


def _repo_if_any(repo: Path | None) -> Repo | None:
    """The repository (given or around the current directory); None outside one."""
    from orchestrator.errors import WorkspaceError

    if repo is not None:
        return _repo(repo)
    try:
        return _repo(None)
    except WorkspaceError:
        return None  # only the built-in and user layers apply


def _live(as_json: bool, is_batch: bool, job: Callable[[EventSink], Awaitable[T]]) -> T:
    """Run `job(sink)` to completion under the live view (or the JSON-lines sink)."""
    import asyncio

    from rich.console import Console

    from orchestrator.errors import Interrupted
    from orchestrator.events import BatchStarted, Event, RunStarted
    from orchestrator.ui import BatchView, JsonSink, LiveView

    started: list[str] = []

    class Watch:
        """Passes events on, remembering what could be resumed."""

        def __init__(self, inner: EventSink):
            self.inner = inner

        def emit(self, event: Event) -> None:
            if isinstance(event, BatchStarted):
                started.insert(0, event.batch_id)
            elif isinstance(event, RunStarted) and not is_batch:
                started.append(event.run_id)
            self.inner.emit(event)

    async def go() -> T:
        if as_json:
            return await job(Watch(JsonSink()))
        view = BatchView(Console()) if is_batch else LiveView(Console())
        with view:
            return await job(Watch(view))

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        what = f"; finish it with `flow resume {started[0]}`" if started else ""
        raise Interrupted(f"interrupted, checkouts removed{what}") from None


@app.command()
def validate(
    specs: Annotated[list[Path], typer.Argument(help="spec files or OpenSpec change folders")],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    repo: RepoOpt = None,
    builders: Annotated[
        int | None, typer.Option(min=1, max=32, help="number of builders, as for `flow run`")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(min=0, help="the cap `flow run --budget` would get, USD")
    ] = None,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            help="also run the checks on the base commit: error if one cannot run there, "
            "warning if one already passes",
        ),
    ] = False,
) -> None:
    """Check specs, the merged config and its keys without calling any model."""
    from orchestrator import overlay
    from orchestrator.config import resolve_api_key
    from orchestrator.preflight import preflight, vendor_key
    from orchestrator.spec import load_spec

    overlay.probe_soon()  # for the sandbox line, while the rest is checked
    repository = _repo(repo)
    layers = _layers(repository, config, profile, set_)
    loaded = layers.resolve()
    for path in specs:
        spec = load_spec(path)
        loaded = layers.resolve(spec.models, f"{path}: models")
        # the same checks `flow run` makes before spending
        base_sha = preflight(spec, loaded, repository, builders=builders, budget_usd=budget)
        slots = loaded.builder_slots(builders or spec.builders)
        typer.echo(
            f"ok  {path}: {spec.title!r} → {spec.branch}; {len(slots)} builders, "
            f"{len(spec.checks)} checks, {len(spec.requirements)} requirements"
        )
        if baseline:
            _baseline(spec, loaded, repository, base_sha)
    for model in loaded.models.values():
        resolve_api_key(model)
        vendor_key(model)
    for name in layers.profile_names():
        layers.with_profile(name).resolve()  # every profile must be usable, not only this one
    typer.echo(
        f"ok  {loaded.path or 'config'}: {len(loaded.models)} models, "
        f"{len(loaded.config.stages.reviewers)} reviewers"
    )
    for warning in loaded.tester_warnings():
        typer.echo(f"warning: {warning}")
    if loaded.agent_entries():
        from orchestrator.agent_status import login_warnings, statuses

        for status in statuses(loaded):
            typer.echo(f"agent {status.name}: {status.version} ({status.path}); {_uses(status)}")
        for warning in login_warnings(loaded):
            typer.echo(f"warning: {warning}")
    from orchestrator import sandbox

    typer.echo(("sandbox: " if sandbox.bwrap() else "warning: ") + sandbox.describe())


def _baseline(spec: Any, loaded: Any, repository: Repo, base_sha: str) -> None:
    from orchestrator.baseline import run_baseline
    from orchestrator.errors import SpecError

    results = run_baseline(spec, loaded, repository, base_sha)
    broken = [r for r in results if r.verdict == "cannot run"]
    for r in results:
        if r.verdict != "cannot run":
            prefix = "warning: " if r.verdict == "passes" else "baseline: "
            typer.echo(prefix + r.line(spec, base_sha))
    if broken:
        more = f"\n({len(broken) - 1} more checks cannot run)" if len(broken) > 1 else ""
        raise SpecError(broken[0].line(spec, base_sha) + more)


@app.command()
def init(repo: RepoOpt = None) -> None:
    """Write a commented agents.yaml and specs/example.md (with the detected test command)."""
    from orchestrator.init import detect_test_command, repository_root, write_init

    root = repository_root(repo or Path.cwd())
    written, left = write_init(root)
    for path in written:
        typer.echo(f"wrote {path.relative_to(root)}")
    for path in left:
        typer.echo(f"kept  {path.relative_to(root)} (exists; flow init never overwrites)")
    command = detect_test_command(root)
    typer.echo(f"checks: {command}" if command else "checks: none found; add yours to the spec")
    typer.echo(
        "next: export the key variables agents.yaml names, then `flow validate specs/example.md`"
    )


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="the spec file (or OpenSpec change folder)")],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    repo: RepoOpt = None,
    builders: Annotated[int | None, typer.Option(min=1, max=32, help="number of builders")] = None,
    budget: Annotated[float | None, typer.Option(min=0, help="hard cap for this run, USD")] = None,
    as_json: JsonOpt = False,
    keep: KeepOpt = False,
    onto_tip: OntoTipOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Run one spec end to end: plan, build ×N, check, review, select, commit to a branch."""
    from orchestrator.preflight import preflight
    from orchestrator.spec import load_spec

    repository = _repo(repo)
    parsed = load_spec(spec)
    layers = _layers(repository, config, profile, set_)
    loaded = layers.resolve(parsed.models, f"{spec}: models")
    # user errors before the live view starts
    base = preflight(parsed, loaded, repository, builders=builders, budget_usd=budget)
    if dry_run:
        from orchestrator.forecast import forecast_run
        from orchestrator.forecast_view import render

        found = forecast_run(parsed, loaded, repository, base, builders=builders, budget_usd=budget)
        typer.echo(found.model_dump_json(indent=2) if as_json else render(found), nl=as_json)
        raise typer.Exit(found.exit_code)
    from orchestrator.runner import RunOptions, run_spec

    options = RunOptions(
        builders=builders,
        budget_usd=budget,
        keep_worktrees=keep,
        onto_tip=onto_tip,
        **layers.source(),
    )
    result = _live(as_json, False, lambda sink: run_spec(parsed, loaded, repository, sink, options))
    raise typer.Exit(result.exit_code)


@app.command()
def demo(
    as_json: JsonOpt = False,
    keep: Annotated[
        bool,
        typer.Option("--keep", help="keep the temporary repository (and the builders' checkouts)"),
    ] = False,
) -> None:
    """Run the whole pipeline offline on a bundled example, with scripted models."""
    from orchestrator.demo import prepare_demo, remove_demo

    where = prepare_demo()
    if not as_json:
        typer.echo(f"demo repository: {where.repo}")
    try:
        run(where.spec, config=where.config, repo=where.repo, as_json=as_json, keep=keep)
    except typer.Exit as done:
        if not as_json:
            typer.echo(
                f"inspect it: git -C {where.repo} log --stat {where.branch}"
                if keep
                else f"removed {where.root} (`flow demo --keep` keeps it to inspect)"
            )
        raise typer.Exit(done.exit_code) from None
    finally:
        if not keep:
            remove_demo(where)


@app.command()
def batch(
    specs: Annotated[list[Path], typer.Argument(help="spec files or OpenSpec change folders")],
    budget: Annotated[float, typer.Option(min=0, help="hard cap for the whole batch, USD")],
    per_spec: Annotated[float | None, typer.Option(min=0, help="hard cap per spec, USD")] = None,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="specs run at once")] = 2,
    until: Annotated[
        str | None, typer.Option(help="start no new spec after HH:MM (or an ISO date and time)")
    ] = None,
    builders: Annotated[
        int | None, typer.Option(min=1, max=32, help="number of builders per spec")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    repo: RepoOpt = None,
    as_json: JsonOpt = False,
    new: Annotated[bool, typer.Option("--new", help="start over instead of resuming")] = False,
    onto_tip: OntoTipOpt = False,
    dry_run: DryRunOpt = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="[ADDRESS]",
            help="build and check on a Ray cluster (HOST:PORT or auto); alone: a local Ray",
        ),
    ] = None,
) -> None:
    """Run many specs under one budget; running the same command again resumes it."""
    if ray is not None:  # before anything starts: a missing extra is the user's to fix
        from orchestrator.executors.ray import require_ray

        require_ray(ray)
    repository = _repo(repo)
    layers = _layers(repository, config, profile, set_)
    if dry_run:
        from orchestrator.forecast import forecast_batch
        from orchestrator.forecast_view import render_batch

        found = forecast_batch(
            specs, layers, repository, budget_usd=budget, per_spec_usd=per_spec, builders=builders
        )
        typer.echo(found.model_dump_json(indent=2) if as_json else render_batch(found), nl=as_json)
        raise typer.Exit(found.exit_code)
    from orchestrator.batch import BatchOptions, refuse_early, run_batch

    options = BatchOptions(
        budget_usd=budget,
        per_spec_usd=per_spec,
        parallel=parallel,
        until=until,
        builders=builders,
        new=new,
        onto_tip=onto_tip,
        ray=ray,
        **layers.source(),
    )
    refuse_early(specs, layers, options)  # a past --until, a budget too small: before the view
    result = _live(as_json, True, lambda sink: run_batch(specs, layers, repository, sink, options))
    raise typer.Exit(result.exit_code)


@app.command()
def resume(
    run_id: Annotated[
        str, typer.Argument(help="a run or batch id, a unique prefix of one, or `last`")
    ],
    repo: RepoOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Finish an interrupted run or batch; finished work is not redone or paid for again."""
    from orchestrator.batch import BatchOptions, run_batch
    from orchestrator.runner import RunOptions, run_spec
    from orchestrator.spec import load_spec
    from orchestrator.store import Store
    from orchestrator.workspace import flow_dir

    repository = _repo(repo)
    store = Store(flow_dir(repository) / "ledger.sqlite")
    try:
        run_id = store.resolve(run_id)
        run_rec, batch_rec = store.run(run_id), store.batch(run_id)
        items = store.items(run_id) if batch_rec else []
    finally:
        store.close()
    if batch_rec is not None:
        options = BatchOptions(**{**batch_rec.options, "new": False})
        layers = options.layers(repository.root)
        paths = [Path(i.spec_path) for i in items]
        result = _live(
            as_json,
            True,
            lambda sink: run_batch(paths, layers, repository, sink, options, resume_id=run_id),
        )
        raise typer.Exit(result.exit_code)
    if run_rec is None:
        raise FlowError(f"no run or batch {run_id!r} in {repository.root}; see `flow status`")
    if run_rec.live_status != "interrupted":
        typer.echo(f"run {run_id} is {run_rec.live_status}; nothing to resume")
        raise typer.Exit(0 if run_rec.status == "applied" else 1)
    spec = load_spec(Path(run_rec.spec_path))
    if spec.digest != run_rec.spec_digest:
        raise FlowError(
            f"{run_rec.spec_path}: changed since run {run_id} started; "
            "restore it or start a new run"
        )
    run_options = RunOptions(**run_rec.options)
    loaded = run_options.layers(repository.root).resolve(spec.models)
    res = _live(
        as_json,
        False,
        lambda sink: run_spec(spec, loaded, repository, sink, run_options, run_id=run_id),
    )
    raise typer.Exit(res.exit_code)


@app.command()
def status(
    repo: RepoOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per run or batch, for scripts")
    ] = False,
) -> None:
    """Runs and batches of this repository, live or finished."""
    import json

    from rich.console import Console

    from orchestrator.report import drift_note
    from orchestrator.store import Store
    from orchestrator.ui import status_tables
    from orchestrator.workspace import flow_dir

    repository = _repo(repo)
    fdir = flow_dir(repository)
    store = Store(fdir / "ledger.sqlite")
    try:
        runs, batches = store.runs(limit=30), store.batches(limit=10)
        counts = {b.batch_id: len(store.items(b.batch_id)) for b in batches}
    finally:
        store.close()
    moved = {r.run_id: note for r in runs if (note := drift_note(fdir, r.run_id))}
    if as_json:
        for b in batches:
            typer.echo(json.dumps({"type": "batch", **b.model_dump(), "live": b.live_status}))
        for r in runs:
            record = {"type": "run", **r.model_dump(), "live": r.live_status}
            typer.echo(json.dumps({**record, "base_drift": moved.get(r.run_id)}))
        return
    for table in status_tables(runs, batches, counts):
        Console().print(table)
    for run_id, note in moved.items():
        typer.echo(f"base moved: {run_id}: {note}")
    for r in runs:
        if r.live_status == "needs-you":
            typer.echo(
                f"needs you: {r.run_id} ({r.title}): flow show {r.run_id}; flow pick {r.run_id} N"
            )


@app.command()
def report(
    run_id: Annotated[
        str, typer.Argument(help="a run or batch id, a unique prefix of one, or `last`")
    ],
    repo: RepoOpt = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print raw markdown")] = False,
    open_page: Annotated[
        bool, typer.Option("--open", help="open report.html in the browser ($BROWSER if set)")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="the report as one JSON object, for scripts")
    ] = False,
) -> None:
    """Show the report of a run or a batch (terminal, --markdown, --json, or --open the page)."""
    import json

    from rich.console import Console
    from rich.markdown import Markdown

    from orchestrator.ledger import Ledger
    from orchestrator.report import batch_json, write_batch_report
    from orchestrator.store import Store
    from orchestrator.workspace import flow_dir

    fdir = flow_dir(_repo(repo))
    store, ledger = Store(fdir / "ledger.sqlite"), Ledger(fdir / "ledger.sqlite")
    machine: dict[str, object] | None = None
    try:
        run_id = store.resolve(run_id)
        path = fdir / "runs" / run_id / "report.md"
        if not path.exists():
            if store.batch(run_id) is None:
                raise FlowError(f"no report for {run_id!r} in {fdir}; see `flow status`")
            path = write_batch_report(fdir, run_id, store, ledger)
            machine = batch_json(fdir, run_id, store, ledger) if as_json else None
    finally:
        store.close()
        ledger.close()
    if as_json:
        if machine is None:
            summary = path.with_name("run.json")
            if not summary.is_file():
                raise FlowError(f"run {run_id} has no summary yet ({summary}); see `flow status`")
            machine = {"type": "run", **json.loads(summary.read_text(encoding="utf-8"))}
            machine["report"] = str(path.with_suffix(".html"))
        typer.echo(json.dumps(machine))
        return
    if open_page:
        _open_page(path.with_suffix(".html"))
        return
    text = path.read_text(encoding="utf-8")
    if markdown:
        typer.echo(text, nl=False)
    else:
        Console().print(Markdown(text))


def _open_page(page: Path) -> None:
    """Print the page's path, then hand it to the browser (webbrowser honours $BROWSER)."""
    import webbrowser

    if not page.is_file():
        raise FlowError(f"{page}: no HTML report (the run predates them); see its report.md")
    typer.echo(str(page))
    if not webbrowser.open(page.resolve().as_uri()):
        typer.echo("no browser found; open the path above, or set BROWSER", err=True)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="a run id, a unique prefix of one, or `last`")],
    candidate: Annotated[
        int | None, typer.Argument(help="a candidate's number; without it, all of them")
    ] = None,
    repo: RepoOpt = None,
) -> None:
    """A run's candidates and their evidence, or one candidate's evidence and diff."""
    from orchestrator.pick import RunView, detail, overview
    from orchestrator.store import Store
    from orchestrator.workspace import flow_dir

    fdir = flow_dir(_repo(repo))
    store = Store(fdir / "ledger.sqlite")
    try:
        view = RunView(fdir, store.resolve(run_id, batches=False))
    finally:
        store.close()
    typer.echo(
        overview(view) if candidate is None else detail(view, candidate), nl=candidate is None
    )


@app.command()
def pick(
    run_id: Annotated[str, typer.Argument(help="a run id, a unique prefix of one, or `last`")],
    candidate: Annotated[int, typer.Argument(help="the candidate's number (see `flow show`)")],
    branch: Annotated[
        str | None, typer.Option("--branch", help="commit to this new branch (default: the run's)")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="commit even if its checks failed or its builder did not finish"
        ),
    ] = False,
    repo: RepoOpt = None,
) -> None:
    """Commit a run's candidate N to a new branch, as `apply` would have."""
    from orchestrator.pick import RunView
    from orchestrator.pick import pick as pick_candidate
    from orchestrator.store import Store
    from orchestrator.workspace import flow_dir

    repository = _repo(repo)
    fdir = flow_dir(repository)
    store = Store(fdir / "ledger.sqlite")
    try:
        view = RunView(fdir, store.resolve(run_id, batches=False))
        target, sha = pick_candidate(repository, store, view, candidate, branch=branch, force=force)
    finally:
        store.close()
    typer.echo(f"committed candidate #{candidate} of run {view.run_id} on {target} ({sha[:12]})")


@app.command()
def clean(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="remove only what is older than this (7d, 12h, 30m; 0 for everything)",
        ),
    ] = "7d",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be removed; remove nothing")
    ] = False,
    repo: Annotated[
        Path | None,
        typer.Option("--repo", help="whose runs' files (default: the current repository, if any)"),
    ] = None,
) -> None:
    """Remove old runs' files, dead checkouts and demo directories; never a branch or ref."""
    from orchestrator.clean import age_text, find, parse_age, remove

    age = parse_age(older_than)
    found = find(_repo_if_any(repo), age)
    verb = "would remove" if dry_run else "removed"
    freed = 0
    for item in found.removable:
        if not dry_run:
            remove(item)
        freed += item.size
        typer.echo(f"{verb} {item.path}: {item.what}, {age_text(item.age_s)} old")
    for why in found.kept:
        typer.echo(f"kept  {why}")
    typer.echo(f"{verb} {len(found.removable)} ({freed / 1e6:.1f} MB); older than {older_than}")


@config_app.command("show")
def config_show(
    spec: Annotated[Path | None, typer.Argument(help="also apply this spec's `models:`")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    repo: RepoOpt = None,
) -> None:
    """Print the merged configuration, each value with the layer it came from."""
    from orchestrator.spec import load_spec

    layers = _layers(_repo_if_any(repo), config, profile, set_)
    models = load_spec(spec).models if spec is not None else None
    rows = [(f"{key} = {value}", source) for key, value, source in layers.show(models)]
    width = max(len(left) for left, _ in rows)
    for left, source in rows:
        typer.echo(f"{left.ljust(width)}  # {source}")


@app.command()
def models(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    repo: RepoOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="one JSON object per line: each model (kind: model), then each agent CLI "
            "(kind: agent)",
        ),
    ] = False,
) -> None:
    """The merged model catalog: provider, protocol, prices, limits, and warnings."""
    import json

    from rich.console import Console

    from orchestrator.catalog_view import agents_table, catalog_rows, catalog_table

    layers = _layers(_repo_if_any(repo), config, profile, set_)
    loaded = layers.resolve()
    rows = catalog_rows(loaded)
    from orchestrator.agent_status import statuses
    from orchestrator.config import AGENT_CLIS

    clis = statuses(loaded, list(AGENT_CLIS))
    if as_json:
        for row in rows:
            typer.echo(json.dumps({"kind": "model", **row.model_dump()}))
        for status in clis:
            typer.echo(json.dumps({"kind": "agent", "agent": status.name, **_agent_json(status)}))
        return
    console = Console(width=max(120, Console().width))
    console.print(catalog_table(rows))
    for row in rows:
        for warning in row.warnings:
            console.print(f"[yellow]warning[/]: {row.name}: {warning}")
    console.print(agents_table(clis))
    for status in clis:
        if status.used_by and status.problem:
            console.print(f"[red]cannot run[/]: {', '.join(status.used_by)}: {status.problem}")


def _uses(status: CliStatus) -> str:
    return "used by " + ", ".join(status.used_by) if status.used_by else "not used"


def _agent_json(status: CliStatus) -> dict[str, object]:
    return {
        "command": status.command,
        "path": status.path,
        "version": status.version,
        "used_by": status.used_by,
        "problem": status.problem,
    }


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: tasks cancelled, checkouts removed


def _usage_error() -> type[Exception]:
    """Click's UsageError as typer uses it (typer vendors its own click)."""
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "UsageError" and issubclass(cls, Exception):
            return cls
    return typer.BadParameter


def _bare_ray(argv: list[str]) -> list[str]:
    """`--ray` takes an optional address (click options cannot): alone, or before something
    that is no address (a spec, an option), it means a local Ray instance."""
    import re

    address = re.compile(r"^(auto|local|ray://\S+|[\w.\-]+:\d+)$")
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray" and (i + 1 == len(out) or not address.match(out[i + 1])):
            out[i] = "--ray=local"
    return out


def main() -> None:
    import signal

    sys.argv = _bare_ray(sys.argv)
    debug = "--debug" in sys.argv
    signal.signal(signal.SIGTERM, _terminate)
    usage_error = _usage_error()
    try:
        code = app(standalone_mode=False, prog_name="flow")
    except usage_error as err:
        ctx: Any = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":
            sys.exit(0)  # click has printed the help already
        where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        typer.echo(f"flow: {message.rstrip('.')}{where}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("flow: interrupted; `flow status` lists what can be resumed", err=True)
        sys.exit(130)
    except FlowError as err:
        if debug:
            traceback.print_exc()
        typer.echo(f"flow: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("flow: interrupted; `flow status` lists what can be resumed", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
