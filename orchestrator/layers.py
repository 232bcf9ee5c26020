"""Layered configuration, last write wins.

built-in defaults < user file (~/.config/flow/agents.yaml) < the repository's agents.yaml (or
--config) < --profile < the spec's `models:` < --set key.path=value.

Entries under `providers`, `models` and `profiles` are units: a higher layer replaces an entry
of the same name whole (a user's `zhipu` provider with a China-region URL replaces the
built-in one, it does not inherit its fields). Other mappings merge key by key; lists and
scalars are replaced.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from orchestrator.config import LoadedConfig, line_of, parse_config, read_yaml_lines
from orchestrator.errors import ConfigError

UNIT_SECTIONS = ("providers", "models", "profiles")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")

# Known vendors' endpoints, so a model needs only `provider: deepseek`. Coding-plan endpoints
# differ by region and plan: override the entry in your own file to change it.
BUILTIN: dict[str, Any] = {
    "providers": {
        "deepseek": {
            "api": "openai",
            "base_url": "https://api.deepseek.com/v1",
            "api_key": "DEEPSEEK_API_KEY",
            "max_concurrency": 8,
        },
        "moonshot": {
            "api": "openai",
            "base_url": "https://api.moonshot.ai/v1",
            "api_key": "MOONSHOT_API_KEY",
            "max_concurrency": 4,
        },
        "minimax": {
            "api": "openai",
            "base_url": "https://api.minimax.io/v1",
            "api_key": "MINIMAX_API_KEY",
            "max_concurrency": 4,
        },
        "zhipu": {
            "api": "openai",
            "base_url": "https://api.z.ai/api/coding/paas/v4",
            "api_key": "ZHIPU_API_KEY",
            "max_concurrency": 5,
        },
        "openrouter": {
            "api": "openai",
            "base_url": "https://openrouter.ai/api/v1",
            "api_key": "OPENROUTER_API_KEY",
            "max_concurrency": 8,
        },
    },
}


@dataclass
class Layer:
    source: str
    """Where the values came from, as shown by `flow config show`."""
    data: dict[str, Any]
    path: Path | None = None
    """The file the values were read from (None: built-in, --profile, a spec, --set)."""
    lines: dict[str, int] = field(default_factory=dict)
    """The line of every dotted key path in that file."""

    def where(self, key: str) -> str:
        """What an error about `key` names: the file and line, or the layer itself."""
        if self.path is None:
            return self.source
        line = line_of(self.lines, key)
        return f"{self.path}:{line}" if line else str(self.path)


def user_config_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "flow" / "agents.yaml"


def _read(path: Path, source: str) -> Layer:
    data, lines = read_yaml_lines(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with providers/models/stages at the top")
    # Script paths are relative to the file that names them.
    for model in (data.get("models") or {}).values():
        script = model.get("script") if isinstance(model, dict) else None
        if isinstance(script, str) and ":" not in script and not Path(script).is_absolute():
            model["script"] = str((path.parent / script).resolve())
    return Layer(source=f"{source} {path}", data=data, path=path, lines=lines)


def parse_set(assignment: str) -> dict[str, Any]:
    """`stages.planner.model=flash` → {"stages": {"planner": {"model": "flash"}}}."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip() or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {assignment!r}: expected key.path=value, e.g. --set budget.per_run_usd=5"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _stage_override(value: Any, where: str) -> Any:
    """A spec's or profile's stage entry: names become `{model: name}`."""
    if isinstance(value, str):
        return {"model": value}
    if isinstance(value, list):
        return [_stage_override(v, where) for v in value]
    if isinstance(value, dict):
        return value
    raise ConfigError(f"{where}: expected a model name, {{model: …}}, or a list of them")


def stages_layer(source: str, stages: dict[str, Any]) -> Layer:
    allowed = {"planner", "builders", "reviewers", "testers"}
    unknown = set(stages) - allowed
    if unknown:
        raise ConfigError(
            f"{source}: unknown stage {sorted(unknown)[0]!r}; "
            "use planner, builders, reviewers or testers"
        )
    data = {k: _stage_override(v, f"{source}: {k}") for k, v in stages.items()}
    for key in ("builders", "reviewers", "testers"):
        if key in data and isinstance(data[key], dict):
            data[key] = [data[key]]
    return Layer(source=source, data={"stages": data})


def merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged document and, for every leaf's dotted path, the layer it came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        _merge_into(merged, copy.deepcopy(layer.data), layer.source, origin, "")
    return merged, origin


def _merge_into(
    dst: dict[str, Any], src: dict[str, Any], source: str, origin: dict[str, str], prefix: str
) -> None:
    for key, value in src.items():
        path = f"{prefix}{key}"
        unit = prefix.count(".") == 1 and prefix.split(".")[0] in UNIT_SECTIONS
        if isinstance(value, dict) and isinstance(dst.get(key), dict) and not unit:
            _merge_into(dst[key], value, source, origin, path + ".")
            continue
        for stale in [p for p in origin if p == path or p.startswith(path + ".")]:
            del origin[stale]
        dst[key] = value
        _mark(value, path, source, origin)


