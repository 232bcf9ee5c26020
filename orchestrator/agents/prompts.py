"""Prompts for the planner, builders and reviewers; snapshot-tested so they do not drift."""

from __future__ import annotations

from orchestrator.llm.messages import ToolSpec
from orchestrator.state import CheckResult, HeldOutResult, Plan

PLANNER_SYSTEM = """\
You are the planner of a small software team. Read the spec and the repository overview,
then call submit_plan once with: a one-paragraph summary, ordered implementation steps,
the files likely to be touched, and acceptance criteria a reviewer can verify.
Do not write code."""

BUILDER_SYSTEM = """\
You are a careful software engineer working in a git checkout of the repository.
Implement the spec using the tools. Paths are relative to the repository root.
Read before you write, keep the change minimal and focused, follow the project's style,
and run the spec's checks with `run` before finishing. When the work is done, call
finish with a short summary of what you changed. Do not commit; the diff of the
checkout is your answer."""

REVIEWER_SYSTEM = """\
You review a candidate change against its spec. You see the spec, the plan, the diff
and the results of the spec's checks. Judge correctness against the requirements and
scenarios first, then scope (no unrelated changes), then code quality. Call
submit_review once: score 0-10, verdict approve or reject, a short summary, and
concrete findings."""

TESTER_SYSTEM = """\
You write acceptance tests for a change that another engineer will make, in a git checkout
of the repository before the change. Turn the spec's requirements and scenarios into
executable tests in the repository's own test framework and style, in new test files.
Do not implement the change and do not edit existing non-test code: the tests must describe
the behaviour the spec asks for, so tests of new behaviour fail now. Run them with `run`
to make sure they execute (a failing assertion is expected; an import or syntax error in
the test itself is not). Finish with submit_tests: one shell command per test that runs
exactly that test from the repository root."""

SUBMIT_PLAN = ToolSpec(
    name="submit_plan",
    description="Submit the implementation plan.",
    parameters={
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "string"}},
            "files": {"type": "array", "items": {"type": "string"}},
            "acceptance": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["summary", "steps"],
    },
)

SUBMIT_REVIEW = ToolSpec(
    name="submit_review",
    description="Submit your review of the candidate change.",
    parameters={
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "verdict": {"type": "string", "enum": ["approve", "reject"]},
            "summary": {"type": "string"},
            "findings": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["score", "verdict", "summary"],
    },
)

MAX_DIFF_CHARS = 60_000


MAX_OVERVIEW_FILES = 300


def repo_overview(names: list[str]) -> str:
    """A compact view of the repository for the planner: its file list, capped."""
    shown = names[:MAX_OVERVIEW_FILES]
    more = f"\n[… {len(names) - len(shown)} more files]" if len(names) > len(shown) else ""
    return "Files:\n" + "\n".join(shown) + more


def plan_request(spec_text: str, overview: str) -> str:
    return f"# Spec\n\n{spec_text.strip()}\n\n# Repository overview\n\n{overview.strip()}\n"


def _format_plan(plan: Plan) -> str:
    lines = [plan.summary.strip(), ""]
    lines += [f"{i}. {step}" for i, step in enumerate(plan.steps, 1)]
    if plan.files:
        lines += ["", "Files likely touched: " + ", ".join(plan.files)]
    if plan.acceptance:
        lines += ["", "Acceptance:"] + [f"- {a}" for a in plan.acceptance]
    return "\n".join(lines).strip()


def build_request(spec_text: str, plan: Plan, checks: list[str]) -> str:
    check_text = "\n".join(f"- `{c}`" for c in checks) or "- (the spec names no checks)"
    return (
        f"# Spec\n\n{spec_text.strip()}\n\n# Plan\n\n{_format_plan(plan)}\n\n"
        f"# Checks that must pass\n\n{check_text}\n"
    )


def tester_request(spec_text: str, plan: Plan) -> str:
    return (
        f"# Spec\n\n{spec_text.strip()}\n\n# The implementer's plan\n\n{_format_plan(plan)}\n\n"
        "Write the acceptance tests now; the change itself does not exist yet.\n"
    )


def _format_heldout(results: list[HeldOutResult]) -> str:
    if not results:
        return ""
    lines = "\n".join(f"- {'PASS' if r.passed else 'FAIL'} {r.name}" for r in results)
    return (
        "\n# Held-out acceptance tests\n\n"
        "Written from the spec by another model; the builder never saw them.\n\n"
        f"{lines}\n"
    )


def _format_checks(results: list[CheckResult]) -> str:
    if not results:
        return "(the spec names no checks)"
    parts = []
    for r in results:
        state = (
            "PASSED"
            if r.passed
            else ("TIMED OUT" if r.timed_out else f"FAILED (exit {r.exit_code})")
        )
        parts.append(f"## `{r.command}`: {state}\n```\n{r.output_tail[-3000:]}\n```")
    return "\n\n".join(parts)


def review_request(
    spec_text: str,
    plan: Plan,
    diff: str,
    checks: list[CheckResult],
    protected: list[str] | None = None,
    heldout: list[HeldOutResult] | None = None,
) -> str:
    if len(diff) > MAX_DIFF_CHARS:
        diff = (
            diff[:MAX_DIFF_CHARS]
            + f"\n[… diff truncated, {len(diff) - MAX_DIFF_CHARS} chars omitted]"
        )
    return (
        f"# Spec\n\n{spec_text.strip()}\n\n# Plan\n\n{_format_plan(plan)}\n\n"
        f"# Candidate diff\n\n```diff\n{diff}\n```\n\n# Check results\n\n{_format_checks(checks)}\n"
        + _format_protected(protected or [])
        + _format_heldout(heldout or [])
    )


def _format_protected(paths: list[str]) -> str:
    if not paths:
        return ""
    listed = "\n".join(f"- `{p}`" for p in paths)
    return (
        "\n# Protected files the builder also changed\n\n"
        "These changes were dropped: they are not in the diff above, the checks ran without "
        "them and they will not be committed. Weigh that the builder tried to change what "
        f"its checks test.\n\n{listed}\n"
    )
