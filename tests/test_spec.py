"""Spec parsing and validation, on real files."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import branch_name_problem, load_spec, parse_spec, slugify

REPO = Path(__file__).resolve().parent.parent

FULL = """\
---
title: Add a --json flag to the report command   # default: first heading
checks:                                          # must pass in the candidate's worktree
  - python -m pytest -q tests/test_report.py
base: main                                       # default: HEAD
branch: flow/report-json                         # default: flow/<slug of title>
builders: 3                                      # optional override
---
# Add a --json flag to the report command
Free text: context, motivation, constraints.
## Requirements
### Requirement: JSON output
The report command SHALL print JSON when `--json` is given.
#### Scenario: plain run
- WHEN `report --json` runs
- THEN stdout parses as JSON with the keys `total` and `items`
"""


def write(tmp_path: Path, text: str, name: str = "spec.md") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def spec_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_full_example_from_the_design(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, FULL))
    assert spec.title == "Add a --json flag to the report command"
    assert spec.slug == "add-a-json-flag-to-the-report-command"
    assert spec.checks == ["python -m pytest -q tests/test_report.py"]
    assert spec.base == "main"
    assert spec.branch == "flow/report-json"
    assert spec.builders == 3
    assert spec.path == tmp_path / "spec.md"
    assert spec.body.startswith("# Add a --json flag to the report command\nFree text:")
    assert "---" not in spec.body and "builders" not in spec.body
    [req] = spec.requirements
    assert (req.name, req.line) == ("JSON output", 12)
    assert req.text == "The report command SHALL print JSON when `--json` is given."
    [scn] = req.scenarios
    assert (scn.name, scn.line) == ("plain run", 14)
    assert scn.when == ["`report --json` runs"]
    assert scn.then == ["stdout parses as JSON with the keys `total` and `items`"]


def test_defaults_without_front_matter(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "\n## Make the Widget faster!\n\nIt is slow.\n"))
    assert spec.title == "Make the Widget faster!"
    assert spec.slug == "make-the-widget-faster"
    assert spec.branch == "flow/make-the-widget-faster"
    assert spec.base is None
    assert spec.checks == []
    assert spec.builders is None
    assert spec.requirements == []
    assert spec.body == "## Make the Widget faster!\n\nIt is slow."


def test_title_in_front_matter_wins_and_code_blocks_are_not_headings(tmp_path: Path) -> None:
    text = "---\ntitle: '  Real   title '\n---\n```sh\n# not a heading\n```\n# Heading\n"
    assert load_spec(write(tmp_path, text)).title == "Real title"
    text = "Intro.\n```sh\n# not a heading\n```\n# Heading  ##\n"
    assert load_spec(write(tmp_path, text)).title == "Heading"


def test_checks_as_a_single_string_and_empty_values_mean_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "---\nchecks: make test\nbase:\nbranch:\n---\n# T\n"))
    assert spec.checks == ["make test"]
    assert spec.base is None
    assert spec.branch == "flow/t"
    spec = load_spec(write(tmp_path, "---\nchecks:\n---\n# T\n"))
    assert spec.checks == []


def test_title_only_spec_is_accepted(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "---\ntitle: Bump the version\n---\n"))
    assert (spec.title, spec.body) == ("Bump the version", "")


@pytest.mark.parametrize(
    ("text", "line", "needles"),
    [
        ("---\ntitle: x\n# T\n", 1, ["front matter is not closed", "'---'"]),
        ("---\ntitle: ok\nbase: main\nbranch: a: b\n---\n# T\n", 4, ["not valid YAML"]),
        ("---\ntitle: ok\nbase: main\ncheckz: make\n---\n# T\n", 4, ["checkz", "'checks'"]),
        ("---\nbuilder: 2\n---\n# T\n", 2, ["builder:", "'builders'"]),
        ("---\nfoo: 1\n---\n# T\n", 2, ["foo:", "allowed keys: title, checks"]),
        ("---\ntitle: a\n1: x\n---\n", 3, ["1: unknown key; remove it"]),
        ("---\n\nbuilders: many\n---\n# T\n", 3, ["builders: expected an integer from 1 to 32"]),
        ("---\nbuilders: 33\n---\n# T\n", 2, ["builders: expected an integer from 1 to 32"]),
        ("---\nbuilders: true\n---\n# T\n", 2, ["builders: expected an integer"]),
        ("---\nbuilders: 2.5\n---\n# T\n", 2, ["builders: expected an integer"]),
        ("---\n- a\n- b\n---\n# T\n", 2, ["front matter must be", "not a list"]),
        ("---\njust words\n---\n# T\n", 2, ["front matter must be", "not a str"]),
        ("---\ntitle: 12\n---\n# T\n", 2, ["title: expected text"]),
        ("---\ntitle: ''\n---\n# T\n", 2, ["title:", "empty"]),
        ("---\ntitle: a\nchecks: [ok, '  ']\n---\n", 3, ["checks: command 2 is empty"]),
        ("---\nchecks: {a: 1}\n---\n# T\n", 2, ["checks: expected a shell command"]),
        ("---\nchecks: [1]\n---\n# T\n", 2, ["checks: expected a shell command"]),
        ("---\nbase: --exec=x\n---\n# T\n", 2, ["base:", "not a git revision"]),
        ("---\nbase: 2024\n---\n# T\n", 2, ["base: expected a git revision"]),
        ("---\nbranch: my branch\n---\n# T\n", 2, ["branch:", "not a valid git branch name"]),
        ("---\nbranch: flow/x.lock\n---\n# T\n", 2, ["branch:", ".lock"]),
        ("---\ntitle: a\ntitle: b\n---\n", 3, ["title: duplicate key (first at line 2)"]),
        ("", 1, ["spec is empty"]),
        ("---\nchecks: make\n---\n\n", 1, ["spec is empty"]),
        ("---\nbase: main\n---\nNo heading here.\n", 4, ["title:", "front matter", "# Heading"]),
    ],
)
def test_front_matter_errors_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, needles: list[str]
) -> None:
    path = write(tmp_path, text)
    message = spec_error(path)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message, message
    assert len(message.splitlines()) <= 2


def test_yaml_error_line_is_mapped_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "---\ntitle: ok\nchecks:\n  - a\n\t- b\n---\n# T\n")
    assert spec_error(path).startswith(f"{path}:5: front matter is not valid YAML")


def test_first_problem_in_file_order_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "---\nbuilders: 0\nbranch: 'a..b'\n---\n# T\n")
    assert spec_error(path).startswith(f"{path}:2: builders:")


def test_missing_and_non_utf8_files_have_no_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    assert re.match(rf"^{re.escape(str(missing))}: not found", spec_error(missing))
    latin = tmp_path / "latin.md"
    latin.write_bytes("# Café\n".encode("latin-1"))
    message = spec_error(latin)
    assert message.startswith(f"{latin}: not UTF-8")
    assert not message.startswith(f"{latin}:1")


@pytest.mark.parametrize(
    ("title", "slug"),
    [
        ("Add a --json flag", "add-a-json-flag"),
        ("Café déjà vu", "cafe-deja-vu"),
        ("  ...Hello,   World!!  ", "hello-world"),
        ("C++ & Rust: 2 langs", "c-rust-2-langs"),
        ("snake_case and CamelCase", "snake-case-and-camelcase"),
        ("日本語のタイトル", "spec"),
        ("", "spec"),
        ("---", "spec"),
        ("ﬁle ①", "file-1"),
    ],
)
def test_slugify(title: str, slug: str) -> None:
    assert slugify(title) == slug


def test_slugify_long_titles() -> None:
    words = slugify("word " * 40)
    assert len(words) <= 60 and not words.endswith("-")
    assert words == "-".join(["word"] * 12)  # cut on a word boundary
    one = slugify("x" * 100)
    assert one == "x" * 60
    for title in ["a" * 59 + " b", "ab " * 30, "é" * 200 + "z"]:
        slug = slugify(title)
        assert 0 < len(slug) <= 60 and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug), slug


NAMES = [
    "flow/report-json",
    "main",
    "a b",
    "a..b",
    "-x",
    "/x",
    "x/",
    "x.lock",
    "a/b.lock/c",
    "a@{b",
    "HEAD",
    "a//b",
    "a/.b",
    ".a",
    "x.",
    "a\\b",
    "a:b",
    "a~1",
    "a^",
    "a?",
    "a*",
    "a[b",
    "x@y",
    "a{b}",
    "é/ü",
    "a\tb",
    "a\x7fb",
    "feature/JSON-1.2",
]


@pytest.mark.parametrize("name", NAMES)
def test_branch_rules_agree_with_git(tmp_path: Path, name: str) -> None:
    result = subprocess.run(
        ["git", "check-ref-format", "--branch", name], cwd=tmp_path, capture_output=True
    )
    assert (branch_name_problem(name) is None) == (result.returncode == 0), name


def test_branch_rules_refuse_what_git_branch_refuses() -> None:
    assert branch_name_problem("@") is not None
    assert branch_name_problem("") is not None


REQUIREMENTS = """\
# Rate limits
Intro prose.