def _mark(value: Any, path: str, source: str, origin: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _mark(v, f"{path}.{k}", source, origin)
    else:
        origin[path] = source


class ConfigSource(BaseModel):
    """Where a run's config came from: enough to build the same layers again on resume."""

    config: str | None = None
    """The agents.yaml given or found (None: only the user and built-in layers)."""
    profile: str | None = None
    sets: list[str] = []

    def source(self) -> dict[str, Any]:
        return {"config": self.config, "profile": self.profile, "sets": list(self.sets)}

    def layers(self, repo_root: Path) -> Layers:
        config = Path(self.config) if self.config else None
        return Layers.discover(repo_root, config, self.profile, self.sets)


@dataclass
class Layers:
    """The config layers that do not depend on a spec; `resolve(spec)` adds the spec's."""

    files: list[Layer]
    repo_config: Path | None
    profile: str | None = None
    sets: list[str] = field(default_factory=list)

    @classmethod
    def discover(
        cls,
        repo_root: Path | None,
        config: Path | None = None,
        profile: str | None = None,
        sets: list[str] | None = None,
    ) -> Layers:
        layers = [Layer(source="built-in", data=copy.deepcopy(BUILTIN))]
        user = user_config_path()
        if user.is_file():
            layers.append(_read(user, "user"))
        repo_file = (
            config
            if config is not None
            else (repo_root / "agents.yaml" if repo_root is not None else None)
        )
        if config is not None and not config.is_file():
            raise ConfigError(f"{config}: not found; check --config")
        if repo_file is not None and repo_file.is_file():
            layers.append(_read(repo_file, "repository" if config is None else "--config"))
        else:
            repo_file = None
        return cls(files=layers, repo_config=repo_file, profile=profile, sets=list(sets or []))

    def source(self) -> dict[str, Any]:
        """The fields of the `ConfigSource` that rebuilds these layers."""
        config = str(self.repo_config) if self.repo_config else None
        return ConfigSource(config=config, profile=self.profile, sets=self.sets).source()

    def profile_names(self) -> list[str]:
        merged, _ = merge(self.files)
        return sorted(merged.get("profiles") or {})

    def with_profile(self, profile: str | None) -> Layers:
        return Layers(self.files, self.repo_config, profile=profile, sets=self.sets)

    def layers(
        self, spec_models: dict[str, Any] | None = None, spec_source: str = "spec"
    ) -> list[Layer]:
        out = list(self.files)
        if self.profile is not None:
            merged, _ = merge(out)
            profiles = merged.get("profiles") or {}
            if self.profile not in profiles:
                known = ", ".join(sorted(profiles)) or "none defined"
                raise ConfigError(
                    f"--profile {self.profile!r}: no such profile ({known}); "
                    "define it under `profiles:` in agents.yaml"
                )
            out.append(stages_layer(f"profile {self.profile}", profiles[self.profile] or {}))
        if spec_models:
            out.append(stages_layer(spec_source, spec_models))
        out += [Layer(source=f"--set {s}", data=parse_set(s)) for s in self.sets]
        return out

    def resolve(
        self, spec_models: dict[str, Any] | None = None, spec_source: str = "spec"
    ) -> LoadedConfig:
        layers = self.layers(spec_models, spec_source)
        merged, origin = merge(layers)
        merged.pop("profiles", None)
        if "stages" not in merged:
            raise ConfigError(
                "no stages configured: create agents.yaml at the repository root, pass "
                f"--config FILE, or write {user_config_path()} (see the README)"
            )
        source = str(self.repo_config) if self.repo_config else "agents.yaml (merged)"
        by_source = {layer.source: layer for layer in layers}

        def where(key: str) -> str:
            """The layer whose value of `key` (or of the entry holding it) was kept."""
            found = _origin_of(origin, key)
            layer = by_source.get(found) if found else None
            return layer.where(key) if layer is not None else source

        loaded = parse_config(merged, source, base=None, where=where)
        loaded.path = self.repo_config
        return loaded

    def show(self, spec_models: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
        """(dotted key, value, source) for every leaf of the merged config; keys masked."""
        merged, origin = merge(self.layers(spec_models))
        rows = []
        for path in sorted(origin):
            value = _lookup(merged, path)
            if path.endswith(".api_key") and isinstance(value, str) and not _ENV_NAME.match(value):
                value = "(a literal key, hidden)"
            rows.append((path, _dump(value), origin[path]))
        if "stages" not in merged:
            return rows  # nothing to validate against yet (e.g. outside a repository)
        defaults = self.resolve(spec_models).config.model_dump(exclude={"profiles"})
        for path, value in _leaves(defaults, ""):
            if value is None or _shown(path, origin):
                continue  # None is "not set", not a value worth a line
            rows.append((path, _dump(value), "default"))
        return sorted(rows)


def _origin_of(origin: dict[str, str], key: str) -> str | None:
    """The source of `key`: its own, else that of its nearest ancestor that a layer set
    (whole, or an entry of which a layer replaced: its first leaf's)."""
    path = key
    while path:
        if path in origin:
            return origin[path]
        inside = sorted(p for p in origin if p.startswith(path + "."))
        if inside:
            return origin[inside[0]]
        path = path.rpartition(".")[0]
    return None


def _dump(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True)
        .strip()
        .removesuffix("\n...")
        .removesuffix(" ...")
    )


def _leaves(data: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        out = []
        for key, value in data.items():
            out += _leaves(value, f"{prefix}{key}.")
        return out
    return [(prefix.rstrip("."), data)]


def _shown(path: str, origin: dict[str, str]) -> bool:
    """Whether a default is already covered by a layer's value (or its entry is implicit)."""
    if path in origin or any(p.startswith(path + ".") for p in origin):
        return True
    parts = path.split(".")
    while parts:
        parts.pop()
        if ".".join(parts) in origin:
            return True  # a value set as a whole (a list, a stage entry written as one)
    if path.split(".")[0] in UNIT_SECTIONS:
        entry = ".".join(path.split(".")[:2])
        return not any(p.startswith(entry + ".") for p in origin)  # implicit model: skip
    return False


def _lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node
