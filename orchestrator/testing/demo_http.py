"""The demo's scripted models served over HTTP: the real litellm path, with known answers."""

from __future__ import annotations

from typing import Any

import yaml

from orchestrator.demo import DemoPaths
from orchestrator.llm.scripted import ScriptedModel


def demo_scripts(demo: DemoPaths) -> dict[str, ScriptedModel]:
    """One scripted model per model of the demo's agents.yaml, keyed by its name."""
    models = yaml.safe_load(demo.config.read_text())["models"]
    out = {}
    for name, model in models.items():
        script = model["script"]
        out[name] = ScriptedModel(name, script if ":" in script else demo.config.parent / script)
    return out


def http_config(demo: DemoPaths, base_url: str, **provider: Any) -> dict[str, Any]:
    """The demo's agents.yaml with every model moved to one OpenAI-compatible provider."""
    cfg = yaml.safe_load(demo.config.read_text())
    models = {
        name: {"provider": "local", "id": name, "family": m["family"], "price": m["price"]}
        for name, m in cfg["models"].items()
    }
    return {
        "providers": {"local": {"api": "openai", "base_url": base_url, **provider}},
        "models": models,
        "stages": cfg["stages"],
    }
