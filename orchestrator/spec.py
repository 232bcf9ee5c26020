"""Spec files: optional YAML front matter, a markdown body, OpenSpec requirements and scenarios."""

from __future__ import annotations

import difflib
import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import SpecError

FRONT_MATTER_KEYS = (
    "title",
    "checks",
    "base",
    "branch",
    "builders",
    "models",
    "reviews",
    "protect",
    "apply",
)
SLUG_MAX = 60
_ONTO = ("base", "tip")

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_REQUIREMENT = re.compile(r"^Requirement:\s*(.*)$", re.IGNORECASE)
_SCENARIO = re.compile(r"^Scenario:\s*(.*)$", re.IGNORECASE)
# `- WHEN x`, `- **WHEN** x`, `- **WHEN:** x`, `- WHEN: x`; keywords are upper case so that
# ordinary bullets starting with "and" or "then" stay prose.
_CLAUSE = re.compile(
    r"^\s*[-*+][ \t]+(?:\*\*|__)?(WHEN|THEN|AND|GIVEN)\b:?(?:\*\*|__)?:?[ \t]*(.*)$"
)
_SKIPPED_SECTION = re.compile(r"^(REMOVED|RENAMED)\s+Requirements\b", re.IGNORECASE)
_LABELS = {"design.md": "Design", "tasks.md": "Tasks"}
_BAD_BRANCH_CHARS = set(" ~^:?*[\\")
_EXPECTED = {
    "title": "expected text (quote it if YAML reads it as a number, date or yes/no)",
    "checks": "expected a shell command or a list of shell commands",
    "base": "expected a git revision such as main or a commit sha (quote it if it looks numeric)",
    "branch": "expected a git branch name such as flow/my-change",
    "builders": "expected an integer from 1 to 32, or {max: N, enough: K} with 1 <= K <= N <= 32",
    "reviews": "expected required or optional",
    "protect": "expected a list of globs such as [tests/**, conftest.py], or [] for none",
    "apply": "expected {onto: base} or {onto: tip}",
    "models": "expected a mapping of stages (planner, builders, reviewers) to model names",
}


class Scenario(BaseModel):
    """One `#### Scenario:` block."""

    name: str
    when: list[str]
    """Conditions, keyword removed; AND lines join the list before them, GIVEN lines keep it."""
    then: list[str]
    """Expected outcomes, keyword removed."""
    line: int
    """1-based line of the heading in the file that holds it."""


class Requirement(BaseModel):
    """One `### Requirement:` block."""

    name: str
    text: str
    """The prose between the heading and the first scenario."""
    scenarios: list[Scenario]
    line: int
    """1-based line of the heading in the file that holds it (a spec delta, for folders)."""


class Spec(BaseModel):
    """A validated spec, ready for the planner."""

    path: Path
    """The spec file, or the OpenSpec change folder."""
    title: str
    slug: str
    body: str
    """Markdown without front matter; for a change folder, all its documents under headings."""
    checks: list[str]
    """Shell commands that must pass in a candidate's worktree."""
    base: str | None
    """Git revision to build on; None means HEAD."""
    branch: str
    builders: int | None
    """Overrides the configured builder count (with `enough`: the most that may start)."""
    enough: int | None = None
    """Adaptive N: no new builder starts once this many candidates pass their checks."""
    models: dict[str, Any] | None = None
    """Per-stage model overrides (`planner`, `builders`, `reviewers`), a config layer."""
    reviews: Literal["required", "optional"] | None = None
    """Overrides agents.yaml `reviews:`: whether a candidate needs a completed review."""
    protect: list[str] | None = None
    """Globs of files a candidate may not change; None: the defaults of evidence/protect.py."""
    onto: Literal["base", "tip"] | None = None
    """`apply: {onto: …}`: overrides agents.yaml's; where a winner goes when the base moved."""
    requirements: list[Requirement]
    digest: str
    """sha256 of the raw bytes of every file read, so a resumed run can tell the spec changed."""


