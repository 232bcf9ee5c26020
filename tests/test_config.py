"""agents.yaml: validation, prices, keys, and the layers it is merged from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import flow_in

from orchestrator.config import load_config, parse_config, resolve_api_key
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.errors import ConfigError
from orchestrator.layers import Layer, Layers, merge, parse_set, stages_layer
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, ServerReply, scripted_handler

ROOT = Path(__file__).resolve().parent.parent


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "providers": {
            "plan": {"api": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "PLAN_KEY"}
        },
        "models": {
            "glm": {
                "provider": "plan",
                "id": "glm-4.7",
                "family": "zhipu",
                "price": {"input": 0, "output": 0},
            }
        },
        "stages": {
            "planner": {"model": "gpt-5-mini"},
            "builders": [{"model": "glm", "count": 2}],
            "reviewers": [{"model": "gpt-5"}, {"model": "anthropic/claude-sonnet-4-5"}],
        },
    }
    data.update(extra)
    return data


def test_sample_config_resolves_prices_and_families() -> None:
    loaded = load_config(ROOT / "agents.yaml")
    gpt, glm, sonnet = loaded.model("gpt"), loaded.model("glm"), loaded.model("sonnet")
    assert (gpt.price_source, gpt.input_per_token, gpt.output_per_token) == (
        "litellm",
        1.25e-06,
        1e-05,
    )
    assert (glm.price_source, glm.input_per_token, glm.family) == ("config", 0.0, "zhipu")
    assert sonnet.family == "anthropic" and sonnet.litellm_model == "anthropic/claude-sonnet-4-5"
    assert loaded.builder_slots() == ["glm", "glm", "m2"]
    assert loaded.builder_slots(5) == ["glm", "glm", "m2", "glm", "glm"]
    assert loaded.reviewers_for("glm") == ["gpt", "sonnet"]


def test_litellm_strings_become_models() -> None:
    loaded = parse_config(minimal())
    assert loaded.model("gpt-5-mini").price_source == "litellm"
    assert loaded.model("anthropic/claude-sonnet-4-5").family == "anthropic"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"stages": {"planner": {"model": "glm"}, "builders": [{"model": "glm", "cuont": 2}]}},
            "stages.builders.0.cuont: unknown key",
        ),
        ({"budget": {"per_run_usd": "lots"}}, "budget.per_run_usd"),
        (
            {
                "models": {
                    "glm": {"provider": "nope", "id": "x", "price": {"input": 0, "output": 0}}
                }
            },
            "unknown provider 'nope'",
        ),
        (
            {"models": {"glm": {"provider": "plan", "id": "glm-4.7"}}},
            "models.glm.price: no known price",
        ),
        (
            {"stages": {"planner": {"model": "ghost"}, "builders": [{"model": "glm"}]}},
            "unknown model 'ghost'",
        ),
        (
            {
                "stages": {
                    "planner": {"model": "glm"},
                    "builders": [{"model": "glm"}],
                    "reviewers": [{"model": "glm"}],
                }
            },
            "has no reviewer of another family",
        ),
        ({"models": {"s": {"id": "scripted/s"}}}, "a scripted model needs a script"),
        (
            {
                "stages": {
                    "planner": {"model": "glm", "fallbacks": ["ghost"]},
                    "builders": [{"model": "glm"}],
                }
            },
            "stages.planner.fallbacks.0",
        ),
    ],
)
def test_invalid_configs_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_config(minimal(**change), "cfg.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text("stages:\n  planner: {model: x\n")
    with pytest.raises(ConfigError, match=r"agents\.yaml:\d+: not valid YAML"):
        load_config(path)


def test_keys_come_from_named_variables() -> None:
    loaded = parse_config(minimal())
    with pytest.raises(ConfigError, match="PLAN_KEY is not set"):
        resolve_api_key(loaded.model("glm"), {})
    assert resolve_api_key(loaded.model("glm"), {"PLAN_KEY": "sk-abc"}) == "sk-abc"
    literal = minimal()
    literal["providers"]["plan"]["api_key"] = "sk-literal-123"
    assert resolve_api_key(parse_config(literal).model("glm"), {}) == "sk-literal-123"


def test_fallback_chains() -> None:
    data = minimal()
    data["stages"]["builders"] = [{"model": "glm", "fallbacks": ["gpt-5-mini"]}]
    loaded = parse_config(data)
    assert loaded.fallback_chains() == {("build", "glm"): ["gpt-5-mini"]}


# ---- layers -------------------------------------------------------------------------------


def test_merge_order_and_provenance() -> None:
    layers = [
        Layer(
            "built-in",
            {
                "providers": {
                    "zhipu": {"api": "openai", "base_url": "https://a", "api_key": "ZHIPU_API_KEY"}
                },
                "budget": {"per_run_usd": 1, "per_call_usd": 0.5},
            },
        ),
        Layer(
            "user",
            {
                "providers": {"zhipu": {"api": "openai", "base_url": "https://cn"}},
                "budget": {"per_run_usd": 2},
            },
        ),
        Layer("repo", {"budget": {"per_run_usd": 3}}),
        stages_layer("profile cheap", {"planner": "flash", "builders": ["glm", "m2"]}),
        Layer("--set budget.per_run_usd=4", parse_set("budget.per_run_usd=4")),
    ]
    merged, origin = merge(layers)
    # A provider is a unit: the user's replaces the built-in one whole (no inherited key).
    assert merged["providers"]["zhipu"] == {"api": "openai", "base_url": "https://cn"}
    assert origin["providers.zhipu.base_url"] == "user"
    assert "providers.zhipu.api_key" not in origin
    assert merged["budget"] == {"per_run_usd": 4, "per_call_usd": 0.5}
    assert origin["budget.per_run_usd"] == "--set budget.per_run_usd=4"
    assert origin["budget.per_call_usd"] == "built-in"
    assert merged["stages"]["builders"] == [{"model": "glm"}, {"model": "m2"}]
    assert origin["stages.planner.model"] == "profile cheap"


def test_parse_set() -> None:
    assert parse_set("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_set("stages.planner.model=flash") == {"stages": {"planner": {"model": "flash"}}}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match=r"key\.path=value"):
            parse_set(bad)


def write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_file_alone_is_enough_and_scripts_resolve_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = prepare_demo(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    user_dir = tmp_path / "xdg" / "flow"
    user_dir.mkdir(parents=True)
    (user_dir / "scripts").symlink_to(demo.root / "scripts")
    write(user_dir / "agents.yaml", yaml.safe_load(demo.config.read_text()))
    loaded = Layers.discover(demo.repo).resolve()
    assert loaded.path is None
    assert Path(str(loaded.model("glm-sim").script)).parent == (user_dir / "scripts").resolve()


def test_no_stages_anywhere_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no stages configured"):
        Layers.discover(tmp_path).resolve()
    with pytest.raises(ConfigError, match="not found; check --config"):
        Layers.discover(tmp_path, tmp_path / "missing.yaml")


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    data = yaml.safe_load(demo.config.read_text())
    data["profiles"] = {"solo": {"builders": ["glm-sim"]}}
    write(demo.config, data)
    with pytest.raises(ConfigError, match=r"--profile 'fast': no such profile \(solo\)"):
        Layers.discover(demo.repo, demo.config, profile="fast").resolve()


def test_config_show_masks_literal_keys(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    data = yaml.safe_load(demo.config.read_text())
    data["providers"] = {
        "gw": {
            "api": "openai",
            "base_url": "http://127.0.0.1:1/v1",
            "api_key": "sk-secret-literal-987",
        }
    }
    write(demo.config, data)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "config",
            "show",
            "--config",
            str(demo.config),
            "--set",
            "budget.per_run_usd=7",
        ],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "sk-secret-literal-987" not in out.stdout
    assert "providers.gw.api_key = (a literal key, hidden)" in out.stdout
    assert "budget.per_run_usd = 7" in out.stdout and "# --set budget.per_run_usd=7" in out.stdout
    line = next(
        ln for ln in out.stdout.splitlines() if ln.startswith("providers.deepseek.base_url")
    )
    assert line.split("#")[0].strip() == "providers.deepseek.base_url = https://api.deepseek.com/v1"
    assert line.endswith("# built-in")


# ---- end to end through `flow run` ---------------------------------------------------------


def flow_run(
    demo: DemoPaths, *args: str, env: dict[str, str] | None = None, spec: Path | None = None
) -> tuple[int, dict[str, Any]]:
    out = flow_in(demo.repo, "run", str(spec or demo.spec), "--json", *args, env=env)
    runs = sorted((demo.repo / ".flow" / "runs").glob("*/run.json"))
    summary = json.loads(runs[-1].read_text()) if runs else {}
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, summary


def test_profile_spec_models_and_set_through_flow_run(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    data = yaml.safe_load(demo.config.read_text())
    data["profiles"] = {"solo": {"builders": ["glm-sim"], "reviewers": ["gpt-sim"]}}
    write(demo.config, data)
    code, summary = flow_run(demo, "--config", str(demo.config), "--profile", "solo")
    assert code == 0
    assert [c["model"] for c in summary["candidates"]] == ["glm-sim"]
    assert {r["reviewer"] for r in summary["reviews"]} == {"gpt-sim"}

    # The spec's `models:` overrides the file; --set overrides the spec.
    spec = demo.root / "spec2.md"
    spec.write_text(
        demo.spec.read_text().replace(
            "branch: flow/add-median", "branch: flow/two\nmodels:\n  builders: [kimi-sim, glm-sim]"
        )
    )
    code, summary = flow_run(demo, "--config", str(demo.config), spec=spec)
    assert code == 0 and [c["model"] for c in summary["candidates"]] == ["kimi-sim", "glm-sim"]
    spec.write_text(spec.read_text().replace("flow/two", "flow/three"))
    code, summary = flow_run(
        demo,
        "--config",
        str(demo.config),
        "--set",
        "stages.builders=[{model: kimi-sim}]",
        spec=spec,
    )
    assert code == 1 and [c["model"] for c in summary["candidates"]] == ["kimi-sim"]


def test_user_layer_through_flow_run(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    xdg = tmp_path / "xdg"
    data = yaml.safe_load(demo.config.read_text())
    for model in data["models"].values():
        if ":" not in model["script"]:
            model["script"] = str(demo.root / model["script"])
    write(xdg / "flow" / "agents.yaml", data)
    code, summary = flow_run(demo, env={"XDG_CONFIG_HOME": str(xdg)})  # no repo agents.yaml
    assert code == 0 and summary["applied"]["branch"] == "flow/add-median"


def test_builder_fallback_over_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = prepare_demo(tmp_path)
    inner = scripted_handler(demo_scripts(demo))

    def handler(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if request["model"] == "glm-down":
            return ServerReply(503, {"error": {"message": "overloaded", "type": "server_error"}})
        return inner(request)

    with ChatServer(handler) as srv:
        data = http_config(demo, srv.base_url, retries=0)
        models = data["models"]
        models["glm-down"] = {
            "provider": "local",
            "id": "glm-down",
            "family": "zhipu",
            "price": {"input": 0, "output": 0},
        }
        config = write(
            tmp_path / "fb.yaml",
            {
                "providers": data["providers"],
                "models": models,
                "stages": {
                    "planner": {"model": "flash-sim"},
                    "builders": [{"model": "glm-down", "fallbacks": ["glm-sim"]}],
                    "reviewers": [{"model": "gpt-sim"}, {"model": "claude-sim"}],
                },
            },
        )
        code, summary = flow_run(demo, "--config", str(config))
        served = [r["model"] for r in srv.requests]
    assert code == 0
    cand = summary["candidates"][0]
    assert cand["model"] == "glm-down" and cand["models_used"] == ["glm-sim"]
    assert served.count("glm-down") == 1  # failed once, then the builder stayed on glm-sim
    report = (demo.repo / ".flow" / "runs" / summary["run_id"] / "report.md").read_text()
    assert "fallback at build: glm-down → glm-sim" in report


def test_validate_checks_every_profile(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    data = yaml.safe_load(demo.config.read_text())
    data["profiles"] = {"ok": {"builders": ["glm-sim"]}, "broken": {"builders": ["ghost"]}}
    write(demo.config, data)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "validate",
            str(demo.spec),
            "--config",
            str(demo.config),
        ],
        cwd=demo.repo,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "ghost" in out.stderr


def test_examples_are_valid() -> None:
    from orchestrator.spec import load_spec

    examples = ROOT / "examples"
    for path in sorted(examples.glob("*.agents.yaml")):
        loaded = load_config(path)
        assert loaded.config.stages.builders, path
        for profile in (yaml.safe_load(path.read_text()) or {}).get("profiles", {}):
            Layers.discover(None, path, profile=profile).resolve()
    assert load_spec(examples / "specs" / "report-json.md").branch == "flow/report-json"
    change = load_spec(examples / "openspec-change")
    assert change.title == "Add a --since filter to the report command"
    assert [r.name for r in change.requirements] == ["Date filter"]