### Requirement: Per-provider window
Requests SHALL be counted per provider
within a rolling window.

- a plain bullet that stays prose

#### Scenario: window is full
- **GIVEN** a provider with `requests: 2`
- **WHEN** two calls were made in the window
- **AND** a third call starts
- **THEN** the third call waits
  until the window frees a slot
- **AND** no request is sent early
- and this lowercase bullet is prose

#### Scenario: Bold with colons
- **WHEN:** the window is empty
- THEN: the call goes out at once

```text
#### Scenario: inside a code block
```

### Requirement: Windows are shared
Shared by every run in the process.
#### Scenario: two runs
* WHEN two runs use one provider
* THEN they share one window
"""


def test_requirements_and_scenarios(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, REQUIREMENTS))
    first, second = spec.requirements
    assert (first.name, first.line) == ("Per-provider window", 4)
    assert first.text == (
        "Requests SHALL be counted per provider\nwithin a rolling window.\n\n"
        "- a plain bullet that stays prose"
    )
    full, bold = first.scenarios
    assert (full.name, full.line) == ("window is full", 10)
    assert full.when == [
        "GIVEN a provider with `requests: 2`",
        "two calls were made in the window",
        "a third call starts",
    ]
    assert full.then == [
        "the third call waits until the window frees a slot",
        "no request is sent early",
    ]
    assert (bold.name, bold.when, bold.then) == (
        "Bold with colons",
        ["the window is empty"],
        ["the call goes out at once"],
    )
    assert (second.name, second.line, second.text) == (
        "Windows are shared",
        27,
        "Shared by every run in the process.",
    )
    assert [(s.name, s.when, s.then, s.line) for s in second.scenarios] == [
        ("two runs", ["two runs use one provider"], ["they share one window"], 29)
    ]


def test_requirement_lines_count_front_matter_and_crlf(tmp_path: Path) -> None:
    text = "\ufeff---\ntitle: T\n---\n### Requirement: R\n#### Scenario: S\n- THEN ok\n"
    path = tmp_path / "crlf.md"
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    [req] = load_spec(path).requirements
    assert (req.line, req.scenarios[0].line, req.scenarios[0].then) == (4, 5, ["ok"])


@pytest.mark.parametrize(
    ("body", "line", "needles"),
    [
        ("### Requirement: R\n#### Scenario: x\n- WHEN a\n", 4, ["scenario 'x' has no THEN line"]),
        ("### Requirement: R\n#### Scenario: x\n- WHEN a\n### Requirement: Q\n", 4, ["'x'"]),
        ("### Requirement: R\n#### Scenario: x\n- AND a\n- THEN b\n", 5, ["AND line", "WHEN"]),
        ("### Requirement: R\n#### Scenario: x\n- WHEN\n", 5, ["empty WHEN line"]),
        ("#### Scenario: loose\n- THEN b\n", 3, ["scenario 'loose'", "### Requirement:"]),
        ("## Requirement: R\n", 3, ["### Requirement: <name>"]),
        ("### Requirement: R\n### Scenario: x\n", 4, ["#### Scenario: <name>"]),
        ("### Requirement:\ntext\n", 3, ["requirement has no name"]),
    ],
)
def test_body_errors_name_the_line(
    tmp_path: Path, body: str, line: int, needles: list[str]
) -> None:
    path = write(tmp_path, "# T\n\n" + body)
    message = spec_error(path)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message, message


def make_change(root: Path) -> Path:
    change = root / "openspec" / "changes" / "add-json-report"
    write(
        change,
        "---\nchecks: [make test]\nbuilders: 2\n---\n# Change: Add JSON report\n"
        "## Why\nScripts need it.\n",
        "proposal.md",
    )
    write(change, "## 1. Implementation\n- [ ] 1.1 Add the flag\n", "tasks.md")
    write(change, "## Context\nUse the stdlib json module.\n", "design.md")
    write(
        change,
        """\