class Attempts(BaseModel):
    """`builders: {max: 6, enough: 2}`: a budget of attempts rather than a fixed count."""

    model_config = ConfigDict(extra="forbid")

    max: int = Field(ge=1, le=32, strict=True)
    enough: int = Field(ge=1, le=32, strict=True)

    @model_validator(mode="after")
    def _order(self) -> Attempts:
        if self.enough > self.max:
            raise ValueError(f"enough ({self.enough}) cannot be more than max ({self.max})")
        return self


class FrontMatter(BaseModel):
    """The YAML between the opening and closing `---` lines."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = None
    """Defaults to the first markdown heading."""
    checks: list[str] = Field(default_factory=list)
    base: str | None = None
    branch: str | None = None
    """Defaults to flow/<slug of title>."""
    builders: int | Attempts | None = Field(default=None)
    models: dict[str, Any] | None = None
    reviews: Literal["required", "optional"] | None = None
    protect: list[str] | None = None
    apply: dict[str, Literal["base", "tip"]] | None = None

    @field_validator("apply", mode="before")
    @classmethod
    def _apply(cls, value: Any) -> Any:
        good = isinstance(value, dict) and set(value) == {"onto"} and value["onto"] in _ONTO
        if value is not None and not good:
            raise ValueError(f"{_EXPECTED['apply']}, got {value!r}")
        return value

    @field_validator("builders", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        bad = isinstance(value, bool) or (isinstance(value, int) and not 1 <= value <= 32)
        if bad or (value is not None and not isinstance(value, int | dict)):
            raise ValueError(f"{_EXPECTED['builders']}, got {value!r}")
        return value

    @field_validator("protect")
    @classmethod
    def _globs(cls, value: list[str] | None) -> list[str] | None:
        for i, glob in enumerate(value or [], 1):
            if not glob.strip() or _has_control(glob):
                raise ValueError(f"glob {i} is empty or not text; write e.g. tests/** or remove it")
        return value

    @field_validator("checks", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("checks")
    @classmethod
    def _commands(cls, value: list[str]) -> list[str]:
        for i, command in enumerate(value, 1):
            if not command.strip():
                raise ValueError(f"command {i} is empty; write a shell command or remove it")
        return value

    @field_validator("title")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; write a title or remove the key to use the first heading")
        return value

    @field_validator("base")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        bad = value is not None and (
            not value.strip() or value.startswith("-") or _has_control(value)
        )
        if bad:
            raise ValueError(f"{value!r} is not a git revision; write e.g. main, v1.2 or a sha")
        return value

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str | None) -> str | None:
        problem = None if value is None else branch_name_problem(value)
        if problem:
            raise ValueError(f"{value!r} is not a valid git branch name ({problem})")
        return value


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def branch_name_problem(name: str) -> str | None:
    """Why `git check-ref-format --branch` would refuse `name`, or None if it is fine."""
    if not name:
        return "it is empty"
    found = sorted(_BAD_BRANCH_CHARS.intersection(name))
    if found:
        return "contains " + " ".join(repr(c) for c in found)
    if _has_control(name):
        return "contains a control character"
    checks = [
        (name.startswith("-"), "starts with '-'"),
        (name.startswith("/") or name.endswith("/"), "starts or ends with '/'"),
        ("//" in name, "contains '//'"),
        (".." in name, "contains '..'"),
        ("@{" in name, "contains '@{'"),
        (name in ("@", "HEAD"), f"{name!r} is reserved"),
        (name.endswith("."), "ends with '.'"),
        (any(p.startswith(".") for p in name.split("/")), "a part starts with '.'"),
        (any(p.endswith(".lock") for p in name.split("/")), "a part ends with '.lock'"),
    ]
    return next((why for bad, why in checks if bad), None)


def slugify(title: str) -> str:
    """Lowercase ASCII words joined by dashes, at most 60 characters, never empty."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > SLUG_MAX:
        cut = slug[:SLUG_MAX]
        # Prefer ending on a whole word unless that throws away most of the slug.
        if slug[SLUG_MAX] != "-" and cut.rfind("-") >= SLUG_MAX // 2:
            cut = cut[: cut.rfind("-")]
        slug = cut.strip("-")
    return slug or "spec"


