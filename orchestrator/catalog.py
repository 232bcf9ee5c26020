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
