"""litellm's bundled price map, read as JSON so that validation never imports litellm."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any


@cache
def price_map() -> dict[str, dict[str, Any]]:
    """The model map bundled with the installed litellm, or {} if litellm is absent."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent / "model_prices_and_context_window_backup.json"
    try:
        data: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    data.pop("sample_spec", None)
    return data


def lookup(model: str) -> dict[str, Any] | None:
    """The entry for a litellm model string, trying it with and without its provider prefix."""
    table = price_map()
    if model in table:
        return table[model]
    if "/" in model:
        tail = model.split("/", 1)[1]
        entry = table.get(tail)
        if entry is not None and model.split("/", 1)[0] in str(entry.get("litellm_provider", "")):
            return entry
    return None


# The variable litellm reads for a bare model id of each vendor (its own table lives in code,
# `validate_environment`, not in data that can be read without importing litellm).
VENDOR_KEYS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "deepseek": ("DEEPSEEK_API_KEY",),
    "mistral": ("MISTRAL_API_KEY",),
    "groq": ("GROQ_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY",),
    "xai": ("XAI_API_KEY",),
    "moonshot": ("MOONSHOT_API_KEY",),
    "zai": ("ZAI_API_KEY",),
    "minimax": ("MINIMAX_API_KEY",),
    "dashscope": ("DASHSCOPE_API_KEY",),
    "together_ai": ("TOGETHERAI_API_KEY", "TOGETHER_API_KEY"),
    "fireworks_ai": ("FIREWORKS_API_KEY", "FIREWORKS_AI_API_KEY"),
    "cohere": ("COHERE_API_KEY",),
    "cerebras": ("CEREBRAS_API_KEY",),
    "perplexity": ("PERPLEXITYAI_API_KEY", "PERPLEXITY_API_KEY"),
}


def vendor_of(model: str) -> str:
    """litellm's vendor of a bare model string (its map's `litellm_provider`, else its prefix)."""
    entry = lookup(model)
    vendor = str(entry.get("litellm_provider", "")) if entry else ""
    return vendor or model.split("/", 1)[0]