def _clean_title(text: str) -> str:
    return " ".join(text.split())


def _fence_flags(lines: list[str]) -> list[bool]:
    """For each line, whether it is inside (or delimits) a fenced code block."""
    flags: list[bool] = []
    marker: str | None = None
    for line in lines:
        m = _FENCE.match(line)
        if marker is None:
            marker = m.group(1) if m else None
            flags.append(marker is not None)
        else:
            flags.append(True)
            stripped = line.strip()
            if stripped.startswith(marker) and set(stripped) == {marker[0]}:
                marker = None
    return flags


def _headings(lines: list[str]) -> list[tuple[int, int, str] | None]:
    """(index, level, text) for each heading line outside code blocks, else None."""
    out: list[tuple[int, int, str] | None] = []
    for i, (line, fenced) in enumerate(zip(lines, _fence_flags(lines), strict=True)):
        m = None if fenced else _HEADING.match(line)
        out.append((i, len(m.group(1)), m.group(2).strip()) if m else None)
    return out


def _first_heading(lines: list[str]) -> str | None:
    return next((h[2] for h in _headings(lines) if h is not None and h[2]), None)


class _BodyParser:
    """Collects requirements and scenarios from markdown lines, in one pass."""

    def __init__(self, path: Path, first_line: int) -> None:
        self.path, self.first_line = path, first_line
        self.requirements: list[Requirement] = []
        self.skip_section = False
        self.req: Requirement | None = None
        self.req_text: list[str] = []
        self.scn: Scenario | None = None
        self.last: list[str] | None = None

    def fail(self, index: int, message: str) -> SpecError:
        return SpecError(f"{self.path}:{self.first_line + index}: {message}")

    def parse(self, lines: list[str]) -> list[Requirement]:
        fences = _fence_flags(lines)
        for i, heading in enumerate(_headings(lines)):
            if heading is not None:
                self.heading(*heading)
            elif not fences[i] and (m := _CLAUSE.match(lines[i])) and self.scn is not None:
                self.clause(i, m.group(1), m.group(2).strip())
            else:
                self.other(lines[i], fences[i])
        self.end_requirement()
        return self.requirements

    def heading(self, index: int, level: int, text: str) -> None:
        req, scn = _REQUIREMENT.match(text), _SCENARIO.match(text)
        if (req and level != 3) or (scn and level != 4):
            want = "### Requirement:" if req else "#### Scenario:"
            raise self.fail(index, f"{text!r}: write the heading as '{want} <name>'")
        if scn:
            self.start_scenario(index, scn.group(1).strip())
        elif req or level <= 3:
            self.end_requirement()
            if req:
                self.start_requirement(index, req.group(1).strip())
            elif level <= 2:
                self.skip_section = bool(_SKIPPED_SECTION.match(text))
        else:
            self.end_scenario()
            if self.req is not None and not self.req.scenarios:
                self.req_text.append(f"{'#' * level} {text}")

    def start_requirement(self, index: int, name: str) -> None:
        if not name:
            raise self.fail(index, "requirement has no name; write '### Requirement: <name>'")
        self.req = Requirement(name=name, text="", scenarios=[], line=self.first_line + index)
        self.req_text = []

    def start_scenario(self, index: int, name: str) -> None:
        self.end_scenario()
        if not name:
            raise self.fail(index, "scenario heading has no name; write '#### Scenario: <name>'")
        if self.req is None:
            raise self.fail(
                index, f"scenario {name!r} is outside a requirement; add '### Requirement: <name>'"
            )
        self.scn = Scenario(name=name, when=[], then=[], line=self.first_line + index)
        self.last = None

    def clause(self, index: int, keyword: str, text: str) -> None:
        assert self.scn is not None
        if not text:
            raise self.fail(index, f"empty {keyword} line in scenario {self.scn.name!r}")
        if keyword == "AND":
            if self.last is None:
                raise self.fail(
                    index, f"AND line in scenario {self.scn.name!r} has no WHEN or THEN before it"
                )
            self.last.append(text)
            return
        self.last = self.scn.then if keyword == "THEN" else self.scn.when
        self.last.append(f"GIVEN {text}" if keyword == "GIVEN" else text)

    def other(self, line: str, fenced: bool) -> None:
        if self.scn is not None:
            # An indented line continues the bullet above it.
            if self.last and not fenced and line[:1] in (" ", "\t") and line.strip():
                self.last[-1] += " " + line.strip()
        elif self.req is not None and not self.req.scenarios:
            self.req_text.append(line)

    def end_scenario(self) -> None:
        if self.scn is None:
            return
        if not self.scn.then:
            raise SpecError(
                f"{self.path}:{self.scn.line}: scenario {self.scn.name!r} has no THEN line; "
                "add '- THEN <expected outcome>' under it"
            )
        assert self.req is not None
        self.req.scenarios.append(self.scn)
        self.scn, self.last = None, None

    def end_requirement(self) -> None:
        self.end_scenario()
        if self.req is not None and not self.skip_section:
            self.req.text = "\n".join(self.req_text).strip()
            self.requirements.append(self.req)
        self.req = None


