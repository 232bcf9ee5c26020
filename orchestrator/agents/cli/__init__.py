"""Agent CLIs as builders: each runs in its checkout against its own proxy to flow's door.

The outcome is judged from the exit code, the CLI's JSON events and the proxy's log together
(some CLIs exit 0 after every call failed); money and tokens come from the proxy, never from
the CLI's own report.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from orchestrator import overlay
from orchestrator.agents.builder import BuildOutcome
from orchestrator.agents.cli.aider import Aider
from orchestrator.agents.cli.base import AgentCli, CliRun, Launch, run_cli
from orchestrator.agents.cli.claude import Claude
from orchestrator.agents.cli.codex import Codex
from orchestrator.agents.cli.opencode import OpenCode
from orchestrator.errors import BudgetExceeded
from orchestrator.protocols import ModelDoor
from orchestrator.proxy import Proxy, ProxyLog
from orchestrator.redact import Redactor

CLIS: dict[str, Callable[..., AgentCli]] = {
    "opencode": OpenCode,
    "claude": Claude,
    "codex": Codex,
    "aider": Aider,
}


def parse_events(stdout: bytes) -> list[dict[str, object]]:
    events = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                events.append(value)
    return events


class CliBuilder:
    """`run(task, checkout) -> BuildOutcome`, like flow's own loop; `review(...)` for a
    reviewing CLI. One instance runs one CLI session."""

    def __init__(
        self,
        door: ModelDoor,
        model: str,
        model_id: str,
        cli: AgentCli,
        *,
        transcript: Path,
        redact: Redactor,
        timeout_s: float,
        scope: str,
        stage: str = "build",
        fallbacks: list[str] | None = None,
        progress: Callable[[BuildOutcome, str], None] | None = None,
        login: bool = False,
        scratch: Path | None = None,
    ):
        self.door, self.model, self.model_id, self.cli = door, model, model_id, cli
        self.scratch = scratch
        """Where the private HOME is made: a run's checkout directory, so a run killed
        mid-session leaves none behind (its resume and the dead-run sweep remove it);
        None: the system's temporary directory."""
        self.transcript, self.redact, self.timeout_s = transcript, redact, timeout_s
        self.scope, self.stage, self.fallbacks, self.login = scope, stage, fallbacks, login
        self.progress = progress or (lambda o, a: None)
        self.outcome = BuildOutcome()
        self.log = ProxyLog()
        self.events: list[dict[str, object]] = []

    def _tally(self, log: ProxyLog) -> None:
        o = self.outcome
        o.turns = log.ok_calls
        o.prompt_tokens = sum(c.prompt_tokens for c in log.calls)
        o.completion_tokens = sum(c.completion_tokens for c in log.calls)
        o.cost_usd = sum(c.cost_usd for c in log.calls)
        self.progress(o, f"{self.cli.name} call {len(log.calls)}")

    async def _session(
        self, make: Callable[[Proxy | None, Path], Launch | None], checkout: Path
    ) -> CliRun:
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
        home = Path(tempfile.mkdtemp(prefix=f"flow-{self.cli.name}-home-", dir=self.scratch))
        try:
            if self.login:
                launch = make(None, home)
                if launch is None:
                    raise ValueError(f"{self.cli.name} has no login mode")
                result = await run_cli(
                    launch, checkout, home, None, timeout_s=self.timeout_s, cli=self.cli
                )
            else:
                async with Proxy(
                    self.door,
                    self.model,
                    stage=self.stage,
                    scope=self.scope,
                    fallbacks=self.fallbacks,
                    on_call=self._tally,
                    scratch=self.scratch,
                ) as proxy:
                    launch = make(proxy, home)
                    if launch is None:
                        raise ValueError(f"{self.cli.name} cannot do this")
                    result = await run_cli(
                        launch, checkout, home, proxy, timeout_s=self.timeout_s, cli=self.cli
                    )
                    self.log = proxy.log
        finally:
            shutil.rmtree(home, ignore_errors=True)
        self.events = parse_events(result.stdout)
        self._keep_transcript(result.stdout, result.stderr)
        if self.log.key_refused is not None:
            raise self.log.key_refused  # the run stops for the key, as with flow's own loop
        return result

    async def run(self, task: str, checkout: Path) -> BuildOutcome:
        def make(proxy: Proxy | None, home: Path) -> Launch | None:
            if proxy is None:
                return self.cli.login_launch(task, self.model_id, checkout, home)
            return self.cli.launch(task, proxy, self.model_id, checkout, home)

        result = await self._session(make, checkout)
        self._drop(checkout)
        self.outcome.models_used = [self.model]
        if self.login:
            self._self_reported()
        self.outcome.error = self._verdict(result.exit_code, result.timed_out, self.events)
        if self.outcome.error is None:
            calls = self.outcome.turns if self.login else self.log.ok_calls
            self.outcome.summary = f"{self.cli.name}: {calls} model calls"
        return self.outcome

    async def review(self, task: str, checkout: Path, schema: dict[str, object]) -> object:
        """The CLI's structured review (to validate as flow's own submit_review); raises
        ValueError with the reason when there is none."""

        def make(proxy: Proxy | None, home: Path) -> Launch | None:
            assert proxy is not None, "reviews run through the proxy"
            return self.cli.review(task, proxy, self.model_id, checkout, home, schema)

        result = await self._session(make, checkout)
        if self.log.refused:
            raise BudgetExceeded(f"{self.log.refused}; {self.cli.name} was ended")
        error = self._verdict(result.exit_code, result.timed_out, self.events)
        if error is not None:
            raise ValueError(error)
        got = self.cli.review_result(self.events, result.stdout)
        if got is None:
            raise ValueError(f"{self.cli.name} returned no structured review")
        return got

    def _self_reported(self) -> None:
        said = self.cli.self_reported(self.events)
        o = self.outcome
        o.metered = False
        if said is not None:
            o.prompt_tokens, o.completion_tokens, o.cost_usd = said
            o.turns = max(1, o.turns)
        self.progress(o, f"{self.cli.name} (own login, not metered)")

    def _verdict(
        self, code: int | None, timed_out: bool, events: list[dict[str, object]]
    ) -> str | None:
        log = self.log
        if log.refused:
            return f"BudgetExceeded: {log.refused}; {self.cli.name} was ended"
        if log.gave_up:
            return self.redact(
                f"a model call failed after flow's retries ({log.gave_up}); "
                f"{self.cli.name} was ended"
            )
        if timed_out:
            return f"{self.cli.name} ran past its time limit ({self.timeout_s:g}s)"
        if code != 0:
            return f"{self.cli.name} exited with {code}"
        said = self.cli.failed(events)
        if said:
            return self.redact(f"{self.cli.name} reported an error: {said}")
        if self.login:  # no proxy: the CLI's word is all there is
            return None
        if log.ok_calls == 0:
            return (
                f"{self.cli.name} exited 0 but no model call succeeded ({log.failed_calls} failed)"
            )
        if log.calls and not log.calls[-1].ok:
            return (
                f"{self.cli.name} exited 0 after a failed model call: {log.calls[-1].error[:200]}"
            )
        return None

    def _drop(self, checkout: Path) -> None:
        for pattern in self.cli.droppings:
            for path in overlay.host(checkout).glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _keep_transcript(self, stdout: bytes, stderr: bytes) -> None:
        self.transcript.parent.mkdir(parents=True, exist_ok=True)
        text = stdout.decode("utf-8", "replace")
        tail = stderr.decode("utf-8", "replace")[-4000:]
        if tail.strip():
            text += "\n" + json.dumps({"type": "flow.stderr_tail", "text": tail}) + "\n"
        self.transcript.write_text(self.redact(text), encoding="utf-8")


def cli_for(name: str, command: str | None = None, args: list[str] | None = None) -> AgentCli:
    factory = CLIS[name]
    return factory(command or name, args) if command else factory(extra_args=args)
