"""The demo's scripted reviewers: functions of the conversation, scoring from the evidence."""

from __future__ import annotations

import json

from orchestrator.llm.messages import Message, ToolCall


def _evidence(messages: list[Message]) -> tuple[bool, int]:
    text = "\n".join(m.content or "" for m in messages if m.role == "user")
    checks_section = text.split("# Check results", 1)[-1]
    passed = "FAILED" not in checks_section and "TIMED OUT" not in checks_section
    diff = text.split("```diff", 1)[-1].split("```", 1)[0]
    changed = sum(
        1 for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )
    return passed, changed


def _review(score: float, verdict: str, summary: str, findings: list[str]) -> Message:
    args = {"score": score, "verdict": verdict, "summary": summary, "findings": findings}
    return Message(
        role="assistant",
        tool_calls=[ToolCall(id="call_review", name="submit_review", arguments=json.dumps(args))],
    )


def strict_reviewer(messages: list[Message], tools: object, tool_choice: object) -> Message:
    passed, changed = _evidence(messages)
    if not passed:
        return _review(
            2, "reject", "The checks fail, so the requirements are not met.", ["Unit tests fail."]
        )
    score = 8.5 if changed < 40 else 7.0
    return _review(
        score,
        "approve",
        "Correct, small and in the existing style.",
        ["Consider a docstring example."],
    )


def lenient_reviewer(messages: list[Message], tools: object, tool_choice: object) -> Message:
    passed, _ = _evidence(messages)
    if not passed:
        return _review(4, "reject", "Tests fail.", [])
    return _review(9, "approve", "Meets every scenario of the spec.", [])