def _yaml_lines(node: yaml.Node, path: Path, first_line: int) -> dict[str, int]:
    """File line of each top-level key; a repeated key is an error."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            name, line = str(key.value), first_line + key.start_mark.line
            if name in lines:
                raise SpecError(
                    f"{path}:{line}: {name}: duplicate key (first at line {lines[name]}); keep one"
                )
            lines[name] = line
    return lines


def _load_yaml(source: str, path: Path, first_line: int) -> tuple[Any, dict[str, int]]:
    loader = yaml.SafeLoader(source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _yaml_lines(node, path, first_line)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = first_line + (mark.line if mark is not None else 0)
        raise SpecError(
            f"{path}:{line}: front matter is not valid YAML ({err.problem or err.context})\n"
            "  fix the YAML between the '---' lines; quote values containing ': ' or '#'"
        ) from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}:{first_line}: front matter is not valid YAML ({err})") from None
    finally:
        loader.dispose()


def _describe_error(err: ValidationError, lines: dict[str, int], path: Path, default: int) -> str:
    """The first problem (in file order) as `path:line: key: what is wrong`."""
    problems = []
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else ""
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, FRONT_MATTER_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            msg = f"unknown key; {hint}\n  allowed keys: {', '.join(FRONT_MATTER_KEYS)}"
        elif e["type"] == "value_error":
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
        else:
            msg = f"{_EXPECTED.get(key, e['msg'])}, got {e['input']!r}"
        problems.append((lines.get(key, default), f"{key}: {msg}"))
    line, msg = min(problems, key=lambda p: p[0])
    return f"{path}:{line}: {msg}"


def _split_front_matter(lines: list[str], path: Path) -> tuple[FrontMatter, int]:
    """The validated front matter and the index of the first body line."""
    if not lines or lines[0].rstrip() != "---":
        return FrontMatter(), 0
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() in ("---", "...")), None)
    if end is None:
        raise SpecError(
            f"{path}:1: front matter is not closed; add a '---' line after the YAML "
            "(or remove the first '---' if the file has no front matter)"
        )
    data, key_lines = _load_yaml("\n".join(lines[1:end]), path, first_line=2)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            f"{path}:2: front matter must be 'key: value' lines "
            f"({', '.join(FRONT_MATTER_KEYS)}), not a {type(data).__name__}"
        )
    try:
        return FrontMatter.model_validate({str(k): v for k, v in data.items()}), end + 1
    except ValidationError as err:
        raise SpecError(_describe_error(err, key_lines, path, default=2)) from None


def _text_lines(text: str) -> list[str]:
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _body(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n").rstrip()


def _make_spec(
    path: Path,
    front: FrontMatter,
    title: str | None,
    body: str,
    requirements: list[Requirement],
    digest: str,
    where: tuple[Path, int],
) -> Spec:
    """Apply defaults; `where` is the file and line to blame when there is no title."""
    title = _clean_title(front.title or title or "")
    if not title:
        file, line = where
        if not body.strip():
            raise SpecError(
                f"{file}:1: spec is empty; add a '# Title' heading and describe the change"
            )
        raise SpecError(
            f"{file}:{line}: title: none found; add 'title: …' to the front matter "
            "or start the body with a '# Heading'"
        )
    slug = slugify(title)
    return Spec(
        path=path,
        title=title,
        slug=slug,
        body=body,
        checks=front.checks,
        base=front.base,
        branch=front.branch or f"flow/{slug}",
        builders=front.builders.max if isinstance(front.builders, Attempts) else front.builders,
        enough=front.builders.enough if isinstance(front.builders, Attempts) else None,
        models=front.models,
        reviews=front.reviews,
        protect=front.protect,
        onto=front.apply["onto"] if front.apply else None,
        requirements=requirements,
        digest=digest,
    )


def parse_spec(text: str, path: Path) -> Spec:
    """Validate one spec file's text; `path` is used in messages and kept on the Spec."""
    lines = _text_lines(text)
    front, start = _split_front_matter(lines, path)
    body_lines = lines[start:]
    requirements = _BodyParser(path, start + 1).parse(body_lines)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    heading = _first_heading(body_lines)
    return _make_spec(
        path, front, heading, _body(body_lines), requirements, digest, (path, start + 1)
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: not found; check the path") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror})") from None


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"
        ) from None


