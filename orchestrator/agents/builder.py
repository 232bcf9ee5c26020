"""The builder: a tool-calling loop in one worktree, ended by finish() or a limit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from orchestrator.agents.prompts import BUILDER_SYSTEM
from orchestrator.agents.tools import TOOL_SPECS, Submitted, ToolError, Tools
from orchestrator.agents.window import ContextWindow
from orchestrator.llm.messages import Message, ToolCall, ToolSpec
from orchestrator.protocols import ModelDoor
from orchestrator.redact import Redactor


class LimitsExceeded(Exception):
    """The builder used all its turns."""


class FormatError(Exception):
    """The model replied without a tool call; the message is fed back."""


class BuildOutcome(BaseModel):
    summary: str = ""
    tests: list[dict[str, str]] | None = None
    """A tester's submitted tests (name, command)."""
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    models_used: list[str] = Field(default_factory=list)
    metered: bool = True
    """False for an agent CLI on its user's own login: tokens and cost are its own report."""


Progress = Callable[[BuildOutcome, str], None]


class Builder:
    def __init__(
        self,
        door: ModelDoor,
        model: str,
        tools: Tools,
        *,
        max_turns: int,
        transcript: Path,
        redact: Redactor,
        progress: Progress | None = None,
        scope: str = "",
        fallbacks: list[str] | None = None,
        system: str = BUILDER_SYSTEM,
        tool_specs: list[ToolSpec] | None = None,
        stage: str = "build",
        window: ContextWindow | None = None,
    ):
        self.window = window
        self.system = system
        self.tool_specs = TOOL_SPECS if tool_specs is None else tool_specs
        self.stage = stage
        self.scope = scope
        self.fallbacks = list(fallbacks or [])
        self.door, self.model, self.tools = door, model, tools
        self.max_turns = max_turns
        self.transcript = transcript
        self.redact = redact
        self.progress = progress or (lambda outcome, action: None)
        self.messages: list[Message] = []
        self.outcome = BuildOutcome()

    async def run(self, task: str) -> BuildOutcome:
        """Run until finish(); limits and provider failures end the loop with `error` set."""
        self.transcript.parent.mkdir(parents=True, exist_ok=True)
        self.transcript.write_text("", encoding="utf-8")
        self._add(Message.system(self.system))
        self._add(Message.user(task))
        try:
            while True:
                await self.step()
        except Submitted as done:
            self.outcome.summary = done.summary
            self.outcome.tests = done.tests
        except LimitsExceeded:
            self.outcome.error = f"turn limit reached ({self.max_turns} turns)"
        return self.outcome

    async def step(self) -> None:
        if self.outcome.turns >= self.max_turns:
            raise LimitsExceeded
        if self.window is not None:
            await self.window.fit(self.messages, self.tool_specs)
        completion = await self.door.complete(
            self.model,
            self.messages,
            stage=self.stage,
            tools=self.tool_specs,
            scope=self.scope,
            fallbacks=self.fallbacks,
        )
        o = self.outcome
        if completion.model not in o.models_used:
            o.models_used.append(completion.model)
        if completion.model in self.fallbacks:  # stay on the model that answers
            self.fallbacks = self.fallbacks[self.fallbacks.index(completion.model) + 1 :]
            self.model = completion.model
        o.turns += 1
        o.prompt_tokens += completion.usage.prompt_tokens
        o.completion_tokens += completion.usage.completion_tokens
        o.cost_usd += completion.cost_usd
        reply = completion.message
        self._add(reply)
        try:
            if not reply.tool_calls:
                final = self.tool_specs[-1].name
                raise FormatError(
                    f"Reply with tool calls only; call {final} when the work is done."
                )
            for call in reply.tool_calls:
                self.progress(o, f"{call.name}")
                await self._execute(call)
        except FormatError as err:
            self._add(Message.user(str(err)))

    async def _execute(self, call: ToolCall) -> None:
        try:
            result = await self.tools.dispatch(call)
            if self.window is not None:
                result = self.window.tool_result(call, result, self.messages)
        except Submitted:
            self._add(Message.tool(call.id, call.name, "finished"))
            raise
        except ToolError as err:
            result = f"error: {err}"
        except OSError as err:
            result = f"error: {err.strerror or err}"
        self._add(Message.tool(call.id, call.name, result))

    def _add(self, message: Message) -> None:
        self.messages.append(message)
        with self.transcript.open("a", encoding="utf-8") as fh:
            fh.write(self.redact(message.model_dump_json(exclude_defaults=True)) + "\n")