## ADDED Requirements
### Requirement: JSON output
The report SHALL print JSON.

#### Scenario: json flag
- **WHEN** `report --json` runs
- **THEN** stdout is JSON

## REMOVED Requirements
### Requirement: XML output
**Reason**: nobody uses it
""",
        "specs/reporting/spec.md",
    )
    write(
        change,
        """\
## MODIFIED Requirements
### Requirement: Exit codes
The CLI SHALL exit 0 on success.
#### Scenario: success
- **WHEN** a report is written
- **THEN** the exit code is 0
- **AND** nothing is printed to stderr
""",
        "specs/cli/spec.md",
    )
    return change


def test_openspec_change_folder_with_two_capabilities(tmp_path: Path) -> None:
    change = make_change(tmp_path)
    spec = load_spec(change)
    assert spec.path == change
    assert spec.title == "Add JSON report"
    assert spec.branch == "flow/add-json-report"
    assert (spec.checks, spec.builders, spec.base) == (["make test"], 2, None)
    assert [r.name for r in spec.requirements] == ["Exit codes", "JSON output"]
    exit_codes, json_output = spec.requirements
    assert exit_codes.line == 2 and exit_codes.scenarios[0].line == 4
    assert exit_codes.scenarios[0].then == ["the exit code is 0", "nothing is printed to stderr"]
    assert json_output.text == "The report SHALL print JSON."
    headings = [line for line in spec.body.splitlines() if line.startswith("# ")]
    assert headings == [
        "# Change: Add JSON report",
        "# Design (design.md)",
        "# Tasks (tasks.md)",
        "# Spec delta: cli (specs/cli/spec.md)",
        "# Spec delta: reporting (specs/reporting/spec.md)",
    ]
    assert "Use the stdlib json module." in spec.body
    assert "checks:" not in spec.body


def test_change_folder_errors_name_the_file(tmp_path: Path) -> None:
    change = make_change(tmp_path)
    delta = write(
        change,
        "## ADDED Requirements\n### Requirement: R\n#### Scenario: s\n",
        "specs/extra/spec.md",
    )
    assert spec_error(change).startswith(f"{delta}:3: scenario 's' has no THEN line")
    (change / "proposal.md").unlink()
    message = spec_error(change)
    assert message.startswith(f"{change}: ") and "proposal.md" in message


def test_change_folder_without_title(tmp_path: Path) -> None:
    change = tmp_path / "c"
    proposal = write(change, "---\nbuilders: 1\n---\n## Change:\nWhy: because.\n", "proposal.md")
    assert spec_error(change).startswith(f"{proposal}:4: title:")


def test_digest_follows_the_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    first = load_spec(path).digest
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert parse_spec(FULL, path).digest == first
    path.write_text(FULL.replace("builders: 3", "builders: 4"), encoding="utf-8")
    assert load_spec(path).digest != first


def test_change_folder_digest_covers_every_file(tmp_path: Path) -> None:
    change = make_change(tmp_path)
    before = load_spec(change).digest
    assert load_spec(change).digest == before
    delta = change / "specs" / "cli" / "spec.md"
    delta.write_text(delta.read_text() + "\n", encoding="utf-8")
    after_delta = load_spec(change).digest
    assert after_delta != before
    (change / "tasks.md").write_text("## 1. Other\n", encoding="utf-8")
    assert load_spec(change).digest != after_delta


def test_bundled_template_and_readme_example_are_valid() -> None:
    template = load_spec(REPO / "specs" / "template.md")
    assert template.requirements and all(r.scenarios for r in template.requirements)
    assert template.checks
    readme = (REPO / "specs" / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```markdown\n(.*?)\n```\n", readme, re.DOTALL)
    assert example is not None
    spec = parse_spec(example.group(1) + "\n", Path("example.md"))
    assert spec.requirements and spec.requirements[0].scenarios[0].then