def _load_change_folder(folder: Path) -> Spec:
    """An OpenSpec change: proposal.md, optional design.md and tasks.md, specs/*/spec.md deltas."""
    proposal = folder / "proposal.md"
    if not proposal.is_file():
        raise SpecError(
            f"{folder}: not an OpenSpec change folder (no proposal.md); pass a spec file instead"
        )
    extras = [folder / "design.md", folder / "tasks.md"]
    files = [proposal, *(p for p in extras if p.is_file()), *sorted(folder.glob("specs/*/spec.md"))]
    digest = hashlib.sha256()
    texts: dict[Path, str] = {}
    for file in files:
        raw = _read(file)
        texts[file] = _decode(file, raw)
        name = file.relative_to(folder).as_posix().encode()
        # Length-prefixed, so moving bytes between files changes the digest.
        digest.update(b"%d:%s:%d:" % (len(name), name, len(raw)) + raw)
    lines = _text_lines(texts[proposal])
    front, start = _split_front_matter(lines, proposal)
    heading = _first_heading(lines[start:])
    title = re.sub(r"^change\s*:\s*", "", heading or "", flags=re.IGNORECASE)
    parts = [_body(lines[start:])]
    requirements: list[Requirement] = []
    for file in files[1:]:
        rel = file.relative_to(folder).as_posix()
        label = _LABELS.get(rel, f"Spec delta: {file.parent.name}")
        file_lines = _text_lines(texts[file])
        parts.append(f"# {label} ({rel})\n\n{_body(file_lines)}")
        if rel.startswith("specs/"):
            requirements += _BodyParser(file, 1).parse(file_lines)
    body = "\n\n".join(p for p in parts if p.strip())
    return _make_spec(
        folder, front, title, body, requirements, digest.hexdigest(), (proposal, start + 1)
    )


def load_spec(path: Path) -> Spec:
    """Read and validate a spec file or an OpenSpec change folder."""
    if path.is_dir():
        return _load_change_folder(path)
    return parse_spec(_decode(path, _read(path)), path)
